"""stax.turbo_adam: AdamW equivalence, parity with turboadam 0.2.0's PyTorch path, validation,
state layout, and composition of the codecs with the shared Adam core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from stax.codecs.base import FullPrecision, SeparateStorage
from stax.codecs.log_quant import LogQuantCodec, LogQuantState
from stax.codecs.ustate import UStateM

torch = pytest.importorskip("torch")
turboadam = pytest.importorskip("turboadam")

# JAX holds hyperparameters in float32; the seed computes with Python doubles. Parity runs the
# seed with the float32-rounded betas so both sides use the same numbers.
B1, B2 = float(np.float32(0.9)), float(np.float32(0.999))


def _apply(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step)


def test_uncompressed_equals_optax_adamw_exactly():
  params = {"a": jnp.ones((8, 64)), "b": jnp.linspace(-1, 1, 7)}
  tx = stax.turbo_adam(1e-2, 0.9, 0.99, 1e-8, 0.05, compress_m=False, compress_v=False,
                       nonfinite="ignore")
  ref = stax.adamw(1e-2, 0.9, 0.99, 1e-8, weight_decay=0.05, nonfinite="ignore")
  ox = optax.adamw(1e-2, 0.9, 0.99, 1e-8, weight_decay=0.05)
  runs = []
  for t in (tx, ref, ox):
    p, s, st = params, t.init(params), _apply(t)
    for i in range(5):
      p, s = st(p, s, jax.tree.map(lambda x: jnp.sin(x * (i + 1.0)) + 0.1 * i, params))
    runs.append(p)
  # bit-exact with the shared core's AdamW ...
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... which itself matches optax.adamw to a few float32 ulps (XLA fuses the two programs
  # differently, and the rounding of each fusion depends on the vector ISA: 1 ulp with AVX2 or
  # AVX-512, 2 ulps with --xla_cpu_max_isa=SSE4_2).
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[2])):
    np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=4)


def _parity_run(v_bits, steps, shapes, thr, lr=1e-2, wd=0.01):
  names = sorted(shapes)
  rng = np.random.default_rng(v_bits)
  p0 = {k: rng.normal(size=shapes[k]).astype(np.float32) for k in names}
  grads = [{k: (rng.normal(size=shapes[k]) * np.exp(rng.uniform(-3, 0, size=shapes[k])))
            .astype(np.float32) for k in names} for _ in range(steps)]
  tp = [torch.nn.Parameter(torch.tensor(p0[k])) for k in names]
  opt = turboadam.TurboAdam(tp, lr=lr, betas=(B1, B2), eps=1e-8, weight_decay=wd, v_bits=v_bits,
                            min_m_compress_elements=thr, min_v_compress_elements=thr)
  tx = stax.turbo_adam(lr, B1, B2, 1e-8, wd, v_bits=v_bits, min_compress_elements=thr,
                       codec="turboadam-0.2", nonfinite="ignore")
  params = {k: jnp.asarray(p0[k]) for k in names}
  state = tx.init(params)
  step = _apply(tx)
  for t in range(steps):
    for i, k in enumerate(names):
      tp[i].grad = torch.tensor(grads[t][k])
    opt.step()
    params, state = step(params, state, {k: jnp.asarray(grads[t][k]) for k in names})
  return names, tp, opt, params, state[0]


@pytest.mark.parametrize("v_bits", [2, 4, 8])
def test_faithful_matches_turboadam_020_over_50_steps(v_bits):
  """50 steps on tensors above (2-D with last axis a block multiple, 1-D with a partial block)
  and below the threshold: parameters agree to float32 rounding and the packed codes, fp16
  endpoints and bf16 means agree (nearly) bit for bit. Differences come from operation order
  (XLA fuses a·b+c into FMAs, exp/log differ by an ulp, the core's EMA is (1-b)g + b·m where
  torch uses lerp); a stochastic code can then flip when a probability lands within an ulp of
  its uniform, which is why code agreement is measured as a fraction."""
  shapes = {"mat": (4, 256), "vec": (700,), "small": (100,)}
  names, tp, opt, params, inner = _parity_run(v_bits, 50, shapes, thr=512)
  for i, k in enumerate(names):
    pt, pj = tp[i].detach().numpy(), np.asarray(params[k])
    np.testing.assert_allclose(pj, pt, rtol=1e-4, atol=2e-5)
    s = opt.state[tp[i]]
    if k == "small":
      assert not s["_use_v_state"] and not s["_use_ustate"]
      assert inner.nu[k].dtype == jnp.float32 and inner.nu[k].shape == (100,)
      continue
    vs, ms, us = inner.nu[k], inner.mu[k], s["ustate"]
    assert np.mean(np.asarray(vs.codes).ravel() == s["v_state"]["indices"].numpy()) > 0.999
    assert np.mean(np.asarray(vs.scales).reshape(-1, 2).view(np.uint16)
                   == s["v_state"]["scales"].numpy().view(np.uint16)) > 0.99
    assert np.mean(np.asarray(ms.codes).ravel() == us["codes"].numpy()) > 0.999
    assert np.mean(np.asarray(ms.means.astype(jnp.float32)).ravel()
                   == us["means"].float().numpy()) > 0.95
    np.testing.assert_allclose(float(ms.decode_step), float(us["decode_step"]), rtol=1e-4)


def _seed_state_into(inner, opt, tp, names, count):
  """stax's Adam state with the seed's per-parameter state put in (its arrays reshaped: each
  compressed leaf here has a last axis that is a block multiple, or is 1-D)."""
  mu, nu = dict(inner.mu), dict(inner.nu)
  for i, k in enumerate(names):
    s = opt.state[tp[i]]
    if not s["_use_ustate"]:
      mu[k], nu[k] = jnp.asarray(s["exp_avg"].numpy()), jnp.asarray(s["exp_avg_sq"].numpy())
      continue
    vs, us, m0, v0 = s["v_state"], s["ustate"], inner.mu[k], inner.nu[k]
    nu[k] = LogQuantState(jnp.asarray(vs["indices"].numpy().reshape(v0.codes.shape)),
                          jnp.asarray(vs["scales"].numpy().reshape(v0.scales.shape)))
    mu[k] = UStateM(jnp.asarray(us["codes"].numpy().reshape(m0.codes.shape)),
                    jnp.asarray(us["means"].float().numpy().reshape(m0.means.shape),
                                jnp.bfloat16),
                    jnp.float32(us["decode_step"].item()), jnp.float32(us["encode_step"].item()))
  return inner._replace(mu=mu, nu=nu, count=jnp.int32(count))


@pytest.mark.parametrize("v_bits", [2, 3, 4, 6, 8])
def test_faithful_step_equals_turboadam_020_when_the_gradient_scale_jumps(v_bits):
  """Every step of the faithful codec is the seed's step, for every ``v_bits``, while the
  gradient scale jumps ×100 and ×200 between steps (``(0.01 + t % 3)``), with the seed's own
  Python-float betas (0.9, 0.999).

  Teacher-forced: each of the 30 steps starts from the seed's state (codes, fp16 endpoints,
  bf16 means, lagged steps) and parameters, and its outputs are compared with the seed's. Of
  ~270k packed v bytes, 4k endpoints, 67k m bytes and 4k means, at most a near-tie or two may
  differ (the remaining arithmetic differences are one-ulp ``exp``/``log``/summation-order
  differences); the next encode step agrees to 2e-6. Before the codecs divided with
  ``numerics.divide`` and rounded their level products with ``numerics.rounded`` (XLA turns
  ``x / 255`` into ``x · (1/255)`` and fuses ``l_min + k·step`` into an FMA), and before the bias
  corrections took a Python beta's double-precision log, 5–12 means and up to 4 codes differed
  per run and the encode step was 7e-6 to 3e-5 off.

  Why not free-running over many steps: the seed's own trajectory is chaotic in its codes. One
  2-bit m code flipped in the seed alone moves parameters by ~5 lr after 50 steps: a flipped
  code decays only stochastically (the same uniforms re-round it), and its residual changes the
  tensor-wide RMS that sets every element's next step, so any one-ulp difference that lands on
  a near-tie grows the same way. The free-running comparison (above) keeps gradient scales
  within one order of magnitude, where no code lands near a tie in 50 steps.
  """
  shapes = {"mat": (32, 256), "vec": (700,), "small": (100,)}
  names = sorted(shapes)
  rng = np.random.default_rng(v_bits)
  p0 = {k: rng.normal(size=shapes[k]).astype(np.float32) for k in names}
  tp = [torch.nn.Parameter(torch.tensor(p0[k])) for k in names]
  kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, v_bits=v_bits)
  opt = turboadam.TurboAdam(tp, **kw, min_m_compress_elements=512, min_v_compress_elements=512)
  tx = stax.turbo_adam(1e-2, 0.9, 0.999, 1e-8, 0.01, v_bits=v_bits, min_compress_elements=512,
                       codec="turboadam-0.2", nonfinite="ignore")
  state, step = tx.init({k: jnp.asarray(v) for k, v in p0.items()}), _apply(tx)
  off = dict(v=0, scales=0, m=0, means=0)
  for t in range(30):
    grads = {k: (rng.normal(size=shapes[k]) * np.exp(rng.uniform(-3, 0, size=shapes[k]))
                 * (0.01 + t % 3)).astype(np.float32) for k in names}
    p_in = {k: jnp.asarray(tp[i].detach().numpy()) for i, k in enumerate(names)}
    if t:
      state = (_seed_state_into(state[0], opt, tp, names, t),) + tuple(state[1:])
    for i, k in enumerate(names):
      tp[i].grad = torch.tensor(grads[k])
    opt.step()
    params, state = step(p_in, state, {k: jnp.asarray(g) for k, g in grads.items()})
    inner = state[0]
    for i, k in enumerate(names):
      np.testing.assert_allclose(np.asarray(params[k]), tp[i].detach().numpy(), rtol=0,
                                 atol=2e-6)
      s = opt.state[tp[i]]
      if not s["_use_ustate"]:
        continue
      pairs = dict(
          v=(inner.nu[k].codes, s["v_state"]["indices"].numpy()),
          scales=(np.asarray(inner.nu[k].scales).view(np.uint16),
                  s["v_state"]["scales"].numpy().view(np.uint16)),
          m=(inner.mu[k].codes, s["ustate"]["codes"].numpy()),
          means=(inner.mu[k].means.astype(jnp.float32), s["ustate"]["means"].float().numpy()))
      for name, (a, b) in pairs.items():
        off[name] += int(np.sum(np.asarray(a).ravel() != np.asarray(b).ravel()))
      np.testing.assert_allclose(float(inner.mu[k].encode_step),
                                 s["ustate"]["encode_step"].item(), rtol=2e-6)
  assert off["v"] <= 2 and off["scales"] <= 2 and off["m"] <= 2 and off["means"] <= 3, off


def test_state_layout_keeps_rank_and_has_no_fp32_param_buffer():
  params = {"w": jnp.zeros((8, 512)), "b": jnp.zeros(8)}
  for codec in ("turboadam-0.2", "stax"):
    tx = stax.turbo_adam(codec=codec, min_compress_elements=1024)
    state = tx.init(params)
    inner = state.inner_state[0]
    for leaf in jax.tree.leaves((inner.mu["w"], inner.nu["w"])):
      assert leaf.ndim == 0 or leaf.shape[0] == 8            # leading axis preserved
      assert not (leaf.dtype == jnp.float32 and leaf.size >= 8 * 512)
    assert inner.mu["b"].dtype == jnp.float32                # below threshold: float32
  faithful = stax.turbo_adam(codec="turboadam-0.2", min_compress_elements=1024)
  s = faithful.init(params)
  bits = stax.state_bits_per_param(
      (s.inner_state[0].mu["w"], s.inner_state[0].nu["w"]), params["w"], exclude_scalars=True)
  assert bits == 6.5


def test_default_step_writes_no_float32_moment():
  """The default codec's step recomputes the new m (4-bit codes and g) inside each pass that
  reads it: no float32 array of the matrix's size is written (the block absmax is an integer max,
  ``stax.numerics.absmax``; before, XLA wrote the new m out for YNNPACK's float max, 589 KiB of
  temporaries here, and at 16M parameters the step's 86 MiB faulted in every call)."""
  if jax.default_backend() != "cpu":
    pytest.skip("a property of XLA's CPU backend")
  p = {"w": jnp.ones((256, 512))}
  tx = stax.turbo_adam(1e-3)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 256 * 512 * 4 // 2


