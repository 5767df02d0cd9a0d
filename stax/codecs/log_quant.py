r"""TurboAdam 0.2.0's "1Q" log-scale second-moment codec (``v_bits`` ∈ {2, 3, 4, 6, 8}).

Per block of ``block_size`` elements along the last axis:

* endpoints :math:`\ell_{min}, \ell_{max}` = min/max of :math:`\log v` (v clamped to
  [1e-38, f32 max]), capped at 88.6875 and stored as float16 **rounded outward** (one fp16 ulp
  down/up when round-to-nearest moved them inward), so both block extremes are representable;
* :math:`2^b` levels including both endpoints,
  :math:`v_k = \exp(\ell_{min} + k(\ell_{max}-\ell_{min})/(2^b-1))`;
* stochastic rounding **unbiased in the value domain**: between the two neighbouring levels
  :math:`v_{lo} \le v \le v_{hi}` the code goes up with probability
  :math:`(v - v_{lo})/(v_{hi}-v_{lo})`, so :math:`E[\hat v] = v`; no code maps to zero;
* codes packed little-endian along the last axis (:mod:`stax.codecs.packing`).

State per leaf: :class:`LogQuantState` ``(codes uint8[..., n_pad·b/8], scales float16[..., nb, 2])``
with ``n_pad`` the last axis padded to a block multiple (padding repeats the minimum of the last
partial block, as the seed does, so it never moves a block's range). With the last axis a multiple
of ``block_size`` (or a 1-D tensor), the flattened arrays equal TurboAdam 0.2.0's ``indices`` and
``scales`` bit for bit. Initial value: both endpoints fp16(log 1e-30) = -69.0625, codes 0.

Reference: ``turboadam`` 0.2.0 ``quantize.py`` (``quantize_logscale``, ``dequantize_logscale``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stax import numerics
from stax.codecs import _layout as L
from stax.codecs.packing import pack_bits, packed_length, unpack_bits
from stax.codecs.rng import counter_uniform, flat_index, key_to_seed

__all__ = ["V_BITS", "LogQuantState", "LogQuantCodec", "log_init", "log_decode", "log_encode",
           "level_coords", "decode_levels", "clamp_positive", "block_endpoints", "level_codes",
           "MIN_POSITIVE", "MAX_LOG_FP16"]

V_BITS = (2, 3, 4, 6, 8)
MIN_POSITIVE = 1.0e-38
MAX_LOG_FP16 = 88.6875
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
_LOG_MIN_POSITIVE = float(np.float32(math.log(MIN_POSITIVE)))


class LogQuantState(NamedTuple):
  """Packed log-scale codes and per-block fp16 log endpoints."""

  codes: jax.Array
  scales: jax.Array


def _dims(n: int, block_size: int):
  nb = L.num_blocks(n, block_size)
  return nb, nb * block_size


def log_init(param: Any, bits: int, block_size: int, initial_value: float = 1e-30) -> LogQuantState:
  """Encoded constant ``initial_value`` for a moment of ``param``'s shape (rank >= 1)."""
  shape = tuple(param.shape)
  nb, n_pad = _dims(shape[-1], block_size)
  lv = math.log(max(float(initial_value), MIN_POSITIVE))
  codes = L.zeros_following(param, shape[:-1] + (packed_length(n_pad, bits),), jnp.uint8)
  scales = L.zeros_following(param, shape[:-1] + (nb, 2), jnp.float16, fill=np.float16(lv))
  return LogQuantState(codes, scales)


def log_decode(state: LogQuantState, bits: int, block_size: int, n: int,
               exact: bool = True) -> jax.Array:
  """float32 ``v`` of last-axis length ``n`` (``exact``: the seed's arithmetic, see
  :func:`log_encode`)."""
  nb, n_pad = _dims(n, block_size)
  idx = unpack_bits(state.codes, bits, n_pad).astype(jnp.float32)
  # the coordinates before the blocks are split out: with exact=False, XLA would otherwise
  # fold the reciprocal into the per-block range (another rounding)
  coord = L.split_last(level_coords(idx, bits, exact), (nb, block_size))
  v = decode_levels(coord, state.scales[..., 0:1], state.scales[..., 1:2], exact)
  v = L.merge_last(v, 2)
  return v[..., :n] if n != n_pad else v


def level_coords(idx: jax.Array, bits: int, exact: bool = True) -> jax.Array:
  """The position ``k/(2^b - 1)`` in its block's log range of each code ``k`` (float32
  integers ``idx``)."""
  return _div(idx, float((1 << bits) - 1), exact)


