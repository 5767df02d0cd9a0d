"""How Adam's two moments are stored: the storage interface of the shared Adam core.

The Adam core (:mod:`stax.transforms.adam`) never touches stored moments directly. For every
parameter leaf it asks a :class:`MomentStorage` for

* ``init(param) -> (mu_enc, nu_enc)``: the encoded zero moments (pytrees of arrays that keep the
  parameter's rank, so sharding metadata applies to them);
* ``read(mu_enc, nu_enc) -> (mu, nu)``: the decoded moments as arrays of the parameter's shape;
* ``write(mu, nu, key) -> (mu_enc, nu_enc)``: the encoded new moments. ``key`` is a raw
  ``uint32[2]`` PRNG key for stochastic rounding (derived from the key in the Adam state, the
  step count and the leaf index) or ``None`` when ``needs_key`` is False.

Optionally a storage defines ``project(mu, nu) -> (mu, nu)``: the Adam core then forms its
update from the projected new moments (STAMLite's per-tensor RMS uses it: the update must use
what the storage keeps, one mean of v per tensor, not the exact elementwise v).

The two moments are read and written *together* because some codecs store one moment relative to
the other (TurboAdam 0.2.0's "UState" stores m as the normalised update and decodes it with v).
Codecs that store each moment on its own compose with :class:`SeparateStorage`.

A storage may also be chosen per leaf: the Adam core accepts a callable ``leaf -> MomentStorage``
(called on a parameter leaf or on a ``jax.ShapeDtypeStruct``; it must depend only on the static
shape and dtype), e.g. "compress only tensors above 4096 elements".
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, Union, runtime_checkable

import jax
import jax.numpy as jnp

__all__ = [
    "MomentCodec",
    "MomentStorage",
    "FullPrecision",
    "SeparateStorage",
    "full_precision_storage",
    "resolve_storage",
    "StorageLike",
]


@runtime_checkable
class MomentCodec(Protocol):
  """Stores one moment tensor. ``decode(encode(x, key)) ≈ x``."""

  needs_key: bool

  def init(self, param: jax.Array) -> Any:
    """Encoded zeros for a moment of ``param``'s shape."""

  def decode(self, encoded: Any, like: jax.Array) -> jax.Array:
    """The moment as an array of ``like``'s shape (float32 unless stated otherwise)."""

  def encode(self, value: jax.Array, key: jax.Array | None) -> Any:
    """Encodes ``value``; ``key`` drives stochastic rounding when ``needs_key``."""


@runtime_checkable
class MomentStorage(Protocol):
  """Stores the pair (m, v) of one parameter leaf."""

  needs_key: bool

  def init(self, param: jax.Array) -> tuple[Any, Any]:
    ...

  def read(self, mu_enc: Any, nu_enc: Any, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    ...

  def write(self, mu: jax.Array, nu: jax.Array, key: jax.Array | None) -> tuple[Any, Any]:
    ...


class FullPrecision(NamedTuple):
  """A moment kept as a plain array.

  Args:
    dtype: storage dtype; ``None`` (default) keeps the dtype of the value written (at ``init``,
      the parameter's dtype, as ``optax.scale_by_adam`` does).
  """

  dtype: Any = None
  needs_key: bool = False

  def init(self, param):
    return jnp.zeros_like(param, dtype=self.dtype)

  def decode(self, encoded, like):
    del like
    return encoded

  def encode(self, value, key):
    del key
    return value if self.dtype is None else value.astype(self.dtype)


class SeparateStorage(NamedTuple):
  """Stores m and v with two independent codecs."""

  mu_codec: Any = FullPrecision()
  nu_codec: Any = FullPrecision()

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
    """Each codec's optional ``project(value)`` (what the update uses); identity otherwise."""
    pm = getattr(self.mu_codec, "project", None)
    pn = getattr(self.nu_codec, "project", None)
    return (mu if pm is None else pm(mu)), (nu if pn is None else pn(nu))


def full_precision_storage(mu_dtype: Any = None, nu_dtype: Any = None) -> SeparateStorage:
  """Full-precision m and v (the default storage of :func:`stax.scale_by_adam`)."""
  return SeparateStorage(FullPrecision(mu_dtype), FullPrecision(nu_dtype))


StorageLike = Union[MomentStorage, Callable[[Any], MomentStorage]]


def resolve_storage(storage: StorageLike, leaf: Any) -> MomentStorage:
  """Returns the storage for one leaf (``storage`` may be a per-leaf callable)."""
  if hasattr(storage, "read") and hasattr(storage, "write"):
    return storage
  return storage(leaf)
