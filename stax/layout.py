"""Matrix views of tensors: the one layout type of stax, and where a layout is resolved.

Every transform that sees a tensor as a matrix (Muon/Newton–Schulz in OAdamW, SCAO's Kronecker
factors, ``stax.describe``, the torch bridge) takes **dimension numbers**,
:class:`MatrixDimensionNumbers`: the ``reduction_axis`` axes (fan-in) form the rows, the
``output_axis`` axes (fan-out) the columns, every other axis is a batch axis. It *is* optax's
``optax.contrib.MuonDimensionNumbers`` (a subclass, accepted by ``optax.contrib.muon``) with one
more field, ``output_groups``, for fused projections (torch's ``in_proj_weight``).

* a Flax ``Dense`` kernel ``(in, out)``: ``MatrixDimensionNumbers(0, 1)``;
* a torch weight ``(out, in)``: ``MatrixDimensionNumbers(1, 0)``;
* a Flax conv kernel ``(kh, kw, in, out)``: ``MatrixDimensionNumbers((0, 1, 2), 3)``
  (:func:`conv_dimension_numbers`);
* stacked layers ``(L, in, out)``: ``MatrixDimensionNumbers(1, 2)``, one matrix per layer.

A ``dimension_numbers=`` argument anywhere in stax accepts the same forms, resolved by
:func:`resolve_tree` (whole tree) / :func:`resolve_dimension_numbers` (one leaf):

* ``None``: :func:`default_dimension_numbers` per leaf (attention, conv and stacked layouts
  recognised; biases and norm scales are never matrices);
* one :class:`MatrixDimensionNumbers` (or optax's type) for every leaf;
* an ``int`` ``k``: shorthand for "rows = axes before ``k``, columns = the rest" (SCAO's split);
* a callable ``(path_name, leaf) -> dims | int | None`` (``None``: not a matrix);
* a callable ``params -> tree of dims`` (optax's form; one argument), or such a tree itself.

Example:
  >>> import stax
  >>> stax.layout.matrix_shape((3, 3, 8, 16), stax.conv_dimension_numbers(4))
  (1, 72, 16)
  >>> import optax
  >>> isinstance(stax.MatrixDimensionNumbers(1, 0), optax.contrib.MuonDimensionNumbers)
  True
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import jax
import numpy as np
from optax.contrib import MuonDimensionNumbers

from stax import _validation as V
from stax import partition

__all__ = [
    "MatrixDimensionNumbers", "conv_dimension_numbers", "default_dimension_numbers",
    "resolve_dimension_numbers", "resolve_tree", "per_leaf", "matrix_shape", "is_dimension_numbers",
    "split_dimension_numbers", "check_dimension_numbers", "ATTENTION_IN_PROJECTIONS", "ATTENTION_OUT_PROJECTIONS",
    "NEVER_MATRICES", "batch_axes", "stacked_axes",
]


class MatrixDimensionNumbers(MuonDimensionNumbers):
  """Which axes of a tensor are the matrix rows (fan-in) and columns (fan-out).

  Attributes:
    reduction_axis: axis or axes contracted with the layer input (fan-in), default 0.
    output_axis: axis or axes of the layer output (fan-out), default 1.
    output_groups: number of separate matrices fused along the (single) output axis, >= 1
      (default 1). torch's ``nn.MultiheadAttention.in_proj_weight`` ``(3E, E)`` holds q, k and
      v: ``MatrixDimensionNumbers(1, 0, output_groups=3)`` is three ``E×E`` matrices, not one
      ``3E×E``.

  All other axes are batch axes; negative axes count from the end. An instance of optax's
  ``MuonDimensionNumbers`` (so ``optax.contrib.muon`` takes it), immutable, hashable, and a
  static pytree node (tree operations keep it whole, ``output_groups`` included).
  """

  def __new__(cls, reduction_axis: Any = 0, output_axis: Any = 1, output_groups: int = 1):
    self = super().__new__(cls, reduction_axis, output_axis)
    object.__setattr__(self, "output_groups", int(output_groups))
    return self

  def __setattr__(self, name, value):
    raise AttributeError(f"MatrixDimensionNumbers is immutable (cannot set {name!r}).")

  def __getnewargs__(self):  # pickle / copy keep output_groups
    return (self.reduction_axis, self.output_axis, self.output_groups)

  def _replace(self, **kw):
    args = dict(reduction_axis=self.reduction_axis, output_axis=self.output_axis,
                output_groups=self.output_groups)
    args.update(kw)
    return type(self)(**args)

  def __eq__(self, other):
    if not isinstance(other, tuple):
      return NotImplemented
    return tuple.__eq__(self, other) is True and groups(other) == self.output_groups

  def __ne__(self, other):
    eq = self.__eq__(other)
    return eq if eq is NotImplemented else not eq

  def __hash__(self):
    return hash((tuple.__hash__(self), self.output_groups))

  def __repr__(self):
    extra = f", output_groups={self.output_groups}" if self.output_groups != 1 else ""
    return (f"MatrixDimensionNumbers(reduction_axis={self.reduction_axis!r}, "
            f"output_axis={self.output_axis!r}{extra})")


jax.tree_util.register_static(MatrixDimensionNumbers)


def is_dimension_numbers(x: Any) -> bool:
  """True for :class:`MatrixDimensionNumbers` and anything with its two axis fields (optax's)."""
  return hasattr(x, "reduction_axis") and hasattr(x, "output_axis")


def groups(dims: Any) -> int:
  """``output_groups`` of ``dims`` (1 for optax's type)."""
  return int(getattr(dims, "output_groups", 1) or 1)


def axes(a: Any, ndim: int) -> tuple[int, ...]:
  """Axis or axes ``a`` as non-negative ints for a rank-``ndim`` tensor."""
  a = (a,) if isinstance(a, (int, np.integer)) else tuple(a)
  return tuple(int(i) % ndim for i in a)


def last_two(ndim: int) -> MatrixDimensionNumbers:
  """The last two axes as the matrix, leading axes batch."""
  return MatrixDimensionNumbers(ndim - 2, ndim - 1)


def split_dimension_numbers(split: int, ndim: int) -> MatrixDimensionNumbers:
  """Rows = axes ``[0, split)``, columns = axes ``[split, ndim)`` (no batch axes)."""
  k = int(split) % ndim if split < 0 else int(split)
  if not 0 < k < ndim:
    raise ValueError(f"a split axis must leave axes on both sides: got {split} for rank {ndim}.")
  return MatrixDimensionNumbers(tuple(range(k)), tuple(range(k, ndim)))


def ungroup(shape: Sequence[int], dims: Any):
  """(shape, dims) with a fused output axis split into ``(groups, n/groups)``, the groups a
  batch axis; unchanged for ``output_groups == 1``."""
  g = groups(dims)
  if g == 1:
    return tuple(shape), dims
  ndim = len(shape)
  out = axes(dims.output_axis, ndim)
  if len(out) != 1 or shape[out[0]] % g:
    raise ValueError(f"`output_groups={g}` needs one output axis whose size it divides; got "
                     f"{dims!r} for shape {tuple(shape)}.")
  o = out[0]
  new_shape = tuple(shape[:o]) + (g, shape[o] // g) + tuple(shape[o + 1:])
  red = tuple(a + 1 if a > o else a for a in axes(dims.reduction_axis, ndim))
  return new_shape, MatrixDimensionNumbers(red if len(red) > 1 else red[0], o + 1)


def conv_dimension_numbers(ndim: int = 4) -> MatrixDimensionNumbers:
  """Flax conv kernel ``(*spatial, in, out)``: fan-in = spatial × in, fan-out = out."""
  V.check_int("ndim", ndim, low=2)
  return MatrixDimensionNumbers(tuple(range(ndim - 1)), ndim - 1)


def matrix_shape(shape: Sequence[int], dims: Any) -> tuple[int, int, int]:
  """``(batch, m, n)`` of a tensor of ``shape`` under dimension numbers ``dims``."""
  shape, dims = ungroup(shape, dims)
  ndim = len(shape)
  red, out = axes(dims.reduction_axis, ndim), axes(dims.output_axis, ndim)
  batch = [i for i in range(ndim) if i not in red + out]
  return (int(np.prod([shape[i] for i in batch], dtype=np.int64)),
          int(np.prod([shape[i] for i in red], dtype=np.int64)),
          int(np.prod([shape[i] for i in out], dtype=np.int64)))


def batch_axes(shape: Sequence[int], dims: Any) -> tuple[int, ...]:
  """The leaf's own batch axes under ``dims`` (neither reduction nor output axes: stacked
  layers' ``L``), ``()`` for ``dims=None`` (not a matrix). A fused output axis
  (``output_groups``) is not split here: its groups are one tensor's parts, not layers."""
  if dims is None:
    return ()
  ndim = len(shape)
  used = axes(dims.reduction_axis, ndim) + axes(dims.output_axis, ndim)
  return tuple(i for i in range(ndim) if i not in used)


def stacked_axes(dimension_numbers: Any, tree: Any) -> list[tuple[int, ...]]:
  """Per leaf of ``tree`` (flatten order): its batch axes (:func:`batch_axes`) under
  ``dimension_numbers`` (any form :func:`resolve_tree` takes): the axes along which a
  per-tensor statistic is kept once per index, so that stacked layers ``(L, in, out)`` get one
  each, as the same layers unstacked do."""
  flat = jax.tree.leaves(tree)
  return [batch_axes(np.shape(x), d) for x, d in zip(flat, resolve_tree(dimension_numbers, tree))]


#: Flax attention projections: ``query``/``key``/``value`` kernels ``(..., in, heads, head_dim)``
#: and the ``out`` kernel ``(..., heads, head_dim, out)`` (Linen ``MultiHeadDotProductAttention``,
#: NNX ``MultiHeadAttention``).
ATTENTION_IN_PROJECTIONS = ("query", "key", "value")
ATTENTION_OUT_PROJECTIONS = ("out",)
#: Leaf names that are never matrices (biases, norm scales), whatever their rank.
NEVER_MATRICES = ("bias", "scale")


def default_dimension_numbers(path: Any, shape: Sequence[int]) -> Optional[MatrixDimensionNumbers]:
  """The matrix view stax gives a JAX/Flax leaf when no ``dimension_numbers`` is passed.

  * ``ndim < 2``, or a leaf named ``bias`` or ``scale`` (attention biases are
    ``(heads, head_dim)``; stacked norm scales and biases ``(L, d)``): ``None``, not a matrix;
  * a ``query``/``key``/``value`` kernel ``(..., in, heads, head_dim)``: one ``in × heads·head_dim``
    matrix (leading axes, e.g. scanned layers, are batch axes); an attention ``out`` kernel
    ``(..., heads, head_dim, out)``: one ``heads·head_dim × out`` matrix;
  * 2-D ``(in, out)``: itself;
  * 3-D: stacked (scanned / ``nnx.vmap``) layers ``(L, in, out)``, L matrices;
  * 4-D and more: a Flax conv kernel ``(*spatial, in, out)``, one ``(spatial·in) × out`` matrix
    (:func:`conv_dimension_numbers`).

  A name and a shape cannot settle every leaf; where these rules guess wrong, pass the layout
  through ``dimension_numbers`` (a callable ``(path, leaf) -> dims`` covers a whole model):

  * a 1-D conv kernel ``(width, in, out)`` looks like stacked layers: pass
    ``conv_dimension_numbers(3)``;
  * stacked conv kernels ``(L, kh, kw, in, out)`` look like a 3-D conv (one matrix with the
    layer axis in the fan-in): pass ``MatrixDimensionNumbers((1, 2, 3), 4)``;
  * stacked ``nnx.Linear`` layers named ``query``/``key``/``value`` ``(L, in, out)`` look like
    a Flax attention kernel ``(in, heads, head_dim)``: pass ``MatrixDimensionNumbers(1, 2)``;
  * a ``DenseGeneral`` projection under another name (``q_proj`` ``(in, heads, head_dim)``)
    looks like stacked layers: pass ``MatrixDimensionNumbers(0, (1, 2))`` (and
    ``((0, 1), 2)`` for an ``o_proj`` ``(heads, head_dim, out)``);
  * a depthwise conv kernel ``(kh, kw, 1, C)`` is one ``kh·kw × C`` matrix across independent
    filters;
  * stacked (scanned) kernels of four or more axes under other names than the attention ones
    look like conv kernels, the layer axis folded into the fan-in: mixture-of-experts weights
    ``(L, E, in, out)`` (pass ``MatrixDimensionNumbers(2, 3)``), a scanned ``q_proj``
    ``(L, in, heads, head_dim)`` (``MatrixDimensionNumbers(1, (2, 3))``) or ``o_proj``
    ``(L, heads, head_dim, out)`` (``MatrixDimensionNumbers((1, 2), 3)``).

  (Reported by stop 51's and stop 54's new-user sweeps.) The batch axes also give per-layer
  statistics: STAMLite's ``v`` and StableAdamW's RMS clip are kept per index of a leaf's batch
  axes (:func:`stacked_axes`).
  """
  ndim = len(shape)
  parts = partition.normalize_path(path) if path is not None else ()
  if ndim < 2 or (parts and parts[-1] in NEVER_MATRICES):
    return None
  module = parts[-2] if len(parts) >= 2 else ""
  if ndim >= 3 and module in ATTENTION_IN_PROJECTIONS:
    return MatrixDimensionNumbers(ndim - 3, (ndim - 2, ndim - 1))
  if ndim >= 3 and module in ATTENTION_OUT_PROJECTIONS:
    return MatrixDimensionNumbers((ndim - 3, ndim - 2), ndim - 1)
  if ndim >= 4:
    return conv_dimension_numbers(ndim)
  return last_two(ndim)


def _one(d: Any, shape: Sequence[int], where: str):
  """A per-leaf answer (dims, int split or None) as dims or None; dims for a leaf of rank 2 or
  more are checked against its rank (:func:`_check_axes`)."""
  if d is None:
    return d
  if is_dimension_numbers(d):
    if len(shape) >= 2:
      _check_axes(d, shape, where)
    return d
  if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
    return split_dimension_numbers(int(d), len(shape))
  raise TypeError(f"`dimension_numbers` gave {d!r} for {where}; expected MatrixDimensionNumbers, "
                  "an int split axis or None.")


def _check_axes(d: Any, shape: Sequence[int], where: str) -> None:
  """``ValueError`` naming the leaf unless ``d``'s axes are in ``[-ndim, ndim)`` and its
  reduction and output axes are distinct and non-empty (an out-of-range axis had wrapped
  around, ``MatrixDimensionNumbers(0, 5)`` on a matrix reading as ``(0, 1)``)."""
  nd = len(shape)
  red, out = (tuple([a]) if isinstance(a, (int, np.integer)) else tuple(a)
              for a in (d.reduction_axis, d.output_axis))
  bad = [a for a in red + out if not -nd <= int(a) < nd]
  if bad:
    raise ValueError(f"`dimension_numbers` for {where} (shape {tuple(shape)}): axis {bad[0]} is "
                     f"out of range; axes must be in [-{nd}, {nd}), got {d!r}.")
  r, o = axes(red, nd), axes(out, nd)
  if not r or not o or len(set(r + o)) != len(r) + len(o):
    raise ValueError(f"`dimension_numbers` for {where} (shape {tuple(shape)}): the reduction "
                     f"and output axes must be non-empty and distinct, got {d!r}.")


def _is_tree_callable(fn: Any) -> bool:
  """A one-argument callable (optax's ``params -> tree of dims``)."""
  try:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
  except (TypeError, ValueError):
    return False
  return len(params) == 1


def check_dimension_numbers(dimension_numbers: Any) -> None:
  ok = (dimension_numbers is None or is_dimension_numbers(dimension_numbers) or callable(dimension_numbers)
        or (isinstance(dimension_numbers, (int, np.integer)) and not isinstance(dimension_numbers, bool))
        or isinstance(dimension_numbers, (dict, list, tuple)))
  if not ok:
    raise TypeError("`dimension_numbers` must be None, a MatrixDimensionNumbers, an int split "
                    "axis, a callable (path, leaf) -> dims | None or params -> tree of dims, "
                    f"or a tree of dims; got {dimension_numbers!r}.")


def resolve_dimension_numbers(dimension_numbers: Any, path: Any, x: Any):
  """Dimension numbers of one leaf at ``path`` (see the module docstring for the forms; a tree
  form needs the whole tree: use :func:`resolve_tree`)."""
  check_dimension_numbers(dimension_numbers)
  shape = np.shape(x)
  if dimension_numbers is None:
    return default_dimension_numbers(path, shape)
  name = partition.path_name(path) if path is not None else "<leaf>"
  if callable(dimension_numbers) and not is_dimension_numbers(dimension_numbers):
    if _is_tree_callable(dimension_numbers):
      raise TypeError("a `params -> tree of dims` callable needs the whole tree (resolve_tree).")
    return _one(dimension_numbers(partition.path_name(path), x), shape, name)
  if isinstance(dimension_numbers, (dict, list)) or (
      isinstance(dimension_numbers, tuple) and not is_dimension_numbers(dimension_numbers)):
    raise TypeError("a tree of dimension numbers needs the whole tree (resolve_tree).")
  return _one(dimension_numbers, shape, name)


def pathless_dimension_numbers(dimension_numbers: Any, x: Any):
  """Dimension numbers of a leaf seen without its path (a per-leaf storage callable asked for
  one leaf): :func:`resolve_dimension_numbers`, or, for a form that needs the whole tree, the
  leaf's default (:func:`default_dimension_numbers`)."""
  try:
    return resolve_dimension_numbers(dimension_numbers, None, x)
  except TypeError:   # a tree form needs the tree
    return default_dimension_numbers(None, np.shape(x))


def per_leaf(dimension_numbers: Any, tree: Any) -> list:
  """Per leaf of ``tree`` (flatten order): the raw answer of ``dimension_numbers`` for it
  (dims, an int split axis, or ``None``), before :func:`resolve_tree` turns ints into dims.
  ``dimension_numbers=None`` gives the defaults (:func:`default_dimension_numbers`)."""
  check_dimension_numbers(dimension_numbers)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  spec = dimension_numbers
  if spec is None:
    return [default_dimension_numbers(p, np.shape(x)) for p, x in flat]
  if callable(spec) and not is_dimension_numbers(spec):
    if not _is_tree_callable(spec):
      return [spec(partition.path_name(p), x) for p, x in flat]
    spec = spec(tree)
  if isinstance(spec, (dict, list)) or (isinstance(spec, tuple) and not is_dimension_numbers(spec)):
    leaf = lambda x: x is None or is_dimension_numbers(x) or isinstance(x, (int, np.integer))
    by_path = {partition.path_name(p): d
               for p, d in jax.tree_util.tree_flatten_with_path(spec, is_leaf=leaf)[0]}
    out = []
    for p, _ in flat:
      name = partition.path_name(p)
      if name not in by_path:
        raise ValueError(f"`dimension_numbers` has no entry for the leaf {name!r}.")
      out.append(by_path[name])
    return out
  return [spec] * len(flat)


def resolve_tree(dimension_numbers: Any, tree: Any) -> list:
  """Per leaf of ``tree`` (flatten order): its :class:`MatrixDimensionNumbers` or ``None``.

  Accepts every form in the module docstring, including optax's ``params -> tree`` callable
  and a tree of dims laid out like the params (``None`` entries: not matrices). A tree of dims
  is matched by leaf path, so it also serves a sub-tree of the params (``optax.partition``
  hands each inner transformation the params with the other leaves masked); a leaf of ``tree``
  whose path the dims tree lacks raises ``ValueError`` naming it.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [_one(d, np.shape(x), partition.path_name(p))
          for (p, x), d in zip(flat, per_leaf(dimension_numbers, tree))]
