"""Which leaf gets which transform: normalised paths, module order, label functions.

Paths
  A leaf's path is normalised once, here: JAX key entries become strings, and the trailing
  attribute key ``.value`` of a Flax NNX ``Variable`` (present when a ``State`` of Variables is
  flattened, absent for pure arrays) is dropped; a module *named* ``value`` (attention's value
  projection) keeps its name. The
  *module* of a leaf is its parent path (``("layers", "3", "kernel")`` → ``"layers/3"``).

Module order
  A JAX pytree's leaf order is sorted by key (``Dense_10`` before ``Dense_2``, ``head`` before
  ``layers``), so it never tells which layer comes last. Rules that need "the last N modules" use,
  in order of preference:

  1. :func:`execution_order` — modules ranked by the first use of their leaves in the traced jaxpr
     of the forward pass (equations inside ``pjit``/``scan``/``cond``/... are walked in program
     order; pure reshapes/casts/copies of a parameter are followed, not counted as uses);
  2. an explicit list of module names the user passes;
  3. :func:`natural_order` — a natural sort of the module names (digit runs compared as numbers).
     This is only a fallback: it gets ``Dense_2 < Dense_10`` right but cannot know that an NNX
     ``head`` attribute comes after ``layers``.

Tied parameters
  A JAX leaf has exactly one path, so a tied array (an embedding matrix reused as the output
  projection, ``embed.attend``) belongs to exactly one module: the module whose path stores it.
  Where that module sits in the order depends on ``tied``: ``"first_use"`` (the default of
  :func:`execution_order`, and the seed STAC's rule) ranks it at its first use, the input, so a
  tied LM head lands in the sign trunk; ``"last_use"`` ranks every module by the *last* use of its
  leaves, which puts a tied embedding/head at the output end (for untied layers both rules agree).
  :func:`stax.stac` uses ``"last_use"`` so the AdamW cap covers a tied output head.

Example:
  >>> import jax.numpy as jnp, stax
  >>> params = {"Dense_2": {"kernel": jnp.ones((2, 2))}, "Dense_10": {"kernel": jnp.ones((2, 2))}}
  >>> stax.natural_order(params)
  ['Dense_2', 'Dense_10']
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from stax import _validation as V

__all__ = [
    "normalize_path",
    "path_name",
    "module_name",
    "leaf_names",
    "natural_key",
    "natural_order",
    "execution_order",
    "leaf_use_positions",
    "module_ranks",
    "last_n_modules_labels",
    "matrix_labels",
    "is_embedding_path",
    "is_output_head_path",
]

_NNX_VALUE_KEYS = ("value", "raw_value")


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def normalize_path(path: Any) -> tuple[str, ...]:
  """A leaf path as a tuple of strings, without the ``.value`` of a Flax NNX ``Variable``.

  Accepts a JAX key path (tuple of ``DictKey``/``GetAttrKey``/``SequenceKey``...), a tuple of
  strings, or a ``"/"``-separated string. Only a trailing *attribute* key ``value`` (an NNX
  ``Variable``'s, ``GetAttrKey("value")``: present when an ``nnx.State`` of Variables is
  flattened, absent for its pure arrays) is dropped; a module or leaf whose *name* is ``value``
  (``nnx.MultiHeadAttention``'s ``value`` projection, a dict key ``"value"``) is kept, and
  strings and tuples of strings are taken as they are.
  """
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  keys = tuple(path)
  if (keys and isinstance(keys[-1], jax.tree_util.GetAttrKey)
      and keys[-1].name in _NNX_VALUE_KEYS):
    keys = keys[:-1]
  return tuple(_key_str(k) for k in keys)


def path_name(path: Any) -> str:
  """``"a/b/c"`` for a (normalised or raw) path."""
  return "/".join(normalize_path(path))


def module_name(path: Any) -> str:
  """The module of a leaf: its parent path as ``"a/b"`` (``"<root>"`` for a top-level leaf)."""
  parts = normalize_path(path)
  return "/".join(parts[:-1]) if len(parts) > 1 else "<root>"


def leaf_names(tree: Any) -> list[str]:
  """Normalised path names of the leaves of ``tree`` in flatten order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def natural_key(name: str) -> tuple:
  """Sort key comparing digit runs as numbers: ``"Dense_2" < "Dense_10"``."""
  return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
               for t in re.split(r"(\d+)", name) if t)


