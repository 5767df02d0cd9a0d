"""How a parameter leaf is seen as matrices by the SCAO preconditioners.

A leaf becomes one ``m × n`` matrix, or ``B`` of them stacked (``(B, m, n)``) when it has batch
axes (stacked layers ``(L, in, out)`` from ``nnx.vmap``/``nn.scan``: one set of Kronecker
factors per layer, as the same layers unstacked get). ``dimension_numbers`` takes every form of
:mod:`stax.layout` (resolved there):

* ``None`` (default): :func:`stax.layout.default_dimension_numbers`, the layout every stax
  transform gives a JAX/Flax leaf (a ``Dense`` kernel ``(in, out)`` itself, a conv kernel
  ``(kh, kw, in, out)`` one ``kh·kw·in × out`` matrix, Flax attention kernels
  ``(in, heads, dh)``/``(heads, dh, out)`` their ``in × heads·dh``/``heads·dh × out`` matrix,
  3-D leaves stacked layers); 0-D and 1-D leaves, and leaves named ``bias``/``scale`` of any
  rank (a Flax attention bias ``(heads, dh)``, stacked ``(L, d)`` biases and norm scales), are
  one ``(1, n)`` row, as the seed sees a torch bias: the faithful mode's diagonal path (until
  stop 53 those of rank >= 2 went to Adam alone, unlike the same layers' 1-D biases);
* an int split axis ``s`` (or a tree of them): rows = ``prod(shape[:s])``, no batch axes: the
  seed's view of a torch tensor is ``1``, ``(shape[0], -1)``;
* :class:`stax.MatrixDimensionNumbers` (or a tree of them, or a callable ``(path, leaf) ->
  dims`` or ``params -> tree``): the reduction and output axes are the two sides (the side
  whose first axis comes first in the tensor is the rows, so torch's ``(out, in)`` weight is
  the seed's ``out × in`` matrix), every other axis a batch axis; axes out of that order are
  transposed into it (a copy of the gradient each step). ``output_groups`` is ignored: the
  factors see a fused projection whole, as the seed does. A leaf whose dims are ``None`` goes
  to Adam alone.

(Until stop 53 the default was the seed's ``1`` for every leaf of rank >= 2 but attention
kernels: a Flax conv kernel was the ``kh × kw·in·out`` matrix and stacked layers one
``L × in·out`` matrix; batch axes raised ``ValueError``.)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DimensionNumbers", "PASS", "View", "split_axis", "split_view", "dims_view",
           "default_view", "leaf_views", "as_matrix", "from_matrix"]

DimensionNumbers = Union[None, int, Any, Callable[[Any], Any]]

#: The view returned for a leaf that is never a matrix (Adam alone).
PASS = "pass"


class View(NamedTuple):
  """A leaf's matrix view: the leaf transposed by ``perm`` (``None``: as it is), then reshaped
  to ``(m, n)`` (``batch`` ``None``) or to ``batch`` stacked ``m × n`` matrices."""

  perm: Optional[tuple]
  batch: Optional[int]
  m: int
  n: int


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


def split_view(shape: tuple, split: int) -> View:
  """The view of a split axis: 0-/1-D → ``(1, n)``; else rows = ``prod(shape[:split])``."""
  if len(shape) == 0:
    return View(None, None, 1, 1)
  if len(shape) == 1:
    return View(None, None, 1, int(shape[0]))
  return View(None, None, int(np.prod(shape[:split])), int(np.prod(shape[split:])))


def dims_view(d: Any, shape: tuple) -> Any:
  """The view of dimension numbers ``d`` on a leaf of ``shape`` (rank >= 2): batch axes first,
  then the side whose first axis comes first (rows), then the other (columns); :data:`PASS`
  for ``d=None`` or no matrices (a batch axis of length 0)."""
  from stax import layout  # pylint: disable=g-import-not-at-top
  if d is None:
    return PASS
  nd = len(shape)
  red, out = layout.axes(d.reduction_axis, nd), layout.axes(d.output_axis, nd)
  rows, cols = (red, out) if min(red) < min(out) else (out, red)
  batch = tuple(i for i in range(nd) if i not in red + out)
  perm = batch + rows + cols
  size = lambda ax: int(np.prod([shape[i] for i in ax], dtype=np.int64))
  if batch and size(batch) == 0:
    return PASS
  return View(None if perm == tuple(range(nd)) else perm, size(batch) if batch else None,
              size(rows), size(cols))


def default_view(path: Any, shape: tuple) -> Any:
  """The view used when ``dimension_numbers`` is ``None`` (module docstring)."""
  from stax import layout  # pylint: disable=g-import-not-at-top
  from stax import partition  # pylint: disable=g-import-not-at-top
  if len(shape) <= 1:
    return split_view(shape, 0)
  parts = partition.normalize_path(path)
  if parts and parts[-1] in layout.NEVER_MATRICES:
    # a Flax attention bias (heads, dh) or a stacked bias or norm scale (L, d): one row, as
    # the seed sees a torch bias (its diagonal path in the faithful mode; Adam alone in lowrank)
    return View(None, None, 1, int(np.prod(shape, dtype=np.int64)))
  return dims_view(layout.default_dimension_numbers(path, shape), shape)


def leaf_views(dimension_numbers: DimensionNumbers, tree: Any) -> list:
  """Per leaf of ``tree`` in flatten order: its :class:`View`, or :data:`PASS`."""
  from stax import layout  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if dimension_numbers is None:
    return [default_view(path, tuple(np.shape(x))) for path, x in flat]
  if isinstance(dimension_numbers, (int, np.integer)) and not isinstance(dimension_numbers, bool):
    return [split_view(tuple(np.shape(x)), split_axis(dimension_numbers, len(np.shape(x))))
            for _, x in flat]
  # Every other form through stax.layout; 0-D and 1-D leaves are always (1, n) rows.
  out = []
  for (_, x), d in zip(flat, layout.per_leaf(dimension_numbers, tree)):
    shape = tuple(np.shape(x))
    if len(shape) <= 1:
      out.append(split_view(shape, 0))
    elif d is None or layout.is_dimension_numbers(d):
      out.append(dims_view(d, shape))
    else:
      out.append(split_view(shape, split_axis(d, len(shape))))
  return out


def as_matrix(g: jax.Array, view: View) -> jax.Array:
  """``g`` as its float32 matrix view: ``(m, n)``, or ``(batch, m, n)``."""
  if view.perm is not None:
    g = jnp.transpose(g, view.perm)
  shape = (view.m, view.n) if view.batch is None else (view.batch, view.m, view.n)
  return g.reshape(shape).astype(jnp.float32)


def from_matrix(x: jax.Array, view: View, shape: tuple) -> jax.Array:
  """The inverse of :func:`as_matrix` (but for the dtype): ``x`` back in the leaf's ``shape``."""
  if view.perm is None:
    return x.reshape(shape)
  x = x.reshape(tuple(shape[i] for i in view.perm))
  return jnp.transpose(x, tuple(int(i) for i in np.argsort(view.perm)))
