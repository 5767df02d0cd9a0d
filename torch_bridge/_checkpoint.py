"""torch's state-dict format for the bridge: ``state_dict()``, ``load_state_dict()``, pickling.

``{'state': {index: {leaf_name: tensor, ...}}, 'param_groups': [...]}`` as torch builds it:

* each parameter's index is its position in the param groups, a parameter listed twice keeping
  its first index (torch's ``param_mappings``);
* ``state[index]`` holds the parameter's JAX state leaves (named as
  :func:`torch_bridge._state.unit_leaf_names` names them) as tensors of *their own* dtypes, then
  whatever was put into ``optimizer.state[p]``; other keys of ``optimizer.state`` are saved
  under their own keys;
* the param groups without their callables (factories and schedules are code, not data; a
  loaded group keeps the current ones).

Loading checks every JAX leaf's shape and dtype against the state the transform would build and
never casts (codes, counters and keys keep their dtypes); the other entries are kept as torch
keeps them. The same packing carries the state through ``copy.deepcopy``, ``pickle`` and
``torch.save(optimizer)`` (:func:`getstate` / :func:`setstate`).
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import torch

from torch_bridge import _state as S
from torch_bridge import convert
from torch_bridge._dtensor import LocalShards

#: Attributes of an Optimizer that are caches of one process (rebuilt after unpickling) or
#: hooks (which torch does not pickle either).
_RUNTIME = ("_states", "_views", "_wb", "_hyper", "_units", "_units_sig", "_unit_params",
            "_plans", "_used_fns",
            "_skipped", "_device", "_release_handles", "_user", "state", "_full",
            "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


#: What an LR scheduler puts on the optimizer (torch's ``patch_track_step_called``): ``step``, a
#: wrapper holding a weakref to *this* optimizer, and ``_opt_called``. Not carried, as torch's
#: ``__getstate__`` (defaults, state, groups only) does not carry them: pickled, the wrapper
#: failed (``PicklingError``), and a deep copy's ``step()`` stepped the original optimizer.
_PATCHES = ("step", "_opt_called")


#: The bridge's skipped-step counter, also saved in every param group: torch's distributed
#: checkpoint (``get_optimizer_state_dict``, FSDP2's path) keeps only ``state`` and
#: ``param_groups`` (the top-level ``'bridge'`` entry was lost there, and a resumed run counted
#: from 0); a param group's plain values survive it (its flattened form rebuilds only the keys
#: the live groups have, so there the counter still restarts: README).
SKIPPED_KEY = "nonfinite_skipped_steps"


def torch_indices(params: list) -> list:
  """Each flat position's state-dict index: the position of the parameter's first listing."""
  first: dict = {}
  return [first.setdefault(id(p), i) for i, p in enumerate(params)]


def pack(opt: Any) -> dict:
  """The state dict of ``opt``, without running hooks."""
  params = opt._ensure_units()
  index = torch_indices(params)
  groups, start = [], 0
  for g in opt.param_groups:
    packed = {k: v for k, v in g.items() if k not in ("params", "transform")
              and not callable(v)}
    packed["params"] = index[start:start + len(g["params"])]
    start += len(g["params"])
    groups.append(packed)
  by_id = {id(params[i]): i for i in reversed(range(len(params)))}
  local = opt._full if isinstance(opt._full, LocalShards) else None
  state: dict = {}
  units = {u.indices: u for u in opt._units}
  for key, st in sorted(opt._states.states.items()):
    i = index[key[0]] if key[0] < len(params) else None
    if i is not None and i not in state and key in units:
      state[i] = S.to_torch_entries(st, units[key].names)
      if local is not None:
        state[i] = local.to_saved(state[i], params[key[0]])
  for p, entries in opt._user.by_param.items():
    if id(p) in by_id:
      state.setdefault(by_id[id(p)], {}).update(entries)
  state.update(opt._user.other)
  out = {"state": state, "param_groups": groups}
  if opt._skipped is not None:
    out["bridge"] = {SKIPPED_KEY: convert.to_torch(opt._skipped).clone()}
    for g in groups:
      g[SKIPPED_KEY] = int(opt._skipped)
  return out


def unpack(opt: Any, sd: dict) -> None:
  """Loads state dict ``sd`` into ``opt``, without running hooks."""
  saved = sd["param_groups"]
  if len(saved) != len(opt.param_groups):
    raise ValueError("loaded state dict has a different number of parameter groups")
  for g, sg in zip(opt.param_groups, saved):
    if len(g["params"]) != len(sg["params"]):
      raise ValueError("loaded state dict contains a parameter group that doesn't match the "
                       "size of optimizer's group")
  # torch checks a state dict before changing anything: a load that fails leaves the groups
  # (and the state) as they were
  before = [dict(g) for g in opt.param_groups]
  for g, sg in zip(opt.param_groups, saved):
    g.update({k: v for k, v in sg.items() if k not in ("params", "param_names", SKIPPED_KEY)})
  try:
    _unpack_state(opt, sd, saved)
  except BaseException:
    for g, old in zip(opt.param_groups, before):
      g.clear()
      g.update(old)
    raise


def _unpack_state(opt: Any, sd: dict, saved: list) -> None:
  """The state part of :func:`unpack` (the groups hold the loaded hyperparameters)."""
  params = opt._ensure_units()
  local = opt._full if isinstance(opt._full, LocalShards) else None
  shards = params if local is None else local.proxies(params, grads=False)
  # saved index -> current flat position (torch's id_map; a repeated index keeps its first)
  where: dict = {}
  for i, pos in zip((i for sg in saved for i in sg["params"]), range(len(params))):
    where.setdefault(i, pos)
  pos_to_saved = {pos: i for i, pos in where.items()}
  loaded, made, user = {}, {}, S.UserEntries()
  for unit in opt._units:
    i = pos_to_saved.get(unit.indices[0])
    entry = sd["state"].get(i) if i is not None else None
    if entry is None:
      continue
    if not any(isinstance(v, torch.Tensor) for v in entry.values()):
      continue  # only what a user put there (no state yet): kept below
    if local is not None:
      entry = local.from_saved(entry, params[unit.indices[0]])
    traced, static = opt._hyperparams(unit.group)
    template = S.template(opt._factory(unit.group), static, traced, unit.names,
                          [shards[j] for j in unit.indices], opt._layout)
    loaded[unit.indices], extra = S.load_unit(entry, template, unit.names,
                                              params[unit.indices[0]].device, unit.indices[0])
    made[unit.indices] = S.param_signature([shards[j] for j in unit.indices])
    if extra:
      user.by_param[params[unit.indices[0]]] = extra
  unit_firsts = {u.indices[0] for u in opt._units}
  for k, v in sd["state"].items():
    # any hashable parameter id, as torch's id_map: ints from state_dict(), FQN strings from
    # torch.distributed.checkpoint.state_dict.set_optimizer_state_dict
    pos = where.get(k)
    if pos is None:
      user.other[k] = v
    elif (pos not in unit_firsts or pos_to_saved.get(pos) != k
          or not any(isinstance(x, torch.Tensor) for x in v.values())):
      user.by_param.setdefault(params[pos], {}).update(v)
  opt._states.replace(loaded, made)
  opt._user = user
  bridge = sd.get("bridge")
  opt._skipped = None
  counts = [sg[SKIPPED_KEY] for sg in saved if SKIPPED_KEY in sg]
  if bridge is None and counts:   # through torch.distributed.checkpoint (SKIPPED_KEY)
    bridge = {SKIPPED_KEY: torch.tensor(int(counts[0]), dtype=torch.int32)}
  if bridge is not None:
    sk = convert.to_jax(bridge[SKIPPED_KEY])
    opt._skipped = jax.device_put(sk, list(sk.devices())[0], may_alias=False)


def state_dict(opt: Any) -> dict:
  """``opt.state_dict()``: :func:`pack` between torch's state-dict hooks."""
  for hook in opt._optimizer_state_dict_pre_hooks.values():
    hook(opt)
  out = pack(opt)
  for hook in opt._optimizer_state_dict_post_hooks.values():
    hooked = hook(opt, out)
    if hooked is not None:
      out = hooked
  return out


