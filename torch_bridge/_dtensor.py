"""FSDP2 / DTensor parameters: each step runs on full copies and writes back the local shards.

PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) makes every parameter a ``DTensor``
whose ``to_local()`` is this rank's shard. JAX cannot take a DTensor through DLPack (torch
exports only the local tensor, and the bridge crashed with SIGSEGV on such parameters), so for
the parameters that are DTensors the bridge keeps a full copy (:class:`FullCopies`): before the
step it all-gathers the parameter and its gradient (``full_tensor()``), the compiled step runs on
the full tensors exactly as in one process, and afterwards each rank copies its own shard of the
result into the DTensor's local tensor (``distribute_tensor(..., src_data_rank=None)``: every
rank holds the same full result, so no communication).

So every optimizer works, whatever its per-tensor statistics, matrices or codec blocks, and
equals the single-process run (``tests/test_torch_bridge_fsdp.py``). The price: each rank keeps
the full parameter copy and the full optimizer state (FSDP's sharding of the optimizer state is
not kept), and each step all-gathers every DTensor parameter and gradient. The state is
therefore the same on every rank and its ``state_dict`` does not depend on the world size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["dtensor_type", "has_dtensors", "FullCopies"]


def dtensor_type() -> Optional[type]:
  """``torch.distributed.tensor.DTensor``, or ``None`` where torch has no distributed tensors."""
  try:
    from torch.distributed.tensor import DTensor
  except Exception:  # noqa: BLE001 - torch built without distributed support
    return None
  return DTensor


def has_dtensors(params: Sequence[torch.Tensor]) -> bool:
  cls = dtensor_type()
  return cls is not None and any(isinstance(p, cls) for p in params)


class FullCopies:
  """Parameter index → full (gathered) copy of a DTensor parameter, kept between steps."""

  def __init__(self):
    self.cls = dtensor_type()
    self.full: dict = {}

  def gather(self, params: Sequence[torch.Tensor]) -> list:
    """``params`` with every DTensor replaced by its full copy, refreshed now (values and
    gradient); a collective: every rank calls it with the same parameters in the same order."""
    out = list(params)
    for i, p in enumerate(params):
      if not isinstance(p, self.cls):
        continue
      value = p.detach().full_tensor()
      f = self.full.get(i)
      if f is None or f.shape != value.shape or f.dtype != value.dtype:
        f = self.full[i] = value.clone()
      else:
        f.copy_(value)
      f.grad = None if p.grad is None else p.grad.full_tensor()
      out[i] = f
    return out

  def scatter(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
    """Copies this rank's shard of each full copy in ``indices`` into its DTensor."""
    from torch.distributed.tensor import distribute_tensor
    for i in indices:
      p = params[i]
      if isinstance(p, self.cls):
        shard = distribute_tensor(self.full[i], p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(shard.to_local())