def natural_order(params: Any) -> list[str]:
  """Module names of ``params`` in natural-sort order (the documented fallback order)."""
  mods = {module_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  return sorted(mods, key=natural_key)


# Primitives that only re-view or cast a value: a parameter passing through them is followed,
# not counted as a use.
_TRANSPARENT = {"convert_element_type", "copy", "copy_p", "reshape", "squeeze", "expand_dims",
                "device_put", "sharding_constraint", "optimization_barrier", "reduce_precision"}


def _sub_jaxprs(eqn):
  """(jaxpr, inner_invars_for_outer_invars) pairs for an equation's sub-computations."""
  out = []
  name = eqn.primitive.name
  params = eqn.params
  if name == "cond":
    for br in params["branches"]:
      out.append((br.jaxpr, list(zip(eqn.invars[1:], br.jaxpr.invars))))
    return out
  if name == "while":
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, carry = eqn.invars[:cn], eqn.invars[cn:cn + bn], eqn.invars[cn + bn:]
    cj, bj = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
    out.append((cj, list(zip(list(cconsts) + list(carry), cj.invars))))
    out.append((bj, list(zip(list(bconsts) + list(carry), bj.invars))))
    return out
  for v in params.values():
    vs = v if isinstance(v, (tuple, list)) else (v,)
    for item in vs:
      j = getattr(item, "jaxpr", None)
      if j is None and hasattr(item, "eqns"):
        j = item
      elif j is not None and not hasattr(j, "eqns"):
        j = getattr(j, "jaxpr", None)
      if j is not None and hasattr(j, "eqns") and len(j.invars) == len(eqn.invars):
        out.append((j, list(zip(eqn.invars, j.invars))))
  return out


def leaf_use_positions(fn: Callable[..., Any], params: Any, *args: Any,
                       **kwargs: Any) -> list[tuple[float, float]]:
  """(first, last) use position of every leaf of ``params`` in the traced ``fn(params, *args)``.

  Positions count equations in program order (sub-jaxprs walked in place). A leaf that is never
  used gets ``(inf, -inf)``.
  """
  leaves, treedef = jax.tree.flatten(params)

  def flat_fn(*flat):
    return fn(jax.tree.unflatten(treedef, list(flat)), *args, **kwargs)

  closed = jax.make_jaxpr(flat_fn)(*leaves)
  first = [math.inf] * len(leaves)
  last = [-math.inf] * len(leaves)
  counter = [0]

  def is_var(v):
    return not hasattr(v, "val")  # Literals carry .val

  def walk(jaxpr, alias: dict):
    for eqn in jaxpr.eqns:
      counter[0] += 1
      pos = counter[0]
      used = [alias[v] for v in eqn.invars if is_var(v) and v in alias]
      if not used:
        continue
      if eqn.primitive.name in _TRANSPARENT:
        for vin, vout in zip(eqn.invars, eqn.outvars):
          if is_var(vin) and vin in alias:
            alias[vout] = alias[vin]
        continue
      subs = _sub_jaxprs(eqn)
      if subs:
        for sub, pairs in subs:
          inner = {iv: alias[ov] for ov, iv in pairs if is_var(ov) and ov in alias}
          walk(sub, inner)
        continue
      for idx in used:
        first[idx] = min(first[idx], pos)
        last[idx] = max(last[idx], pos)

  walk(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars)})
  return list(zip(first, last))


