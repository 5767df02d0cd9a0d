"""Non-finite gradient policies: skip leaves everything exactly unchanged, error raises."""

from __future__ import annotations

import re

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


# ----------------------------------------------------------------------------- all_finite
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_all_finite_detects_every_nonfinite_value(dtype, jit):
  check = jax.jit(stax.all_finite) if jit else stax.all_finite
  big = float(jnp.finfo(dtype).max)
  good = {"a": jnp.full((64, 33), big, dtype),  # the largest finite values: no overflow
          "b": -jnp.full((7,), big, dtype), "c": jnp.arange(5), "d": jnp.zeros((), dtype)}
  assert bool(check(good))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    for leaf in ("a", "b", "d"):
      t = dict(good)
      t[leaf] = t[leaf].at[(0,) * t[leaf].ndim].set(bad)
      assert not bool(check(t)), (dtype, bad, leaf)
  assert bool(check({})) and bool(check({"i": jnp.arange(3)}))


# ----------------------------------------------------------------------------- gated guard
def _gated_vs_cond_configs():
  """name -> (factory, kwargs, parameter dtype) of the optimizers whose guard is gated."""
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40)
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
  return {
      "adamw": (stax.adamw, dict(learning_rate=1e-2, weight_decay=1e-2), jnp.float32),
      "adamw_schedule_mask_nesterov": (stax.adamw, dict(
          learning_rate=sched, weight_decay=1e-2, mask=mask, nesterov=True), jnp.float32),
      "adamw_bf16_mu": (stax.adamw, dict(learning_rate=1e-2, weight_decay=0.0,
                                         mu_dtype=jnp.bfloat16), jnp.float32),
      "stable_adamw": (stax.stable_adamw, dict(learning_rate=1e-2, weight_decay=1e-2),
                       jnp.float32),
      "stable_adamw_decoupled_schedule": (stax.stable_adamw, dict(
          learning_rate=sched, weight_decay=1e-2, decouple_lr=True, max_lr=1e-2), jnp.float32),
      "stable_adamw_bf16_kahan": (stax.stable_adamw, dict(learning_rate=1e-2, weight_decay=1e-2),
                                  jnp.bfloat16),
      # gate-aware through optax.partition (stax.transforms.guards.gated_partition): the Muon
      # trace holds itself by its decay, the StableAdamW core by its decays
      "oadamw": (stax.oadamw, dict(learning_rate=1e-2, weight_decay=1e-2), jnp.float32),
      "oadamw_nesterov_schedule": (stax.oadamw, dict(learning_rate=sched, weight_decay=1e-2,
                                                     muon_nesterov=True), jnp.float32),
      "oadamw_gradient": (stax.oadamw, dict(learning_rate=1e-2, weight_decay=1e-2,
                                            muon="gradient"), jnp.float32),
      "oadamw_m8": (stax.oadamw, dict(learning_rate=1e-2, weight_decay=1e-2,
                                      muon_momentum_bits=8, min_compress_elements=64),
                    jnp.float32),
      # a per-leaf storage (4-bit m and factored or 1Q log v for the matrices, float32 for the
      # vectors): each leaf gated as its storage declares
      "turbo_adam": (stax.turbo_adam, dict(learning_rate=1e-2, weight_decay=1e-2, block_size=16,
                                           min_compress_elements=64), jnp.float32),
      "turbo_adam_stax": (stax.turbo_adam, dict(learning_rate=1e-2, block_size=16, codec="stax",
                                                min_compress_elements=64), jnp.float32),
      "turbo_adam_faithful": (stax.turbo_adam, dict(learning_rate=1e-2, block_size=16,
                                                    codec="turboadam-0.2",
                                                    min_compress_elements=64), jnp.float32),
  }