def decode_levels(coord: jax.Array, min_h: jax.Array, max_h: jax.Array,
                  exact: bool = True) -> jax.Array:
  """The float32 levels at coordinates ``coord`` (:func:`level_coords`) between the fp16 log
  endpoints ``min_h``, ``max_h`` (broadcasting against ``coord``): ``exp(l_min + coord·(l_max -
  l_min))``, never below the smallest normal float32 (XLA flushes levels below it to 0). The
  elementwise part of :func:`log_decode`, shared with the fused GPU kernel
  (:mod:`stax.kernels.turbo_step.pallas`)."""
  lmin = min_h.astype(jnp.float32)
  lmax = max_h.astype(jnp.float32)
  return jnp.maximum(jnp.exp(lmin + _rnd(coord * (lmax - lmin), exact)),
                     jnp.float32(_F32_TINY))


def _div(x, d, exact: bool):
  return numerics.divide(x, d) if exact else x / d


def _rnd(x, exact: bool):
  return numerics.rounded(x) if exact else x


def _outward_fp16(log_min: jax.Array, log_max: jax.Array) -> tuple[jax.Array, jax.Array]:
  log_min = jnp.minimum(log_min, MAX_LOG_FP16)
  log_max = jnp.minimum(log_max, MAX_LOG_FP16)
  min_h = log_min.astype(jnp.float16)
  max_h = log_max.astype(jnp.float16)
  dynamic = log_max > log_min
  min_out = numerics.next_float(min_h, up=False)
  max_out = jnp.minimum(numerics.next_float(max_h, up=True), jnp.float16(MAX_LOG_FP16))
  min_h = jnp.where(dynamic & (min_h.astype(jnp.float32) > log_min), min_out, min_h)
  max_h = jnp.where(dynamic & (max_h.astype(jnp.float32) < log_max), max_out, max_h)
  return min_h, max_h


def clamp_positive(v: jax.Array) -> jax.Array:
  """float32 ``v`` clamped to ``[1e-38, f32 max]``, the range :func:`log_encode` encodes."""
  return jnp.minimum(jnp.maximum(v.astype(jnp.float32), jnp.float32(MIN_POSITIVE)),
                     jnp.float32(_F32_MAX))


def block_endpoints(block_min: jax.Array, block_max: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The fp16 log endpoints ``(min_h, max_h)`` of blocks whose clamped values
  (:func:`clamp_positive`) have extremes ``block_min``, ``block_max``: their logs (as the log of
  the extremes, the same numbers as the extremes of the logs: XLA's float32 log never
  decreases, ``tests/test_codecs.py`` checks every positive float), rounded outward to fp16."""
  # XLA on CPU flushes float32 denormals (1e-38 is one) to zero; clamp the log as the seed's
  # log(1e-38) so the block minimum stays finite.
  log_min = jnp.maximum(jnp.log(block_min), jnp.float32(_LOG_MIN_POSITIVE))
  log_max = jnp.maximum(jnp.log(block_max), jnp.float32(_LOG_MIN_POSITIVE))
  return _outward_fp16(log_min, log_max)


def level_codes(x: jax.Array, min_h: jax.Array, max_h: jax.Array, bits: int,
                uniform: Optional[jax.Array] = None, exact: bool = True) -> jax.Array:
  """float32 codes (integers in ``[0, 2^b - 1]``) of the clamped values ``x`` between their
  block's fp16 endpoints (broadcasting): value-unbiased stochastic rounding with ``uniform``
  (same shape as ``x``), or the nearest level in log space with ``None``. The elementwise part
  of :func:`log_encode`, shared with the fused GPU kernel."""
  intervals = (1 << bits) - 1
  logb = jnp.maximum(jnp.log(x), jnp.float32(_LOG_MIN_POSITIVE))
  lmin = min_h.astype(jnp.float32)
  lmax = max_h.astype(jnp.float32)
  step = _div(lmax - lmin, float(intervals), exact)
  position = jnp.clip(_div(logb - lmin, jnp.maximum(step, jnp.float32(1e-10)), exact), 0.0,
                      float(intervals))
  if uniform is None:
    return jnp.clip(jnp.floor(position + 0.5), 0, intervals)
  lower = jnp.clip(jnp.floor(position), 0, intervals)
  upper = jnp.minimum(lower + 1.0, float(intervals))
  lo_v = jnp.exp(lmin + _rnd(lower * step, exact))
  hi_v = jnp.exp(lmin + _rnd(upper * step, exact))
  p_up = jnp.clip(numerics.div_rn(x - lo_v, jnp.maximum(hi_v - lo_v, jnp.float32(_F32_TINY))),
                  0.0, 1.0)
  p_up = jnp.where(upper > lower, p_up, 0.0)
  return lower + (uniform < p_up).astype(jnp.float32)


def pad_blocks(v: jax.Array, block_size: int) -> jax.Array:
  """Pads the last axis to a block multiple with the min of each row's last partial block."""
  n = v.shape[-1]
  nb, n_pad = _dims(n, block_size)
  if n_pad == n:
    return v
  tail = v[..., (nb - 1) * block_size:]
  return L.pad_last(v, n_pad, jnp.min(tail, axis=-1, keepdims=True))


def log_encode(v: jax.Array, bits: int, block_size: int,
               uniform: Optional[jax.Array] = None, exact: bool = True) -> LogQuantState:
  """Encodes float32 ``v`` (last axis ``n``); ``uniform`` (shape ``(..., n_pad)``) gives
  stochastic rounding, ``None`` rounds to the nearest level in log space.

  ``exact`` (default True): divide and round as the seed's PyTorch code does
  (:func:`stax.numerics.divide`, :func:`stax.numerics.rounded`), so a probability that decides
  a stochastic rounding is the seed's to the last bit; False lets XLA multiply by reciprocals
  and fuse multiply-adds (an ulp off, ~1.2-1.5x faster on CPU).
  """
  n = v.shape[-1]
  nb, n_pad = _dims(n, block_size)
  blocks = clamp_positive(L.split_last(pad_blocks(v.astype(jnp.float32), block_size),
                                       (nb, block_size)))
  # the extremes read v itself, so XLA materialises v for the reductions, not log v and its
  # clamp (block_endpoints)
  min_h, max_h = block_endpoints(jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1))
  scales = jnp.stack([min_h, max_h], axis=-1)
  if uniform is not None:
    uniform = L.split_last(uniform, (nb, block_size))
  idx = level_codes(blocks, min_h[..., None], max_h[..., None], bits, uniform, exact)
  codes = pack_bits(L.merge_last(idx.astype(jnp.uint8), 2), bits)
  return LogQuantState(codes, scales)


