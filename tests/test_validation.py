"""Bad input fails early and clearly.

Each test pins one class of bad input: the error type, the argument (or leaf path) it names and
the allowed range, raised at construction (or at ``init`` for leaf properties), never an
internal error from inside a trace.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import stax
import torch_bridge
from tests import contract_problems as cp
from tests.registry import ALL, CONTRACT_MODULE_ORDER, MAIN
from tests.test_contract import _grad_step, _run_grads

IDS = [e.name for e in ALL]
NEAR_ONE = 1 - 1e-9  # passes `< 1` in float64, rounds to 1.0 in float32


def _with_leaf(params, leaf, module="layer_1", name="zz_extra"):
  """``params`` plus ``leaf`` at ``[module][name]`` (last in flatten order for layer_1)."""
  out = jax.tree.map(lambda x: x, params)
  out[module] = dict(out[module], **{name: leaf})
  return out


# ------------------------------------------------------------------------ 1. empty leaves
@pytest.mark.parametrize("entry", MAIN, ids=[e.name for e in MAIN])
def test_empty_leaf_gets_noop_update(entry):
  """A (0, 5) leaf gets an empty update and changes nothing else (past SCAO's warm-up). The
  reference is the contract's own jitted step on the same gradients (its compilation is shared
  with tests/test_contract.py through the session's compilation cache)."""
  params, _, _ = cp.quadratic()
  empty = jnp.zeros((0, 5), jnp.float32)
  tx = entry.make()
  p_ref, _ = _run_grads(tx, params, 40)
  step = jax.jit(_grad_step(tx))
  p_emp = _with_leaf(params, empty)
  s = tx.init(p_emp)
  for i in range(40):
    p_emp, s = step(p_emp, s, _with_leaf(cp.random_grads(params, i), empty))
  assert p_emp["layer_1"]["zz_extra"].shape == (0, 5)
  del p_emp["layer_1"]["zz_extra"]
  assert cp.max_abs_diff(p_ref, p_emp) <= 1e-6


@pytest.mark.parametrize("make", [
    lambda: stax.scale_by_orthogonalization(),
    lambda: stax.scale_by_orthogonalization(mode="per_leaf"),
    lambda: stax.scale_by_orthogonalization(update_proj_gap=2),
    lambda: stax.oadamw(1e-2, labels="muon")], ids=["stacked", "per_leaf", "gap", "oadamw"])
def test_an_empty_matrix_is_no_newton_schulz_input(make):
  """An empty leaf under Muon (``scale_by_orthogonalization``, or OAdamW with the leaf labelled
  ``"muon"``) raised "zero-size array to reduction operation max" in the normalisation (sweep
  N); now its update is empty and the other leaves step as without it."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  with_empty = dict(params, z=jnp.zeros((0, 3)))
  tx = make()
  want, _ = tx.update(grads, tx.init(params), params)
  got, _ = tx.update(dict(grads, z=jnp.zeros((0, 3))), tx.init(with_empty), with_empty)
  assert got["z"].shape == (0, 3)
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


def test_empty_leaf_torch_scao():
  """torch_bridge.SCAO with an empty parameter steps through the preconditioned phase."""
  torch.manual_seed(0)
  w = torch.nn.Parameter(torch.randn(8, 6))
  empty = torch.nn.Parameter(torch.zeros(0, 5))
  opt = torch_bridge.SCAO([w, empty], lr=1e-2, warmup_steps=2, precond_freq=1, k_min=1,
                          k_max=2, blend_steps=1)
  w0 = w.detach().clone()
  for _ in range(5):
    w.grad = torch.randn(8, 6)
    empty.grad = torch.zeros(0, 5)
    opt.step()
  assert empty.shape == (0, 5)
  assert torch.isfinite(w).all() and not torch.equal(w, w0)


# ------------------------------------------------------- 2. integer, bool, complex leaves
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_integer_and_bool_params_refused_at_init(entry):
  params, _, _ = cp.quadratic()
  for dtype in (jnp.int32, jnp.uint8, jnp.bool_):
    bad = _with_leaf(params, jnp.zeros((3,), dtype), name="counter")
    for nonfinite in ("skip", "ignore"):  # "ignore" returns the bare transform: still checked
      tx = entry.make(nonfinite=nonfinite)
      with pytest.raises(TypeError, match=r"params\['layer_1'\]\['counter'\].*floating"):
        tx.init(bad)


@pytest.mark.parametrize("entry", [e for e in ALL if e.factory not in (stax.adamw, stax.stac)],
                         ids=[e.name for e in ALL if e.factory not in (stax.adamw, stax.stac)])
def test_complex_params_refused_at_init(entry):
  params, _, _ = cp.quadratic()
  bad = _with_leaf(params, jnp.ones((4, 4), jnp.complex64), name="phase")
  with pytest.raises(TypeError, match=r"params\['layer_1'\]\['phase'\] is complex"):
    entry.make().init(bad)


def test_stac_trunk_refuses_complex_params():
  params, _, _ = cp.quadratic()
  bad = _with_leaf(params, jnp.ones((4, 4), jnp.complex64), module="embed", name="phase")
  tx = stax.stac(1e-2, last_n_modules=1, module_order=CONTRACT_MODULE_ORDER)
  with pytest.raises(TypeError, match=r"sign trunk.*params\['embed'\]\['phase'\] is complex"):
    tx.init(bad)
  with pytest.raises(TypeError, match=r"params\['w'\] is complex.*mu_dtype"):
    stax.adamw(mu_dtype=jnp.float32).init({"w": jnp.ones(3, jnp.complex64)})


def _complex_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  c = lambda k, s: (jax.random.normal(k, s) + 1j * jax.random.normal(jax.random.fold_in(k, 1), s)
                    ).astype(jnp.complex64)
  return {"layer_0": {"kernel": c(k1, (6, 4))}, "layer_1": {"kernel": c(k2, (4, 3))}}


@pytest.mark.parametrize("name,make,ref", [
    ("adamw", lambda: stax.adamw(1e-2, weight_decay=1e-2),
     lambda: optax.adamw(1e-2, weight_decay=1e-2)),
    ("adamw_ignore", lambda: stax.adamw(1e-2, weight_decay=1e-2, nonfinite="ignore"),
     lambda: optax.adamw(1e-2, weight_decay=1e-2)),
    ("stac_cap", lambda: stax.stac(1e-2, last_n_modules=2, module_order=["layer_0", "layer_1"]),
     lambda: optax.adamw(1e-2, weight_decay=0.0)),
])
def test_complex_params_match_optax_adamw(name, make, ref):
  """adamw and STAC's AdamW cap update complex leaves as optax.adamw (imaginary part too)."""
  params = _complex_params()
  tx, rx = make(), ref()
  s1, s2 = tx.init(params), rx.init(params)
  p1 = p2 = params
  with warnings.catch_warnings():
    warnings.simplefilter("error", np.exceptions.ComplexWarning)
    for i in range(20):
      g = jax.tree.map(lambda x: x * (1.0 + 0.1 * i) + 0.3j, p1)
      u1, s1 = tx.update(g, s1, p1)
      u2, s2 = rx.update(jax.tree.map(lambda x: x * (1.0 + 0.1 * i) + 0.3j, p2), s2, p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert cp.max_abs_diff(jax.tree.map(jnp.imag, p1), jax.tree.map(jnp.imag, params)) > 1e-2
    np.testing.assert_allclose(np.asarray(p1["layer_0"]["kernel"]),
                               np.asarray(p2["layer_0"]["kernel"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p1["layer_1"]["kernel"]),
                               np.asarray(p2["layer_1"]["kernel"]), rtol=1e-5, atol=1e-6)
    if name != "adamw_ignore":  # the guard sees a NaN imaginary part and skips the step
      bad = jax.tree.map(lambda x: x.at[0, 0].set(1.0 + 1j * np.nan), p1)
      u, _ = tx.update(bad, s1, p1)
      assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))
  assert not stax.all_finite({"w": jnp.array([1.0 + 1j * np.inf], jnp.complex64)})


# --------------------------------------------------------- 3. gradient tree vs params tree
@pytest.mark.parametrize("entry", ALL, ids=IDS)
def test_gradient_tree_mismatch_raises(entry):
  params, _, _ = cp.quadratic()
  tx = entry.make()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  renamed = dict(grads, layer_1={"bias": grads["layer_1"]["bias"],
                                 "other": grads["layer_1"]["kernel"]})
  with pytest.raises(ValueError, match="gradient tree does not match the params tree"):
    tx.update(renamed, state, params)
  reshaped = dict(grads, head={"kernel": jnp.ones((4, 8))})
  with pytest.raises(ValueError, match=r"gradient tree does not match.*\['head'\]\['kernel'\]"):
    tx.update(reshaped, state, params)


@pytest.mark.parametrize("mode", ["lowrank", "scao-0.2.4"])
def test_scao_gradient_tree_mismatch_without_params(mode):
  params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
  tx = stax.scao(weight_decay=0.0, warmup_steps=1, precond_freq=1, k_min=1, k_max=2, mode=mode)
  state = tx.init(params)
  grads = {"w": jnp.ones((8, 4)), "c": jnp.ones((3, 3))}
  with pytest.raises(ValueError, match="gradient tree does not match the params tree"):
    tx.update(grads, state)
  with pytest.raises(ValueError, match="gradient tree does not match the params tree"):
    jax.jit(tx.update)(grads, state)
  tx = stax.scao(weight_decay=0.0, mode=mode, nonfinite="ignore")
  with pytest.raises(ValueError, match="gradient tree does not match the params tree"):
    tx.update(grads, tx.init(params))


# ----------------------------------------------------------------- 4. oadamw implementation
@pytest.mark.parametrize("implementation", ["bogus", "triton", "XLA"])
def test_oadamw_implementation_checked_at_construction(implementation):
  with pytest.raises(ValueError, match=r"`implementation` must be one of \(None, 'xla', "
                                       r"'pallas', 'gram'\)"):
    stax.oadamw(implementation=implementation)
  for ok in (None, "xla", "pallas", "gram"):
    stax.oadamw(implementation=ok)


# ------------------------------------------------------------------------ 5. turbo v_bits
@pytest.mark.parametrize("v_bits", [4.0, True, np.float32(4), "4"])
def test_turbo_adam_v_bits_must_be_int(v_bits):
  with pytest.raises(TypeError, match="`v_bits` must be an int"):
    stax.turbo_adam(v_bits=v_bits)
  stax.turbo_adam(v_bits=np.int64(4))
  with pytest.raises(ValueError, match="`v_bits` must be one of"):
    stax.turbo_adam(v_bits=5)


# -------------------------------------------------------------------- 6. dtype arguments
DTYPE_ARGS = [
    (stax.adamw, "mu_dtype"), (stax.adamw, "nu_dtype"), (stax.stac, "mu_dtype"),
    (stax.stac, "nu_dtype"),
    (stax.stable_adamw, "mu_dtype"), (stax.stable_adamw, "nu_dtype"),
    (stax.stable_adamw, "kahan_dtype"),
    (stax.oadamw, "mu_dtype"), (stax.oadamw, "nu_dtype"), (stax.oadamw, "kahan_dtype"),
    (stax.stam, "mu_dtype"), (stax.stam, "nu_dtype"), (stax.stam_lite, "state_dtype"),
    (stax.scale_by_stable_adam, "mu_dtype"), (stax.kahan_summation, "comp_dtype"),
]


@pytest.mark.parametrize("factory,name", DTYPE_ARGS,
                         ids=[f"{f.__name__}-{n}" for f, n in DTYPE_ARGS])
def test_dtype_arguments(factory, name):
  with pytest.raises(TypeError, match=f"`{name}` must be None or a floating dtype"):
    factory(**{name: "notadtype"})
  with pytest.raises(TypeError, match=f"`{name}`"):
    factory(**{name: 4.0})
  with pytest.raises(ValueError, match=f"`{name}` must be None or a floating dtype.*int8"):
    factory(**{name: jnp.int8})
  factory(**{name: jnp.bfloat16})
  factory(**{name: "float32"})


# ------------------------------------------------------- 7. stam_lite names moment_decay
def test_stam_lite_names_moment_decay():
  with pytest.raises(ValueError, match="`moment_decay` must be in") as e:
    stax.stam_lite(moment_decay=NEAR_ONE)
  assert "b2" not in str(e.value)
  with pytest.raises(ValueError, match="`moment_decay`"):
    stax.stam_lite(moment_decay=1.0)


# ---------------------------------------------------- 8. decays that round to 1 in float32
DECAYS = [
    (stax.adamw, {}, "b1"), (stax.adamw, {}, "b2"), (stax.stac, {}, "b1"),
    (stax.stac, {}, "b2"), (stax.scao, {}, "b1"), (stax.scao, {}, "b2"), (stax.scao, {}, "rho"),
    (stax.turbo_adam, {}, "b1"), (stax.turbo_adam, {}, "b2"),
    (stax.oadamw, {}, "muon_momentum"), (stax.stam, {}, "b1_base"), (stax.stam, {}, "b2"),
    (stax.stam, {}, "tau_decay"), (stax.stam_lite, {}, "b1_base"),
    (stax.scale_by_adam, {}, "b1"), (stax.scale_by_stable_adam, {}, "b2"),
]


@pytest.mark.parametrize("factory,extra,name", DECAYS,
                         ids=[f"{f.__name__}-{n}" for f, _, n in DECAYS])
def test_decay_rounding_to_one_in_float32_is_refused(factory, extra, name):
  with pytest.raises(ValueError, match=f"`{name}` must be in .*float32.*rounds to 1.0"):
    factory(**extra, **{name: NEAR_ONE})
  factory(**extra, **{name: 1 - 2 ** -24})  # the largest float32 below 1 is fine


@pytest.mark.parametrize("factory", [stax.stable_adamw, stax.oadamw])
@pytest.mark.parametrize("index", [0, 1])
def test_betas_pair_rounding_to_one(factory, index):
  betas = [0.9, 0.99]
  betas[index] = NEAR_ONE
  with pytest.raises(ValueError, match=rf"`betas\[{index}\].*float32"):
    factory(betas=tuple(betas))


# ---------------------------------------------------------------------- 9. bool arguments
BOOLS = [
    (stax.adamw, {}, "nesterov"),
    (stax.stac, {}, "exclude_1d_from_weight_decay"),
    (stax.stac, {}, "exclude_bias_from_weight_decay"),
    (stax.stable_adamw, {}, "decouple_lr"), (stax.stable_adamw, {}, "kahan_sum"),
    (stax.oadamw, {}, "muon_nesterov"), (stax.oadamw, {}, "decouple_lr"),
    (stax.oadamw, {}, "kahan_sum"),
    (stax.turbo_adam, {}, "compress_m"), (stax.turbo_adam, {}, "compress_v"),
    (stax.scale_by_stable_adam, {}, "clip"), (stax.scale_by_stable_adam, {}, "decouple_lr"),
    (stax.kahan_summation, {}, "enabled"),
    (stax.nonfinite_guard, {"inner": optax.identity()}, "gated"),
]


@pytest.mark.parametrize("factory,extra,name", BOOLS,
                         ids=[f"{f.__name__}-{n}" for f, _, n in BOOLS])
def test_bool_arguments_must_be_bools(factory, extra, name):
  for bad in ("False", 0, 1, 1.0):
    with pytest.raises(TypeError, match=f"`{name}` must be a bool"):
      factory(**extra, **{name: bad})
  kw = {name: np.bool_(False)}
  if name == "decouple_lr":
    kw["max_lr"] = None
  factory(**extra, **kw)


DROPIN_BOOLS = [
    (torch_bridge.STAC, "exclude_bias_from_weight_decay"),
    (torch_bridge.STAC, "exclude_1d_from_weight_decay"), (torch_bridge.STAC, "maximize"),
    (torch_bridge.STAC, "error_if_nonfinite"), (torch_bridge.STAC, "foreach"),
    (torch_bridge.STAC, "amsgrad"),
    (torch_bridge.TurboAdam, "compress_m"), (torch_bridge.TurboAdam, "compress_v"),
    (torch_bridge.TurboAdam, "capturable"),
    (torch_bridge.OAdamW, "decouple_lr"), (torch_bridge.OAdamW, "kahan_sum"),
]


@pytest.mark.parametrize("cls,name", DROPIN_BOOLS,
                         ids=[f"{c.__name__}-{n}" for c, n in DROPIN_BOOLS])
def test_dropin_bool_arguments_must_be_bools(cls, name):
  model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
  with pytest.raises(TypeError, match=f"`{name}` must be a bool"):
    cls(model, **{name: "False"})
  cls(model, **{name: np.bool_(False)})


# ------------------------------------------------------------- 10. arguments with no effect
UNUSED = [
    (stax.stable_adamw, dict(max_lr=1e-2), "max_lr"),
    (stax.stable_adamw, dict(kahan_sum=False, kahan_dtype=jnp.float32), "kahan_dtype"),
    (stax.oadamw, dict(max_lr=1e-2), "max_lr"),
    (stax.oadamw, dict(kahan_sum=False, kahan_dtype=jnp.float32), "kahan_dtype"),
    (stax.oadamw, dict(muon="off", ns_steps=3), "ns_steps"),
    (stax.oadamw, dict(muon="off", dimension_numbers=stax.MatrixDimensionNumbers(1, 0)),
     "dimension_numbers"),
    (stax.oadamw, dict(muon="gradient", muon_momentum=0.9), "muon_momentum"),
    (stax.oadamw, dict(muon="gradient", muon_nesterov=False), "muon_nesterov"),
    (stax.oadamw, dict(shape_scale="none", rms=0.3), "rms"),
    (stax.oadamw, dict(labels=lambda p: jax.tree.map(lambda _: "adam", p), min_dim=8),
     "min_dim"),
    (stax.scao, dict(mode="scao-0.2.4", seed=3), "seed"),
    (stax.scao, dict(mode="lowrank", tau=2.0), "tau"),
    (stax.stac, dict(last_n_modules=1, last_n_ratio=0.5), "last_n_ratio"),
    (stax.stac, dict(last_n_modules=0, b1=0.8), "b1"),
    (stax.stac, dict(last_n_modules=0, sign_lr_scale=0.5), "sign_lr_scale"),
    (stax.stam, dict(beta1_signal="snr", fallback_threshold=10.0), "fallback_threshold"),
    (stax.turbo_adam, dict(compress_m=False, compress_v=False, v_bits=8), "v_bits"),
    (stax.turbo_adam, dict(compress_m=False, compress_v=False, seed=1), "seed"),
    (stax.turbo_adam, dict(compress_v=False, v_bits=8), "v_bits"),
    (stax.turbo_adam, dict(compress_m=False, m_block_size=16), "m_block_size"),
]


@pytest.mark.parametrize("factory,kwargs,name", UNUSED,
                         ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n) in enumerate(UNUSED)])