@pytest.mark.parametrize("name", list(_gated_vs_cond_configs()))
def test_gated_adamw_skips_exactly_and_equals_the_cond_guard(name):
  """stax.adamw's gated guard (no lax.cond: the core selects its moments back on a bad step) leaves
  parameters and every state leaf bit-identical on a bad step, and otherwise follows the
  generic lax.cond guard (to float32 rounding: two compiled programs may fuse differently)."""
  factory, kw, dtype = _gated_vs_cond_configs()[name]
  gated = factory(**kw)  # gated=True inside
  cond = stax.nonfinite_guard(factory(**kw, nonfinite="ignore"), "skip")
  params, _, _ = cp.quadratic()
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  bad_steps = {3: jnp.nan, 4: jnp.inf, 11: -jnp.inf, 12: jnp.nan}

  def run(tx, check_bad):
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    p, s = params, tx.init(params)
    for t in range(20):
      g = jax.tree.map(lambda x: x.astype(dtype), cp.random_grads(p, t))
      if t in bad_steps:
        g["layer_1"]["bias"] = g["layer_1"]["bias"].at[0].set(bad_steps[t])
      p2, s2 = step(p, s, g)
      if check_bad and t in bad_steps:
        for x, y in zip(jax.tree.leaves((p2, s2.inner_state)), jax.tree.leaves((p, s.inner_state))):
          assert x.dtype == y.dtype
          np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
      p, s = p2, s2
    return p, s

  pg, sg = run(gated, True)
  pc, sc = run(cond, False)
  assert int(sg.nonfinite_count) == int(sc.nonfinite_count) == 4
  counts = lambda s: [int(x) for x in jax.tree.leaves(s.inner_state)  # noqa: E731
                      if x.dtype == jnp.int32 and x.ndim == 0]
  assert counts(sg) == counts(sc) and set(counts(sg)) == {16}
  if dtype == jnp.bfloat16:  # Kahan's compensation buffers exist and were exercised
    assert any(x is not None and x.size for x in jax.tree.leaves(sg.inner_state[-1].comp))
  tol = dict(rtol=1e-5, atol=1e-7) if dtype == jnp.float32 else dict(rtol=2e-2, atol=1e-3)
  for x, y in zip(jax.tree.leaves((pg, sg)), jax.tree.leaves((pc, sc))):
    assert x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


def test_gated_codec_core_keeps_its_encoded_state_by_a_select():
  """A core whose v is quantised cannot rewrite an unchanged v exactly (stochastic rounding), so
  on a skipped step it selects the old codes and scales; its exact m keeps itself."""
  from stax.transforms.guards import NONFINITE_OK
  codec = stax.scale_by_adam(storage=stax.SeparateStorage(stax.FullPrecision(),
                                                           stax.LogQuantCodec(4)))
  params = {"w": jnp.linspace(-1.0, 1.0, 256).reshape(2, 128)}
  state = codec.init(params)
  _, state = codec.update(params, state, params)
  _, skipped = codec.update(jax.tree.map(lambda x: 0 * x, params), state, params,
                            **{NONFINITE_OK: jnp.array(False)})
  for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, moved = codec.update(jax.tree.map(lambda x: 0 * x, params), state, params,
                          **{NONFINITE_OK: jnp.array(True)})
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(moved.nu),
                                                   jax.tree.leaves(state.nu)))
  stax.nonfinite_guard(codec, gated=True)


@pytest.mark.parametrize("inner", [
    lambda: optax.chain(stax.scale_by_adam(), optax.scale(-1e-2)),      # a plain chain
    lambda: optax.sgd(1e-2, momentum=0.9),
])
def test_gated_guard_checks_the_inner_transformation_at_construction(inner):
  with pytest.raises(ValueError, match="gate-aware"):
    stax.nonfinite_guard(inner(), gated=True)
  stax.nonfinite_guard(inner(), gated=False)          # the lax.cond guard takes any inner
  stax.nonfinite_guard(inner(), "ignore", gated=True)  # no gate: nothing to check


