r"""TurboAdam — AdamW with compressed moments (seed: ``turboadam`` 0.2.0, PyTorch).

.. math::
  m_t = \beta_1 \hat m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 \hat v_{t-1} + (1-\beta_2) g_t^2,
  \quad p_t = p_{t-1} - \eta\big((m_t/c_1)/(\sqrt{v_t/c_2}+\epsilon) + \lambda p_{t-1}\big)

where :math:`\hat m, \hat v` are the *stored* (compressed, decoded) moments; the update of the
current step uses the exact new moments, then they are re-encoded. Built on the shared Adam core
(:func:`stax.scale_by_adam` with a per-leaf ``storage``): leaves with fewer than
``min_compress_elements`` elements (and scalars) keep float32 moments.

Codecs (``codec=``):

* ``"turboadam-0.2"`` (faithful): UState m (2 bits + bf16 means per 64, stored as the normalised
  update and decoded with v) and the packed 1Q log v (``v_bits`` + fp16 endpoints per block):
  6.50 bits/param at ``v_bits=4``. Counter-hash RNG of the seed, bit for bit; seed = ``seed``.
* ``"stax"`` (improved; the default until issue 17): m stored directly with a blockwise signed 4-bit codec (bf16
  absmax per 32 elements, unbiased stochastic rounding, 4.5 bits) and the same 1Q log v; m no
  longer inherits v's quantisation noise and keeps cos(m̂, m) ≈ 0.95 instead of 0.6–0.85
  (8.75 bits/param at ``v_bits=4``; the README's TurboAdam section has the measured fidelity).
* ``"factored"`` (default): the ``"stax"`` signed 4-bit m and, for every leaf that is a matrix
  under ``dimension_numbers`` (:mod:`stax.layout`; stacked ``(L, in, out)`` layers are ``L``
  matrices, biases and norm scales none), Adafactor's factored v (row and column means of each
  matrix, :mod:`stax.codecs.factored`; the update divides by the rank-1 estimate of the new v);
  other leaves keep the 1Q log v. 4.5
  bits/param plus 32·(m+n)/(m·n) for an m×n matrix (4.69 at 256×512, 4.56 at 1024²). Chosen
  as the default by measured quality (README, "Low-bit state"): within seed noise of float32
  AdamW on the three benchmark tasks (char-LM +0.9 %), and no per-element transcendental in
  its v (a 4M-parameter step 1.7× faster than ``"stax"``'s). Its v has no stochastic drift but
  sees only the rank-1 part of v (Adafactor's premise; the fidelity benchmark shows both).

With ``compress_m=False, compress_v=False`` this is ``optax.adamw`` (float32 moments).

Layout: blocks and bit packing run along each compressed tensor's *row view*
(:mod:`stax.codecs.row_view`): trailing axes are merged until rows pad least, so a torch conv
weight ``(out, in, kh, kw)`` is blocked as ``(out, in·kh·kw)`` and an attention kernel
``(in, heads, head_dim)`` as ``(in, heads·head_dim)`` (not along a 3-wide or head_dim-wide last
axis), and a Dense kernel whose ``out`` is a multiple of ``block_size`` keeps its ``(in, out)``
layout. State keeps the leading axes and their
sharding. Whenever the tensor's size is a multiple of ``block_size`` the faithful state
flattened equals the seed's flattened-tensor state; otherwise each row of the view is padded
to a block multiple (the seed pads only the end of the flattened tensor), which changes block
membership and the random stream for such tensors.

Parity with the seed: each faithful step is the seed's step, codes and endpoints included, to
a near-tie or two per 10⁵ codes (the codecs divide and round as PyTorch does:
:func:`stax.numerics.divide`, :func:`stax.numerics.rounded`; a Python-float beta's bias
corrections come from its double-precision log). Over many steps the two runs still part
where a one-ulp difference (XLA's ``exp``/``log``, summation order) lands on a stochastic
rounding's near-tie: the seed's own trajectory is that sensitive (one 2-bit m code flipped in
the seed alone moves parameters by ~5·lr within 50 steps), because a flipped code decays only
stochastically and changes the tensor-wide step every element is rounded with.

Reference: ``turboadam`` 0.2.0 (PyPI), ``optimizer.py``, ``quantize.py``, ``ustate.py``.

Example:
  >>> import jax.numpy as jnp, stax
  >>> tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=256)
  >>> params = {"w": jnp.zeros((64, 1024))}
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": jnp.ones((64, 1024))}, state, params)
  >>> round(stax.state_bits_per_param(state, params), 2)
  6.5
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from stax import _validation as V
from stax import layout
from stax.codecs.log_quant import V_BITS
from stax.codecs.turbo import CODECS, turbo_storage
from stax.kernels import turbo_step
from stax.transforms.adam import scale_by_adam
from stax.transforms.guards import gate_state, gated_chain, nonfinite_guard

__all__ = ["turbo_adam", "cast_updates_to_params"]


def cast_updates_to_params() -> optax.GradientTransformation:
  """Casts each update to its parameter's dtype (moments are float32; bf16 params stay bf16)."""

  def update_fn(updates, state, params=None):
    if params is None:
      return updates, state
    return jax.tree.map(lambda u, p: None if u is None else u.astype(p.dtype), updates, params,
                        is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _rounding_index(value: Any) -> tuple:
  """``value`` as a ``(group, first parameter)`` pair of ints >= 0 (``ValueError`` else)."""
  try:
    group, first = (int(x) for x in value)
  except (TypeError, ValueError):
    raise ValueError(f"`rounding_index` must be a (group, first parameter) pair of ints >= 0, "
                     f"got {value!r}.") from None
  if group < 0 or first < 0:
    raise ValueError(f"`rounding_index` must be a (group, first parameter) pair of ints >= 0, "
                     f"got {value!r}.")
  return group, first


def turbo_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 128,
    v_bits: int = 4,
    compress_m: bool = True,
    compress_v: bool = True,
    min_compress_elements: int = 4096,
    codec: str = "factored",
    *,
    m_block_size: Optional[int] = None,
    seed: int = 0x12345678,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    nonfinite: str = "skip",
    implementation: Optional[str] = None,
    dimension_numbers: Any = None,
    rounding_index: tuple = (0, 0),
) -> optax.GradientTransformationExtraArgs:
  r"""TurboAdam: AdamW whose moments are stored compressed (see the module docstring).

  .. math::
    m_t = \beta_1 \hat m_{t-1} + (1-\beta_1) g_t,\quad
    v_t = \beta_2 \hat v_{t-1} + (1-\beta_2) g_t^2,\quad
    p_t = p_{t-1} - \eta\big((m_t/c_1)/(\sqrt{v_t/c_2}+\epsilon) + \lambda p_{t-1}\big)

  with :math:`\hat m, \hat v` the stored (decoded) moments.

  Args:
    learning_rate: step size η >= 0 or a schedule (default 1e-3).
    b1: first-moment decay in [0, 1) (default 0.9); with the faithful UState m, b1² < b2.
    b2: second-moment decay in [0, 1) (default 0.999).
    eps: denominator term >= 0 (default 1e-8).
    weight_decay: decoupled weight decay λ >= 0 (default 0.0, the seed's default).
    block_size: block length along the row view (see Layout), a multiple of 4 (default 128); with
      ``v_bits`` in {3, 6}, a multiple of 8; and a multiple of ``m_block_size`` (with its
      default, of 32, or 64 for the faithful codec, unless at most that: 48 needs
      ``m_block_size=16``, say).
    v_bits: bits per stored v code in {2, 3, 4, 6, 8} (default 4).
    compress_m: compress the first moment (default True).
    compress_v: compress the second moment (default True).
    min_compress_elements: leaves with fewer elements keep float32 moments, >= 0 (default
      4096). The count is the whole leaf's: stacked layers ``(L, in, out)`` whose layers are
      each below it are compressed as one leaf, where the same layers unstacked are not (a
      per-layer count would need the layout's layer axes, and the default layout reads a
      ``DenseGeneral`` kernel ``(in, heads, head_dim)`` under another name than
      ``query``/``key``/``value`` as ``in`` stacked layers: its moments would never be
      compressed). Reported by stop 54's stacked-layers sweep; pass a smaller threshold to
      compress small unstacked layers too.
    codec: ``"factored"`` (default), ``"stax"`` or ``"turboadam-0.2"`` (see the module docstring).
    m_block_size: the first moment's block: UState's mean block for the faithful codec (default
      ``min(64, block_size)``), the signed codec's scale block for ``"stax"`` (default
      ``min(32, block_size)``); must divide ``block_size``.
    seed: the rounding seed, an int in [0, 2**32) (default 0x12345678, the seed's default).
    mask: weight-decay mask (pytree or callable; default: all leaves).
    nonfinite: ``"skip"`` (default), ``"error"`` or ``"ignore"`` (see :func:`stax.nonfinite_guard`).
    dimension_numbers: the matrices the ``"factored"`` codec's v is factored over, any form
      :mod:`stax.layout` takes (default ``None``: :func:`stax.layout.default_dimension_numbers`,
      Flax layouts); only with ``codec="factored"``. The torch bridge passes each parameter's
      torch layout (a conv weight ``(out, in, kh, kw)``: one ``out × in·kh·kw`` matrix).
    rounding_index: ``(group, first parameter)`` offsetting the faithful codec's rounding
      streams, which the seed hashes from each tensor's ``(group index, parameter index)``
      (default ``(0, 0)``: the leaves of this tree are parameters 0, 1, ... of group 0). The
      torch bridge steps each parameter as its own one-leaf tree and passes its position in
      its param group, so every parameter draws the seed's stream (it had drawn the first
      parameter's: only the first matched ``turboadam``; the second was off by ~3 steps of
      lr after 4 steps). Only with ``codec="turboadam-0.2"``.
      (Until 2026-12-07 v was factored over the m codec's row view, so a stacked ``(3, 16, 8)``
      kernel was one ``3 × 128`` matrix whose column means the layers shared.)
    implementation: the fused update of the compressed leaves (:mod:`stax.kernels.turbo_step`):
      ``None`` (default: the best available, ``"xla"`` on every platform today), ``"xla"``
      (read → step → write on the whole tensor), ``"chunked"`` (the same a chunk of rows at a
      time in one XLA loop: bounded temporaries, but 1.8–2.7× slower on CPU; the ``"stax"``
      codec) or ``"pallas"`` (one Pallas kernel; ``codec="turboadam-0.2"`` with both moments
      compressed and ``v_bits`` 2, 4 or 8; written for Pallas's Triton lowering, checked to
      lower for CUDA and, in interpret mode, to equal ``"xla"``, but not yet run on a GPU, so
      ``None`` does not pick it there). All give the same codes, endpoints and means bit for
      bit and the same update to float32 rounding; UState's two step-size scalars may differ in
      their last bit (``"pallas"`` sums Σr² per block, the XLA path over the tensor). ``"chunked"`` with the faithful codec (its UState m has a
      tensor-wide step size) or the factored codec (no fused update of its own) and
      ``"pallas"`` without the faithful codec raise ``ValueError``; a leaf a named
      implementation cannot run (``"pallas"`` on a row that is not a multiple of
      ``block_size``, or with 3- or 6-bit v) raises ``ValueError`` when the step is traced.

  Parameters must be real floating-point (complex, integer and bool leaves raise ``TypeError`` at
  ``init``, naming the leaf). Non-default arguments with no effect (the codec arguments with
  ``compress_m=compress_v=False``, ``v_bits`` with ``compress_v=False``, ``m_block_size`` with
  ``compress_m=False``) give a ``UserWarning``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Reference: ``turboadam`` 0.2.0 (PyPI), ``optimizer.py``, ``quantize.py``, ``ustate.py``.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> params = {"conv": jnp.zeros((64, 64, 3, 3))}       # torch layout (out, in, kh, kw)
    >>> torch_conv = stax.MatrixDimensionNumbers((1, 2, 3), 0)   # one 64 × 576 matrix
    >>> tx = stax.turbo_adam(1e-3, dimension_numbers=torch_conv)   # codec="factored"
    >>> state = tx.init(params)
    >>> round(stax.state_bits_per_param(state, params, exclude_scalars=True), 2)
    5.06
    >>> tx = stax.turbo_adam(1e-3, codec="stax")            # 4-bit m + 4-bit log v
    >>> round(stax.state_bits_per_param(tx.init(params), params, exclude_scalars=True), 2)
    8.75
  """
  mask = V.check_mask("mask", mask)
  V.check_number("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  V.check_betas(b1=b1, b2=b2)
  V.check_number("eps", eps, low=0.0)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_choice("codec", codec, CODECS)
  V.check_int("block_size", block_size, low=4)
  if block_size % 4:
    raise ValueError(f"`block_size` must be a multiple of 4, got {block_size}.")
  V.check_int("v_bits", v_bits)
  V.check_choice("v_bits", v_bits, V_BITS)
  if (block_size * v_bits) % 8:
    raise ValueError(f"`block_size`·`v_bits` must be a multiple of 8 (block_size={block_size}, "
                     f"v_bits={v_bits}).")
  V.check_int("min_compress_elements", min_compress_elements, low=0)
  V.check_int("seed", seed, low=0, high=2 ** 32 - 1)
  V.check_bool("compress_m", compress_m)
  V.check_bool("compress_v", compress_v)
  if not (compress_m or compress_v):
    why = "with compress_m=False and compress_v=False (float32 moments, plain AdamW)"
    for name, value, default in (("block_size", block_size, 128), ("v_bits", v_bits, 4),
                                 ("min_compress_elements", min_compress_elements, 4096),
                                 ("codec", codec, "factored"),
                                 ("m_block_size", m_block_size, None),
                                 ("seed", seed, 0x12345678)):
      V.warn_no_effect(name, value, default, why)
  elif not compress_v:
    V.warn_no_effect("v_bits", v_bits, 4, "with compress_v=False (v is stored in float32)")
  elif not compress_m:
    V.warn_no_effect("m_block_size", m_block_size, None,
                     "with compress_m=False (m is stored in float32)")
  defaulted = m_block_size is None
  if defaulted:
    m_block_size = min(64 if codec == "turboadam-0.2" else 32, block_size)
  V.check_int("m_block_size", m_block_size, low=1)
  if block_size % m_block_size:
    if defaulted:   # the user gave block_size only: name it, and the rule
      raise ValueError(f"`block_size` must be a multiple of the default `m_block_size` "
                       f"({m_block_size} with codec={codec!r}) or at most it, got {block_size}; "
                       f"or pass an `m_block_size` that divides it.")
    raise ValueError(f"`m_block_size` must divide `block_size` ({block_size}), "
                     f"got {m_block_size}.")
  if (codec == "turboadam-0.2" and compress_m and V.is_concrete_number(b1)
      and V.is_concrete_number(b2) and float(b1) ** 2 >= float(b2)):
    raise ValueError(f"UState (codec='turboadam-0.2', compress_m=True) requires b1**2 < b2, "
                     f"got b1={b1}, b2={b2}.")
  faithful_fused = codec == "turboadam-0.2" and compress_m and compress_v
  if implementation == "pallas" and not faithful_fused:
    raise ValueError("`implementation='pallas'` (the fused TurboAdam kernel) needs "
                     "codec='turboadam-0.2' with compress_m=True and compress_v=True, got "
                     f"codec={codec!r}, compress_m={compress_m}, compress_v={compress_v}.")
  if implementation == "chunked" and codec != "stax":
    raise ValueError("`implementation='chunked'` needs codec='stax' (rows encoded "
                     "independently; UState's step size and the factored v's column means "
                     f"are sums over the whole tensor), got codec={codec!r}.")
  hook = turbo_step.kernel(implementation)
  if not (faithful_fused or (codec == "stax" and (compress_m or compress_v))):
    V.warn_no_effect("implementation", implementation, None,
                     "without a fused update (codec='turboadam-0.2' needs both moments "
                     "compressed; codec='stax' at least one)")
  layout.check_dimension_numbers(dimension_numbers)
  storage = turbo_storage(codec, b1=b1, b2=b2, eps=eps, block_size=block_size, v_bits=v_bits,
                          compress_m=bool(compress_m), compress_v=bool(compress_v),
                          min_compress_elements=min_compress_elements,
                          m_block_size=m_block_size, kernel=hook,
                          dimension_numbers=dimension_numbers,
                          rounding_index=_rounding_index(rounding_index))
  # gated per element of the chain, as stax.adamw: on a skipped step each element keeps its
  # old state. The core gates each leaf as its storage declares: a float32 moment (a vector's)
  # is selected back in the loop that forms it, the compressed encodings (codes, endpoints,
  # counters) by a select of the old ones, and its count is held. Before, nonfinite_guard
  # selected the whole chain's state at once; same bits, but measured interleaved on one
  # 4096×4096 leaf (this 2-core CPU, 5 rounds) the default codec's step went from a median
  # 107 ms to 82 ms. (A select of the core's whole new state after it made XLA form each
  # vector's new moments twice: GPT-2 small's step 31,019 HLO instructions against 28,765.)
  tx = gated_chain(
      scale_by_adam(b1, b2, eps, storage=storage, seed=seed),
      gate_state(optax.add_decayed_weights(weight_decay, mask)),
      gate_state(optax.scale_by_learning_rate(learning_rate)),
      gate_state(cast_updates_to_params()),
  )
  return V.with_param_checks(nonfinite_guard(tx, nonfinite, gated=True),
                             optimizer="stax.turbo_adam")
