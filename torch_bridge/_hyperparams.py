"""A param group's hyperparameters as the jitted step takes them, and their per-group cache.

A group's keys are mapped to the factory's argument names (:func:`map_key`); float values are
*traced* (packed into one float32 vector per group, fed to the step as one argument, the
``optax.inject_hyperparams`` mechanism), everything else is *static* (part of the compiled
step's key). :class:`HyperCache` keeps each group's :class:`GroupHyper` while its values are
unchanged and refills the vector in place when only traced values change (a scheduler's write).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import torch

from torch_bridge import convert

#: Group keys that are torch bookkeeping, never factory arguments.
RESERVED = frozenset({"params", "param_names", "transform"})
#: Hyperparameters always fed as float32 arrays (even if a user writes ``weight_decay=0``).
FLOAT_KEYS = frozenset({"lr", "learning_rate", "eps", "eps_root", "weight_decay", "b1", "b2",
                        "betas", "momentum", "dampening", "beta", "beta1", "beta2"})
#: torch name → factory name(s), used when the factory does not take the torch name itself.
TORCH_TO_FACTORY = {"lr": ("learning_rate",), "betas": ("b1", "b2")}
_PLAIN = (int, float, str, bool, type(None))
_CACHE_LIMIT = 256


def cached(cache: dict, key: Any, make: Callable[[], Any]) -> Any:
  """``cache[key]``, made by ``make()`` when missing (oldest entry dropped past 256)."""
  fn = cache.get(key)
  if fn is None:
    if len(cache) >= _CACHE_LIMIT:
      cache.pop(next(iter(cache)))
    fn = cache[key] = make()
  return fn


# ----------------------------------------------------------------------------------- factory
class FactorySpec(NamedTuple):
  """A transformation factory and the argument names it accepts (``None``: ``**kwargs``)."""
  factory: Callable
  accepted: Optional[frozenset]


_SPEC_CACHE: dict = {}


def factory_spec(factory: Callable) -> FactorySpec:
  """The :class:`FactorySpec` of ``factory`` (cached for hashable factories)."""
  try:
    return cached(_SPEC_CACHE, factory, lambda: _factory_spec(factory))
  except TypeError:  # an unhashable callable
    return _factory_spec(factory)


def _factory_spec(factory: Callable) -> FactorySpec:
  try:
    sig = inspect.signature(factory)
  except (TypeError, ValueError):
    return FactorySpec(factory, None)
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
    return FactorySpec(factory, None)
  return FactorySpec(factory, frozenset(sig.parameters))


def _factory_defaults(factory: Callable) -> dict:
  try:
    return {n: p.default for n, p in inspect.signature(factory).parameters.items()
            if p.default is not inspect.Parameter.empty}
  except (TypeError, ValueError):
    return {}


def map_key(spec: FactorySpec, key: str, value: Any) -> Optional[list]:
  """``[(factory_name, value), ...]`` for a group key, or ``None`` when the factory ignores it."""
  acc = spec.accepted
  if acc is None or key in acc:
    return [(key, value)]
  targets = TORCH_TO_FACTORY.get(key)
  if targets and all(t in acc for t in targets):
    if len(targets) == 1:
      return [(targets[0], value)]
    if not isinstance(value, (tuple, list, torch.Tensor)):
      raise TypeError(f"torch_bridge: `{key}` must be a tuple of {len(targets)} values "
                      f"({', '.join(targets)}), got {type(value).__name__} {value!r}.")
    vals = tuple(value)
    if len(vals) != len(targets):
      raise ValueError(f"torch_bridge: `{key}` must have {len(targets)} values, got {value!r}.")
    return list(zip(targets, vals))
  return None


def check_tensor_lr(group: dict) -> None:
  """torch's rule for a tensor learning rate: ``ValueError`` unless it has one element."""
  for key in ("lr", "learning_rate"):
    v = group.get(key)
    if isinstance(v, torch.Tensor) and v.numel() != 1:
      raise ValueError(f"Tensor lr must be 1-element: `{key}` has shape {tuple(v.shape)}.")