def execution_order(fn: Callable[..., Any], params: Any, *args: Any,
                    tied: str = "first_use", **kwargs: Any) -> list[str]:
  """Module names of ``params`` in the order the forward pass ``fn(params, *args)`` uses them.

  Args:
    fn: the forward pass, ``fn(params, *args, **kwargs)``; it is traced, not run.
    params: the parameter pytree (Flax Linen ``params`` dict, ``nnx.state(model, nnx.Param)``...).
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
    tied: ``"first_use"`` (default) ranks a module at the first use of any of its leaves;
      ``"last_use"`` at the last use (puts a tied embedding/output head at the output end).
    **kwargs: passed to ``fn``.

  Returns:
    Module names (``"a/b"``), first to last. Modules whose leaves are never used come first,
    in natural order (they cannot be "the last layer").
  """
  V.check_choice("tied", tied, ("first_use", "last_use"))
  pos = leaf_use_positions(fn, params, *args, **kwargs)
  names = [module_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  rank: dict[str, float] = {}
  for m, (f, l) in zip(names, pos):
    if tied == "first_use":
      rank[m] = min(rank.get(m, math.inf), f)
    else:
      rank[m] = max(rank.get(m, -math.inf), l)
  unused = sorted([m for m, r in rank.items() if not np.isfinite(r)], key=natural_key)
  used = sorted([m for m, r in rank.items() if np.isfinite(r)], key=lambda m: rank[m])
  return unused + used


def module_ranks(params: Any, module_order: Sequence[str] | None = None) -> dict[str, int]:
  """Rank of every module of ``params`` (0 = first). ``module_order=None`` → natural order.

  Raises:
    ValueError: if ``module_order`` misses a module of ``params`` or names one twice.
  """
  present = natural_order(params)
  if module_order is None:
    order = present
  else:
    order = [path_name(m) if not isinstance(m, str) else "/".join(normalize_path(m)) or "<root>"
             for m in module_order]
    if len(set(order)) != len(order):
      raise ValueError("`module_order` names a module twice.")
    missing = sorted(set(present) - set(order), key=natural_key)
    if missing:
      raise ValueError(
          f"`module_order` does not rank these modules of the parameters: {missing}. Pass the "
          "full order, e.g. stax.execution_order(apply_fn, params, example_input).")
    order = [m for m in order if m in set(present)]
  return {m: i for i, m in enumerate(order)}


def last_n_modules_labels(params: Any, n: int, module_order: Sequence[str] | None = None,
                          *, last_label: str = "cap", rest_label: str = "trunk") -> Any:
  """Labels for ``optax.partition``: ``last_label`` for the leaves of the last ``n`` modules.

  Args:
    params: parameter pytree (paths normalised, NNX ``value`` suffix ignored).
    n: number of modules at the end (>= 0; >= the module count labels everything).
    module_order: module names first to last (see :func:`execution_order`); ``None`` uses
      :func:`natural_order` (fallback).
  """
  V.check_int("n", n, low=0)
  ranks = module_ranks(params, module_order)
  cut = len(ranks) - n

  def label(path, _):
    return last_label if ranks[module_name(path)] >= cut else rest_label

  return jax.tree_util.tree_map_with_path(label, params)


_EMBED_RE = re.compile(r"(^|[/_.])(embed|embedding|embeddings|wte|wpe|tok_embeddings|token_embedding)"
                       r"([/_.]|$)", re.IGNORECASE)
# A path component that names an output head: ``head``, ``lm_head``, ``cls_head``, ``head2``,
# ``classifier``, ``logits``, ``unembed`` (a ``prefix_`` allowed). A component merely containing
# ``_head_`` is a hidden layer (``multi_head_attention``, ``head_proj``); until 2026-12-07 the
# rule matched ``head`` between any underscores, and a ``multi_head_attention`` block's
# projections were kept out of Muon.
_HEAD_RE = re.compile(r"(?:[a-z0-9]+_)*(?:head|classifier|logits|unembed)\d*", re.IGNORECASE)
# ``output`` is a head only at the top of the tree (``output/kernel``, Llama's ``output.weight``):
# nested, it is a hidden layer (BERT's ``attention.output.dense``, ``layer.N.output.dense``).
_TOP_OUTPUT_RE = re.compile(r"^output([/_.0-9]|$)", re.IGNORECASE)
#: Path components that wrappers insert and that name no module of the model: torch.compile's
#: ``_orig_mod``, FSDP1's ``_fsdp_wrapped_module``, activation checkpointing's
#: ``_checkpoint_wrapped_module``, Lightning's ``_forward_module``, and a leading ``module``
#: (``DistributedDataParallel``, ``DataParallel``). The name rules read the path without them, so
#: a wrapped model is grouped as the model (``torch.compile(model)``'s top-level ``output`` head
#: had been a hidden matrix).
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module",
                      "_forward_module")


def _components(name: str) -> list[str]:
  """``name``'s components (split at ``/`` and ``.``) without the wrappers' (see
  :data:`WRAPPER_COMPONENTS`)."""
  parts = [p for p in re.split(r"[/.]", name) if p and p not in WRAPPER_COMPONENTS]
  if len(parts) > 1 and parts[0] == "module":
    parts = parts[1:]
  return parts


def is_embedding_path(name: str) -> bool:
  """Default predicate: the path names an embedding table (``embed``, ``wte``, ...)."""
  return bool(_EMBED_RE.search("/".join(_components(name))))


def is_output_head_path(name: str) -> bool:
  """Default predicate: the path names an output head (a component ``head``, ``lm_head``,
  ``cls_head``, ``classifier``, ``logits`` or ``unembed`` anywhere; ``output`` only as the
  top-level module, since BERT's nested ``attention/output/dense`` and ``output/dense`` are
  hidden layers). Wrappers' components (``_orig_mod``, a leading ``module``, ...) are skipped."""
  parts = _components(name)
  return (any(_HEAD_RE.fullmatch(p) for p in parts)
          or bool(_TOP_OUTPUT_RE.search("/".join(parts))))


def matrix_labels(params: Any, *, exclude: Iterable[Callable[[str], bool]] = (
    is_embedding_path, is_output_head_path), min_dim: int = 2, matrix_label: str = "matrix",
                  other_label: str = "other") -> Any:
  """Labels matrices (ndim >= 2, every dim of the last two >= ``min_dim``) vs everything else.

  Args:
    params: parameter pytree.
    exclude: predicates on the normalised path name; a matching leaf is ``other_label``
      (default: embeddings and output heads, as Muon recommends).
    min_dim: smallest allowed size of each of the last two axes (default 2).
  """
  exclude = tuple(exclude)
  V.check_int("min_dim", min_dim, low=1)

  def label(path, x):
    name = path_name(path)
    shape = np.shape(x)
    if len(shape) < 2 or min(shape[-2:]) < min_dim:
      return other_label
    if any(f(name) for f in exclude):
      return other_label
    return matrix_label

  return jax.tree_util.tree_map_with_path(label, params)
