r"""The ``jax.numpy`` reference of the fused TurboAdam step (the ``"xla"`` implementation).

:func:`block_math` is the whole step on arrays shaped ``(..., n)``; the Pallas kernel runs the
same function on one ``(1, block_size)`` block, so the two share every line of arithmetic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs.rng import counter_uniform, flat_index, seed_for
from stax.codecs.turbo import bias_corrections

__all__ = ["FusedHyper", "TurboStepResult", "fused_turbo_step_reference", "step_scalars",
           "block_math", "finish_m"]


class FusedHyper(NamedTuple):
  """Hyperparameters of one step (Python floats or scalar arrays)."""
  lr: Any
  b1: Any
  b2: Any
  eps: Any
  weight_decay: Any


class TurboStepResult(NamedTuple):
  """Outputs of one step: the new parameter and the new encodings of m and v."""
  param: jax.Array
  m: US.UStateM
  v: LQ.LogQuantState


class StepScalars(NamedTuple):
  """Per-step float32 scalars: bias corrections of the previous and current step, and ``hp``."""
  c1p: jax.Array
  c2p: jax.Array
  c1: jax.Array
  c2: jax.Array
  lr: jax.Array
  b1: jax.Array
  b2: jax.Array
  eps: jax.Array
  wd: jax.Array


def step_scalars(hp: FusedHyper, count) -> StepScalars:
  """The scalars of step ``count + 1`` (``c2p`` is 1 on the first step, as the seed's)."""
  c1p, c2p = bias_corrections(hp.b1, hp.b2, count)
  c2p = jnp.where(count > 0, c2p, 1.0)
  c1, c2 = bias_corrections(hp.b1, hp.b2, count + 1)
  f = lambda x: jnp.asarray(x, jnp.float32)
  return StepScalars(c1p, c2p, c1, c2, f(hp.lr), f(hp.b1), f(hp.b2), f(hp.eps),
                     f(hp.weight_decay))


def block_math(p, g, v_enc: LQ.LogQuantState, m_enc: US.UStateM, sc: StepScalars, bits: int,
               bs: int, mb: int, v_uniform, m_uniform):
  """The step on arrays shaped ``(..., n)``.

  Decodes v and the UState m, forms the EMAs, applies decoupled decay and the AdamW update,
  re-encodes v and then u with the persisted v. Returns the new p, the new v encoding, the new
  u ``(codes, means)`` and the per-storage-block sums of squared residuals ``(..., nb)``.
  """
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
  nb = -(-n // bs)
  ssq = jnp.sum(sq.reshape(sq.shape[:-2] + (nb, -1)), axis=-1)
  return new_p, v_enc, (codes, means), ssq


def finish_m(m_enc: US.UStateM, codes, means, ssq, n_total: int) -> US.UStateM:
  """The new m encoding; its next encode step is ``1.1·sqrt(Σr²/N)`` over the whole tensor."""
  next_step = jnp.sqrt(jnp.sum(ssq) / jnp.float32(n_total)) * jnp.float32(US.DEFAULT_STEP_FACTOR)
  return US.UStateM(codes, means, m_enc.encode_step.astype(jnp.float32), next_step)


def fused_turbo_step_reference(p, g, m_enc: US.UStateM, v_enc: LQ.LogQuantState,
                               hp: FusedHyper, count, seed, index: int = 0, *, bits: int = 4,
                               block_size: int = 128, m_block: int = 64) -> TurboStepResult:
  """jnp reference of one TurboAdam 0.2.0 AdamW step on one tensor (any rank >= 1, any length)."""
  n = p.shape[-1]
  t = count + 1
  nb = -(-n // block_size)
  v_u = counter_uniform(flat_index(p.shape[:-1] + (nb * block_size,)),
                        seed_for(seed, t, 0, index, 2))
  nmb = -(-n // m_block)
  m_u = counter_uniform(flat_index(p.shape[:-1] + (nmb * m_block,)),
                        seed_for(seed, t, 0, index, 1))
  new_p, v_new, (codes, means), ssq = block_math(p, g, v_enc, m_enc, step_scalars(hp, count),
                                                 bits, block_size, m_block, v_u, m_u)
  return TurboStepResult(new_p, finish_m(m_enc, codes, means, ssq, int(np.prod(p.shape))), v_new)