def _number_pair(v: Any) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


def check_group_keys(factory: Callable, group: dict) -> None:
  """``TypeError`` for a hyperparameter torch knows (``betas``, ``eps``, ``momentum``, ...) in
  a param group whose factory cannot take it: it would be ignored, where ``defaults`` with it
  raise. Other keys (a group's ``"name"``, a scheduler's ``initial_lr``) are metadata torch
  keeps, and so does the bridge."""
  spec = factory_spec(factory)
  for key in group:
    if key in FLOAT_KEYS and key not in RESERVED and map_key(spec, key, group[key]) is None:
      raise TypeError(f"torch_bridge: a param group sets {key!r}, which "
                      f"{getattr(factory, '__name__', factory)!s} does not take (torch names "
                      f"map as {TORCH_TO_FACTORY}); it would have no effect.")


def fill_defaults(factory: Callable, defaults: dict) -> dict:
  """``defaults`` with ``lr``, ``betas``, ``eps`` and ``weight_decay`` taken from the factory's
  own defaults when it has them, and, with ``decouple_lr=True`` and no ``max_lr`` for a factory
  that takes one, ``max_lr = lr`` (optimi's default); ``TypeError`` for a key the factory does
  not take."""
  spec = factory_spec(factory)
  fdef = _factory_defaults(factory)
  if "lr" not in defaults and "learning_rate" not in defaults and "learning_rate" in fdef:
    if isinstance(fdef["learning_rate"], (int, float)):
      defaults["lr"] = fdef["learning_rate"]
  if "betas" not in defaults and "b1" not in defaults and "b2" not in defaults:
    if isinstance(fdef.get("b1"), (int, float)) and isinstance(fdef.get("b2"), (int, float)):
      defaults["betas"] = (fdef["b1"], fdef["b2"])
    elif _number_pair(fdef.get("betas")):   # a factory that takes torch's pair (stable_adamw)
      defaults["betas"] = tuple(fdef["betas"])
  for k in ("eps", "weight_decay"):
    if k not in defaults and isinstance(fdef.get(k), (int, float)):
      defaults[k] = fdef[k]
  if (defaults.get("decouple_lr") is True and defaults.get("max_lr") is None
      and "max_lr" in fdef and isinstance(defaults.get("lr"), (int, float))):
    # optimi's rule: the constructor's lr is the maximum scheduled rate (a step passes the
    # group's current lr as an array, which stax.stable_adamw/oadamw cannot take as max_lr);
    # OneCycleLR writes its peak into each group's "max_lr", as it does for optimi
    defaults["max_lr"] = float(defaults["lr"])
  for k in defaults:
    if map_key(spec, k, defaults[k]) is None:
      raise TypeError(f"torch_bridge: {getattr(factory, '__name__', factory)!s} has no "
                      f"argument {k!r} (torch names map as {TORCH_TO_FACTORY}).")
  return defaults


# ------------------------------------------------------------------------------------ parsing
class Parsed(NamedTuple):
  """A group's hyperparameters under the factory's names.

  Attributes:
    traced: ``{name: float32 numpy scalar, or a tuple of them}``.
    static: ``((name, value), ...)`` sorted by name.
    sources: ``{traced name: (group key, index within its tuple or None)}`` (``betas`` →
      ``b1``, ``b2``).
  """
  traced: dict
  static: tuple
  sources: dict


def _is_float(v: Any, floaty: bool) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, (float, np.floating)):
    return True
  return floaty and isinstance(v, (int, np.integer))


