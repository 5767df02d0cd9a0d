r"""One second moment per tensor: STAMLite's RMS denominator as a storage of the Adam core.

STAMLite (``stam-optimizer`` 0.1.0, ``core/stam_lite.py``) keeps no per-element second moment:
it keeps :math:`q \leftarrow \rho q + (1-\rho)\,\mathrm{mean}(g^2)`, one scalar per tensor, and
divides the bias-corrected momentum by :math:`\sqrt{q/(1-\rho^t+\epsilon)}+\epsilon`. Because
the mean is linear, this is exactly the Adam core's second moment *projected* onto its
per-tensor mean: with the decoded :math:`v` a broadcast of :math:`q`,
:math:`\mathrm{mean}((1-\rho)g^2 + \rho v) = (1-\rho)\,\mathrm{mean}(g^2) + \rho q`.

* :class:`TensorMean` is the ``nu`` codec: it stores one float32 scalar per leaf (the mean),
  decodes to a broadcast, and ``project`` reduces a freshly computed moment to that mean.
* :class:`~stax.codecs.base.SeparateStorage` pairs it with a full-precision m and exposes
  ``project(mu, nu)`` (each codec's ``project``): the Adam core calls it on the new moments
  before it forms the update, so the denominator is the per-tensor RMS.

Memory: ``mu`` (full size, in the chosen dtype) plus 4 bytes per tensor, about half of AdamW's
state in float32.

Example:
  >>> import jax.numpy as jnp, stax
  >>> from stax.codecs.tensor_rms import tensor_rms_storage
  >>> tx = stax.scale_by_adam(0.9, 0.99, storage=tensor_rms_storage())
  >>> state = tx.init({"w": jnp.ones((4, 3))})
  >>> state.nu["w"].shape
  ()
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from stax import _sharding as _sh
from stax import layout
from stax import numerics as num
from stax.codecs.base import FullPrecision, SeparateStorage, tensor_mean_square

__all__ = ["TensorMean", "tensor_rms_storage"]


def _mean(value: jax.Array, axis: Optional[tuple] = None) -> jax.Array:
  """The mean over ``axis`` (default every axis; 0 for an empty tensor): exact, and its sum
  never overflows (v near the dtype's maximum)."""
  if value.size == 0:
    shape = () if axis is None else tuple(d for i, d in enumerate(value.shape) if i not in axis)
    return jnp.zeros(shape, value.dtype)
  return num.mean(value, axis=axis)


class TensorMean(NamedTuple):
  """A moment stored as its mean over the tensor: one scalar of ``dtype`` (default float32), or,
  with ``batch_axes``, one mean per index of those axes (stacked layers ``(L, in, out)`` with
  ``batch_axes=(0,)``: one per layer, ``(L,)``, as the L layers unstacked would keep).

  Args:
    dtype: the means' dtype (default float32).
    batch_axes: axes of the leaf kept (default ``()``: one mean per tensor, 0-d).
    leaf_ndim: the leaf's rank, required with ``batch_axes`` (``project`` of the means puts
      the reduced axes back as size-1 axes).
  """

  dtype: Any = jnp.float32
  needs_key: bool = False
  batch_axes: tuple = ()
  leaf_ndim: Optional[int] = None

  @property
  def replicated(self) -> bool:
    """Per-layer means stay replicated under an explicit mesh (a few floats)."""
    return bool(self.batch_axes)

  def _reduced(self, ndim: int) -> Optional[tuple]:
    """The axes a mean runs over: all (``None``) without batch axes."""
    if not self.batch_axes:
      return None
    return tuple(i for i in range(ndim) if i not in self.batch_axes)

  def _is_means(self, value) -> bool:
    """``value`` is the means themselves (rank of the batch axes), not a moment."""
    return bool(self.batch_axes) and jnp.ndim(value) == len(self.batch_axes)

  def _expand(self, means, ndim: int):
    """The means with the reduced axes back as size-1 axes: they broadcast against the leaf."""
    red = self._reduced(ndim)
    return means if red is None else jnp.expand_dims(means, red)

  def init(self, param):
    shape = tuple(d for i, d in enumerate(jnp.shape(param)) if i in self.batch_axes)
    return jnp.zeros(shape, self.dtype)

  def decode(self, encoded, like):
    return jnp.broadcast_to(self._expand(encoded, jnp.ndim(like)), jnp.shape(like))

  def encode(self, value, key):
    del key
    if self._is_means(value):
      means = jnp.asarray(value).astype(self.dtype)
    else:
      means = _mean(value, self._reduced(jnp.ndim(value))).astype(self.dtype)
    # per-layer means of a leaf sharded along its layers come out sharded: kept replicated, as
    # init makes them (a select of the two under the non-finite guard needs one sharding)
    return _sh.replicated(means) if self.batch_axes else means

  def project(self, value):
    """The value the update uses: the tensor mean (a 0-d array, broadcasting against m), or the
    per-index means with the reduced axes kept as size 1 (from the moment, or given as the
    means themselves)."""
    if self._is_means(value):
      return self._expand(jnp.asarray(value), self.leaf_ndim)
    red = self._reduced(jnp.ndim(value))
    return _mean(value) if red is None else jnp.expand_dims(_mean(value, red), red)

  def mean_squares(self, g):
    """The means of ``|g|²`` laid out like the encoding (``StorageBase.nu_mean_squares``)."""
    if not self.batch_axes:
      return tensor_mean_square(g)
    return _mean(jnp.square(g.astype(jnp.float32)), self._reduced(g.ndim))

  #: the encoding is the tensor mean itself (0-d; per layer with ``batch_axes``): the Adam core
  #: forms the new means as the EMAs of the old ones and the means of |g|², on scalars
  #: (``SeparateStorage.nu_is_mean``)
  is_mean = True

  @property
  def reduces(self) -> bool:
    """``project`` is a reduction over the tensor (see ``StorageBase.reduces_nu``)."""
    return True


def tensor_rms_storage(mu_dtype: Any = None, *, stacked: bool = False,
                       dimension_numbers: Any = None):
  """Full first moment in ``mu_dtype`` (default: the parameter's) and a per-tensor mean of v.

  With ``stacked=True`` (default False) a per-leaf storage callable instead: each leaf's means
  are kept per index of its batch axes under ``dimension_numbers`` (any form :mod:`stax.layout`
  takes; default ``None``: :func:`stax.layout.default_dimension_numbers`, where stacked
  ``(L, in, out)`` layers have the batch axis ``L``), so each stacked layer has its own RMS.
  """
  if not stacked:
    return SeparateStorage(FullPrecision(mu_dtype), TensorMean())

  def make(leaf, axes=()):
    axes = tuple(axes)
    return SeparateStorage(FullPrecision(mu_dtype), TensorMean(
        batch_axes=axes, leaf_ndim=len(jnp.shape(leaf)) if axes else None))

  def choose(leaf):
    dims = layout.pathless_dimension_numbers(dimension_numbers, leaf)
    return make(leaf, layout.batch_axes(jnp.shape(leaf), dims))

  def for_tree(tree):
    return [make(x, a) for x, a in zip(jax.tree.leaves(tree),
                                       layout.stacked_axes(dimension_numbers, tree))]

  choose.needs_key = False
  choose.for_tree = for_tree
  return choose
