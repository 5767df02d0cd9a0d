"""Exact optimizer-state accounting from the state arrays.

:func:`state_bits_per_param` sums ``size · itemsize · 8`` over every array leaf of an optimizer
state and divides by the number of parameter elements. Nothing is estimated: packed codes,
fp16/bf16 block metadata, per-tensor scalars, counters and keys all count (use
``exclude_scalars=True`` to leave out 0-d arrays such as step counters and per-tensor scales,
and the per-tensor statistics the Adam core keeps as one vector entry per tensor: the product
of the β1s and an adaptive-β1 rule's state).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["state_bits_per_param", "state_bytes"]


def _without_per_tensor_vectors(state: Any) -> Any:
  from stax.transforms.adam import ScaleByAdamState  # pylint: disable=g-import-not-at-top
  from stax.transforms.adaptive_beta import BETA1_STATES  # pylint: disable=g-import-not-at-top

  def strip(x):
    if isinstance(x, BETA1_STATES):
      return None
    if isinstance(x, ScaleByAdamState):
      return x._replace(b1_prod=None, b1_state=None)
    return x

  return jax.tree.map(strip, state,
                      is_leaf=lambda x: isinstance(x, BETA1_STATES + (ScaleByAdamState,)))


def state_bytes(state: Any, exclude_scalars: bool = False) -> int:
  """Bytes of every array leaf of ``state`` (``exclude_scalars``: as
  :func:`state_bits_per_param`'s)."""
  total = 0
  if exclude_scalars:
    state = _without_per_tensor_vectors(state)
  for x in jax.tree.leaves(state):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
      continue
    if exclude_scalars and np.ndim(x) == 0:
      continue
    dt = np.dtype(x.dtype) if not str(x.dtype).startswith("key") else np.dtype(np.uint32)
    total += int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
  return total


def state_bits_per_param(state: Any, params: Any, exclude_scalars: bool = False) -> float:
  """Bits of optimizer state per parameter element (exact, from the arrays' shapes/dtypes).

  Example:
    >>> import jax.numpy as jnp, optax, stax
    >>> params = {"w": jnp.zeros((4, 4))}
    >>> state = optax.adam(1e-3).init(params)
    >>> stax.state_bits_per_param(state, params)   # float32 m and v, and the int32 count
    66.0
    >>> stax.state_bits_per_param(state, params, exclude_scalars=True)
    64.0
  """
  n = sum(int(np.prod(np.shape(p), dtype=np.int64)) for p in jax.tree.leaves(params))
  return 8.0 * state_bytes(state, exclude_scalars) / max(n, 1)
