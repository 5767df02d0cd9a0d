"""Pytree helpers shared by the transforms."""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["conform"]


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
