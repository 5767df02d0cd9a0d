"""stax._leafwise: per-leaf entries picked exactly, and compiled steps whose kernels do not grow
with the number of same-shaped leaves.

XLA's CPU backend compiles one kernel per distinct fused computation, so a per-leaf constant in
a fusion (a slice of a per-leaf vector, a leaf index in a hash, an offset into a shared random
draw) costs a kernel compilation per leaf. The structural check counts the distinct fused
computations of the optimised HLO (``benchmarks.speed.distinct_kernels``) for a model with 6
and with 10 identical layers: no more for 10 when nothing per-leaf is inside a kernel. The same check
with ``pick`` replaced by a slice fails for STAM (shown in the test), so it can fail.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from benchmarks import speed
from stax import _leafwise
from stax.transforms.guards import all_finite


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint32) if x.dtype == np.float32 else x


def test_pick_is_bit_exact_for_every_value():
  """Every entry, NaN, ±Inf, -0.0, a subnormal and the largest float among them, comes back bit
  for bit under jit (a masked sum with -0.0 as the identity), and so do uint32 key rows, ints and
  bools."""
  vals = np.array([1.5, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4028235e38, 0.0], np.float32)
  got = jax.jit(_leafwise.entries)(jnp.asarray(vals))
  np.testing.assert_array_equal(_bits(np.stack(got)), _bits(vals))
  key = jnp.array([7, 9], jnp.uint32)
  keys = jnp.stack([jax.random.fold_in(key, i) for i in range(5)])
  rows = jax.jit(_leafwise.entries)(keys)
  for i, row in enumerate(rows):   # each leaf's key row, bit for bit
    np.testing.assert_array_equal(np.asarray(row), np.asarray(keys[i]))
  ints = jnp.array([-3, 0, 2**31 - 1, -2**31], jnp.int32)
  np.testing.assert_array_equal(np.stack(jax.jit(_leafwise.entries)(ints)), np.asarray(ints))
  flags = jnp.array([True, False, True])
  assert [bool(x) for x in jax.jit(_leafwise.entries)(flags)] == [True, False, True]
  cols = jax.jit(lambda a, b: _leafwise.columns({"a": a, "b": b}))(jnp.asarray(vals),
                                                                    -jnp.asarray(vals))
  np.testing.assert_array_equal(_bits(np.stack(cols["b"])), _bits(-vals))
  with pytest.raises(IndexError, match="entry 3 of a vector of 3"):
    _leafwise.pick(flags, 3)


def _params(layers):
  p = {f"layer{i}": {"kernel": jnp.full((64, 96), 0.01 * (i + 1)), "bias": jnp.zeros((96,))}
       for i in range(layers)}
  p["head"] = {"kernel": jnp.ones((96, 10))}
  return p


def _step_hlo(tx, layers):
  """The optimised HLO text of ``tx``'s donated, jitted step on ``_params(layers)``."""
  params = _params(layers)
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()


def _kernels(tx, layers):
  return speed.distinct_kernels(_step_hlo(tx, layers))