def test_arguments_without_effect_warn(factory, kwargs, name):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    factory(**kwargs)
  msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert [m for m in msgs if m.startswith(f"`{name}`=") and "no effect" in m], msgs
  assert len(msgs) == 1, msgs  # once per construction, only the argument that has no effect


def test_defaults_do_not_warn():
  model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", UserWarning)
    for entry in ALL:
      entry.make()
    for factory in (stax.adamw, stax.stac, stax.stable_adamw, stax.oadamw, stax.scao,
                    stax.stam, stax.stam_lite, stax.turbo_adam):
      factory()
    stax.scao(mode="scao-0.2.4")
    stax.oadamw(muon="off")
    stax.turbo_adam(compress_m=False, compress_v=False)
    torch_bridge.OAdamW(model, muon="off")
    torch_bridge.STAC(model, last_n_modules=0)
  user = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert user == [], user


# ------------------------------------------------------------------ 11. torch drop-in args
def _model():
  return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("cls", [torch_bridge.STAC, torch_bridge.SCAO, torch_bridge.OAdamW,
                                 torch_bridge.TurboAdam])
def test_dropin_betas(cls):
  with pytest.raises(TypeError, match="`betas` must be a pair"):
    cls(_model(), betas=None)
  with pytest.raises(TypeError, match="`betas` must be a pair"):
    cls(_model(), betas=0.9)
  with pytest.raises(ValueError, match="`betas` must be a pair.*1 value"):
    cls(_model(), betas=(0.9,))
  with pytest.raises(ValueError, match=r"`betas` must be a pair.*3 value"):
    cls(_model(), betas=(0.9, 0.99, 0.999))
  with pytest.raises(ValueError, match=r"`betas\[1\]` must be in \[0"):
    cls(_model(), betas=(0.9, 1.0))
  with pytest.raises(TypeError, match=r"`betas\[0\]` must be a number"):
    cls(_model(), betas=("0.9", 0.99))
  cls(_model(), betas=(torch.tensor(0.9), 0.99))  # 1-element tensors stand for their value