@pytest.mark.parametrize("codec", ["factored", "stax"])
@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
def test_each_code_array_is_written_by_the_loop_that_packs_it(codec, nonfinite):
  """The packed codes of m (and of the log v) are written by the reduction that packs them,
  the gate's select of the old codes inside it: no loop of its own converts or selects the
  codes. Packed as 32-bit words, every code array took a second loop (the words split into
  bytes, or selected and split on a guarded step; fails on stop 55's code): at 16M parameters
  the ``"stax"`` codec's step 118 -> 101-107 ms and the faithful one's 176-182 -> 157-167 ms
  (two runs per tree, this project's 2-core CPU), the default's first compile on ResNet-18 188 ->
  176 kernels."""
  import re
  if jax.default_backend() != "cpu":
    pytest.skip("a property of XLA's CPU backend")
  p = {"w": jnp.ones((256, 512))}
  tx = stax.turbo_adam(1e-3, codec=codec, nonfinite=nonfinite)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  writers = re.findall(r"= u8\[[\d,]+\]\S* fusion\(.*calls=(%[\w.-]+)", entry)
  assert len(writers) == (1 if codec == "factored" else 2), writers
  for name in writers:
    body = hlo[hlo.index(f"\n{name} ") + 1:]
    body = body[:body.index("\n}")]
    assert " reduce(" in body, (name, body)


