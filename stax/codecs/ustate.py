r"""TurboAdam 0.2.0's "UState" first-moment codec: m stored as the normalised Adam update.

The stored quantity is :math:`u = (m/c_1)/(\sqrt{\hat v}/\sqrt{c_2}+\epsilon)` where
:math:`\hat v` is the *persisted* (decoded) second moment and :math:`c_{1,2}` the bias
corrections of the step that wrote it; the next step reconstructs
:math:`m = u\,c_1(\sqrt{\hat v}/\sqrt{c_2}+\epsilon)` with the same :math:`\hat v`, so no gradient is
stored. Because m is decoded *with* v, this is a joint :class:`~stax.codecs.base.MomentStorage`
(:class:`stax.codecs.turbo.TurboAdam02Storage`), not a single-moment codec.

Encoding of u (per mean block of ``m_block_size`` = 64 along the last axis):

* :math:`\mu_b` = bf16(mean of the block's valid entries); residual :math:`r = u-\mu_b`
  (0 on padding);
* the step :math:`s` is the one computed at the *previous* encode (one-step lag;
  initially ``step_factor`` = 1.1); the next one is :math:`1.1\sqrt{\sum r^2/N}` over the tensor;
* code = stochastic rounding of :math:`\mathrm{clip}(r/s + 1.5, 0, 3)` to {0, 1, 2, 3} (2 bits,
  packed, stored padded to the storage block of 128);
* decode: :math:`\mathrm{raw} = (\mathrm{code}-1.5)\,s_{dec}`, re-centred per mean block so the
  stored mean is exact, plus :math:`\mu_b`.

State: :class:`UStateM` ``(codes uint8[..., n_pad/4], means bfloat16[..., ceil(n/64)],
decode_step f32[], encode_step f32[])``; the seed's ``rms_accumulator`` is a transient here.

Reference: ``turboadam`` 0.2.0 ``ustate.py`` (``encode_ustate``, ``decode_ustate``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stax import numerics
from stax.codecs import _layout as L
from stax.codecs.packing import pack_bits, packed_length, unpack_bits

__all__ = ["UStateM", "ustate_init", "ustate_encode", "ustate_decode", "ustate_encode_parts",
           "decode_raw", "recentre", "block_means", "unit_codes", "LEVEL_CENTER",
           "DEFAULT_STEP_FACTOR", "M_BLOCK_SIZE"]

LEVEL_CENTER = 1.5
DEFAULT_STEP_FACTOR = 1.1
M_BLOCK_SIZE = 64
_TINY = float(np.finfo(np.float32).tiny)


class UStateM(NamedTuple):
  """Packed 2-bit UState codes, bf16 block means and the lagged decode/encode steps."""

  codes: jax.Array
  means: jax.Array
  decode_step: jax.Array
  encode_step: jax.Array


def _dims(n: int, m_block: int, block: int):
  nmb = L.num_blocks(n, m_block)
  return nmb, nmb * m_block, L.num_blocks(n, block) * block


def _counts(n: int, m_block: int):
  """Valid elements per mean block (a Python float when all blocks are full, so kernels that
  trace this code capture no array constants)."""
  if n % m_block == 0:
    return float(m_block)
  nmb = L.num_blocks(n, m_block)
  c = np.full((nmb,), m_block, np.float32)
  c[-1] = n - (nmb - 1) * m_block
  return c


def _valid_mask(n: int, m_block: int) -> np.ndarray:
  nmb = L.num_blocks(n, m_block)
  return (np.arange(nmb * m_block) < n).reshape(nmb, m_block)


def ustate_init(param: Any, m_block: int, block: int,
                step_factor: float = DEFAULT_STEP_FACTOR) -> UStateM:
  shape = tuple(param.shape)
  n = shape[-1]
  nmb, _, n_spad = _dims(n, m_block, block)
  codes = L.zeros_following(param, shape[:-1] + (packed_length(n_spad, 2),), jnp.uint8)
  means = L.zeros_following(param, shape[:-1] + (nmb,), jnp.bfloat16)
  return UStateM(codes, means, jnp.zeros([], jnp.float32),
                 jnp.full([], step_factor, jnp.float32))


def ustate_decode(state: UStateM, n: int, m_block: int, block: int) -> jax.Array:
  """float32 u with last axis ``n``."""
  nmb, n_mpad, n_spad = _dims(n, m_block, block)
  codes = unpack_bits(state.codes, 2, n_spad)[..., :n_mpad]
  raw = decode_raw(L.split_last(codes, (nmb, m_block)), state.decode_step)
  valid = _valid_mask(n, m_block)
  if not valid.all():
    raw = jnp.where(valid, raw, 0.0)
  counts = _counts(n, m_block)
  decoded = recentre(raw, jnp.sum(raw, axis=-1)[..., None],
                     counts if isinstance(counts, float) else counts[:, None],
                     state.means[..., None])
  if not valid.all():
    decoded = jnp.where(valid, decoded, 0.0)
  decoded = L.merge_last(decoded, 2)
  return decoded[..., :n] if n_mpad != n else decoded


def decode_raw(codes: jax.Array, decode_step: jax.Array) -> jax.Array:
  """The float32 residuals of 2-bit ``codes`` at the lagged step: ``(code - 1.5)·s_dec``."""
  levels = codes.astype(jnp.float32) - jnp.float32(LEVEL_CENTER)
  return numerics.rounded(levels * decode_step.astype(jnp.float32))


def recentre(raw: jax.Array, raw_sum: jax.Array, count: Any, means: jax.Array) -> jax.Array:
  """u from its residuals ``raw``, re-centred so that its mean block's mean is the stored bf16
  ``means`` (``raw_sum``: the block's sum of ``raw`` over ``count`` valid entries; each
  broadcasts against ``raw``)."""
  return means.astype(jnp.float32) + (raw - numerics.divide(raw_sum, count))


def block_means(block_sum: jax.Array, count: Any) -> jax.Array:
  """The bf16 mean of a mean block from its sum over ``count`` valid entries."""
  return numerics.divide(block_sum, count).astype(jnp.bfloat16)


def unit_codes(residual: jax.Array, uniform: jax.Array, encode_step: jax.Array) -> jax.Array:
  """uint8 2-bit codes of ``residual`` (u minus its block's bf16 mean): the stochastic rounding
  of ``clip(r/s + 1.5, 0, 3)`` with ``uniform`` at the lagged step ``s`` (all 0 while ``s`` is
  0, before the first encode)."""
  used = encode_step.astype(jnp.float32)
  safe = jnp.maximum(used, jnp.float32(_TINY))
  position = jnp.clip(numerics.divide(residual, safe) + jnp.float32(LEVEL_CENTER), 0.0, 3.0)
  lower = jnp.floor(position)
  codes = lower + (uniform < position - lower).astype(jnp.float32)
  return jnp.where(used > 0.0, codes, 0.0).astype(jnp.uint8)


def ustate_encode_parts(u: jax.Array, prev: UStateM, uniform: jax.Array, m_block: int,
                        block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Packed codes, bf16 means and the squared residuals ``(..., nmb, m_block)`` of ``u``,
  encoded with the lagged step ``prev.encode_step`` (the building block of :func:`ustate_encode`
  and of :class:`stax.codecs.turbo.TurboAdam02Storage`'s block encode)."""
  n = u.shape[-1]
  nmb, n_mpad, n_spad = _dims(n, m_block, block)
  x = L.pad_last(u.astype(jnp.float32), n_mpad, 0.0)
  blocks = L.split_last(x, (nmb, m_block))
  means = block_means(jnp.sum(blocks, axis=-1), _counts(n, m_block))
  residual = blocks - means.astype(jnp.float32)[..., None]
  valid = _valid_mask(n, m_block)
  if not valid.all():
    residual = jnp.where(valid, residual, 0.0)
  codes = unit_codes(residual, L.split_last(uniform, (nmb, m_block)), prev.encode_step)
  codes = L.pad_last(L.merge_last(codes, 2), n_spad, jnp.uint8(0))
  return pack_bits(codes, 2), means, jnp.square(residual)


def ustate_encode(u: jax.Array, prev: UStateM, uniform: jax.Array, total: int, m_block: int,
                  block: int, step_factor: float = DEFAULT_STEP_FACTOR) -> UStateM:
  """Encodes float32 ``u`` (last axis ``n``) with the lagged step ``prev.encode_step``.

  Args:
    u: normalised update units.
    prev: the previous state (its ``encode_step`` is used now and becomes ``decode_step``).
    uniform: uniforms of shape ``(..., ceil(n/m_block)·m_block)`` for stochastic rounding.
    total: number of elements of the tensor (the RMS denominator).
  """
  codes, means, sq = ustate_encode_parts(u, prev, uniform, m_block, block)
  next_step = jnp.sqrt(numerics.divide(jnp.sum(sq), float(total))) * jnp.float32(step_factor)
  return UStateM(codes, means, prev.encode_step.astype(jnp.float32), next_step.astype(jnp.float32))
