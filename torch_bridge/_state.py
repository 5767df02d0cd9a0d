"""The optimizer's JAX state: where each unit's state lives, its torch names, loading, masking.

Each unit's state is a JAX pytree filed under the unit's parameter indices. A step hands its
output state leaves straight to the next step with the same plan (:class:`StateStore` keeps
them as one flat list, "live", and files them per unit only when something asks). Outside the
bridge a state leaf is named by its path in the state tree (:func:`leaf_name`, e.g.
``"inner_state/0/mu/0/weight"``), as ``state_dict()`` and ``optimizer.state`` show it.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from stax.partition import path_name
from torch_bridge import convert
from torch_bridge._units import build_tx, nest


def leaf_name(path: Any) -> str:
  """A state leaf's name: its key path joined by ``/`` (:func:`stax.partition.path_name`)."""
  return path_name(path)


def named_leaves(state: Any) -> list:
  """``[(name, leaf), ...]`` of a state pytree in flatten order."""
  return [(leaf_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]


def to_torch_entries(state: Any) -> dict:
  """``{name: torch tensor}`` of a state pytree: copies of its leaves, in their own dtypes."""
  return {name: convert.to_torch(x).clone() for name, x in named_leaves(state)}


def jax_dtype(t: torch.Tensor) -> Any:
  """The JAX dtype of a torch tensor's dtype."""
  return jnp.dtype(str(t.dtype).replace("torch.", ""))


class _Live(NamedTuple):
  state_keys: tuple    # unit keys, in plan order
  state_defs: tuple    # per unit: (treedef, number of leaves)
  leaves: tuple        # the step's output state leaves


class StateStore:
  """Unit key (tuple of parameter indices) → JAX state, with the last step's outputs live."""

  def __init__(self):
    self._filed: dict = {}
    self._live: Optional[_Live] = None
    self._live_owner: Any = None

  def clear(self) -> None:
    self._filed, self._live, self._live_owner = {}, None, None

  def replace(self, states: dict) -> None:
    """Sets every unit's state (``load_state_dict``)."""
    self._filed, self._live, self._live_owner = dict(states), None, None

  @property
  def states(self) -> dict:
    """Unit key → current JAX state (files the live outputs first)."""
    self.flush()
    return self._filed

  def flush(self) -> None:
    """Files the last step's output states under their units."""
    live, self._live, self._live_owner = self._live, None, None
    if live is not None:
      k = 0
      for key, (tdef, n) in zip(live.state_keys, live.state_defs):
        self._filed[key] = jax.tree.unflatten(tdef, live.leaves[k:k + n])
        k += n

  def keep(self, owner: Any, state_keys: tuple, state_defs: tuple, leaves: Sequence) -> None:
    """Keeps a step's output state ``leaves`` (laid out by ``state_defs``), to be handed
    straight back by :meth:`live_leaves` ``(owner)``."""
    self._live, self._live_owner = _Live(state_keys, state_defs, tuple(leaves)), owner

  def drop_live(self) -> None:
    """Forgets the live outputs (their buffers are being donated to a new step)."""
    self._live, self._live_owner = None, None

  def live_leaves(self, owner: Any) -> Optional[tuple]:
    """The live output leaves if the last step was ``owner``'s, else ``None``."""
    return self._live.leaves if self._live is not None and self._live_owner is owner else None

  def leaves(self, state_keys: Sequence[tuple], init_missing: Callable[[list], dict]
             ) -> tuple[list, tuple]:
    """(flat leaves, per unit (treedef, number of leaves)) of the units ``state_keys``;
    ``init_missing(keys)`` returns ``{key: state}`` for the units that have none yet."""
    states = self.states
    missing = [key for key in state_keys if key not in states]
    if missing:
      states.update(init_missing(missing))
    leaves, defs = [], []
    for key in state_keys:
      ls, tdef = jax.tree.flatten(states[key])
      leaves.extend(ls)
      defs.append((tdef, len(ls)))
    return leaves, tuple(defs)


def load_unit(entry: dict, template: Any, device: torch.device, where: str) -> Any:
  """The JAX state of one unit from its saved ``{name: tensor}`` entry, checked leaf by leaf
  against ``template`` (``jax.eval_shape`` of its init): every name present, no extra name,
  each shape and dtype equal (codes, counters and keys are never cast). ``where`` names the
  parameter in error messages."""
  leaves = jax.tree_util.tree_flatten_with_path(template)[0]
  vals, names = [], []
  for path, spec in leaves:
    name = leaf_name(path)
    names.append(name)
    if name not in entry:
      raise ValueError(f"torch_bridge: state of parameter {where} lacks {name!r}.")
    t = entry[name]
    if not isinstance(t, torch.Tensor):
      t = torch.as_tensor(t)
    if (tuple(t.shape) != tuple(spec.shape)
        or str(t.dtype).replace("torch.", "") != jnp.dtype(spec.dtype).name):
      raise ValueError(
          f"torch_bridge: state {name!r} of parameter {where} is "
          f"{t.dtype}{tuple(t.shape)}, expected {spec.dtype}{tuple(spec.shape)}.")
    a = convert.to_jax(t.to(device=device))
    if tuple(a.shape) != tuple(spec.shape) or a.dtype != spec.dtype:
      raise ValueError(
          f"torch_bridge: state {name!r} of parameter {where} is "
          f"{a.dtype}{tuple(a.shape)}, expected {spec.dtype}{tuple(spec.shape)}.")
    vals.append(jax.device_put(a, list(a.devices())[0], may_alias=False))
  extra = set(entry) - set(names)
  if extra:
    raise ValueError(f"torch_bridge: unexpected state keys {sorted(extra)} for parameter "
                     f"{where}.")
  return jax.tree_util.tree_unflatten(jax.tree.structure(template), vals)


def keep_masked(new: Any, old: Any, ptreedef: Any, names: Sequence[str],
                mask: Sequence[bool]) -> Any:
  """Keeps ``old`` for unmasked parameters in every state sub-tree laid out like the params."""

  def param_like(x):
    if x is None or isinstance(x, (jax.Array, np.ndarray)):
      return False
    try:
      ptreedef.flatten_up_to(x)
      return True
    except (ValueError, TypeError):
      return False

  # flatten order of a dict tree is sorted by key: each name's flatten position
  order = ptreedef.flatten_up_to(nest(names, list(names)))
  keep = dict(zip(names, mask))

  def select(n, o):
    if not param_like(n):
      return n
    ns, os_ = ptreedef.flatten_up_to(n), ptreedef.flatten_up_to(o)
    return ptreedef.unflatten([a if keep[nm] else b for nm, a, b in zip(order, ns, os_)])

  return jax.tree.map(select, new, old, is_leaf=param_like)


class StateView(collections.abc.Mapping):
  """``optimizer.state``: parameter tensor → ``{name: tensor}`` of its state, read only.

  Built on access from the JAX state (nothing is kept or updated per step): each entry is a
  fresh dict of copies, named as in ``state_dict()["state"][index]``. Parameters that have no
  state yet (never stepped) are not in the mapping, and ``view[p]`` gives ``{}`` for them, as
  torch's ``defaultdict(dict)`` does. With ``state_scope="group"`` a group's state appears
  under its first parameter, as in ``state_dict()``. Writing into the tensors changes nothing;
  use ``load_state_dict`` to set state.
  """

  def __init__(self, params: Callable[[], list], states: Callable[[], dict]):
    self._params, self._states = params, states

  def _by_param(self) -> dict:
    """``{id(param): (param, state)}`` in parameter order, for parameters with state."""
    params, states = self._params(), self._states()
    return {id(params[key[0]]): (params[key[0]], st)
            for key, st in sorted(states.items()) if key[0] < len(params)}

  def __getitem__(self, p: Any) -> dict:
    hit = self._by_param().get(id(p))
    return {} if hit is None else to_torch_entries(hit[1])

  def get(self, p: Any, default: Any = None) -> Any:
    hit = self._by_param().get(id(p))
    return default if hit is None else to_torch_entries(hit[1])

  def __contains__(self, p: Any) -> bool:
    return id(p) in self._by_param()

  def __iter__(self):
    return iter([p for p, _ in self._by_param().values()])

  def __len__(self) -> int:
    return len(self._by_param())

  def items(self):  # one conversion pass, not one lookup per key
    return [(p, to_torch_entries(st)) for p, st in self._by_param().values()]

  def values(self):
    return [to_torch_entries(st) for _, st in self._by_param().values()]

  def __repr__(self) -> str:
    return f"StateView({len(self)} parameters with state)"


def template(factory: Callable, static: tuple, traced: dict, names: Sequence[str],
             params: Sequence[torch.Tensor], layout: Any) -> Any:
  """The shapes and dtypes of a unit's state (``jax.eval_shape`` of its init)."""
  specs = [jax.ShapeDtypeStruct(tuple(p.shape), jax_dtype(p)) for p in params]

  def init(ps, hps):
    tx = build_tx(factory, static, hps, [p.shape for p in ps], names, layout)
    return tx.init(nest(names, ps))

  return jax.eval_shape(init, specs, traced)
