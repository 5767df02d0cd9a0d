"""SCAO: parity with scao 0.2.4, the low-rank mode's promises, diagnostics, validation.

References used here, each independent of the code under test: the installed ``scao==0.2.4``
package (CPU torch) for the faithful mode; ``torch.optim.AdamW`` (to show the preconditioned
phase really changes the trajectory); explicit dense numpy/jnp formulas (full EMA, ``eigh``,
inverse fourth roots) for the low-rank mode.
"""

from __future__ import annotations

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from stax.transforms import kron as K
from stax.transforms.kron import _view
from stax.transforms.kron import lowrank as LR
from stax.transforms.kron import scao as SC


# --------------------------------------------------------------------------- parity (faithful)
def _mlp_problem():
  rng = np.random.default_rng(0)
  data = dict(X=rng.normal(size=(64, 20)), Y=rng.normal(size=(64, 6)), T0=rng.normal(size=(4, 3, 2)))
  init = {"W1": rng.normal(size=(32, 20)) * 0.3, "b1": np.zeros(32),
          "W2": rng.normal(size=(6, 32)) * 0.3, "b2": np.zeros(6), "T": rng.normal(size=(4, 3, 2))}
  return ({k: np.asarray(v, np.float32) for k, v in data.items()},
          {k: np.asarray(v, np.float32) for k, v in init.items()})


def test_faithful_parity_with_scao_0_2_4():
  """240 steps (warm-up 1-100, blend 101-150, preconditioned after) against the seed package.

  Tolerance 1e-4 absolute on the parameters (|p| ~ 1): both sides use float32, but the seed's
  ``torch.linalg.eigh`` and XLA's ``eigh`` differ in the last bits (eigenvector sign flips cancel
  in ``U Δ Uᵀ``; near-degenerate eigenvalues rotate their vectors by ~ulp/gap), and Adam's
  division amplifies tiny differences of small moments. Measured: max |Δp| = 1.1e-5 after 240
  steps, while the seed and plain AdamW end 1e-1 apart.
  """
  torch = pytest.importorskip("torch")
  scao_pkg = pytest.importorskip("scao")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny matrices: threading only costs time here
  try:
    diff, moved, diag, seed_ranks, steps = _run_parity(torch, scao_pkg)
  finally:
    torch.set_num_threads(threads)
  assert diff < 1e-4, diff
  assert moved > 100 * 1e-4, moved  # the preconditioned phase really changed the trajectory
  assert int(diag["phase"]) == 1 and float(diag["blend"]) == 1.0
  assert int(diag["curvature_updates"]) == steps // 20
  assert {k: int(v) for k, v in diag["rank"].items()} == seed_ranks


def _run_parity(torch, scao_pkg):
  data, init = _mlp_problem()
  X, Y, T0 = (torch.tensor(data[k]) for k in ("X", "Y", "T0"))
  names = ["W1", "b1", "W2", "b2", "T"]

  def loss_fn(p, i):
    idx = torch.arange(16) + (i * 16) % 64
    h = torch.tanh(X[idx] @ p["W1"].T + p["b1"])
    out = h @ p["W2"].T + p["b2"]
    return ((out - Y[idx]) ** 2).mean() + 0.05 * ((p["T"] - T0) ** 2).sum()

  # Seed defaults except a small k_min (so the adaptive rank moves) and max_precond_dim=16
  # (W1 32×20 → a 2×2 block grid, W2 6×32 → 1×2; T (4,3,2) → (4, 6); biases → diagonal path).
  kw = dict(warmup_steps=100, precond_freq=20, min_precond_updates=2, rho=0.999,
            epsilon_sparse=0.05, k_min=2, k_max=128, tau=1.0, max_precond_dim=16, blend_steps=50)
  lr, wd, steps = 1e-2, 0.01, 240
  seed_p = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  adamw_p = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    seed_opt = scao_pkg.SCAO([seed_p[k] for k in names], lr=lr, weight_decay=wd, **kw)
  adamw_opt = torch.optim.AdamW([adamw_p[k] for k in names], lr=lr, weight_decay=wd)
  # the arrays are torch tensors' values: the seed's view of them, (shape[0], -1), is split 1
  # (stax's JAX default would read T (4, 3, 2) as 4 stacked 3×2 matrices)
  tx = stax.scao(lr, weight_decay=wd, mode="scao-0.2.4", dimension_numbers=1, **kw)
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    for p, opt in ((seed_p, seed_opt), (adamw_p, adamw_opt)):
      opt.zero_grad()
      loss_fn(p, i).backward()
      opt.step()
    q = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    loss_fn(q, i).backward()
    u, state = update({k: jnp.asarray(q[k].grad.numpy()) for k in names}, state, params)
    params = optax.apply_updates(params, u)
  diff = max(np.max(np.abs(np.asarray(params[k]) - seed_p[k].detach().numpy())) for k in names)
  moved = max(np.max(np.abs(adamw_p[k].detach().numpy() - seed_p[k].detach().numpy()))
              for k in names)
  diag = stax.scao_diagnostics(state, params)
  seed_ranks = {k: seed_opt.state[seed_p[k]]["preconditioner"].k for k in names}
  return diff, moved, diag, seed_ranks, steps


