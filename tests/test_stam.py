"""STAM / STAMLite: parity with the installed ``stam-optimizer`` 0.1.0, the improved SNR
beta1 (scale invariance, limits, an independent numpy reference), diagnostics, state bytes,
the per-tensor RMS codec and validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from stax.codecs.tensor_rms import TensorMean, tensor_rms_storage
from stax.transforms import adaptive_beta as AB

so = pytest.importorskip("stam_optimizer")

STEPS = 200
BURST_STEP, SPIKE_STEP, NAN_STEP = 40, 80, 140


# --------------------------------------------------------------------------- parity helpers
def _mlp(sparse: bool):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"l1": {"w": 0.3 * jax.random.normal(k1, (8, 16)), "b": jnp.zeros(16)},
            "l2": {"w": 0.3 * jax.random.normal(k2, (16, 4)), "b": jnp.zeros(4)}}
  x_all = jax.random.normal(k3, (256, 8))
  if sparse:  # mostly-zero inputs: l1's gradient has a few large entries (variance explosion)
    x_all = x_all * (jax.random.uniform(k4, (256, 8)) < 0.05)
  y_all = jnp.sin(x_all @ jax.random.normal(k4, (8, 4)))

  def loss(p, idx):
    h = jnp.tanh(x_all[idx] @ p["l1"]["w"] + p["l1"]["b"])
    return jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - y_all[idx]) ** 2)

  return params, loss


def _train(tx, params, loss, extra):
  """200 minibatch steps with three accidents: a +1e3 outlier in l2/w at BURST_STEP (a
  "variance explosion" for STAM), a 1e18 spike in l1/w at SPIKE_STEP (another explosion, below
  the 2**63 at which stax saturates gradients — beyond it the seed's float32 g² overflows and its
  state stays Inf, which stax deliberately does not reproduce: see test_contract's huge-gradient
  test) and NaN/-Inf entries in l2 at NAN_STEP. Returns the parameter trajectory and
  ``extra(state)`` per step."""

  def step(carry, t):
    p, s = carry
    idx = jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(1), t), (32,), 0, 256)
    g = jax.grad(loss)(p, idx)
    g["l2"]["w"] = g["l2"]["w"].at[0, 0].add(jnp.where(t == BURST_STEP, 1e3, 0.0))
    g["l1"]["w"] = g["l1"]["w"].at[0, 0].add(jnp.where(t == SPIKE_STEP, 1e18, 0.0))
    g["l2"]["b"] = g["l2"]["b"].at[0].set(jnp.where(t == NAN_STEP, jnp.nan, g["l2"]["b"][0]))
    g["l2"]["w"] = g["l2"]["w"].at[1, 2].set(jnp.where(t == NAN_STEP, -jnp.inf, g["l2"]["w"][1, 2]))
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (p, extra(s))

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jnp.arange(STEPS))[1])
  return run(params)


def _rel_errs(traj, ref):
  """(vector, worst leaf): per step, ||a - b||_inf / ||b||_inf over the whole parameter vector,
  and the same ratio per leaf; each maximised over the steps."""
  diff = jnp.stack([jnp.max(jnp.abs(a - b).reshape(STEPS, -1), axis=1)
                    for a, b in zip(jax.tree.leaves(traj), jax.tree.leaves(ref))])
  size = jnp.stack([jnp.max(jnp.abs(b).reshape(STEPS, -1), axis=1) for b in jax.tree.leaves(ref)])
  return float(jnp.max(jnp.max(diff, 0) / jnp.max(size, 0))), float(jnp.max(diff / size))


def _check_parity(name, mine, ref):
  vec, leaf = _rel_errs(mine, ref)
  # float32 rounding differs only in the order of a few products (e.g. lr·(u + λp) vs
  # lr·u + lr·λp); it accumulates to ~1e-7 of the parameter scale over 200 steps, and to ~1e-6
  # on small bias leaves that hover near zero, hence the per-leaf bound of 1e-5.
  assert vec < 1e-6, f"{name}: max relative parameter error {vec:.2e}"
  assert leaf < 1e-5, f"{name}: max relative error of one leaf {leaf:.2e}"


STAM_CASES = [
    ("defaults", dict(), False, True),
    ("custom_sparse", dict(learning_rate=1e-2, b1_base=0.8, b2=0.99, weight_decay=0.1,
                           adapt_strength=0.5, tau_decay=0.9, fallback_threshold=20.0), True, True),
    ("strong_decay", dict(learning_rate=3e-3, b1_base=0.95, b2=0.9, eps=1e-6, weight_decay=0.0,
                          adapt_strength=0.35, tau_decay=0.5), False, True),
]


@pytest.mark.parametrize("name,kw,sparse,explodes", STAM_CASES, ids=[c[0] for c in STAM_CASES])
def test_stam_matches_seed_package(name, kw, sparse, explodes):
  params, loss = _mlp(sparse)
  ref, (sig, tau) = _train(so.stam(**kw), params, loss,
                           lambda s: (s.inner_state.sigma_sq, s.inner_state.tau))
  mine, beta1 = _train(stax.stam(**kw, nonfinite="zero"), params, loss,
                       lambda s: stax.stam_beta1(s, params))
  _check_parity(name, mine, ref)

  # The safety fallbacks were exercised, and stax chose b1_base exactly there (conditions read
  # from the *seed's* state).
  thr = kw.get("fallback_threshold", 100.0)
  base = np.float32(kw.get("b1_base", 0.9))
  nan_fb = explode = 0
  for s2, t, b in zip(jax.tree.leaves(sig), jax.tree.leaves(tau), jax.tree.leaves(beta1)):
    s2, t, b = np.asarray(s2), np.asarray(t), np.asarray(b)
    nonfinite = ~np.isfinite(s2)
    big = np.isfinite(s2) & ~(s2 < np.float32(thr) * (t * t + np.float32(1e-8)))
    nan_fb += nonfinite.sum()
    explode += big.sum()
    np.testing.assert_array_equal(b[nonfinite | big], base)
    assert np.all(b[~(nonfinite | big)] < base)
  assert nan_fb == 0  # finite gradients below 2**63 keep the seed's variance finite too
  assert (explode > 0) == explodes  # e.g. the BURST_STEP outlier crosses the threshold
  # NaN/Inf gradient entries were zeroed, not propagated.
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(mine))


LITE_CASES = [
    ("defaults", dict()),
    ("custom", dict(learning_rate=1e-2, b1_base=0.8, weight_decay=0.1, adapt_strength=0.5,
                    moment_decay=0.9, beta1_update_interval=3)),
]


@pytest.mark.parametrize("name,kw", LITE_CASES, ids=[c[0] for c in LITE_CASES])
def test_stam_lite_matches_seed_package(name, kw):
  params, loss = _mlp(sparse=False)
  ref, ref_beta1 = _train(so.stam_lite(**kw), params, loss, lambda s: s.inner_state.beta1)
  mine, beta1 = _train(stax.stam_lite(**kw, nonfinite="zero"), params, loss,
                       lambda s: stax.stam_beta1(s, params))
  _check_parity(name, mine, ref)
  for a, b in zip(jax.tree.leaves(beta1), jax.tree.leaves(ref_beta1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # The spike (below 2**63, see _train) keeps every candidate finite in both, so beta1 follows
  # the seed's through it (checked above); stax's non-finite fallback needs |g| >= 2**64, where
  # the seed's state overflows (test_contract's huge-gradient test covers stax there).
  assert np.all(np.asarray(beta1["l2"]["w"]) < np.float32(kw.get("b1_base", 0.9)))


def test_default_nonfinite_policy_skips_the_step():
  """A skipped step keeps every part of the state bit for bit: the moments, the rules'
  statistics (small alike leaves reduced as one stack) and STAMLite's per-tensor means of v
  (their EMAs formed and gated as one vector)."""
  params = {"w": jnp.ones((4, 3)), "big": jnp.ones((128, 96)),
            **{f"v{i}": jnp.full((16,), 1.0 + i) for i in range(3)}}
  for tx in (stax.stam(), stax.stam_lite(), stax.stam(beta1_signal="snr"),
             stax.stam_lite(beta1_signal="snr")):
    state = tx.init(params)
    good = jax.tree.map(lambda x: jnp.cos(x + jnp.arange(x.size).reshape(x.shape)), params)
    u, state = jax.jit(tx.update)(good, state, params)
    bad = dict(good, v1=good["v1"].at[3].set(jnp.nan))
    u2, state2 = jax.jit(tx.update)(bad, state, params)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u2)) == 0.0
    for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(state2.inner_state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state2.nonfinite_count) == 1


# --------------------------------------------------------------------------- improved beta1
def _beta1_runner(tx, shape=(32, 32)):
  """jitted: (snr, scale, steps static) -> beta1 per step for g = scale·(√snr·μ + noise)."""
  mu = jax.random.normal(jax.random.PRNGKey(7), shape)
  p = {"w": jnp.zeros(shape)}

  def run(snr, scale, const, steps):
    def step(s, t):
      noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), t), shape)
      g = jnp.where(const, mu, jnp.sqrt(snr) * mu + noise) * scale
      _, s = tx.update({"w": g}, s, p)
      return s, stax.stam_beta1(s, p)["w"]
    return jax.lax.scan(step, tx.init(p), jnp.arange(steps))[1]

  return jax.jit(run, static_argnums=3)


@pytest.mark.parametrize("factory", [stax.stam, stax.stam_lite], ids=["stam", "stam_lite"])
def test_snr_beta1_limits_and_monotone(factory):
  run = _beta1_runner(factory(beta1_signal="snr"))
  lo, hi = 0.72, 0.9  # max(0.5, 0.9·(1-0.2)), b1_base
  const = np.asarray(run(0.0, 1.0, True, 600))
  assert abs(const[-1] - hi) < 1e-4, const[[0, 10, 100, -1]]
  noise = np.asarray(run(0.0, 1.0, False, 600))
  assert np.max(noise[100:]) - lo < 5e-3, noise[[0, 10, 100, -1]]
  finals = [float(np.mean(np.asarray(run(snr, 1.0, False, 400))[200:]))
            for snr in (0.3, 1.0, 10.0)]
  assert lo + 1e-3 < finals[0] < finals[1] < finals[2] < hi - 1e-3, finals


@pytest.mark.parametrize("factory", [stax.stam, stax.stam_lite], ids=["stam", "stam_lite"])
def test_snr_beta1_is_scale_invariant_and_seed_is_not(factory):
  snr_run = _beta1_runner(factory(beta1_signal="snr"))
  small = np.asarray(snr_run(1.0, 1e-3, False, 300))
  large = np.asarray(snr_run(1.0, 1e3, False, 300))
  np.testing.assert_allclose(small, large, rtol=1e-5, atol=0)
  assert np.ptp(small) > 0.05  # it does adapt
  if factory is stax.stam:  # the seed's rule depends on the absolute scale (its 1e-8 terms)
    seed_run = _beta1_runner(factory())
    diff = np.abs(np.asarray(seed_run(1.0, 1e-3, False, 300)) -
                  np.asarray(seed_run(1.0, 1e3, False, 300)))
    assert diff.max() > 0.05


def test_snr_beta1_scale_invariant_on_a_problem():
  """Same quadratic with the loss ×1e-3 and ×1e3: identical beta1 trajectories (eps=0 makes the
  whole update scale invariant, so the parameter trajectories agree too)."""
  rng = np.random.default_rng(0)
  target = {"a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  curv = jax.tree.map(lambda t: jnp.asarray(rng.uniform(0.5, 2, t.shape), jnp.float32), target)
  tx = stax.stam(3e-2, beta1_signal="snr", eps=0.0, weight_decay=0.0)

  @jax.jit
  def run(c):
    def loss(p, t):
      noise = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(
          jax.random.PRNGKey(5), t), x.shape), p)
      return c * sum(jax.tree.leaves(jax.tree.map(
          lambda x, y, k, n: jnp.sum(0.5 * k * (x - y) ** 2 + 0.3 * n * x), p, target, curv,
          noise)))

    def step(carry, t):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p, t), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), (stax.stam_beta1(s, p), p)

    p0 = jax.tree.map(jnp.zeros_like, target)
    return jax.lax.scan(step, (p0, tx.init(p0)), jnp.arange(300))[1]

  (b_small, p_small), (b_large, p_large) = run(1e-3), run(1e3)
  for a, b in zip(jax.tree.leaves(b_small), jax.tree.leaves(b_large)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=0)
  for a, b in zip(jax.tree.leaves(p_small), jax.tree.leaves(p_large)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
  assert np.ptp(np.asarray(b_small["a"])) > 0.05


def test_snr_rule_matches_numpy_reference():
  """The improved STAM step against a float64 numpy transcription of its equations."""
  rng = np.random.default_rng(1)
  shape, steps, lr = (6, 5), 40, 1e-2
  b1_base, alpha, b2, rho, eps = 0.9, 0.3, 0.99, 0.9, 1e-8
  mu_true = rng.normal(size=shape)
  grads = np.stack([0.7 * mu_true + rng.normal(size=shape) for _ in range(steps)])
  tx = stax.stam(lr, b1_base, b2, eps, 0.0, alpha, rho, beta1_signal="snr")
  p = {"w": jnp.zeros(shape)}

  def step(s, g):
    u, s = tx.update({"w": g}, s, p)
    return s, (u["w"], stax.stam_beta1(s, p)["w"])

  _, (us, bs) = jax.jit(lambda s, gs: jax.lax.scan(step, s, gs))(
      tx.init(p), jnp.asarray(grads, jnp.float32))

  lo, hi = max(0.5, b1_base * (1 - alpha)), b1_base
  m = v = np.zeros(shape)
  big_g = big_r = 0.0
  prod = 1.0
  for t, g in enumerate(grads, start=1):
    m_hat_prev = m / (1 - prod) if prod < 1 else np.zeros(shape)
    big_g = rho * big_g + (1 - rho) * np.mean(g ** 2)
    big_r = rho * big_r + (1 - rho) * np.mean((g - m_hat_prev) ** 2)
    b1 = lo + (hi - lo) * min(max(1 - big_r / big_g, 0.0), 1.0)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g ** 2
    prod *= b1
    u = -lr * (m / (1 - prod + eps)) / (np.sqrt(v / (1 - b2 ** t + eps)) + eps)
    np.testing.assert_allclose(float(bs[t - 1]), b1, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(us[t - 1]), u, rtol=2e-4, atol=1e-7)


# --------------------------------------------------------------------------- diagnostics
def test_stam_beta1_under_jit_and_wrappers():
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones(3)}
  g = {"a": jnp.linspace(-1, 1, 16).reshape(4, 4), "b": jnp.array([0.5, -2.0, 1.0])}
  tx = stax.stam(1e-2, b1_base=0.85)
  assert float(stax.stam_beta1(tx.init(params), params)["a"]) == pytest.approx(0.85)
  # the state keeps one vector, an entry per leaf in flatten order ("a", "b")
  assert stax.stam_beta1(tx.init(params)).shape == (2,)
  _, s = tx.update(g, tx.init(params), params)
  # Independent: the seed's rule at step 1 (r = g, sigma² = (1-b2)·mean(g²), tau = 0.01·mean|g|).
  for k in ("a", "b"):
    x = np.asarray(g[k], np.float64)
    z = 0.001 * np.mean(x ** 2) / ((0.01 * np.mean(np.abs(x))) ** 2 + 1e-8)
    want = np.clip(0.85 * (1 - 0.2 * z / (1 + z)), max(0.5, 0.85 * 0.8), 0.85)
    assert float(stax.stam_beta1(s, params)[k]) == pytest.approx(want, rel=1e-5)
    assert float(stax.stam_beta1(s)["ab".index(k)]) == float(stax.stam_beta1(s, params)[k])
  jitted = jax.jit(lambda s: stax.stam_beta1(s, params))(s)
  assert jax.tree.map(float, jitted) == jax.tree.map(float, stax.stam_beta1(s, params))
  # Through inject_hyperparams and MultiSteps.
  inj = optax.inject_hyperparams(stax.stam_lite, static_args=("beta1_update_interval",))(
      learning_rate=1e-2)
  si = jax.jit(inj.update)(g, inj.init(params), params)[1]
  assert set(stax.stam_beta1(si, params)) == {"a", "b"}
  ms = optax.MultiSteps(stax.stam(), every_k_schedule=2)
  sm = jax.jit(ms.update)(g, ms.init(params), params)[1]
  assert float(stax.stam_beta1(sm, params)["a"]) == pytest.approx(0.9)  # inner step not taken yet
  with pytest.raises(ValueError, match="adaptive-beta1"):
    stax.stam_beta1(stax.adamw().init(params))
  with pytest.raises(ValueError, match="has 1 leaves but"):
    stax.stam_beta1(s, {"a": 0})


# --------------------------------------------------------------------------- state, codec
def _state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))


def test_state_bytes_per_parameter():
  params = {f"layer_{i}": {"kernel": jnp.zeros((256, 256)), "bias": jnp.zeros(256)}
            for i in range(4)}
  n = sum(x.size for x in jax.tree.leaves(params))
  per = {name: _state_bytes(tx.init(params)) / n for name, tx in [
      ("adamw", stax.adamw()), ("stam", stax.stam()), ("stam_lite", stax.stam_lite()),
      ("stam_lite_bf16", stax.stam_lite(state_dtype=jnp.bfloat16))]}
  assert per["adamw"] == pytest.approx(8.0, rel=1e-3)
  assert per["stam_lite"] < 0.51 * per["adamw"], per
  assert per["stam_lite_bf16"] < 0.26 * per["adamw"], per
  assert per["stam"] == pytest.approx(per["adamw"], rel=1e-3), per


def test_tensor_mean_codec_and_storage():
  c = TensorMean()
  x = jnp.arange(12.0).reshape(3, 4)
  assert c.encode(x, None).shape == () and float(c.encode(x, None)) == pytest.approx(5.5)
  assert c.decode(jnp.float32(2.0), x).shape == (3, 4)
  assert float(c.encode(jnp.zeros((0, 4)), None)) == 0.0  # empty leaf: no NaN
  # The Adam core with this storage divides by one RMS per tensor: check against numpy.
  tx = stax.scale_by_adam(0.0, 0.5, 0.0, bias_correction="none", storage=tensor_rms_storage())
  g = np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)
  u, s = tx.update({"w": jnp.asarray(g)}, tx.init({"w": jnp.zeros((2, 2))}))
  np.testing.assert_allclose(np.asarray(u["w"]), g / np.sqrt(0.5 * np.mean(g ** 2)), rtol=1e-6)
  assert s.nu["w"].shape == () and float(s.nu["w"]) == pytest.approx(0.5 * np.mean(g ** 2))


def test_bf16_params_keep_dtype_and_f32_statistics():
  params = {"w": jnp.ones((8, 4), jnp.bfloat16)}
  for tx in (stax.stam(nu_dtype=jnp.float32), stax.stam_lite()):
    s = tx.init(params)
    u, s = jax.jit(tx.update)({"w": jnp.full((8, 4), 0.1, jnp.bfloat16)}, s, params)
    assert u["w"].dtype == jnp.bfloat16
    rule = [x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, AB.BETA1_STATES))
            if isinstance(x, AB.BETA1_STATES)][0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(rule))


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,name", [
    (dict(adapt_strength=0.6), "adapt_strength"),
    (dict(b1_base=0.0), "b1_base"),
    (dict(b2=1.0), "b2"),
    (dict(tau_decay=1.0), "tau_decay"),
    (dict(fallback_threshold=0.0), "fallback_threshold"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(eps=-1.0), "eps"),
    (dict(b1_min=0.95), "b1_min"),
    (dict(beta1_signal="kurtosis"), "beta1_signal"),
    (dict(nonfinite="nan"), "nonfinite"),
])
def test_stam_validation(kwargs, name):
  with pytest.raises(ValueError, match=name):
    stax.stam(**kwargs)


@pytest.mark.parametrize("kwargs,err,name", [
    (dict(moment_decay=1.0), ValueError, "moment_decay"),
    (dict(beta1_update_interval=0), ValueError, "beta1_update_interval"),
    (dict(beta1_update_interval=2.5), TypeError, "beta1_update_interval"),
    (dict(state_dtype=jnp.int8), ValueError, "state_dtype"),
    (dict(adapt_strength=-0.1), ValueError, "adapt_strength"),
])
def test_stam_lite_validation(kwargs, err, name):
  with pytest.raises(err, match=name):
    stax.stam_lite(**kwargs)


# --------------------------------------------------------------------------- raw-gradient rules
def test_rules_get_the_raw_gradient_and_the_steps_bound():
  """A ``raw_grads`` rule receives (g, B) with B the bound the step saturates at: 2**63 for
  float32 moments, 128 when a moment is float16; a plain rule still gets the saturated g."""
  seen = {}

  def make(raw):
    def update(grads, mu, state, count):
      seen[raw] = grads["w"]
      return jax.tree.map(lambda _: jnp.float32(0.9), mu), state
    return stax.Beta1Rule(lambda p: jnp.zeros([]), update, raw_grads=raw)

  g = {"w": jnp.array([1.0, 3e38, -jnp.inf], jnp.float32)}
  for raw, nu_dtype, bound in ((True, None, 2.0 ** 63), (True, jnp.float16, 128.0),
                               (False, None, 2.0 ** 63)):
    tx = stax.scale_by_adam(make(raw), 0.99, bias_correction="product", nu_dtype=nu_dtype)
    tx.update(g, tx.init({"w": jnp.zeros(3)}))
    if raw:
      got, b = seen[raw]
      assert b == bound
      np.testing.assert_array_equal(np.asarray(got), np.asarray(g["w"]))
    else:
      np.testing.assert_array_equal(np.asarray(seen[raw]), [1.0, bound, -bound])


def _rule_stats(rule, g, m):
  """One update of ``rule`` on one leaf (raw gradient g with the float32 bound)."""
  params = {"w": jnp.zeros(g.shape)}
  state = rule.init(params)
  state = jax.jit(rule.update)({"w": (g, 2.0 ** 63)}, {"w": m}, state, jnp.int32(0))[1]
  return {k: float(v[0]) for k, v in state._asdict().items()}  # one leaf: entry 0


@pytest.mark.parametrize("scale", [1.0, 1e30, "inf"])
def test_rule_statistics_are_the_saturated_gradients_and_stay_finite(scale):
  """Each rule's statistics against float64 numpy of the saturated gradient: equal (to float32
  rounding) while every |g| <= B = 2**63; beyond, bounded at R = 2**126 (means of squares) and
  B (means, mean absolute values), finite for any finite or infinite entry."""
  rng = np.random.default_rng(7)
  g = rng.standard_normal((9, 11)).astype(np.float32)
  m = (0.5 * rng.standard_normal((9, 11))).astype(np.float32)
  if scale != 1.0:
    g[2, 3] = np.inf if scale == "inf" else scale
  big_b, big_r = 2.0 ** 63, 2.0 ** 126
  g64, m64 = g.astype(np.float64), m.astype(np.float64)
  sat = np.clip(g64, -big_b, big_b)
  huge = scale != 1.0
  gj, mj = jnp.asarray(g), jnp.asarray(m)

  res = _rule_stats(AB.residual_variance_beta1(b2=0.9, tau_decay=0.8), gj, mj)
  ms = min(np.mean((g64 - m64) ** 2), big_r) if huge else np.mean((sat - m64) ** 2)
  ma = min(np.mean(np.abs(g64 - m64)), big_b) if huge else np.mean(np.abs(sat - m64))
  np.testing.assert_allclose(res["sigma_sq"], 0.1 * ms, rtol=1e-5)
  np.testing.assert_allclose(res["tau"], 0.2 * ma, rtol=1e-5)

  res = _rule_stats(AB.spatial_variance_beta1(moment_decay=0.9), gj, mj)
  mean = np.clip(np.mean(g64), -big_b, big_b) if huge else np.mean(sat)
  np.testing.assert_allclose(res["grad_mean"], 0.1 * mean, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(res["grad_sq_mean"], 0.1 * min(np.mean(g64 ** 2), big_r),
                             rtol=1e-5)

  res = _rule_stats(AB.snr_beta1(decay=0.9), gj, mj)  # prod = 1: m_hat = 0, so r = g
  np.testing.assert_allclose(res["grad_sq"], 0.1 * min(np.mean(g64 ** 2), big_r), rtol=1e-5)
  np.testing.assert_allclose(res["resid_sq"], res["grad_sq"], rtol=1e-6)
  for rule in ("sigma_sq", "tau"):
    assert np.isfinite(_rule_stats(AB.residual_variance_beta1(), gj, mj)[rule])


def test_stam_lite_stored_v_is_the_ema_of_the_mean_of_g_squared():
  """STAMLite keeps one mean of v per tensor, formed on scalars: v ← ρ·v + (1-ρ)·mean(g²), as
  the seed's grad_sq_mean (float64 reference, two steps of different gradients); a huge finite
  gradient keeps it finite (mean(g²) bounded at B² = 2**126), and a skipped non-finite step keeps
  it exactly."""
  rho = 0.99
  tx = stax.stam_lite(1e-3, moment_decay=rho, weight_decay=0.0)
  params = {"w": jnp.zeros((64, 48), jnp.float32)}
  rng = np.random.default_rng(11)
  gs = [rng.standard_normal((64, 48)).astype(np.float32) * s for s in (1.0, 3.0)]

  def stored_v(state):
    leaves = [(jax.tree_util.keystr(p), x) for p, x in
              jax.tree_util.tree_leaves_with_path(state) if ".nu" in jax.tree_util.keystr(p)]
    assert len(leaves) == 1 and leaves[0][1].shape == (), leaves
    return float(leaves[0][1])

  state = tx.init(params)
  update = jax.jit(tx.update)
  want = 0.0
  for g in gs:
    _, state = update({"w": jnp.asarray(g)}, state, params)
    want = rho * want + (1 - rho) * np.mean(g.astype(np.float64) ** 2)
    np.testing.assert_allclose(stored_v(state), want, rtol=1e-5)
  big = np.full((64, 48), 1e30, np.float32)
  _, state_big = update({"w": jnp.asarray(big)}, state, params)
  assert np.isfinite(stored_v(state_big))
  np.testing.assert_allclose(stored_v(state_big), rho * want + (1 - rho) * 2.0 ** 126, rtol=1e-5)
  bad = gs[0].copy()
  bad[0, 0] = np.nan
  _, state_bad = update({"w": jnp.asarray(bad)}, state, params)
  assert stored_v(state_bad) == stored_v(state)


def _stam_lite_reference(gs, lr, b1, rho, eps, reduce_axes):
  """STAMLite's updates (float64 NumPy, constant β1 = b1, no weight decay): m ← b1·m + (1-b1)·g,
  q ← ρ·q + (1-ρ)·mean(g²) over ``reduce_axes`` (kept as size-1 axes), update
  ``-lr·(m/(1-b1^t+ε)) / (sqrt(q/(1-ρ^t+ε)) + ε)``."""
  m = q = 0.0
  out = []
  for t, g in enumerate(gs, 1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    q = rho * q + (1 - rho) * np.mean(g ** 2, axis=reduce_axes, keepdims=True)
    out.append(-lr * (m / (1 - b1 ** t + eps)) / (np.sqrt(q / (1 - rho ** t + eps)) + eps))
  return out


@pytest.mark.parametrize("signal", ["seed", "snr"])
def test_stam_lite_keeps_one_v_per_stacked_layer(signal):
  """A stacked ``(3, 16, 8)`` kernel (batch axis 3 under the default layout) keeps one v per
  layer: its updates equal a float64 NumPy STAMLite with per-layer means (β1 held at b1_base by
  ``adapt_strength=0``), the stored v has shape ``(3,)``; a stacked bias ``(3, 8)`` (no layout)
  and a layout without batch axes keep one v per leaf, the seed's. With layer gradient scales
  1/10/100, one v per leaf had made layers 0 and 1 step ~70× and ~7× less."""
  kw = dict(weight_decay=0.0, adapt_strength=0.0, moment_decay=0.9, eps=1e-8,
            beta1_signal=signal)
  if signal == "snr":
    kw.update(b1_min=0.9)
  rng = np.random.default_rng(5)
  scales = np.array([1.0, 10.0, 100.0])
  gs = [(rng.standard_normal((3, 16, 8)) * scales[:, None, None]).astype(np.float32)
        for _ in range(4)]
  bs = [(rng.standard_normal((3, 8)) * scales[:, None]).astype(np.float32) for _ in range(4)]
  params = {"layers": {"kernel": jnp.zeros((3, 16, 8)), "bias": jnp.zeros((3, 8))}}
  for dims, k_axes in ((None, (1, 2)), (lambda path, x: None, None)):
    tx = stax.stam_lite(1e-2, dimension_numbers=dims, **kw)
    state = tx.init(params)
    us = []
    for g, b in zip(gs, bs):
      u, state = jax.jit(tx.update)({"layers": {"kernel": jnp.asarray(g), "bias": jnp.asarray(b)}},
                                    state, params)
      us.append(u)
    want_k = _stam_lite_reference(gs, 1e-2, 0.9, 0.9, 1e-8, k_axes)
    want_b = _stam_lite_reference(bs, 1e-2, 0.9, 0.9, 1e-8, None)
    for u, wk, wb in zip(us, want_k, want_b):
      np.testing.assert_allclose(np.asarray(u["layers"]["kernel"]), wk, rtol=2e-5, atol=1e-9)
      np.testing.assert_allclose(np.asarray(u["layers"]["bias"]), wb, rtol=2e-5, atol=1e-9)
    nu = state.inner_state[0].nu["layers"]
    assert nu["kernel"].shape == ((3,) if dims is None else ()) and nu["bias"].shape == ()
    step0 = [float(np.abs(np.asarray(us[-1]["layers"]["kernel"][i])).max()) for i in range(3)]
    if dims is None:   # every layer steps ~lr
      assert min(step0) > 0.3 * max(step0)
    else:              # the largest layer's RMS divides all of them
      assert step0[0] < 0.05 * step0[2]