def load_state_dict(opt: Any, sd: dict) -> None:
  """``opt.load_state_dict(sd)``: :func:`unpack` between torch's load hooks."""
  for hook in opt._optimizer_load_state_dict_pre_hooks.values():
    hooked = hook(opt, sd)
    if hooked is not None:
      sd = hooked
  unpack(opt, sd)
  for hook in opt._optimizer_load_state_dict_post_hooks.values():
    hook(opt)


#: Unsigned dtypes plain ``pickle`` cannot restore (torch's legacy storage format; ``torch.save``
#: can): an optimizer pickled before state dicts saved them as signed integers
#: (:data:`torch_bridge._state._SAVED_AS`) carried them as the signed integers of the same width.
_UNSIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


class _Bits:
  """An unsigned tensor carried through ``pickle`` as its bits (see ``_UNSIGNED``; read from
  optimizers pickled before state dicts held no unsigned tensors)."""

  def __init__(self, t: torch.Tensor):
    self.dtype, self.bits = t.dtype, t.view(_UNSIGNED[t.dtype])

  def restore(self) -> torch.Tensor:
    return self.bits.view(self.dtype)


def _map_state_tensors(sd: dict, fn) -> dict:
  """``sd`` with ``fn`` applied to every value of its per-parameter state entries."""
  state = {k: ({n: fn(v) for n, v in e.items()} if isinstance(k, int) and isinstance(e, dict)
               else e) for k, e in sd["state"].items()}
  return dict(sd, state=state)


def getstate(opt: Any) -> dict:
  """What ``pickle`` / ``copy.deepcopy`` / ``torch.save(opt)`` keep: the constructor's settings
  and every other attribute but the per-process caches and the hooks (torch drops its hooks
  too), and the packed state (JAX arrays do not pickle; tensors do)."""
  out = {k: v for k, v in opt.__dict__.items() if k not in _RUNTIME and k not in _PATCHES}
  out["_packed_state"] = pack(opt)   # (unsigned leaves saved as signed: _state._SAVED_AS)
  return out


def setstate(opt: Any, state: dict) -> None:
  """Rebuilds an unpickled optimizer: attributes, fresh caches and empty hooks, then the
  packed state. A mapping without the packed state is torch's ``Optimizer.__setstate__(d)``
  on a live optimizer: ``d``'s entries become attributes, ``"state"`` through the state's
  setter (so ``opt.__setstate__({"state": defaultdict(dict)})`` resets the state, as in
  torch)."""
  state = dict(state)
  if "_packed_state" not in state:
    if "state" in state:
      opt.state = state.pop("state")
    opt.__dict__.update(state)
    return
  packed = _map_state_tensors(state.pop("_packed_state"),
                              lambda v: v.restore() if isinstance(v, _Bits) else v)
  opt.__dict__.update(state)
  for name in _RUNTIME:
    if name.startswith("_optimizer_"):
      opt.__dict__.setdefault(name, collections.OrderedDict())
  opt._init_runtime(opt._wb_name)
  unpack(opt, packed)
