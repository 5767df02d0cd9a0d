r"""Overflow-safe squares, means and norms: the one place stax bounds what a finite input can do.

A finite float32 gradient entry :math:`|g| \ge 2^{64} \approx 1.8\cdot10^{19}` already makes
:math:`g^2` overflow, and a Frobenius norm or a mean of squares overflows much earlier when many
entries are large. Every optimizer in stax bounds its squares, norms and per-tensor statistics
with these helpers, so no finite input (up to the dtype's maximum) turns a parameter or a state
leaf into Inf/NaN:

* :func:`square_bound` — the saturation bound :math:`B`: the largest power of two whose square,
  summed over ``terms`` terms, stays below a quarter of the dtype's maximum. For one term it is
  :math:`2^{e/2-1}` for a dtype with maximum exponent ``e`` (``finfo.maxexp``): :math:`2^{63}
  \approx 9.2\cdot10^{18}` for float32 and bfloat16, :math:`2^7 = 128` for float16.
* :func:`saturate` — clips to :math:`[-B, B]` (elementwise; one op fused into the existing pass).
  NaN stays NaN; ±Inf become ±B. Entries inside the bound are returned bit for bit.
* :func:`mean_square` — a per-tensor statistic at the cost of the plain mean: the plain
  ``jnp.mean(x**2)`` whose result saturates at :math:`R = B^2` (:func:`statistic_bound`,
  :math:`2^{126}` for float32) — an overflowing square or sum counts as above :math:`R`.
  Bit-identical whenever the plain mean is at most :math:`R`; a statistic the dtype cannot hold
  reads as :math:`R`, which keeps the EMAs built on it finite. (Clipping the *elements* instead
  would put a clamp inside the reduction, which XLA's CPU backend then runs ~25× slower.)
* :func:`mean` — an exact mean whose sum cannot overflow (the elements are scaled by a static
  power of two, one multiply fused into the reduction), for the per-tensor means of large
  moments whose value must stay exact (STAMLite's second moment, StableAdamW's RMS).
* :func:`norm`, :func:`normalize`, :func:`saturate_norm` — exact Frobenius norms: the input is
  divided by a power of two chosen from :math:`\max|x|` *only when* the sum of squares could
  overflow; otherwise the power is exactly 1 and the result is bit-identical to
  ``sqrt(sum(x**2))``. This costs one max-reduction beside the sum, so these are for norms next
  to heavier work (Newton–Schulz, SCAO's preconditioner), not for a bare per-tensor statistic.
* :func:`absmax` — ``max |x|`` as an integer maximum of the magnitudes' bits (bit for bit
  the float one), a reduction XLA's CPU backend fuses its operand's expression into.
* :func:`tiled_means` — several per-tensor statistics of the same tensors from one read (a tiled
  variadic reduction XLA's CPU backend runs as one vectorised loop); :func:`separate_means` —
  each its own plain reduction, bit for bit ``jnp.mean``; :func:`independent` — operands behind
  an optimisation barrier, so a second reduction does not share a materialised producer.

Momentum accumulators without a ``(1-β)`` factor must saturate their result as well
(:func:`saturate` after every accumulation), since :math:`\sum_t \mu^t g_t` grows past any bound.

Example:
  >>> import jax.numpy as jnp
  >>> from stax import numerics
  >>> x = jnp.array([3e38, -1e38, 1.0], jnp.float32)
  >>> float(jnp.sqrt(jnp.sum(x * x)))
  inf
  >>> float(numerics.norm(x))  # doctest: +ELLIPSIS
  3.16227...e+38
  >>> float(numerics.saturate(x)[0]) == 2.0 ** 63
  True
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from stax import _sharding as _sh

__all__ = ["square_bound", "statistic_bound", "saturate", "mean_square", "mean", "norm",
           "normalize", "saturate_norm", "rounded", "divide", "div_rn", "sqrt_rn",
           "ptx_ieee_arithmetic", "absmax", "next_float"]

Axis = Optional[Union[int, Sequence[int]]]


def _ceil_log2(n: int) -> int:
  return 0 if n <= 1 else int(math.ceil(math.log2(n)))


def square_bound(*dtypes: Any, terms: int = 1) -> float:
  """Largest power of two ``b`` with ``terms · b² <= finfo(dtype).max / 4`` in every dtype.

  Args:
    *dtypes: floating dtypes (the smallest range wins); default float32.
    terms: how many such squares may be summed (default 1); each doubling of ``terms``
      lowers the bound by √2 (rounded down to a power of two).

  Returns:
    A Python float (exactly a power of two): ``2**63`` for float32/bfloat16 and one term.
  """
  dtypes = dtypes or (jnp.float32,)
  k = min((int(jnp.finfo(dt).maxexp) - 2 - _ceil_log2(terms)) // 2 for dt in dtypes)
  return float(2.0 ** k)


def saturate(x: jax.Array, bound: Any = None) -> jax.Array:
  """Clips ``x`` to ``[-bound, bound]`` (default :func:`square_bound` of ``x``'s dtype).

  NaN stays NaN; ±Inf become ±bound; entries inside the bound are unchanged bit for bit. A
  complex ``x`` has its real and imaginary parts clipped (each at ``bound``).
  """
  x = jnp.asarray(x)
  if bound is None:
    bound = square_bound(jnp.finfo(x.dtype).dtype if jnp.iscomplexobj(x) else x.dtype)
  if jnp.iscomplexobj(x):
    return jax.lax.complex(jnp.clip(jnp.real(x), -bound, bound),
                           jnp.clip(jnp.imag(x), -bound, bound))
  return jnp.clip(x, -bound, bound)


def _reduced_size(shape: tuple, axis: Axis) -> int:
  if axis is None:
    return int(np.prod(shape, dtype=np.int64))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def statistic_bound(dtype: Any = jnp.float32) -> float:
  """``R = square_bound(dtype)**2 = 2**(maxexp-2)``: where :func:`mean_square` saturates
  (``2**126 ≈ 8.5e37`` for float32; a quarter of the maximum, rounded to a power of 2, so EMAs
  and sums of a few such statistics stay finite)."""
  return square_bound(dtype) ** 2


def mean_square(x: jax.Array, axis: Axis = None, keepdims: bool = False) -> jax.Array:
  """``min(mean(x**2), R)`` (:func:`statistic_bound`): finite for any finite or ±Inf ``x``.

  The plain ``jnp.mean(x**2)``, whose overflow (an infinite square or sum) saturates at ``R``;
  so wherever the plain mean is at most ``R`` the result is bit-identical to it. No clamp is
  added inside the reduction (XLA's CPU backend runs a reduction with one ~25× slower), so it
  costs exactly the plain mean. NaN stays NaN.
  """
  m = jnp.mean(jnp.square(jnp.asarray(x)), axis=axis, keepdims=keepdims)
  return jnp.minimum(m, statistic_bound(m.dtype))


class total(NamedTuple):
  """A statistic of :func:`tiled_means` / :func:`separate_means` returned as its sum, not its
  mean: ``total(fn)`` (a finiteness probe ``sum(g - g)`` needs no division, and a division by a
  leaf's size is a scalar kernel per shape)."""

  fn: Callable[..., jax.Array]

  def __call__(self, *args):
    return self.fn(*args)


def _finish(fn, s, n):
  return s if isinstance(fn, total) else s / jnp.asarray(n, s.dtype)


def separate_means(operands: tuple, *fns: Callable[..., jax.Array]) -> tuple[jax.Array, ...]:
  """``mean(fn(*operands))`` for each ``fn`` (its sum for a :class:`total`), each its own
  reduction (0 for an empty result).

  XLA's CPU backend runs a plain reduction of an elementwise expression in its vectorised
  reduction kernel at close to copy speed, but merges sibling reductions that share a
  subexpression into one multi-output loop (or materialises the shared part first), and runs
  a variadic ``lax.reduce`` as a scalar loop: measured at 16M float32 elements (jax 0.10.2),
  ``mean(r²), mean(|r|)`` of ``r = x - m`` take 42 ms merged and 29 ms as one variadic
  reduction, against 16 ms as two separate reductions. So every reduction after the first
  reads its operands through an ``optimization_barrier`` (no shared subexpression to merge;
  the barrier copies nothing). Each result is ``jnp.mean(fn(*operands))`` bit for bit.
  """
  out = []
  for i, fn in enumerate(fns):
    ops = operands if i == 0 else independent(*operands)
    x = jnp.asarray(fn(*ops))
    if not x.size:
      out.append(jnp.zeros([], x.dtype))
    else:
      out.append(jnp.sum(x) if isinstance(fn, total) else jnp.mean(x))
  return tuple(out)


TILED_ROWS = 16
"""Rows summed per partial in :func:`tiled_means`' first stage (an unrolled sum: at 32 or
more XLA's CPU backend emits a strided loop instead, ~10× slower)."""


def _tiled_width(n: int) -> Optional[int]:
  """The tile width ``W`` of :func:`tiled_means` for ``n`` elements, or ``None`` (too small:
  plain reductions)."""
  for w in (2048, 128):
    if n >= 4 * TILED_ROWS * w:
      return w
  return None


def tiled_means(operands: tuple, *fns: Callable[..., jax.Array]) -> tuple[jax.Array, ...]:
  """``mean(fn(*operands))`` for each ``fn`` (its sum for a :class:`total`), all from one read
  of the operands on CPU.

  Two or more statistics of the same tensors (STAM's ``mean(r²)`` and ``mean|r|`` of
  ``r = g - m``) cost XLA's CPU backend one pass each as :func:`separate_means`, and a plain
  variadic ``lax.reduce`` runs as a scalar loop. Here the operands are viewed as tiles
  ``(n // (16·W), 16, W)`` and every statistic's 16 rows are summed in one variadic reduction
  over the middle axis: XLA emits it as one elementwise loop over the ``W``-wide rows (threaded
  and vectorised, one output per statistic), leaving ``n/16`` partial sums per statistic for a
  plain reduction; the last ``n mod 16·W`` elements are summed the same way in tiles
  ``(·, 16, 128)``, and the last ``n mod 2048`` in one variadic (scalar) loop, so every read of
  the operands forms every statistic (a gate on one of them orders all the reads). Measured at 16M
  float32 elements (this project's 2-core CPU, jax 0.10.2): STAM's two residual means 5.3 ms
  against 9.6 as two reductions; at 3.1M 0.7 against 1.0 (``benchmarks/speed.py``'s roofline
  has the whole step). Temporaries: ``4n/16`` bytes per statistic.

  A single statistic takes the same loop, reduced twice over the same values (both sums equal
  bit for bit; the larger is returned, so NaN stays NaN): XLA drops an unused output of a
  variadic reduction, and its single reduction goes to YNNPACK, which evaluates the fused
  elementwise expression one operation at a time. That pays for a costly expression and not
  for a cheap one: at 16M elements StableAdamW's ``mean(g²/max(v, eps²))`` takes 5.9 ms here
  against 8.1 as a plain mean (the step 1.47× against 1.65× optax.adamw's), ``mean(g²)`` 2.5
  either way; the caller chooses (:func:`stax.transforms.stable.update_rms` does).

  Array operands must share one shape (scalars broadcast); a tensor below ``64·128`` elements,
  an explicitly sharded one, or any backend but the CPU uses :func:`separate_means`. The sums
  are associated differently from ``jnp.mean`` (equal to rounding, not bit for bit). An empty
  tensor's means are 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from stax import numerics
    >>> x = jnp.arange(1.0, 1 + 2 ** 16)
    >>> ms, ma = numerics.tiled_means((x,), jnp.square, jnp.abs)
    >>> bool(jnp.allclose(ms, jnp.mean(x ** 2), rtol=1e-6)), float(ma)
    (True, 32768.5)
  """
  arrays = [jnp.asarray(x) for x in operands]
  shape = jnp.broadcast_shapes(*(x.shape for x in arrays))
  n = int(np.prod(shape, dtype=np.int64))
  w = _tiled_width(n)
  if (w is None or not fns or jax.default_backend() != "cpu"
      or any(x.ndim and _sh.explicit_spec(x) is not None for x in arrays)):
    return separate_means(tuple(operands), *fns)
  if len(fns) == 1:
    return (jnp.maximum(*tiled_means(operands, fns[0], fns[0])),)  # (a total stays a total)

  def view(x, lo, hi, tiles):
    """The flat elements ``[lo, hi)`` of an operand as ``tiles`` (a scalar as it is)."""
    if not x.ndim:
      return x
    return jnp.broadcast_to(x, shape).reshape(-1)[lo:hi].reshape(tiles or (hi - lo,))

  def sums_of(lo, hi, tiles):
    """Each statistic's sum over the flat elements ``[lo, hi)`` from one variadic reduction:
    over the middle axis of ``tiles`` (an unrolled, vectorised loop, then plain sums of the
    partials), or of the whole range (``tiles=None``: a scalar loop, for a short remainder)."""
    parts = tuple(jnp.asarray(fn(*(view(x, lo, hi, tiles) for x in arrays))) for fn in fns)
    zeros = tuple(jnp.zeros((), p.dtype) for p in parts)
    axes = (1,) if tiles else (0,)
    partial = jax.lax.reduce(parts, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), axes)
    return [jnp.sum(p) for p in partial] if tiles else list(partial)

  # Every read of the operands (the tiles, the tail's narrower tiles, the last < 16·128
  # elements) computes every statistic in one reduction, so each instruction that reads them
  # also feeds every statistic: a caller whose gate waits on one of them (a finiteness probe
  # before a moment is rewritten in place) orders every read before the write. With one
  # reduction per statistic over the tail, XLA could not order StableAdamW's read of v's tail
  # before v's in-place update and copied v whole (every 384×384 and 384×1152 matrix of the
  # speed benchmark's 16M model).
  sums, lo = None, 0
  for width in (w, 128):
    tile = TILED_ROWS * width
    hi = lo + (n - lo) // tile * tile
    if hi > lo:
      got = sums_of(lo, hi, ((hi - lo) // tile, TILED_ROWS, width))
      sums = got if sums is None else [a + b for a, b in zip(sums, got)]
      lo = hi
  if lo < n:
    sums = [a + b for a, b in zip(sums, sums_of(lo, n, None))]
  return tuple(_finish(fn, s, n) for fn, s in zip(fns, sums))


def rounded(x: jax.Array) -> jax.Array:
  """``x`` itself, rounded to its dtype where it stands: ``a + rounded(b * c)`` rounds twice.

  XLA's CPU and GPU compilers contract a multiply feeding an add into one fused multiply-add
  (one rounding), which NumPy and PyTorch's CPU kernels do not. Where a port must reproduce
  their arithmetic bit for bit (a level ``exp(l_min + k·step)`` whose last bit decides a
  stochastic rounding), the product goes through this: a select on ``x == x`` (NaN stays NaN)
  that the compiler cannot see through, so the multiply is rounded before the add. Costs a
  compare and a select per element; float dtypes only.
  """
  return jnp.where(x == x, x, jnp.asarray(jnp.nan, x.dtype))


_PTX_IEEE = contextvars.ContextVar("stax_ptx_ieee", default=False)


@contextlib.contextmanager
def ptx_ieee_arithmetic() -> Iterator[None]:
  """While active, :func:`divide`, :func:`div_rn` and :func:`sqrt_rn` of float32 arrays emit
  PTX's IEEE round-to-nearest ``div.rn.f32`` and ``sqrt.rn.f32`` as inline assembly
  (``jax.experimental.pallas.triton.elementwise_inline_asm``).

  For tracing the body of a Pallas kernel compiled through the Triton lowering: Triton rounds a
  float32 division as ``div.full.f32`` and a square root as ``sqrt.approx.ftz.f32`` (neither
  IEEE-exact, ``benchmarks/triton_aot.py`` counts them), where XLA divides and takes roots
  exactly, so a kernel's codec arithmetic would part from XLA's. Outside it (every XLA
  program, a kernel in interpret mode) they are the plain operations. ``jax.jit`` caches a
  trace by function, not by this context: trace a new function (a kernel's ``partial``) inside
  it. Used by :mod:`stax.kernels.turbo_step.pallas` around its ``pallas_call`` on a GPU.
  """
  token = _PTX_IEEE.set(True)
  try:
    yield
  finally:
    _PTX_IEEE.reset(token)


def _ptx(asm: str, *args: jax.Array) -> jax.Array:
  from jax.experimental.pallas import triton as pltriton
  shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
  args = [jnp.broadcast_to(jnp.asarray(a, jnp.float32), shape) for a in args]
  [out] = pltriton.elementwise_inline_asm(
      asm, args=args, constraints=",".join(["=f"] + ["f"] * len(args)), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
  return out


def _ieee_float32(*xs: Any) -> bool:
  return _PTX_IEEE.get() and all(jnp.result_type(x) == jnp.float32 for x in xs)


def div_rn(x: Any, y: Any) -> jax.Array:
  """``x / y`` of arrays of the same shape or broadcasting, IEEE round to nearest: the plain
  division (XLA's is exact for non-broadcast operands), or ``div.rn.f32`` inside
  :func:`ptx_ieee_arithmetic`."""
  if _ieee_float32(x, y):
    return _ptx("div.rn.f32 $0, $1, $2;", x, y)
  return x / y


def sqrt_rn(x: Any) -> jax.Array:
  """``sqrt(x)``, IEEE round to nearest: ``jnp.sqrt``, or ``sqrt.rn.f32`` inside
  :func:`ptx_ieee_arithmetic`."""
  if _ieee_float32(x):
    return _ptx("sqrt.rn.f32 $0, $1;", x)
  return jnp.sqrt(x)


def divide(x: Any, d: Any) -> jax.Array:
  """``x / d`` correctly rounded (IEEE division), also where ``d`` broadcasts against ``x``.

  XLA rewrites a division by a broadcast divisor (a constant, a scalar, a per-row statistic)
  into a multiplication by its reciprocal, which is off by an ulp in about 30-70 % of the
  elements. Where a port must reproduce NumPy's or PyTorch's division bit for bit (a level
  spacing ``(l_max - l_min)/255``, a position ``r/step`` that a stochastic rounding compares with
  a uniform), divide through this: the divisor is selected elementwise on ``x == x`` (NaN still
  gives NaN), so it is not a broadcast and the division stays a division. Float dtypes only.
  """
  x = jnp.asarray(x)
  d = jnp.asarray(d, x.dtype)
  x = jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, d.shape))
  return div_rn(x, jnp.where(x == x, d, jnp.asarray(jnp.nan, x.dtype)))


def next_float(x: jax.Array, up: bool) -> jax.Array:
  """The next value of float ``x`` toward +inf (``up``) or -inf: ``jnp.nextafter(x, ±inf)`` bit
  for bit, computed on the bits of ``x`` alone (every float16 and bfloat16 and a sample of
  float32 checked, subnormals included, ``tests/test_numerics.py``).

  Pallas's Triton lowering has no ``nextafter``; integer arithmetic on the bits lowers
  everywhere, so a codec's outward rounding (:func:`stax.codecs.log_quant.block_endpoints`) is the
  same code in XLA and in a GPU kernel. The magnitude's bits go up by one away from zero and
  down by one toward it; ±0 steps to the smallest subnormal of the direction's sign; an
  infinity in its own direction and NaN stay. No float comparison is made: XLA:CPU treats
  subnormal operands of one as zero.
  """
  x = jnp.asarray(x)
  width = 8 * jnp.dtype(x.dtype).itemsize
  utype = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[width]
  bits = jax.lax.bitcast_convert_type(x, utype)
  sign = utype(1 << (width - 1))
  mag = bits & utype((1 << (width - 1)) - 1)
  fi = jnp.finfo(x.dtype)
  inf = utype(((1 << int(fi.nexp)) - 1) << int(fi.nmant))   # the bits of +inf
  away = ((bits & sign) == 0) == up                          # the magnitude grows
  out = jnp.where(away, bits + utype(1), bits - utype(1))
  out = jnp.where(mag == 0, utype(1) if up else sign | utype(1), out)
  stays = (mag > inf) | ((mag == inf) & away)                # NaN, or ±inf in its direction
  return jax.lax.bitcast_convert_type(jnp.where(stays, bits, out), x.dtype)


def independent(*xs: Any) -> tuple:
  """``xs`` behind one ``optimization_barrier`` (Python numbers become 0-d arrays first).

  XLA shares nothing computed from the results with what is computed from ``xs`` themselves:
  a second reduction over the same gradient gets its own copy of the elementwise producer (and
  of its broadcast constants) instead of a materialised shared one. Copies no data.

  The barrier is a CPU tuning, so it is placed only when JAX's default backend is the CPU (the
  values are the same either way). On a GPU it costs launches: measured on an H200 at 128M
  parameters (``benchmarks/gpu.py``, section ``barrier``) it kept 300 more fused kernels per
  step in ``stax.stam``/``stax.stam_lite`` (1,357 and 1,706 against 1,059 and 1,408 without);
  without it those steps took 6.16 and 6.17 ms against 6.52 and 7.32 with it, while
  optax.adamw's went the other way (2.95 → 3.74 ms; that GPU's noise between passes was up to
  30 %, so this says "fewer launches, not slower", not a precise gain).
  """
  xs = tuple(jnp.asarray(x) if isinstance(x, (int, float)) else x for x in xs)
  return jax.lax.optimization_barrier(xs) if jax.default_backend() == "cpu" else xs


def mean_square_and_abs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(mean_square(x), mean(|x|))`` as two separate reductions (:func:`separate_means`); the
  mean square saturates at ``R`` as :func:`mean_square` does."""
  ms, ma = separate_means((jnp.asarray(x),), jnp.square, jnp.abs)
  return jnp.minimum(ms, statistic_bound(ms.dtype)), ma


def mean(x: jax.Array, axis: Axis = None, keepdims: bool = False) -> jax.Array:
  """``mean(x)`` whose sum never overflows: exact (to rounding) for any finite ``x``.

  Computed as ``jnp.mean(x · 2**-k) · 2**k`` with ``2**k >= 4n`` (``n`` elements reduced; a
  static power of two): scaling by a power of two is exact, so the result is ``jnp.mean(x)`` bit
  for bit — unless the mean itself is below ``2**(k-126)`` (float32; about ``1e-30`` for 16M
  elements), where the scaled mean flushes to zero. One multiply fused into the reduction.
  For the means of large non-negative moments (a per-tensor second moment, RMS ratios).
  """
  x = jnp.asarray(x)
  c = mean_scale(_reduced_size(x.shape, axis))
  return jnp.mean(x * c, axis=axis, keepdims=keepdims) / c


def mean_scale(n: int) -> float:
  """:func:`mean`'s factor ``2**-k`` with ``2**k >= 4n`` for ``n`` reduced elements: the mean of
  ``x·c`` never overflows for finite ``x``, and ``mean(x·c)/c`` is ``mean(x)`` bit for bit."""
  return float(2.0 ** -(_ceil_log2(n) + 2))


def _same_width_int(dtype: Any) -> Any:
  """The signed integer type as wide as the float ``dtype`` (for arithmetic on its bits)."""
  return {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[jnp.dtype(dtype).itemsize]


def _pow2(k: jax.Array, dtype: Any) -> jax.Array:
  """Exactly ``2**k`` in ``dtype`` for integer ``k`` in the normal exponent range (bit pattern)."""
  fi = jnp.finfo(dtype)
  itype = _same_width_int(dtype)
  bits = jnp.left_shift((k + (int(fi.maxexp) - 1)).astype(itype), itype(fi.nmant))
  return jax.lax.bitcast_convert_type(bits, dtype)


def _exponent(a: jax.Array) -> jax.Array:
  """``jnp.frexp(a)[1]`` (``a < 2**e``) for a normal, zero, infinite or NaN ``a >= 0`` (0 for
  the last three), read from the exponent bits: ``frexp``'s subnormal handling took some
  forty operations in every kernel that scales by it, and its callers use the exponent only
  where ``a`` exceeds :func:`square_bound`."""
  fi = jnp.finfo(a.dtype)
  itype = _same_width_int(a.dtype)
  biased = (jax.lax.bitcast_convert_type(a, itype) >> int(fi.nmant)) & ((1 << int(fi.nexp)) - 1)
  e = biased.astype(jnp.int32) - (int(fi.maxexp) - 2)
  return jnp.where((biased == 0) | (biased == (1 << int(fi.nexp)) - 1), 0, e)


def absmax(x: jax.Array, axis: Axis = None, keepdims: bool = False) -> jax.Array:
  """``jnp.max(jnp.abs(x), axis)`` of a floating ``x``, as an integer maximum of its bits.

  A float's magnitude is its bit pattern with the sign bit cleared, and non-negative IEEE floats
  order as those integers do, so the result is ``jnp.max(jnp.abs(x))`` bit for bit for every
  non-NaN input (zeros, subnormals and infinities included; a NaN gives a NaN, as there). Why:
  XLA's CPU backend sends a float max-reduction to YNNPACK, whose fusion takes only
  materialised operands, so the elementwise expression that produces ``x`` is written out as a
  temporary for it; an integer maximum is XLA's own reduction, into which that expression fuses
  (and is recomputed by every other reader instead of read back). Measured on TurboAdam's
  default step at 16M parameters (2-core CPU, one interleaved loop, ratio to ``optax.adamw``):
  the block codec's per-block absmax of the new first moment took its temporaries from 85.7 to
  21.5 MiB and XLA's bytes from 50.1 to 41.9 B/param, 4.80× → 3.81×.

  Example:
    >>> import jax.numpy as jnp
    >>> from stax import numerics
    >>> float(numerics.absmax(jnp.array([-3.0, 2.0, -0.0])))
    3.0
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize not in (2, 4, 8):
    return jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims)
  itype = _same_width_int(x.dtype)
  magnitude = jax.lax.bitcast_convert_type(x, itype) & itype(jnp.iinfo(itype).max)
  return jax.lax.bitcast_convert_type(jnp.max(magnitude, axis=axis, keepdims=keepdims), x.dtype)


#: The fewest terms :func:`_scaled_sum_squares` bounds a sum for, in dtypes with float32's range
#: (its threshold ``square_bound(dtype, terms=max(n, SUM_TERMS_FLOOR))``: ``2**51`` for float32
#: and bfloat16): every reduction of up to 2**24 entries compares with the same constant, so the
#: scalar kernels that form a norm's scale are one kernel for all such shapes (XLA compiles
#: each distinct kernel; OAdamW's Newton–Schulz normalised 12 matrix shapes of ResNet-18 with a
#: constant of their own each). A sum of 2**24 squares below ``2**51`` each stays below
#: float32's maximum / 4, so nothing overflows; a larger reduction takes its own count.
SUM_TERMS_FLOOR = 2 ** 24


def _scaled_sum_squares(x: jax.Array, axis: Axis):
  """``(k, s)`` with ``s = sum((x·inv)²)`` (keepdims) and ``inv = 2**-k``.

  ``k`` is 0 (``inv`` exactly 1) unless ``max|x|`` exceeds ``square_bound(dtype, terms=n)`` (so
  the plain sum of squares could overflow; ``n`` at least :data:`SUM_TERMS_FLOOR` in float32's
  range); then ``|x·inv| < 4`` and ``s <= 16 n``.
  """
  x = jnp.asarray(x)
  dtype = x.dtype
  n = _reduced_size(x.shape, axis)
  if int(jnp.finfo(dtype).maxexp) >= 128:
    n = max(n, SUM_TERMS_FLOOR)
  t = square_bound(dtype, terms=n)
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  e = _exponent(amax)                        # amax < 2**e
  k = jnp.where(amax > t, e - 2, 0)          # 2**k >= amax / 4, at most 2**(maxexp - 2)
  xs = x * _pow2(-k, dtype)
  return k, jnp.sum(jnp.square(xs), axis=axis, keepdims=True)


def norm(x: jax.Array, axis: Axis = None, keepdims: bool = False) -> jax.Array:
  """Frobenius norm ``sqrt(sum(x**2))`` without intermediate overflow.

  Exact to the dtype's rounding for entries up to its maximum; Inf only when the norm itself
  exceeds the maximum. Bit-identical to ``jnp.sqrt(jnp.sum(jnp.square(x)))`` when that sum
  cannot overflow.
  """
  x = jnp.asarray(x)
  k, s = _scaled_sum_squares(x, axis)
  out = jnp.sqrt(s) * _pow2(k, x.dtype)
  if not keepdims:
    out = jnp.squeeze(out, axis=axis) if axis is not None else jnp.reshape(out, ())
  return out


def normalize(x: jax.Array, eps: Any = 0.0, norm_scale: Any = 1.0, axis: Axis = None) -> jax.Array:
  """``x / (norm(x) · norm_scale + eps)`` (norm over ``axis``) without overflow.

  Computed as ``(x·inv) / (sqrt(sum((x·inv)²)) · norm_scale + eps·inv)`` with ``inv = 2**-k`` a
  power of two that is exactly 1 unless the sum of squares could overflow, applied as one scalar
  per norm: ``(x · 2**-j) · (2**(j-k) / d)`` with ``j = k // 2`` (both factors normal numbers,
  so each product is the exact scaling it stands for). On XLA's CPU backend, which divides by a
  broadcast scalar as a multiplication by its reciprocal, that is bit-identical to the plain
  expression when ``k = 0``. Finite for every finite ``x``. (Written ``xs / d``, the scaled
  ``xs`` was materialised as a pass of its own for the sum of squares, and every consumer of the
  result recomputed it.)
  """
  x = jnp.asarray(x)
  k, s = _scaled_sum_squares(x, axis)
  j = k // 2
  scale = _pow2(j - k, x.dtype) / (jnp.sqrt(s) * norm_scale + eps * _pow2(-k, x.dtype))
  return (x * _pow2(-j, x.dtype)) * scale


def saturate_norm(x: jax.Array, bound: Any, axis: Axis = None) -> jax.Array:
  """``x · min(1, bound / norm(x))``: ``x`` itself (bit for bit) when its norm is within ``bound``.

  Used to bound quadratic statistics (curvature EMAs): every sum of products of the result's
  entries is at most ``bound²``.
  """
  x = jnp.asarray(x)
  k, s = _scaled_sum_squares(x, axis)
  nrm = jnp.sqrt(s)                          # norm(x) · 2**-k
  limit = bound * _pow2(-k, x.dtype)
  factor = jnp.where(nrm > limit, limit / jnp.where(nrm > limit, nrm, 1.0), 1.0)
  return x * factor.astype(x.dtype)
