"""TurboAdam 0.2.0's counter-hash RNG, bit for bit, in uint32 jnp arithmetic.

* ``mix32``: ``x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15; x *= 0x846CA68B; x ^= x>>16`` (mod 2**32).
* ``counter_uniform(index, seed)``: antithetic pairs; element ``i`` hashes ``key = i // 2`` as
  ``mix32(key ^ seed)``, takes the top 24 bits ``u = (x >> 8)·2**-24`` and returns ``u`` for even
  ``i`` and ``min(1 - u, 1 - 2**-24)`` for odd ``i``.
* ``seed_for(seed, step, group, param, stream)``: the per-tensor seed mixed from the optimizer
  seed, the step (1-based), the group and parameter indices and the stream (1: m, 2: v) with the
  constants 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2D.

The element index is the position in the row-major *padded* layout ``(..., n_pad)``; it equals the
seed's flat index whenever the last axis is a multiple of the block size (or the tensor is 1-D).

stax's own uses of the hash (not in the seed): ``key_to_seed`` (a 32-bit seed from a raw
``uint32[2]`` JAX key, for stax's codecs), ``counter_symmetric`` (uniform draws on (-1, 1),
SCAO's subspace-iteration test matrices), and ``leaf_keys`` / ``split_key`` (the Adam core's
per-step, per-leaf rounding keys derived from the state key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mix32", "counter_uniform", "counter_symmetric", "seed_for", "flat_index",
           "seed_from_key", "key_to_seed", "leaf_keys", "split_key"]

_U32 = jnp.uint32


def mix32(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, _U32)
  x = x ^ (x >> _U32(16))
  x = x * _U32(0x7FEB352D)
  x = x ^ (x >> _U32(15))
  x = x * _U32(0x846CA68B)
  return x ^ (x >> _U32(16))


def counter_uniform(index: jax.Array, seed: jax.Array, antithetic: bool = True) -> jax.Array:
  """float32 uniforms in [0, 1) for uint32 element indices ``index`` (any shape)."""
  index = jnp.asarray(index, _U32)
  key = index >> _U32(1) if antithetic else index
  x = mix32(key ^ jnp.asarray(seed, _U32))
  base = (x >> _U32(8)).astype(jnp.float32) * jnp.float32(2.0 ** -24)
  if not antithetic:
    return base
  odd = (index & _U32(1)) == _U32(1)
  return jnp.where(odd, jnp.minimum(jnp.float32(1.0) - base, jnp.float32(1.0 - 2.0 ** -24)), base)


def counter_symmetric(size: int, seed: jax.Array) -> jax.Array:
  """``size`` float32 draws uniform on (-1, 1) (24 random bits each, symmetric about 0): the
  top 24 bits ``k`` of ``mix32(i ^ seed)`` for element ``i``, as ``(2k + 1 - 2**24)·2**-24``
  (an odd integer below 2**24 in magnitude, exact in float32). A handful of integer
  operations, where ``jax.random.normal`` compiles to threefry rounds and an
  inverse-error-function polynomial (kernels of ~50 and ~110 operations, distinct per size)."""
  x = mix32(jax.lax.iota(_U32, size) ^ jnp.asarray(seed, _U32))
  j = (x >> _U32(8)).astype(jnp.int32) * 2 + (1 - (1 << 24))
  return j.astype(jnp.float32) * jnp.float32(2.0 ** -24)


def seed_for(seed: jax.Array, step: jax.Array, group_index: int, param_index: int,
             stream: int) -> jax.Array:
  """The seed of one tensor and stream at 1-based ``step`` (uint32 scalar)."""
  v = jnp.asarray(seed, _U32)
  v = v ^ (jnp.asarray(step).astype(_U32) * _U32(0x9E3779B9))
  v = v ^ _U32(((group_index + 1) * 0x85EBCA6B) & 0xFFFFFFFF)
  v = v ^ _U32(((param_index + 1) * 0xC2B2AE35) & 0xFFFFFFFF)
  v = v ^ _U32((stream * 0x27D4EB2D) & 0xFFFFFFFF)
  return mix32(v)


def flat_index(shape: tuple, like=None) -> jax.Array:
  """uint32 row-major flat index of every element of ``shape``."""
  idx = jnp.zeros(shape, _U32)
  stride = 1
  for ax in range(len(shape) - 1, -1, -1):
    idx = idx + jax.lax.broadcasted_iota(_U32, shape, ax) * _U32(stride & 0xFFFFFFFF)
    stride *= shape[ax]
  return idx


def seed_from_key(key: jax.Array) -> jax.Array:
  """The 32-bit seed held in a raw ``uint32[2]`` key made by ``PRNGKey(seed)`` (its low word)."""
  return jnp.asarray(key, _U32)[..., -1]


def key_to_seed(key: jax.Array) -> jax.Array:
  """A uint32 stream seed from a raw ``uint32[2]`` per-leaf key (both words mixed)."""
  k = jnp.asarray(key, jnp.uint32)
  return k[..., 0] ^ (k[..., 1] * jnp.uint32(0x9E3779B9))


def _words(seed: jax.Array, count: int) -> jax.Array:
  """``count`` uint32 words ``mix32(seed ^ mix32(j + 1))`` for ``j < count`` (``seed``'s shape
  leading)."""
  j = mix32(jax.lax.iota(_U32, count) + _U32(1))
  return mix32(jnp.asarray(seed, _U32)[..., None] ^ j)


def leaf_keys(key: jax.Array, count: jax.Array, n: int) -> jax.Array:
  """``uint32[n, 2]``: raw keys for ``n`` leaves at step ``count``, from the raw ``uint32[2]``
  state ``key``: leaf ``i``'s words are ``mix32(s ^ mix32(2i + w + 1))`` (``w`` = 0, 1) of the
  step's seed ``s = mix32(key_to_seed(key) ^ mix32(count·0x9E3779B9 + 1))``.

  A few integer operations in one small kernel for every leaf. The Adam core formerly folded
  the state key with the count and then with each leaf's index (``jax.random.fold_in``) and
  split each result: three threefry loops and 20 distinct kernels of TurboAdam's compiled step
  on GPT-2 small. The keys only seed :func:`counter_uniform`'s per-element hash (each codec
  mixes both words with :func:`key_to_seed`), so a hash of (key, step, leaf) serves as well; a
  codec that wants threefry draws may still use them as ``jax.random`` keys.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from stax.codecs import rng
    >>> keys = rng.leaf_keys(jax.random.key_data(jax.random.PRNGKey(0)), jnp.int32(3), 4)
    >>> keys.shape, keys.dtype.name, rng.split_key(keys).shape
    ((4, 2), 'uint32', (4, 2, 2))
  """
  step = jnp.asarray(count).astype(_U32) * _U32(0x9E3779B9) + _U32(1)
  s = mix32(key_to_seed(key) ^ mix32(step))
  return _words(s, 2 * n).reshape(n, 2)


def split_key(key: jax.Array) -> jax.Array:
  """``uint32[..., 2, 2]``: two raw keys from each raw ``uint32[..., 2]`` ``key`` (the Adam
  core's ``rounding_keys``, m's and v's, in place of ``jax.random.split``): words
  ``mix32(key_to_seed(key) ^ mix32(w + 1))``, ``w < 4``."""
  k = jnp.asarray(key, _U32)
  return _words(key_to_seed(k), 4).reshape(k.shape[:-1] + (2, 2))