# --------------------------------------------------------------------------- low-rank mode
def _lstsq_problem():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(24, 16)) * np.linspace(0.2, 3.0, 16), jnp.float32)
  b = jnp.asarray(rng.normal(size=(12, 20)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(24, 20)), jnp.float32)
  params = {"w": jnp.zeros((16, 12), jnp.float32), "bias": jnp.zeros((12,), jnp.float32)}

  def loss(p):
    return 0.5 * jnp.sum((a @ p["w"] @ b - t) ** 2) + 0.5 * jnp.sum((p["bias"] - 1.0) ** 2)

  return params, loss


def _trajectory(tx, params, loss, scale, steps=40):
  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      g = jax.tree.map(lambda x: scale * x, jax.grad(loss)(p))
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), u
    return jax.lax.scan(body, (params, tx.init(params)), None, length=steps)

  (p, s), us = run(params)
  return p, us


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_scale_invariance(mode):
  """Gradients ×1e-3 and ×1e3: the low-rank mode gives the same updates (up to Adam's eps);
  the faithful mode does not (its subspace/complement gain scales like 1/|G|)."""
  params, loss = _lstsq_problem()
  tx = stax.scao(1e-2, weight_decay=0.0, warmup_steps=6, precond_freq=3, blend_steps=4,
                 k_min=1, k_max=4, mode=mode, tau=None)
  _, u_small = _trajectory(tx, params, loss, 1e-3)
  _, u_large = _trajectory(tx, params, loss, 1e3)
  rel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(u_small), jax.tree.leaves(u_large)))
  if mode == "lowrank":
    # Adam's eps=1e-8 against gradients of ~1e-3..1e-1 (scale 1e-3) moves updates by < 1e-5;
    # the rest is float32 rounding through QR/eigh.
    assert rel < 1e-3, rel
  else:
    assert rel > 1e-2, rel


def test_lowrank_memory_is_o_m_plus_n_times_k():
  m, n, k_max = 256, 128, 16
  params = {"w": jnp.zeros((m, n)), "b": jnp.zeros((n,))}

  def precond_leaves(mode):
    tx = stax.scao(k_min=2, k_max=k_max, mode=mode)
    state = jax.eval_shape(tx.init, params)
    (kron_state,) = [x for x in jax.tree.leaves(
        state, is_leaf=lambda z: isinstance(z, K.ScaleByKronState))
        if isinstance(x, K.ScaleByKronState)]
    return jax.tree.leaves(kron_state.leaves)

  low = precond_leaves("lowrank")
  shapes = [tuple(x.shape) for x in low]
  assert (m, m) not in shapes and (n, n) not in shapes
  assert max(x.size for x in low) <= max(m, n) * k_max
  total = sum(x.size for x in low)
  assert total <= (m + n) * k_max + 4 * k_max + 8, total      # U, S, D per side, trace, k
  faithful = sum(x.size for x in precond_leaves("scao-0.2.4"))
  assert faithful >= m * m + n * n                             # what the seed keeps
  assert total * 4 < faithful


def _signal_grads(m, n, rank, steps, noise, seed=0):
  rng = np.random.default_rng(seed)
  ul, _ = np.linalg.qr(rng.normal(size=(m, rank)))
  ur, _ = np.linalg.qr(rng.normal(size=(n, rank)))
  out = []
  for _ in range(steps):
    c = rng.normal(size=(rank, rank)) * np.array([4.0, 2.5, 1.5])[:rank]
    out.append((ul @ c @ ur.T + noise * rng.normal(size=(m, n))).astype(np.float32))
  return out, ul, ur


