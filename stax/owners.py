r"""Owner-computes: per-matrix work done once, on one device of a mesh, not on every device.

A matrix optimizer's expensive per-matrix work — SCAO's eigendecompositions or randomized
subspace iterations, Muon's Newton–Schulz — is independent across matrices. On a mesh, doing it
for every matrix on every device (replicated) wastes ``n_devices``-fold compute; sharding each
matrix and all-reducing inside the iteration pays a collective per product. Instead each matrix
gets one **owner**: :func:`owner_map` stacks the items of one *group* (same structure, shapes and
function), lays the stack along its first axis over the mesh's explicit axes so that each
device holds the items it owns, runs the function there in ``jax.shard_map`` (one item after
another; a padding slot is skipped by ``lax.cond``, so it costs nothing) and gathers the results
back, replicated. The only collective is that one gather of the results.

**Load balancing** (:func:`balance`): owners are chosen across *all* groups together by the
longest-processing-time rule — items in decreasing cost, each to the device with the least work
so far — so a device that owns a large matrix of one group gets the small matrices of another.
Within a group a device holds as many slots as the busiest device needs; the others' slots are
padding, skipped. (Newton–Schulz's stacked mode, :func:`stax.orthogonalize_many`, batches each
group's matrices into one product instead, because batched products beat one-at-a-time ones on
accelerators; it pads each group to the device count.)

Without an explicit mesh (or on one device) :func:`owner_map` runs every item on the one device:
the items of a group of several are stacked and run by one ``lax.map`` (the function compiled
once per group, not once per item; the items still one after another), a lone item directly; so
a caller can use it unconditionally.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from stax.owners import owner_map
  >>> xs = [jnp.eye(3) * (i + 1) for i in range(4)]
  >>> ys = owner_map(lambda x: jnp.linalg.eigh(x)[0], xs, groups=[0] * 4)
  >>> [float(y[0]) for y in ys]
  [1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from stax import _leafwise
from stax import _sharding as _sh

__all__ = ["balance", "owner_map", "stack_mesh"]


def stack_mesh(xs: Sequence[Any] = ()) -> tuple[Any, tuple[str, ...]]:
  """The explicit mesh to lay stacks over and its explicit axes: the ``jax.set_mesh`` context's,
  else (arrays placed on an explicit mesh, jitted without a mesh context) the first of ``xs``'s
  leaves that has one; ``(None, ())`` when there is none."""
  for mesh in (jax.sharding.get_abstract_mesh(),
               *(_sh.mesh_of(x) for x in jax.tree.leaves(list(xs)))):
    axes = _sh.explicit_axes(None if mesh is None or mesh.empty else mesh)
    if axes:
      return mesh, axes
  return None, ()


def balance(costs: Sequence[float], groups: Sequence[Hashable],
            n_devices: int) -> list[tuple[int, int]]:
  """The ``(device, slot)`` of each item: longest processing time first over all groups.

  Items are taken in decreasing ``costs`` (ties: input order) and each goes to the device with
  the least total cost so far (ties: the lowest index); its slot is its index among that
  device's items of the same group. The largest device load is at most 4/3 of the optimum
  (Graham's bound for the rule).

  Args:
    costs: a non-negative cost per item (e.g. its flop count).
    groups: a hashable group per item (items of one group share a stack).
    n_devices: number of devices, >= 1.
  """
  if n_devices < 1:
    raise ValueError(f"`n_devices` must be >= 1, got {n_devices}.")
  if len(costs) != len(groups):
    raise ValueError(f"`costs` and `groups` must have one entry per item, got {len(costs)} "
                     f"and {len(groups)}.")
  load = [0.0] * n_devices
  count: dict = {}
  out: list = [None] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
    d = min(range(n_devices), key=lambda d: (load[d], d))
    load[d] += float(costs[i])
    j = count.get((groups[i], d), 0)
    count[(groups[i], d)] = j + 1
    out[i] = (d, j)
  return out


def _group_type(items: list, idx: list, group: Hashable) -> tuple[Any, list]:
  """The tree structure and leaf types of a group's items, checked to be one."""
  treedef = jax.tree.structure(items[idx[0]])
  avals = [jax.typeof(l) for l in jax.tree.leaves(items[idx[0]])]
  for i in idx[1:]:
    if (jax.tree.structure(items[i]) != treedef
        or [(a.shape, a.dtype) for a in map(jax.typeof, jax.tree.leaves(items[i]))]
        != [(a.shape, a.dtype) for a in avals]):
      raise ValueError(f"`owner_map`: item {i} of group {group!r} differs in structure, "
                       f"shape or dtype from item {idx[0]}.")
  return treedef, avals


def _looped(fn_of: Callable, items: list, groups: Sequence[Hashable]) -> list:
  """``[fn_of(g)(x) ...]`` on one device, each group of several items stacked and run by one
  ``lax.map``: the function is compiled once per group, not once per item (SCAO's refresh of
  GPT-2 small's 48 matrices, four shapes: 14.5 -> 7.2 s to compile, with the draws made in the
  loop's body and the results read back by ``_leafwise.unstack``), and the items still run one after another."""
  out: list = [None] * len(items)
  for group in dict.fromkeys(groups):
    idx = [i for i, g in enumerate(groups) if g == group]
    _group_type(items, idx, group)
    if len(idx) == 1:
      out[idx[0]] = fn_of(group)(items[idx[0]])
      continue
    res = jax.lax.map(fn_of(group), _leafwise.stack([items[i] for i in idx]))
    # each item's results back from the stacks (_leafwise.unstack: one kernel reads any of them)
    for i, r in zip(idx, _leafwise.unstack(res, [1] * len(idx))):
      out[i] = jax.tree.map(lambda x: x[0], r)
  return out


def _replicated(x: jax.Array) -> jax.Array:
  return x if _sh.explicit_spec(x) is None else _sh.reshard(x, ())


def owner_map(fn: Union[Callable, Mapping[Hashable, Callable]], items: Sequence[Any], *,
              groups: Sequence[Hashable], costs: Optional[Sequence[float]] = None,
              mesh: Any = None, axes: Optional[Sequence[str]] = None) -> list:
  """``[fn(item) for item in items]``, each item computed by one owner device (module doc).

  Args:
    fn: the function of one item (a pytree of arrays), or a mapping from group to function.
    items: the inputs; items of one group must have the same tree structure, shapes and
      dtypes (checked).
    groups: a hashable group per item.
    costs: a cost per item for :func:`balance` (default: its number of elements).
    mesh, axes: the mesh and the axes to lay stacks over (default: :func:`stack_mesh` of
      ``items``; a mesh alone: its explicit axes). With no axis, or one device, one
      ``lax.map`` per group of several items (module docstring).

  Returns:
    The list of ``fn(item)``, replicated over the mesh.
  """
  items = list(items)
  if len(groups) != len(items):
    raise ValueError(f"`groups` must have one entry per item: {len(groups)} != {len(items)}.")
  fn_of = (lambda g: fn[g]) if isinstance(fn, Mapping) else (lambda g: fn)
  if mesh is None:
    mesh, axes = stack_mesh(items)
  elif axes is None:
    axes = _sh.explicit_axes(mesh)
  axes = tuple(axes or ())
  n_dev = math.prod(int(mesh.shape[a]) for a in axes) if axes else 1
  if n_dev == 1:
    return _looped(fn_of, items, groups)
  if costs is None:
    costs = [sum(math.prod(jnp.shape(l)) for l in jax.tree.leaves(x)) for x in items]
  where = balance(costs, groups, n_dev)
  ax = axes if len(axes) > 1 else axes[0]
  out: list = [None] * len(items)
  for group in dict.fromkeys(groups):
    idx = [i for i, g in enumerate(groups) if g == group]
    treedef, avals = _group_type(items, idx, group)
    k = 1 + max(where[i][1] for i in idx)
    slots: list = [None] * (n_dev * k)
    for i in idx:
      d, j = where[i]
      slots[d * k + j] = i
    leaves = [[_replicated(l) for l in jax.tree.leaves(items[i])] for i in idx]
    pos = {i: n for n, i in enumerate(idx)}
    stacks = []
    for n, a in enumerate(avals):
      zero = jnp.zeros(a.shape, a.dtype)
      stack = jnp.stack([zero if s is None else leaves[pos[s]][n] for s in slots])
      stacks.append(_sh.reshard(stack, (ax,) + (None,) * len(a.shape), like=mesh))
    real = _sh.reshard(jnp.asarray([s is not None for s in slots]), (ax,), like=mesh)
    f = fn_of(group)

    def local(real, *stacks, f=f, treedef=treedef):
      xs = treedef.unflatten(stacks)
      # traced here, where the mesh's axis names are bound (``f`` may read them)
      out_tree = jax.eval_shape(f, jax.tree.map(lambda a: a[0], xs))
      skip = lambda _: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), out_tree)
      return jax.lax.map(lambda rx: jax.lax.cond(rx[0], f, skip, rx[1]), (real, xs))

    res = jax.shard_map(local, mesh=mesh, in_specs=(P(ax),) * (1 + len(stacks)),
                        out_specs=P(ax), check_vma=False)(real, *stacks)
    res = jax.tree.map(lambda r: _sh.reshard(r, (), like=mesh), res)
    for n, s in enumerate(slots):
      if s is not None:
        out[s] = jax.tree.map(lambda r, n=n: r[n], res)
  return out
