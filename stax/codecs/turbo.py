r"""Joint (m, v) storages for :func:`stax.turbo_adam`.

* :class:`TurboAdam02Storage`: TurboAdam 0.2.0 exactly — UState m (decoded with the persisted v
  and the previous step's bias corrections) and the 1Q log v, each optional, with the seed's
  counter-hash RNG. It reads the step count, the leaf index and the state key from the context
  the Adam core passes (:class:`stax.codecs.base.StorageStep`): per tensor and step the seeds
  are ``seed_for(rounding_seed, t, 0, leaf_index, stream)`` with ``rounding_seed`` the low
  32-bit word of the state key (``PRNGKey(seed)`` keeps ``seed`` there).
* :func:`turbo_storage`: the per-leaf choice (compress only leaves with at least
  ``min_compress_elements`` elements and rank >= 1; others keep float32 moments). Compressed
  leaves are seen through their row view (:mod:`stax.codecs.row_view`): blocks run along the
  tensor's rows (``(out, in·kh·kw)`` for a torch conv weight), not along a short last axis.
  The ``"stax"`` codec's :class:`~stax.codecs.base.SeparateStorage` keeps its encoded arrays on
  the parameter's sharding (``follow_sharding=True``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs import _layout as L
from stax.codecs.base import FullPrecision, SeparateStorage, StorageBase
from stax.codecs.block_signed import BlockSignedCodec
from stax.codecs.row_view import RowView
from stax.codecs.rng import counter_uniform, flat_index, seed_for, seed_from_key

__all__ = ["TurboAdam02Storage", "turbo_storage", "bias_corrections", "CODECS"]

CODECS = ("stax", "turboadam-0.2")


def bias_corrections(b1, b2, t):
  """float32 ``(1 - b1**t, sqrt(1 - b2**t))`` computed as ``-expm1(t·log1p(b - 1))``.

  Accurate to a few float32 ulps of the double-precision values the seed computes (a plain
  float32 ``1 - b**t`` loses ~1e-5 relative for b2 = 0.999 at small t).
  """
  t = jnp.asarray(t, jnp.float32)
  b1 = jnp.asarray(b1, jnp.float32)
  b2 = jnp.asarray(b2, jnp.float32)
  c1 = -jnp.expm1(t * jnp.log1p(b1 - 1.0))
  c2 = -jnp.expm1(t * jnp.log1p(b2 - 1.0))
  return c1, jnp.sqrt(c2)


@dataclasses.dataclass(frozen=True)
class TurboAdam02Storage(StorageBase):
  """TurboAdam 0.2.0's state for one leaf (see the module docstring)."""

  compress_m: bool
  compress_v: bool
  bits: int
  block_size: int
  m_block_size: int
  step_factor: Any
  b1: Any
  b2: Any
  eps: Any

  @property
  def needs_key(self) -> bool:
    return bool(self.compress_m or self.compress_v)

  def init(self, param):
    if self.compress_m:
      mu = US.ustate_init(param, self.m_block_size, self.block_size, float(self.step_factor))
    else:
      mu = jnp.zeros(param.shape, jnp.float32)
    if self.compress_v:
      nu = LQ.log_init(param, self.bits, self.block_size)
    else:
      nu = jnp.zeros(param.shape, jnp.float32)
    return mu, nu

  def _v(self, nu_enc, n):
    if self.compress_v:
      return LQ.log_decode(nu_enc, self.bits, self.block_size, n)
    return nu_enc

  def read(self, mu_enc, nu_enc, like, ctx):
    n = like.shape[-1]
    v = self._v(nu_enc, n)
    if not self.compress_m:
      return mu_enc, v
    u = US.ustate_decode(mu_enc, n, self.m_block_size, self.block_size)
    c1, c2s = bias_corrections(self.b1, self.b2, ctx.count)
    c2s = jnp.where(ctx.count > 0, c2s, 1.0)          # the seed's "previous_bc2_sqrt = 1" at t=0
    denom = jnp.sqrt(jnp.maximum(v, 0.0)) / c2s + jnp.asarray(self.eps, jnp.float32)
    return u * c1 * denom, v

  def write(self, mu, nu, ctx):
    n = mu.shape[-1]
    t = ctx.count + 1
    seed = seed_from_key(ctx.key)
    if self.compress_v:
      _, n_pad = LQ._dims(n, self.block_size)
      v_seed = seed_for(seed, t, 0, ctx.index, 2)
      uniform = counter_uniform(flat_index(nu.shape[:-1] + (n_pad,)), v_seed)
      nu_enc = LQ.log_encode(nu, self.bits, self.block_size, uniform)
      nu_enc = LQ.LogQuantState(*(L.constrain_like(a, mu) for a in nu_enc))
      v_p = LQ.log_decode(nu_enc, self.bits, self.block_size, n)
    else:
      nu_enc = nu.astype(jnp.float32)
      v_p = nu_enc
    if not self.compress_m:
      return mu.astype(jnp.float32), nu_enc
    c1, c2s = bias_corrections(self.b1, self.b2, t)
    denom = jnp.sqrt(jnp.maximum(v_p, 0.0)) / c2s + jnp.asarray(self.eps, jnp.float32)
    u = mu.astype(jnp.float32) / c1 / denom
    nmb = L.num_blocks(n, self.m_block_size)
    m_seed = seed_for(seed, t, 0, ctx.index, 1)
    uniform = counter_uniform(flat_index(mu.shape[:-1] + (nmb * self.m_block_size,)), m_seed)
    total = 1
    for d in mu.shape:
      total *= d
    mu_enc = US.ustate_encode(u, ctx.mu_enc, uniform, total, self.m_block_size, self.block_size,
                              float(self.step_factor))
    mu_enc = mu_enc._replace(codes=L.constrain_like(mu_enc.codes, mu),
                             means=L.constrain_like(mu_enc.means, mu))
    return mu_enc, nu_enc


def turbo_storage(codec: str, *, b1, b2, eps, block_size: int, v_bits: int, compress_m: bool,
                  compress_v: bool, min_compress_elements: int, m_block_size: int,
                  m_bits: int = 4, step_factor: float = US.DEFAULT_STEP_FACTOR):
  """The per-leaf storage callable used by :func:`stax.turbo_adam`."""

  def choose(leaf):
    size = 1
    for d in leaf.shape:
      size *= d
    big = len(leaf.shape) >= 1 and size >= min_compress_elements and size > 0
    cm, cv = bool(compress_m and big), bool(compress_v and big)
    if codec == "turboadam-0.2":
      if not (cm or cv):
        return SeparateStorage(FullPrecision(jnp.float32), FullPrecision(jnp.float32))
      return RowView(TurboAdam02Storage(cm, cv, v_bits, block_size, m_block_size, step_factor,
                                        b1, b2, eps), block_size)
    m_codec = BlockSignedCodec(m_bits, m_block_size) if cm else FullPrecision(jnp.float32)
    v_codec = LQ.LogQuantCodec(v_bits, block_size) if cv else FullPrecision(jnp.float32)
    storage = SeparateStorage(m_codec, v_codec, follow_sharding=True)
    return RowView(storage, block_size) if (cm or cv) else storage

  return choose