def test_lowrank_tracking_matches_dense_ema_and_rank_rule():
  """Subspace iteration vs the explicit dense EMA (numpy eigh); the rank rule (spectral mass
  above the tail level) finds the signal rank, 3, on both sides."""
  m, n, rho, steps = 40, 30, 0.9, 12
  grads, ul, _ = _signal_grads(m, n, 3, steps, noise=0.05)
  kmin, kmax = LR._ranks(m, n, 1, 8)
  st = LR._init(m, n, kmin, kmax)
  upd = jax.jit(lambda s, g, z: LR._update(s, g, rho=rho, eps_sparse=0.05, kmin=kmin, noise=z))
  L = np.zeros((m, m))
  for i, g in enumerate(grads):
    z = jax.random.normal(jax.random.PRNGKey(i), ((m + n) * kmax,))
    st = upd(st, jnp.asarray(g), z)
    L = rho * L + (1 - rho) * g.astype(np.float64) @ g.T
  w, v = np.linalg.eigh(L)
  w, v = w[::-1], v[:, ::-1]
  # The tracked EMA folds everything outside its K directions into an isotropic tail, so the
  # top Ritz values sit slightly below the dense ones (measured 0.4% here).
  np.testing.assert_allclose(np.asarray(st.S_l[:3]), w[:3], rtol=1e-2)
  # Principal angles between the tracked top-3 space and the dense one: cos ≈ 1.
  cos = np.linalg.svd(np.asarray(st.U_l[:, :3]).T @ v[:, :3], compute_uv=False)
  assert cos.min() > 0.999, cos
  np.testing.assert_allclose(float(st.trace), np.trace(L), rtol=1e-4)
  assert np.asarray(st.k).tolist() == [3, 3]


def test_lowrank_preconditioner_matches_dense_formula():
  """(I + U_l D_l U_lᵀ) G (I + U_r D_r U_rᵀ) grafted == L̃^{-1/4} G R̃^{-1/4} rescaled, where
  L̃ = U S Uᵀ + σ_k (I − UUᵀ) + λI is built densely and rooted by eigh."""
  rng = np.random.default_rng(3)
  m, n, big_k = 12, 10, 4
  ul, _ = np.linalg.qr(rng.normal(size=(m, big_k)))
  ur, _ = np.linalg.qr(rng.normal(size=(n, big_k)))
  s_l = np.array([9.0, 4.0, 2.0, 1.5])
  s_r = np.array([7.0, 3.0, 1.2, 1.1])
  trace = 20.0
  k = np.array([3, 2])
  st = K.LowRankState(jnp.asarray(ul, jnp.float32), jnp.asarray(s_l, jnp.float32),
                      jnp.asarray(ur, jnp.float32), jnp.asarray(s_r, jnp.float32),
                      jnp.asarray(trace, jnp.float32), jnp.asarray(k, jnp.int32))
  g = rng.normal(size=(m, n))

  def root(u, s, kk, dim):
    sigma = (trace - s[:kk].sum()) / (dim - kk)
    lam = 1e-4 * trace / dim
    mat = (u[:, :kk] * s[:kk]) @ u[:, :kk].T + sigma * (np.eye(dim) - u[:, :kk] @ u[:, :kk].T)
    w, v = np.linalg.eigh(mat + lam * np.eye(dim))
    return (v * w ** -0.25) @ v.T

  ref = root(ul, s_l, 3, m) @ g @ root(ur, s_r, 2, n)
  ref *= np.linalg.norm(g) / np.linalg.norm(ref)
  got = K.lowrank_precondition(st, jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)



def test_lowrank_gains_kept_in_the_state_are_those_of_its_factors():
  """A curvature update files D_l, D_r (the gains of its new S, k and trace) so that each step
  reads them: equal to recomputing them from the factors, and so is the preconditioning."""
  grads, _, _ = _signal_grads(24, 16, 2, 6, noise=0.1)
  st = LR._init(24, 16, 1, 4)
  upd = jax.jit(lambda s, g, z: LR._update(s, g, rho=0.9, eps_sparse=0.05, kmin=1, noise=z))
  for i, g in enumerate(grads):
    st = upd(st, jnp.asarray(g), jax.random.uniform(jax.random.PRNGKey(i), (40 * 4,),
                                                     minval=-1.0, maxval=1.0))
  d_l, d_r = LR.side_gains(st, 24, 16)
  assert float(jnp.max(jnp.abs(d_l))) > 0.1                  # a real correction is kept
  np.testing.assert_allclose(np.asarray(st.D_l), np.asarray(d_l), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(st.D_r), np.asarray(d_r), rtol=1e-6, atol=1e-7)
  g = jnp.asarray(grads[-1])
  np.testing.assert_allclose(np.asarray(K.lowrank_precondition(st, g)),
                             np.asarray(K.lowrank_precondition(st._replace(D_l=None, D_r=None), g)),
                             rtol=1e-5, atol=1e-6)


