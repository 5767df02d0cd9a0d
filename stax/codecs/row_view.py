r"""Blocks along the tensor's rows, not along a short last axis: the row view of a storage.

A blockwise codec blocks and packs along the last axis, padding every row to a block multiple.
That is right for a ``(in, out)`` Dense kernel, but a torch conv weight ``(out, in, kh, kw)``
has a 3-wide last axis (a 128-block codec would pad each 3 values to 128: 229 bits/param instead
of 8.75), and an attention kernel ``(in, heads, head_dim)`` a short ``head_dim``. The row view
merges trailing axes into one row, so the codec sees the tensor as the matrix it is:
``(out, in·kh·kw)`` for the conv weight, ``(in, heads·head_dim)`` for attention.

Rule: of the views ``shape[:-k] + (prod(shape[-k:]),)`` for ``k = 1 .. ndim``, the one with the
fewest stored (padded) elements, the smallest ``k`` on a tie (so a Dense kernel keeps its
layout). Under an explicit mesh only trailing axes that are not sharded are merged into the
first merged axis (so the state keeps its parameter's sharding). When the whole tensor is
a multiple of the block, the view pads nothing and its blocks are the flattened tensor's
(TurboAdam 0.2.0 blocks the flattened tensor).

Example:
  >>> from stax.codecs.row_view import row_view_shape
  >>> row_view_shape((256, 256, 3, 3), 128)
  (256, 2304)
  >>> row_view_shape((64, 128), 128)
  (64, 128)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from stax.codecs import _layout as L
from stax.codecs.base import StorageBase, as_storage

__all__ = ["row_view_shape", "RowView", "to_row_view", "from_row_view"]


def row_view_shape(shape: Sequence[int], block_size: int, spec: Any = None) -> tuple[int, ...]:
  """The shape a blockwise codec sees ``shape`` as (see the module docstring).

  Args:
    shape: the parameter's shape (rank >= 1).
    block_size: the codec's block length along the row.
    spec: the parameter's explicit-mesh spec (a tuple per axis) or ``None``.
  """
  shape = tuple(int(d) for d in shape)
  if len(shape) <= 1:
    return shape
  best, best_cost = shape, None
  for k in range(1, len(shape) + 1):
    if spec is not None and any(a is not None for a in spec[len(shape) - k + 1:]):
      break                                     # would merge a sharded axis into a row
    row = math.prod(shape[-k:])
    rows = math.prod(shape[:-k])
    cost = rows * L.num_blocks(row, block_size) * block_size
    if best_cost is None or cost < best_cost:
      best, best_cost = shape[:-k] + (row,), cost
  return best


def to_row_view(x: jax.Array, block_size: int) -> jax.Array:
  """``x`` reshaped to :func:`row_view_shape` (its trailing axes merged into one row)."""
  shape = row_view_shape(jnp.shape(x), block_size, L.explicit_spec(x))
  if shape == tuple(jnp.shape(x)):
    return x
  return L.merge_last(x, jnp.ndim(x) - len(shape) + 1)


def from_row_view(x: jax.Array, like: Any) -> jax.Array:
  """The inverse of :func:`to_row_view`: ``x`` (a row view) back in ``like``'s shape."""
  if tuple(x.shape) == tuple(jnp.shape(like)):
    return x
  k = jnp.ndim(like) - x.ndim + 1
  return L.split_last(x, tuple(jnp.shape(like))[-k:])


def _inner_member(name: str) -> property:
  """A read-only property that is the wrapped storage's member ``name``."""
  return property(lambda self: getattr(self.inner, name), doc=f"The inner storage's ``{name}``.")


@dataclasses.dataclass(frozen=True)
class RowView(StorageBase):
  """A :class:`~stax.codecs.base.MomentStorage` seen through the row view of each leaf.

  ``init``/``read``/``write``/``project`` (and a ``fused_update``, ``nu_mean_squares``)
  reshape the moments to :func:`row_view_shape` before the inner storage and back after it;
  the encoded state keeps the view's shape. ``needs_key``, ``exact``, ``exact_parts``,
  ``reduces_nu``, ``nu_is_mean`` and ``uses_leaf_index`` are the inner storage's. (Until
  2026-12-05 ``project`` ran the inner storage on the leaf's own shape: a factored v of a conv kernel ``(out, in, kh, kw)``
  was stored over its row view ``(out, in·kh·kw)`` but the update divided by the factored
  estimate over ``(kh, kw)``.)
  """

  inner: Any
  block_size: int

  def __post_init__(self):
    object.__setattr__(self, "inner", as_storage(self.inner))

  needs_key = _inner_member("needs_key")
  exact = _inner_member("exact")
  exact_parts = _inner_member("exact_parts")
  reduces_nu = _inner_member("reduces_nu")
  nu_is_mean = _inner_member("nu_is_mean")
  uses_leaf_index = _inner_member("uses_leaf_index")

  def nu_mean_squares(self, g):
    return self.inner.nu_mean_squares(self._view(g))

  @property
  def fused_update(self):
    inner = self.inner.fused_update
    if inner is None:
      return None

    def fused(g, step, ctx):
      u, mu_enc, nu_enc = inner(self._view(g), step, ctx)
      return self._back(u, g), mu_enc, nu_enc

    return fused

  def _view(self, x):
    return to_row_view(x, self.block_size)

  def _back(self, x, like):
    return from_row_view(x, like)

  def init(self, param):
    return self.inner.init(self._view(param))

  def read(self, mu_enc, nu_enc, like, ctx):
    view = jax.ShapeDtypeStruct(
        row_view_shape(jnp.shape(like), self.block_size, L.explicit_spec(like)),
        jnp.result_type(like))
    m, v = self.inner.read(mu_enc, nu_enc, view, ctx)
    return self._back(m, like), self._back(v, like)

  def _view_nu(self, nu, mu):
    """``nu`` as the core formed it, on the row view: the elementwise moment is viewed; the
    encoding's means (``nu_is_mean``) are already the view's."""
    full = hasattr(nu, "shape") and tuple(nu.shape) == tuple(jnp.shape(mu))
    return self._view(nu) if full else nu

  def write(self, mu, nu, ctx):
    return self.inner.write(self._view(mu), self._view_nu(nu, mu), ctx)

  def project(self, mu, nu):
    """The inner storage's ``project`` on the row view (the moments back in ``mu``'s shape; a
    0-d projection, a per-tensor mean, as it is)."""
    pm, pv = self.inner.project(self._view(mu), self._view_nu(nu, mu))
    return self._back(pm, mu), (pv if jnp.ndim(pv) == 0 else self._back(pv, mu))
