r"""Adafactor's factored second moment as a codec: a matrix's v stored as its row and column means.

For a moment :math:`V \in \mathbb{R}^{m\times n}` (two axes of the leaf, by default its last two;
every other axis is a batch axis) the codec stores the row means :math:`r_i = \frac1n\sum_j V_{ij}` and the
column means :math:`c_j = \frac1m\sum_i V_{ij}` and decodes the rank-1 estimate

.. math:: \hat V_{ij} = r_i\,c_j / \bar r, \qquad \bar r = \tfrac1m\textstyle\sum_i r_i
   \;(= \tfrac1n\textstyle\sum_j c_j),

which is Adafactor's :math:`R C / 1^\top R` (Shazeer & Stern, 2018, "Adafactor: Adaptive
Learning Rates with Sublinear Memory Cost", Alg. 4) written with means. :math:`\hat V` keeps the
row and column means of :math:`V` exactly, and the means are linear, so the Adam core's EMA
:math:`\beta_2\hat V + (1-\beta_2)g^2` re-encoded is Adafactor's pair of EMAs
:math:`r \leftarrow \beta_2 r + (1-\beta_2)\,\mathrm{rowmean}(g^2)` (and likewise :math:`c`).
``project`` hands the core the rank-1 estimate of the *new* moment, so the update divides by
:math:`\sqrt{\hat V_t}` as Adafactor's does.

The codec's encoding is a set of means (``is_mean``), so the Adam core forms exactly those EMAs:
the new row and column means are :math:`\beta_2 r + (1-\beta_2)\,\mathrm{rowmean}(g^2)` (and
likewise :math:`c`), from two reductions over ``g`` (:meth:`Factored.mean_squares`, each over
its own copy of ``g``), and the update's :math:`\hat V_t` is decoded from them inside the
update's own pass. Neither :math:`g^2` nor the elementwise new moment is formed (before, the
core formed :math:`\beta_2\hat V + (1-\beta_2)g^2` elementwise and re-encoded it: a float32
temporary per matrix that two reductions read). In exact arithmetic the two are equal
(:math:`\hat V` keeps the stored means); in float32 they differ by rounding. (Measured on
TurboAdam's default step at 16M parameters: fusions 1,207 → 1,097, distinct kernels 134 → 123,
the step's time and its 86 MiB of temporaries unchanged: XLA then materialised the new first
moment instead, for the block codec's absmax; since stop 46 that absmax is an integer max,
:func:`stax.numerics.absmax`, and with the plain means of :meth:`Factored.mean_squares`
the step's temporaries are 18 MiB.)

Which matrix: the leaf's own, from its dimension numbers (:mod:`stax.layout`, the layout every
stax matrix transform uses): rows are the fan-in axes, columns the fan-out axes, any other axis a
batch of matrices, so stacked layers ``(L, in, out)`` are ``L`` matrices and a torch conv weight
``(out, in, kh, kw)`` under the torch layout is one ``out × in·kh·kw`` matrix, whatever view the
m codec's blocks use (:class:`Factored` reshapes that view back to the leaf). A leaf that is not
a matrix (a bias, a norm scale, a vector) gets the 4-bit log v
(:func:`stax.codecs.turbo.turbo_storage`). (Until 2026-12-07 v was factored over the m codec's
row view: a stacked ``(3, 16, 8)`` kernel was one ``3 × 128`` matrix whose column means the three
layers shared, and with layer gradients of scales 1, 10 and 100 the first layer's first step was
40× Adam's; stacked biases ``(L, d)`` were factored across layers too.)

A moment whose mean is 0 decodes to 0 (no 0/0). Memory: ``(m + n)`` float32 per matrix, i.e.
:math:`32(m+n)/(mn)` bits per element (0.5 bits for a 128×128 matrix, 0.06 for 1024×1024).
Leaves of rank < 2 have no factorisation: :func:`stax.codecs.turbo.turbo_storage` gives them
another codec.

Example:
  >>> import jax.numpy as jnp
  >>> from stax.codecs.factored import Factored
  >>> codec = Factored()
  >>> v = jnp.outer(jnp.arange(1.0, 4.0), jnp.arange(1.0, 5.0))   # rank 1: stored exactly
  >>> enc = codec.encode(v, None)
  >>> [x.shape for x in enc]
  [(3,), (4,)]
  >>> bool(jnp.allclose(codec.decode(enc, v), v))
  True
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from stax import _sharding as _sh
from stax import numerics as num

__all__ = ["FactoredState", "Factored", "factored_decode", "factored_layout"]

def factored_layout(shape: Sequence[int], dims: Any) -> Optional[tuple[tuple, tuple]]:
  """``(shape, (row_axes, col_axes))`` a moment of ``shape`` is factored over under the
  dimension numbers ``dims`` (:mod:`stax.layout`), or ``None`` (not a matrix, or a matrix with
  a single row or column).

  The rows are the reduction (fan-in) axes, the columns the output axes, every other axis a
  batch of matrices; a fused output (``output_groups > 1``) is split, its groups a batch axis,
  so ``shape`` is the ungrouped shape (a reshape of the leaf's).

  Example:
    >>> from stax.layout import MatrixDimensionNumbers as D
    >>> factored_layout((12, 768, 3072), D(1, 2))
    ((12, 768, 3072), ((1,), (2,)))
    >>> factored_layout((512, 256, 3, 3), D((1, 2, 3), 0))        # a torch conv weight
    ((512, 256, 3, 3), ((1, 2, 3), (0,)))
  """
  if dims is None or len(shape) < 2:
    return None
  from stax import layout   # (stax.layout imports the codecs' users, not the codecs)
  full, dims = layout.ungroup(tuple(int(d) for d in shape), dims)
  rows, cols = (layout.axes(dims.reduction_axis, len(full)), layout.axes(dims.output_axis,
                                                                         len(full)))
  m, n = (math.prod(full[i] for i in ax) for ax in (rows, cols))
  if min(m, n) < 2:
    return None
  return full, (tuple(sorted(rows)), tuple(sorted(cols)))


class FactoredState(NamedTuple):
  """Row means (the moment's mean over its column axis) and column means (over its row axis):
  ``(..., m)`` and ``(..., n)`` for a moment ``(..., m, n)``."""

  rows: jax.Array
  cols: jax.Array


def _in_rows(rows: tuple, cols: tuple) -> tuple:
  """The row axes' positions in the row means (the moment with its column axes reduced)."""
  return tuple(a - sum(c < a for c in cols) for a in rows)


def factored_decode(state: FactoredState, axes: Optional[tuple] = None) -> jax.Array:
  """The rank-1 estimate ``r_i c_j / mean(r)`` (0 where the moment's mean is 0), over the
  moment's ``axes = (row_axes, col_axes)`` (tuples of axes; default the last two axes)."""
  r = state.rows.astype(jnp.float32)
  c = state.cols.astype(jnp.float32)
  rows, cols = ((r.ndim - 1,), (r.ndim,)) if axes is None else axes
  mean = jnp.mean(r, axis=_in_rows(rows, cols), keepdims=True)
  scale = jnp.where(mean > 0, num.divide(r, jnp.where(mean > 0, mean, 1.0)), 0.0)
  return jnp.expand_dims(scale, cols) * jnp.expand_dims(c, rows)


def _means(v: jax.Array, axes: tuple) -> FactoredState:
  ra, ca = axes
  # exact means whose sums never overflow (v near float32's maximum)
  return FactoredState(num.mean(v, axis=ca), num.mean(v, axis=ra))


class Factored(NamedTuple):
  """The factored second moment (a :class:`~stax.codecs.base.MomentCodec` for ``nu``).

  Args:
    dtype: storage dtype of the row and column means (default float32).
    shape: the leaf's (ungrouped) shape (default ``None``: the shape of the value given). A
      value of another shape of the same size (the m codec's row view,
      :class:`~stax.codecs.row_view.RowView`) is reshaped to it, so the factored matrices are
      the leaf's own.
    axes: ``(row_axes, col_axes)``, tuples of axes of ``shape`` (default ``None``: the last
      two axes); :func:`factored_layout` gives both from the leaf's dimension numbers.
    leaf_shape: the leaf's own shape, where ``shape`` splits a fused axis (``output_groups``):
      the shape ``project`` returns the estimate in (default ``None``: ``shape``).

  Deterministic (no key); ``project`` is the rank-1 estimate of the new moment. Leaves must have
  rank >= 2. The means are replicated (not sharded like the parameter: ``replicated``).
  """

  dtype: Any = jnp.float32
  needs_key: bool = False
  shape: Optional[tuple] = None
  axes: Optional[tuple] = None
  leaf_shape: Optional[tuple] = None
  #: the encoding is v's row and column means: the Adam core forms their EMAs from the same
  #: means of |g|² (``SeparateStorage.nu_is_mean``) and hands the new means to ``encode`` and
  #: ``project``
  is_mean = True
  #: the means are kept replicated under an explicit mesh (``SeparateStorage.write``)
  replicated = True

  def _full(self, x):
    return x if self.shape is None or tuple(x.shape) == self.shape else x.reshape(self.shape)

  def _axes(self, ndim: int) -> tuple:
    return ((ndim - 2,), (ndim - 1,)) if self.axes is None else self.axes

  def mean_squares(self, g):
    """The row and column means of ``|g|²`` in float32 (``StorageBase.nu_mean_squares``); the
    column means read their own copy of ``g`` (:func:`stax.numerics.independent`), so each is
    a plain reduction of ``g`` and ``|g|²`` is never materialised.

    Each is :func:`stax.numerics.mean_square`: the plain mean, saturating at ``R = 2**126``
    where its sum overflows (the Adam core bounds these means at ``R`` in any case). Bit for
    bit the exact mean wherever the sum stays finite, that is unless a row's or a column's
    entries reach ~``2**64/sqrt(n)`` (about ``1e17`` for 8,192 of them); beyond, the statistic
    reads ``R``, above the true mean by at most a factor ``n/4``, so that row's or column's
    steps are smaller, never larger. Until stop 46 the means were exact there too
    (:func:`stax.numerics.mean`, the squares scaled by a power of two inside the reduction),
    and XLA's CSE made the scale one broadcast array per matrix shape, written out for
    YNNPACK's reductions (13 MiB per step at 16M parameters): the default TurboAdam step took
    2.65× ``optax.adamw`` against 2.31× with the plain means (one interleaved loop)."""
    g = self._full(g).astype(jnp.float32)
    ra, ca = self._axes(g.ndim)
    (own,) = num.independent(g)
    return FactoredState(num.mean_square(g, axis=ca), num.mean_square(own, axis=ra))

  def init(self, param):
    shape = tuple(param.shape) if self.shape is None else self.shape
    if len(shape) < 2:
      raise ValueError(f"Factored: a factored moment needs a leaf of rank >= 2, got shape "
                       f"{shape}.")
    ra, ca = self._axes(len(shape))
    drop = lambda ax: tuple(d for i, d in enumerate(shape) if i not in ax)
    # one mean per row and per column of each matrix: replicated, not sharded like the parameter
    return FactoredState(jnp.zeros(drop(ca), self.dtype), jnp.zeros(drop(ra), self.dtype))

  def decode(self, encoded, like):
    v = factored_decode(encoded, self.axes)
    if self.shape is not None:
      return v.reshape(jnp.shape(like))
    return jnp.broadcast_to(v, jnp.shape(like))

  def encode(self, value, key):
    """The stored means of ``value`` (the moment, or the means themselves as a
    :class:`FactoredState`)."""
    del key
    if isinstance(value, FactoredState):
      rows, cols = (x.astype(jnp.float32) for x in value)
    else:
      v = self._full(value).astype(jnp.float32)
      rows, cols = _means(v, self._axes(v.ndim))
    # an explicit mesh: replicated, as init made them
    rows, cols = (_sh.replicated(x) for x in (rows, cols))
    return FactoredState(rows.astype(self.dtype), cols.astype(self.dtype))

  def project(self, value):
    """What the update divides by: the rank-1 estimate of ``value`` (the new moment, in the
    shape it came in, or its means as a :class:`FactoredState`: in ``leaf_shape``)."""
    v = factored_decode(self.encode(value, None), self.axes)
    if isinstance(value, FactoredState):
      return v if self.leaf_shape is None else v.reshape(self.leaf_shape)
    return v if self.shape is None else v.reshape(jnp.shape(value))