def test_lowrank_graft_passes_an_overflowing_gradient_through():
  """Where ‖G‖² or ‖P(G)‖² overflows float32 (entries near the saturation bound), the
  preconditioner returns G itself, finite, instead of an Inf/Inf ratio; just below, the graft
  keeps ‖G̃‖ = ‖G‖."""
  rng = np.random.default_rng(4)
  m, n, big_k = 64, 48, 4
  ul, _ = np.linalg.qr(rng.normal(size=(m, big_k)))
  ur, _ = np.linalg.qr(rng.normal(size=(n, big_k)))
  st = K.LowRankState(jnp.asarray(ul, jnp.float32), jnp.asarray([9.0, 4.0, 2.0, 1.5]),
                      jnp.asarray(ur, jnp.float32), jnp.asarray([7.0, 3.0, 1.2, 1.1]),
                      jnp.asarray(20.0, jnp.float32), jnp.asarray([3, 2], jnp.int32))
  g = rng.normal(size=(m, n)).astype(np.float32)
  fn = jax.jit(K.lowrank_precondition)
  big = g * np.float32(2.0 ** 62)                       # ‖G‖² ≈ 3e3·2**124: overflows
  out = np.asarray(fn(st, jnp.asarray(big)))
  np.testing.assert_array_equal(out, big)
  fine = g * np.float32(2.0 ** 55)                      # ‖G‖² ≈ 2**121: finite
  out = np.asarray(fn(st, jnp.asarray(fine)), np.float64)
  assert np.all(np.isfinite(out)) and not np.array_equal(out, fine)
  np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(fine.astype(np.float64)),
                             rtol=1e-5)

def test_lowrank_update_compiles_no_constant_of_the_matrix_dimensions():
  """The curvature update's arithmetic on a side's dimension (the tail level ``1/(dim - K)``,
  the damping ``1e-4·tau/dim``) reads the dimension as a runtime value
  (``LeafContext.dims``), so no such constant is compiled into its kernels, which are then the
  same for every matrix whose arrays have the same shapes (a side's K Ritz values, the 2K×2K
  Rayleigh–Ritz matrix); the graft uses sums, not means (no ``1/(m·n)``)."""
  m, n = 72, 110                       # K = 36: tails 1/36 and 1/74
  params = {"w": jnp.ones((m, n), jnp.float32)}
  tx = stax.scao(1e-3, warmup_steps=2, precond_freq=2, k_min=2)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
  consts = [float(c) for c in re.findall(r"f32\[\] constant\(([-+0-9.e]+)\)", hlo)]
  for value in (1 / 36, 1 / 74, 1 / 72, 1 / 110, 1e-4 / 72, 1e-4 / 110, 1 / (m * n)):
    assert not [c for c in consts if abs(c - value) <= 1e-6 * value], value


# --------------------------------------------------------------------------- diagnostics
def test_diagnostics_under_jit_and_through_wrappers():
  params, loss = _lstsq_problem()
  tx = optax.inject_hyperparams(stax.scao, static_args=(
      "warmup_steps", "precond_freq", "min_precond_updates", "k_min", "k_max", "blend_steps",
      "max_precond_dim", "seed", "mode"))(
          learning_rate=1e-2, warmup_steps=4, precond_freq=2, blend_steps=4, k_min=1, k_max=4)
  state = tx.init(params)
  diag_fn = jax.jit(lambda s: stax.scao_diagnostics(s))
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  phases, blends = [], []
  for _ in range(8):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
    d = diag_fn(state)
    phases.append(int(d["phase"]))
    blends.append(float(d["blend"]))
  # Steps 1-4 warm-up; curvature updates at 2, 4, ... → phase 2 from step 5, blend s/4.
  assert phases == [0, 0, 0, 0, 1, 1, 1, 1]
  np.testing.assert_allclose(blends, [0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0])
  d = stax.scao_diagnostics(state, params)
  assert set(d["rank"]) == {"w", "bias"}
  assert int(d["rank"]["bias"]) == -1 and 1 <= int(d["rank"]["w"]) <= 4
  # Curvature norm: ‖L‖_F of the tracked factor ≥ its top eigenvalue > 0.
  assert float(d["curvature_norm"]["w"]) > 0.0
  assert int(d["curvature_updates"]) == 4
  with pytest.raises(ValueError, match="SCAO"):
    stax.scao_diagnostics(stax.adamw().init(params))


