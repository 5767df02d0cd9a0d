"""How Adam's two moments are stored: the storage protocol of the shared Adam core.

The Adam core (:mod:`stax.transforms.adam`) never touches stored moments directly. For every
parameter leaf it asks a :class:`MomentStorage` for

* ``init(param) -> (mu_enc, nu_enc)``: the encoded zero moments (pytrees of arrays that keep the
  parameter's rank, so sharding metadata applies to them);
* ``read(mu_enc, nu_enc, like, ctx) -> (mu, nu)``: the decoded moments as arrays of ``like``'s
  shape;
* ``write(mu, nu, ctx) -> (mu_enc, nu_enc)``: the encoded new moments.

``ctx`` is a :class:`StorageStep`, always passed: the step count, the leaf's index, the state's
PRNG key, and in ``write`` the previous encodings and the leaf's rounding key (TurboAdam 0.2.0's
UState decodes m with the previous step's bias corrections and seeds its counter-hash RNG with
the step and the leaf index; stochastic-rounding codecs use the rounding key).

Optional members, with the defaults :class:`StorageBase` declares (every stax storage subclasses
it; an object that implements only ``init``/``read``/``write`` gets them through
:func:`as_storage`):

* ``needs_key`` (``False``): the storage rounds stochastically, so the Adam state keeps a PRNG
  key and ``ctx.rounding_key`` is set in ``write``. A per-leaf storage callable may carry
  ``needs_key = True`` too: the key is then kept whatever the leaves, so the state's structure
  does not depend on the parameters' sizes (``optax.tree.map_params`` inits from a placeholder);
* ``exact`` (``False``): full precision, no rounding: writing back what was read changes nothing,
  so a gated no-op step (:func:`stax.nonfinite_guard` with ``gated=True``) keeps the state exactly;
* ``nu_is_mean`` (``False``): the encoded v is a set of means of v (one mean per tensor, 0-d,
  :mod:`stax.codecs.tensor_rms`, STAMLite; a matrix's row and column means,
  :mod:`stax.codecs.factored`); the core forms their EMAs from the same means of ``|g|²``
  (``nu_mean_squares(g)``, each reduction over its own copy of ``g``, so no ``|g|²`` or new v is
  materialised) and hands the new means to ``write`` and ``project``;
* ``project(mu, nu) -> (mu, nu)`` (identity): the moments the update is formed from instead of
  the exact new ones (STAMLite's per-tensor RMS: the update must use what the storage keeps, one
  mean of v per tensor, not the exact elementwise v);
* ``fused_update`` (``None``): a callable ``(g, step, ctx) -> (update, mu_enc, nu_enc)`` that
  does ``read``, the core's arithmetic and ``write`` of one leaf in one pass (a fused kernel)
  and returns the Adam direction and the new encodings. ``step`` is the core's per-leaf
  arithmetic as a pure function (:class:`stax.transforms.adam.LeafStep`:
  ``step.fn(g, mu, nu, *step.operands)``, whose static configuration is closed over and whose
  array inputs are ``step.operands``, so a kernel can call it on one block); ``ctx`` is the
  ``write`` context. The core uses it only where the caller needs the direction alone
  (:func:`stax.scale_by_adam`, not :func:`stax.scale_by_stable_adam`, which needs the second
  moment the update used). It must equal :func:`read_step_write` (bit for bit for an ``"xla"``
  implementation; codes equal and floats to rounding for a kernel);
* ``uses_leaf_index`` (``True``): ``read``/``write`` read ``ctx.index``. The core traces one
  leaf's read → step → write once for all leaves of the same shapes and an equal storage
  (:func:`stax._leafwise.traced_once`); the index is then part of that trace's key, so a storage
  that reads it keeps a trace per leaf. :class:`SeparateStorage` (whose codecs draw from
  ``ctx.rounding_key``) declares ``False``; TurboAdam 0.2.0's storage seeds its hash with the
  index.

The two moments are read and written *together* because some storages keep one moment relative
to the other (TurboAdam 0.2.0's "UState" stores m as the normalised update and decodes it with v).
Codecs that store each moment on their own (a :class:`MomentCodec`) compose with
:class:`SeparateStorage`; a codec's optional members are ``needs_key``, ``exact`` and
``project(value)``, with the same defaults, and ``rows_local`` (``False``): every row of the
last axis is encoded on its own and ``encode(value, key, row0=r)`` encodes a chunk of rows
starting at row ``r`` exactly as those rows of the whole tensor, so a fused update may run the
leaf chunk by chunk (:mod:`stax.kernels.turbo_step.chunked`).

A storage may also be chosen per leaf: the Adam core accepts a callable ``leaf -> storage``
(called on a parameter leaf or on a ``jax.ShapeDtypeStruct``; it must depend only on the static
shape and dtype), e.g. "compress only tensors above 4096 elements".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Protocol, Union, runtime_checkable

import jax
import jax.numpy as jnp

from stax import numerics as num
from stax.codecs import _layout as L
from stax.codecs import rng

__all__ = [
    "MomentCodec",
    "MomentStorage",
    "StorageBase",
    "StorageStep",
    "FullPrecision",
    "SeparateStorage",
    "full_precision_storage",
    "as_storage",
    "is_storage",
    "resolve_storage", "resolve_storages",
    "read_step_write",
    "tensor_mean_square",
    "StorageLike",
]


class StorageStep(NamedTuple):
  """What the Adam core tells a storage about the step (the ``ctx`` of ``read``/``write``).

  Attributes:
    count: int32 scalar, steps taken *before* this update.
    index: the leaf's index in flatten order.
    key: the raw ``uint32[2]`` key of the Adam state (not folded), or ``None``.
    mu_enc: this leaf's previous encoded first moment (``write`` only; ``None`` in ``read``).
    nu_enc: this leaf's previous encoded second moment (``write`` only).
    rounding_key: ``write`` only, for a storage with ``needs_key``: the raw ``uint32[2]`` key
      for stochastic rounding, derived from the state key, ``count`` and ``index`` by a counter
      hash (:func:`stax.codecs.rng.leaf_keys`); ``None`` otherwise.
    rounding_keys: ``write`` only, ``None`` or :func:`stax.codecs.rng.split_key` of
      ``rounding_key`` (``uint32[2, 2]``: m's key and v's), made by the Adam core for every leaf
      at once.
    row0: ``write`` only: the moments are rows ``row0 ..`` of the leaf's row view (a chunk
      written by a row-chunked fused update, for a storage whose ``rows_local`` is true);
      ``0`` (default) for the whole leaf.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> ctx = stax.StorageStep(count=jnp.asarray(3, jnp.int32), index=1)
    >>> ctx.mu_enc is None, ctx.row0
    (True, 0)
    >>> stax.full_precision_storage().read(jnp.ones(2), jnp.ones(2), jnp.ones(2), ctx)[0].shape
    (2,)
  """

  count: jax.Array
  index: int
  key: Any = None
  mu_enc: Any = None
  nu_enc: Any = None
  rounding_key: Any = None
  row0: Any = 0
  rounding_keys: Any = None


@runtime_checkable
class MomentCodec(Protocol):
  """Stores one moment tensor. ``decode(encode(x, key)) ≈ x``.

  Optional members (see the module docstring): ``needs_key``, ``exact``, ``project(value)``.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> class Bf16:   # a minimal codec: the moment kept in bfloat16
    ...   def init(self, param): return jnp.zeros(param.shape, jnp.bfloat16)
    ...   def decode(self, encoded, like): return encoded.astype(jnp.float32)
    ...   def encode(self, value, key): return value.astype(jnp.bfloat16)
    >>> isinstance(Bf16(), stax.MomentCodec), isinstance(stax.BlockSignedCodec(), stax.MomentCodec)
    (True, True)
  """

  def init(self, param: jax.Array) -> Any:
    """Encoded zeros for a moment of ``param``'s shape."""

  def decode(self, encoded: Any, like: jax.Array) -> jax.Array:
    """The moment as an array of ``like``'s shape (float32 unless stated otherwise)."""

  def encode(self, value: jax.Array, key: jax.Array | None) -> Any:
    """Encodes ``value``; ``key`` drives stochastic rounding when ``needs_key``."""