def parse(group: dict, spec: FactorySpec, static_args: frozenset) -> Parsed:
  """Splits a group's keys into traced and static factory arguments (see :class:`Parsed`).
  Keys the factory does not take (scheduler bookkeeping such as ``initial_lr``) are left out."""
  traced, static, sources = {}, [], {}
  for key, value in group.items():
    if key in RESERVED:
      continue
    pairs = map_key(spec, key, value)
    if pairs is None:
      continue
    for j, (name, v) in enumerate(pairs):
      if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
      floaty = key in FLOAT_KEYS or name in FLOAT_KEYS
      if name in static_args:
        static.append((name, v))
        continue
      if _is_float(v, floaty):
        traced[name] = np.asarray(v, np.float32)
      elif (isinstance(v, (tuple, list)) and v and floaty
            and all(_is_float(x, True) for x in v)):
        traced[name] = tuple(np.asarray(x, np.float32) for x in v)  # e.g. betas=(b1, b2)
      else:
        static.append((name, v))
        continue
      sources[name] = (key, j if len(pairs) > 1 else None)
  return Parsed(traced, tuple(sorted(static, key=lambda kv: kv[0])), sources)


def freeze(v: Any) -> Any:
  """A hashable stand-in for a static hyperparameter (part of the compiled step's key)."""
  if isinstance(v, (list, tuple)):
    return (type(v).__name__,) + tuple(freeze(x) for x in v)
  if isinstance(v, dict):
    return ("dict",) + tuple(sorted((str(k), freeze(x)) for k, x in v.items()))
  try:
    hash(v)
    return (type(v).__name__, v)
  except TypeError:
    return ("id", id(v))


def concrete(traced: dict) -> dict:
  """Traced values as Python floats (to build a transform outside of any trace)."""
  return {k: (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v))
          for k, v in traced.items()}


# ------------------------------------------------------------------------------------ packing
def _layout_values(layout: tuple, get: Callable[[str], Any]) -> list:
  """The scalars of a packed vector in order, ``get(name)`` giving each name's value."""
  vals = []
  for name, n in layout:
    if n:
      vals.extend(get(name))
    else:
      vals.append(get(name))
  return vals


def pack(traced: dict) -> tuple:
  """(layout, float32 vector) of a group's traced hyperparameters: one jit argument instead of
  one per value (each argument costs ~2 us per call). ``layout``: ((name, n), ...), ``n`` the
  length of a tuple value (``betas``) or 0 for a scalar."""
  layout = tuple((name, len(v) if isinstance(v, tuple) else 0)
                 for name, v in sorted(traced.items()))
  vals = _layout_values(layout, traced.__getitem__)
  # the numpy view of a torch tensor: 64-byte aligned, so a CPU placement can alias it
  return layout, torch.tensor([float(v) for v in vals], dtype=torch.float32).numpy()


def unpack(layout: tuple, vec: Any) -> dict:
  """The traced hyperparameters (scalars, or tuples of them) from :func:`pack`'s vector."""
  out, k = {}, 0
  for name, n in layout:
    if n:
      out[name] = tuple(vec[k + j] for j in range(n))
      k += n
    else:
      out[name] = vec[k]
      k += 1
  return out


def place(vec: np.ndarray, sharding: Any) -> tuple:
  """(``vec`` as a committed JAX array on ``sharding``'s device, whether it aliases ``vec``).

  On the CPU it is a DLPack import of ``vec``'s own (aligned) memory: writing new values
  into ``vec`` between steps updates it with no new array (a scheduler's write costs a list
  assignment, against ~19 us for ``jax.device_put`` and far more right after a memory-bound
  step). Elsewhere, or if the import had to copy, a fresh ``device_put`` per change."""
  if all(d.platform == "cpu" for d in sharding.device_set):
    t = torch.from_numpy(vec)
    a = convert.to_jax(t)
    return a, convert.shares_memory(t, a)
  return jax.device_put(vec, sharding), False


# -------------------------------------------------------------------------------------- cache
class GroupHyper(NamedTuple):
  """What a step needs from one group's hyperparameters.

  Attributes:
    static: ``((name, value), ...)``, the static factory arguments.
    static_key: a hashable stand-in for ``static`` (:func:`freeze`).
    layout: the layout of ``vector`` (:func:`pack`).
    vector: the traced values packed as one float32 numpy vector.
    placed: ``{sharding: (JAX array of vector, whether it aliases vector)}``.
  """
  static: tuple
  static_key: Any
  layout: tuple
  vector: np.ndarray
  placed: dict

  def on(self, sharding: Any) -> jax.Array:
    """``vector`` on ``sharding``'s device (placed once per change of values)."""
    hit = self.placed.get(sharding)
    if hit is None:
      hit = self.placed[sharding] = place(self.vector, sharding)
    return hit[0]


