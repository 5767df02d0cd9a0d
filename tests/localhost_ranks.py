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
