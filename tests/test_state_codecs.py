"""Low-bit optimizer state beyond TurboAdam (issue 17): a moment codec on any Adam-family
optimizer (``codec=``) and Muon's momentum stored in a few bits (:func:`stax.stored_trace`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from stax.codecs.block_signed import signed_decode
from stax.codecs.row_view import from_row_view, to_row_view


def _grads(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.uniform(-3, 1, size=shape[:-1] + (1,)))   # rows of very different scale
  return [jnp.asarray((rng.normal(size=shape) * scales).astype(np.float32)) for _ in range(steps)]


# ----------------------------------------------------------------------------- stored_trace
@pytest.mark.parametrize("nesterov", [False, True])
def test_stored_trace_below_the_compress_size_is_optax_trace(nesterov):
  params = {"w": jnp.zeros((8, 16)), "b": jnp.zeros(16)}
  mine = stax.stored_trace(0.9, nesterov, min_compress_elements=10 ** 6)
  ref = optax.trace(0.9, nesterov)
  s, r = mine.init(params), ref.init(params)
  for g in _grads((8, 16), 5):
    grads = {"w": g, "b": g[0]}
    u, s = jax.jit(mine.update)(grads, s)
    v, r = jax.jit(ref.update)(grads, r)
    for k in grads:
      np.testing.assert_array_equal(u[k], v[k])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("nesterov", [False, True])
def test_stored_trace_rounds_the_exact_recurrence_to_a_neighbouring_level(bits, nesterov):
  """Teacher-forced from the stored codes: each step's output is ``g + μ·t̂`` of the decoded
  previous trace (Nesterov ``g + μ·(g + μ·t̂)``), and the new codes decode to one of the two
  grid levels ``k·s/L`` around that value, with ``s`` the block's absmax rounded up in
  bfloat16 (numpy, independent of the codec's decode)."""
  mu, shape = 0.95, (6, 3, 64)                      # a stacked leaf, seen through its row view
  tx = stax.stored_trace(mu, nesterov, bits=bits, min_compress_elements=1)
  block = 128 if bits == 8 else 32
  half = 2 ** (bits - 1) - 1
  params = {"w": jnp.zeros(shape)}
  state = tx.init(params)
  prev = np.zeros(shape, np.float32)
  step = jax.jit(tx.update)
  for g in _grads(shape, 6, seed=bits):
    u, state = step({"w": g}, state)
    exact = np.asarray(g) + np.float32(mu) * prev
    out = np.asarray(g) + np.float32(mu) * exact if nesterov else exact
    np.testing.assert_allclose(u["w"], out, rtol=1e-6, atol=1e-7)
    enc = state.trace["w"]
    view = np.asarray(to_row_view(jnp.asarray(exact), block))
    n = view.shape[-1]
    nb = -(-n // block)
    padded = np.pad(view, [(0, 0)] * (view.ndim - 1) + [(0, nb * block - n)])
    absmax = np.abs(padded.reshape(view.shape[:-1] + (nb, block))).max(-1)
    s = np.asarray(enc.scales.astype(jnp.float32))
    assert np.all(s >= absmax) and np.all(s <= absmax * (1 + 2 ** -7) + 1e-30)
    got = np.asarray(from_row_view(signed_decode(enc, bits, block, n), params["w"]))
    step_size = np.repeat(s / half, block, axis=-1)[..., :n].reshape(shape)
    assert np.all(np.abs(got - exact) <= step_size * (1 + 1e-5))
    k = got / np.where(step_size > 0, step_size, 1)
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)   # on the grid
    prev = got


def test_stored_trace_rounding_is_unbiased_and_keyed_by_the_state():
  """Over 256 seeds the stored trace averages to the exact one (stochastic rounding is
  unbiased); the same seed gives the same codes (the key lives in the state)."""
  g = _grads((4, 128), 1)[0]
  tx = stax.stored_trace(0.9, bits=4, min_compress_elements=1)
  state0, step = tx.init({"w": g}), jax.jit(tx.update)
  enc = lambda seed: step({"w": g}, state0._replace(
      key=jax.random.key_data(jax.random.PRNGKey(seed))))[1].trace["w"]
  dec = lambda e: signed_decode(e, 4, 32, 128)
  mean = np.mean([np.asarray(dec(enc(s))) for s in range(256)], axis=0)
  s = np.repeat(np.asarray(enc(0).scales.astype(jnp.float32)) / 7, 32, axis=-1)
  # each draw is within one level; the mean of 256 within 4 standard errors (≤ 0.5 level/16)
  assert np.all(np.abs(mean - np.asarray(g)) <= 4 * 0.5 * s / 16 + 1e-7)
  np.testing.assert_array_equal(enc(3).codes, enc(3).codes)
  assert not np.array_equal(enc(3).codes, enc(4).codes)


def test_stored_trace_keys_each_leaf_by_its_index():
  """Each stored leaf rounds with its key of the step (``rng.leaf_keys``: the state key hashed
  with the step and the leaf's index), bit for bit (every leaf's key is made at once and
  picked: a ``fold_in`` per leaf was a threefry loop of its own in the compiled step)."""
  from stax.codecs.block_signed import BlockSignedCodec
  g = {"a": _grads((4, 128), 1)[0], "b": _grads((8, 64), 1, seed=1)[0], "c": jnp.ones(3)}
  tx = stax.stored_trace(0.9, bits=4, block_size=32, min_compress_elements=64)
  state0 = tx.init(g)
  _, state = jax.jit(tx.update)(g, state0)
  from stax.codecs import rng
  keys = rng.leaf_keys(state0.key, jnp.int32(0), len(g))
  for i, name in enumerate(sorted(g)[:2]):     # the first trace is g itself (t = g + 0.9·0)
    want = BlockSignedCodec(4, 32).encode(to_row_view(g[name], 32), keys[i])
    for a, b in zip(jax.tree.leaves(state.trace[name]), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stored_trace_validation():
  with pytest.raises(ValueError, match="bits"):
    stax.stored_trace(0.9, bits=5)
  with pytest.raises(ValueError, match="decay"):
    stax.stored_trace(1.0)
  with pytest.raises(ValueError, match="block_size"):
    stax.stored_trace(0.9, bits=3, block_size=4)
  with pytest.raises(ValueError, match="min_compress_elements"):
    stax.stored_trace(0.9, min_compress_elements=-1)


def _least_squares(seed=0):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.normal(size=(256, 64)).astype(np.float32))
  w_true = rng.normal(size=(64, 96)).astype(np.float32)
  y = a @ w_true + 0.1 * jnp.asarray(rng.normal(size=(256, 96)).astype(np.float32))
  loss = lambda p: jnp.mean((a @ p["w"] + p["b"] - y) ** 2)
  return {"w": jnp.zeros((64, 96)), "b": jnp.zeros(96)}, loss


def _train(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, state, np.array(losses)


def test_oadamw_with_8_bit_momentum_tracks_full_precision_muon():
  """8-bit Muon momentum (8.125 bits/param on the Muon leaf) follows the float32 run on least
  squares: the loss within 3% of float32's at every step after the 10th, the final weights
  within 3% (relative Frobenius; measured 1.8%); 4-bit momentum is measurably further
  (measured 7.3%), so the comparison can tell."""
  params, loss = _least_squares()
  kw = dict(learning_rate=0.1, weight_decay=0.0, min_compress_elements=1024)
  full_p, _, full = _train(stax.oadamw(**kw), params, loss, 150)
  p8, s8, l8 = _train(stax.oadamw(muon_momentum_bits=8, **kw), params, loss, 150)
  p4, _, _ = _train(stax.oadamw(muon_momentum_bits=4, **kw), params, loss, 150)
  rel = lambda p: float(jnp.linalg.norm(p["w"] - full_p["w"]) / jnp.linalg.norm(full_p["w"]))
  assert full[-1] < 0.01 * full[0]
  assert np.all(np.abs(l8[10:] / full[10:] - 1) < 0.03), np.abs(l8 / full - 1).max()
  assert rel(p8) < 0.03 and rel(p4) > 2 * rel(p8), (rel(p8), rel(p4))
  trace = jax.tree.leaves(s8, is_leaf=lambda x: isinstance(x, stax.StoredTraceState))
  trace = [t for t in trace if isinstance(t, stax.StoredTraceState)][0]
  assert trace.trace["w"].codes.dtype == jnp.uint8 and trace.trace["w"].codes.size == 64 * 96


# ----------------------------------------------------------------------- codec= on Adam family
@pytest.mark.parametrize("codec", ["stax", "factored"])
def test_adamw_with_a_codec_is_turbo_adams_step(codec):
  """stax.adamw(codec=c) stores its moments exactly as stax.turbo_adam(codec=c) (same seed):
  the two give the same parameters bit for bit."""
  params = {"w": jnp.ones((48, 64)) * 0.1, "b": jnp.zeros(64)}
  a = stax.adamw(3e-3, weight_decay=0.01, codec=codec, min_compress_elements=1024)
  t = stax.turbo_adam(3e-3, weight_decay=0.01, codec=codec, min_compress_elements=1024, seed=0)
  sa, st, pa, pt = a.init(params), t.init(params), params, params
  for g in _grads((48, 64), 5):
    grads = {"w": g, "b": g[0]}
    ua, sa = jax.jit(a.update)(grads, sa, pa)
    ut, st = jax.jit(t.update)(grads, st, pt)
    pa, pt = optax.apply_updates(pa, ua), optax.apply_updates(pt, ut)
  for k in params:
    np.testing.assert_array_equal(pa[k], pt[k])


def _rank1(v):
  r, c = v.mean(-1, keepdims=True), v.mean(-2, keepdims=True)
  return r * c / r.mean(-2, keepdims=True)


def test_stable_adamw_with_the_factored_codec_is_stable_adamw_on_the_stored_moments():
  """Teacher-forced numpy StableAdamW (optimi's debiased betas, RMS clip, decoupled decay)
  from the decoded stored moments: m_t = β̂1 m̂ + (1-β̂1) g, v_t = β̂2 v̂ + (1-β̂2) g², the step
  divides by the rank-1 (Adafactor) estimate of v_t, and the RMS clip reads that same v."""
  b1, b2, eps, lr, wd = 0.9, 0.99, 1e-6, 1e-2, 0.1
  tx = stax.stable_adamw(lr, (b1, b2), eps, wd, codec="factored", min_compress_elements=1,
                         nonfinite="ignore")
  core = stax.codecs.state_codec_storage("factored", min_compress_elements=1)
  params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(24, 64)).astype(np.float32))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  adam_state = lambda s: [x for x in jax.tree.leaves(
      s, is_leaf=lambda z: isinstance(z, stax.ScaleByAdamState))
      if isinstance(x, stax.ScaleByAdamState)][0]
  for t, g in enumerate(_grads((24, 64), 6, seed=2), start=1):
    m_hat, v_hat = (np.asarray(x["w"], np.float64)
                    for x in stax.adam_moments(adam_state(state), params, core))
    p = np.asarray(params["w"], np.float64)
    g64 = np.asarray(g, np.float64)
    bh1 = b1 * (1 - b1 ** (t - 1)) / (1 - b1 ** t)
    bh2 = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)
    m = bh1 * m_hat + (1 - bh1) * g64
    v = _rank1(bh2 * v_hat + (1 - bh2) * g64 * g64)
    rms = np.sqrt(np.mean(g64 * g64 / np.maximum(v, eps * eps)))
    lr_t = lr / max(1.0, rms)
    want = p - lr_t * (m / (np.sqrt(v) + eps) + wd * p)
    u, state = step({"w": g}, state, params)
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(params["w"], want, rtol=2e-5, atol=1e-6)


