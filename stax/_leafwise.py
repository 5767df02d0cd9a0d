"""Per-leaf values read so that every leaf's kernels compile alike.

XLA's CPU backend compiles one kernel per *distinct* fused computation (7–10 ms each on this
project's 2-core CPU, ``FusionCompiler::Compile`` in XLA's profile) and reuses it for every
fusion with the same body: ``optax.adamw`` on a 16M-parameter GPT launches 234 fusions of 33
distinct kernels. A per-leaf constant inside a fusion makes each leaf's kernel distinct: a slice
``vec[i]`` of a per-leaf vector fused into leaf ``i``'s loops, a leaf index mixed into a hash,
an offset into a shared random draw. STAM at 16M compiled 232 kernels that way (1.7 s of a 3 s
compile), where its passes need about 90.

Here entry ``i`` of a per-leaf vector is picked by a sum of ``where(mask_i, bits, 0)`` over its
bits as unsigned integers, with a constant mask: integer arithmetic, so every value comes back bit
for bit (NaN payloads, ±Inf, ``-0.0``, and subnormals, which a float sum on XLA's CPU backend
flushes to zero). XLA keeps a non-scalar constant as a buffer rather than fusing it, so the pick
is the same kernel for every leaf and the leaf's passes read the entry as an argument. (An
``optimization_barrier`` does not help: XLA's CPU pipeline removes barriers before fusion.)
Other backends slice.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from stax import _leafwise
  >>> v = jnp.array([1.5, -0.0, jnp.inf, jnp.nan])
  >>> [float(x) for x in jax.jit(_leafwise.entries)(v)]
  [1.5, -0.0, inf, nan]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pick", "entries", "columns", "fold_in_each"]


def pick(vec: jax.Array, i: int) -> jax.Array:
  """Entry ``i`` (a static int) along the first axis of ``vec`` (shape ``(n, ...)``), bit for
  bit ``vec[i]``, computed so that the kernel does not depend on ``i`` (module docstring)."""
  n = vec.shape[0]
  if not 0 <= i < n:
    raise IndexError(f"entry {i} of a vector of {n}")
  if jax.default_backend() != "cpu" or n == 1:
    return vec[i]
  dtype = np.dtype(vec.dtype)
  if dtype == np.bool_:
    return pick(vec.astype(jnp.uint8), i).astype(jnp.bool_)
  if dtype.kind not in "iu":  # the bits, as unsigned integers of the same width
    bits = np.dtype(f"uint{8 * dtype.itemsize}") if dtype.kind != "c" else None
    if bits is None:
      return jax.lax.complex(pick(jnp.real(vec), i), pick(jnp.imag(vec), i))
    return jax.lax.bitcast_convert_type(pick(jax.lax.bitcast_convert_type(vec, bits), i), dtype)
  zero = np.array(0, dtype)
  mask = np.zeros((n,) + (1,) * (vec.ndim - 1), bool)
  mask[i] = True
  return jnp.sum(jnp.where(mask, vec, zero), axis=0, dtype=dtype)


def entries(vec: jax.Array) -> list:
  """Every entry along the first axis of ``vec``, each by :func:`pick` (``[]`` for ``n = 0``)."""
  return [pick(vec, i) for i in range(vec.shape[0])]


def columns(vectors: dict) -> dict:
  """``{name: [entry of leaf 0, entry of leaf 1, ...]}`` for ``{name: vector}`` (each of shape
  ``(n,)``, one dtype): with several, they are stacked as the columns of an ``(n, k)`` array and
  each leaf picks its row once (fewer, larger picks; the column index is the same constant for
  every leaf)."""
  if len(vectors) <= 1:
    return {k: entries(v) for k, v in vectors.items()}
  names = list(vectors)
  rows = entries(jnp.stack([vectors[k] for k in names], axis=1))
  return {k: [r[j] for r in rows] for j, k in enumerate(names)}


def fold_in_each(key: jax.Array, n: int) -> jax.Array:
  """``(n, ...)``: ``jax.random.fold_in(key, i)`` for every ``i < n`` at once (one kernel for all
  leaves; a leaf then takes its own with :func:`pick`, bit for bit its ``fold_in``)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
