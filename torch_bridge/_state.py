"""The optimizer's state: each unit's JAX state, its torch names, loading, masking, and the view.

Each unit's state is a JAX pytree filed under the unit's parameter indices. A step hands its
output state leaves straight to the next step with the same plan (:class:`StateStore` keeps
them as one flat list, "live", and files them per unit only when something asks). Outside the
bridge a state leaf is named by its path in the state tree (:func:`unit_leaf_names`): inside a
sub-tree laid out like the unit's parameters, a one-parameter unit drops the parameter's own
path (``"inner_state/0/mu"``, whatever the parameter is called, so a state dict saved from
``model.parameters()`` loads into an optimizer built from ``model.named_parameters()`` and back)
and a group unit keeps it (``"inner_state/0/mu/0/weight"``). ``state_dict()`` and
``optimizer.state`` show these names; what a user puts into ``optimizer.state`` is kept beside
them (:class:`UserEntries`).
"""

from __future__ import annotations

import collections.abc
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from stax.partition import path_name
from torch_bridge import convert
from torch_bridge._units import build_tx, nest


def leaf_name(path: Any) -> str:
  """A state leaf's full name: its key path joined by ``/`` (:func:`stax.partition.path_name`)."""
  return path_name(path)


def _param_like(ptreedef: Any) -> Callable[[Any], bool]:
  """Whether a state node is laid out like the unit's parameter tree ``ptreedef``."""

  def param_like(x):
    if x is None or isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
      return False
    try:
      ptreedef.flatten_up_to(x)
      return True
    except (ValueError, TypeError):
      return False

  return param_like


def unit_leaf_names(state: Any, names: Sequence[str]) -> list:
  """The names of a unit's state leaves, in flatten order (see the module docstring).

  Args:
    state: the unit's state pytree (arrays or ``ShapeDtypeStruct``s).
    names: the unit's parameter names (dotted); one name: the per-parameter form.
  """
  ptreedef = jax.tree.structure(nest(names, list(range(len(names)))))
  param_paths = ptreedef.flatten_up_to(nest(names, [n.replace(".", "/") for n in names]))
  out = []
  nodes = jax.tree_util.tree_flatten_with_path(state, is_leaf=_param_like(ptreedef))[0]
  for path, node in nodes:
    prefix = leaf_name(path)
    if not _param_like(ptreedef)(node):
      out.append(prefix)
      continue
    for ppath, sub in zip(param_paths, ptreedef.flatten_up_to(node)):
      base = prefix if len(names) == 1 else "/".join(x for x in (prefix, ppath) if x)
      for spath, _ in jax.tree_util.tree_flatten_with_path(sub)[0]:
        out.append("/".join(x for x in (base, leaf_name(spath)) if x) or "param")
  return out


def legacy_leaf_names(state: Any) -> list:
  """The full key paths (the names before per-parameter names dropped the parameter's path)."""
  return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


#: Unsigned state leaves wider than a byte (a PRNG key's uint32 words) as torch shows and saves
#: them: the signed integers of the same width, holding the same bits (a key word above 2³¹
#: reads negative). torch supports these unsigned dtypes only in part: plain ``pickle`` and
#: ``torch.save``'s legacy format cannot restore them. Loading takes either form
#: (:func:`_leaf_from_torch`).
_SAVED_AS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _saved(t: torch.Tensor) -> torch.Tensor:
  """A state leaf's tensor as saved (see ``_SAVED_AS``); a copy."""
  return t.view(_SAVED_AS[t.dtype]).clone() if t.dtype in _SAVED_AS else t.clone()


def to_torch_entries(state: Any, names: Sequence[str]) -> dict:
  """``{name: torch tensor}`` of a unit's state: copies of its leaves, in their own dtypes but
  for unsigned integers wider than a byte (``_SAVED_AS``: a uint32 key as its int32 bits)."""
  return {n: _saved(convert.to_torch(x))
          for n, x in zip(unit_leaf_names(state, names), jax.tree.leaves(state))}


def jax_dtype(t: torch.Tensor) -> Any:
  """The JAX dtype of a torch tensor's dtype."""
  return jnp.dtype(str(t.dtype).replace("torch.", ""))


