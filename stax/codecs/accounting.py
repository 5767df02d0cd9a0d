"""Exact optimizer-state accounting from the state arrays.

:func:`state_bits_per_param` sums ``size · itemsize · 8`` over every array leaf of an optimizer
state and divides by the number of parameter elements. Nothing is estimated: packed codes,
fp16/bf16 block metadata, per-tensor scalars, counters and keys all count (use
``exclude_scalars=True`` to leave out 0-d arrays such as step counters and per-tensor scales).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["state_bits_per_param", "state_bytes"]


def state_bytes(state: Any, exclude_scalars: bool = False) -> int:
  total = 0
  for x in jax.tree.leaves(state):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
      continue
    if exclude_scalars and np.ndim(x) == 0:
      continue
    dt = np.dtype(x.dtype) if not str(x.dtype).startswith("key") else np.dtype(np.uint32)
    total += int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
  return total


def state_bits_per_param(state: Any, params: Any, exclude_scalars: bool = False) -> float:
  """Bits of optimizer state per parameter element (exact, from the arrays' shapes/dtypes)."""
  n = sum(int(np.prod(np.shape(p), dtype=np.int64)) for p in jax.tree.leaves(params))
  return 8.0 * state_bytes(state, exclude_scalars) / max(n, 1)