OPTIMIZERS = {
    "adamw": lambda: stax.adamw(1e-3),
    "stac": lambda: stax.stac(1e-3),
    "stam": lambda: stax.stam(1e-3),
    "stam[snr]": lambda: stax.stam(1e-3, beta1_signal="snr"),
    "stam_lite": lambda: stax.stam_lite(1e-3),
    "stam_lite[snr]": lambda: stax.stam_lite(1e-3, beta1_signal="snr"),
    "stable_adamw": lambda: stax.stable_adamw(1e-3),
    "oadamw": lambda: stax.oadamw(1e-3),
    "turbo_adam": lambda: stax.turbo_adam(1e-3),
    "turbo_adam[turboadam-0.2]": pytest.param(
        lambda: stax.turbo_adam(1e-3, codec="turboadam-0.2"),
        marks=pytest.mark.xfail(strict=True, reason=(
            "the seed package's rounding seed mixes the leaf index into each leaf's encode "
            "kernel; every leaf's seeds as one vector, picked, removed those kernels but made "
            "XLA's memory-minimising scheduler keep 0.25 GiB more temporaries at 128M "
            "(1.80 -> 2.05 GiB), so it stays per leaf"))),
    "scao": lambda: stax.scao(1e-3),
    "scao[scao-0.2.4]": lambda: stax.scao(1e-3, mode="scao-0.2.4"),
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel compilation")
@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_compiled_kernels_do_not_grow_with_same_shaped_leaves(make):
  """A model with 10 identical layers compiles to no more distinct kernels than one with 6 (as
  many, or fewer where small leaves are reduced as one stack: ``_leafwise.alike``), but for one
  that XLA's horizontal fusion may add: it merges a few alike leaves' small kernels into one
  multi-output kernel, in numbers that vary with the leaf count (OAdamW: 34, 34, 34, 35, 37
  distinct kernels for 4, 6, 8, 10, 14 layers; per leaf 52, 52, 52, 52, 54). A kernel per leaf
  would add at least four."""
  assert _kernels(make(), 10) <= _kernels(make(), 6) + 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel compilation")
@pytest.mark.parametrize("make", [lambda: stax.turbo_adam(1e-3, min_compress_elements=64),
                                  lambda: stax.scao(1e-3, warmup_steps=1, precond_freq=2)],
                         ids=["turbo_adam", "scao"])
def test_compiled_loops_do_not_grow_with_same_shaped_leaves(make):
  """Random keys drawn per leaf (TurboAdam's split of each leaf's rounding key, SCAO's draws)
  were a threefry loop per leaf in the compiled step (50 on GPT-2 small); made for every leaf
  at once, or inside the loop that updates alike leaves together (``stax.owners``), the
  program's loops are as many for 10 layers as for 6."""
  def loops(layers):
    return _step_hlo(make(), layers).count(" while(")

  assert loops(10) == loops(6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel compilation")
@pytest.mark.parametrize("make", [lambda: stax.adamw(1e-3), lambda: stax.stam(1e-3),
                                  lambda: stax.stable_adamw(1e-3),
                                  lambda: stax.oadamw(1e-3, muon="gradient")],
                         ids=["adamw", "stam", "stable_adamw", "oadamw[gradient]"])
def test_the_first_layers_kernels_are_the_other_layers_kernels(make):
  """Every kernel that updates a layer's ``(64, 96)`` kernel leaf is the same compiled kernel
  for all six identical layers. (With the bias corrections formed in each leaf's step, XLA's
  CSE kept the first leaf's and the first layer's kernels took their operands in another
  order: the same code compiled twice; on GPT-2 small 49 kernels instead of 42 for
  ``stax.adamw``, 91 instead of 85 for STAM. StableAdamW's debiased β is an array every leaf
  shares: with its moments' EMAs written ``(1 − β)·g + β·m`` and v's ``|g|²`` the square of the
  m pass's saturated g, the first layer's m and v kernels were compiled again, counts
  ``[1, 1, 5, 5, 6]`` here; ``benchmarks.speed.kernels_compiled_twice`` counts such kernels.)"""
  import collections
  text = _step_hlo(make(), 6)
  counts = collections.Counter(b for b in speed._fused_bodies(text)
                               if re.search(r"ROOT \S+ = f32\[64,96\]", b))
  assert counts and all(c % 6 == 0 for c in counts.values()), sorted(counts.values())


def _pick_kernels_compiled_twice(make):
  """How many of a step's pick kernels (a uint32 sum to one entry) are another pick kernel with
  its operands in another order, for the ``_params(6)`` model."""
  jax.clear_caches()
  getattr(_leafwise._traced_once, "cache_clear", lambda: None)()
  text = _step_hlo(make(), 6)
  pick = r"u32\[\d*\]\{?[\d,]*\}? reduce\("
  assert any(re.search(r"ROOT \S+ = " + pick, b) for b in speed._fused_bodies(text))
  return speed.kernels_compiled_twice(text, root=pick)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's kernel compilation")
def test_the_first_pick_of_a_vector_is_the_other_picks_kernel(monkeypatch):
  """Every pick of one vector's entries compiles to one kernel: the masked sum reads the
  vector's bits as its first operand (``view & mask``). As ``where(mask, view, 0)``, the first
  pick of each vector met the (shared) view after its (own) mask, so XLA numbered its
  parameters in another order and compiled that kernel again (STAM on ResNet-18: 107 → 105
  kernels)."""
  make = lambda: stax.stam(1e-3, beta1_signal="snr")
  assert _pick_kernels_compiled_twice(make) == 0
  monkeypatch.setattr(_leafwise, "_masked_sum", lambda blocked: (
      lambda view, mask: jnp.sum(jnp.where(mask != 0, view, np.array(0, view.dtype)),
                                 axis=(0, 1) if blocked else (0,), dtype=view.dtype)))
  assert _pick_kernels_compiled_twice(make) > 0


def test_the_kernel_count_check_fails_when_leaves_read_sliced_entries(monkeypatch):
  """With the picks replaced by slices (what STAM did before), every added layer adds kernels:
  the check above can fail."""
  monkeypatch.setattr(_leafwise, "_picks", lambda vec, wanted: [vec[i] for i in wanted])
  few, many = _kernels(stax.stam(1e-3), 6), _kernels(stax.stam(1e-3), 10)
  assert many >= few + 2 * 4  # at least two more per added layer (kernel and bias leaves)


def _step_traces(tx, params, monkeypatch):
  """How many times the Adam core's per-leaf step (``adam_step``) is traced for one jitted
  update of ``params``, and that update's result for a fixed gradient."""
  from stax.transforms import adam
  calls = []
  real = adam.adam_step
  monkeypatch.setattr(adam, "adam_step", lambda *a, **k: calls.append(1) or real(*a, **k))
  getattr(_leafwise._traced_once, "cache_clear", lambda: None)()
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x + 1.0), params)
  out = jax.jit(tx.update)(grads, tx.init(params), params)
  return len(calls), out