def counter_uniform_like(shape: tuple, seed: jax.Array, row0: Any = 0) -> jax.Array:
  """The seed's antithetic counter uniforms over a row-major layout of ``shape``, whose first
  row is row ``row0`` of the whole tensor (a row chunk: the index is offset by
  ``row0 · shape[-1]``, so a tensor encoded chunk by chunk draws the same stream as at once)."""
  index = flat_index(shape)
  if not (isinstance(row0, int) and row0 == 0):
    index = index + jnp.asarray(row0).astype(jnp.uint32) * jnp.uint32(shape[-1])
  return counter_uniform(index, seed)


class LogQuantCodec(NamedTuple):
  """The 1Q log codec as a :class:`~stax.codecs.base.MomentCodec` (for ``SeparateStorage``).

  Args:
    bits: ``v_bits`` in {2, 3, 4, 6, 8} (default 4).
    block_size: elements per block along the last axis (default 128).
    stochastic: value-unbiased stochastic rounding (default True) or nearest in log space.
    exact: the seed's division and rounding, bit for bit (default False: XLA's faster
      reciprocal multiplies and FMAs, an ulp off; the faithful TurboAdam storage uses True).

  The random stream is the seed's counter hash keyed by a 32-bit seed drawn from the per-leaf
  key the Adam core passes (state key hashed with the step and the leaf index). Rows are
  encoded independently (``rows_local``): ``encode(..., row0=r)`` encodes a chunk of rows
  starting at row ``r`` exactly as those rows of the whole tensor.

  Example:
    >>> import jax, jax.numpy as jnp, stax
    >>> codec = stax.LogQuantCodec(bits=4, block_size=128)
    >>> v = jnp.logspace(-8, 0, 256).reshape(2, 128)
    >>> enc = codec.encode(v, jax.random.key_data(jax.random.PRNGKey(0)))
    >>> enc.scales.shape, bool(jnp.all(jnp.abs(jnp.log(codec.decode(enc, v) / v)) < 0.7))
    ((2, 1, 2), True)
  """

  bits: int = 4
  block_size: int = 128

  stochastic: bool = True
  exact: bool = False

  rows_local = True

  @property
  def needs_key(self) -> bool:
    return self.stochastic

  def init(self, param):
    return log_init(param, self.bits, self.block_size)

  def decode(self, encoded, like):
    return log_decode(encoded, self.bits, self.block_size, like.shape[-1], self.exact)

  def encode(self, value, key, row0=0):
    uniform = None
    if self.stochastic:
      nb, n_pad = _dims(value.shape[-1], self.block_size)
      uniform = counter_uniform_like(value.shape[:-1] + (n_pad,), key_to_seed(key), row0)
    return log_encode(value, self.bits, self.block_size, uniform, self.exact)
