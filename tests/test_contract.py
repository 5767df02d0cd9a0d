"""The contract every public stax optimizer must pass (driven by tests/registry.py).

Each test compares against something independent: the optimum of the problem, the same
optimizer without the wrapper under test (inject_hyperparams, MultiSteps, donation, sharding,
pmap, checkpointing), or the declared dtypes/shardings.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import contract_problems as cp
from tests.registry import ALL

IDS = [e.name for e in ALL]


def _step_fn(tx, loss):
  def step(params, state):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state
  return step


def _run(tx, params, loss, steps):
  step = _step_fn(tx, loss)

  @jax.jit
  def run(params):
    state = tx.init(params)
    return jax.lax.fori_loop(0, steps, lambda i, c: step(*c), (params, state))

  return run(params)


def _grad_step(tx):
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state
  return step


def _run_grads(tx, params, steps, step_fn=None, start=0, state=None):
  step_fn = step_fn or jax.jit(_grad_step(tx))
  state = tx.init(params) if state is None else state
  for i in range(start, steps):
    params, state = step_fn(params, state, cp.random_grads(params, i))
  return params, state


# --------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_converges_on_quadratic(entry):
  params, loss, target = cp.quadratic()
  final, _ = _run(entry.make(), params, loss, entry.steps)
  dist = cp.max_abs_diff(final, target)
  assert dist < entry.quadratic_tol, f"{entry.name}: |p - p*|_max = {dist}"


@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_converges_on_rosenbrock(entry):
  if entry.rosenbrock_tol is None:
    pytest.skip(f"Rosenbrock not part of this entry's contract: {entry.note}")
  params, loss, optimum = cp.rosenbrock()
  tx = entry.make(**(entry.rosenbrock_kwargs or {}))
  final, _ = _run(tx, params, loss, entry.steps * 3)
  dist = cp.max_abs_diff(final, optimum)
  assert dist < entry.rosenbrock_tol, f"{entry.name}: |p - p*|_max = {dist}"


# --------------------------------------------------------------------------- jit behaviour
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_no_recompilation(entry):
  params, _, _ = cp.quadratic()
  tx = entry.make()
  step = jax.jit(_grad_step(tx))
  state = tx.init(params)
  for i in range(3):
    params, state = step(params, state, cp.random_grads(params, i))
  assert step._cache_size() == 1


@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_inject_hyperparams(entry):
  params, _, _ = cp.quadratic()
  plain = entry.make()
  injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      **entry.kwargs)
  p1, _ = _run_grads(plain, params, 5)
  step = jax.jit(_grad_step(injected))
  p2, s2 = _run_grads(injected, params, 5, step_fn=step)
  np.testing.assert_allclose(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(p1)]),
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(p2)]), rtol=1e-5, atol=1e-6)
  # Changing a numeric hyperparameter in the state must not retrace.
  hp = dict(s2.hyperparams)
  if "learning_rate" in hp:
    hp["learning_rate"] = hp["learning_rate"] * 0.5
    s2 = s2._replace(hyperparams=hp)
  p3, s3 = step(p2, s2, cp.random_grads(p2, 99))
  jax.block_until_ready(p3)
  assert step._cache_size() == 1


@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_multisteps(entry):
  params, _, _ = cp.quadratic()
  k = 2
  ms = optax.MultiSteps(entry.make(), every_k_schedule=k)
  p_ms, _ = _run_grads(ms, params, 6)
  # Reference: the plain optimizer on the mean of each group of k gradients.
  tx = entry.make()
  step = jax.jit(_grad_step(tx))
  p_ref, state = params, tx.init(params)
  for j in range(0, 6, k):
    gs = [cp.random_grads(params, i) for i in range(j, j + k)]
    g = jax.tree.map(lambda *xs: sum(xs) / k, *gs)
    p_ref, state = step(p_ref, state, g)
  assert cp.max_abs_diff(p_ms, p_ref) < 1e-5


# --------------------------------------------------------------------------- dtypes, state
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_preserves_dtype_and_state_avals(entry, dtype):
  params, _, _ = cp.quadratic(dtype)
  tx = entry.make()
  state0 = tx.init(params)
  g = cp.random_grads(params, 0)
  u, state1 = jax.jit(tx.update)(g, state0, params)
  for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert x.dtype == y.dtype and x.shape == y.shape
  new = optax.apply_updates(params, u)
  assert all(x.dtype == dtype for x in jax.tree.leaves(new))
  assert jax.tree.structure(state0) == jax.tree.structure(state1)
  assert jax.tree.map(jax.typeof, state0) == jax.tree.map(jax.typeof, state1)
  # The state also round-trips through eval_shape (abstract init).
  abstract = jax.eval_shape(tx.init, params)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract) == jax.tree.map(
      lambda s: (s.shape, s.dtype), state1)


@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_buffer_donation(entry):
  params, _, _ = cp.quadratic()
  tx = entry.make()
  state = tx.init(params)
  ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)}
  assert not any(x.unsafe_buffer_pointer() in ptrs for x in jax.tree.leaves(state)
                 if isinstance(x, jax.Array)), "init aliased a parameter buffer into the state"
  ref, _ = _run_grads(tx, params, 3)
  donating = jax.jit(_grad_step(tx), donate_argnums=(0, 1))
  p = jax.tree.map(jnp.copy, params)
  out, _ = _run_grads(tx, p, 3, step_fn=donating)
  assert cp.max_abs_diff(out, ref) == 0.0


# --------------------------------------------------------------------------- distribution
def _spec(x, mode):
  if np.ndim(x) < 2:
    return P()
  if mode == "rows" and x.shape[0] % 8 == 0:
    return P("x", None)
  if mode == "cols" and x.shape[-1] % 8 == 0:
    return P(None, "x")
  return P()


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_explicit_mesh_sharding(entry, mode):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
  params, _, _ = cp.quadratic()
  tx = entry.make()
  ref, _ = _run_grads(tx, params, 4)
  mesh = jax.make_mesh((8,), ("x",))
  with jax.set_mesh(mesh):
    specs = jax.tree.map(lambda x: _spec(x, mode), params)
    put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
    p = put(params)
    state = jax.jit(tx.init)(p)
    state0_avals = jax.tree.map(jax.typeof, state)
    step = jax.jit(_grad_step(tx))
    for i in range(4):
      p, state = step(p, state, put(cp.random_grads(params, i)))
    assert jax.tree.map(jax.typeof, state) == state0_avals
    for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(specs, is_leaf=lambda z: isinstance(z, P))):
      assert x.sharding.spec == s or (s == P() and all(a is None for a in x.sharding.spec))
    # Full-size state leaves follow the sharding of the parameter of the same shape.
    by_shape = {}
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda z: isinstance(z, P))):
      by_shape.setdefault(x.shape, set()).add(s)
    for leaf in jax.tree.leaves(state):
      shape_specs = by_shape.get(getattr(leaf, "shape", None))
      if shape_specs and len(shape_specs) == 1 and np.ndim(leaf) >= 2:
        (want,) = shape_specs
        got = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
        exp = tuple(want) + (None,) * (leaf.ndim - len(want))
        assert got == exp, f"state leaf {jax.typeof(leaf)} does not follow its parameter {want}"
  assert cp.max_abs_diff(jax.device_get(p), ref) <= entry.sharding_atol


@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_pmap_mean_gradient(entry):
  n = 8
  if len(jax.devices()) < n:
    pytest.skip("needs 8 host devices")
  params, _, _ = cp.quadratic()
  tx = entry.make()

  def step(p, s, g):
    g = jax.lax.pmean(g, "i")
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  pstep = jax.pmap(step, axis_name="i")
  rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * n), t)
  p, s = rep(params), rep(tx.init(params))
  ref_p, ref_s = params, tx.init(params)
  ref_step = jax.jit(_grad_step(tx))
  for i in range(3):
    per_dev = [cp.random_grads(params, 100 * i + d) for d in range(n)]
    p, s = pstep(p, s, jax.tree.map(lambda *xs: jnp.stack(xs), *per_dev))
    mean_g = jax.tree.map(lambda *xs: sum(xs) / n, *per_dev)
    ref_p, ref_s = ref_step(ref_p, ref_s, mean_g)
  got = jax.tree.map(lambda x: x[0], p)
  assert cp.max_abs_diff(got, ref_p) <= max(entry.sharding_atol, 1e-5)


# --------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_orbax_checkpoint_resume_bit_exact(entry, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, _, _ = cp.quadratic()
  tx = entry.make()
  step = jax.jit(_grad_step(tx))
  full_p, full_s = _run_grads(tx, params, 100, step_fn=step)
  mid_p, mid_s = _run_grads(tx, params, 50, step_fn=step)
  ckpt = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  ckpt.save(path, {"params": mid_p, "opt_state": mid_s})
  ckpt.wait_until_finished()
  target = {"params": jax.eval_shape(lambda: params),
            "opt_state": jax.eval_shape(tx.init, params)}
  restored = ckpt.restore(path, target)
  p, s = _run_grads(tx, restored["params"], 100, step_fn=step, start=50,
                    state=restored["opt_state"])
  assert cp.max_abs_diff(p, full_p) == 0.0
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(full_s)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_invalid_hyperparameters_raise_at_construction(entry):
  sig = inspect.signature(entry.factory).parameters
  with pytest.raises(ValueError, match="learning_rate"):
    entry.make(learning_rate=-1.0)
  with pytest.raises(TypeError, match="learning_rate"):
    entry.make(learning_rate="fast")
  for beta in ("b1", "b2", "b1_base"):
    if beta in sig:
      with pytest.raises(ValueError, match=beta):
        entry.make(**{beta: 1.5})
  if "betas" in sig:
    with pytest.raises(ValueError, match="beta"):
      entry.make(betas=(1.5, 0.99))