def test_validation_errors_name_the_argument():
  with pytest.raises(ValueError, match="v_bits"):
    stax.turbo_adam(v_bits=5)
  with pytest.raises(ValueError, match="codec"):
    stax.turbo_adam(codec="turboadam-0.1")
  with pytest.raises(ValueError, match="block_size"):
    stax.turbo_adam(block_size=6)
  with pytest.raises(TypeError, match="block_size"):
    stax.turbo_adam(block_size=128.0)
  with pytest.raises(ValueError, match="b1"):
    stax.turbo_adam(b1=0.999, b2=0.99, codec="turboadam-0.2")   # UState needs b1² < b2
  stax.turbo_adam(b1=0.999, b2=0.99, codec="turboadam-0.2", compress_m=False)
  with pytest.raises(ValueError, match="min_compress_elements"):
    stax.turbo_adam(min_compress_elements=-1)
  with pytest.raises(ValueError, match="m_block_size"):
    stax.turbo_adam(block_size=128, m_block_size=48)
  # a block_size the default m block does not divide names block_size and the rule (it named
  # only m_block_size, which the user had not passed)
  for codec, bs in (("factored", 48), ("stax", 100), ("turboadam-0.2", 96)):
    with pytest.raises(ValueError, match=r"`block_size` must be a multiple of the default "
                                         r"`m_block_size` \((32|64) with codec"):
      stax.turbo_adam(block_size=bs, codec=codec)
  stax.turbo_adam(block_size=48, m_block_size=16)


