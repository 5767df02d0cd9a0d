"""Units (sets of parameters sharing one transform state) and the transform each one runs.

With ``state_scope="param"`` every parameter is its own unit; with ``"group"`` a whole param
group is one. A unit's transform sees its parameters as a tree nested by their dotted names
(``{"layers": {"0": {"weight": w}}}``), so path- and shape-based labels still work.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax


class Unit(NamedTuple):
  """A set of parameters sharing one transform state (one parameter, or one whole group)."""
  group: int
  indices: tuple   # global parameter indices (positions across all groups)
  names: tuple     # their names (dotted)
  first: int = 0   # the position of its first parameter in its group

  @property
  def position(self) -> tuple:
    """``(group, first parameter's position in it)``: where a one-leaf tree's leaf 0 sits
    among the torch parameters (a factory's ``rounding_index``, :func:`build_tx`)."""
    return (self.group, self.first)


class Layout(NamedTuple):
  """How a matrix transform learns the torch ``(out, in)`` layout of each parameter."""
  kwarg: Optional[str]                       # the factory's dimension-numbers argument
  fn: Callable[..., Any]                     # (shape[, dotted name]) -> dimension numbers
  #: filled by the bridge, not asked for by the user: passed to each factory that takes
  #: ``kwarg`` and was not given it (each group's own ``"transform"`` decides for itself)
  auto: bool = False

  def of(self, shape: Sequence[int], name: str) -> Any:
    """``fn(shape, name)``, or ``fn(shape)`` for a one-argument ``fn``."""
    return self.fn(tuple(shape), name) if _takes_name(self.fn) else self.fn(tuple(shape))


@functools.lru_cache(maxsize=64)
def _takes_name(fn: Callable) -> bool:
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return False
  return (len([q for q in params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]) >= 2
          or any(q.kind is q.VAR_POSITIONAL for q in params))


def _parts(name: Any) -> list:
  return [p for p in str(name).split(".") if p] or [str(name)]


def nest(names: Sequence[str], leaves: Sequence[Any]) -> dict:
  """``{"a": {"0": {"weight": x}}}`` from dotted names (the tree the transform sees)."""
  tree: dict = {}
  for name, leaf in zip(names, leaves):
    parts = _parts(name)
    node = tree
    for part in parts[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(f"torch_bridge: parameter name {name!r} clashes with another "
                         "parameter's name; pass distinct (name, tensor) pairs.")
      node = child
    if parts[-1] in node:
      raise ValueError(f"torch_bridge: duplicate parameter name {name!r} in one group.")
    node[parts[-1]] = leaf
  return tree


def get_leaf(tree: dict, name: str) -> Any:
  """The leaf of :func:`nest`'s tree under dotted ``name``."""
  node = tree
  for part in _parts(name):
    node = node[part]
  return node


def path_of(name: str) -> str:
  """The ``/``-joined path of a dotted parameter name in :func:`nest`'s tree."""
  return "/".join(_parts(name))


def build_units(groups: Sequence[dict], state_scope: str) -> list:
  """The units of ``groups`` (``state_scope`` ``"param"`` or ``"group"``); parameters without
  names are called ``param_<global index>``."""
  units, idx = [], 0
  for gi, g in enumerate(groups):
    n = len(g["params"])
    names = [str(x) for x in (g.get("param_names") or
                              [f"param_{i}" for i in range(idx, idx + n)])]
    ids = list(range(idx, idx + n))
    if state_scope == "param":
      units += [Unit(gi, (i,), (nm,), k) for k, (i, nm) in enumerate(zip(ids, names))]
    elif n:
      nest(names, [0] * n)  # name clash check
      units.append(Unit(gi, tuple(ids), tuple(names)))
    idx += n
  return units


def build_tx(factory: Callable, static: tuple, traced: dict, shapes: Sequence[Sequence[int]],
             names: Sequence[str], layout: Layout, position: Optional[tuple] = None
             ) -> optax.GradientTransformationExtraArgs:
  """A unit's transformation: ``factory`` called with its static and traced arguments (and the
  layout argument, per parameter, when one is named). ``position`` (the unit's
  :attr:`Unit.position`) goes to a factory that takes ``rounding_index`` and was not given one
  (TurboAdam's faithful codec hashes each tensor's torch ``(group, parameter)`` indices into
  its rounding streams: a unit's one-leaf tree would otherwise be parameter 0 of group 0)."""
  kwargs = dict(static)
  kwargs.update(traced)
  if position is not None and "rounding_index" not in kwargs and _takes(factory,
                                                                         "rounding_index"):
    kwargs["rounding_index"] = tuple(position)
  if layout.kwarg is not None and not (layout.auto and (layout.kwarg in kwargs or not _takes(
      factory, layout.kwarg))):
    kwargs[layout.kwarg] = nest(names, [layout.of(s, n) for s, n in zip(shapes, names)])
  if not layout.auto:
    return optax.with_extra_args_support(factory(**kwargs))
  with warnings.catch_warnings():
    # the layout the bridge passes on its own may go unused (OAdamW with muon="off", AdamW
    # without the factored codec): no "has no effect" warning for what the user never passed
    warnings.filterwarnings("ignore", message=rf"`{layout.kwarg}`=.* has no effect")
    return optax.with_extra_args_support(factory(**kwargs))


def _takes(factory: Callable, name: str) -> bool:
  """Whether ``factory`` accepts the keyword ``name``."""
  from torch_bridge import _hyperparams as H  # pylint: disable=g-import-not-at-top
  accepted = H.factory_spec(factory).accepted
  return accepted is not None and name in accepted


def check_update_args(tx: Any) -> None:
  """``TypeError`` when ``tx.update`` needs keyword arguments a torch loop cannot give."""
  try:
    sig = inspect.signature(getattr(tx, "update", lambda *a, **k: None))
  except (TypeError, ValueError):
    return
  missing = [n for n, p in sig.parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]
  if missing:
    raise TypeError(f"torch_bridge: this transform's update needs {missing}, which a torch "
                    "training loop cannot provide (optimizer.step() passes only gradients "
                    "and parameters).")


def describe_units(units: Sequence[Unit], params: Sequence[Any],
                   hyper_of: Callable[[int], tuple], layout: Layout) -> Any:
  """:func:`stax.describe` of every unit's transform over its parameters' shapes, as one
  :class:`stax.Description` whose paths are the parameters' dotted names. ``hyper_of(group)``
  gives ``(factory, traced, static)``; nothing is stepped or allocated."""
  import stax  # pylint: disable=g-import-not-at-top
  from stax.describe import Description  # pylint: disable=g-import-not-at-top
  rows, shared = [], 0
  for u in units:
    factory, traced, static = hyper_of(u.group)
    plain = {k: (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v))
             for k, v in traced.items()}  # concrete values, outside of any trace
    shapes = [tuple(params[i].shape) for i in u.indices]
    tx = build_tx(factory, static, plain, shapes, u.names, layout)
    tree = nest(u.names, [jax.ShapeDtypeStruct(s, jnp.dtype(str(params[i].dtype)[6:]))
                          for s, i in zip(shapes, u.indices)])
    d = stax.describe(tx, tree)
    shared += d.shared_bytes
    rows += [d.by_path[path_of(name)]._replace(path=str(name)) for name in u.names]
  out = Description(rows)
  out.shared_bytes = shared
  return out
