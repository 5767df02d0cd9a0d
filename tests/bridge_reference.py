"""Pure-JAX references for bridged steps (shared by the bridge's tests)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
import stax


def per_parameter_step(tx: Any, names: Sequence[str]) -> Callable:
  """The bridge's default ``state_scope="param"`` in pure JAX: a jitted
  ``step(params, states, grads) -> (params, states)`` over dicts keyed by ``names``, each
  parameter updated by ``tx`` with a state of its own (``states[n] = tx.init({n: params[n]})``),
  seeing the one-leaf tree ``{n: p}``."""

  @jax.jit
  def step(params, states, grads):
    params, states = dict(params), dict(states)
    for n in names:
      u, states[n] = tx.update({n: grads[n]}, states[n], {n: params[n]})
      params[n] = optax.apply_updates({n: params[n]}, u)[n]
    return params, states

  return step


def bridged_adamw(**hyperparams: float) -> Any:
  """``stax.adamw`` as the bridge builds it: float hyperparameters fed as float32 arrays
  (``optax.inject_hyperparams``), e.g. ``bridged_adamw(learning_rate=1e-2, weight_decay=1e-2)``."""
  return optax.inject_hyperparams(stax.adamw, static_args=("eps_root", "nesterov"),
                                  hyperparam_dtype=jnp.float32)(**hyperparams)