# --------------------------------------------------------------------------- validation, shapes
@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(precond_freq=0), ValueError, "precond_freq"),
    (dict(precond_freq=2.5), TypeError, "precond_freq"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(min_precond_updates=-1), ValueError, "min_precond_updates"),
    (dict(rho=1.0), ValueError, "rho"),
    (dict(epsilon_sparse=1.0), ValueError, "epsilon_sparse"),
    (dict(k_min=0), ValueError, "k_min"),
    (dict(k_min=8, k_max=4), ValueError, "k_max"),
    (dict(tau=0.0), ValueError, "tau"),
    (dict(max_precond_dim=1), ValueError, "max_precond_dim"),
    (dict(blend_steps=-1), ValueError, "blend_steps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(b1=1.0), ValueError, "b1"),
    (dict(mode="shampoo"), ValueError, "mode"),
])
@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_validation(kwargs, exc, name, mode):
  kwargs = dict(kwargs)
  kwargs.setdefault("mode", mode)
  with pytest.raises(exc, match=name):
    stax.scao(**kwargs)


def test_faithful_plans_follow_the_seed():
  """Diagonal path, block grid and rank bounds as in scao 0.2.4's SparsePreconditioner."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("scao")
  from scao.preconditioner import SparsePreconditioner
  for shape, maxd in [((32, 20), 16), ((6, 32), 16), ((40, 40), 4096), ((4, 3, 2), 4096),
                      ((1, 9), 4096), ((50, 3), 4096)]:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ref = SparsePreconditioner(torch.zeros(shape), k_min=4, k_max=16, max_precond_dim=maxd)
    view = _view.split_view(shape, _view.split_axis(None, len(shape)))   # the seed's split 1
    m, n = view.m, view.n
    plan = SC._plan(m, n, 4, 16, maxd)
    assert (plan.kind == "grid") == ref.use_block_diagonal
    assert (plan.kind == "kron") == ref.use_kronecker
    if plan.kind == "kron":
      assert (plan.kmin, plan.kmax, int(ref.k)) == (ref.k_min, ref.k_max, ref.k_min)
    if plan.kind == "grid":
      sizes = [(b.m, b.n) for _, _, b in plan.blocks]
      ref_sizes = [(b.m, b.n) for blk in ref._blocks
                   for b in (blk._blocks if blk.use_block_diagonal else [blk])]
      assert sizes == ref_sizes


def test_zero_dim_and_conv_leaves():
  """0-d leaves (the seed raises IndexError) take the diagonal path; a Flax conv kernel is
  preconditioned as (kh·kw·in, out) by default (stax.layout's conv layout) and with
  ``dimension_numbers=-1``; the seed's split 1 gives (kh, kw·in·out)."""
  params = {"s": jnp.zeros(()), "conv": jnp.zeros((3, 3, 4, 8))}
  for dims, (rows, cols) in ((None, (36, 8)), (-1, (36, 8)), (1, (3, 96))):
    tx = stax.scao(mode="scao-0.2.4", k_min=2, k_max=4, dimension_numbers=dims)
    state = tx.init(params)
    (ks,) = [x for x in jax.tree.leaves(state, is_leaf=lambda z: isinstance(z, K.ScaleByKronState))
             if isinstance(x, K.ScaleByKronState)]
    conv_state, s_state = ks.leaves["conv"], ks.leaves["s"]
    assert conv_state.L.shape == (rows, rows) and conv_state.R.shape == (cols, cols), dims
    assert isinstance(s_state, K.DiagBlockState)


def _rank2_stacked_grads(layers, m, n, steps, seed=0):
  """Rank-2 gradients of ``layers`` stacked m×n matrices, layer ``l`` scaled by 10**l: a
  subspace iteration finds a rank-2 matrix's subspaces from any start, so the low-rank rule's
  factors do not depend on its random draws."""
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(layers, m, 2)), rng.normal(size=(layers, n, 2))
  scale = (10.0 ** np.arange(layers))[:, None, None]
  return [jnp.asarray(np.einsum("lik,lok->lio", a * rng.normal(size=(1, 1, 2)), b) * scale,
                      jnp.float32) for _ in range(steps)]


