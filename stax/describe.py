r"""Which parameter gets what: :func:`describe` lists every leaf's rule, matrix view and state.

STAC, OAdamW, SCAO and TurboAdam treat leaves differently (sign descent or AdamW, Muon with a
matrix view or StableAdamW, Kronecker preconditioning or Adam alone, a compressed codec or a
float32 fallback). ``stax.describe(tx, params)`` says, for every parameter path:

* ``rule``: ``"sign"`` (STAC's trunk), ``"adam"`` (an Adam-family element-wise update: AdamW,
  StableAdamW, STAM, TurboAdam), ``"muon"`` (Newton–Schulz of the momentum), ``"ns+adam"``
  (OAdamW ``muon="gradient"``: Newton–Schulz of the gradient into Adam's moments) or ``"kron"``
  (SCAO's curvature preconditioning under Adam);
* ``matrix``: the ``(batch, m, n)`` matrix view a matrix rule uses, or the matrices an Adam
  leaf's factored second moment (TurboAdam's default ``v``) is factored over, else ``None``;
* ``storage``: what the state keeps for the leaf (``"m float32, v float32"``,
  ``"m BlockSigned 4.5b, v LogQuant 4.25b"``, ``"momentum float32"``, ``"kron 2×(64×8)"`` ...);
* ``state_bytes`` and ``bits_per_param``: the exact bytes of the state arrays that belong to
  the leaf (state shared by all leaves, such as step counters and keys, is in
  :attr:`Description.shared_bytes`).

The state side is read from ``jax.eval_shape(tx.init, params)`` (nothing is allocated), so it is
exact for any transformation. The rule side comes from the stax factory that built ``tx``; for
a transformation stax did not build (``optax.chain(..., stax.adamw(...))``, an
``inject_hyperparams`` wrapper), the rule is inferred from the state (``"adam"`` where Adam
moments are kept, ``"kron"`` where SCAO factors are, ``"stateless"`` where nothing is, ``"?"``
otherwise) and ``matrix`` is ``None``. ``torch_bridge`` optimizers have ``describe()`` with torch
parameter names.

Example:
  >>> import jax.numpy as jnp, stax
  >>> params = {"embed": {"embedding": jnp.zeros((64, 16))},
  ...           "attn": {"query": {"kernel": jnp.zeros((16, 4, 8)), "bias": jnp.zeros((4, 8))}}}
  >>> d = stax.describe(stax.oadamw(1e-3), params)
  >>> row = d.by_path["attn/query/kernel"]
  >>> row.rule, row.matrix
  ('muon', (1, 16, 32))
  >>> d.by_path["attn/query/bias"].rule
  'adam'
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import optax

from stax import partition
from stax._trees import flatten_state

__all__ = ["describe", "Description", "LeafReport", "register_plan"]

#: tx.init → plan(params) -> list of (rule, matrix) in flatten order; filled by the factories.
_PLANS: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


class LeafReport(NamedTuple):
  """One parameter leaf in a :class:`Description` (see the module docstring)."""

  path: str
  shape: tuple
  dtype: str
  rule: str
  matrix: Optional[tuple]
  storage: str
  state_bytes: int
  bits_per_param: float


class Description(tuple):
  """A tuple of :class:`LeafReport` rows (flatten order); ``str()`` prints the table."""

  shared_bytes: int = 0

  @property
  def by_path(self) -> dict:
    """``{path: LeafReport}``."""
    return {r.path: r for r in self}

  @property
  def total_state_bytes(self) -> int:
    """Bytes of the whole state: every leaf's plus the shared ones."""
    return sum(r.state_bytes for r in self) + self.shared_bytes

  def to_dicts(self) -> list[dict]:
    """The rows as plain dicts (for JSON)."""
    return [r._asdict() for r in self]

  def __str__(self) -> str:
    head = ("path", "shape", "dtype", "rule", "matrix", "storage", "bytes", "bits/param")
    rows = [head] + [(r.path, "×".join(map(str, r.shape)) or "scalar", r.dtype, r.rule,
                      "-" if r.matrix is None else "×".join(map(str, r.matrix)), r.storage,
                      str(r.state_bytes), f"{r.bits_per_param:.2f}") for r in self]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"shared state (counters, keys): {self.shared_bytes} bytes; "
                 f"total {self.total_state_bytes} bytes")
    return "\n".join(lines)

  __repr__ = __str__


