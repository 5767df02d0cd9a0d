r"""Newton–Schulz orthogonalisation of a batch of matrices: ``jax.numpy`` reference + Pallas kernel.

For a batch ``x`` of shape ``(B, m, n)`` every matrix is (1) transposed when ``m > n`` so the
Gram matrix is formed on the smaller side, (2) normalised by its Frobenius norm,
:math:`X_0 = X/(s\,\|X\|_F + \epsilon)`, and (3) iterated ``len(coeffs)`` times with the odd
quintic polynomial

.. math::
  A_k = X_k X_k^\top,\qquad B_k = b_k A_k + c_k A_k^2,\qquad X_{k+1} = a_k X_k + B_k X_k ,

which maps every singular value :math:`\sigma` of :math:`X_k` to
:math:`p_k(\sigma) = a_k\sigma + b_k\sigma^3 + c_k\sigma^5` and keeps the singular vectors.

``implementation`` (see :mod:`stax.kernels._dispatch`):

* ``"xla"`` — :func:`newton_schulz_reference`, plain ``jnp`` (the oracle and the CPU default).
  Under an explicit mesh it gives every matmul an explicit output sharding: the matrix is kept
  (or put) sharded along its *long* axis only, the small Gram matrix is all-reduced and
  replicated, and the result is resharded back to the input's sharding, so row- and
  column-sharded matrices give the unsharded result (``optax.contrib.muon`` raises
  ``ShardingTypeError`` there).
* ``"pallas"`` — three tiled kernels per iteration: the Gram matrix ``X Xᵀ``, the fused
  polynomial ``b·A + c·A·A`` and the fused update ``a·X + B·X``. ``A`` and ``B`` are symmetric,
  so the first two kernels compute only the tiles on and above the block diagonal and the lower
  tiles are mirrored (on a GPU this skips almost half of the Gram/polynomial FLOPs). On CPU the
  kernels run with ``interpret=True``. Under an explicit mesh the kernel runs inside
  ``jax.shard_map`` on whole matrices (sharded batch axis, matrix axes gathered).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from stax.kernels.newton_schulz import newton_schulz
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  >>> y = newton_schulz(x, ((3.4445, -4.7750, 2.0315),) * 5)
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from stax import _sharding as _sh
from stax import numerics as num
from stax.kernels._dispatch import resolve_implementation, use_interpret

try:  # Pallas is part of jax; keep the import failure-tolerant for exotic builds.
  from jax.experimental import pallas as pl
  HAS_PALLAS = True
except Exception:  # noqa: BLE001
  pl = None
  HAS_PALLAS = False

__all__ = ["newton_schulz", "newton_schulz_reference", "newton_schulz_pallas",
           "explicit_spec", "Coeffs"]

Coeffs = Sequence[tuple[float, float, float]]


# --------------------------------------------------------------------------- sharding helpers
# Shared with the transforms and codecs (stax/_sharding.py); re-exported for existing callers.
explicit_spec = _sh.explicit_spec
_axis_size = _sh.axis_size


# --------------------------------------------------------------------------- reference
def _normalise(x, eps, norm_scale):
  """``x / (‖x‖_F · norm_scale + eps)`` per matrix, without overflow for any finite ``x``
  (:func:`stax.numerics.normalize`; bit-identical to the plain expression otherwise)."""
  return num.normalize(x, eps, norm_scale, axis=(-2, -1))


def newton_schulz_reference(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7,
                            norm_scale: float = 1.0, compute_dtype=jnp.float32,
                            return_left: bool = False):
  """Plain ``jnp`` Newton–Schulz on ``x`` of shape ``(B, m, n)`` (see the module docstring).

  Args:
    x: batch of matrices ``(B, m, n)``.
    coeffs: one ``(a, b, c)`` per iteration (Python floats: they become literals).
    eps: added to the (scaled) Frobenius norm.
    norm_scale: the norm is multiplied by this before dividing (Polar Express uses 1.02).
    compute_dtype: dtype of the iteration (default float32, as the seed).
    return_left: also return the accumulated left multiplier ``L`` (``(B, k, k)``, ``k =
      min(m, n)``) with ``X_final = L · X_0`` in the Gram orientation (``X_0`` normalised);
      used by :func:`stax.scale_by_orthogonalization`'s ``update_proj_gap``.

  Returns:
    The orthogonalised batch in ``x``'s dtype and shape (and ``L`` if requested).
  """
  in_dtype = x.dtype
  spec = explicit_spec(x)
  x = x.astype(compute_dtype)
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
    if spec is not None:
      spec = (spec[0], spec[2], spec[1])
  k = x.shape[-2]
  gram_spec = work_spec = None
  if spec is not None:
    mesh = jax.typeof(x).sharding.mesh
    sb, sm, sn = spec
    # Keep the long axis sharded (only the small Gram matrix is then all-reduced); move a
    # short-axis sharding there when it divides, else replicate the matrix axes.
    long = sn if sn is not None else sm
    if long is not None and x.shape[-1] % _axis_size(mesh, long) != 0:
      long = None
    if sb is not None and long is not None and set(
        sb if isinstance(sb, tuple) else (sb,)) & set(long if isinstance(long, tuple) else (long,)):
      long = None
    work_spec = _sh.named(mesh, (sb, None, long))
    gram_spec = _sh.named(mesh, (sb, None, None))
    x = jax.reshard(x, work_spec)

  def mm(a, b, out):
    # Batched (B, i, k) x (B, k, j); explicit output sharding under an explicit mesh.
    dn = (((2,), (1,)), ((0,), (0,)))
    if out is None:
      return jax.lax.dot_general(a, b, dn)
    return jax.lax.dot_general(a, b, dn, out_sharding=out)

  x = _normalise(x, eps, norm_scale)
  left = None
  if return_left:
    left = jnp.broadcast_to(jnp.eye(k, dtype=compute_dtype), x.shape[:-2] + (k, k))
  for a, b, c in coeffs:
    gram = mm(x, jnp.swapaxes(x, -1, -2), gram_spec)
    poly = b * gram + c * mm(gram, gram, gram_spec)
    x = a * x + mm(poly, x, work_spec)
    if return_left:
      left = a * left + mm(poly, left, gram_spec)
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  if spec is not None:
    x = _sh.reshard(x, spec if not transposed else (spec[0], spec[2], spec[1]), like=mesh)
  x = x.astype(in_dtype)
  return (x, left) if return_left else x


# --------------------------------------------------------------------------- Pallas kernels
def _gram_kernel(xi_ref, xj_ref, o_ref, *, bk: int, nk: int, symmetric: bool):
  i, j = pl.program_id(1), pl.program_id(2)

  def compute():
    def body(t, acc):
      a = xi_ref[:, pl.ds(t * bk, bk)]
      b = xj_ref[:, pl.ds(t * bk, bk)]
      return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  if symmetric:
    pl.when(j >= i)(compute)
    pl.when(j < i)(lambda: o_ref.__setitem__(..., jnp.zeros(o_ref.shape, o_ref.dtype)))
  else:
    compute()


def _poly_kernel(ai_ref, aj_ref, aij_ref, o_ref, *, b: float, c: float, bk: int, nk: int):
  """o = b·A[i,j] + c·(A·A)[i,j]; A symmetric, so (A·A)[i,j] = Σ_t A[i,t]·A[j,t]."""
  i, j = pl.program_id(1), pl.program_id(2)

  def compute():
    def body(t, acc):
      a = ai_ref[:, pl.ds(t * bk, bk)]
      bb = aj_ref[:, pl.ds(t * bk, bk)]
      return acc + jax.lax.dot_general(a, bb, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (b * aij_ref[...].astype(jnp.float32) + c * acc).astype(o_ref.dtype)

  pl.when(j >= i)(compute)
  pl.when(j < i)(lambda: o_ref.__setitem__(..., jnp.zeros(o_ref.shape, o_ref.dtype)))


def _update_kernel(bi_ref, xj_ref, xij_ref, o_ref, *, a: float, bk: int, nk: int):
  """o = a·X[i,j] + (B·X)[i,j]."""
  def body(t, acc):
    bb = bi_ref[:, pl.ds(t * bk, bk)]
    xx = xj_ref[pl.ds(t * bk, bk), :]
    return acc + jnp.dot(bb, xx, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = (a * xij_ref[...].astype(jnp.float32) + acc).astype(o_ref.dtype)


def _mirror_upper(u: jax.Array, block: int) -> jax.Array:
  """Fills the (zero) tiles below the block diagonal from the computed upper tiles."""
  m = u.shape[-1]
  blk = np.arange(m) // block
  upper = jnp.asarray(blk[:, None] <= blk[None, :])
  return jnp.where(upper, u, jnp.swapaxes(u, -1, -2))


def _compiler_params():
  if use_interpret():
    return None
  try:
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=3)
  except Exception:  # noqa: BLE001 - Triton lowering unavailable; let Pallas choose
    return None


def newton_schulz_pallas(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7,
                         norm_scale: float = 1.0, compute_dtype=jnp.float32,
                         block: int = 64, block_k: int = 32, interpret: Optional[bool] = None):
  """Pallas Newton–Schulz on an unsharded batch ``(B, m, n)`` (tiles ``block``, k-steps
  ``block_k``; both powers of two, ``block_k`` dividing ``block``). Matrices are zero-padded
  to tile multiples, and to powers of two when compiled for GPU (zero rows/columns stay zero
  under the iteration). Not yet compiled or timed on a GPU (no GPU was available to issue 4).
  """
  if interpret is None:
    interpret = use_interpret()
  if block % block_k:
    raise ValueError(f"`block_k` ({block_k}) must divide `block` ({block}).")
  in_dtype = x.dtype
  x = x.astype(compute_dtype)
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  bsz, m, n = x.shape
  mp, np_ = -(-m // block) * block, -(-n // block) * block
  if not interpret:  # Triton lowering wants power-of-two block extents
    mp, np_ = (max(block, 1 << (d - 1).bit_length()) for d in (mp, np_))
  x = _normalise(x, eps, norm_scale)
  x = jnp.pad(x, ((0, 0), (0, mp - m), (0, np_ - n)))
  gm, gn = mp // block, np_ // block
  params = _compiler_params()
  call = functools.partial(pl.pallas_call, interpret=interpret, compiler_params=params)
  row = lambda cols: pl.BlockSpec((None, block, cols), lambda b_, i, j: (b_, i, 0))
  rowj = lambda cols: pl.BlockSpec((None, block, cols), lambda b_, i, j: (b_, j, 0))
  tile = pl.BlockSpec((None, block, block), lambda b_, i, j: (b_, i, j))
  gram_shape = jax.ShapeDtypeStruct((bsz, mp, mp), jnp.float32)
  for a, b, c in coeffs:
    gram = call(functools.partial(_gram_kernel, bk=block_k, nk=np_ // block_k, symmetric=True),
                out_shape=gram_shape, grid=(bsz, gm, gm),
                in_specs=[row(np_), rowj(np_)], out_specs=tile)(x, x)
    gram = _mirror_upper(gram, block)
    poly = call(functools.partial(_poly_kernel, b=float(b), c=float(c), bk=block_k,
                                  nk=mp // block_k),
                out_shape=gram_shape, grid=(bsz, gm, gm),
                in_specs=[row(mp), rowj(mp), tile], out_specs=tile)(gram, gram, gram)
    poly = _mirror_upper(poly, block).astype(compute_dtype)
    x = call(functools.partial(_update_kernel, a=float(a), bk=block_k, nk=mp // block_k),
             out_shape=jax.ShapeDtypeStruct(x.shape, compute_dtype), grid=(bsz, gm, gn),
             in_specs=[row(mp), pl.BlockSpec((None, mp, block), lambda b_, i, j: (b_, 0, j)),
                       tile], out_specs=tile)(poly, x, x)
  x = x[:, :m, :n]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(in_dtype)


def newton_schulz(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7, norm_scale: float = 1.0,
                  compute_dtype=jnp.float32, implementation: Optional[str] = None,
                  block: int = 64, block_k: int = 32) -> jax.Array:
  """Newton–Schulz on a batch ``(B, m, n)`` through the ``implementation=`` dispatch.

  ``None`` currently means ``"xla"`` (the kernel is opt-in until checked on a GPU).
  ``"pallas"`` under an explicit mesh runs the kernel in ``jax.shard_map`` with the batch axis
  kept sharded and the matrix axes gathered, so each device orthogonalises whole matrices.
  """
  # ``None`` resolves to "xla" for now: the Pallas kernel is verified in interpret mode only
  # (never compiled on a GPU yet), so it is opt-in with ``implementation="pallas"``.
  impl = resolve_implementation(implementation,
                                has_pallas=HAS_PALLAS and implementation is not None)
  kw = dict(eps=eps, norm_scale=norm_scale, compute_dtype=compute_dtype)
  if impl == "xla":
    return newton_schulz_reference(x, coeffs, **kw)
  fn = functools.partial(newton_schulz_pallas, coeffs=coeffs, block=block, block_k=block_k, **kw)
  spec = explicit_spec(x)
  if spec is None:
    return fn(x)
  mesh = jax.typeof(x).sharding.mesh
  sb = spec[0]
  if sb is not None and x.shape[0] % _axis_size(mesh, sb):
    sb = None
  whole = P(sb, None, None)
  y = jax.shard_map(lambda t: fn(t), mesh=mesh, in_specs=whole, out_specs=whole,
                    check_vma=False)(_sh.reshard(x, whole))
  return _sh.reshard(y, spec, like=mesh)