def _run(tx, params, grads_fn, grads):
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    u, state = update(grads_fn(g), state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_stacked_layers_get_one_preconditioner_per_layer(mode):
  """A stacked ``(L, in, out)`` kernel (``nnx.vmap``/``nn.scan``) steps as the same L layers
  unstacked: one set of factors per layer, by default and under dims with a batch axis (until
  stop 53 it was one L × in·out matrix by default and dims with batch axes raised); the seed's
  split 1 (``dimension_numbers=1``) still gives that one matrix, whose steps differ."""
  layers, m, n = 3, 12, 10
  w = jnp.asarray(np.random.default_rng(1).normal(size=(layers, m, n)), jnp.float32)
  grads = _rank2_stacked_grads(layers, m, n, 12)
  kw = dict(learning_rate=1e-2, warmup_steps=2, precond_freq=2, blend_steps=2, k_min=2,
            k_max=4, mode=mode)
  unstacked, _ = _run(stax.scao(**kw), {f"l{i}": {"kernel": w[i]} for i in range(layers)},
                      lambda g: {f"l{i}": {"kernel": g[i]} for i in range(layers)}, grads)
  want = np.stack([np.asarray(unstacked[f"l{i}"]["kernel"]) for i in range(layers)])
  tol = 1e-6 if mode == "scao-0.2.4" else 2e-5   # (moved: ~4e-2)
  for dims in (None, stax.MatrixDimensionNumbers(1, 2)):
    got, state = _run(stax.scao(dimension_numbers=dims, **kw), {"layers": {"kernel": w}},
                      lambda g: {"layers": {"kernel": g}}, grads)
    np.testing.assert_allclose(np.asarray(got["layers"]["kernel"]), want, rtol=0, atol=tol)
    assert np.max(np.abs(want - np.asarray(w))) > 1e-2
    (ks,) = [x for x in jax.tree.leaves(state, is_leaf=lambda z: isinstance(
        z, K.ScaleByKronState)) if isinstance(x, K.ScaleByKronState)]
    assert jax.tree.leaves(ks.leaves["layers"]["kernel"])[0].shape[0] == layers
    diag = stax.scao_diagnostics(state, got)
    assert int(diag["phase"]) == 1 and int(diag["rank"]["layers/kernel"]) >= 2
  seed_view, _ = _run(stax.scao(dimension_numbers=1, **kw), {"layers": {"kernel": w}},
                      lambda g: {"layers": {"kernel": g}}, grads)
  assert np.max(np.abs(np.asarray(seed_view["layers"]["kernel"]) - want)) > 100 * tol


def test_biases_of_any_rank_take_the_seeds_vector_path():
  """A leaf named ``bias``/``scale`` of rank >= 2 (a stacked ``(L, d)`` bias, a Flax attention
  bias ``(heads, dh)``) is one ``(1, n)`` row, as the seed sees a torch bias: the faithful
  mode's diagonal path, where until stop 53 it went to Adam alone while the same layers' 1-D
  biases took that path. Without the ``tau`` clip (one norm per leaf) a stacked bias steps
  exactly as its layers' biases unstacked."""
  rng = np.random.default_rng(3)
  b = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(3, 8)), jnp.float32) for _ in range(8)]
  kw = dict(learning_rate=1e-2, warmup_steps=2, precond_freq=2, blend_steps=2,
            mode="scao-0.2.4", tau=None)
  got, state = _run(stax.scao(**kw), {"layers": {"bias": b}}, lambda g: {"layers": {"bias": g}},
                    grads)
  want, _ = _run(stax.scao(**kw), {f"l{i}": {"bias": b[i]} for i in range(3)},
                 lambda g: {f"l{i}": {"bias": g[i]} for i in range(3)}, grads)
  np.testing.assert_allclose(np.asarray(got["layers"]["bias"]),
                             np.stack([np.asarray(want[f"l{i}"]["bias"]) for i in range(3)]),
                             rtol=0, atol=1e-6)
  adam, _ = _run(stax.adamw(1e-2, weight_decay=0.01), {"layers": {"bias": b}},
                 lambda g: {"layers": {"bias": g}}, grads)
  assert np.max(np.abs(np.asarray(adam["layers"]["bias"] - got["layers"]["bias"]))) > 1e-3
  tx = stax.scao(mode="scao-0.2.4")
  (ks,) = [x for x in jax.tree.leaves(tx.init({"query": {"bias": jnp.zeros((4, 8))}}),
                                      is_leaf=lambda z: isinstance(z, K.ScaleByKronState))
           if isinstance(x, K.ScaleByKronState)]
  assert ks.leaves["query"]["bias"].ema.shape == (1, 32)


