"""Pytree helpers shared by the transforms."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import jax
import numpy as np

__all__ = ["conform", "unflatten_state", "flatten_state", "unwrap_variables"]


def _child(x: Any, key: Any) -> Any:
  name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
  if hasattr(x, "keys"):
    return x[name]
  if hasattr(key, "name"):
    return getattr(x, name)
  return x[name]


def conform(x: Any, like: Any) -> Any:
  """``x`` rebuilt with the containers of ``like`` (leaves kept; children matched by name).

  A framework may hand optimizer state back in other containers than the ones ``init`` built:
  Flax NNX's ``nnx.Optimizer`` keeps each params-shaped state leaf in a ``Variable`` and, after
  an update, stores the new value as an ``nnx.State`` mapping, so a codec's ``NamedTuple``
  nested in a params-shaped tree comes back as a mapping keyed by field name (in sorted order,
  not field order); an orbax restore without a target gives dicts and lists. ``like`` is the
  structure ``init`` builds (e.g. ``jax.eval_shape(tx.init, params)``); where the structures
  already agree, ``x`` is returned as it is.
  """
  if jax.tree.structure(x) == jax.tree.structure(like):
    return x
  pairs, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda n: n is not like)
  if not pairs or (len(pairs) == 1 and not pairs[0][0]):
    return x
  return jax.tree.unflatten(treedef, [conform(_child(x, path[0]), c) for path, c in pairs])


def _variable_type() -> Any:
  """Flax NNX's ``Variable`` class when Flax NNX is in use (imported), else ``None``."""
  mod = sys.modules.get("flax.nnx")
  return getattr(mod, "Variable", None) if mod is not None else None


def unwrap_variables(tree: Any) -> Any:
  """``tree`` with every Flax NNX ``Variable`` replaced by its value (``nnx.Optimizer``'s
  ``opt_state`` keeps each state array in an ``nnx.OptArray``; an ``nnx.State`` of parameters
  holds ``Param`` variables): what the state readers (:func:`stax.scao_diagnostics`,
  :func:`stax.stam_beta1`) read. ``tree`` itself where Flax NNX is not in use."""
  var = _variable_type()
  if var is None:
    return tree
  return jax.tree.map(lambda x: x.get_value() if isinstance(x, var) else x, tree,
                      is_leaf=lambda x: isinstance(x, var))


def unflatten_state(like: Any, values: list, is_leaf: Optional[Callable[[Any], bool]] = None
                    ) -> Any:
  """``values`` (one per leaf of ``like``, flatten order) in ``like``'s structure: a per-leaf
  state tree built from the parameters (or gradients) ``like``.

  The same as ``jax.tree.unflatten(jax.tree.structure(like, is_leaf), values)``, except that a
  Flax NNX ``Variable`` of ``like`` (an ``nnx.State`` of ``Param`` variables) wraps its value only where
  the value is an array of the Variable's own shape: a state leaf of another shape (a per-tensor
  mean ``()``, a codec's ``NamedTuple`` of codes and scales, a factored moment's row and column
  means) is kept bare. Wrapped, it carried the parameter's metadata, its sharding annotation
  included, and ``nnx.Optimizer`` under a mesh applied ``P(None, 'model')`` to a 0-d or 1-d
  array (``ValueError``), as it does for ``optax.adafactor``'s factored moments.
  """
  var = _variable_type()
  if var is None:
    return jax.tree.unflatten(jax.tree.structure(like, is_leaf=is_leaf), values)
  pick = lambda x: isinstance(x, var) or (is_leaf is not None and is_leaf(x))
  nodes, outer = jax.tree.flatten(like, is_leaf=pick)
  out, rest = [], iter(values)
  for node in nodes:
    if not isinstance(node, var):
      out.append(next(rest))
      continue
    inner = jax.tree.structure(node, is_leaf=is_leaf)
    if inner.num_leaves != 1:   # a Variable holding no leaf (optax's MaskedNode): as it is
      out.append(jax.tree.unflatten(inner, [next(rest) for _ in range(inner.num_leaves)]))
      continue
    (own,), v = jax.tree.leaves(node, is_leaf=is_leaf), next(rest)
    same = (hasattr(v, "shape") and not isinstance(v, tuple) and own is not None
            and tuple(v.shape) == tuple(np.shape(own)))
    out.append(jax.tree.unflatten(inner, [v]) if same else v)
  return jax.tree.unflatten(outer, out)


def flatten_state(treedef: Any, tree: Any) -> list:
  """The per-leaf values of a state ``tree`` built by :func:`unflatten_state` over a tree of
  structure ``treedef`` (the gradients' or parameters'), in flatten order.

  ``treedef.flatten_up_to(tree)``, except where ``treedef`` has a Flax NNX ``Variable`` (an
  ``nnx.State`` of ``Param``\\ s handed to ``tx.update`` as it is, the functional NNX idiom
  ``nnx.split(model, nnx.Param, ...)``) and ``tree`` the bare value :func:`unflatten_state`
  kept outside it (a per-tensor mean, a codec's codes): that value is the leaf's. (Flattened
  against the Variables, those states raised "Custom node type mismatch" at the first update.)
  ``ValueError`` where the structures really differ.
  """
  try:
    return treedef.flatten_up_to(tree)
  except ValueError:
    var = _variable_type()
    if var is None:
      raise
  like = treedef.unflatten(list(range(treedef.num_leaves)))
  nodes, outer = jax.tree.flatten(like, is_leaf=lambda x: isinstance(x, var))
  out = []
  for node, sub in zip(nodes, outer.flatten_up_to(tree)):
    inner = jax.tree.structure(node)
    if isinstance(node, var) and not isinstance(sub, var) and inner.num_leaves == 1:
      out.append(sub)      # kept bare by unflatten_state
    elif isinstance(node, var):
      out.extend(inner.flatten_up_to(sub))
    else:
      out.append(sub)
  return out
