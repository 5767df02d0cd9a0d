"""Integer formulations that replace float library calls on a hot or compile-heavy path, each
against an independent NumPy definition: ``numerics._exponent`` (``frexp``'s exponent),
``block_signed.bf16_ceil`` (the smallest bfloat16 at or above a float32),
``rng.counter_symmetric`` (uniform draws from the counter hash) and ``rng.leaf_keys`` /
``rng.split_key`` (the Adam core's rounding keys, hashed instead of threefry's fold_in/split)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from stax import numerics
from stax.codecs.block_signed import bf16_ceil
from stax.codecs.rng import counter_symmetric, leaf_keys, split_key


def _random_bits(n, top, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, top, n, dtype=np.uint64).astype(dtype)


@pytest.mark.parametrize("dtype,udtype,top", [
    (np.float32, np.uint32, 0x7F800000), (np.float16, np.uint16, 0x7C00),
    (ml_dtypes.bfloat16, np.uint16, 0x7F80)])
def test_exponent_is_frexps_for_normal_zero_inf_and_nan(dtype, udtype, top):
  bits = _random_bits(200_000, top, udtype)
  x = np.concatenate([bits.view(dtype), np.array([0.0, np.inf, np.nan], dtype)])
  normal = (x == 0) | ~np.isfinite(x) | (np.abs(x.astype(np.float64))
                                          >= float(ml_dtypes.finfo(dtype).tiny))
  _, want = np.frexp(x.astype(np.float64))             # float64: every value is normal there
  want = np.where(np.isfinite(x), want, 0)
  got = np.asarray(jax.jit(numerics._exponent)(jnp.asarray(x)))
  np.testing.assert_array_equal(got[normal], want[normal])


def _bf16_ceil_reference(x):
  """Round to nearest even, then one bfloat16 step up where that fell below ``x``."""
  near = x.astype(ml_dtypes.bfloat16)
  up = (near.view(np.uint16) + 1).view(ml_dtypes.bfloat16)
  below = near.astype(np.float32) < x
  return np.where(below & np.isfinite(x), up, near)


def test_bf16_ceil_is_the_smallest_bfloat16_at_or_above():
  bits = np.concatenate([_random_bits(1_000_000, 0x7F800000, np.uint32),
                         np.array([0, 1, 0xFFFF, 0x10000, 0x10001, 0x3F800000, 0x3F800001,
                                   0x7F7F0000, 0x7F7F0001, 0x7F7FFFFF], np.uint32)])
  x = bits.view(np.float32)                           # every finite x >= 0, subnormals too
  got = np.asarray(jax.jit(bf16_ceil)(jnp.asarray(x)))
  want = _bf16_ceil_reference(x)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  assert np.all(got.astype(np.float32) >= x)
  special = np.asarray(bf16_ceil(jnp.asarray([np.inf, np.nan, 0.0], jnp.float32)))
  assert special[0] == np.inf and np.isnan(special[1]) and special[2] == 0.0


def _mix32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def test_counter_symmetric_is_the_hash_on_a_symmetric_grid():
  n, seed = 200_000, 0xC0FFEE
  got = np.asarray(jax.jit(counter_symmetric, static_argnums=0)(n, jnp.uint32(seed)))
  with np.errstate(over="ignore"):
    k = _mix32(np.arange(n, dtype=np.uint32) ^ np.uint32(seed)) >> np.uint32(8)
  want = ((2.0 * k.astype(np.float64) + 1.0 - 2.0 ** 24) * 2.0 ** -24).astype(np.float32)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float32 and np.all(np.abs(got) < 1.0)
  assert abs(got.mean()) < 0.01 and abs(got.var() - 1.0 / 3.0) < 0.01     # uniform on (-1, 1)
  other = np.asarray(counter_symmetric(n, jnp.uint32(seed + 1)))
  assert abs(np.corrcoef(got, other)[0, 1]) < 0.01


def _key_seed(key):
  key = np.asarray(key, np.uint32)
  with np.errstate(over="ignore"):
    return key[..., 0] ^ (key[..., 1] * np.uint32(0x9E3779B9))


def _words(seed, count):
  with np.errstate(over="ignore"):
    j = _mix32(np.arange(count, dtype=np.uint32) + np.uint32(1))
    return _mix32(np.asarray(seed, np.uint32)[..., None] ^ j)


@pytest.mark.parametrize("count", [0, 1, 2 ** 31 - 1])
def test_leaf_keys_and_their_split_are_the_hash_of_key_step_and_leaf(count):
  """Leaf ``i``'s key at step ``t``: words ``mix32(s ^ mix32(2i + w + 1))`` of the step seed
  ``s = mix32(key_to_seed(key) ^ mix32(t·0x9E3779B9 + 1))``; its split: words
  ``mix32(key_to_seed(k) ^ mix32(w + 1))``, ``w < 4``. Distinct for every leaf, step and half."""
  key = np.asarray(jax.random.key_data(jax.random.PRNGKey(3)))
  n = 300
  got = np.asarray(jax.jit(leaf_keys, static_argnums=2)(jnp.asarray(key), jnp.int32(count), n))
  with np.errstate(over="ignore"):
    step = np.uint32(count) * np.uint32(0x9E3779B9) + np.uint32(1)
    s = _mix32(_key_seed(key) ^ _mix32(step))
  want = _words(s, 2 * n).reshape(n, 2)
  np.testing.assert_array_equal(got, want)
  pairs = np.asarray(jax.jit(split_key)(jnp.asarray(got)))
  np.testing.assert_array_equal(pairs, _words(_key_seed(got), 4).reshape(n, 2, 2))
  later = np.asarray(leaf_keys(jnp.asarray(key), jnp.int32(count) + 1, n))
  words = np.concatenate([got.ravel(), later.ravel(), pairs.ravel()])
  assert len(np.unique(words)) == words.size                    # no repeated word at all
  seeds = _key_seed(np.concatenate([got, later, pairs.reshape(-1, 2)]))
  assert len(np.unique(seeds)) == seeds.size                    # nor a repeated codec seed