def test_dropin_tensor_arguments():
  with pytest.raises(ValueError, match=r"`v_bits` must be a number or a 1-element tensor.*\(2,\)"):
    torch_bridge.TurboAdam(_model(), v_bits=torch.tensor([4, 4]))
  torch_bridge.TurboAdam(_model(), v_bits=torch.tensor([4]))
  for cls in (torch_bridge.STAC, torch_bridge.STAM, torch_bridge.STAMLite, torch_bridge.SCAO,
              torch_bridge.OAdamW, torch_bridge.TurboAdam):
    with pytest.raises(ValueError, match="`lr` must be a number or a 1-element tensor"):
      cls(_model(), lr=torch.tensor([1e-3, 1e-3]))
    cls(_model(), lr=torch.tensor(1e-3))
  with pytest.raises(TypeError, match="`betas` must be a tuple of 2 values"):
    torch_bridge.Optimizer(_model().parameters(), stax.adamw, betas=None)



# ------------------------------------------------------------- 11. weight-decay masks
MASKED = [(stax.adamw, "mask"), (stax.stam, "mask"), (stax.stam_lite, "mask"),
          (stax.scao, "mask"), (stax.turbo_adam, "mask"),
          (stax.stable_adamw, "weight_decay_mask"), (stax.oadamw, "weight_decay_mask")]


