r"""Blockwise signed linear codec for the first moment (stax's improved m).

Per block of ``block_size`` elements along the last axis: scale :math:`s` = the block's absmax,
stored in bfloat16 rounded *up* (so every value is inside the grid); levels
:math:`k s / L` for :math:`k \in [-L, L]`, :math:`L = 2^{b-1}-1` (7 at 4 bits; zero is a level);
stochastic rounding between the two neighbouring levels (unbiased: :math:`E[\hat m] = m`) from the
counter-hash stream. Codes ``k + L`` are packed along the last axis.

State: :class:`BlockSignedState` ``(codes uint8[..., n_pad·b/8], scales bfloat16[..., nb])``, i.e.
``b + 16/block_size`` bits per element. Unlike UState it stores m itself, so its error does not
depend on v's quantisation noise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from stax import numerics as num
from stax.codecs import _layout as L
from stax.codecs.log_quant import counter_uniform_like
from stax.codecs.packing import pack_bits, packed_length, unpack_bits
from stax.codecs.rng import key_to_seed

__all__ = ["BlockSignedState", "BlockSignedCodec", "signed_encode", "signed_decode", "signed_init"]


class BlockSignedState(NamedTuple):
  codes: jax.Array
  scales: jax.Array


def _dims(n, b):
  nb = L.num_blocks(n, b)
  return nb, nb * b


def signed_init(param, bits, block_size):
  shape = tuple(param.shape)
  nb, n_pad = _dims(shape[-1], block_size)
  half = (1 << (bits - 1)) - 1
  codes_row = pack_bits(jnp.full((1, n_pad), half, jnp.uint8), bits)[0]
  codes = L.zeros_following(param, shape[:-1] + (packed_length(n_pad, bits),), jnp.uint8)
  codes = codes + codes_row                                    # every level at 0
  scales = L.zeros_following(param, shape[:-1] + (nb,), jnp.bfloat16)
  return BlockSignedState(codes, scales)


def bf16_ceil(x: jax.Array) -> jax.Array:
  """The smallest bfloat16 >= each float32 ``x >= 0`` (NaN stays NaN, +inf stays +inf).

  In integer arithmetic on the float32 bits: adding ``0xFFFF`` carries into the upper half
  unless the 16 bits that bfloat16 drops are all zero, then those bits are cleared, so the
  result converts to bfloat16 exactly. The codec formerly rounded to nearest and stepped up
  with ``nextafter`` where that fell below ``x``: the same bits for every normal ``x``, in a few
  integer operations instead of ``nextafter``'s two dozen (which XLA repeated in every kernel
  that reads the scales); for a subnormal ``x`` (a block whose largest |m| is below 1.2e-38)
  XLA:CPU's flush-to-zero compare kept the nearest value, below ``x``, and this does not."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  up = (bits + jnp.uint32(0xFFFF)) & jnp.uint32(0xFFFF0000)
  up = jnp.where(bits >= jnp.uint32(0x7F800000), bits, up)       # inf and NaN: unchanged
  return jax.lax.bitcast_convert_type(up, jnp.float32).astype(jnp.bfloat16)


def signed_decode(state, bits, block_size, n):
  nb, n_pad = _dims(n, block_size)
  half = (1 << (bits - 1)) - 1
  k = unpack_bits(state.codes, bits, n_pad).astype(jnp.float32) - jnp.float32(half)
  k = L.split_last(k, (nb, block_size))
  m = k * (state.scales.astype(jnp.float32)[..., None] / jnp.float32(half))
  m = L.merge_last(m, 2)
  return m[..., :n] if n != n_pad else m


def signed_encode(m, bits, block_size, uniform=None):
  n = m.shape[-1]
  nb, n_pad = _dims(n, block_size)
  half = (1 << (bits - 1)) - 1
  x = L.split_last(L.pad_last(m.astype(jnp.float32), n_pad, 0.0), (nb, block_size))
  s = bf16_ceil(num.absmax(x, axis=-1))   # fuses the producer of m (numerics.absmax)
  sf = s.astype(jnp.float32)[..., None]
  pos = jnp.where(sf > 0, x / jnp.where(sf > 0, sf, 1.0) * jnp.float32(half), 0.0)
  pos = jnp.clip(pos, -half, half)
  if uniform is None:
    k = jnp.round(pos)
  else:
    lower = jnp.floor(pos)
    k = lower + (L.split_last(uniform, (nb, block_size)) < pos - lower).astype(jnp.float32)
    k = jnp.clip(k, -half, half)
  codes = pack_bits(L.merge_last((k + half).astype(jnp.uint8), 2), bits)
  return BlockSignedState(codes, s)


class BlockSignedCodec(NamedTuple):
  """Blockwise signed ``bits``-bit codec (a :class:`~stax.codecs.base.MomentCodec`).

  Args:
    bits: 2, 3, 4, 6 or 8 (default 4).
    block_size: block length along the last axis (default 128).
    stochastic: unbiased stochastic rounding (default True) or nearest.

  Rows are encoded independently (``rows_local``; ``encode(..., row0=r)`` encodes a chunk of
  rows starting at row ``r`` exactly as those rows of the whole tensor).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> codec = stax.BlockSignedCodec(bits=4, block_size=32, stochastic=False)
    >>> x = jnp.linspace(-1.0, 1.0, 64).reshape(1, 64)
    >>> enc = codec.encode(x, None)
    >>> enc.codes.shape, enc.scales.dtype, bool(jnp.abs(codec.decode(enc, x) - x).max() < 0.08)
    ((1, 32), dtype(bfloat16), True)
  """

  bits: int = 4
  block_size: int = 128
  stochastic: bool = True

  rows_local = True

  @property
  def needs_key(self):
    return self.stochastic

  def init(self, param):
    return signed_init(param, self.bits, self.block_size)

  def decode(self, encoded, like):
    return signed_decode(encoded, self.bits, self.block_size, like.shape[-1])

  def encode(self, value, key, row0=0):
    uniform = None
    if self.stochastic:
      _, n_pad = _dims(value.shape[-1], self.block_size)
      seed = key_to_seed(key) ^ jnp.uint32(0x5BD1E995)
      uniform = counter_uniform_like(value.shape[:-1] + (n_pad,), seed, row0)
    return signed_encode(value, self.bits, self.block_size, uniform)