def test_codecs_compose_with_debiased_adam_core():
  """The 4-bit 1Q v codec plugged into the shared core under optimi's debiased betas
  (StableAdamW's moment form): the state holds packed codes, the run tracks the float32 run and
  both converge on a quadratic."""
  target = jnp.asarray(np.random.default_rng(0).normal(size=(16, 128)).astype(np.float32))
  loss = lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2)
  quant = SeparateStorage(FullPrecision(jnp.float32), LogQuantCodec(4, 128))
  runs = {}
  for name, storage in (("q4", quant), ("f32", None)):
    tx = optax.chain(stax.scale_by_adam(0.9, 0.99, 1e-8, bias_correction="debiased",
                                        storage=storage, seed=3), optax.scale(-3e-2))
    p = {"w": jnp.zeros((16, 128))}
    s = tx.init(p)

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    for _ in range(300):
      p, s = step(p, s)
    runs[name] = (p, s)
  nu = runs["q4"][1][0].nu["w"]
  assert isinstance(nu, LogQuantState) and nu.codes.dtype == jnp.uint8
  assert nu.codes.shape == (16, 64)
  assert float(loss(runs["q4"][0])) < 1e-2 * float(loss({"w": jnp.zeros((16, 128))}))
  assert float(jnp.max(jnp.abs(runs["q4"][0]["w"] - runs["f32"][0]["w"]))) < 0.1


