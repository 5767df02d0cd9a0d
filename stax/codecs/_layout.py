"""Rank-preserving block layout along the last axis, sharding-aware.

Every compressed moment keeps the parameter's leading axes; blocks (and bit packing) live on the
last axis only. Under an explicit mesh, reshapes that split or merge a *sharded* last axis need an
``out_sharding``; these helpers compute it (the sharding stays on the leading new axis when it
divides evenly, otherwise that axis is replicated), so state follows its parameter's sharding.
Outside an explicit mesh they are plain reshapes.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from stax import _sharding as _sh

__all__ = ["explicit_spec", "split_last", "merge_last", "zeros_following", "constrain_like",
           "pad_last", "num_blocks"]


def num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


# The explicit-mesh spec of an array as a full-length tuple, or None when nothing is sharded
# (shared with the kernels and transforms; shardings are built on the array's own mesh).
explicit_spec = _sh.explicit_spec


def _shards(x: Any, entry: Any) -> int:
  return _sh.axis_size(jax.typeof(x).sharding.mesh, entry)


def _follow_last(spec: tuple, x: Any, sizes: Sequence[int]) -> tuple:
  last = spec[-1]
  if last is not None and sizes and sizes[0] % _shards(x, last) == 0:
    return spec[:-1] + (last,) + (None,) * (len(sizes) - 1)
  return spec[:-1] + (None,) * len(sizes)


def split_last(x: jax.Array, sizes: Sequence[int]) -> jax.Array:
  """``(..., n) -> (..., *sizes)``."""
  shape = tuple(x.shape[:-1]) + tuple(sizes)
  spec = explicit_spec(x)
  if spec is None:
    return x.reshape(shape)
  return jnp.reshape(x, shape, out_sharding=_sh.named(x, _follow_last(spec, x, sizes)))


def merge_last(x: jax.Array, k: int) -> jax.Array:
  """Merges the last ``k`` axes into one."""
  shape = tuple(x.shape[:-k]) + (math.prod(x.shape[-k:]),)
  spec = explicit_spec(x)
  if spec is None:
    return x.reshape(shape)
  head, tail = spec[:-k], spec[-k:]
  keep = tail[0] if all(a is None for a in tail[1:]) else None
  return jnp.reshape(x, shape, out_sharding=_sh.named(x, head + (keep,)))


def pad_last(x: jax.Array, n_to: int, value: Any) -> jax.Array:
  """Pads the last axis to ``n_to`` with ``value`` (a scalar or a (...,1) array)."""
  n = x.shape[-1]
  if n_to == n:
    return x
  spec = explicit_spec(x)
  if spec is not None and spec[-1] is not None:
    x = _sh.reshard(x, spec[:-1] + (None,))
  fill = jnp.broadcast_to(jnp.asarray(value, x.dtype), x.shape[:-1] + (1,))
  fill = jnp.broadcast_to(fill, x.shape[:-1] + (n_to - n,))
  spec = explicit_spec(x)
  if spec is not None and explicit_spec(fill) != spec:
    # the padding follows x's leading axes' sharding (a scalar's broadcast is replicated, and
    # concatenate takes operands of one sharding only: a 2-D mesh sharding both axes had failed)
    fill = _sh.reshard(fill, spec, like=x)
  return jnp.concatenate([x, fill], axis=-1)


def target_spec(param: Any, last_size: int, extra_dims: int = 0) -> Optional[tuple]:
  """Spec for a state array of shape ``param.shape[:-1] + (last_size,) + extra`` following
  ``param``'s sharding (None when ``param`` is not explicitly sharded)."""
  spec = explicit_spec(param)
  if spec is None:
    return None
  return _follow_last(spec, param, (last_size,)) + (None,) * extra_dims


def zeros_following(param: Any, shape: Sequence[int], dtype: Any, fill: Any = 0) -> jax.Array:
  """``full(shape, fill)`` (``shape[:ndim-1] == param.shape[:-1]``) sharded like ``param``."""
  extra = len(shape) - jnp.ndim(param)
  spec = target_spec(param, shape[jnp.ndim(param) - 1], extra) if jnp.ndim(param) else None
  if spec is None:
    return jnp.full(tuple(shape), fill, dtype)
  return _sh.reshard(jnp.full(tuple(shape), fill, dtype), spec, like=param)


def constrain_like(x: jax.Array, param: Any) -> jax.Array:
  """Reshards ``x`` (shape ``param.shape[:-1] + (k, ...)``) to follow ``param``'s sharding."""
  if jnp.ndim(param) == 0:
    return x
  spec = target_spec(param, x.shape[jnp.ndim(param) - 1], x.ndim - jnp.ndim(param))
  if spec is None:
    return x
  if explicit_spec(x) == spec:
    return x
  return _sh.reshard(x, spec, like=param)
