"""Launching worker processes on localhost for the multi-process tests."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
  """A TCP port on localhost that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_ranks(module: str, args: list, *, n: int = 2, timeout_s: float = 600,
              env: dict | None = None) -> None:
  """Runs ``python -m module RANK PORT *args`` for ranks ``0..n-1`` (one free port) and waits;
  ``AssertionError`` with the end of a rank's output if any exits non-zero or times out."""
  port = str(free_port())
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
  procs = [subprocess.Popen([sys.executable, "-m", module, str(r), port, *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for r in range(n)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout_s)[0])
  finally:
    for p in procs:
      p.kill()
  for r, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"{module} rank {r} failed ({p.returncode}):\n{log[-4000:]}"


class gloo_rank:
  """``with gloo_rank(rank, port):`` — this process as rank ``rank`` of a ``world``-rank gloo
  group on localhost (torch.distributed); on exit, a barrier and the group's teardown."""

  def __init__(self, rank: int, port: str, world: int = 2):
    self.rank, self.port, self.world = rank, str(port), world

  def __enter__(self):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=self.port, RANK=str(self.rank),
                      WORLD_SIZE=str(self.world))
    dist.init_process_group("gloo", rank=self.rank, world_size=self.world)
    return dist

  def __exit__(self, exc_type, exc, tb):
    import torch.distributed as dist
    if exc_type is None:
      dist.barrier()
    dist.destroy_process_group()
    return False