def _signature(group: dict) -> tuple:
  """The group's non-parameter items with their types (compared step to step)."""
  return tuple([(k, v.__class__, v) for k, v in group.items() if k not in RESERVED])


def _only_traced_changed(old: tuple, new: tuple, traced_keys: frozenset) -> bool:
  """True when two :func:`_signature` s differ only in the values of ``traced_keys``."""
  if len(old) != len(new):
    return False
  for (k0, t0, v0), (k1, t1, v1) in zip(old, new):
    if k0 != k1 or t0 is not t1 or (k0 not in traced_keys and v0 != v1):
      return False
  return True


def _is_plain(sig: tuple) -> bool:
  """True when every value of a :func:`_signature` is an immutable plain value (or a tuple of
  them): only such a signature may be cached, since a mutable value (a list, a tensor) could
  change in place and still compare equal to itself. A later signature compares equal to a
  plain one only by value, so the cache stays correct whatever that later one holds."""
  for _, t, v in sig:
    if t is tuple:
      if not all(isinstance(x, _PLAIN) for x in v):
        return False
    elif not issubclass(t, _PLAIN):
      return False
  return True


def _refill(group: dict, layout: tuple, sources: dict) -> list:
  """The values of :func:`pack`'s vector read again from the group's current values."""

  def get(name):
    key, j = sources[name]
    return group[key] if j is None else group[key][j]

  return _layout_values(layout, get)


class _Entry(NamedTuple):
  sig: tuple            # the group's signature when cached
  group: dict           # the group dict itself (identity)
  hyper: GroupHyper
  sources: dict         # Parsed.sources
  traced_keys: frozenset


def make_group_hyper(parsed: Parsed) -> GroupHyper:
  """A fresh :class:`GroupHyper` from a parse."""
  layout, vector = pack(parsed.traced)
  return GroupHyper(parsed.static, freeze(parsed.static), layout, vector, {})


class HyperCache:
  """Each group's :class:`GroupHyper`, kept while the group's values are unchanged plain
  Python values (tensors and mutable values are read every step). When only traced values
  change (a scheduler writes a new ``lr``), the vector is refilled from the group without
  re-parsing it. (A committed array costs ~20 us less per call than a numpy argument, and the
  step must be fed one kind only, or it compiles twice.)"""

  def __init__(self):
    self._entries: dict = {}  # group index -> _Entry

  def clear(self) -> None:
    self._entries.clear()

  def entry(self, gi: int, group: dict, parse_group: Callable[[], Parsed]) -> GroupHyper:
    """Group ``gi``'s hyperparameters; ``parse_group()`` parses it when the cache misses."""
    sig = _signature(group)
    hit = self._entries.get(gi)
    if hit is not None and hit.group is group:
      if hit.sig == sig:
        return hit.hyper
      if _is_plain(sig) and _only_traced_changed(hit.sig, sig, hit.traced_keys):
        vals = _refill(group, hit.hyper.layout, hit.sources)
        hyper = hit.hyper
        if len(vals) == hyper.vector.size:
          # In place: the previous step has finished reading (it blocked on its outputs),
          # and every CPU placement aliases this vector; others are placed again.
          hyper.vector[:] = vals
          for sh in [sh for sh, (_, aliased) in hyper.placed.items() if not aliased]:
            del hyper.placed[sh]
          self._entries[gi] = hit._replace(sig=sig)
          return hyper
    parsed = parse_group()
    hyper = make_group_hyper(parsed)
    if _is_plain(sig):
      self._entries[gi] = _Entry(sig, group, hyper, parsed.sources,
                                 frozenset(key for key, _ in parsed.sources.values()))
    return hyper