@pytest.mark.parametrize("make", [lambda: stax.stam(1e-3), lambda: stax.stable_adamw(1e-3),
                                  lambda: stax.turbo_adam(1e-3, min_compress_elements=1)],
                         ids=["stam", "stable_adamw", "turbo_adam"])
def test_same_shaped_leaves_share_one_trace_of_the_step(make, monkeypatch):
  """Ten layers of two shapes (and a head) trace the per-leaf step once per shape, not once per
  leaf (``traced_once``), and the traced program is the one traced leaf by leaf. TurboAdam's
  storages are bound methods of equal, distinct objects (one row view per leaf): compared by
  identity, as Python compares bound methods, they traced per leaf."""
  params = _params(10)
  shared, out = _step_traces(make(), params, monkeypatch)
  assert shared == 3
  monkeypatch.setattr(_leafwise, "traced_once", lambda make_fn, *static: make_fn(*static))
  per_leaf, out_per_leaf = _step_traces(make(), params, monkeypatch)
  assert per_leaf == 21
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_per_leaf), strict=True):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_array_hyperparameters_are_operands_of_the_shared_trace(monkeypatch):
  """Hyperparameters given as arrays (``inject_hyperparams``, the torch bridge) are operands of
  the shared trace, not part of its key: traced once per shape, and the result of Python numbers
  (to the rounding of the betas as float32 arrays, ~7e-6 here). A configuration that cannot be
  hashed (an array inside a storage) is traced per leaf, as before."""
  params = _params(3)
  make = lambda: optax.inject_hyperparams(stax.stam)(learning_rate=1e-3, b2=0.999, eps=1e-8)
  traces, (u_arr, _) = _step_traces(make(), params, monkeypatch)
  assert traces == 3
  _, (u_ref, _) = _step_traces(stax.stam(1e-3), params, monkeypatch)
  for a, b in zip(jax.tree.leaves(u_arr), jax.tree.leaves(u_ref), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=0)
  unhashable = lambda make_fn, static: make_fn(*static)   # what an unhashable key gets
  monkeypatch.setattr(_leafwise, "_traced_once", unhashable)
  traces, (u_leaf, _) = _step_traces(make(), params, monkeypatch)
  assert traces == 7
  for a, b in zip(jax.tree.leaves(u_arr), jax.tree.leaves(u_leaf), strict=True):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_a_storage_that_reads_the_leaf_index_gets_its_own_in_a_shared_trace():
  """A storage of the protocol's required members only (``uses_leaf_index`` defaults to True)
  that writes its leaf's index into its state: every leaf's state has its own index, although
  the Adam core traces same-shaped leaves' steps once."""
  class IndexStorage:
    def init(self, param):
      return jnp.zeros_like(param), jnp.zeros_like(param)

    def read(self, mu_enc, nu_enc, like, ctx):
      return mu_enc, nu_enc

    def write(self, mu, nu, ctx):
      return jnp.full_like(mu, float(ctx.index)), nu

  tx = stax.scale_by_adam(storage=IndexStorage())
  params = {f"l{i}": jnp.ones((4, 8)) for i in range(5)}
  _, state = jax.jit(tx.update)(params, tx.init(params), params)
  leaves = jax.tree.leaves(state.mu)
  assert [float(x[0, 0]) for x in leaves] == [0.0, 1.0, 2.0, 3.0, 4.0]