def test_a_per_leaf_storage_core_is_gated_as_one_storage_is():
  """The core resolves a per-leaf storage callable leaf by leaf, and each leaf keeps its state
  on a skipped step as its storage declares, so such a core is gate-aware too: with full
  precision chosen per leaf the guarded step compiles to the very program of the one storage
  (each moment selected back in its own loop). Before, it was refused by ``gated=True`` and
  TurboAdam selected its whole new state after the core, where XLA formed each float32 vector's
  new moments twice (for the state and for the update). TurboAdam's skipped steps:
  test_gated_adamw_skips_exactly_and_equals_the_cond_guard."""
  from stax.transforms.guards import gate_state, is_gate_aware
  per_leaf = stax.scale_by_adam(storage=lambda leaf: stax.full_precision_storage())
  assert is_gate_aware(per_leaf)
  params = {"w": jnp.ones((64, 96)), "b": jnp.ones((96,))}

  def program(core):
    tx = stax.nonfinite_guard(stax.gated_chain(core, gate_state(optax.scale(-1e-2))),
                              gated=True)
    hlo = _compiled_step_hlo(tx, params)
    return sorted(re.findall(r"^\s+%\S+ = \S+ ([\w-]+)\(", hlo, re.M))

  assert program(per_leaf) == program(stax.scale_by_adam(
      storage=stax.full_precision_storage()))


def test_a_beta1_rule_core_honours_the_gate_and_keeps_the_rule_state():
  """A Beta1Rule's state (a few scalars per leaf) is held by the core on a skipped step, so
  STAM-style cores are gate-aware (no state select, no lax.cond)."""
  from stax.transforms.guards import NONFINITE_OK, is_gate_aware
  rule = stax.Beta1Rule(lambda p: jax.tree.map(lambda _: jnp.zeros([]), p),
                        lambda g, m, s, c: (jax.tree.map(lambda _: 0.8, g),
                                            jax.tree.map(lambda x: x + 1.0, s)))
  core = stax.scale_by_adam(b1=rule)
  assert is_gate_aware(core)
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  state = core.init(params)
  _, s1 = core.update(params, state, params)
  _, s2 = core.update(params, s1, params, **{NONFINITE_OK: jnp.array(False)})
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(s1.b1_state["w"]) == 1.0  # a rule of its own keeps any state layout


def test_gated_chain_names_the_element_that_is_not_gate_aware():
  from stax.transforms.guards import is_gate_aware
  with pytest.raises(ValueError, match=r"element 1 .*not gate-aware.*gate_state"):
    stax.gated_chain(stax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
  tx = stax.gated_chain(stax.scale_by_adam(), stax.gate_state(optax.scale_by_learning_rate(1e-2)),
                        stax.kahan_summation())
  assert is_gate_aware(tx) and is_gate_aware(stax.kahan_summation(enabled=False))
  assert is_gate_aware(stax.scale_by_stable_adam())
  assert is_gate_aware(stax.scale_by_adam(storage=stax.SeparateStorage(
      stax.FullPrecision(), stax.LogQuantCodec(4))))
  assert is_gate_aware(stax.scale_by_adam(storage=lambda leaf: stax.full_precision_storage()))
  stax.nonfinite_guard(tx, gated=True)
  labels = {"w": "a", "b": "b"}
  with pytest.raises(ValueError, match=r"label 'b' .*not gate-aware"):
    stax.gated_partition({"a": stax.scale_by_adam(), "b": optax.scale_by_learning_rate(1.0)},
                         labels)
  part = stax.gated_partition({"a": stax.scale_by_adam(),
                               "b": stax.gate_state(optax.scale_by_learning_rate(1.0))}, labels)
  assert is_gate_aware(part) and is_gate_aware(stax.saturating_trace(0.9))


def test_gate_aware_transforms_keep_their_own_state_on_a_skipped_step():
  """With the gate false each gate-aware part returns its state unchanged by itself (counters
  included): the guard patches nothing."""
  from stax.transforms.guards import NONFINITE_OK
  sched = optax.linear_schedule(1e-2, 0.0, 10)
  tx = stax.gated_chain(stax.scale_by_adam(bias_correction="product"),
                        stax.gate_state(optax.scale_by_learning_rate(sched)),
                        stax.kahan_summation())
  params = {"w": jnp.ones((3, 2), jnp.bfloat16), "s": jnp.ones((), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, p.dtype), params)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, **{NONFINITE_OK: jnp.array(True)})
  zeros = jax.tree.map(jnp.zeros_like, grads)
  _, kept = jax.jit(lambda g, s, p: tx.update(g, s, p, **{NONFINITE_OK: jnp.array(False)}))(
      zeros, state, params)
  assert int(kept[0].count) == 1 and int(kept[1].count) == 1
  for x, y in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_zero_policy_lives_in_the_guard():
  from stax.optimizers import stam as stam_module
  assert stam_module.zero_nonfinite is stax.zero_nonfinite
  tx = stax.nonfinite_guard(optax.sgd(1.0), "zero")
  params = {"w": jnp.ones(3)}
  u, _ = tx.update({"w": jnp.array([1.0, jnp.nan, -jnp.inf])}, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(u["w"]), [-1.0, 0.0, 0.0])