# --------------------------------------------------------------------------- fused kernel
_FUSED_PARAMS = {"w": (4, 256), "conv": (16, 8, 4, 4), "b": (10,)}   # conv row view: (16, 128)


def _fused_run(implementation, steps=4, params=None):
  """stax.turbo_adam (faithful codec) with ``implementation``, gradient scale cycling ×200."""
  shapes = _FUSED_PARAMS if params is None else params
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  tx = stax.turbo_adam(1e-2, weight_decay=0.01, codec="turboadam-0.2", min_compress_elements=100,
                       implementation=implementation)
  state, step = tx.init(params), _apply(tx)
  for i in range(steps):
    grads = {k: jnp.asarray(rng.normal(size=p.shape) * (0.01 + i % 3), jnp.float32)
             for k, p in params.items()}
    params, state = step(params, state, grads)
  return tx, params, state


def test_fused_update_is_reached_through_the_core_and_xla_is_the_unfused_path():
  """``implementation="pallas"`` puts one Pallas call per compressed leaf into the compiled
  step (the core hands the storage its step); ``"xla"`` is read → step → write, equal to a run
  whose storage has no fused update at all (state bit for bit, parameters to an ulp)."""
  from stax.codecs import turbo as T
  tx, params, state = _fused_run("pallas", steps=1)
  jaxpr = str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, state, params))
  assert jaxpr.count("pallas_call") == 2                    # "w" and "conv"; "b" stays float32
  assert "pallas_call" not in str(jax.make_jaxpr(
      lambda g, s, p: _fused_run("xla", steps=0)[0].update(g, s, p))(params, state, params))
  _, p_xla, s_xla = _fused_run("xla")
  orig = T.TurboAdam02Storage.fused_update
  try:
    T.TurboAdam02Storage.fused_update = property(lambda self: None)     # no kernel hook at all
    _, p_plain, s_plain = _fused_run(None)
  finally:
    T.TurboAdam02Storage.fused_update = orig
  for a, b in zip(jax.tree.leaves(s_xla), jax.tree.leaves(s_plain)):   # the state: bit for bit
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))
  for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_plain)):
    # the parameters to an ulp: the two programs are fused differently (at XLA's backend
    # optimisation level 0, which the suite uses, one ulp in 12 of 2,048 elements)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=2.5e-7, atol=0)