# ------------------------------------------------------------------ small leaves reduced together
def test_a_pick_from_a_long_vector_is_bit_exact_in_its_blocks():
  """Past 32 entries a pick sums blocks of 32 rows (one kernel instead of three); every entry
  of a 100-entry vector, special values included, comes back bit for bit, rows too."""
  vals = np.random.RandomState(0).standard_normal(100).astype(np.float32)
  vals[[0, 31, 32, 63, 64, 99]] = [np.nan, -0.0, np.inf, 1e-45, -np.inf, -3.4028235e38]
  got = jax.jit(_leafwise.entries)(jnp.asarray(vals))
  np.testing.assert_array_equal(_bits(np.stack(got)), _bits(vals))
  table = np.stack([vals, -vals, vals * 0.5], axis=1)
  rows = jax.jit(_leafwise.entries)(jnp.asarray(table))
  np.testing.assert_array_equal(_bits(np.stack(rows)), _bits(table))
  only = jax.jit(lambda v: _leafwise.entries(v, {3, 77}))(jnp.asarray(vals))
  assert [i for i, x in enumerate(only) if x is not None] == [3, 77]


def test_alike_groups_equal_keys_in_runs_bounded_by_the_total():
  keys = ["a", None, "b", "a", "a", "b", [1], "c"]
  groups, alone = _leafwise.alike(keys)
  assert groups == [(0, 3, 4), (2, 5)] and alone == [1, 6, 7]  # unhashable and single: alone
  sizes = [_leafwise.GROUP_MAX_TOTAL // 2] * len(keys)
  groups, alone = _leafwise.alike(keys, sizes)
  assert groups == [(0, 3), (2, 5)] and alone == [1, 4, 6, 7]  # a run of three is too large


def test_scatter_and_gather_place_entries_bit_for_bit():
  parts = [([2], jnp.float32(np.nan)), ((0, 3), jnp.array([-0.0, np.inf], jnp.float32)),
           ([1], 1.5)]
  got = jax.jit(lambda: _leafwise.scatter(4, parts))()
  np.testing.assert_array_equal(_bits(got), _bits(np.array([-0.0, 1.5, np.nan, np.inf],
                                                           np.float32)))
  np.testing.assert_array_equal(_bits(_leafwise.gather(got, (3, 0))),
                                _bits(np.array([np.inf, -0.0], np.float32)))
  with pytest.raises(ValueError, match="not each of 3 once"):
    _leafwise.scatter(3, [([0, 1], jnp.zeros(2)), ([1], 0.0)])


def _unstack_program(n, split):
  """A stack of ``n`` matrices, each member then scaled by its own runtime scalar."""
  def fn(stacked, scales):
    members = split(stacked, [1] + [2] * (n - 1))
    return [m * s for m, s in zip(members, scales)]
  stacked = jnp.arange(float((2 * n - 1) * 24 * 40)).reshape(2 * n - 1, 24, 40)
  return fn, stacked, [jnp.float32(i + 0.5) for i in range(n)]


def test_unstack_is_bit_exact_and_its_consumers_one_kernel():
  """``unstack``'s members equal static slices bit for bit (arrays and trees, uneven sizes),
  and the kernels that read them do not multiply with the members: with static slices the
  offset is a constant of each consumer, a kernel per member (checked as the mutation)."""
  static = lambda x, sizes: [x[a:a + n] for a, n in zip(np.cumsum([0, *sizes])[:-1], sizes)]
  fn, stacked, scales = _unstack_program(5, _leafwise.unstack)
  got = jax.jit(fn)(stacked, scales)
  want = _unstack_program(5, static)[0](stacked, scales)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(_bits(g), _bits(w))
  tree = {"a": stacked, "b": -stacked[:, 0]}
  for g, a, n in zip(jax.jit(lambda t: _leafwise.unstack(t, [3, 1, 5]))(tree), (0, 3, 4), (3, 1, 5)):
    np.testing.assert_array_equal(_bits(g["a"]), _bits(stacked[a:a + n]))
    np.testing.assert_array_equal(_bits(g["b"]), _bits(-stacked[a:a + n, 0]))
  assert _leafwise.unstack(stacked, [9]) == [stacked]

  def kernels(n, split):
    fn, x, sc = _unstack_program(n, split)
    return speed.distinct_kernels(jax.jit(fn).lower(x, sc).compile().as_text())

  assert kernels(8, _leafwise.unstack) <= kernels(4, _leafwise.unstack)
  assert kernels(8, static) >= kernels(4, static) + 4


def _small_leaves():
  """Eight alike vectors (one group), two of another shape, a scalar and a large matrix."""
  p = {f"ln{i}": jnp.linspace(-1.0, 1.0 + i, 96) for i in range(8)}
  p.update({f"b{i}": jnp.full((7, 5), 0.5 + i) for i in range(2)})
  p["s"], p["w"] = jnp.float32(2.0), jnp.ones((128, 80))
  return p


@pytest.mark.parametrize("make", [lambda: stax.stam(1e-2), lambda: stax.stam_lite(1e-2),
                                  lambda: stax.stam(1e-2, beta1_signal="snr"),
                                  lambda: stax.stam_lite(1e-2, beta1_signal="snr")],
                         ids=["stam", "stam_lite", "stam[snr]", "stam_lite[snr]"])
def test_statistics_of_alike_leaves_reduced_together_equal_each_leafs(make, monkeypatch):
  """The β1 rules' statistics of small alike leaves, reduced as one vmapped stack, are each
  leaf's own to rounding (the summation order may differ), so β1 and the moments follow; with
  ``GROUP_MAX_ELEMENTS = 0`` every leaf is reduced alone (the reference)."""
  params = _small_leaves()
  key = jax.random.PRNGKey(3)

  def run():
    tx = make()
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for t in range(4):
      g = jax.tree.map(lambda x, k: jax.random.normal(k, jnp.shape(x)) * (1.0 + t) + 0.3,
                       params, dict(zip(params, jax.random.split(jax.random.fold_in(key, t),
                                                                 len(params)))))
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    return p, stax.stam_beta1(state)

  grouped, b1 = run()
  monkeypatch.setattr(_leafwise, "GROUP_MAX_ELEMENTS", 0)
  alone, b1_alone = run()
  np.testing.assert_allclose(np.asarray(b1), np.asarray(b1_alone), rtol=2e-6)
  for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(alone), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_a_nonfinite_entry_in_any_small_leaf(dtype, bad):
  """Small leaves are probed as one concatenation per dtype: a bad entry in any of them (the
  first, a middle one, the last; beside leaves of another dtype) is found, and none is
  reported when every entry is finite (the largest finite value included)."""
  params = _small_leaves()
  tree = {k: v.astype(dtype) for k, v in params.items()}
  tree["other"] = jnp.ones((3, 4), jnp.float32)
  tree["ln3"] = tree["ln3"].at[5].set(jnp.finfo(dtype).max)
  check = jax.jit(all_finite)
  assert bool(check(tree))
  for name in ["ln0", "ln4", "b1", "s", "other"]:
    bad_tree = dict(tree)
    bad_tree[name] = jnp.asarray(tree[name]).reshape(-1).at[-1].set(bad).reshape(
        jnp.shape(tree[name])).astype(jnp.result_type(tree[name]))
    assert not bool(check(bad_tree)), name


@pytest.mark.parametrize("make", [lambda: stax.stable_adamw(1e-2), lambda: stax.oadamw(1e-2)],
                         ids=["stable_adamw", "oadamw"])
def test_rms_clips_of_alike_leaves_reduced_together_equal_each_leafs(make, monkeypatch):
  """StableAdamW's per-tensor update RMS (OAdamW's non-matrix leaves) of small alike leaves,
  reduced as one vmapped stack and picked back per leaf, is each leaf's own to rounding."""
  params = _small_leaves()

  def run():
    tx = make()
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for t in range(3):
      # a large first gradient after small ones: the clip binds (RMS > 1) on some steps
      g = jax.tree.map(lambda x: jnp.sin(x * (t + 1.0) + jnp.arange(x.size).reshape(x.shape))
                       * (10.0 ** t), params)
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    return p

  grouped = run()
  monkeypatch.setattr(_leafwise, "GROUP_MAX_ELEMENTS", 0)
  alone = run()
  for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(alone), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert any(not np.array_equal(np.asarray(a), np.asarray(p))
             for a, p in zip(jax.tree.leaves(grouped), jax.tree.leaves(params)))


@pytest.mark.parametrize("make", [
    stax.stam, stax.stam_lite, lambda: stax.stam(beta1_signal="snr"),
    lambda: stax.stable_adamw(1e-3), lambda: stax.stable_adamw(1e-3, nu_dtype=jnp.bfloat16),
    lambda: stax.oadamw(1e-3, muon="gradient")],
    ids=["stam", "stam_lite", "stam_snr", "stable_adamw", "stable_adamw_bf16_v",
         "oadamw_gradient"])
def test_per_tensor_statistics_hold_no_leaf_size(make):
  """The β1 rules' statistics and StableAdamW's RMS clip (before the core with float32 moments,
  after it with a bfloat16 v or a transformed gradient) are sums divided by each leaf's size in
  one vector (``adaptive_beta._means``, ``stable._clip_scales``), so no kernel of the compiled
  step holds a leaf's ``1/n``: as a scalar per leaf that was a kernel of its own per leaf shape
  (ResNet-18: STAM 141 -> 117 kernels, StableAdamW 126 -> 118)."""
  import re
  params = {"a": jnp.ones((96, 130)), "b": jnp.ones((70, 110)), "c": jnp.ones((37,))}
  tx = make()
  hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  consts = [float(c) for c in re.findall(r"f32\[\] constant\(([-+0-9.e]+)\)", hlo)]
  for n in (96 * 130, 70 * 110, 37):
    assert not [c for c in consts if abs(c - 1 / n) <= 1e-6 / n], n


@pytest.mark.parametrize("name", ["stable_adamw", "stam_lite", "stam"])
def test_derivatives_through_an_update_follow_the_per_tensor_statistics(name, monkeypatch):
  """``jax.grad``/``jax.jvp`` through one update (meta-learning, hypergradients) see what flows
  through a picked per-leaf statistic (StableAdamW's RMS clip, STAMLite's and STAM's β1 and
  scales): the picks' bits have no derivative, so before the picks carried slices' tangents,
  CPU gradients dropped that dependence where other backends slice (here StableAdamW's
  derivative was 0.4 % off, STAMLite's 6.6 %, STAM's 0.2 %; 3 % and 21 % on another problem).
  Checked in float64 against central differences (within 1e-3; measured ≤ 8e-5), and equal to
  the derivative with the picks replaced by slices."""
  make = {"stable_adamw": lambda: stax.stable_adamw(1e-2, weight_decay=0.0),
          "stam_lite": lambda: stax.stam_lite(1e-2, weight_decay=0.0),
          "stam": lambda: stax.stam(1e-2, weight_decay=0.0)}[name]
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    shapes = {"a": (8, 16), "b": (16,), "c": (4, 4)}

    def draw(scale):
      return {k: jnp.asarray(scale * rng.normal(size=s)) for k, s in shapes.items()}

    p, g0, g, d, w = {k: jnp.zeros(s) for k, s in shapes.items()}, draw(0.1), draw(1.0), \
        draw(1.0), draw(1.0)
    tx = make()
    s = tx.update(g0, tx.init(p), p)[1]

    def f(gg):
      u = tx.update(gg, s, p)[0]
      return sum(jnp.vdot(u[k], w[k]) for k in shapes)

    def along(tree):
      return float(sum(jnp.vdot(tree[k], d[k]) for k in shapes))

    ad = along(jax.grad(f)(g))
    _, fwd = jax.jvp(f, (g,), (d,))
    h = 1e-4   # (smaller steps meet the float32 rounding of the statistics)
    fd = float((f(jax.tree.map(lambda x, y: x + h * y, g, d))
                - f(jax.tree.map(lambda x, y: x - h * y, g, d))) / (2 * h))
    monkeypatch.setattr(_leafwise, "_picks", lambda vec, wanted: [vec[i] for i in wanted])
    sliced = along(jax.grad(f)(g))
  assert ad == pytest.approx(sliced, rel=1e-9)
  assert float(fwd) == pytest.approx(ad, rel=1e-6)
  assert ad == pytest.approx(fd, rel=1e-3)