def test_dims_out_of_axis_order_are_transposed():
  """Dims whose sides are not contiguous (rows = axes 0 and 2 of a (4, 5, 3) leaf) precondition
  the 12×5 matrix of those axes: the same steps as the leaf transposed to (4, 3, 5) and split
  at 2 (faithful mode, deterministic)."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  grads = [jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32) for _ in range(8)]
  kw = dict(learning_rate=1e-2, warmup_steps=2, precond_freq=2, blend_steps=2, k_min=2,
            k_max=4, mode="scao-0.2.4")
  got, _ = _run(stax.scao(dimension_numbers=stax.MatrixDimensionNumbers((0, 2), 1), **kw),
                {"w": w}, lambda g: {"w": g}, grads)
  want, _ = _run(stax.scao(dimension_numbers=2, **kw), {"w": jnp.transpose(w, (0, 2, 1))},
                 lambda g: {"w": jnp.transpose(g, (0, 2, 1))}, grads)
  np.testing.assert_allclose(np.asarray(got["w"]), np.transpose(np.asarray(want["w"]), (0, 2, 1)),
                             rtol=0, atol=1e-6)
  assert np.max(np.abs(np.asarray(got["w"] - w))) > 1e-2


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_explicit_mesh_with_3d_and_vector_leaves(mode):
  """Sharded 3-D and 1-D leaves (not in the contract tree): same result as one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py)")
  params = {"t": jnp.ones((8, 4, 6)), "v": jnp.ones((16,))}
  specs = {"t": P("x", None, None), "v": P("x")}
  tx = stax.scao(1e-2, warmup_steps=1, precond_freq=1, min_precond_updates=1, blend_steps=0,
                 k_min=1, k_max=2, mode=mode)
  grads = [jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.PRNGKey(i), x.shape), params)
           for i in range(4)]

  def run(p, put):
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    s = jax.jit(tx.init)(p)
    for g in grads:
      p, s = step(p, s, put(g))
    return p

  ref = run(params, lambda g: g)
  mesh = jax.make_mesh((8,), ("x",))
  with jax.set_mesh(mesh):
    put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
    got = run(put(params), put)
    assert got["t"].sharding.spec == specs["t"]
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), atol=1e-5)


def test_faithful_eigh_reads_the_lower_triangle_of_the_ema():
  """``_eig_desc`` hands LAPACK the transpose of the matrix symmetrised from its lower triangle
  (so the row-major EMA is LAPACK's column-major operand: no transposing copy of the state each
  step): the same numbers as ``eigh(d, UPLO="L")`` bit for bit, even for an EMA whose rounding
  left it slightly asymmetric (only the lower triangle counts), eigenvalues descending."""
  rng = np.random.default_rng(5)
  a = rng.standard_normal((24, 24)).astype(np.float32)
  ema = jnp.asarray(a @ a.T + np.triu(rng.standard_normal((24, 24)), 1).astype(np.float32))
  bias = jnp.float32(0.7)
  w, v = jax.jit(SC._eig_desc, static_argnums=2)(ema, bias, 24)
  d = ema / bias
  lam = jnp.maximum(SC._EPS, 1e-4 * jnp.trace(d) / 24)
  w_ref, v_ref = jax.jit(lambda x: jnp.linalg.eigh(x, UPLO="L", symmetrize_input=False))(
      d + lam * jnp.eye(24, dtype=d.dtype))
  np.testing.assert_array_equal(np.asarray(w), np.maximum(np.asarray(w_ref)[::-1], 0.0))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(v_ref)[:, ::-1])


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_a_step_copies_no_curvature_factor(mode):
  """The compiled (donated) step reads the factors for preconditioning and updates them in
  place at a refresh: XLA copies none of them. (When each leaf's preconditioning was a
  ``lax.cond`` of its own beside the refresh's, XLA copied every factor array every step: at
  16M parameters 31 of a warm-up step's 50 ms.) Read from the optimized HLO on CPU."""
  params = {"a": jnp.zeros((48, 32)), "b": jnp.zeros((32, 16)), "c": jnp.zeros(16)}
  tx = stax.scao(1e-3, mode=mode, warmup_steps=2, precond_freq=2, k_min=2, k_max=8)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  size = lambda rhs: math.prod(int(d) for d in rhs.split("[", 1)[1].split("]", 1)[0].split(",")
                               if d)   # "f32[48,8]{1,0} parameter(7)" -> 384
  params_hlo = dict(line.strip().split(" = ", 1) for line in entry.splitlines()
                    if " parameter(" in line)
  factors = [n for n, rhs in params_hlo.items() if "leaves" in n and size(rhs) >= 64]
  assert factors, "no factor arrays found among the step's parameters"
  copied = [line.strip()[:120] for line in entry.splitlines()
            if " copy(" in line and any(f"copy({n})" in line for n in factors)]
  assert not copied, copied