def test_default_adamw_step_updates_the_state_in_place():
  """Compiled with params and state donated, the default (guarded) stax.adamw step needs no
  temporary array of a parameter's size (the lax.cond guard copied every moment: 2.4-3x the
  step at 16M parameters on CPU)."""
  params = {f"w{i}": jnp.ones((128, 96 + i)) for i in range(3)}
  tx = stax.adamw(1e-3)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params),
                                                        params).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 128 * 96 * 4


@pytest.mark.parametrize("muon", ["momentum", "gradient", "off"])
def test_oadamw_guard_is_gated_and_copies_no_moment(muon):
  """stax.oadamw's chain is gate-aware through its partition (the guard is built with
  gated=True, which refuses any other), so its compiled step copies none of the StableAdamW
  moments (a select of the state made XLA copy every one of them each step). The Muon trace of
  a matrix may still be copied: XLA recomputes that cheap sum into Newton–Schulz's readers."""
  params = {"w": jnp.ones((64, 48)), "b": jnp.ones((48,)), "c": jnp.ones((16, 8, 3, 3)),
            "v": jnp.ones((32, 64))}
  hlo = _compiled_step_hlo(stax.oadamw(1e-3, muon=muon), params)
  entry = hlo[hlo.index("ENTRY"):]
  copied = [line.strip()[:140] for line in entry.splitlines()
            if re.search(r"= f32\[\d+(,\d+)+\]\S* copy\(%s_", line) and "trace" not in line]
  assert not copied, copied


def _compiled_step_hlo(tx, params) -> str:
  """The optimised HLO of ``tx``'s step on ``params`` (jitted, parameters and state donated)."""

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params),
                                                    params).compile().as_text()


def _leaf_kernel_selects(tx, shape):
  """``(elementwise, scalar)``: the ``select`` instructions of ``shape`` and of a scalar inside
  the compiled kernels whose result has the leaf's shape (one leaf ``w`` of ``shape``)."""
  hlo = _compiled_step_hlo(tx, {"w": jnp.ones(shape)})
  dims = ",".join(map(str, shape))
  full = scalar = 0
  for block in re.findall(r"\n(%fused[^\n]*\{\n.*?\n\})", hlo, re.S):
    root = [line for line in block.splitlines() if "ROOT" in line][0]
    if not re.search(rf"ROOT \S+ = f32\[{dims}\]", root):
      continue
    full += len(re.findall(rf"= (?:f32|pred)\[{dims}\]\S* select\(", block))
    scalar += len(re.findall(r"= \w+\[\] select\(", block))
  return full, scalar


