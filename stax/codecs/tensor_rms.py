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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from stax import numerics as num
from stax.codecs.base import FullPrecision, SeparateStorage

__all__ = ["TensorMean", "tensor_rms_storage"]


def _mean(value: jax.Array) -> jax.Array:
  if value.size == 0:
    return jnp.zeros([], value.dtype)
  return num.mean(value)  # exact, and its sum never overflows (v near the dtype's maximum)


class TensorMean(NamedTuple):
  """A moment stored as its mean over the tensor: one scalar of ``dtype`` (default float32)."""

  dtype: Any = jnp.float32
  needs_key: bool = False

  def init(self, param):
    del param
    return jnp.zeros([], self.dtype)

  def decode(self, encoded, like):
    return jnp.broadcast_to(encoded, jnp.shape(like))

  def encode(self, value, key):
    del key
    return _mean(value).astype(self.dtype)

  def project(self, value):
    """The value the update uses: the tensor mean (a 0-d array, broadcasting against m)."""
    return _mean(value)

  #: the encoding is the tensor mean itself (0-d): the Adam core forms the new mean as the EMA
  #: of the old one and mean(|g|²), on scalars (``SeparateStorage.nu_is_mean``)
  is_mean = True

  @property
  def reduces(self) -> bool:
    """``project`` is a reduction over the tensor (see ``StorageBase.reduces_nu``)."""
    return True


def tensor_rms_storage(mu_dtype: Any = None) -> SeparateStorage:
  """Full first moment in ``mu_dtype`` (default: the parameter's) and a per-tensor mean of v."""
  return SeparateStorage(FullPrecision(mu_dtype), TensorMean())
