r"""One second moment per tensor: STAMLite's RMS denominator as a storage of the Adam core.

STAMLite (``stam-optimizer`` 0.1.0, ``core/stam_lite.py``) keeps no per-element second moment:
it keeps :math:`q \leftarrow \rho q + (1-\rho)\,\mathrm{mean}(g^2)`, one scalar per tensor, and
divides the bias-corrected momentum by :math:`\sqrt{q/(1-\rho^t+\epsilon)}+\epsilon`. Because
the mean is linear, this is exactly the Adam core's second moment *projected* onto its
per-tensor mean: with the decoded :math:`v` a broadcast of :math:`q`,
:math:`\mathrm{mean}((1-\rho)g^2 + \rho v) = (1-\rho)\,\mathrm{mean}(g^2) + \rho q`.

* :class:`TensorMean` is the ``nu`` codec: it stores one float32 scalar per leaf (the mean),
  decodes to a broadcast, and ``project`` reduces a freshly computed moment to that mean.
* :class:`ProjectedStorage` pairs two codecs like :class:`~stax.codecs.base.SeparateStorage`
  and also exposes ``project(mu, nu)``: the Adam core calls it on the new moments before it
  forms the update, so the denominator is the per-tensor RMS (a storage without ``project``
  uses the exact new moments, as before).

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

from stax.codecs.base import FullPrecision

__all__ = ["TensorMean", "ProjectedStorage", "tensor_rms_storage"]


def _mean(value: jax.Array) -> jax.Array:
  if value.size == 0:
    return jnp.zeros([], value.dtype)
  return jnp.mean(value)


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


class ProjectedStorage(NamedTuple):
  """Two independent codecs (as :class:`~stax.codecs.base.SeparateStorage`) plus ``project``.

  ``project(mu, nu)`` applies each codec's ``project`` when it has one (identity otherwise).
  """

  mu_codec: Any = FullPrecision()
  nu_codec: Any = TensorMean()

  @property
  def needs_key(self) -> bool:
    return bool(self.mu_codec.needs_key or self.nu_codec.needs_key)

  def init(self, param):
    return self.mu_codec.init(param), self.nu_codec.init(param)

  def read(self, mu_enc, nu_enc, like):
    return self.mu_codec.decode(mu_enc, like), self.nu_codec.decode(nu_enc, like)

  def write(self, mu, nu, key):
    if key is None or not self.needs_key:
      return self.mu_codec.encode(mu, None), self.nu_codec.encode(nu, None)
    k_mu, k_nu = jax.random.split(key)
    return self.mu_codec.encode(mu, k_mu), self.nu_codec.encode(nu, k_nu)

  def project(self, mu, nu):
    pm = getattr(self.mu_codec, "project", None)
    pn = getattr(self.nu_codec, "project", None)
    return (mu if pm is None else pm(mu)), (nu if pn is None else pn(nu))


def tensor_rms_storage(mu_dtype: Any = None) -> ProjectedStorage:
  """Full first moment in ``mu_dtype`` (default: the parameter's) and a per-tensor mean of v."""
  return ProjectedStorage(FullPrecision(mu_dtype), TensorMean())