def register_plan(tx: Any, plan: Callable[[Any], list]) -> Any:
  """Records how the factory that built ``tx`` treats each leaf; returns ``tx``.

  ``plan(params)`` returns one ``(rule, matrix)`` pair per leaf of ``params`` in flatten order
  (``matrix`` a ``(batch, m, n)`` tuple or ``None``). Construction-time metadata only: the
  transformation and its state are unchanged.
  """
  _PLANS[tx.init] = plan
  return tx


# --------------------------------------------------------------------------- state walk
def _nbytes(tree: Any) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      dt = np.dtype(np.uint32) if str(x.dtype).startswith("key") else np.dtype(x.dtype)
      total += int(np.prod(x.shape, dtype=np.int64)) * dt.itemsize
  return total


_FIELD_LABELS = {"mu": "m", "nu": "v", "trace": "momentum", "compensation": "kahan",
                 "b1_prod": "b1-product", "left": "ns-cache"}


def _encoding(x: Any, numel: int) -> str:
  if hasattr(x, "dtype") and hasattr(x, "shape"):
    if str(x.dtype).startswith("key"):
      return "key"
    size = int(np.prod(x.shape, dtype=np.int64))
    # a per-tensor statistic (STAMLite's v), or one per stacked layer
    extent = "" if size == numel else " per tensor" if size == 1 else f" ×{size}"
    return str(np.dtype(x.dtype)) + extent
  name = type(x).__name__
  for suffix in ("State", "M"):
    if name.endswith(suffix) and len(name) > len(suffix):
      name = name[:-len(suffix)]
  bits = 8.0 * _nbytes(x) / max(numel, 1)
  return f"{name} {bits:.3g}b"


def _kron_label(st: Any) -> tuple[str, Optional[tuple]]:
  shapes = {f: tuple(getattr(st, f).shape) for f in getattr(st, "_fields", ())
            if hasattr(getattr(st, f), "shape")}
  if "U_l" in shapes and "U_r" in shapes:
    # one matrix's factors (m×K, n×K), or stacked matrices' (L×m×K, L×n×K)
    *batch, m, k = shapes["U_l"]
    n, kr = shapes["U_r"][-2:]
    layers = int(np.prod(batch, dtype=np.int64))
    label = f"kron {m}×{k} + {n}×{kr}"
    return (label if not batch else f"{layers}× {label}"), (layers, m, n)
  if "blocks" in getattr(st, "_fields", ()):
    return f"kron grid of {len(st.blocks)} blocks", None
  if "ema" in shapes:
    return "diag ema", None
  return type(st).__name__, None


def _kron_leaves(node, numels) -> Optional[list]:
  """The per-leaf curvature states of a SCAO state, one per parameter leaf, else ``None``."""
  from stax.transforms import kron  # pylint: disable=g-import-not-at-top
  if not isinstance(node, kron.ScaleByKronState):
    return None
  states = kron.leaf_states(node)
  return states if len(states) == len(numels) else None


def _factored_view(st: Any, numel: int) -> Optional[tuple]:
  """The ``(batch, m, n)`` matrices a factored second moment
  (:class:`stax.codecs.factored.FactoredState`: row means ``batch·m``, column means
  ``batch·n`` entries of a ``batch·m·n`` leaf) is factored over, else ``None``."""
  from stax.codecs.factored import FactoredState  # pylint: disable=g-import-not-at-top
  if not isinstance(st, FactoredState) or not numel:
    return None
  r, c = (int(np.prod(np.shape(x), dtype=np.int64)) for x in (st.rows, st.cols))
  batch = r * c // numel
  if not batch or r * c != batch * numel:
    return None
  return (batch, r // batch, c // batch)


def _walk(node, field, treedef, numels, per_leaf, kron, shared):
  """Adds each state subtree's bytes to the leaf it belongs to (or to ``shared``)."""
  if node is None:
    return
  kron_leaves = _kron_leaves(node, numels)
  if kron_leaves is not None:
    for i, st in enumerate(kron_leaves):
      b = _nbytes(st)
      if b:
        label, mat = _kron_label(st)
        per_leaf[i][0] += b
        per_leaf[i][1].append(label)
        kron[i] = mat if mat is not None else kron[i] or ()
    shared[0] += _nbytes(node._replace(leaves=()))
    return
  if hasattr(node, "shape") and hasattr(node, "dtype"):
    shared[0] += _nbytes(node)
    return
  try:
    subs = flatten_state(treedef, node)   # (an nnx.State's Variables may hold some leaves)
  except (ValueError, TypeError):
    subs = None
  if subs is not None and treedef.num_leaves == len(numels) and (
      treedef.num_nodes > 1 or hasattr(node, "shape")):
    for i, sub in enumerate(subs):
      b = _nbytes(sub)
      if b:
        per_leaf[i][0] += b
        per_leaf[i][1].append(f"{_FIELD_LABELS.get(field, field)} {_encoding(sub, numels[i])}")
        view = _factored_view(sub, numels[i])
        if view is not None and len(per_leaf[i]) == 2:
          per_leaf[i].append(view)
    return
  if isinstance(node, tuple) and hasattr(node, "_fields"):
    for f in node._fields:
      _walk(getattr(node, f), f, treedef, numels, per_leaf, kron, shared)
    return
  children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda n: n is not node)[0]
  for path, child in children:
    key = path[0] if path else None
    name = str(getattr(key, "key", getattr(key, "name", field))) if key is not None else field
    _walk(child, name if isinstance(node, dict) else field, treedef, numels, per_leaf, kron,
          shared)


