"""stax.owners: per-matrix work once, on a balanced owner device; SCAO's refresh through it."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import stax
from stax.owners import balance, owner_map


def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
  return jax.make_mesh((8,), ("x",))


def _spd(n, seed):
  a = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)
  return jnp.asarray(a @ a.T)


def _optimum(costs, n_dev):
  """The smallest possible largest load, by brute force over every assignment."""
  best = float("inf")
  for assign in itertools.product(range(n_dev), repeat=len(costs)):
    load = [0.0] * n_dev
    for c, d in zip(costs, assign):
      load[d] += c
    best = min(best, max(load))
  return best


@pytest.mark.parametrize("seed", range(6))
def test_balance_is_within_grahams_bound_and_slots_are_dense(seed):
  rng = np.random.default_rng(seed)
  n_dev, n = 3, 7
  costs = [float(c) for c in rng.integers(1, 50, n)]
  groups = [int(g) for g in rng.integers(0, 3, n)]
  where = balance(costs, groups, n_dev)
  load = [0.0] * n_dev
  for c, (d, _) in zip(costs, where):
    load[d] += c
  assert max(load) <= 4 / 3 * _optimum(costs, n_dev) + 1e-9
  # slots of one (group, device) are 0..count-1, each used once
  by = {}
  for g, (d, j) in zip(groups, where):
    by.setdefault((g, d), []).append(j)
  assert all(sorted(js) == list(range(len(js))) for js in by.values())


def test_balance_fills_one_groups_idle_devices_with_another_group():
  # 3 large matrices of one shape and 5 small of another on 4 devices: the small ones go to
  # the device the large ones leave free first (one group padded to 4 would idle it).
  where = balance([8.0] * 3 + [1.0] * 5, ["big"] * 3 + ["small"] * 5, 4)
  assert [d for d, _ in where[:3]] == [0, 1, 2]
  assert [d for d, _ in where[3:]] == [3] * 5
  with pytest.raises(ValueError, match="n_devices"):
    balance([1.0], [0], 0)


@pytest.mark.parametrize("set_mesh", [True, False], ids=["set_mesh", "no_mesh_context"])
def test_owner_map_runs_each_item_once_on_its_owner_and_equals_the_loop(set_mesh):
  """Each item is computed exactly once, on the device :func:`balance` chose (padding slots
  are skipped), and the results equal the plain loop bit for bit, replicated."""
  mesh = _mesh()
  xs = [_spd(6, i) for i in range(11)] + [_spd(3, 20 + i) for i in range(3)]
  groups = [x.shape for x in xs]
  calls = []

  def f(x):
    jax.debug.callback(lambda v, d: calls.append((float(v), int(d))), x[0, 0],
                       jax.lax.axis_index("x"))
    w, v = jnp.linalg.eigh(x)
    return {"w": w, "v": v}

  want = [jax.jit(lambda t: jax.tree.map(lambda a: a, jnp.linalg.eigh(t)))(x) for x in xs]
  spec = lambda x: P("x", None) if x.shape[0] % 2 == 0 and x.shape[0] >= 8 else P()
  put = [jax.device_put(x, NamedSharding(mesh, spec(x))) for x in xs]
  fn = jax.jit(lambda ts: owner_map(f, ts, groups=groups,
                                    costs=[float(t.shape[0]) ** 3 for t in ts]))
  if set_mesh:
    with jax.set_mesh(mesh):
      got = fn(put)
  else:
    got = fn(put)
  jax.effects_barrier()   # debug callbacks run asynchronously
  expected_dev = [d for d, _ in balance([float(x.shape[0]) ** 3 for x in xs], groups, 8)]
  assert sorted(calls) == sorted((float(x[0, 0]), d) for x, d in zip(xs, expected_dev))
  for g, (w, v) in zip(got, want):
    np.testing.assert_array_equal(jax.device_get(g["w"]), w)
    np.testing.assert_array_equal(jax.device_get(g["v"]), v)
    assert all(a is None for a in g["w"].sharding.spec)


def test_owner_map_without_a_mesh_is_the_loop_and_checks_groups():
  xs = [jnp.arange(4.0) + i for i in range(3)]
  got = owner_map({0: jnp.cumsum, 1: jnp.sum}, xs, groups=[0, 1, 0])
  np.testing.assert_array_equal(got[0], jnp.cumsum(xs[0]))
  np.testing.assert_array_equal(got[1], jnp.sum(xs[1]))
  with pytest.raises(ValueError, match="groups"):
    owner_map(jnp.sum, xs, groups=[0])
  mesh = _mesh()
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="item 1 of group 0"):
    jax.jit(lambda ts: owner_map(jnp.sum, ts, groups=[0, 0]))([jnp.ones(3), jnp.ones(4)])
  # a mesh given without axes: its explicit axes (each item once, on its owner)
  calls = []
  f = lambda x: (jax.debug.callback(lambda d: calls.append(int(d)), jax.lax.axis_index("x")),
                 jnp.sum(x))[1]
  got = jax.jit(lambda ts: owner_map(f, ts, groups=[0] * 3, mesh=mesh))(xs)
  jax.effects_barrier()
  np.testing.assert_array_equal(jnp.stack(got), jnp.stack([jnp.sum(x) for x in xs]))
  assert sorted(calls) == [0, 1, 2]


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_scao_owner_refresh_equals_replicated_refresh(mode):
  """SCAO's periodic eigendecompositions / subspace iterations on owner devices give the
  replicated refresh's parameters and moments (float32 rounding), on row- and column-sharded matrices
  of several shapes (a block grid in the faithful mode), through 8 steps with 3 refreshes."""
  mesh = _mesh()
  shapes = {"a": (16, 24), "b": (16, 24), "c": (24, 16), "d": (8, 8), "e": (40, 8), "v": (16,)}
  specs = {"a": P("x", None), "b": P(None, "x"), "c": P("x", None), "d": P(), "e": P("x", None),
           "v": P("x")}
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
           for _ in range(8)]
  kw = dict(learning_rate=1e-2, warmup_steps=2, precond_freq=3, min_precond_updates=1,
            blend_steps=2, k_min=1, k_max=4, mode=mode)
  if mode == "scao-0.2.4":
    kw["max_precond_dim"] = 16   # "e" (40×8) is a grid of 16-row blocks
  out = {}
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
    for refresh in ("owners", "replicated"):
      tx = stax.scao(**kw, refresh=refresh)
      p = put(params)
      state = jax.jit(tx.init)(p)

      @jax.jit
      def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax_apply(p, u), s

      for g in grads:
        p, state = step(p, state, put(g))
      out[refresh] = jax.device_get((p, state))
  # Parameters and Adam moments within float32 rounding: a product inside the owner's loop
  # body may round its last bit differently from the same product at top level (seen for an
  # 8×8 leaf on an AMD CPU; the factors of a near-degenerate eigenspace then rotate by ~1e-5).
  for a, b in zip(jax.tree.leaves(out["owners"][0]), jax.tree.leaves(out["replicated"][0])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  adam = lambda s: s.inner_state[1]
  for a, b in zip(jax.tree.leaves(adam(out["owners"][1])),
                  jax.tree.leaves(adam(out["replicated"][1]))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  diag = stax.scao_diagnostics(out["owners"][1])
  assert int(diag["curvature_updates"]) == 2


def optax_apply(p, u):
  return jax.tree.map(lambda a, b: a + b, p, u)


def test_scao_refresh_is_validated():
  with pytest.raises(ValueError, match="refresh"):
    stax.scao(refresh="everywhere")


def test_sharded_refresh_benchmark_runs_small():
  """benchmarks/sharded_muon.py's SCAO part at a tiny size: the owners' refresh equals the
  replicated one, and neither all-reduces (the owners gather the new factors once)."""
  _mesh()
  from benchmarks.sharded_muon import run_scao
  res = run_scao(d=16, layers=1, repeats=1, modes=("lowrank",))
  rows = res["modes"]["lowrank"]
  assert rows["owners"]["max_abs_diff_vs_replicated"] <= 1e-6
  for row in rows.values():
    assert row["collectives"]["all-reduce"]["count"] == 0
  assert rows["owners"]["collectives"]["all-gather"]["count"] > 0


def test_faithful_block_grid_refreshes_block_by_block():
  """A faithful-SCAO block grid is split into its blocks for the owners (each block's eigh
  pair can go to another device): updating the blocks one by one and joining them is the
  grid's update bit for bit."""
  from stax.transforms.kron._schedule import KronHyperparams, LeafContext
  from stax.transforms.kron.scao import BlockGridState, ScaoRule
  rule = ScaoRule(KronHyperparams(k_min=1, k_max=4, max_precond_dim=16))
  plan = rule.plan(40, 24)
  st = rule.init(plan)
  g = jnp.asarray(np.random.default_rng(1).standard_normal((40, 24)), jnp.float32)
  units = rule.units(plan, st, g, None)
  assert [(u[0].m, u[0].n) for u in units] == [(16, 16), (16, 8)] * 2 + [(8, 16), (8, 8)]
  ctx = LeafContext(jnp.asarray(3, jnp.int32), jnp.float32)
  whole = rule.update(plan, st, g, ctx)
  joined = rule.join(plan, [rule.update(p, s, gu, ctx) for p, s, gu, _ in units])
  assert isinstance(joined, BlockGridState)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(joined)):
    np.testing.assert_array_equal(a, b)
  assert rule.cost(plan) == sum(rule.cost(u[0]) for u in units)


def test_owner_map_without_a_mesh_runs_a_group_as_one_loop():
  """Without a mesh, a group of several alike items is one ``lax.map`` (its function traced
  once, one while loop in the program) and gives each item's own result bit for bit; a lone
  item runs directly; items of one group that differ in shape are refused as with a mesh."""
  xs = [_spd(6, s) for s in range(4)] + [jnp.arange(5.0)]
  traced = []

  def eig(x):
    traced.append(x.shape)
    return jnp.linalg.eigh(x)[0] * jnp.sum(x)

  fns = {0: eig, 1: jnp.cumsum}
  step = jax.jit(lambda ts: owner_map(fns, ts, groups=[0, 0, 0, 0, 1]))
  got = step(xs)
  assert traced == [(6, 6)]
  for x, g in zip(xs[:4], got[:4]):
    np.testing.assert_array_equal(g, jax.jit(eig)(x))
  np.testing.assert_array_equal(got[4], jnp.cumsum(xs[4]))
  assert step.lower(xs).as_text().count("stablehlo.while") == 1
  with pytest.raises(ValueError, match="item 1 of group 0"):
    owner_map(jnp.sum, [jnp.ones(3), jnp.ones(4)], groups=[0, 0])
