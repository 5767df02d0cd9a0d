"""One rank of the FSDP2 bridge test (``python -m tests.fsdp_worker RANK PORT DIR NAMES``).

Two ranks (gloo, CPU, localhost) train :func:`model` wrapped with ``fully_shard`` through
``torch_bridge.Optimizer`` for each named optimizer (:data:`OPTIMIZERS`): :data:`STEPS` steps,
each rank on its own half of :func:`batch`; after :data:`SAVE_AT` steps the model's full
parameters and the optimizer's ``state_dict`` are saved with ``torch.distributed.checkpoint``.
Rank 0 writes the final full parameters to ``DIR/NAME-fsdp.pt``; then both ranks restore the
one-process run's checkpoint (``DIR/NAME-dcp-1proc``) into a sharded model, continue, and rank 0
writes ``DIR/NAME-fsdp-from-1proc.pt``. ``tests/test_torch_bridge_fsdp.py`` runs the one-process
side and compares.
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

STEPS, SAVE_AT, NAN_STEP = 5, 2, 3


def _optimizers():
  import stax
  return {
      "adamw": (stax.adamw, dict(lr=1e-2, weight_decay=1e-2, dtensor="full")),
      "stable_adamw": (stax.stable_adamw, dict(lr=1e-2)),             # per-tensor RMS clip
      "stam": (stax.stam, dict(lr=1e-2)),                             # per-tensor β1 statistics
      "oadamw": (stax.oadamw, dict(lr=1e-2)),                         # Newton–Schulz per matrix
      "turbo_adam": (stax.turbo_adam, dict(lr=1e-2, min_compress_elements=1)),  # codec blocks
      # element-wise: each rank steps its own shards, no gather (the default "auto" mode picks
      # "local" for it; the others above resolve to "full")
      "adamw_local": (stax.adamw, dict(lr=1e-2, weight_decay=1e-2)),
      # one owner per parameter: Newton–Schulz and the state on one rank, then a broadcast
      "oadamw_owner": (stax.oadamw, dict(lr=1e-2, dtensor="owner")),
      "stam_owner": (stax.stam, dict(lr=1e-2, dtensor="owner")),
      # the same through the fallback for other placements (all-gather and broadcast)
      "oadamw_owner_allgather": (stax.oadamw, dict(lr=1e-2, dtensor="owner")),
  }


OPTIMIZERS = ("adamw", "stable_adamw", "stam", "oadamw", "turbo_adam", "adamw_local",
              "oadamw_owner", "stam_owner", "oadamw_owner_allgather")


def model() -> torch.nn.Module:
  """Two linear layers; 5 outputs, so FSDP2's row shards are uneven (3 and 2) on 2 ranks."""
  torch.manual_seed(0)
  return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))


def batch(step: int) -> tuple:
  g = torch.Generator().manual_seed(100 + step)
  return torch.randn(16, 8, generator=g), torch.randn(16, 5, generator=g)


def make_opt(name: str, m: torch.nn.Module):
  import torch_bridge
  from torch_bridge import _dtensor
  factory, kw = _optimizers()[name]
  opt = torch_bridge.Optimizer(m.parameters(), factory, **kw)
  want = kw.get("dtensor", "local" if name.endswith("_local") else "full")
  assert opt._dtensor_mode == want, (name, opt._dtensor_mode)
  if name.endswith("_allgather"):
    opt._ensure_units()
    if isinstance(opt._full, _dtensor.OwnedCopies):
      opt._full._dim = lambda p: None          # as for a placement other than one Shard
  return opt


def train_step(m, opt, step: int, rank: int = 0, world: int = 1) -> None:
  """One step on this rank's half of the batch. On step :data:`NAN_STEP` one gradient element
  is NaN, element (16, 0) of the first weight, which FSDP2 places in rank 1's shard only: every
  optimizer must skip that step on every rank, as one process skips it."""
  x, y = batch(step)
  n = x.shape[0] // world
  x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
  opt.zero_grad()
  torch.nn.functional.mse_loss(m(x), y).backward()
  if step == NAN_STEP:
    g = next(m.parameters()).grad
    if hasattr(g, "to_local"):
      if rank == 1:
        g.to_local()[0, 0] = float("nan")       # global row 16: the first row of rank 1's shard
    else:
      g[16, 0] = float("nan")
  opt.step()