def _infer_rule(labels: list[str], kron_mat) -> str:
  if kron_mat is not None:
    return "kron"
  if any(l.startswith("momentum") for l in labels):
    return "momentum"
  if any(l.startswith(("m ", "v ")) for l in labels):
    return "adam"
  return "stateless" if not labels else "?"


def describe(tx: optax.GradientTransformation, params: Any) -> Description:
  """Every parameter leaf of ``params``: its rule, matrix view and state (module docstring).

  Args:
    tx: a transformation (a stax optimizer gives rules and matrix views; any other one gives
      the state side and an inferred rule).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``; Flax NNX ``State`` works).

  Returns:
    A :class:`Description`.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  shapes = [tuple(np.shape(x)) for _, x in flat]
  numels = [int(np.prod(s, dtype=np.int64)) for s in shapes]
  state = jax.eval_shape(tx.init, params)
  per_leaf = [[0, []] for _ in flat]
  kron: list = [None] * len(flat)
  shared = [0]
  _walk(state, "", treedef, numels, per_leaf, kron, shared)
  plan = _PLANS.get(tx.init)
  planned = plan(params) if plan is not None else None
  rows = []
  for i, ((path, x), shape, numel) in enumerate(zip(flat, shapes, numels)):
    b, labels = per_leaf[i][:2]
    if planned is not None:
      rule, matrix = planned[i]
      if rule == "adam" and kron[i] is not None:
        rule, matrix = "kron", kron[i] or None
    else:
      rule, matrix = _infer_rule(labels, kron[i]), (kron[i] or None)
    if matrix is None and len(per_leaf[i]) > 2:  # an Adam leaf's factored v: its matrices
      matrix = per_leaf[i][2]
    rows.append(LeafReport(partition.path_name(path), shape, str(np.dtype(x.dtype)), rule,
                           matrix, ", ".join(labels) or "none", b,
                           8.0 * b / numel if numel else 0.0))
  out = Description(rows)
  out.shared_bytes = shared[0]
  return out


def uniform_plan(rule: str) -> Callable[[Any], list]:
  """A plan giving every leaf ``rule`` and no matrix view."""
  return lambda params: [(rule, None)] * len(jax.tree.leaves(params))


def labels_plan(label_fn: Callable[[Any], Any], rules: dict,
                dims: Any = None, matrix_rules: tuple = ()) -> Callable[[Any], list]:
  """A plan from a label function: ``rules[label]`` per leaf; leaves whose rule is in
  ``matrix_rules`` get their matrix view under ``dims``."""

  def plan(params):
    from stax import layout  # pylint: disable=g-import-not-at-top
    leaves, treedef = jax.tree.flatten(params)
    labels = treedef.flatten_up_to(label_fn(params))
    views = layout.resolve_tree(dims, params)
    out = []
    for x, lab, d in zip(leaves, labels, views):
      rule = rules.get(lab, str(lab))
      matrix = (tuple(layout.matrix_shape(np.shape(x), d))
                if rule in matrix_rules and d is not None else None)
      out.append((rule, matrix))
    return out

  return plan

