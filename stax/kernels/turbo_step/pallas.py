r"""Pallas kernel of the fused TurboAdam step (the ``"pallas"`` implementation).

The grid is ``(rows, n / block_size)``: each program reads one block of p, g and the packed state
once, runs :func:`~stax.kernels.turbo_step.reference.block_math` on it with the random stream
generated in the kernel from (seed, flat index), and writes the block's new p, packed codes,
endpoints, means and :math:`\sum r^2`. Off GPU/TPU it runs with ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs.rng import counter_uniform, seed_for
from stax.kernels._registry import use_interpret
from stax.kernels.turbo_step.reference import (FusedHyper, StepScalars, TurboStepResult,
                                               block_math, finish_m, step_scalars)

__all__ = ["fused_turbo_step_pallas"]


def fused_turbo_step_pallas(p, g, m_enc: US.UStateM, v_enc: LQ.LogQuantState, hp: FusedHyper,
                            count, seed, index: int = 0, *, bits: int = 4, block_size: int = 128,
                            m_block: int = 64) -> TurboStepResult:
  """The fused step as one Pallas kernel (same arguments as the reference).

  Raises:
    NotImplementedError: when the last axis is not a multiple of ``block_size``.
  """
  shape = p.shape
  n = shape[-1]
  if n % block_size:
    raise NotImplementedError(f"the last axis must be a multiple of block_size ({block_size}), "
                              f"got {n}")
  bs, mb = block_size, m_block
  rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
  nb = n // bs
  n_total = rows * n
  p2, g2 = p.reshape(rows, n), g.reshape(rows, n)
  vc = v_enc.codes.reshape(rows, -1)
  vs = v_enc.scales.reshape(rows, nb * 2)
  mc = m_enc.codes.reshape(rows, -1)
  mm = m_enc.means.reshape(rows, -1)
  t = count + 1
  sc = jnp.stack([jnp.asarray(x, jnp.float32) for x in step_scalars(hp, count)])
  seeds = jnp.stack([seed_for(seed, t, 0, index, 1), seed_for(seed, t, 0, index, 2)])
  steps = jnp.stack([m_enc.decode_step, m_enc.encode_step]).astype(jnp.float32)
  vbytes, mbytes, nmb = bs * bits // 8, bs // 4, bs // mb
  full = lambda k: pl.BlockSpec((k,), lambda r, b: (0,))
  row = lambda w: pl.BlockSpec((1, w), lambda r, b: (r, b))
  kernel = functools.partial(_kernel, bits=bits, bs=bs, mb=mb, n=n)
  out_shape = (jax.ShapeDtypeStruct((rows, n), p.dtype),
               jax.ShapeDtypeStruct(vc.shape, jnp.uint8),
               jax.ShapeDtypeStruct(vs.shape, jnp.float16),
               jax.ShapeDtypeStruct(mc.shape, jnp.uint8),
               jax.ShapeDtypeStruct(mm.shape, jnp.bfloat16),
               jax.ShapeDtypeStruct((rows, nb), jnp.float32))
  nsc = len(StepScalars._fields)
  outs = pl.pallas_call(
      kernel, grid=(rows, nb),
      in_specs=[full(nsc), full(2), full(2), row(bs), row(bs), row(vbytes), row(2), row(mbytes),
                row(nmb)],
      out_specs=(row(bs), row(vbytes), row(2), row(mbytes), row(nmb), row(1)),
      out_shape=out_shape, interpret=use_interpret(),
  )(sc, seeds, steps, p2, g2, vc, vs, mc, mm)
  new_p, vc_n, vs_n, mc_n, mm_n, ssq = outs
  lead = shape[:-1]
  new_v = LQ.LogQuantState(vc_n.reshape(lead + (-1,)), vs_n.reshape(lead + (nb, 2)))
  new_m = finish_m(m_enc, mc_n.reshape(lead + (-1,)), mm_n.reshape(lead + (-1,)),
                   ssq.reshape(lead + (nb,)), n_total)
  return TurboStepResult(new_p.reshape(shape), new_m, new_v)


def _kernel(sc_ref, seeds_ref, steps_ref, p_ref, g_ref, vc_ref, vs_ref, mc_ref, mm_ref,
            p_out, vc_out, vs_out, mc_out, mm_out, ssq_out, *, bits, bs, mb, n):
  """One ``(row, block)`` program: the step on a ``(1, bs)`` block."""
  r = pl.program_id(0)
  b = pl.program_id(1)
  sc = StepScalars(*(sc_ref[i] for i in range(len(StepScalars._fields))))
  base = (r * n + b * bs).astype(jnp.uint32)
  idx = base + jnp.arange(bs, dtype=jnp.uint32)[None, :]
  v_u = counter_uniform(idx, seeds_ref[1])
  m_u = counter_uniform(idx, seeds_ref[0])
  v_enc = LQ.LogQuantState(vc_ref[...], vs_ref[...].reshape(1, 1, 2))
  m_enc = US.UStateM(mc_ref[...], mm_ref[...], steps_ref[0], steps_ref[1])
  new_p, v_new, (codes, means), ssq = block_math(p_ref[...], g_ref[...], v_enc, m_enc, sc, bits,
                                                 bs, mb, v_u, m_u)
  p_out[...] = new_p
  vc_out[...] = v_new.codes
  vs_out[...] = v_new.scales.reshape(1, 2)
  mc_out[...] = codes
  mm_out[...] = means
  ssq_out[...] = ssq.reshape(1, 1)
