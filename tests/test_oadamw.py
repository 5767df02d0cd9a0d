"""StableAdamW (vs torch-optimi), Kahan summation, and stax.oadamw (vs independent references)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from stax.kernels import newton_schulz as nsk

torch = pytest.importorskip("torch")
optimi = pytest.importorskip("optimi")

SHAPES = [(8, 16), (16,), (5, 3, 4), ()]


def _jax_step(tx):
  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  p0 = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  target = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  curv = [rng.uniform(0.5, 2.0, size=s).astype(np.float32) for s in SHAPES]
  # Bursts of large noise every 7th step make the RMS clipping fire.
  noise = [[(rng.normal(size=s) * (0.3 + 4.0 * (t % 7 == 0))).astype(np.float32)
            for s in SHAPES] for t in range(200)]
  grad = lambda ps, t: [c * (np.asarray(x, np.float64) - tg) + n
                        for x, c, tg, n in zip(ps, curv, target, noise[t])]
  return p0, grad


def _NO_BATCH_AXES(path, leaf):   # a layout under which every leaf is one tensor
  del path, leaf


def _run_pair(kw, torch_dtype, steps=200, count_clips=False):
  p0, grad = _problem()
  tp = [torch.tensor(x.astype(np.float64) if torch_dtype == torch.float64 else x.copy(),
                     dtype=torch_dtype, requires_grad=True) for x in p0]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = optimi.StableAdamW(tp, lr=1e-2, foreach=False, triton=False, **kw)
  # optimi (torch, no stacked layers) clips per tensor: no leaf has batch axes here (under
  # stax's JAX default layout the (5, 3, 4) leaf reads as 5 stacked layers, clipped per layer)
  tx = stax.stable_adamw(1e-2, nonfinite="ignore", dimension_numbers=_NO_BATCH_AXES, **kw)
  jp = [jnp.asarray(x) for x in p0]
  st = tx.init(jp)
  step = _jax_step(tx)
  clipped = 0
  for t in range(steps):
    for x, g in zip(tp, grad([x.detach().numpy() for x in tp], t)):
      x.grad = torch.tensor(g, dtype=torch_dtype)
    opt.step()
    g = [jnp.asarray(x, jnp.float32) for x in grad(jp, t)]
    jp, st = step(jp, st, g)
    if count_clips:
      nu = st[0].nu  # nonfinite="ignore": the chain's own state
      clipped += int(any(float(stax.transforms.stable.update_rms(gg, v, 1e-6)) > 1.0
                         for gg, v in zip(g, nu)))
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - b.detach().numpy())))
             for a, b in zip(jp, tp))
  scale = max(1.0, max(float(np.max(np.abs(b.detach().numpy()))) for b in tp))
  return diff, scale, clipped


def test_stable_adamw_matches_optimi_float32_200_steps():
  diff, _, clipped = _run_pair(dict(weight_decay=0.0), torch.float32, count_clips=True)
  assert clipped >= 20, "the RMS update clipping must be exercised"
  assert diff <= 1e-6, diff


@pytest.mark.parametrize("kw", [dict(weight_decay=1e-2),
                                dict(weight_decay=1e-2, decouple_lr=True, max_lr=2e-2)],
                         ids=["decoupled", "fully_decoupled"])
def test_stable_adamw_weight_decay_matches_optimi(kw):
  # optimi multiplies p by the float32-rounded factor (1 - lr_t·λ); that rounding changes λ by up
  # to ~3e-4 relative and drifts by a few 1e-6 over 200 steps against any other float32 order.
  # Against optimi run in float64 (exact factor), stax's float32 agrees to 1e-6 (relative to
  # max(1, |p|)).
  diff, scale, _ = _run_pair(kw, torch.float64)
  assert diff <= 1e-6 * scale, (diff, scale)
  diff32, _, _ = _run_pair(kw, torch.float32)
  assert diff32 <= 1e-5, diff32


def test_stable_adamw_clip_is_on_device_and_matches_formula():
  # One step by hand: m = g, v = g² (debiased betas at t=1), u = g/(|g|+eps);
  # rms = sqrt(mean(g²/max(g², eps²))) <= 1 so lr_t = lr; with a tiny entry rms < 1.
  g = jnp.asarray([1e-8, 2.0, -3.0], jnp.float32)
  p = jnp.asarray([1.0, 1.0, 1.0], jnp.float32)
  tx = stax.stable_adamw(0.1, weight_decay=0.5, nonfinite="ignore")
  u, _ = jax.jit(tx.update)(g, tx.init(p), p)
  gg, eps = np.asarray(g, np.float64), 1e-6
  rms = np.sqrt(np.mean(gg ** 2 / np.maximum(gg ** 2, eps ** 2)))
  lr_t = 0.1 / max(1.0, rms)
  want = -lr_t * (gg / (np.abs(gg) + eps) + 0.5 * 1.0)
  np.testing.assert_allclose(u, want, rtol=1e-6)



@pytest.mark.parametrize("shape", [(300,), (512, 384), (3, 70001)])
def test_update_rms_equals_the_float64_formula(shape):
  """``update_rms`` against NumPy's float64 ``sqrt(mean(g²/max(v, eps²)))``: below the tiling
  threshold (a plain mean), on whole tiles and with a tail (the tiled sums on CPU), with
  entries of v under eps² (the floor) — to float32 rounding; and an overflowing g² makes it Inf."""
  rng = np.random.default_rng(3)
  g = (rng.standard_normal(shape) * 2.0).astype(np.float32)
  v = (rng.uniform(0.0, 3.0, shape) * (rng.uniform(size=shape) > 0.1)).astype(np.float32)
  eps = 1e-3
  got = float(jax.jit(stax.transforms.stable.update_rms)(g, v, eps))
  g64, v64 = g.astype(np.float64), v.astype(np.float64)
  want = np.sqrt(np.mean(g64 ** 2 / np.maximum(v64, np.float64(np.float32(eps) ** 2))))
  np.testing.assert_allclose(got, want, rtol=2e-6)
  g[(0,) * len(shape)] = 2.0 ** 65
  assert np.isposinf(float(jax.jit(stax.transforms.stable.update_rms)(g, v, eps)))

# --------------------------------------------------------------------------- Kahan
def _bf16_run(kahan, steps=300, comp=None):
  rng = np.random.default_rng(0)
  p0 = rng.uniform(0.5, 1.0, size=(64,)).astype(np.float32)
  gs = [(1.0 + 0.1 * rng.normal(size=64)).astype(np.float32) for _ in range(steps)]
  out = {}
  for name, dtype, ks in [("ref", jnp.float32, False), ("bf16", jnp.bfloat16, kahan)]:
    tx = stax.stable_adamw(1e-4, weight_decay=0.0, kahan_sum=ks, kahan_dtype=comp)
    p = jnp.asarray(p0, dtype)
    s = tx.init(p)
    step = _jax_step(tx)
    for g in gs:
      p, s = step(p, s, jnp.asarray(g, dtype))
    assert p.dtype == dtype
    out[name] = np.asarray(p, np.float32)
  moved = np.abs(out["ref"] - p0).max()
  return np.abs(out["bf16"] - out["ref"]).max(), moved


def test_kahan_bf16_tracks_float32_and_plain_bf16_stagnates():
  err_plain, moved = _bf16_run(False)
  err_kahan, _ = _bf16_run(None)
  err_kahan32, _ = _bf16_run(None, comp=jnp.float32)
  assert moved > 0.025  # the f32 reference moves by 300·1e-4
  assert err_plain > 0.9 * moved  # each 1e-4 step is below half an ulp: bf16 never moves
  assert err_kahan < 0.2 * moved, (err_kahan, moved)  # within ~1 bf16 ulp (2^-8) of the ref
  assert err_kahan32 <= err_kahan + 1e-7
  assert err_kahan32 <= 2.0 ** -8 + 1e-6  # f32 buffer: within one bf16 ulp of the reference


def test_kahan_update_is_exact_with_plain_apply_updates():
  tx = optax.chain(optax.sgd(3e-4), stax.kahan_summation(jnp.float32))
  p = {"w": jnp.linspace(-2, 2, 33).astype(jnp.bfloat16), "f": jnp.ones(3)}
  s = tx.init(p)
  assert s[1].comp["f"] is None  # float32 leaves keep no buffer
  exact = np.asarray(p["w"], np.float64)
  step = _jax_step(tx)
  g = {"w": jnp.ones(33, jnp.float32), "f": jnp.ones(3)}  # f32 updates: no bf16 lr rounding
  for _ in range(50):
    p, s = step(p, s, g)
    exact = exact - 3e-4 * 1.0
  # parameter + compensation reproduces the exact sum (up to f32 accumulation).
  total = np.asarray(p["w"], np.float64) + np.asarray(s[1].comp["w"], np.float64)
  np.testing.assert_allclose(total, exact, atol=1e-6)


# --------------------------------------------------------------------------- oadamw
def _ns_np(g, coeffs=((3.4445, -4.7750, 2.0315),) * 5, eps=1e-7):
  x = np.asarray(g, np.float64)
  tr = x.shape[0] > x.shape[1]
  if tr:
    x = x.T
  x = x / (np.linalg.norm(x) + eps)
  for a, b, c in coeffs:
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return x.T if tr else x


def test_oadamw_momentum_mode_is_muon_with_moonlight_scale():
  rng = np.random.default_rng(0)
  params = {"layer": {"kernel": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32),
                      "bias": jnp.zeros(24, jnp.float32)}}
  lr, lam, mu, scale = 1e-2, 0.1, 0.95, 0.5
  tx = stax.oadamw(lr, weight_decay=lam, muon_momentum=mu, scale=scale)
  assert stax.oadamw_labels(params)["layer"]["kernel"] == "muon"
  step = _jax_step(tx)
  s = tx.init(params)
  w = np.asarray(params["layer"]["kernel"], np.float64)
  m = np.zeros_like(w)
  for t in range(4):
    g = rng.normal(size=(16, 24))
    grads = {"layer": {"kernel": jnp.asarray(g, jnp.float32), "bias": jnp.ones(24)}}
    params, s = step(params, s, grads)
    m = mu * m + g
    o = _ns_np(g + mu * m)
    w = w - lr * (scale * 0.2 * np.sqrt(24) * o + lam * w)
  np.testing.assert_allclose(params["layer"]["kernel"], w, atol=2e-5)


def _torch_ns(g):
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g.float()
  tr = x.size(0) > x.size(1)
  if tr:
    x = x.T
  x = x / (x.norm() + 1e-7)
  for _ in range(5):
    A = x @ x.T
    x = a * x + (b * A + c * A @ A) @ x
  return (x.T if tr else x).to(g.dtype)


def test_oadamw_gradient_mode_matches_the_seed_recipe():
  # The seed (OAdamW, muon group) = optimi StableAdamW fed with NS(grad) of every ndim >= 2 leaf.
  rng = np.random.default_rng(1)
  p0 = {"embed": rng.normal(size=(12, 8)), "w": rng.normal(size=(8, 20)),
        "b": rng.normal(size=(20,))}
  p0 = {k: v.astype(np.float32) for k, v in p0.items()}
  names = sorted(p0)
  tp = {k: torch.tensor(p0[k].copy(), requires_grad=True) for k in names}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    opt = optimi.StableAdamW([tp[k] for k in names], lr=1e-2, weight_decay=0.0, foreach=False,
                             triton=False)
  tx = stax.oadamw(1e-2, weight_decay=0.0, muon="gradient", grouping="seed", nonfinite="ignore")
  jp = {k: jnp.asarray(v) for k, v in p0.items()}
  s = tx.init(jp)
  step = _jax_step(tx)
  for t in range(25):
    g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}
    for k in names:
      gt = torch.tensor(g[k])
      tp[k].grad = _torch_ns(gt) if gt.ndim >= 2 else gt
    opt.step()
    jp, s = step(jp, s, {k: jnp.asarray(v) for k, v in g.items()})
  for k in names:
    np.testing.assert_allclose(jp[k], tp[k].detach().numpy(), atol=1e-5)


def test_update_proj_gap_never_reuses_a_stale_gradient():
  tx = stax.scale_by_orthogonalization(update_proj_gap=3)
  gs = [jax.random.normal(jax.random.PRNGKey(i), (8, 12)) for i in range(4)]
  s = tx.init(gs[0])
  outs = []
  for g in gs:
    u, s = jax.jit(tx.update)(g, s)
    outs.append(u)
  rows, _ = stax.ns_coefficients("jordan", 5)
  _, left = nsk.newton_schulz_reference(gs[0][None], rows, return_left=True)
  np.testing.assert_allclose(outs[0], stax.orthogonalize(gs[0]), atol=1e-5)  # refresh
  # Step 2 orthogonalises the *current* gradient with the cached multiplier.
  want = (left[0] @ (gs[1] / (jnp.linalg.norm(gs[1]) + 1e-7)))
  np.testing.assert_allclose(outs[1], want, atol=1e-5)
  assert float(jnp.abs(outs[1] - outs[0]).max()) > 0.1
  np.testing.assert_allclose(outs[3], stax.orthogonalize(gs[3]), atol=1e-5)  # refresh at 4


def test_grouping_auto_seed_and_dimension_numbers():
  params = {"embed": {"embedding": jnp.ones((32, 16))}, "lm_head": {"kernel": jnp.ones((16, 32))},
            "conv": {"kernel": jnp.ones((3, 3, 3, 16))}, "thin": {"kernel": jnp.ones((16, 2))},
            "mlp": {"kernel": jnp.ones((16, 16)), "bias": jnp.ones(16)}, "scalar": jnp.ones(())}
  dims = lambda path, x: (stax.conv_dimension_numbers(4) if x.ndim == 4 else None
                          if x.ndim < 2 else stax.MatrixDimensionNumbers(0, 1))
  auto = stax.oadamw_labels(params, dimension_numbers=dims)
  assert auto == {"embed": {"embedding": "adam"}, "lm_head": {"kernel": "adam"},
                  "conv": {"kernel": "muon"}, "thin": {"kernel": "adam"},
                  "mlp": {"kernel": "muon", "bias": "adam"}, "scalar": "adam"}
  seed = stax.oadamw_labels(params, grouping="seed")
  assert [k for k in params if "muon" in jax.tree.leaves(seed[k])] == [
      "embed", "lm_head", "conv", "thin", "mlp"]
  assert seed["mlp"]["bias"] == "adam" and seed["scalar"] == "adam"
  # A conv kernel goes through dimension numbers: NS of the (kh·kw·in, out) matrix.
  tx = stax.oadamw(1e-2, weight_decay=0.0, dimension_numbers=dims)
  g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  want = -1e-2 * 0.2 * np.sqrt(27) * stax.orthogonalize(g["conv"]["kernel"].reshape(27, 16))
  np.testing.assert_allclose(u["conv"]["kernel"].reshape(27, 16), want, atol=1e-6)


def test_oadamw_validation():
  with pytest.raises(ValueError, match="beta"):
    stax.oadamw(betas=(1.5, 0.99))
  with pytest.raises(ValueError, match="muon"):
    stax.oadamw(muon="adam")
  with pytest.raises(ValueError, match="ns_steps"):
    stax.oadamw(ns_steps=0)
  with pytest.raises(ValueError, match="update_proj_gap"):
    stax.oadamw(update_proj_gap=0)
  with pytest.raises(ValueError, match="max_lr"):
    stax.oadamw(optax.cosine_decay_schedule(1e-3, 100), decouple_lr=True)
  with pytest.raises(ValueError, match="max_lr"):
    stax.stable_adamw(1e-3, decouple_lr=True, max_lr=0.0)
  with pytest.raises(ValueError, match="learning_rate"):
    stax.stable_adamw(-1.0)
  with pytest.raises(ValueError, match="coeffs"):
    stax.oadamw(ns_coeffs="fast")


def test_oadamw_stacked_mode_under_explicit_mesh_equals_single_device():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices")
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(2)
  params = {f"layer_{i}": {"kernel": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32),
                           "bias": jnp.zeros(32, jnp.float32)} for i in range(3)}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(3)]
  ref_tx = stax.oadamw(1e-2)
  p_ref, s_ref = params, ref_tx.init(params)
  for g in grads:
    p_ref, s_ref = _jax_step(ref_tx)(p_ref, s_ref, g)
  tx = stax.oadamw(1e-2, mode="stacked")
  mesh = jax.make_mesh((8,), ("x",))
  with jax.set_mesh(mesh):
    spec = lambda x: P("x", None) if x.ndim == 2 else P()
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), t)
    p = put(params)
    s = jax.jit(tx.init)(p)
    step = _jax_step(tx)
    for g in grads:
      p, s = step(p, s, put(g))
  assert p["layer_0"]["kernel"].sharding.spec == P("x", None)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(jax.device_get(a), b, atol=1e-6)


def _stacked_pair(seed=0):
  """A stacked ``(3, 16, 8)`` kernel and the same three layers unstacked, and gradients with
  layer scales 1/10/100 where layer 2 spikes ×1e4 on step 5 (its RMS ratio then clips)."""
  key = jax.random.PRNGKey(seed)
  w = jax.random.normal(key, (3, 16, 8))
  stacked = {"layers": {"kernel": w}, "head": {"kernel": w[0]}}
  unstacked = {**{f"l{i}": {"kernel": w[i]} for i in range(3)}, "head": {"kernel": w[0]}}

  def grads(t):
    g = jax.random.normal(jax.random.fold_in(key, t), (3, 16, 8)) * jnp.array(
        [1.0, 10.0, 100.0])[:, None, None]
    if t == 5:
      g = g.at[2].multiply(1e4)
    return ({"layers": {"kernel": g}, "head": {"kernel": g[0]}},
            {**{f"l{i}": {"kernel": g[i]} for i in range(3)}, "head": {"kernel": g[0]}})
  return stacked, unstacked, grads


@pytest.mark.parametrize("make", [
    lambda **k: stax.stable_adamw(1e-2, **k),                      # the early (gated) RMS pass
    lambda **k: stax.stable_adamw(1e-2, nonfinite="ignore", **k),  # the RMS after the core
    lambda **k: stax.oadamw(1e-2, muon="gradient", **k),
], ids=["stable_adamw", "stable_adamw_ignore", "oadamw_gradient"])
def test_stable_adamws_rms_clip_is_per_stacked_layer(make):
  """A stacked ``(L, in, out)`` leaf (batch axis L under the default layout) is clipped per
  layer: its updates equal those of the same layers unstacked over 4 steps, through a spike in
  one layer. Under a layout without batch axes (optimi's per-tensor clip, stax's until
  2026-12-07) the spike clipped the other layers too: their step 5 shrank ~2×."""
  stacked, unstacked, grads = _stacked_pair()
  for dims, equal in ((None, True), (_NO_BATCH_AXES, False)):
    tx = make(dimension_numbers=dims) if dims is not None else make()
    s1, s2 = tx.init(stacked), tx.init(unstacked)
    for t in range(6):
      g1, g2 = grads(t)
      u1, s1 = jax.jit(tx.update)(g1, s1, stacked)
      u2, s2 = jax.jit(tx.update)(g2, s2, unstacked)
      for i in range(3):
        a, b = np.asarray(u1["layers"]["kernel"][i]), np.asarray(u2[f"l{i}"]["kernel"])
        if equal:
          np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
        elif t == 5 and i < 2:   # the other layers, clipped by layer 2's spike
          assert np.abs(a).max() < 0.7 * np.abs(b).max(), (i, np.abs(a).max(), np.abs(b).max())


def test_a_nonfinite_stacked_layer_skips_the_step():
  """A NaN in one layer of a stacked leaf skips the whole step (the per-layer RMS pass gives the
  gate its probe): parameters' updates 0, state unchanged."""
  stacked, _, grads = _stacked_pair()
  tx = stax.stable_adamw(1e-2)
  state = tx.init(stacked)
  g, _ = grads(0)
  u, state = jax.jit(tx.update)(g, state, stacked)
  g2, _ = grads(1)
  g2 = jax.tree.map(lambda x: x, g2)
  g2["layers"]["kernel"] = g2["layers"]["kernel"].at[1, 3, 4].set(jnp.nan)
  u2, state2 = jax.jit(tx.update)(g2, state, stacked)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u2))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decoupled_decay_follows_a_scheduled_or_injected_learning_rate():
  """``decouple_lr=True`` decays by ``λ·lr_t/max_lr``. Under ``optax.inject_hyperparams`` the
  learning rate arrives as an array each step: without ``max_lr`` that is a ``ValueError`` at
  init naming it (a default max_lr had been the current rate: a constant decay λ); with it, the
  decay follows the schedule. The torch drop-in defaults ``max_lr`` to its ``lr``, as optimi,
  and steps as optimi's StableAdamW under a scheduler that halves the rate."""
  p = {"w": jnp.ones((4, 4))}
  zero = {"w": jnp.zeros((4, 4))}
  sched = optax.linear_schedule(1e-2, 1e-3, 10)
  for f in (stax.stable_adamw, stax.oadamw):
    static = ("ns_steps", "update_proj_gap", "min_dim", "min_compress_elements")
    inject = optax.inject_hyperparams(f, static_args=static if f is stax.oadamw else ())
    with pytest.raises(ValueError, match="max_lr"):
      inject(learning_rate=sched, weight_decay=0.1, decouple_lr=True).init(p)
    tx = inject(learning_rate=sched, weight_decay=0.1, decouple_lr=True, max_lr=1e-2)
    s = tx.init(p)
    for _ in range(5):
      u, s = tx.update(zero, s, p)
    np.testing.assert_allclose(-np.asarray(u["w"]), 0.1 * float(sched(4)) / 1e-2, rtol=1e-5)
  import torch_bridge
  torch.manual_seed(0)
  m1, m2, m3 = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
  m2.load_state_dict(m1.state_dict())
  m3.load_state_dict(m1.state_dict())
  o1 = torch_bridge.OAdamW(m1, lr=1e-2, weight_decay=0.1, decouple_lr=True, muon="off")
  # the generic bridge fills max_lr = lr as the drop-in does (it had raised at the first step)
  o3 = torch_bridge.Optimizer(m3.parameters(), stax.stable_adamw, lr=1e-2, weight_decay=0.1,
                              decouple_lr=True)
  assert o3.param_groups[0]["max_lr"] == 1e-2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    o2 = optimi.StableAdamW(m2.parameters(), lr=1e-2, weight_decay=0.1, decouple_lr=True,
                            foreach=False, triton=False)
  s1 = torch.optim.lr_scheduler.StepLR(o1, 1, gamma=0.5)
  s2 = torch.optim.lr_scheduler.StepLR(o2, 1, gamma=0.5)
  s3 = torch.optim.lr_scheduler.StepLR(o3, 1, gamma=0.5)
  x = torch.randn(5, 4)
  for _ in range(4):
    for m, o, s in ((m1, o1, s1), (m2, o2, s2), (m3, o3, s3)):
      o.zero_grad()
      m(x).square().sum().backward()
      o.step()
      s.step()
  for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c, b, rtol=1e-6, atol=1e-7)
