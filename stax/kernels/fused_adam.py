r"""Fused TurboAdam 0.2.0 step: one pass per block over p, g and the packed state.

Per block of ``block_size`` elements (along the last axis) the kernel

1. unpacks the v codes and decodes :math:`\hat v` from the block's fp16 log endpoints;
2. unpacks the 2-bit UState codes, decodes u with the bf16 means (re-centred per mean block) and
   reconstructs :math:`m = u\,c_1^{prev}(\sqrt{\hat v}/\sqrt{c_2^{prev}}+\epsilon)`;
3. forms the EMAs, applies decoupled decay and the AdamW update to p (exact new v);
4. re-encodes v (outward fp16 endpoints, value-unbiased stochastic rounding) and packs it;
5. computes :math:`u = (m/c_1)/(\sqrt{v_p}/\sqrt{c_2}+\epsilon)` with the persisted v, its bf16
   means and 2-bit stochastic codes with the lagged step, packs them, and writes the block's
   :math:`\sum r^2` (the next encode step is :math:`1.1\sqrt{\sum r^2/N}`, finished outside with
   one tiny reduction, as the seed's finalize kernel does).

So p, g and every packed state array are read once and written once; the random stream is the
seed's counter hash, generated in the kernel from (seed, flat index), so no random array moves.

Bytes per parameter (fp32 p and g, 4-bit v, 2-bit m): read 4 + 4 + 0.5 + 0.25 + metadata
(0.031 + 0.031) ≈ 8.81, written 4 + 0.5 + 0.25 + 0.06 ≈ 4.81: **13.6 B/param** vs 28 for fp32
AdamW (performance.md §4.2).

``implementation``: ``"xla"`` (the jnp reference, the default on CPU), ``"pallas"`` (the kernel;
``interpret=True`` off GPU), ``None`` (best available). The Pallas path needs the last axis to be a
multiple of ``block_size`` (the reference handles any shape). No GPU was available to this
issue's session: the kernel is tested in interpret mode only.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs.packing import packed_length
from stax.codecs.rng import counter_uniform, flat_index, seed_for
from stax.codecs.turbo import bias_corrections
from stax.kernels._dispatch import resolve_implementation, use_interpret

__all__ = ["FusedHyper", "fused_turbo_step", "fused_turbo_step_reference", "bytes_per_param"]


class FusedHyper(NamedTuple):
  lr: Any
  b1: Any
  b2: Any
  eps: Any
  weight_decay: Any


def bytes_per_param(bits: int = 4, block_size: int = 128, m_block: int = 64,
                    param_bytes: int = 4, grad_bytes: int = 4) -> float:
  """Bytes moved per parameter by one fused step (read once, write once)."""
  state = bits / 8 + 2 / 8 + 4 / block_size + 2 / m_block
  return (param_bytes + grad_bytes + state) + (param_bytes + state)


def _scalars(hp: FusedHyper, count):
  t = count + 1
  c1p, c2p = bias_corrections(hp.b1, hp.b2, count)
  c2p = jnp.where(count > 0, c2p, 1.0)
  c1, c2 = bias_corrections(hp.b1, hp.b2, t)
  f = lambda x: jnp.asarray(x, jnp.float32)
  return c1p, c2p, c1, c2, f(hp.lr), f(hp.b1), f(hp.b2), f(hp.eps), f(hp.weight_decay)


def _block_math(p, g, v_enc, m_enc, sc, bits, bs, mb, v_uniform, m_uniform, n_total):
  """The per-block (or whole-tensor) step on arrays shaped (..., n). Returns the new p, the new
  encodings and the sum of squared residuals."""
  c1p, c2p, c1, c2, lr, b1, b2, eps, wd = sc
  n = p.shape[-1]
  v_old = LQ.log_decode(v_enc, bits, bs, n)
  u_old = US.ustate_decode(m_enc, n, mb, bs)
  m_old = u_old * c1p * (jnp.sqrt(jnp.maximum(v_old, 0.0)) / c2p + eps)
  g = g.astype(jnp.float32)
  m = b1 * m_old + (1 - b1) * g
  v = b2 * v_old + (1 - b2) * g * g
  denom = jnp.sqrt(jnp.maximum(v, 0.0)) / c2 + eps
  pf = p.astype(jnp.float32)
  new_p = (pf - lr * wd * pf - (lr / c1) * (m / denom)).astype(p.dtype)
  v_enc = LQ.log_encode(v, bits, bs, v_uniform)
  v_p = LQ.log_decode(v_enc, bits, bs, n)
  u = m / c1 / (jnp.sqrt(jnp.maximum(v_p, 0.0)) / c2 + eps)
  codes, means, sq = US.ustate_encode_parts(u, m_enc, m_uniform, mb, bs)
  # per storage block sums of squared residuals (..., nb); the caller finishes the encode step
  nb = -(-n // bs)
  ssq = jnp.sum(sq.reshape(sq.shape[:-2] + (nb, -1)), axis=-1)
  return new_p, v_enc, (codes, means), ssq


def _finish(m_enc, codes, means, ssq, n_total):
  next_step = jnp.sqrt(jnp.sum(ssq) / jnp.float32(n_total)) * jnp.float32(US.DEFAULT_STEP_FACTOR)
  return US.UStateM(codes, means, m_enc.encode_step.astype(jnp.float32), next_step)


def fused_turbo_step_reference(p, g, m_enc: US.UStateM, v_enc: LQ.LogQuantState, hp: FusedHyper,
                               count, seed, index: int = 0, *, bits: int = 4,
                               block_size: int = 128, m_block: int = 64):
  """jnp reference of one TurboAdam 0.2.0 AdamW step on one tensor (any rank >= 1)."""
  n = p.shape[-1]
  sc = _scalars(hp, count)
  t = count + 1
  nb = -(-n // block_size)
  v_u = counter_uniform(flat_index(p.shape[:-1] + (nb * block_size,)), seed_for(seed, t, 0, index, 2))
  nmb = -(-n // m_block)
  m_u = counter_uniform(flat_index(p.shape[:-1] + (nmb * m_block,)), seed_for(seed, t, 0, index, 1))
  new_p, v_new, (codes, means), ssq = _block_math(p, g, v_enc, m_enc, sc, bits, block_size,
                                                  m_block, v_u, m_u, int(np.prod(p.shape)))
  return new_p, _finish(m_enc, codes, means, ssq, int(np.prod(p.shape))), v_new


def fused_turbo_step(p, g, m_enc: US.UStateM, v_enc: LQ.LogQuantState, hp: FusedHyper, count,
                     seed, index: int = 0, *, bits: int = 4, block_size: int = 128,
                     m_block: int = 64, implementation: Optional[str] = None):
  """One fused TurboAdam 0.2.0 step on one tensor: returns ``(new_p, new_m_enc, new_v_enc)``."""
  impl = resolve_implementation(implementation, has_pallas=True)
  n = p.shape[-1]
  if impl == "xla" or n % block_size:
    if impl == "pallas":
      raise ValueError("`implementation='pallas'` needs the last axis to be a multiple of "
                       f"block_size ({block_size}), got {n}.")
    return fused_turbo_step_reference(p, g, m_enc, v_enc, hp, count, seed, index, bits=bits,
                                      block_size=block_size, m_block=m_block)
  return _pallas_step(p, g, m_enc, v_enc, hp, count, seed, index, bits, block_size, m_block)


def _pallas_step(p, g, m_enc, v_enc, hp, count, seed, index, bits, bs, mb):
  from jax.experimental import pallas as pl
  shape = p.shape
  n = shape[-1]
  rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
  nb = n // bs
  n_total = rows * n
  p2, g2 = p.reshape(rows, n), g.reshape(rows, n)
  vc = v_enc.codes.reshape(rows, -1)
  vs = v_enc.scales.reshape(rows, nb * 2)
  mc = m_enc.codes.reshape(rows, -1)
  mm = m_enc.means.reshape(rows, -1)
  t = count + 1
  sc = jnp.stack([jnp.asarray(x, jnp.float32) for x in _scalars(hp, count)])
  seeds = jnp.stack([seed_for(seed, t, 0, index, 1), seed_for(seed, t, 0, index, 2)])
  steps = jnp.stack([m_enc.decode_step, m_enc.encode_step]).astype(jnp.float32)
  vbytes, mbytes, nmb = bs * bits // 8, bs // 4, bs // mb
  full = lambda k: pl.BlockSpec((k,), lambda r, b: (0,))
  row = lambda w: pl.BlockSpec((1, w), lambda r, b: (r, b))
  kernel = functools.partial(_kernel_ssq, bits=bits, bs=bs, mb=mb, n=n, n_total=n_total)
  out_shape = (jax.ShapeDtypeStruct((rows, n), p.dtype),
               jax.ShapeDtypeStruct(vc.shape, jnp.uint8),
               jax.ShapeDtypeStruct(vs.shape, jnp.float16),
               jax.ShapeDtypeStruct(mc.shape, jnp.uint8),
               jax.ShapeDtypeStruct(mm.shape, jnp.bfloat16),
               jax.ShapeDtypeStruct((rows, nb), jnp.float32))
  outs = pl.pallas_call(
      kernel, grid=(rows, nb),
      in_specs=[full(9), full(2), full(2), row(bs), row(bs), row(vbytes), row(2), row(mbytes),
                row(nmb)],
      out_specs=(row(bs), row(vbytes), row(2), row(mbytes), row(nmb), row(1)),
      out_shape=out_shape, interpret=use_interpret(),
  )(sc, seeds, steps, p2, g2, vc, vs, mc, mm)
  new_p, vc_n, vs_n, mc_n, mm_n, ssq = outs
  lead = shape[:-1]
  new_v = LQ.LogQuantState(vc_n.reshape(lead + (-1,)), vs_n.reshape(lead + (nb, 2)))
  new_m = _finish(m_enc, mc_n.reshape(lead + (-1,)), mm_n.reshape(lead + (-1,)),
                  ssq.reshape(lead + (nb,)), n_total)
  return new_p.reshape(shape), new_m, new_v


def _kernel_ssq(sc_ref, seeds_ref, steps_ref, p_ref, g_ref, vc_ref, vs_ref, mc_ref, mm_ref,
                p_out, vc_out, vs_out, mc_out, mm_out, ssq_out, *, bits, bs, mb, n, n_total):
  from jax.experimental import pallas as pl
  r = pl.program_id(0)
  b = pl.program_id(1)
  sc = tuple(sc_ref[i] for i in range(9))
  base = (r * n + b * bs).astype(jnp.uint32)
  idx = base + jnp.arange(bs, dtype=jnp.uint32)[None, :]
  v_u = counter_uniform(idx, seeds_ref[1])
  m_u = counter_uniform(idx, seeds_ref[0])
  v_enc = LQ.LogQuantState(vc_ref[...], vs_ref[...].reshape(1, 1, 2))
  m_enc = US.UStateM(mc_ref[...], mm_ref[...], steps_ref[0], steps_ref[1])
  new_p, v_new, (codes, means), ssq = _block_math(p_ref[...], g_ref[...], v_enc, m_enc, sc, bits,
                                                  bs, mb, v_u, m_u, n_total)
  p_out[...] = new_p
  vc_out[...] = v_new.codes
  vs_out[...] = v_new.scales.reshape(1, 2)
  mc_out[...] = codes
  mm_out[...] = means
  ssq_out[...] = ssq.reshape(1, 1)