class UserEntries:
  """What a user (or a state-dict hook) puts into ``optimizer.state``, kept as torch keeps it:
  per parameter (``state[p]["key"] = v``, keyed by the tensor) and under other keys
  (``state["key"] = v``). ``state_dict()`` packs both beside the JAX state's entries."""

  def __init__(self):
    self.by_param: dict = {}   # tensor -> {key: value}
    self.other: dict = {}      # non-tensor key -> value

  def clear(self) -> None:
    self.by_param, self.other = {}, {}

def position_map(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> dict:
  """``{old position: new position}`` of the parameter tensors in both flat lists (by
  identity; a tensor listed twice: its first position in each)."""
  first: dict = {}
  for i, p in enumerate(after):
    first.setdefault(id(p), i)
  out, seen = {}, set()
  for i, p in enumerate(before):
    if id(p) in first and id(p) not in seen:
      seen.add(id(p))
      out[i] = first[id(p)]
  return out


class _Live(NamedTuple):
  state_keys: tuple    # unit keys, in plan order
  state_defs: tuple    # per unit: (treedef, number of leaves, their real shapes)
  leaves: tuple        # the step's output state leaves (in their boundary shapes)


class StateStore:
  """Unit key (tuple of parameter indices) → JAX state, with the last step's outputs live.

  Filed states have their real shapes; the leaves a step takes and returns have the step's
  boundary shapes (some 1-D: :class:`torch_bridge._plan.CompiledStep`), and :meth:`flush`
  files live ones in their real shapes (in place: the live buffers are donated to the
  reshape)."""

  def __init__(self):
    self._filed: dict = {}
    self._live: Optional[_Live] = None
    self._live_owner: Any = None
    self.made_for: dict = {}   # unit key -> its parameters' (shape, dtype)s when made or loaded

  def clear(self) -> None:
    self._filed, self._live, self._live_owner = {}, None, None
    self.made_for = {}

  def refile(self, moved: dict, before: Sequence[Any], after: Sequence[Any]) -> None:
    """Files each unit's state under its parameters' new positions (``moved``: old position →
    new, :func:`position_map`) where that is the key of a unit of ``after`` (the units of
    ``before`` and ``after`` give the names the state is laid out by); drops the rest."""
    names = {u.indices: u.names for u in before}
    units = {u.indices: u for u in after}
    filed, made = {}, {}
    for key, st in self.states.items():
      new = tuple(moved[i] for i in key) if all(i in moved for i in key) else None
      if new in units and key in names:
        filed[new] = rename(st, names[key], units[new].names)
        if key in self.made_for:
          made[new] = self.made_for[key]
    self._filed, self.made_for = filed, made

  def replace(self, states: dict, made_for: dict) -> None:
    """Sets every unit's state (``load_state_dict``), made for the parameter signatures
    ``made_for`` (:func:`param_signature`)."""
    self._filed, self._live, self._live_owner = dict(states), None, None
    self.made_for = dict(made_for)

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
      for key, (tdef, n, shapes) in zip(live.state_keys, live.state_defs):
        self._filed[key] = jax.tree.unflatten(
            tdef, [x if x.shape == s else _reshape_donated(x, s)
                   for x, s in zip(live.leaves[k:k + n], shapes)])
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

  def leaves(self, state_keys: Sequence[tuple], init_missing: Callable[[list], dict],
             signature: Callable[[tuple], tuple], names: Callable[[tuple], Sequence[str]]
             ) -> tuple[list, tuple]:
    """(flat leaves, per unit (treedef, number of leaves, their shapes)) of the units
    ``state_keys``, in their real shapes; ``init_missing(keys)`` returns ``{key: state}`` for
    the units that have none yet. ``signature(key)`` gives the unit's parameters' current
    :func:`param_signature`: a state made for another one (a parameter whose dtype or shape
    changed since: ``model.half()``, ``p.data = ...``) raises ``ValueError`` (``names(key)``:
    the unit's parameter names, for the message), as torch's optimizers cannot step on either."""
    states = self.states
    for key in state_keys:
      made, now = self.made_for.get(key), signature(key)
      if key in states and made is not None and made != now:
        raise ValueError(_changed_message(key, names(key), made, now))
    missing = [key for key in state_keys if key not in states]
    if missing:
      states.update(init_missing(missing))
      self.made_for.update({key: signature(key) for key in missing})
    leaves, defs = [], []
    for key in state_keys:
      ls, tdef = jax.tree.flatten(states[key])
      leaves.extend(ls)
      defs.append((tdef, len(ls), tuple(tuple(x.shape) for x in ls)))
    return leaves, tuple(defs)


def param_signature(params: Sequence[torch.Tensor]) -> tuple:
  """What a unit's state is made for: each parameter's ``(shape, dtype)``."""
  return tuple((tuple(p.shape), p.dtype) for p in params)


def _changed_message(key: tuple, names: Sequence[str], made: tuple, now: tuple) -> str:
  which = [(i, n, a, b) for i, n, a, b in zip(key, names, made, now) if a != b]
  i, n, (s0, d0), (s1, d1) = which[0]
  return (f"torch_bridge: parameter {i} ({n!r}) is now {str(d1).replace('torch.', '')}"
          f"{list(s1)}, but its optimizer state was made for {str(d0).replace('torch.', '')}"
          f"{list(s0)} (its dtype or shape changed after the optimizer had state for it, e.g. "
          "model.half() or p.data = ...). torch's optimizers cannot step on either: "
          "`del optimizer.state[p]` restarts it, or build the optimizer after the change.")


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _reshape_donated(x: jax.Array, shape: tuple) -> jax.Array:
  """``x`` reshaped, in ``x``'s buffer (a bitcast of a donated argument)."""
  return x.reshape(shape)


#: Saved dtypes a float32 state leaf accepts, widened exactly: stax kept v of a float16
#: parameter in float16 before it kept it in float32 (:class:`stax.FullPrecision`'s
#: ``widen_float16``), so such a checkpoint still loads, unchanged in value.
_WIDENS_TO_FLOAT32 = (torch.float16, torch.bfloat16)


def _leaf_from_torch(t: Any, spec: Any, name: str, where: Any, device: torch.device) -> Any:
  """A state leaf from a saved tensor, its shape and dtype checked against ``spec`` (never
  cast: codes, counters and keys keep their dtypes; only a float16 or bfloat16 tensor for a
  float32 leaf is widened, which is exact)."""
  if not isinstance(t, torch.Tensor):
    t = torch.as_tensor(t)
  if (tuple(t.shape) == tuple(spec.shape) and t.dtype in _WIDENS_TO_FLOAT32
      and jnp.dtype(spec.dtype) == jnp.float32):
    t = t.to(torch.float32)
  unsigned = getattr(torch, jnp.dtype(spec.dtype).name, None)
  if tuple(t.shape) == tuple(spec.shape) and t.dtype == _SAVED_AS.get(unsigned, False):
    t = t.view(unsigned)
  if (tuple(t.shape) != tuple(spec.shape)
      or str(t.dtype).replace("torch.", "") != jnp.dtype(spec.dtype).name):
    raise ValueError(
        f"torch_bridge: state {name!r} of parameter {where} is "
        f"{t.dtype}{tuple(t.shape)}, expected {spec.dtype}{tuple(spec.shape)}.")
  a = convert.to_jax(t.to(device=device))
  return jax.device_put(a, list(a.devices())[0], may_alias=False)


def load_unit(entry: dict, template: Any, names: Sequence[str], device: torch.device,
              where: Any) -> tuple[Any, dict]:
  """``(JAX state, other entries)`` of one unit from its saved ``{name: tensor}`` entry.

  Every leaf of ``template`` (``jax.eval_shape`` of the unit's init; ``names``: the unit's
  parameter names) must be present under its name (:func:`unit_leaf_names`; the full key path
  of earlier versions is accepted too), with its shape and dtype. The entry's other keys are
  returned: they are what a user put into ``optimizer.state``. ``where`` names the parameter in
  error messages."""
  vals, used = [], set()
  specs = jax.tree.leaves(template)
  for name, legacy, spec in zip(unit_leaf_names(template, names), legacy_leaf_names(template),
                                specs):
    key = name if name in entry else legacy if legacy in entry else None
    if key is None:
      raise ValueError(f"torch_bridge: state of parameter {where} lacks {name!r}.")
    used.add(key)
    vals.append(_leaf_from_torch(entry[key], spec, name, where, device))
  extra = {k: v for k, v in entry.items() if k not in used}
  return jax.tree.unflatten(jax.tree.structure(template), vals), extra


def set_leaves(state: Any, names: Sequence[str], values: dict, device: torch.device,
               where: Any) -> Any:
  """``state`` with the leaves named in ``values`` replaced (shape and dtype checked)."""
  leaves, tdef = jax.tree.flatten(state)
  by_name = dict(zip(unit_leaf_names(state, names), range(len(leaves))))
  leaves = list(leaves)
  for name, t in values.items():
    i = by_name[name]
    leaves[i] = _leaf_from_torch(t, leaves[i], name, where, device)
  return jax.tree.unflatten(tdef, leaves)


def rename(state: Any, before: Sequence[str], after: Sequence[str]) -> Any:
  """A unit's state with its parameters renamed from ``before`` to ``after`` (position for
  position) in every sub-tree laid out like the parameters (an unnamed parameter is called by
  its position, which changes when one before it leaves the groups)."""
  if tuple(before) == tuple(after):
    return state
  ptreedef = jax.tree.structure(nest(before, list(range(len(before)))))
  order = ptreedef.flatten_up_to(nest(before, list(range(len(before)))))
  param_like = _param_like(ptreedef)

  def move(node):
    if not param_like(node):
      return node
    by_position = dict(zip(order, ptreedef.flatten_up_to(node)))
    return nest(after, [by_position[i] for i in range(len(after))])

  return jax.tree.map(move, state, is_leaf=param_like)


def keep_masked(new: Any, old: Any, ptreedef: Any, names: Sequence[str],
                mask: Sequence[bool]) -> Any:
  """Keeps ``old`` for unmasked parameters in every state sub-tree laid out like the params."""
  param_like = _param_like(ptreedef)

  # flatten order of a dict tree is sorted by key: each name's flatten position
  order = ptreedef.flatten_up_to(nest(names, list(names)))
  keep = dict(zip(names, mask))

  def select(n, o):
    if not param_like(n):
      return n
    ns, os_ = ptreedef.flatten_up_to(n), ptreedef.flatten_up_to(o)
    return ptreedef.unflatten([a if keep[nm] else b for nm, a, b in zip(order, ns, os_)])

  return jax.tree.map(select, new, old, is_leaf=param_like)


class ParamState(dict):
  """``optimizer.state[p]``: the parameter's state entries (copies of its JAX state leaves,
  then what was put there), as a dict whose writes reach the optimizer: a JAX entry set to a
  tensor of its shape and dtype replaces that leaf; any other key is kept (and saved by
  ``state_dict()``). Changing a returned tensor in place changes nothing (it is a copy)."""

  def __init__(self, view: "StateView", p: torch.Tensor, entries: dict):
    super().__init__(entries)
    self._view, self._p = view, p

  def __setitem__(self, key: Any, value: Any) -> None:
    self._view._set_entries(self._p, {key: value})
    super().__setitem__(key, value)

  def __delitem__(self, key: Any) -> None:
    self._view._del_entry(self._p, key)
    super().__delitem__(key)

  def update(self, *args: Any, **kwargs: Any) -> None:  # pylint: disable=arguments-differ
    for k, v in dict(*args, **kwargs).items():
      self[k] = v

  def setdefault(self, key: Any, default: Any = None) -> Any:
    if key not in self:
      self[key] = default
    return self[key]


class StateView(collections.abc.MutableMapping):
  """``optimizer.state``: parameter → :class:`ParamState`, plus any other key a user sets.

  Built on access from the JAX state (nothing is copied per step): ``view[p]`` holds copies of
  ``p``'s JAX state leaves, named as in ``state_dict()["state"][index]``, and what was put into
  it. A parameter with no state yet (never stepped) gives an empty entry, as torch's
  ``defaultdict(dict)`` does, and is listed once something is put there. With
  ``state_scope="group"`` a group's JAX state appears under its first parameter, as in
  ``state_dict()``. ``view[p] = {...}`` sets the given entries; ``del view[p]`` drops ``p``'s
  state (its unit starts afresh at its next step) and its entries; other keys
  (``view["note"] = 1``) are kept and saved by ``state_dict()`` as torch's are.
  """

  def __init__(self, opt: Any):
    self._opt = opt

  # -- lookups
  def _jax_by_param(self) -> dict:
    """``{param: (unit, JAX state)}`` in parameter order, for units with JAX state."""
    params, states = self._opt._ensure_units(), self._opt._states.states
    out = {}
    for u in self._opt._units:
      st = states.get(u.indices)
      if st is not None and params[u.indices[0]] not in out:
        out[params[u.indices[0]]] = (u, st)
    return out

  def _entries(self, p: torch.Tensor) -> Optional[dict]:
    hit = self._jax_by_param().get(p)
    user = self._opt._user.by_param.get(p)
    if hit is None and user is None:
      return None
    out = {} if hit is None else to_torch_entries(hit[1], hit[0].names)
    out.update(user or {})
    return out

  def __getitem__(self, key: Any) -> Any:
    if isinstance(key, torch.Tensor):
      return ParamState(self, key, self._entries(key) or {})
    return self._opt._user.other[key]

  def get(self, key: Any, default: Any = None) -> Any:
    """Like ``dict.get`` (as torch's ``defaultdict``: a parameter with nothing gives
    ``default``)."""
    return self[key] if key in self else default

  def __contains__(self, key: Any) -> bool:
    if isinstance(key, torch.Tensor):
      return key in self._opt._user.by_param or key in self._jax_by_param()
    return key in self._opt._user.other

  def __iter__(self):
    jax_params = list(self._jax_by_param())
    seen = set(map(id, jax_params))
    extra = [p for p in self._opt._user.by_param if id(p) not in seen]
    return iter(jax_params + extra + list(self._opt._user.other))

  def __len__(self) -> int:
    return len(list(iter(self)))

  # -- writes
  def __setitem__(self, key: Any, value: Any) -> None:
    if not isinstance(key, torch.Tensor):
      self._opt._user.other[key] = value
      return
    if not isinstance(value, collections.abc.Mapping):
      raise TypeError(f"torch_bridge: a parameter's state is a mapping, got "
                      f"{type(value).__name__}.")
    self._opt._user.by_param.pop(key, None)
    self._set_entries(key, dict(value))

  def __delitem__(self, key: Any) -> None:
    if not isinstance(key, torch.Tensor):
      del self._opt._user.other[key]
      return
    hit = self._jax_by_param().get(key)
    user = self._opt._user.by_param.pop(key, None)
    if hit is None and user is None:
      # a parameter of this optimizer with no state yet: as torch's ``defaultdict``, where
      # ``state[p]`` made an empty entry that ``del`` then drops, there is nothing to drop
      if not any(key is q for q in self._opt._ensure_units()):
        raise KeyError(key)
      return
    if hit is not None:
      self._opt._states.states.pop(hit[0].indices, None)

  _MISSING = object()

  def pop(self, key: Any, default: Any = _MISSING) -> Any:
    """Like ``dict.pop`` (``defaultdict.pop`` does not make a missing entry): a parameter with
    no state gives ``default`` (``KeyError`` without one), else its entries, dropped."""
    if key not in self:
      if default is StateView._MISSING:
        raise KeyError(key)
      return default
    value = self[key]
    del self[key]
    return value

  def clear(self) -> None:
    self._opt._states.clear()
    self._opt._user.clear()

  def _set_entries(self, p: torch.Tensor, entries: dict) -> None:
    """JAX-named entries replace those leaves of ``p``'s state; the rest are kept as is."""
    hit = self._jax_by_param().get(p)
    jax_names = set() if hit is None else set(unit_leaf_names(hit[1], hit[0].names))
    jax_part = {k: v for k, v in entries.items() if k in jax_names}
    if jax_part:
      unit, st = hit
      self._opt._states.states[unit.indices] = set_leaves(st, unit.names, jax_part, p.device,
                                                         unit.indices[0])
    rest = {k: v for k, v in entries.items() if k not in jax_names}
    if rest or p not in self._opt._user.by_param:
      self._opt._user.by_param.setdefault(p, {}).update(rest)

  def _del_entry(self, p: torch.Tensor, key: Any) -> None:
    hit = self._jax_by_param().get(p)
    if hit is not None and key in set(unit_leaf_names(hit[1], hit[0].names)):
      raise KeyError(f"torch_bridge: {key!r} is part of the transform's state and cannot be "
                     "deleted alone; `del optimizer.state[p]` drops the parameter's state.")
    del self._opt._user.by_param[p][key]

  def __repr__(self) -> str:
    return f"StateView({len(self)} entries)"


def template(factory: Callable, static: tuple, traced: dict, names: Sequence[str],
             params: Sequence[torch.Tensor], layout: Any) -> Any:
  """The shapes and dtypes of a unit's state (``jax.eval_shape`` of its init)."""
  specs = [jax.ShapeDtypeStruct(tuple(p.shape), jax_dtype(p)) for p in params]

  def init(ps, hps):
    tx = build_tx(factory, static, hps, [p.shape for p in ps], names, layout)
    return tx.init(nest(names, ps))

  return jax.eval_shape(init, specs, traced)
