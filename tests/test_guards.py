"""Non-finite gradient policies: skip leaves everything exactly unchanged, error raises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from tests import contract_problems as cp


def _nan_grads(params):
  g = cp.random_grads(params, 0)
  g["layer_0"]["kernel"] = g["layer_0"]["kernel"].at[1, 2].set(jnp.nan)
  return g


@pytest.mark.parametrize("factory", [
    lambda: stax.adamw(1e-2),
    lambda: stax.stac(1e-2, last_n_modules=2, module_order=["embed", "layer_0", "layer_1", "head"]),
    lambda: stax.nonfinite_guard(optax.sgd(1e-2, momentum=0.9)),
], ids=["adamw", "stac", "guarded_sgd"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf], ids=["nan", "inf", "-inf"])
def test_skip_leaves_params_and_state_exactly_unchanged(factory, bad):
  params, _, _ = cp.quadratic()
  tx = factory()
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  state = tx.init(params)
  params, state = step(params, state, cp.random_grads(params, 1))
  g = cp.random_grads(params, 2)
  g["layer_0"]["kernel"] = g["layer_0"]["kernel"].at[1, 2].set(bad)
  p2, s2 = step(params, state, g)
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(s2.inner_state), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(s2.nonfinite_count) == 1
  # The run continues exactly as if the bad step had never happened.
  p3, _ = step(p2, s2, cp.random_grads(params, 3))
  p3_ref, _ = step(params, state, cp.random_grads(params, 3))
  assert cp.max_abs_diff(p3, p3_ref) == 0.0


def test_skip_has_no_host_callback():
  params, _, _ = cp.quadratic()
  tx = stax.adamw(1e-2)
  jaxpr = str(jax.make_jaxpr(tx.update)(cp.random_grads(params, 0), tx.init(params), params))
  assert "callback" not in jaxpr
  tx_err = stax.adamw(1e-2, nonfinite="error")
  jaxpr = str(jax.make_jaxpr(tx_err.update)(cp.random_grads(params, 0), tx_err.init(params), params))
  assert "callback" in jaxpr


def test_error_policy_raises_under_jit():
  params, _, _ = cp.quadratic()
  tx = stax.adamw(1e-2, nonfinite="error")
  state = tx.init(params)
  u, s = jax.jit(tx.update)(cp.random_grads(params, 0), state, params)
  jax.block_until_ready(u)  # finite: no error
  with pytest.raises(Exception, match="non-finite gradient"):
    u, s = jax.jit(tx.update)(_nan_grads(params), state, params)
    jax.block_until_ready(u)


def test_ignore_policy_is_the_inner_transform():
  params, _, _ = cp.quadratic()
  inner = optax.adam(1e-2)
  tx = stax.nonfinite_guard(inner, "ignore")
  u, _ = tx.update(_nan_grads(params), tx.init(params), params)
  assert np.isnan(np.asarray(u["layer_0"]["kernel"])).any()


def test_invalid_policy():
  with pytest.raises(ValueError, match="nonfinite"):
    stax.adamw(nonfinite="retry")
