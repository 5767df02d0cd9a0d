r"""The fused step of the TurboAdam storage's update: one pass over p, g and the packed state.

This is the op ``"turbo_step"`` (:mod:`stax.kernels._registry`): one TurboAdam 0.2.0 AdamW step
on one tensor whose moments are stored compressed, v as 4-bit log codes
(:class:`~stax.codecs.log_quant.LogQuantState`) and m as 2-bit UState codes
(:class:`~stax.codecs.ustate.UStateM`). Per block of ``block_size`` elements (along the last
axis) it

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
seed's counter hash, generated from (seed, step, ``index``, flat element index), so no random
array moves. Bytes per parameter (fp32 p and g, 4-bit v, 2-bit m): read 4 + 4 + 0.5 + 0.25 +
metadata (0.031 + 0.031) ≈ 8.81, written 4 + 0.5 + 0.25 + 0.06 ≈ 4.81: 13.6 B/param vs 28 for
fp32 AdamW.

Implementations:

* ``"xla"``: :func:`fused_turbo_step_reference` (:mod:`.reference`), any shape;
* ``"pallas"``: :func:`fused_turbo_step_pallas` (:mod:`.pallas`); the last axis must be a
  multiple of ``block_size`` (else ``NotImplementedError``, and ``None`` falls back to
  ``"xla"``).

``implementation=None`` tries ``"pallas"`` then ``"xla"`` on GPU and runs ``"xla"`` elsewhere.

Example:
  >>> import jax.numpy as jnp
  >>> from stax.codecs import log_quant as LQ, ustate as US
  >>> from stax.kernels.turbo_step import FusedHyper, fused_turbo_step
  >>> p = jnp.ones((2, 128))
  >>> m, v = US.ustate_init(p, 64, 128), LQ.log_init(p, 4, 128)
  >>> out = fused_turbo_step(p, 0.1 * p, m, v, FusedHyper(1e-2, 0.9, 0.999, 1e-8, 0.0),
  ...                        jnp.int32(0), jnp.uint32(7))
  >>> out.param.shape, out.v.codes.shape
  ((2, 128), (2, 64))
"""

from __future__ import annotations

from typing import Optional

from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.kernels._registry import Op
from stax.kernels.turbo_step.pallas import fused_turbo_step_pallas
from stax.kernels.turbo_step.reference import (FusedHyper, TurboStepResult,
                                               fused_turbo_step_reference)

__all__ = ["fused_turbo_step", "fused_turbo_step_reference", "fused_turbo_step_pallas",
           "FusedHyper", "TurboStepResult", "OP"]

#: The registry entry of this op.
OP = Op("turbo_step", default_order={"gpu": ("pallas", "xla"), "other": ("xla",)})
OP.register("xla", fused_turbo_step_reference)
OP.register("pallas", fused_turbo_step_pallas)


def fused_turbo_step(p, g, m_enc: US.UStateM, v_enc: LQ.LogQuantState, hp: FusedHyper, count,
                     seed, index: int = 0, *, bits: int = 4, block_size: int = 128,
                     m_block: int = 64, implementation: Optional[str] = None) -> TurboStepResult:
  """One fused TurboAdam 0.2.0 AdamW step on one tensor (see the module docstring).

  Args:
    p: the parameter, shape ``(..., n)``.
    g: its gradient, same shape.
    m_enc: the encoded first moment (2-bit UState, ``m_block`` means per row block).
    v_enc: the encoded second moment (``bits``-bit log codes, ``block_size`` blocks).
    hp: :class:`FusedHyper` (lr, b1, b2, eps, weight_decay).
    count: the number of steps taken so far (this is step ``count + 1``).
    seed: uint32 seed of the stochastic rounding.
    index: the tensor's index in the parameter tree (separates the random streams of leaves).
    bits: v code width; block_size: v block; m_block: UState mean block.
    implementation: ``"xla"``, ``"pallas"`` or ``None`` (best available).

  Returns:
    :class:`TurboStepResult` ``(param, m, v)``: the new parameter and encodings.
  """
  return OP(p, g, m_enc, v_enc, hp, count, seed, index, bits=bits, block_size=block_size,
            m_block=m_block, implementation=implementation)
