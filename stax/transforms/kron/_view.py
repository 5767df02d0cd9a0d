"""How a parameter leaf is seen as a matrix by the SCAO preconditioners.

A leaf of shape ``shape`` is viewed as the 2-D matrix ``(prod(shape[:s]), prod(shape[s:]))``
for a split axis ``s``; 0-D and 1-D leaves are ``(1, n)``. ``dimension_numbers`` takes every
form of :mod:`stax.layout` (resolved there): an int split axis (or a tree of them), a
:class:`stax.MatrixDimensionNumbers` (or a tree of them, or a callable ``(path, leaf) -> dims``
or ``params -> tree``) whose reduction and output axes are the two sides of one split (rows and
columns of the Kronecker factors; batch axes are not supported and raise ``ValueError`` naming
the leaf; ``output_groups`` is ignored: the factors see a fused projection whole, as the seed
does); a leaf whose dims are ``None`` goes to Adam alone. ``None`` (default) is
:func:`default_split`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DimensionNumbers", "PASS", "split_axis", "default_split", "view_shape",
           "leaf_splits", "as_2d"]

DimensionNumbers = Union[None, int, Any, Callable[[Any], Any]]

#: The split returned for a leaf that is never a matrix (Adam alone).
PASS = "pass"


def split_axis(dn: Optional[int], ndim: int) -> int:
  """The split axis in ``[1, ndim - 1]`` for an int (negative counts from the end) or ``None``
  (the seed's ``1``); ``0`` for 0-D and 1-D leaves. ``ValueError`` when out of range."""
  if ndim <= 1:
    return 0
  if dn is None:
    return 1
  s = int(dn)
  if s < 0:
    s += ndim
  if not 1 <= s <= ndim - 1:
    raise ValueError(f"`dimension_numbers`: split axis {dn} is out of range for ndim {ndim}.")
  return s


def default_split(path: Any, shape: tuple) -> Any:
  """The split axis used when ``dimension_numbers`` is ``None``: the seed's ``1``
  (``(shape[0], -1)``, torch's ``(out, in·kh·kw)``), except that a leaf named ``bias`` is never
  a matrix (:data:`PASS`: Adam alone; attention biases are ``(heads, head_dim)``) and a Flax
  attention projection is split where its matrix view is: ``query``/``key``/``value``
  ``(in, heads, dh)`` after axis 1, ``out`` ``(heads, dh, out)`` after axis 2 (see
  :func:`stax.layout.default_dimension_numbers`; leading stacked-layer axes
  cannot be a split, so such leaves are passed to Adam alone)."""
  from stax import layout as O  # pylint: disable=g-import-not-at-top
  from stax import partition  # pylint: disable=g-import-not-at-top
  parts = partition.normalize_path(path)
  if len(shape) >= 2 and parts and parts[-1] in O.NEVER_MATRICES:
    return PASS
  module = parts[-2] if len(parts) >= 2 else ""
  if len(shape) >= 3 and module in O.ATTENTION_IN_PROJECTIONS + O.ATTENTION_OUT_PROJECTIONS:
    d = O.default_dimension_numbers(path, shape)
    red = O.axes(d.reduction_axis, len(shape))
    out = O.axes(d.output_axis, len(shape))
    if red + out != tuple(range(len(shape))):
      return PASS
    return len(red)
  return None


def view_shape(shape: tuple, split: int) -> tuple[int, int]:
  """``(m, n)`` of the matrix view: 0-/1-D → ``(1, n)``; else rows = ``prod(shape[:split])``."""
  if len(shape) == 0:
    return (1, 1)
  if len(shape) == 1:
    return (1, int(shape[0]))
  return (int(np.prod(shape[:split])), int(np.prod(shape[split:])))


def _dims_split(d: Any, shape: tuple, name: str) -> Any:
  """The split axis of dimension numbers ``d`` on a leaf of ``shape`` (rank >= 2)."""
  from stax import layout  # pylint: disable=g-import-not-at-top
  if d is None:
    return PASS
  nd = len(shape)
  red, out = layout.axes(d.reduction_axis, nd), layout.axes(d.output_axis, nd)
  for first, second in ((red, out), (out, red)):
    s = len(first)
    if tuple(sorted(first)) == tuple(range(s)) and tuple(sorted(second)) == tuple(range(s, nd)):
      return s
  raise ValueError(f"`dimension_numbers` {d!r} for {name!r} (shape {shape}) is not one split "
                   "of the axes into rows and columns (SCAO has no batch axes); pass an int "
                   "split axis or dims whose reduction and output axes cover the tensor.")


def leaf_splits(dimension_numbers: DimensionNumbers, tree: Any) -> list:
  """Per leaf of ``tree`` in flatten order: its split axis, or :data:`PASS`."""
  from stax import layout  # pylint: disable=g-import-not-at-top
  from stax import partition  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if dimension_numbers is None:
    out = []
    for path, x in flat:
      shape = tuple(np.shape(x))
      dn = default_split(path, shape)
      out.append(PASS if dn == PASS else split_axis(dn, len(shape)))
    return out
  if isinstance(dimension_numbers, (int, np.integer)) and not isinstance(dimension_numbers, bool):
    return [split_axis(dimension_numbers, len(np.shape(x))) for _, x in flat]
  # Every other form through stax.layout; 0-D and 1-D leaves are always (1, n) rows.
  out = []
  for (path, x), d in zip(flat, layout.per_leaf(dimension_numbers, tree)):
    shape = tuple(np.shape(x))
    if len(shape) <= 1:
      out.append(0)
    elif d is None or layout.is_dimension_numbers(d):
      out.append(_dims_split(d, shape, partition.path_name(path)))
    else:
      out.append(split_axis(d, len(shape)))
  return out


def as_2d(g: jax.Array, split: int) -> jax.Array:
  """``g`` as its float32 matrix view."""
  m, n = view_shape(g.shape, split)
  return g.reshape(m, n).astype(jnp.float32)