@pytest.mark.parametrize("factory,name", MASKED, ids=[f.__name__ for f, _ in MASKED])
def test_a_mask_that_is_not_a_tree_of_bools_raises_naming_it(factory, name):
  """``mask=5`` or ``mask="all"`` had been taken as truthy by AdamW, STAM, STAMLite, SCAO and
  TurboAdam (as by ``optax.adamw``) and raised "Expected dict, got 5" inside StableAdamW's and
  OAdamW's ``update``; now ``TypeError`` at construction naming the argument. ``None``, a bool,
  a callable and a tree of bools still work, and the mask still selects the decaying leaves."""
  for bad in (5, "all", 0.5, jnp.ones(3, bool)):
    with pytest.raises(TypeError, match=f"`{name}` must be None, a callable"):
      factory(1e-2, **{name: bad})
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for mask in (None, True, {"w": True, "b": False}, lambda p: {"w": True, "b": False}):
    tx = factory(1e-2, weight_decay=0.5, **{name: mask})
    u, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(u["w"]).max()) > 0   # w decays with a zero gradient
    assert (float(jnp.abs(u["b"]).max()) > 0) == (mask in (None, True)), mask


@pytest.mark.parametrize("factory,name", MASKED, ids=[f.__name__ for f, _ in MASKED])
def test_a_mask_of_the_wrong_layout_raises_at_init_naming_it(factory, name):
  """A mask tree that is neither the params' layout nor a prefix of it had raised optax's bare
  "pytree structure error" inside ``update`` (AdamW, STAM, STAMLite, SCAO, TurboAdam), and a
  mask leaf that is not a bool (``"yes"``, ``0``) was taken as truthy; now both raise at
  ``init`` naming the argument (and the leaf's path). A prefix (a bool over a sub-tree) still
  works, as in ``optax.masked``, also from a callable."""
  params = {"l1": {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}, "head": {"w": jnp.ones((4, 2))}}
  for bad in ({"l1": True}, lambda p: {"l1": True}, {"l1": {"w": True}, "head": True}):
    with pytest.raises(ValueError, match=f"`{name}` must be a tree of bools laid out like"):
      factory(1e-2, weight_decay=0.1, **{name: bad}).init(params)
  with pytest.raises(TypeError, match=rf"`{name}` must hold bools; at \['l1'\]\['b'\] it holds int"):
    factory(1e-2, weight_decay=0.1,
            **{name: {"l1": {"w": True, "b": 0}, "head": True}}).init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for prefix in ({"l1": {"w": True, "b": False}, "head": False},
                 lambda p: {"l1": {"w": True, "b": False}, "head": False}):
    tx = factory(1e-2, weight_decay=0.5, **{name: prefix})
    u, _ = tx.update(zeros, tx.init(params), params)
    moved = {k: float(jnp.abs(v).max()) > 0 for k, v in
             zip(("head.w", "l1.b", "l1.w"), jax.tree.leaves(u))}
    assert moved == {"head.w": False, "l1.b": False, "l1.w": True}, moved


