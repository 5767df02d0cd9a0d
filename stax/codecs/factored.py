r"""Adafactor's factored second moment as a codec: a matrix's v stored as its row and column means.

For a moment :math:`V \in \mathbb{R}^{m\times n}` (a leaf's last two axes; leading axes are a
batch of matrices) the codec stores the row means :math:`r_i = \frac1n\sum_j V_{ij}` and the
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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from stax import _sharding as _sh
from stax import numerics as num

__all__ = ["FactoredState", "Factored", "factored_decode"]


class FactoredState(NamedTuple):
  """Row means ``(..., m)`` and column means ``(..., n)`` of a moment ``(..., m, n)``."""

  rows: jax.Array
  cols: jax.Array


def factored_decode(state: FactoredState) -> jax.Array:
  """The rank-1 estimate ``r_i c_j / mean(r)`` (0 where the moment's mean is 0)."""
  r = state.rows.astype(jnp.float32)
  c = state.cols.astype(jnp.float32)
  mean = jnp.mean(r, axis=-1, keepdims=True)
  scale = jnp.where(mean > 0, num.divide(r, jnp.where(mean > 0, mean, 1.0)), 0.0)
  return scale[..., :, None] * c[..., None, :]


def _encode(value: Any) -> FactoredState:
  """The row and column means of ``value`` in float32; a :class:`FactoredState` (the means the
  Adam core formed, ``is_mean``) is taken as they are."""
  if isinstance(value, FactoredState):
    return FactoredState(*(x.astype(jnp.float32) for x in value))
  v = value.astype(jnp.float32)
  # exact means whose sums never overflow (v near float32's maximum)
  return FactoredState(num.mean(v, axis=-1), num.mean(v, axis=-2))


class Factored(NamedTuple):
  """The factored second moment (a :class:`~stax.codecs.base.MomentCodec` for ``nu``).

  Args:
    dtype: storage dtype of the row and column means (default float32).

  Deterministic (no key); ``project`` is the rank-1 estimate of the new moment. Leaves must have
  rank >= 2 (the last two axes are the matrix).
  """

  dtype: Any = jnp.float32
  needs_key: bool = False
  #: the encoding is v's row and column means: the Adam core forms their EMAs from the same
  #: means of |g|² (``SeparateStorage.nu_is_mean``) and hands the new means to ``encode`` and
  #: ``project``
  is_mean = True

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
    g = g.astype(jnp.float32)
    (own,) = num.independent(g)
    return FactoredState(num.mean_square(g, axis=-1), num.mean_square(own, axis=-2))

  def init(self, param):
    shape = tuple(param.shape)
    if len(shape) < 2:
      raise ValueError(f"Factored: a factored moment needs a leaf of rank >= 2, got shape "
                       f"{shape}.")
    # (m + n) numbers per matrix: replicated, not sharded like the parameter
    return FactoredState(jnp.zeros(shape[:-1], self.dtype),
                         jnp.zeros(shape[:-2] + shape[-1:], self.dtype))

  def decode(self, encoded, like):
    return jnp.broadcast_to(factored_decode(encoded), jnp.shape(like))

  def encode(self, value, key):
    """The stored means of ``value`` (the moment, or the means themselves as a
    :class:`FactoredState`)."""
    del key
    rows, cols = _encode(value)
    # an explicit mesh: replicated, as init made them
    rows, cols = (x if _sh.explicit_spec(x) is None else _sh.reshard(x, (None,) * x.ndim)
                  for x in (rows, cols))
    return FactoredState(rows.astype(self.dtype), cols.astype(self.dtype))

  def project(self, value):
    """What the update divides by: the rank-1 estimate of ``value`` (the new moment, or its
    means as a :class:`FactoredState`)."""
    return factored_decode(self.encode(value, None))
