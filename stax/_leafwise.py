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

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pick", "entries", "columns", "fold_in_each", "traced_once", "shared_trace"]


def pick(vec: jax.Array, i: int) -> jax.Array:
  """Entry ``i`` (a static int) along the first axis of ``vec`` (shape ``(n, ...)``), bit for
  bit ``vec[i]``, computed so that the kernel does not depend on ``i`` (module docstring)."""
  n = vec.shape[0]
  if not 0 <= i < n:
    raise IndexError(f"entry {i} of a vector of {n}")
  if jax.default_backend() != "cpu" or n == 1:
    return vec[i]
  mask = np.zeros((n,) + (1,) * (vec.ndim - 1), bool)
  mask[i] = True
  # the mask is an argument of one shared trace (traced_once), a constant once inlined
  return shared_trace(_masked_pick)(vec, mask)


def _masked_pick(vec, mask):
  """The entry of ``vec`` where ``mask`` (one true entry) is, from its bits (:func:`pick`)."""
  dtype = np.dtype(vec.dtype)
  if dtype == np.bool_:
    return _masked_pick(vec.astype(jnp.uint8), mask).astype(jnp.bool_)
  if dtype.kind not in "iu":  # the bits, as unsigned integers of the same width
    if dtype.kind == "c":
      return jax.lax.complex(_masked_pick(jnp.real(vec), mask),
                             _masked_pick(jnp.imag(vec), mask))
    bits = np.dtype(f"uint{8 * dtype.itemsize}")
    return jax.lax.bitcast_convert_type(
        _masked_pick(jax.lax.bitcast_convert_type(vec, bits), mask), dtype)
  return jnp.sum(jnp.where(mask, vec, np.array(0, dtype)), axis=0, dtype=dtype)


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


def traced_once(make: Callable[..., Callable], *static: Any) -> Callable:
  """``make(*static)``, a function of arrays, traced once per distinct shape of its arguments.

  A step runs the same per-leaf code on every leaf, and JAX traces it again for each: every
  ``jax.numpy`` call is a nested ``jit`` that costs ~0.1 ms to trace and inline, so STAM's trace
  of GPT-2 small's 148 leaves took 0.6 s of a 3.5 s first step. Here the function ``make``
  builds from the hashable configuration ``static`` is wrapped in ``jax.jit(..., inline=True)``
  and kept (per ``(make, static)``), so every leaf with the same shapes and dtypes reuses one
  trace, which JAX inlines into the step: the traced program, and so the compiled one, is the
  same as without it. A bound method in ``static`` counts by its object's value (equal storages
  of two leaves share the trace). ``make`` must be a module-level function (the cache keys on
  it) and the built function pure in its array arguments (it may not close over arrays or
  tracers). Where ``static`` is not hashable (an array inside it), ``make(*static)`` is returned
  as is (traced per leaf). Called outside a trace, the built function runs compiled, as any
  jitted function does. The cache keeps the last 1024 configurations.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from stax import _leafwise
    >>> def make(scale):
    ...   return lambda x: x * scale
    >>> f = _leafwise.traced_once(make, 2.0)
    >>> f is _leafwise.traced_once(make, 2.0), float(f(jnp.float32(3.0)))
    (True, 6.0)
  """
  static = tuple(_Method(m.__self__, m.__func__) if inspect.ismethod(m) else m for m in static)
  try:
    hash(static)
  except TypeError:
    return make(*static)
  return _traced_once(make, static)


def shared_trace(fn: Callable) -> Callable:
  """The module-level function ``fn`` itself, traced once per shape of its arguments
  (:func:`traced_once` with nothing to configure)."""
  return traced_once(_itself, fn)


def _itself(fn: Callable) -> Callable:
  return fn


class _Method(NamedTuple):
  """A bound method compared by its object's value: Python compares bound methods by the
  identity of their object, so equal storages of two leaves would not share a trace."""

  obj: Any
  func: Callable

  def __call__(self, *args, **kwargs):
    return self.func(self.obj, *args, **kwargs)


@functools.lru_cache(maxsize=1024)
def _traced_once(make, static):
  return jax.jit(make(*static), inline=True)