def test_oadamw_labels_are_checked_naming_the_argument():
  """``labels=5``, an unknown label (``"muonn"``) and a tree of another layout were accepted by
  ``stax.oadamw`` and failed at ``init`` with JAX's pytree error or optax's "Some parameters
  have no corresponding transformation", neither naming the argument (sweep N). Now a
  ``TypeError``/``ValueError`` naming ``labels`` (and the bad leaf's path), at construction
  where the value alone decides it. A full tree, a prefix (a label over a sub-tree) and a
  callable give the same groups."""
  params = {"l1": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)},
            "l2": {"kernel": jnp.ones((16, 8))}}
  for bad in (5, "muonn", jnp.ones(3)):
    with pytest.raises(TypeError, match="`labels` must be None, a callable"):
      stax.oadamw(1e-2, labels=bad)
  with pytest.raises(ValueError, match=r"`labels` must hold labels in \('muon', 'adam'\); "
                                       r"at \['l1'\]\['kernel'\] it holds str 'muonn'"):
    stax.oadamw(1e-2, labels={"l1": {"kernel": "muonn", "bias": "adam"}, "l2": "adam"})
  for bad in ({"l1": "muon"}, lambda p: {"l1": "muon"}):
    with pytest.raises(ValueError, match="`labels` must be a tree of labels laid out like"):
      stax.oadamw(1e-2, labels=bad).init(params)
  with pytest.raises(ValueError, match=r"at \['l2'\] it holds str 'Muon'"):
    stax.oadamw(1e-2, labels=lambda p: {"l1": "adam", "l2": "Muon"}).init(params)
  full = {"l1": {"kernel": "muon", "bias": "adam"}, "l2": {"kernel": "adam"}}
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  outs = []
  for labels in (full, {"l1": {"kernel": "muon", "bias": "adam"}, "l2": "adam"},
                 lambda p: full):
    tx = stax.oadamw(1e-2, labels=labels)
    outs.append(tx.update(grads, tx.init(params), params)[0])
  for o in outs[1:]:
    jax.tree.map(np.testing.assert_array_equal, outs[0], o)
  # the Muon leaf steps otherwise than with every leaf on Adam; the Adam leaves the same
  tx = stax.oadamw(1e-2, labels="adam")
  adam = tx.update(grads, tx.init(params), params)[0]
  assert float(jnp.max(jnp.abs(adam["l1"]["kernel"] - outs[0]["l1"]["kernel"]))) > 1e-3
  np.testing.assert_array_equal(adam["l2"]["kernel"], outs[0]["l2"]["kernel"])
  np.testing.assert_array_equal(adam["l1"]["bias"], outs[0]["l1"]["bias"])
