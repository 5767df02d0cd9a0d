r"""The fused update of the TurboAdam storages: one pass over g and the packed state.

This is the op ``"turbo_step"`` (:mod:`stax.kernels._registry`): the ``fused_update`` of both
TurboAdam codecs' storages — :class:`stax.codecs.turbo.TurboAdam02Storage` (TurboAdam 0.2.0's
state: v as ``bits``-bit log codes with fp16 endpoints per block, m as 2-bit UState codes with
bf16 means) and the ``"stax"`` codec's :class:`~stax.codecs.base.SeparateStorage` (4-bit signed
m, log v; every row encoded on its own) — reached through the shared Adam core (:func:`stax.scale_by_adam` hands the storage its per-leaf step as a pure
function, :class:`stax.transforms.adam.LeafStep`). Per block of ``block_size`` elements of the
leaf's row view it

1. unpacks the v codes and decodes :math:`\hat v`; unpacks the UState codes and reconstructs
   :math:`m = u\,c_1^{prev}(\sqrt{\hat v}/\sqrt{c_2^{prev}}+\epsilon)`;
2. runs the core's step: the EMAs and the direction
   :math:`\hat m/(\sqrt{\hat v}+\epsilon)` (what the chain then decays and scales);
3. re-encodes v (outward fp16 endpoints, value-unbiased stochastic rounding), then
   :math:`u = (m/c_1)/(\sqrt{v_p}/\sqrt{c_2}+\epsilon)` with the persisted v, its bf16 means and
   2-bit stochastic codes with the lagged step, and the block's :math:`\sum r^2`.

The random stream is the seed's counter hash, generated from (seed, step, leaf index, flat
element index), so no random array moves.

(The steps above are the faithful storage's; the ``"stax"`` codec's decode m from its signed
codes and scales and re-encode both moments block by block, with no tensor-wide term.)

Implementations:

* ``"xla"``: :func:`turbo_update_reference` (:mod:`.reference`), read → step → write on the
  whole tensor: bit for bit what the optimizer computes unfused (both storages);
* ``"chunked"``: :func:`turbo_update_chunked` (:mod:`.chunked`), the same a chunk of rows at a
  time in one XLA loop, for a storage that encodes rows independently (the ``"stax"`` codec;
  ``NotImplementedError`` for UState; a 1-D leaf, one that fits in one chunk or one sharded
  under an explicit mesh runs as one chunk): bounded temporaries, cache-resident passes;
* ``"pallas"``: :func:`turbo_update_pallas` (:mod:`.pallas`), the faithful storage only: one
  program per tile of rows and block, written for Pallas's Triton lowering (strided ref loads
  and stores of four phases per block; it lowers for CUDA, checked on a CPU, and in interpret
  mode equals the XLA path's codes, endpoints and means bit for bit, UState's step-size scalars
  to their last bit: Σr² is summed per block). The row length must be a multiple of
  ``block_size``, the blocks powers of two and ``v_bits`` 2, 4 or 8 (else
  ``NotImplementedError``). Not yet compiled and run on a GPU.

``implementation=None`` runs ``"xla"`` on every platform (``"chunked"`` is opt-in: on CPU XLA
runs a loop body on one thread, 1.8–2.7× slower; ``"pallas"`` is opt-in until it has run on a
GPU: ``benchmarks/gpu.py``'s ``turbo_step`` section checks and times it against ``"xla"``). An
earlier kernel, the GPU default until the H200 check, failed inside XLA's compile (Pallas's
Triton lowering has no ``lax.slice``), after the registry's fallback, so the faithful codec
failed on every GPU; the XLA path there took 0.69–0.93 ms for a donated step of a 4096×4096
leaf on the H200 (two runs).

Example:
  >>> import jax.numpy as jnp, stax
  >>> tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1,
  ...                      implementation="pallas")
  >>> params = {"w": jnp.ones((2, 128))}
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": jnp.full((2, 128), 0.1)}, state, params)
  >>> updates["w"].shape
  (2, 128)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from stax.kernels._registry import Op
from stax.kernels.turbo_step.chunked import turbo_update_chunked
from stax.kernels.turbo_step.pallas import turbo_update_pallas
from stax.kernels.turbo_step.reference import turbo_update_reference

__all__ = ["turbo_fused_update", "turbo_update_reference", "turbo_update_chunked",
           "turbo_update_pallas", "kernel", "OP"]

#: The registry entry of this op.
OP = Op("turbo_step", default_order={"other": ("xla",)})
OP.register("xla", turbo_update_reference)
OP.register("pallas", turbo_update_pallas)
OP.register("chunked", turbo_update_chunked)


def turbo_fused_update(storage: Any, g, step: Any, ctx: Any, *,
                       implementation: Optional[str] = None):
  """The fused update of one leaf (see the module docstring).

  Args:
    storage: the leaf's :class:`~stax.codecs.turbo.TurboAdam02Storage` (both moments
      compressed) or ``"stax"``-codec :class:`~stax.codecs.base.SeparateStorage`, seen through
      its row view.
    g: the gradient, shaped as the row view.
    step: the core's :class:`~stax.transforms.adam.LeafStep`.
    ctx: the core's write context (:class:`~stax.codecs.base.StorageStep`: the previous
      encodings, the step count, the leaf index and the state key).
    implementation: ``"xla"``, ``"chunked"``, ``"pallas"`` or ``None`` (best available).

  Returns:
    ``(update, mu_enc, nu_enc)``: the Adam direction and the new encodings.
  """
  return OP(storage, g, step, ctx, implementation=implementation)


def kernel(implementation: Optional[str] = None) -> Callable:
  """The storage's kernel hook ``(storage, g, step, ctx) -> (update, mu_enc, nu_enc)`` for
  ``implementation`` (checked now: ``ValueError`` for a name with no kernel)."""
  OP.check(implementation)
  return functools.partial(turbo_fused_update, implementation=implementation)