@pytest.mark.parametrize("name", ["adamw", "stable_adamw", "stam", "trace"])
def test_the_gate_costs_one_select_per_array_a_leaf_writes(name):
  """On a skipped step each exact moment (and Muon's trace) is selected back in the loop that
  would have updated it, and the guard zeroes the update: with the gate, the kernels of a
  leaf's shape hold exactly one elementwise select per array they write and no select of a
  scalar. (As EMA coefficients (0, 1) and a zeroed gradient the gate took three selects per
  moment, two of them scalars: 3,560 more HLO instructions in GPT-2 small's step and 0.4 s of
  its first compile.)"""
  factory, arrays = {
      "adamw": (lambda nf: stax.adamw(1e-3, nonfinite=nf), 3),          # m, v, the update
      "stable_adamw": (lambda nf: stax.stable_adamw(1e-3, nonfinite=nf), 3),
      "stam": (lambda nf: stax.stam(1e-3, nonfinite=nf), 3),
      "trace": (lambda nf: stax.nonfinite_guard(stax.gated_chain(stax.saturating_trace(0.9)),
                                                nf), 2),                # trace, the update
  }[name]
  shape = (64, 96)
  gated, ungated = (_leaf_kernel_selects(factory(nf), shape) for nf in ("skip", "ignore"))
  assert gated[1] == ungated[1], (gated, ungated)
  assert gated[0] - ungated[0] == arrays, (gated, ungated)


# the optimizers whose own statistics' pass gives the guard its probes
_PROBING = {
    "stam": lambda nf: stax.stam(1e-2, nonfinite=nf),
    "stam_snr": lambda nf: stax.stam(1e-2, beta1_signal="snr", nonfinite=nf),
    "stam_lite": lambda nf: stax.stam_lite(1e-2, nonfinite=nf),
    "stam_lite_snr": lambda nf: stax.stam_lite(1e-2, beta1_signal="snr", nonfinite=nf),
    "stable_adamw": lambda nf: stax.stable_adamw(1e-2, weight_decay=1e-2, nonfinite=nf),
}


def _probe_params():
  # a tiled tensor (numerics.tiled_means), two small ones stepped as a group, one alone
  return {"big": jnp.linspace(-1.0, 1.0, 128 * 96).reshape(128, 96),
          "b0": jnp.full((96,), 0.5), "b1": jnp.full((96,), -0.25),
          "odd": jnp.full((5, 7), 2.0)}


@pytest.mark.parametrize("name", list(_PROBING))
def test_stam_rules_give_the_guard_its_probes(name):
  """STAM's and STAMLite's β1 rules, and StableAdamW's RMS clip, read every raw gradient for
  their statistics, and the guard's gate takes its finiteness probes from that pass (a
  DeferredGate): with the guard the compiled step reads each gradient in as many kernels as
  without it (the guard's own check was one pass more: fails on stop 41's code for STAM, on
  stop 43's for StableAdamW)."""
  params = _probe_params()

  def reads(tx):
    hlo = _compiled_step_hlo(tx, params)
    entry = hlo[hlo.index("ENTRY"):]
    return len([line for line in entry.splitlines()
                if "%g__big__" in line and "parameter(" not in line])

  guarded, bare = reads(_PROBING[name]("skip")), reads(_PROBING[name]("ignore"))
  assert guarded == bare, (guarded, bare)


@pytest.mark.parametrize("name", list(_PROBING))
def test_probing_steps_copy_no_moment(name):
  """A donated step rewrites each moment in place: the compiled step copies no state array,
  on tensors whose statistics' tiles leave a tail (2,048 elements: narrower tiles; 1,659: the
  last loop) and on small vectors, grouped and alone. The statistics' reads of a tail each
  formed one statistic, so the tail of v that StableAdamW's RMS reads fed no probe, XLA could
  not order that read before v's in-place update and copied v whole (fails on stop 44's code
  for stable_adamw); on a small vector XLA splits the pass into a reduction of g (the probe)
  and one of g and v (the ratio), and StableAdamW copied every such v each step, GPT-2 small's
  98 (fails on stop 54's code)."""
  params = {"tail": jnp.full((320, 416), 0.5), "rest": jnp.full((331, 401), -0.25),
            "b0": jnp.full((96,), 0.5), "b1": jnp.full((96,), -0.25), "lone": jnp.ones((40,))}
  hlo = _compiled_step_hlo(_PROBING[name]("skip"), params)
  entry = hlo[hlo.index("\nENTRY"):]
  copied = re.findall(r"= (f32\[\d+(?:,\d+)*\])\S* copy\(%s_\S*_(?:mu|nu)_", entry)
  assert not copied, copied
  # (STAM's and STAMLite's per-leaf rule vectors, one float per leaf, may be copied: 5 here)