@runtime_checkable
class MomentStorage(Protocol):
  """Stores the pair (m, v) of one parameter leaf (the required members).

  Optional members (see the module docstring and :class:`StorageBase`): ``needs_key``,
  ``exact``, ``project(mu, nu)``, ``fused_update``.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> storage = stax.full_precision_storage()
    >>> isinstance(storage, stax.MomentStorage)
    True
    >>> ctx = stax.StorageStep(count=jnp.zeros([], jnp.int32), index=0)
    >>> mu, nu = storage.read(*storage.write(jnp.ones(3), jnp.full(3, 2.0), ctx), jnp.ones(3), ctx)
    >>> nu.tolist()
    [2.0, 2.0, 2.0]
  """

  def init(self, param: jax.Array) -> tuple[Any, Any]:
    """Encoded zero moments for ``param``."""

  def read(self, mu_enc: Any, nu_enc: Any, like: jax.Array, ctx: StorageStep
           ) -> tuple[jax.Array, jax.Array]:
    """The decoded moments, each of ``like``'s shape."""

  def write(self, mu: jax.Array, nu: jax.Array, ctx: StorageStep) -> tuple[Any, Any]:
    """The encoded new moments."""


class StorageBase:
  """Base of the stax storages: the defaults of the protocol's optional members.

  Example:
    >>> import stax
    >>> base = stax.StorageBase()
    >>> base.needs_key, base.exact, base.exact_parts, base.nu_is_mean
    (False, False, (False, False), False)
    >>> isinstance(stax.full_precision_storage(), stax.StorageBase)
    True
  """

  needs_key: bool = False
  exact: bool = False
  fused_update: Optional[Callable] = None
  #: Whether ``read``/``write`` use ``ctx.index`` (the leaf's position; default True). One that
  #: does not (its randomness comes from ``ctx.rounding_key``) lets the Adam core trace a leaf's
  #: read → step → write once for every leaf of the same shapes.
  uses_leaf_index: bool = True

  def project(self, mu: jax.Array, nu: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The moments the update is formed from (default: the exact new moments)."""
    return mu, nu

  @property
  def exact_parts(self) -> tuple[bool, bool]:
    """Whether writing an unchanged m (v) gives back its encoding bit for bit (default:
    ``exact`` for both). The gated Adam core selects the old encoding of a part that is not."""
    return self.exact, self.exact

  @property
  def reduces_nu(self) -> bool:
    """Whether ``project`` reduces v over the tensor (default False). The Adam core then forms
    v's ``|g|²`` from its own copy of the gradient (:func:`stax.numerics.independent`), so XLA
    keeps the reduction in its vectorised kernel instead of materialising the saturated
    gradient it shares with the elementwise update."""
    return False

  @property
  def nu_is_mean(self) -> bool:
    """Whether the encoded v is a set of means of v (default False): one mean per tensor (a 0-d
    array) or, for a factored v, its row and column means. The Adam core then forms the new
    means as the EMAs of the stored ones and the same means of ``|g|²``
    (:meth:`nu_mean_squares`; :func:`stax.transforms.adam.adam_step`'s ``nu_mean``) and hands
    them to ``write`` and ``project`` in place of the elementwise v."""
    return False

  def nu_mean_squares(self, g: jax.Array) -> Any:
    """For a storage whose :attr:`nu_is_mean`: the means of ``|g|²`` its encoded v keeps, in
    float32, laid out like that encoding (default: the tensor mean, 0-d,
    :func:`tensor_mean_square`). Each reduction reads its own copy of ``g``, so XLA runs it in
    its vectorised kernel without materialising ``|g|²``."""
    return tensor_mean_square(g)


def tensor_mean_square(g: jax.Array) -> jax.Array:
  """``mean(|g|²)`` in float32 (overflow-safe, :func:`stax.numerics.mean`): the statistic of a
  v kept as one mean per tensor."""
  return num.mean(jnp.square(g.astype(jnp.float32)))


def _optional(obj: Any, name: str, default: Any) -> Any:
  """``obj``'s optional protocol member ``name``, or the protocol's declared default."""
  return getattr(obj, name, default)


@dataclasses.dataclass(frozen=True)
class _WithDefaults(StorageBase):
  """A storage implementing only the required members, given the optional ones it lacks."""

  inner: Any

  @property
  def needs_key(self) -> bool:
    return bool(_optional(self.inner, "needs_key", False))

  @property
  def exact(self) -> bool:
    return bool(_optional(self.inner, "exact", False))

  @property
  def fused_update(self) -> Optional[Callable]:
    return _optional(self.inner, "fused_update", None)

  @property
  def uses_leaf_index(self) -> bool:
    return bool(_optional(self.inner, "uses_leaf_index", True))

  @property
  def reduces_nu(self) -> bool:
    return bool(_optional(self.inner, "reduces_nu", False))

  @property
  def nu_is_mean(self) -> bool:
    return bool(_optional(self.inner, "nu_is_mean", False))

  def project(self, mu, nu):
    project = _optional(self.inner, "project", None)
    return (mu, nu) if project is None else project(mu, nu)

  def init(self, param):
    return self.inner.init(param)

  def read(self, mu_enc, nu_enc, like, ctx):
    return self.inner.read(mu_enc, nu_enc, like, ctx)

  def write(self, mu, nu, ctx):
    return self.inner.write(mu, nu, ctx)


def as_storage(storage: MomentStorage) -> StorageBase:
  """``storage`` with every optional member (a :class:`StorageBase` is returned as is)."""
  if isinstance(storage, StorageBase):
    return storage
  if not isinstance(storage, MomentStorage):
    raise TypeError(f"not a moment storage (it needs init, read and write): {storage!r}")
  return _WithDefaults(storage)


class FullPrecision(NamedTuple):
  """A moment kept as a plain array (an exact codec).

  Args:
    dtype: storage dtype; ``None`` (default) keeps the dtype of the value written (at ``init``,
      the parameter's dtype, as ``optax.scale_by_adam`` does).
    needs_key: False (a plain array draws no random numbers).
    widen_float16: with ``dtype=None``, a float16 parameter's moment is kept in float32 (default
      False; the second moment's default storage sets it, :func:`full_precision_storage`).
      float16's smallest value is 6e-8, so ``(1 - β2)·g²`` rounds to 0 for every ``|g|`` below
      7.7e-3 at ``β2 = 0.999``: a float16 v of a small or sparse gradient reads 0 where m does
      not, and ``m/(√v + ε)`` (``ε = 1e-8`` is 0 in float16 too) overflows to ±Inf: with
      float16 parameters ``optax.adamw`` writes Inf into them on its first step.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> stax.FullPrecision(jnp.bfloat16).encode(jnp.ones(3), None).dtype
    dtype(bfloat16)
    >>> stax.FullPrecision(widen_float16=True).init(jnp.zeros(3, jnp.float16)).dtype
    dtype('float32')
  """

  dtype: Any = None
  needs_key: bool = False
  widen_float16: bool = False

  exact = True
  rows_local = True

  def init(self, param):
    dtype = self.dtype
    if dtype is None and self.widen_float16 and jnp.dtype(param.dtype) == jnp.float16:
      dtype = jnp.float32
    return jnp.zeros_like(param, dtype=dtype)

  def decode(self, encoded, like):
    del like
    return encoded

  def encode(self, value, key, row0=0):
    del key, row0
    return value if self.dtype is None else value.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class SeparateStorage(StorageBase):
  """Stores m and v with two independent codecs (:class:`MomentCodec`).

  Args:
    mu_codec: the first moment's codec (default full precision).
    nu_codec: the second moment's codec (default full precision).
    follow_sharding: constrain every encoded array of rank >= 1 to the moment's sharding under an
      explicit mesh (default False).
    kernel: ``None`` (default), or a fused update ``(storage, g, step, ctx) -> (update, mu_enc,
      nu_enc)`` (:mod:`stax.kernels.turbo_step`): this storage's ``fused_update``, offered when
      both codecs are ``rows_local`` (each row encoded on its own, and ``encode(value, key,
      row0=r)`` encodes a chunk of rows starting at row ``r``).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> storage = stax.SeparateStorage(stax.BlockSignedCodec(4, 32), stax.LogQuantCodec(4, 128))
    >>> storage.needs_key, storage.exact, storage.rows_local
    (True, False, True)
    >>> mu_enc, nu_enc = storage.init(jnp.zeros((2, 128)))
    >>> mu_enc.codes.shape, nu_enc.scales.shape
    ((2, 64), (2, 1, 2))
  """

  mu_codec: Any = FullPrecision()
  nu_codec: Any = FullPrecision(widen_float16=True)
  follow_sharding: bool = False
  kernel: Optional[Callable] = None

  uses_leaf_index = False   # its codecs draw from ctx.rounding_key

  @property
  def needs_key(self) -> bool:
    return bool(_optional(self.mu_codec, "needs_key", False)
                or _optional(self.nu_codec, "needs_key", False))

  @property
  def exact(self) -> bool:
    return all(self.exact_parts)

  @property
  def exact_parts(self) -> tuple[bool, bool]:
    return (bool(_optional(self.mu_codec, "exact", False)),
            bool(_optional(self.nu_codec, "exact", False)))

  @property
  def reduces_nu(self) -> bool:
    return bool(_optional(self.nu_codec, "reduces", False))

  @property
  def nu_is_mean(self) -> bool:
    return bool(_optional(self.nu_codec, "is_mean", False))

  def nu_mean_squares(self, g):
    """The v codec's ``mean_squares(g)`` (see :meth:`StorageBase.nu_mean_squares`)."""
    fn = _optional(self.nu_codec, "mean_squares", None)
    return super().nu_mean_squares(g) if fn is None else fn(g)

  @property
  def rows_local(self) -> bool:
    """True when both codecs encode each row on its own (a row chunk can be written alone)."""
    return bool(_optional(self.mu_codec, "rows_local", False)
                and _optional(self.nu_codec, "rows_local", False))

  @property
  def fused_update(self) -> Optional[Callable]:
    if self.kernel is None or not self.rows_local:
      return None
    return functools.partial(self.kernel, self)

  def init(self, param):
    return self.mu_codec.init(param), self.nu_codec.init(param)

  def read(self, mu_enc, nu_enc, like, ctx):
    del ctx
    return self.mu_codec.decode(mu_enc, like), self.nu_codec.decode(nu_enc, like)

  def write(self, mu, nu, ctx):
    key = ctx.rounding_key
    whole = isinstance(ctx.row0, int) and ctx.row0 == 0
    enc = lambda codec, x, k: codec.encode(x, k) if whole else codec.encode(x, k, row0=ctx.row0)
    if key is None or not self.needs_key:
      mu_enc, nu_enc = enc(self.mu_codec, mu, None), enc(self.nu_codec, nu, None)
    else:
      # (the core's split, made for every leaf at once, else this leaf's: the same two keys)
      k_mu, k_nu = rng.split_key(key) if ctx.rounding_keys is None else ctx.rounding_keys
      mu_enc, nu_enc = enc(self.mu_codec, mu, k_mu), enc(self.nu_codec, nu, k_nu)
    if self.follow_sharding:
      # (a codec whose encoding is replicated, the factored v's means, keeps it so)
      mu_enc, nu_enc = (enc_ if _optional(codec, "replicated", False) else _follow(enc_, mu)
                        for codec, enc_ in ((self.mu_codec, mu_enc), (self.nu_codec, nu_enc)))
    return mu_enc, nu_enc

  def project(self, mu, nu):
    """Each codec's ``project(value)`` (what the update uses); identity for a codec without."""
    pm = _optional(self.mu_codec, "project", None)
    pn = _optional(self.nu_codec, "project", None)
    return (mu if pm is None else pm(mu)), (nu if pn is None else pn(nu))


def _follow(encoded: Any, like: jax.Array) -> Any:
  """Every array in ``encoded`` laid out like ``like`` (rank >= ``like``'s: ``like.shape[:-1]``
  then the encoding's own axes) resharded to follow ``like``'s sharding; lower-rank arrays
  (scalars, a factored moment's row and column means) are left as they are."""
  return jax.tree.map(lambda x: L.constrain_like(x, like)
                      if jnp.ndim(x) and jnp.ndim(x) >= jnp.ndim(like) else x, encoded)


def full_precision_storage(mu_dtype: Any = None, nu_dtype: Any = None) -> SeparateStorage:
  """Full-precision m and v (the default storage of :func:`stax.scale_by_adam`): m in
  ``mu_dtype`` and v in ``nu_dtype``, each ``None`` for the parameter's dtype, but v of a
  float16 parameter in float32 (:class:`FullPrecision`'s ``widen_float16``: in float16 it
  underflows to 0 for gradients below 7.7e-3 and the update overflows).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> mu, nu = stax.full_precision_storage().init(jnp.zeros(3, jnp.float16))
    >>> mu.dtype, nu.dtype
    (dtype('float16'), dtype('float32'))
    >>> stax.full_precision_storage(nu_dtype=jnp.bfloat16).exact
    True
  """
  return SeparateStorage(FullPrecision(mu_dtype),
                         FullPrecision(nu_dtype, widen_float16=nu_dtype is None))


StorageLike = Union[MomentStorage, Callable[[Any], MomentStorage]]


def is_storage(storage: StorageLike) -> bool:
  """True for a storage, False for a per-leaf callable returning one."""
  return isinstance(storage, (StorageBase, MomentStorage))


def resolve_storage(storage: StorageLike, leaf: Any) -> StorageBase:
  """The storage of one leaf (``storage`` may be a per-leaf callable), with every optional
  member (:func:`as_storage`)."""
  return as_storage(storage if is_storage(storage) else storage(leaf))


def resolve_storages(storage: StorageLike, tree: Any) -> list:
  """The storage of each leaf of ``tree`` (flatten order), as :func:`resolve_storage`; a
  per-leaf callable with a ``for_tree`` member (``tree -> list of storages``) is asked for the
  whole tree at once, so it can read each leaf's path (its layout, :mod:`stax.layout`)."""
  for_tree = None if is_storage(storage) else getattr(storage, "for_tree", None)
  if for_tree is not None:
    return [as_storage(s) for s in for_tree(tree)]
  return [resolve_storage(storage, x) for x in jax.tree.leaves(tree)]


def read_step_write(storage: Any, g: jax.Array, step: Callable, ctx: StorageStep
                    ) -> tuple[Any, Any, Any]:
  """One leaf through ``storage`` unfused: ``read`` → ``step(g, mu, nu)`` → ``write``.

  ``step`` is the core's :class:`~stax.transforms.adam.LeafStep` and ``ctx`` the ``write``
  context; returns ``(step's AdamStep, mu_enc, nu_enc)``. A storage's ``fused_update`` returns
  the same with the AdamStep's ``update`` alone.
  """
  mu, nu = storage.read(ctx.mu_enc, ctx.nu_enc, g,
                        ctx._replace(mu_enc=None, nu_enc=None, rounding_key=None))
  out = step(g, mu, nu)
  mu_enc, nu_enc = storage.write(out.mu, out.nu, ctx)
  return out, mu_enc, nu_enc
