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

``dtensor="local"`` (:class:`LocalShards`) is for element-wise transforms only (checked at
construction, :func:`check_local`): each rank steps its own shard with no gather, keeps only its
shard's state (1/world of it), makes the ranks agree on non-finite gradients (one all-reduce of
a flag per parameter; a parameter non-finite on any rank gets a NaN gradient on all, so its
guard skips it everywhere, as it does in one process), and saves its state as DTensors placed
like the parameter.

``dtensor="owner"`` (:class:`OwnedCopies`) gives each DTensor parameter one owning rank: only the
owner gathers it, runs its step and keeps its state, then scatters the new shards back.

``dtensor="auto"`` (the default, :func:`resolve_mode`) picks ``"local"`` for element-wise
transforms (FSDP's sharding of the optimizer state kept, as torch's own optimizers keep it) and
``"full"`` for the rest; ``"owner"`` is asked for by name.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["dtensor_type", "has_dtensors", "FullCopies", "OwnedCopies", "LocalShards",
           "check_local", "resolve_mode", "DTENSOR_MODES"]

#: ``torch_bridge.Optimizer(dtensor=...)``: ``"auto"`` (default), ``"full"``, ``"owner"`` or
#: ``"local"``.
DTENSOR_MODES = ("auto", "full", "owner", "local")


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
    return [self._full_copy(i, p) if isinstance(p, self.cls) else p
            for i, p in enumerate(params)]

  def _full_copy(self, i: int, p) -> torch.Tensor:
    """Parameter ``i``'s full copy with its full gradient, all-gathered now."""
    value = p.detach().full_tensor()
    f = self.full.get(i)
    if f is None or f.shape != value.shape or f.dtype != value.dtype:
      f = self.full[i] = value.clone()
    else:
      f.copy_(value)
    f.grad = None if p.grad is None else p.grad.full_tensor()
    return f

  def scatter(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
    """Copies this rank's shard of each full copy in ``indices`` into its DTensor."""
    from torch.distributed.tensor import distribute_tensor
    for i in indices:
      p = params[i]
      if isinstance(p, self.cls):
        shard = distribute_tensor(self.full[i], p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(shard.to_local())


def _local_factories() -> dict:
  """Factories whose update of each element depends only on that element (and scalars), so
  stepping each rank's shard on its own is the one-process step: name → extra check."""
  import optax
  import stax
  no_codec = lambda kw: kw.get("codec") is None          # noqa: E731 - a codec works in blocks
  anything = lambda kw: True                             # noqa: E731
  return {stax.adamw: no_codec, optax.adam: anything, optax.adamw: anything,
          optax.sgd: anything, optax.lion: anything}


def check_local(transform, defaults: dict, writeback: str) -> None:
  """``ValueError`` unless ``dtensor="local"`` can step shards exactly (see the module doc)."""
  ok = _local_factories().get(transform)
  if ok is None or not ok(defaults):
    raise ValueError(
        "torch_bridge: `dtensor='local'` steps each rank's shard on its own, which equals the "
        "one-process step only for element-wise transforms (stax.adamw without a codec, "
        "optax.adam/adamw/sgd/lion); use dtensor='owner' or 'full' for "
        f"{getattr(transform, '__name__', transform)!r} with these arguments.")
  if writeback != "copy":
    raise ValueError("torch_bridge: `dtensor='local'` needs writeback='copy' (the shards are "
                     "views into FSDP's storage).")


def resolve_mode(dtensor: str, transform, defaults: dict, *, writeback: str, state_scope: str,
                 global_nonfinite) -> str:
  """The mode ``dtensor`` names, checked (``ValueError`` naming why and the alternative).

  ``"auto"`` is ``"local"`` for element-wise transforms (:func:`check_local`): FSDP's sharding
  of the optimizer state is kept and the state is saved as DTensors, as torch's own optimizers
  do under FSDP2. Anything else is ``"full"``; ``"owner"`` also shards the state but holds it
  as full tensors on one rank per parameter (torch's ``set_optimizer_state_dict`` then needs
  ``strict=False``), so it is asked for by name.
  """
  if dtensor not in DTENSOR_MODES:
    raise ValueError(f"`dtensor` must be one of {DTENSOR_MODES}, got {dtensor!r}.")
  owner_ok = state_scope == "param" and global_nonfinite is None
  if dtensor == "auto":
    try:
      check_local(transform, defaults, writeback)
      return "local"
    except ValueError:
      return "full"
  if dtensor == "local":
    check_local(transform, defaults, writeback)
  if dtensor == "owner" and not owner_ok:
    raise ValueError("torch_bridge: `dtensor='owner'` steps each parameter on one rank, so it "
                     "needs state_scope='param' and no global_nonfinite (both couple "
                     "parameters); use dtensor='full'.")
  return dtensor


class LocalShards:
  """``dtensor="local"``: each DTensor parameter steps as its local shard (a view of FSDP's
  storage), its state is the shard's, and ``state_dict`` carries that state as DTensors placed
  like the parameter, so ``torch.distributed.checkpoint`` reshards it across world sizes."""

  def __init__(self):
    self.cls = dtensor_type()

  def proxies(self, params: Sequence[torch.Tensor], grads: bool = True,
              nonfinite: frozenset = frozenset()) -> list:
    """``params`` with each DTensor replaced by its local tensor (and local gradient; for the
    indices in ``nonfinite``, a NaN gradient of the shard's shape)."""
    out = list(params)
    for i, p in enumerate(params):
      if isinstance(p, self.cls):
        local = p.to_local()
        if grads:
          g = None if p.grad is None else p.grad.to_local()
          local.grad = torch.full_like(g, float("nan")) if i in nonfinite else g
        out[i] = local
    return out

  def nonfinite(self, params: Sequence[torch.Tensor], mask: Sequence[bool]) -> frozenset:
    """The stepped DTensor parameters whose gradient is non-finite on *some* rank (one
    all-reduce of a flag per parameter). Their shards get NaN gradients on every rank, so each
    parameter's non-finite guard decides the same on all ranks, as it does on the whole
    gradient in one process."""
    import torch.distributed as dist
    idx = [i for i, (p, on) in enumerate(zip(params, mask)) if on and isinstance(p, self.cls)]
    if not idx:
      return frozenset()
    flags = torch.tensor([int(bool(torch.isfinite(params[i].grad.to_local()).all()))
                          for i in idx], dtype=torch.int32)
    if dist.is_available() and dist.is_initialized():
      dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return frozenset(i for i, f in zip(idx, flags.tolist()) if not f)

  def to_saved(self, entry: dict, p: torch.Tensor) -> dict:
    """A state entry with the shard-shaped tensors as DTensors placed like ``p``."""
    if not isinstance(p, self.cls):
      return entry
    from torch.distributed.tensor import DTensor
    shape = p.to_local().shape
    return {n: (DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
                if isinstance(v, torch.Tensor) and v.ndim and v.shape == shape else v)
            for n, v in entry.items()}

  def from_saved(self, entry: dict, p: torch.Tensor) -> dict:
    """A loaded entry for ``p``'s shard: DTensors as their local tensors, full-size tensors
    (from a one-process checkpoint) cut to this rank's shard."""
    if not isinstance(p, self.cls):
      return entry
    from torch.distributed.tensor import distribute_tensor
    out = {}
    for n, v in entry.items():
      if isinstance(v, self.cls):
        v = v.to_local()
      elif isinstance(v, torch.Tensor) and v.ndim and v.shape == p.shape:
        v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None).to_local()
      out[n] = v
    return out


class OwnedCopies(FullCopies):
  """``dtensor="owner"``: every DTensor parameter has one owning rank (sizes balanced, greedy
  largest first, the same on every rank). Its gradient and value are gathered to the owner only
  (``dist.gather`` of the shards: each rank sends its shard once, instead of receiving every
  other rank's as an all-gather does), only the owner runs the parameter's step and keeps its
  state (about 1/world of the state and of the optimizer's compute per rank: Muon's
  Newton–Schulz runs once per matrix, not on every rank), and the owner scatters the new value's
  shards back (``dist.scatter``). Only the owner holds a full-size copy of a parameter (and its
  gradient); the other ranks hand the step their DTensor, which it does not read. Exact for
  every transform with per-parameter state (``state_scope="param"``, how the bridge runs by
  default). Parameters placed other than one ``Shard`` on a 1-D mesh fall back to the
  all-gather and broadcast (a full copy on every rank)."""

  def __init__(self, params: Sequence[torch.Tensor]):
    import torch.distributed as dist
    super().__init__()
    self.rank = dist.get_rank() if dist.is_initialized() else 0
    self.world = world = dist.get_world_size() if dist.is_initialized() else 1
    # the same on every rank: longest processing time first by size (stax.owners.balance)
    from stax.owners import balance
    dts = [i for i, p in enumerate(params) if isinstance(p, self.cls)]
    where = balance([float(params[i].numel()) for i in dts], [0] * len(dts), world)
    self.owner: dict = {i: d for i, (d, _) in zip(dts, where)}

  def owned(self, i: int) -> bool:
    """Whether this rank steps parameter ``i`` (plain tensors: every rank)."""
    return self.owner.get(i, self.rank) == self.rank

  def _dim(self, p) -> Optional[int]:
    """The sharded axis when ``p`` is one ``Shard`` over a 1-D mesh of the default group."""
    from torch.distributed.tensor import Shard
    if (p.device_mesh.ndim == 1 and len(p.placements) == 1
        and isinstance(p.placements[0], Shard) and p.device_mesh.size() == self.world):
      return p.placements[0].dim
    return None

  def _sizes(self, p, dim: int) -> list:
    """Each rank's shard length along ``dim`` (torch.chunk's split, as DTensor's)."""
    n = p.shape[dim]
    step = -(-n // self.world)
    return [max(0, min(step, n - r * step)) for r in range(self.world)]

  def _gather(self, local: torch.Tensor, p, dim: int, owner: int) -> Optional[torch.Tensor]:
    """The full tensor on ``owner`` (None elsewhere) from every rank's shard ``local``."""
    import torch.distributed as dist
    sizes = self._sizes(p, dim)
    pad = [0, 0] * (local.ndim - 1 - dim) + [0, max(sizes) - local.shape[dim]]
    send = torch.nn.functional.pad(local.detach(), pad).contiguous()
    if self.rank != owner:
      dist.gather(send, dst=owner)
      return None
    bufs = [torch.empty_like(send) for _ in range(self.world)]
    dist.gather(send, gather_list=bufs, dst=owner)
    return torch.cat([b.narrow(dim, 0, k) for b, k in zip(bufs, sizes)], dim=dim)

  def gather(self, params: Sequence[torch.Tensor]) -> list:
    out = list(params)
    for i, p in enumerate(params):
      if not isinstance(p, self.cls):
        continue
      dim = self._dim(p)
      if dim is None:  # another placement: the all-gather of every rank's copy
        out[i] = self._full_copy(i, p)
        continue
      owner = self.owner[i]
      value = self._gather(p.to_local(), p, dim, owner)
      grad = None if p.grad is None else self._gather(p.grad.to_local(), p, dim, owner)
      if self.rank != owner:   # not stepped here: no full-size copy on this rank
        continue
      f = self.full.get(i)
      if f is None or f.shape != p.shape or f.dtype != p.dtype:
        f = self.full[i] = torch.empty(p.shape, dtype=p.dtype)
      f.copy_(value)
      f.grad = grad
      out[i] = f
    return out

  def scatter(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
    """The owners send each rank its shard of the new values."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor
    for i in indices:
      p = params[i]
      if not isinstance(p, self.cls):
        continue
      dim, owner, local = self._dim(p), self.owner[i], p.to_local()
      if dim is None:
        full = self.full[i]
        dist.broadcast(full, src=owner)
        shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        local.copy_(shard.to_local())
        continue
      sizes = self._sizes(p, dim)
      width = max(sizes)
      shape = list(p.shape)
      shape[dim] = width
      recv = torch.empty(shape, dtype=p.dtype)
      chunks = None
      if self.rank == owner:
        pieces = torch.split(self.full[i], sizes, dim=dim)
        chunks = [torch.nn.functional.pad(c, [0, 0] * (c.ndim - 1 - dim) +
                                          [0, width - c.shape[dim]]).contiguous()
                  for c in pieces]
      dist.scatter(recv, scatter_list=chunks, src=owner)
      local.copy_(recv.narrow(dim, 0, local.shape[dim]))