def test_the_refresh_is_ordered_after_every_read_of_the_factors():
  """A rule whose ``apply`` reads a large factor and whose ``update`` rewrites it in place: the
  controller orders the refresh after the preconditioning's read (its predicate reads the
  first effective gradient), so XLA keeps no copy of the factor anywhere in the step, inside
  the conditionals included. (With the preconditioning inside the refresh's conditional, the
  step's temporaries held one copy of the factor: 1,065,632 bytes here, against 16,728 now;
  at 16M parameters the faithful warm-up step faulted 92 MiB in per call instead of 65.)"""
  import dataclasses
  from typing import NamedTuple

  from stax.transforms.kron import _schedule

  class St(NamedTuple):
    f: jax.Array

  @dataclasses.dataclass(frozen=True)
  class BigFactor:
    needs_key: bool = False
    min_updates: int = 0

    def plan(self, m, n):
      return (m, n)

    def init(self, plan):
      return St(jnp.eye(plan[1], dtype=jnp.float32))

    def fits(self, plan, st):
      return isinstance(st, St)

    def noise_size(self, plan):
      return 0

    def apply(self, plan, st, g, ctx):
      return g @ st.f

    def update(self, plan, st, g, ctx):
      return St(st.f * 0.5 + jnp.sum(g * g))

  params = {"w": jnp.ones((8, 512))}
  tx = _schedule.scale_by_schedule(BigFactor(), _schedule.Schedule(
      warmup_steps=1, precond_freq=2, min_precond_updates=0, blend_steps=0))
  state = tx.init(params)
  compiled = jax.jit(tx.update, donate_argnums=(1,)).lower(params, state).compile()
  factor_bytes = 512 * 512 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < factor_bytes // 8
  # and the preconditioning used the old factor, the refresh replaced it afterwards
  g = {"w": jnp.full((8, 512), 0.5)}
  u, state = jax.jit(tx.update)(g, state)      # step 1: warm-up, no refresh
  u, state = jax.jit(tx.update)(g, state)      # step 2: preconditioned with I, then refresh
  np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(g["w"]))
  np.testing.assert_allclose(np.asarray(state.leaves["w"].f),
                             np.eye(512) * 0.5 + 8 * 512 * 0.25, rtol=1e-6)


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_injected_hyperparameters_with_float64_parameters_refresh(mode):
  """Under ``jax_enable_x64`` ``optax.inject_hyperparams`` hands float64 hyperparameters over,
  which promoted the refresh of the float32 factors to float64: both branches of its
  ``lax.cond`` must have one type, so the first refresh raised ``TypeError`` ("cond branches
  must have equal output types"). The refreshed factors keep their dtypes, and the injected
  run follows the plain one."""
  static = ("warmup_steps", "precond_freq", "k_min", "k_max", "min_precond_updates",
            "max_precond_dim", "blend_steps", "mode", "seed")
  kw = dict(learning_rate=3e-2, warmup_steps=2, precond_freq=1, k_min=1, k_max=3, mode=mode)
  with jax.enable_x64(True):
    runs = []
    for tx in (optax.inject_hyperparams(stax.scao, static_args=static)(**kw), stax.scao(**kw)):
      p = {"w": jnp.ones((16, 8), jnp.float64)}
      s = tx.init(p)
      types = jax.tree.map(jax.typeof, s)
      step = jax.jit(tx.update)
      for i in range(6):
        g = {"w": jnp.sin(jnp.arange(128.0, dtype=jnp.float64).reshape(16, 8) * (i + 1))}
        u, s = step(g, s, p)
        p = optax.apply_updates(p, u)
      assert jax.tree.map(jax.typeof, s) == types
      assert int(stax.scao_diagnostics(s)["curvature_updates"]) >= 3
      runs.append(np.asarray(p["w"]))
  assert runs[0].dtype == np.float64 and np.isfinite(runs[0]).all()
  np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


def test_injected_structural_arguments_ask_for_static_args():
  """``optax.inject_hyperparams`` turns every numeric argument into an array, the defaults of
  SCAO's integer (structural) arguments too: the error names the argument and says to list it
  in ``static_args`` (it said only "must be an int, got ArrayImpl")."""
  with pytest.raises(TypeError, match=r"`warmup_steps` is structural.*static_args"):
    optax.inject_hyperparams(stax.scao)(learning_rate=1e-3).init({"w": jnp.ones((4, 4))})
