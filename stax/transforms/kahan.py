r"""Kahan-compensated parameter updates for bf16/fp16 parameters, with plain ``optax.apply_updates``.

Adding a small update ``u`` to a bf16 parameter rounds it away when ``|u|`` is below half an ulp
of ``p`` (``2^-8·|p|``): training in bf16 then stagnates. Kahan summation keeps the part that
did not make it into the parameter in a compensation buffer ``c`` (in this transform's state)
and adds it back at the next step:

.. math::
  s = c + u,\qquad p' = \operatorname{round}(p + s),\qquad c' = s - (p' - p)

The transform is the *last* element of a chain (after ``scale_by_learning_rate``). It returns
the update ``p' − p`` in the parameter dtype; ``optax.apply_updates`` then computes
``round(p + (p' − p))``. That difference of two nearby bf16 numbers is exact (Sterbenz), so the
addition reproduces ``p'``; and because the transform computes ``p'`` with exactly the operation
``apply_updates`` performs, the compensation stays exact even in the rare case where it is not.
Only low-precision (bf16/fp16) leaves are compensated; other leaves pass through unchanged
and keep no buffer.

Differences from optimi's Kahan path: the whole update (weight decay included) is compensated,
and the buffer dtype is selectable (``comp_dtype``; default the parameter dtype as in optimi,
``jnp.float32`` tracks a float32 reference more closely at 2 more bytes per parameter).

Reference: ``torchdistx`` ``AnyPrecisionAdamW`` / ``torch-optimi``'s ``kahan_sum``.

Example:
  >>> import jax.numpy as jnp, optax, stax
  >>> tx = optax.chain(optax.sgd(1e-4), stax.kahan_summation())
  >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
  >>> state = tx.init(params)
  >>> u, state = tx.update({"w": jnp.ones(4, jnp.bfloat16)}, state, params)
  >>> params = optax.apply_updates(params, u)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from stax import _validation as V
from stax.transforms.guards import NONFINITE_OK, GateAwareTransformation, gate_aware, gate_value

__all__ = ["KahanState", "kahan_summation", "LOW_PRECISION"]

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class KahanState(NamedTuple):
  """State of :func:`kahan_summation`: ``comp`` holds one buffer per low-precision leaf
  (``None`` for the others)."""

  comp: Any


def _compensated(p) -> bool:
  return p is not None and jnp.dtype(p.dtype) in LOW_PRECISION


def kahan_summation(comp_dtype: Any = None, *, enabled: bool = True
                    ) -> GateAwareTransformation:
  """Compensated summation of the final updates into low-precision parameters.

  Args:
    comp_dtype: dtype of the compensation buffers (default ``None``: the parameter's dtype,
      optimi's choice; ``jnp.float32`` is more accurate).
    enabled: ``False`` returns ``optax.identity()`` (kept for static configuration).

  Returns:
    A gate-aware ``optax.GradientTransformationExtraArgs``
    (:class:`~stax.transforms.guards.GateAwareTransformation`) that needs ``params`` in
    ``update``. With the extra argument ``nonfinite_ok`` (from ``nonfinite_guard(gated=True)``,
    which zeroes the updates of such a step) false, the compensation buffers are kept as they
    are.
  """
  V.check_bool("enabled", enabled)
  V.check_dtype("comp_dtype", comp_dtype)
  if not enabled:
    return gate_aware(optax.identity())

  def init_fn(params):
    return KahanState(jax.tree.map(
        # zeros_like: the buffer keeps its parameter's sharding (explicit mesh axes included)
        lambda p: jnp.zeros_like(p, comp_dtype or p.dtype) if _compensated(p) else None,
        params))

  def update_fn(updates, state, params=None, **extra_args):
    ok = gate_value(extra_args.get(NONFINITE_OK))
    if params is None:
      raise ValueError("kahan_summation needs `params` in update().")
    leaves, treedef = jax.tree.flatten(updates)
    ps = treedef.flatten_up_to(params)
    cs = treedef.flatten_up_to(state.comp)
    out, new_c = [], []
    for u, p, c in zip(leaves, ps, cs):
      if u is None or c is None or not _compensated(p):
        out.append(u)
        new_c.append(c)
        continue
      s = c.astype(jnp.float32) + u.astype(jnp.float32)
      p_target = (p.astype(jnp.float32) + s).astype(p.dtype)
      delta = (p_target.astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype)
      # Exactly what optax.apply_updates will compute from this update.
      p_new = jnp.asarray(p + delta).astype(p.dtype)
      c_new = (s - (p_new.astype(jnp.float32) - p.astype(jnp.float32))).astype(c.dtype)
      if ok is not None:  # a skipped step keeps the compensation (the guard zeroes updates)
        c_new = jnp.where(ok, c_new, c)
      new_c.append(c_new)
      out.append(delta)
    return jax.tree.unflatten(treedef, out), KahanState(jax.tree.unflatten(treedef, new_c))

  return gate_aware(optax.GradientTransformationExtraArgs(init_fn, update_fn))