def test_fused_pallas_update_equals_the_reference_in_interpret_mode():
  """Four steps with the gradient scale changing ×200 between steps: packed v codes, fp16
  endpoints, UState codes and bf16 means equal bit for bit (the same counter-hash stream);
  parameters and UState's step scalars to float32 rounding (XLA contracts a·b+c into FMAs
  differently in the kernel and in the whole-tensor program)."""
  _, p_ref, s_ref = _fused_run("xla")
  _, p_ker, s_ker = _fused_run("pallas")
  inner_ref, inner_ker = s_ref.inner_state[0], s_ker.inner_state[0]
  for name in ("w", "conv"):
    m_r, m_k = inner_ref.mu[name], inner_ker.mu[name]
    v_r, v_k = inner_ref.nu[name], inner_ker.nu[name]
    for a, b in ((v_r.codes, v_k.codes), (v_r.scales, v_k.scales), (m_r.codes, m_k.codes),
                 (m_r.means, m_k.means)):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))
    for a, b in ((m_r.decode_step, m_k.decode_step), (m_r.encode_step, m_k.encode_step)):
      np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
  for name in p_ref:
    np.testing.assert_allclose(np.asarray(p_ker[name]), np.asarray(p_ref[name]), rtol=0,
                               atol=4e-7)



@pytest.mark.parametrize("v_bits", [4, 2, 8])
def test_fused_pallas_tiles_and_phases_equal_the_reference(v_bits):
  """The kernel's tiles (a power of two of rows per program: 16 rows in two programs, 2 of 6,
  1 of 15, a vector's one row) and its four phases per block (element 4j + k in column j of
  phase k, each phase's codes a shift of the same bytes): v codes of 2, 4 and 8 bits, a
  non-finite step skipped, the gradient scale changing ×10⁴ between steps. The state bit for
  bit (the mean blocks' sums are added phase by phase, another order than XLA's, and still
  land on the same bf16 means and codes here); parameters to float32 rounding."""
  shapes = {"a": (32, 256), "b": (6, 384), "e": (3, 5, 128), "d": (512,)}

  def run(implementation):
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    tx = stax.turbo_adam(1e-2, weight_decay=0.01, codec="turboadam-0.2", v_bits=v_bits,
                         min_compress_elements=100, implementation=implementation)
    state, step = tx.init(params), _apply(tx)
    for i in range(5):
      scale = 0.01 + 100.0 * (i % 3 == 1)
      grads = {k: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32)
               for k, p in params.items()}
      if i == 3:
        grads["b"] = grads["b"].at[0, 0].set(jnp.nan)
      params, state = step(params, state, grads)
    return params, state

  p_ref, s_ref = run("xla")
  p_ker, s_ker = run("pallas")
  for a, b in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_ker)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype in (jnp.uint8, jnp.float16, jnp.bfloat16):       # codes, endpoints, means
      np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))
    else:                                                      # step scalars, counts, keys
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
  for name in p_ref:
    np.testing.assert_allclose(np.asarray(p_ker[name]), np.asarray(p_ref[name]), rtol=0,
                               atol=4e-7)

def test_fused_implementation_is_checked_at_construction():
  with pytest.raises(ValueError, match=r"op 'turbo_step' must be None or one of \('xla', "
                                       r"'pallas', 'chunked'\), got 'triton'"):
    stax.turbo_adam(codec="turboadam-0.2", implementation="triton")
  with pytest.raises(ValueError, match="implementation='pallas'.*codec='turboadam-0.2'"):
    stax.turbo_adam(implementation="pallas")                       # the "factored" codec
  with pytest.raises(ValueError, match="compress_m=True and compress_v=True"):
    stax.turbo_adam(codec="turboadam-0.2", compress_m=False, implementation="pallas")
  with pytest.raises(ValueError, match="implementation='chunked'.*codec='stax'"):
    stax.turbo_adam(codec="turboadam-0.2", implementation="chunked")
  with pytest.warns(UserWarning, match="`implementation`.*no effect"):
    stax.turbo_adam(codec="turboadam-0.2", compress_m=False, implementation="xla")
  with pytest.warns(UserWarning, match="`implementation`.*no effect"):
    stax.turbo_adam(compress_m=False, compress_v=False, codec="stax", implementation="chunked")
  tx = stax.turbo_adam(codec="turboadam-0.2", min_compress_elements=1, implementation="pallas")
  params = {"w": jnp.ones((2, 100))}                                 # row not a block multiple
  with pytest.raises(ValueError, match=r"row view.*100 elements.*multiple of block_size \(128\)"):
    tx.update(params, tx.init(params), params)
  # the row is the row view's (trailing axes merged), not the leaf's last axis: say so
  params = {"w": jnp.ones((3, 200))}
  with pytest.raises(ValueError, match=r"trailing axes merged.*600 elements.*block_size \(128\)"):
    tx.update(params, tx.init(params), params)