def full_params(m) -> dict:
  """Parameter index (as a string) → its full value (gathered from the shards)."""
  return {str(i): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
          for i, p in enumerate(m.parameters())}


def sharded_model() -> torch.nn.Module:
  from torch.distributed.fsdp import fully_shard
  m = model()
  for layer in m:
    if isinstance(layer, torch.nn.Linear):
      fully_shard(layer)
  fully_shard(m)
  return m


def restore(name: str, path, sharded: bool):
  """A model and optimizer at step SAVE_AT from the checkpoint at ``path`` (written by either
  world size). The optimizer's state entries exist after its first step, so the template
  ``state_dict`` comes from SAVE_AT steps of a fresh run; then every value is the checkpoint's.
  """
  import torch.distributed.checkpoint as dcp
  from torch.distributed.tensor import distribute_tensor
  m = sharded_model() if sharded else model()
  opt = make_opt(name, m)
  rank, world = (int(os.environ["RANK"]), 2) if sharded else (0, 1)
  for step in range(SAVE_AT):
    train_step(m, opt, step, rank, world)
  sd = {"model": full_params(m), "optim": opt.state_dict()}
  dcp.load(sd, checkpoint_id=str(path))
  with torch.no_grad():
    for i, p in enumerate(m.parameters()):
      full = sd["model"][str(i)]
      if hasattr(p, "full_tensor"):  # this rank's shard of the full value
        full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(full.to_local())
      else:
        p.copy_(full)
  opt.load_state_dict(sd["optim"])
  return m, opt


def state_elements(opt) -> int:
  """Elements of the optimizer's JAX state held by this process."""
  import jax
  return int(sum(x.size for x in jax.tree.leaves(opt._states.states)))


def copy_elements(opt) -> int:
  """Elements of the full-size parameter copies the bridge keeps on this rank (FSDP2)."""
  full = getattr(opt._full, "full", None) or {}
  return int(sum(t.numel() for t in full.values()))


def _flat_state(sd) -> list:
  return [t for st in sd["state"].values() for t in st.values() if isinstance(t, torch.Tensor)]


def main(argv) -> None:
  from tests.localhost_ranks import gloo_rank
  rank, port, out, names = int(argv[0]), argv[1], pathlib.Path(argv[2]), argv[3].split(",")
  import torch.distributed.checkpoint as dcp
  with gloo_rank(rank, port):
    for name in names:
      m = sharded_model()
      opt = make_opt(name, m)
      for step in range(STEPS):
        if step == SAVE_AT:
          dcp.save({"model": full_params(m), "optim": opt.state_dict()},
                   checkpoint_id=str(out / f"{name}-dcp"))
        train_step(m, opt, step, rank, 2)
      final = full_params(m)
      # torch's FSDP2 state-dict API round-trips the bridge's state (full tensors, replicated)
      # (with one owner per parameter a rank has no state for the others: strict=False)
      from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                           get_optimizer_state_dict,
                                                           set_optimizer_state_dict)
      before = _flat_state(opt.state_dict())
      set_optimizer_state_dict(m, opt, get_optimizer_state_dict(m, opt),
                               options=StateDictOptions(strict="_owner" not in name))
      after = _flat_state(opt.state_dict())
      assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
      if rank == 0:
        torch.save(final, out / f"{name}-fsdp.pt")
      (out / f"{name}-state-elements-rank{rank}.txt").write_text(str(state_elements(opt)))
      (out / f"{name}-copy-elements-rank{rank}.txt").write_text(str(copy_elements(opt)))
      # the one-process run's checkpoint at SAVE_AT, restored on 2 ranks and continued
      m, opt = restore(name, out / f"{name}-dcp-1proc", sharded=True)
      for step in range(SAVE_AT, STEPS):
        train_step(m, opt, step, rank, 2)
      final = full_params(m)
      if rank == 0:
        torch.save(final, out / f"{name}-fsdp-from-1proc.pt")


if __name__ == "__main__":
  main(sys.argv[1:])