@pytest.mark.parametrize("name", list(_PROBING))
@pytest.mark.parametrize("leaf", ["big", "b1", "odd"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf], ids=["nan", "inf", "-inf"])
def test_stam_probes_catch_every_nonfinite_gradient(name, leaf, bad):
  """Wherever the non-finite entry is (a tiled tensor, a grouped small one, one alone), the
  probes from the rule's pass make the guard skip the step: parameters and every state leaf
  bit for bit, the skip counted; the next good step moves them again."""
  tx = _PROBING[name]("skip")
  params = _probe_params()
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  grads = lambda t: jax.tree.map(lambda x: jnp.cos(x * (t + 1.0)), params)  # noqa: E731
  p, s = step(params, tx.init(params), grads(0))
  g = grads(1)
  g[leaf] = g[leaf].reshape(-1).at[7].set(bad).reshape(g[leaf].shape)
  p2, s2 = step(p, s, g)
  for x, y in zip(jax.tree.leaves((p2, s2.inner_state)), jax.tree.leaves((p, s.inner_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(s2.nonfinite_count) == 1
  p3, _ = step(p2, s2, grads(2))
  assert all(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(p3), jax.tree.leaves(p2)))


@pytest.mark.parametrize("nu_dtype", [None, jnp.bfloat16])
def test_stable_adamw_early_rms_equals_the_rms_of_the_cores_new_v(nu_dtype):
  """StableAdamW's RMS formed before the core (from the stored v, the new v written inside its
  statistics' pass, so the check's probe rides along) gives the parameters and state bit for
  bit of the RMS read from the core's new v after it, over 14 steps with huge and non-finite
  gradients; a bfloat16 v (the RMS then reads the core's v) runs the same way."""
  from stax.transforms import guards as G
  params = _probe_params()

  def chain(deferred):
    core = stax.scale_by_stable_adam(0.9, 0.99, 1e-6, weight_decay=1e-2, nu_dtype=nu_dtype)
    tx = G.gated_chain(core, G.gate_state(optax.scale_by_learning_rate(1e-2)))
    return G.nonfinite_guard(G.deferred_gate(tx) if deferred else tx, "skip", gated=True)

  def run(tx):
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    p, s = params, tx.init(params)
    for t in range(14):
      g = jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) * (1e3 if t % 4 == 0 else 1.0), params)
      if t in (5, 9):
        g["big"] = g["big"].at[3, 3].set(jnp.nan if t == 5 else jnp.inf)
      if t == 7:
        g["odd"] = g["odd"].at[1, 1].set(3e19)     # beyond the saturation bound 2**63
      p, s = step(p, s, g)
    return p, s

  (pd, sd), (pl, sl) = run(chain(True)), run(chain(False))
  assert int(sd.nonfinite_count) == int(sl.nonfinite_count) == 2
  for x, y in zip(jax.tree.leaves((pd, sd)), jax.tree.leaves((pl, sl))):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_deferred_gate_takes_only_the_guards_own_unread_gradients():
  """A DeferredGate takes an offered probe only for the very arrays the guard was given, not
  yet offered, and only before it is read; what nobody offered it checks itself."""
  from stax.transforms.guards import DeferredGate
  g = {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}
  gate = DeferredGate(g)
  assert not gate.offer([jnp.ones(3)], jnp.float32(0.0))       # a copy, not the guard's array
  assert gate.offer([g["a"], None], jnp.float32(0.0))
  assert not gate.offer([g["a"]], jnp.float32(0.0))             # already offered
  assert not bool(gate.value())                                 # b checked by the gate itself
  assert not gate.offer([g["b"]], jnp.float32(0.0))             # read: too late
  gate = DeferredGate(g)
  assert gate.offer([g["a"], g["b"]], jnp.float32(0.0))         # the offer's word is taken
  assert bool(gate.value())
  with pytest.raises(ValueError, match="not gate-aware"):
    stax.transforms.guards.deferred_gate(optax.sgd(1e-2))       # it must keep its own state