def test_codecs_compose_with_stable_adamw_part():
  """OAdamW's StableAdamW part (``scale_by_stable_adam``) with 4-bit log v."""
  import inspect
  fn = getattr(stax, "scale_by_stable_adam", None)
  if fn is None or "storage" not in inspect.signature(fn).parameters:
    pytest.skip("scale_by_stable_adam(storage=...) not available")
  target = jnp.asarray(np.random.default_rng(1).normal(size=(8, 128)).astype(np.float32))
  loss = lambda p: 0.5 * jnp.sum((p["w"] - target) ** 2)
  finals = {}
  for name, storage in (("q4", SeparateStorage(FullPrecision(jnp.float32), LogQuantCodec(4, 128))),
                        ("f32", None)):
    tx = optax.chain(fn(0.9, 0.99, 1e-6, storage=storage), optax.scale(-3e-2))
    p, s = {"w": jnp.zeros((8, 128))}, None
    s = tx.init(p)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.grad(loss)(p), s, p)))
    for _ in range(300):
      p, s = step(p, s)
    finals[name] = (p, s)
  codes = [x for x in jax.tree.leaves(finals["q4"][1]) if x.dtype == jnp.uint8]
  assert codes and codes[0].shape == (8, 64)
  assert float(loss(finals["q4"][0])) < 1e-2 * float(loss({"w": jnp.zeros((8, 128))}))
  assert float(jnp.max(jnp.abs(finals["q4"][0]["w"] - finals["f32"][0]["w"]))) < 0.1


# ------------------------------------------------------------- the row-chunked fused update
# Row views: w (40, 256); conv (32, 384); lead (6, 5, 256); prime_rows (257, 128); tall and vec
# are one padded row (a 1-D view: one chunk, the whole-tensor program).
_CHUNK_PARAMS = {"w": (40, 256), "conv": (32, 32, 3, 4), "lead": (6, 5, 256),
                 "prime_rows": (257, 128), "tall": (1024, 96), "vec": (4096,)}


def _stax_codec_run(implementation, steps=4, **kw):
  """stax.turbo_adam (the "stax" codec) with ``implementation``; the gradient scale changes by
  up to ×300 between steps."""
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in _CHUNK_PARAMS.items()}
  tx = stax.turbo_adam(1e-2, weight_decay=0.01, min_compress_elements=1, codec="stax",
                       implementation=implementation, **kw)
  state, step = tx.init(params), _apply(tx)
  for i in range(steps):
    scale = (0.01 + i % 3) * 10.0 ** (2 * (i % 2))
    grads = {k: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32)
             for k, p in params.items()}
    params, state = step(params, state, grads)
  return tx, params, state


