"""Non-finite gradient guard: a wrapper with a policy, usable around any transformation.

``nonfinite_guard(inner, policy)`` checks ``all(isfinite(g))`` over the whole gradient tree on
device (one fused reduction, no host synchronisation) and then

* ``"skip"`` (default): if any gradient is NaN/Inf, returns all-zero updates and leaves the inner
  state *exactly* unchanged — the parameters and every moment, counter and RNG key stay as they
  were (as STAC's ``step()`` does); ``nonfinite_count`` in the guard state counts skipped steps.
  The branch is a ``lax.cond`` so the inner update is not evaluated for a skipped step; or,
  with ``gated=True`` (``stax.adamw``), no branch: the inner update runs on zeroed gradients
  with ``nonfinite_ok=False`` and turns itself into an exact no-op (see :func:`nonfinite_guard`).
* ``"error"``: the same skip, plus a host callback that raises ``FloatingPointError`` naming the
  step. Under ``jit`` the exception surfaces at the next synchronisation (``block_until_ready``,
  reading a value) as a ``jax.errors.JaxRuntimeError`` whose message contains
  ``"non-finite gradient"``; outside ``jit`` it surfaces immediately. The callback is the only
  host round trip, and only this policy pays for it.
* ``"ignore"``: returns ``inner`` unchanged (no check at all).

Reference: STAC's ``error_if_nonfinite`` / skip semantics (``stac-optimizer`` 0.3.0), done on
device instead of with a ``.item()`` sync per parameter; ``optax.apply_if_finite`` is similar but
has no error policy and evaluates both branches.

Example:
  >>> import optax, stax
  >>> tx = stax.nonfinite_guard(optax.adam(1e-3), policy="skip")
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from stax import _validation as V
from stax._trees import conform

__all__ = ["NonFiniteGuardState", "nonfinite_guard", "all_finite", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "error", "ignore")


class NonFiniteGuardState(NamedTuple):
  """State of :func:`nonfinite_guard`.

  Attributes:
    inner_state: the wrapped transformation's state.
    nonfinite_count: int32, number of steps skipped because of non-finite gradients.
  """

  inner_state: Any
  nonfinite_count: jax.Array


def all_finite(tree: Any) -> jax.Array:
  """Scalar bool: every element of every leaf of ``tree`` is finite.

  Computed as ``isfinite(sum(x - x))``: ``x - x`` is 0 for a finite ``x`` and NaN for NaN or
  ±Inf, so the sum is exactly 0 or NaN (no overflow, any float dtype). XLA keeps ``x - x``
  for floats (it is not 0 under IEEE rules; a test checks the detection under ``jit``), and
  a float sum is a vectorised reduction on CPU with no temporary: 1.8× faster than the
  boolean reduction of ``all(isfinite(x))`` (3.1 vs 5.5 ms at 16M float32 parameters on this
  project's CPU, which also needed 16 MB of temporaries). A complex leaf is probed through its
  real and imaginary parts separately (a float32 sum of ``x - x`` would drop the imaginary part).
  """
  leaves = [x for x in jax.tree.leaves(tree)
            if x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.isfinite(jnp.sum(jnp.stack([_nan_probe(x) for x in leaves])))


def _nan_probe(x: jax.Array) -> jax.Array:
  """float32 ``sum(x - x)``: 0 when every element is finite, else NaN (both parts if complex)."""
  if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
    re, im = jnp.real(x), jnp.imag(x)
    return jnp.sum(re - re, dtype=jnp.float32) + jnp.sum(im - im, dtype=jnp.float32)
  return jnp.sum(x - x, dtype=jnp.float32)


def _raise_nonfinite(ok, count):
  if not bool(ok):
    raise FloatingPointError(
        f"stax: non-finite gradient at step {int(count)} (policy='error'); the step was skipped.")


def nonfinite_guard(inner: optax.GradientTransformation,
                    policy: str = "skip", *, gated: bool = False
                    ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so non-finite gradients never corrupt parameters or state.

  Args:
    inner: the transformation to protect.
    policy: ``"skip"`` (default), ``"error"`` or ``"ignore"``; see the module docstring.
    gated: ``False`` (default): skip with a ``lax.cond`` (any ``inner``). ``True``: no branch.
      The inner update always runs, on gradients with the bad step's entries zeroed, and
      receives ``nonfinite_ok`` (a scalar bool) as an extra argument; the guard zeroes the
      updates and restores every 0-d state leaf (step counts) of a bad step. Only for an
      ``inner`` whose stateful parts turn ``nonfinite_ok=False`` into an exact no-op on their
      array state: :func:`stax.scale_by_adam` with full-precision storage (its moment decays
      become 1), with stateless or scalar-state transforms around it (weight decay, a
      learning-rate schedule). ``stax.adamw`` uses it: XLA then updates the state in place,
      where the ``lax.cond`` copies it (measured at 16M parameters on CPU: 2.9× → 1.4× an
      ``optax.adamw`` step, most of what is left being the finiteness check itself).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`NonFiniteGuardState`
    (for ``"ignore"``: ``inner`` itself).
  """
  V.check_choice("nonfinite", policy, NONFINITE_POLICIES)
  V.check_bool("gated", gated)
  inner = optax.with_extra_args_support(inner)
  if policy == "ignore":
    return inner

  def init_fn(params):
    return NonFiniteGuardState(inner.init(params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    ok = all_finite(updates)
    if policy == "error":
      jax.debug.callback(_raise_nonfinite, ok, state.nonfinite_count)

    if gated:
      safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros((), g.dtype)), updates)
      new_updates, inner_state = inner.update(safe, state.inner_state, params,
                                              nonfinite_ok=ok, **extra_args)
      new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros((), u.dtype)),
                                 new_updates)
      inner_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o) if jnp.ndim(n) == 0 else n,
                                 inner_state, state.inner_state)
    else:
      def apply(_):
        return inner.update(updates, state.inner_state, params, **extra_args)

      def skip(_):
        shapes, state_shapes = jax.eval_shape(apply, None)
        # zeros_like(g) keeps g's sharding, so both branches agree under an explicit mesh.
        zeros = jax.tree.map(lambda s, g: jnp.zeros_like(g, dtype=s.dtype), shapes, updates)
        # The state as `apply` returns it: a framework may have handed it back in other
        # containers (Flax NNX's nnx.State for a codec's NamedTuple; see stax._trees.conform).
        return zeros, conform(state.inner_state, state_shapes)

      new_updates, inner_state = jax.lax.cond(ok, apply, skip, None)
    count = jnp.where(ok, state.nonfinite_count,
                      numerics.safe_increment(state.nonfinite_count))
    return new_updates, NonFiniteGuardState(inner_state, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