def test_stam_with_a_codec_adapts_beta1_from_the_stored_first_moment():
  """Teacher-forced numpy STAM seed rule on the decoded stored m: r = g - m̂,
  σ² ← b2 σ² + (1-b2) mean r², τ ← ρ τ + (1-ρ) mean|r|, β1 = clip(β(1 - α z/(1+z)), lo, β) with
  z = σ²/(τ²+1e-8); the β1 the optimizer reports is that one, and its update is Adam's with
  the product bias correction on m_t = β1 m̂ + (1-β1) g and v_t = b2 v̂ + (1-b2) g²."""
  beta, b2, eps, alpha, rho, lr = 0.9, 0.999, 1e-8, 0.2, 0.99, 1e-2
  tx = stax.stam(lr, beta, b2, eps, 0.0, alpha, rho, codec="stax", min_compress_elements=1,
                 nonfinite="ignore")
  core = stax.codecs.state_codec_storage("stax", min_compress_elements=1)
  params = {"w": jnp.zeros((16, 128))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  adam_state = lambda s: [x for x in jax.tree.leaves(
      s, is_leaf=lambda z: isinstance(z, stax.ScaleByAdamState))
      if isinstance(x, stax.ScaleByAdamState)][0]
  sigma2 = tau = 0.0
  prod = 1.0
  lo = max(0.5, beta * (1 - alpha))
  for t, g in enumerate(_grads((16, 128), 6, seed=3), start=1):
    m_hat, v_hat = (np.asarray(x["w"], np.float64)
                    for x in stax.adam_moments(adam_state(state), params, core))
    g64 = np.asarray(g, np.float64)
    r = g64 - m_hat
    sigma2 = b2 * sigma2 + (1 - b2) * np.mean(r * r)
    tau = rho * tau + (1 - rho) * np.mean(np.abs(r))
    z = sigma2 / (tau * tau + 1e-8)
    b1 = float(np.clip(beta * (1 - alpha * z / (1 + z)), lo, beta))
    prod *= b1
    m = b1 * m_hat + (1 - b1) * g64
    v = b2 * v_hat + (1 - b2) * g64 * g64
    want = -lr * (m / (1 - prod + eps)) / (np.sqrt(v / (1 - b2 ** t + eps)) + eps)
    u, state = step({"w": g}, state, params)
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(float(stax.stam_beta1(state, params)["w"]), b1, rtol=1e-5)
    np.testing.assert_allclose(u["w"], want, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("factory", [stax.adamw, stax.stable_adamw, stax.stam, stax.oadamw])
def test_codec_argument_validation(factory):
  with pytest.raises(ValueError, match="codec"):
    factory(codec="int3")
  with pytest.raises(ValueError, match="turbo_adam"):
    factory(codec="turboadam-0.2")
  with pytest.raises(ValueError, match="mu_dtype"):
    factory(codec="factored", mu_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="min_compress_elements"):
    factory(codec="stax", min_compress_elements=-1)


def test_codec_state_bits():
  """Whole-state bits per parameter of a 256×512 matrix: 'factored' 4.5 + 32·(256+512)/(256·512)
  on every Adam-family optimizer, 8-bit Muon momentum 8 + 16/128, 4-bit 4 + 16/32, each plus
  the rounding key (64 bits)."""
  params = {"w": jnp.zeros((256, 512))}
  key = 64 / (256 * 512)
  bits = lambda tx: stax.state_bits_per_param(tx.init(params), params, exclude_scalars=True)
  want = 4.5 + 32 * (256 + 512) / (256 * 512) + key
  for tx in (stax.adamw(codec="factored"), stax.stable_adamw(codec="factored"),
             stax.stam(codec="factored")):
    assert bits(tx) == pytest.approx(want, abs=1e-9)
  assert bits(stax.oadamw(muon_momentum_bits=8)) == pytest.approx(8.125 + key, abs=1e-9)
  assert bits(stax.oadamw(muon_momentum_bits=4)) == pytest.approx(4.5 + key, abs=1e-9)


@pytest.mark.parametrize("factory", [stax.adamw, stax.stable_adamw, stax.stam, stax.oadamw])
def test_compress_threshold_without_a_codec_warns(factory):
  """``min_compress_elements`` without a codec has no effect: a UserWarning naming it (OAdamW's
  low-bit Muon momentum reads it, so there it is silent); a negative one is refused either way."""
  with pytest.warns(UserWarning, match="min_compress_elements.*codec=None"):
    factory(min_compress_elements=64)
  with pytest.raises(ValueError, match="min_compress_elements"):
    factory(min_compress_elements=-1)
  if factory is stax.oadamw:
    import warnings
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      factory(muon_momentum_bits=8, min_compress_elements=64)