def test_chunked_update_equals_the_whole_tensor_update(monkeypatch):
  """``implementation="chunked"`` (chunks of 4,096 elements, so every leaf with a 2-D or 3-D row
  view runs in a loop of several chunks, "prime_rows" with a remainder chunk) keeps the state
  bit for bit and the parameters to an ulp of the whole-tensor program's: each chunk draws the
  tensor's own counter-hash stream from its first row."""
  from stax.kernels.turbo_step import chunked
  monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4096)
  assert chunked.rows_per_chunk(257, 128, 4096) == 32          # no divisor: 32 rows + a tail
  assert chunked.rows_per_chunk(300, 200, 4096) == 20          # a divisor of 300
  _, p_ref, s_ref = _stax_codec_run("xla")
  tx, p_chk, s_chk = _stax_codec_run("chunked")
  for a, b in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_chk)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))
  for name in p_ref:
    np.testing.assert_allclose(np.asarray(p_chk[name]), np.asarray(p_ref[name]), rtol=2.5e-7,
                               atol=0)
  loops = lambda t: jax.jit(t.update).lower(p_chk, s_chk, p_chk).as_text().count("stablehlo.while")
  tx_ref = stax.turbo_adam(1e-2, weight_decay=0.01, min_compress_elements=1, codec="stax",
                           implementation="xla")
  assert loops(tx) - loops(tx_ref) == 4               # w, conv, lead, prime_rows; not tall, vec


def test_chunked_stream_is_the_tensors_own():
  """Encoding rows 3.. of a tensor with ``row0=3`` gives those rows of the whole encoding."""
  from stax.codecs.block_signed import BlockSignedCodec
  from stax.codecs.log_quant import LogQuantCodec
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 160)) ** 2, jnp.float32)
  key = jax.random.PRNGKey(7)
  for codec in (LogQuantCodec(4, 32), BlockSignedCodec(4, 32)):
    encode = jax.jit(codec.encode, static_argnums=2)     # one compilation, not one per op
    whole = encode(x, key, 0)
    part = encode(x[3:], key, 3)
    for a, b in zip(whole, part):
      np.testing.assert_array_equal(np.asarray(a[3:].astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))
    other = encode(x[3:], key, 0)                            # without the offset: another stream
    assert not np.array_equal(np.asarray(other.codes), np.asarray(whole.codes[3:]))


_LEAN_CHILD = """
import sys, jax, jax.numpy as jnp, numpy as np, optax, stax
rng = np.random.default_rng(3)
shapes = {"w": (40, 256), "conv": (32, 32, 3, 4), "lead": (6, 5, 256), "vec": (4096,)}
params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
tx = stax.turbo_adam(1e-2, min_compress_elements=1)
def step(p, s, g):
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s
fn = jax.jit(step)
p, s = params, tx.init(params)
for _ in range(3):
  p, s = fn(p, s, grads)
np.savez(sys.argv[1], *[np.asarray(x.astype(jnp.float32)) for x in jax.tree.leaves((p, s))])
"""


def test_lean_memory_flag_changes_the_schedule_not_the_result(tmp_path):
  """Three TurboAdam steps in a process with ``stax.LEAN_MEMORY_FLAG`` in ``XLA_FLAGS`` (XLA's
  memory-minimising CPU scheduler) and in one without give the same parameters and state bit
  for bit; the flag helper appends, replaces and refuses as documented."""
  import os
  import subprocess
  import sys
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  assert stax.LEAN_MEMORY_FLAG == flag
  assert stax.lean_memory_xla_flags(None) == flag
  assert stax.lean_memory_xla_flags("--a=1 " + flag.replace("false", "true")) == "--a=1 " + flag
  with pytest.raises(TypeError, match="`xla_flags` must be a string or None"):
    stax.lean_memory_xla_flags(["--a=1"])
  script = tmp_path / "child.py"
  script.write_text(_LEAN_CHILD)
  outs = []
  for lean in (False, True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = stax.lean_memory_xla_flags(flags) if lean else flags
    out = tmp_path / f"run{int(lean)}.npz"
    run = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True,
                         text=True, timeout=600)
    if run.returncode:                  # the child's stderr names the failure (conftest.py)
      raise RuntimeError(f"child run (lean={lean}) failed: {run.stderr[-2000:]}")
    outs.append(np.load(out))
  assert len(outs[0].files) == len(outs[1].files) > 10
  for name in outs[0].files:
    np.testing.assert_array_equal(outs[0][name], outs[1][name])
