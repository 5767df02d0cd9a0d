r"""The ``"chunked"`` implementation of the fused TurboAdam update: the leaf, a chunk of rows at
a time, in one XLA loop.

For a storage whose codecs encode every row on its own (``rows_local``: stax's blockwise
codecs, :class:`~stax.codecs.base.SeparateStorage` of :class:`~stax.codecs.block_signed.BlockSignedCodec`
and :class:`~stax.codecs.log_quant.LogQuantCodec`), the leaf's row view ``(rows, n)`` is cut
into chunks of ``r`` rows (about :data:`CHUNK_ELEMENTS` elements each) and a ``lax.map`` runs
read → the core's step → write on each, with the chunk's first row passed to the codecs
(``StorageStep.row0``) so the counter-hash stream is the whole tensor's. Every row's codes,
scales and direction are those of the whole-tensor program (the ``"xla"`` reference): the
state bit for bit, the direction to float32 rounding (XLA may contract ``a·b + c`` into an FMA
differently in the two programs).

Why: decoding and re-encoding need per-block reductions (log-domain min/max, absmax) between
elementwise passes, so on the whole tensor XLA materialises several float32 temporaries per
leaf (decoded v, its log, the new m, ...), each a full pass through memory, and its buffer
assignment kept those of every leaf live at once: a TurboAdam step at 128M parameters needed
2.1 GiB of temporaries against 0 for ``optax.adamw``. A chunk's temporaries stay in cache and
live for one iteration.

The chunk is whole rows: ``r`` is the largest divisor of ``rows`` with ``r·n`` at most
:data:`CHUNK_ELEMENTS` and at least a quarter of it; without such a divisor the last
``rows mod r`` rows are one more chunk after the loop. A 1-D leaf, one that fits in one chunk
and one sharded under an explicit mesh (whose rows a loop would gather) run as one chunk: the
``"xla"`` program. A storage that is not ``rows_local`` (TurboAdam 0.2.0's UState, whose next
step size is a sum over the whole tensor) raises ``NotImplementedError`` (so
``implementation=None`` falls back to ``"xla"``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from stax.codecs import _layout as L
from stax.codecs.base import read_step_write
from stax.kernels.turbo_step.reference import turbo_update_reference

__all__ = ["turbo_update_chunked", "CHUNK_ELEMENTS", "rows_per_chunk"]

#: Target elements per chunk (float32: 128 KiB per array, a few arrays live: in L2).
CHUNK_ELEMENTS = 1 << 15


def rows_per_chunk(rows: int, n: int, target: int = CHUNK_ELEMENTS) -> int:
  """Rows per chunk: the largest divisor of ``rows`` with ``r·n <= target`` and ``r·n >=
  target/4``, else ``max(1, target // n)`` (the remainder becomes one more chunk)."""
  want = max(1, target // max(n, 1))
  for r in range(min(want, rows), 0, -1):
    if r * n * 4 < target:
      break
    if rows % r == 0:
      return r
  return min(want, rows)


def turbo_update_chunked(storage: Any, g: jax.Array, step: Any, ctx: Any, *,
                         chunk_elements: Optional[int] = None
                         ) -> tuple[jax.Array, Any, Any]:
  """``(update, mu_enc, nu_enc)`` of one leaf, chunk by chunk (see the module docstring;
  ``chunk_elements`` defaults to :data:`CHUNK_ELEMENTS`)."""
  if not getattr(storage, "rows_local", False):
    raise NotImplementedError("the storage does not encode rows independently")
  shape = tuple(g.shape)
  n, lead = shape[-1], shape[:-1]
  rows = math.prod(lead)
  r = rows_per_chunk(rows, n, CHUNK_ELEMENTS if chunk_elements is None else chunk_elements)
  if len(shape) < 2 or r >= rows or L.explicit_spec(g) is not None:
    return turbo_update_reference(storage, g, step, ctx)        # one chunk: the same program
  k = len(lead)
  flat = lambda x: jnp.reshape(x, (rows,) + tuple(x.shape[k:]))
  g2 = g.reshape(rows, n)
  me, ne = jax.tree.map(flat, ctx.mu_enc), jax.tree.map(flat, ctx.nu_enc)

  def run(row0, g_c, me_c, ne_c):
    out, a, c = read_step_write(storage, g_c, step,
                                ctx._replace(mu_enc=me_c, nu_enc=ne_c, row0=row0))
    return out.update, a, c

  main = (rows // r) * r
  chunk = lambda x: jnp.reshape(x[:main], (main // r, r) + tuple(x.shape[1:]))
  stacked = (chunk(g2), jax.tree.map(chunk, me), jax.tree.map(chunk, ne))
  starts = jnp.arange(main // r, dtype=jnp.int32) * r
  ys = jax.lax.map(lambda a: run(*a), (starts, *stacked))
  unstack = lambda y: jnp.reshape(y, (main,) + tuple(y.shape[2:]))
  u, a, c = jax.tree.map(unstack, ys)
  if main < rows:                      # the remainder rows, as one more chunk
    tail = lambda x: x[main:]
    u_t, a_t, c_t = run(main, tail(g2), jax.tree.map(tail, me), jax.tree.map(tail, ne))
    cat = lambda x, y: jnp.concatenate([x, y], axis=0)
    u, a, c = cat(u, u_t), jax.tree.map(cat, a, a_t), jax.tree.map(cat, c, c_t)
  back = lambda y, like: jnp.reshape(y, tuple(like.shape))
  return (u.reshape(shape), jax.tree.map(back, a, ctx.mu_enc),
          jax.tree.map(back, c, ctx.nu_enc))
