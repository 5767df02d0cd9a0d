"""The XLA:CPU floor programs of the speed benchmark (benchmarks/floors.py): each is the pass
structure it claims (XLA's byte count of the compiled program), and the compressed one is a
real 4-bit step (its codes decode to the moment it keeps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import floors as F
from benchmarks import speed as S


def _params(shapes):
  rng = np.random.default_rng(0)
  return {f"m{i}": {"w": rng.standard_normal(s).astype(np.float32) * 0.02}
          for i, s in enumerate(shapes)}


def _bytes_per_param(program, params, head="m0"):
  compiled, args = F._compiled_program(program, params, head)
  n = sum(x.size for x in jax.tree.leaves(params))
  return compiled.cost_analysis()["bytes accessed"] / n, compiled, args


@pytest.mark.parametrize("program,want", [
    ("adamw", 40.0),          # m, v, p passes: 12 + 12 + 16 (optax.adamw's own count)
    ("adamw+check", 44.0),    # + one read of g
    ("stam_lite", 28.0),      # m pass 12, p pass 12 (reads p, m'), g's statistics 4 (and the
                              # check's probe: no pass of its own)
    ("adamw+stats", 48.0),    # AdamW's 40, the statistics of (g, m) 8 (and the probe)
    ("adamw+check+stats", 52.0),  # + the check's own read of g
])
def test_floor_programs_move_the_bytes_of_their_passes(program, want):
  params = _params([(512, 256), (256, 512)])
  got, _, _ = _bytes_per_param(program, params)
  # + the partial sums: n/16 floats written and read per statistic (0.5 B/param), three at most
  assert want <= got <= want + 1.6, (program, got)


def test_adamw_program_bytes_equal_optax_adamw():
  import optax
  params = _params([(512, 256), (384, 128)])
  got, _, _ = _bytes_per_param("adamw", params)
  compiled, args, _ = S.prepare_jax(optax.adamw(1e-3), params)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert got == pytest.approx(compiled.cost_analysis()["bytes accessed"] / n, rel=1e-3)


def test_stac_program_signs_the_trunk_and_runs_adamw_on_the_head():
  params = _params([(64, 128), (128, 64)])
  compiled, args = F._compiled_program("stac", params, "m1")
  p0 = jax.tree.map(np.asarray, args[0])
  g = jax.tree.map(np.asarray, args[2])
  p1, s1 = compiled(*args)
  trunk = np.asarray(p1["m0"]["w"])
  np.testing.assert_allclose(trunk, p0["m0"]["w"] - F.LR * (np.sign(g["m0"]["w"])
                                                             + F.WD * p0["m0"]["w"]), rtol=1e-6)
  assert s1["m0"] is None and s1["m1"][0]["w"].shape == (128, 64)


def test_compressed_program_keeps_a_4bit_moment():
  """After one step from zero the codes and block scales decode to (1-β1)·g within one level,
  rounded stochastically as the codec rounds (both neighbours taken, unbiased: the mean error
  is a small fraction of a level), the factored v's row/column means are (1-β2)·mean(g²) and
  the step count, which seeds the rounding, is 1."""
  params = _params([(64, 128)])
  compiled, args = F._compiled_program("compressed", params, "m0")
  g = np.asarray(args[2]["m0"]["w"])
  _, (state, count) = compiled(*args)
  codes, scales, r, c = (np.asarray(x) for x in state["m0"]["w"])
  # the codec's stream: byte j holds code 2j in its low nibble and 2j + 1 in its high one
  k = np.stack([codes & 15, codes >> 4], axis=-1).reshape(64, 128).astype(np.float32) - 7.0
  m = (k.reshape(64, 4, 32) * (scales[..., None] / 7.0)).reshape(64, 128)
  want = (1 - F.B1) * g
  step = np.repeat(scales / 7.0, 32, axis=-1)
  err = (m - want) / step
  assert np.all(np.abs(err) < 1 + 1e-6)
  assert np.mean(err > 0.5) > 0.05 and np.mean(err < -0.5) > 0.05     # not nearest rounding
  assert abs(np.mean(err)) < 0.03, np.mean(err)
  np.testing.assert_allclose(scales, np.abs(want).reshape(64, 4, 32).max(-1), rtol=1e-6)
  np.testing.assert_allclose(r, (1 - F.B2) * np.mean(g * g, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(c, (1 - F.B2) * np.mean(g * g, axis=-2), rtol=1e-5)
  assert int(count) == 1


def test_every_benchmarked_target_has_a_floor_program():
  """Every optimizer with a speed target gets an XLA:CPU floor (SCAO has its phase table)."""
  missing = set(S.TARGETS) - set(F.FLOOR_PROGRAMS) - {"stax.scao"}
  assert not missing, missing
  assert F.FLOOR_PROGRAMS["optax.adamw"][0] == "adamw"


def test_time_floors_reports_ratios_to_optax_adamw_on_the_tiny_set():
  out = F.time_floors("tiny", ["stax.adamw", "stax.stam[seed]"], rounds=2, calls=1)
  assert set(out) == {"adamw", "adamw+check", "adamw+stats"}
  for rec in out.values():
    assert rec["step_ms"] > 0 and rec["vs_optax_adamw"] == pytest.approx(
        rec["step_ms"] / rec["optax_adamw_ms"])


def test_interleave_rounds_every_step_and_drops_one_that_fails():
  """speed.interleave: each contender is called `calls` times per round after a warm-up
  round, in the same rounds; one that raises is dropped (its entry is the error) and the others
  go on."""
  calls = []

  def ok(name):
    def f(p, s, g):
      calls.append(name)
      return p + 1, s
    return f

  def bad(p, s, g):
    raise RuntimeError("boom")

  runs = {"a": (ok("a"), [jnp.zeros(()), 0, 0]), "b": (bad, [0, 0, 0]),
          "c": (ok("c"), [jnp.zeros(()), 0, 0])}
  times = S.interleave(runs, rounds=3, calls=2)
  assert len(times["a"]) == len(times["c"]) == 6 and all(t >= 0 for t in times["a"])
  assert times["b"].startswith("RuntimeError: boom")
  assert calls == ["a", "a", "c", "c"] * 4
  assert float(runs["a"][1][0]) == 8.0      # outputs feed the next call


@pytest.mark.skipif(S.minor_faults() is None, reason="no getrusage on this platform")
def test_interleave_counts_each_calls_page_faults():
  """speed.interleave(faults=...): each timed call's minor page faults, per contender. A step
  that writes a freshly mapped 64 MiB block (as glibc maps XLA's temporaries above 32 MiB
  anew every call) faults in every page of it on every call; one that allocates nothing faults
  (almost) never. speed.page_fault_us prices a fault."""
  pages = (64 << 20) // 4096

  def fresh(p, s, g):   # page_fault_us's own probe: one fresh 64 MiB mapping, every page written
    S.page_fault_us(n_bytes=64 << 20, repeats=1)
    return p, s

  def idle(p, s, g):
    return p, s

  faults = {}
  times = S.interleave({"fresh": (fresh, [0, 0, 0]), "idle": (idle, [0, 0, 0])}, rounds=3,
                       calls=2, faults=faults)
  assert len(faults["fresh"]) == len(faults["idle"]) == len(times["fresh"]) == 6
  assert min(faults["fresh"]) >= pages, faults
  assert max(faults["idle"]) < 64, faults
  assert 0.01 < S.page_fault_us(n_bytes=32 << 20, repeats=2) < 1e3


def test_comparisons_come_from_one_loop():
  """speed.relative: against optax.adamw the ratio within the step's own loop; against a
  partner that ran in that loop (a target's baseline, a JAX seed) the in-loop ratio; else the
  ratio of medians. speed._partners picks them, JAX or torch."""
  import types
  jax_opt = lambda n: types.SimpleNamespace(name=n, framework="jax")
  by_name = {n: jax_opt(n) for n in ("optax.contrib.muon", "seed:stam_optimizer.stam")}
  by_name["seed:optimi.StableAdamW"] = types.SimpleNamespace(name="x", framework="torch")
  assert S._partners("stax.oadamw", by_name) == ["optax.contrib.muon"]
  assert S._partners("stax.stam[seed]", by_name) == ["seed:stam_optimizer.stam"]
  assert S._partners("stax.stable_adamw", by_name) == ["seed:optimi.StableAdamW"]  # torch too
  assert S._partners("stax.adamw", by_name) == []
  rec = {"optimizer": "stax.oadamw", "timing": "interleaved", "step_ms": 460.0,
         "vs_optax_adamw": 38.0, "vs_partner": {"optax.contrib.muon": 0.55}}
  muon = {"optimizer": "optax.contrib.muon", "timing": "interleaved", "step_ms": 877.0,
          "vs_optax_adamw": 41.6}
  adamw = {"optimizer": "optax.adamw", "timing": "interleaved", "step_ms": 14.0}
  torch_seed = {"optimizer": "seed:optimi.StableAdamW", "timing": "alone", "step_ms": 40.0}
  assert S.relative(rec, muon) == 0.55
  assert S.relative(rec, adamw) == 38.0
  assert S.relative(rec, torch_seed) == pytest.approx(460.0 / 40.0)


def test_torch_step_shares_the_interleaved_loop():
  """speed.torch_step: a torch optimizer's step in the shape of a prepared JAX step, so
  interleave times it beside JAX steps; each call is one real optimizer.step()."""
  torch = pytest.importorskip("torch")
  params = {"head": {"kernel": np.ones((4, 3), np.float32)}}
  (step, args), opt = S.torch_step(lambda m: torch.optim.SGD(m.parameters(), lr=0.5), params,
                                   ["head"])
  (p,) = [q for g in opt.param_groups for q in g["params"]]
  g = p.grad.clone()
  times = S.interleave({"torch": (step, args)}, rounds=2, calls=2)
  assert len(times["torch"]) == 4
  # one warm-up round + 2 rounds, 2 calls each: 6 SGD steps on the fixed gradient
  np.testing.assert_allclose(p.detach().numpy(), 1.0 - 6 * 0.5 * g.numpy(), rtol=1e-6)


def test_model_shapes_are_the_real_models():
  """ResNet-18's and GPT-2 small's parameter counts are torchvision's and Hugging Face's, and
  the nested tree keeps every leaf in module order."""
  from benchmarks import model_shapes as MS
  count = lambda shapes: sum(int(np.prod(s)) for s in shapes.values())
  resnet, gpt2 = MS.resnet18_shapes(), MS.gpt2_small_shapes()
  assert count(resnet) == 11_689_512 and count(gpt2) == 124_439_808
  tree, order = MS.nested(resnet)
  assert order[0] == "conv1" and order[-1] == "fc" and len(order) == len(tree)
  assert sum(len(v) for v in tree.values()) == len(resnet)
  assert tree["layer2.0.downsample.0"]["weight"] == (128, 64, 1, 1)


def test_the_compile_benchmark_times_resnet18_in_flax_layout():
  """``flax_layout`` gives torchvision's ResNet-18 the names and layouts a Flax ResNet has (conv
  ``kernel`` ``(kh, kw, in, out)``, the head ``(in, out)``, norm ``scale``), so stax's JAX
  defaults see its real matrices; the floor programs' Muon/SCAO matrix is stax's default view of
  each leaf. (Until stop 54 the compile benchmark passed torch's ``(out, in, kh, kw)`` in a JAX
  tree, which OAdamW, TurboAdam and the floors read as a Flax kernel ``kh·kw·in × out``.)"""
  from benchmarks import model_shapes as MS
  from stax import layout
  torch_shapes = MS.resnet18_shapes()
  flax = MS.flax_layout(torch_shapes)
  assert len(flax) == len(torch_shapes)
  assert flax["layer3.0.conv1.kernel"] == (3, 3, 128, 256)
  assert flax["layer2.0.downsample.0.kernel"] == (1, 1, 64, 128)
  assert flax["fc.kernel"] == (512, 1000) and flax["fc.bias"] == (1000,)
  assert flax["bn1.scale"] == (64,) and "bn1.weight" not in flax
  assert sorted(int(np.prod(s)) for s in flax.values()) == sorted(
      int(np.prod(s)) for s in torch_shapes.values())
  for name, shape in flax.items():
    dims = layout.default_dimension_numbers(tuple(name.split(".")), shape)
    if dims is None:
      assert len(shape) == 1, name
      continue
    assert layout.matrix_shape(shape, dims) == (1,) + F._matrix(shape), name


def test_compile_time_reports_each_stage_against_optax_adamw():
  """Each row is trace + lower + compile on abstract shapes, its ratio the one to optax.adamw's
  compile made beside it (each repeat paired with one), and STAC's sign trunk compiles fewer
  kernels than AdamW's three passes."""
  from benchmarks import compile_time
  res = compile_time.run(["resnet18"], repeats=1, names=["stax.stac"], log=lambda m: None)
  rows = res["models"]["resnet18"]["optimizers"]
  base, stac = rows["optax.adamw"], rows["stax.stac"]
  assert base["vs_optax_adamw"] == 1.0
  assert stac["total_s"] == pytest.approx(stac["trace_s"] + stac["lower_s"] + stac["compile_s"])
  assert stac["vs_optax_adamw"] == pytest.approx(stac["total_s"] / stac["optax_adamw_s"])
  assert stac["optax_adamw_s"] > 0 and stac["optax_adamw_s"] != base["total_s"]
  assert 0 < stac["distinct_kernels"] < base["distinct_kernels"]
  assert base["kernels_compiled_twice"] == 0 <= stac["kernels_compiled_twice"] < 3


def test_kernels_compiled_twice_counts_bodies_equal_but_for_their_parameters_order():
  """Two fused computations that differ only in the numbering of their parameters are two
  distinct kernels and one of them compiled twice; a genuinely different body is not."""
  from benchmarks import speed

  def fusion(name, order, op="multiply"):
    a, b = order
    return (f"\n%{name} (p0: f32[8], p1: f32[]) -> f32[8] {{\n"
            f"  %x = f32[8]{{0}} parameter({a})\n  %s = f32[] parameter({b})\n"
            f"  %b = f32[8]{{0}} broadcast(%s), dimensions={{}}\n"
            f"  ROOT %r = f32[8]{{0}} {op}(%x, %b)\n}}\n")

  same = fusion("fused_computation", (0, 1)) + fusion("fused_computation.1", (0, 1))
  assert (speed.distinct_kernels(same), speed.kernels_compiled_twice(same)) == (1, 0)
  swapped = fusion("fused_computation", (0, 1)) + fusion("fused_computation.1", (1, 0))
  assert (speed.distinct_kernels(swapped), speed.kernels_compiled_twice(swapped)) == (2, 1)
  other = fusion("fused_computation", (0, 1)) + fusion("fused_computation.1", (1, 0), "add")
  assert (speed.distinct_kernels(other), speed.kernels_compiled_twice(other)) == (2, 0)


_GUARDED_PROGRAMS = sorted(({p for p, _ in F.COMPILE_FLOOR_PROGRAMS.values()}
                            | {"adamw+check+stats"}) - {"adamw"})


@pytest.mark.parametrize("program", _GUARDED_PROGRAMS)
def test_a_floor_program_skips_a_non_finite_step_as_the_steps_do(program):
  """Every floor program with the non-finite check leaves the parameters and every state array
  exactly as they were when one gradient entry is NaN and another inf, as the optimizers it
  bounds do (``nonfinite_guard``): the skip is a select, not a coefficient of 0 (0·NaN is NaN),
  so the floor is timed with the operations a correct step needs. After a finite step the
  parameters move."""
  params = {"m0": {"w": np.full((64, 128), 0.02, np.float32)},     # a matrix (compressed, NS)
            "m1": {"w": np.full((128, 64), -0.01, np.float32),
                   "b": np.full((64,), 0.01, np.float32)}}
  compiled, args = F._compiled_program(program, params, "m1")
  before = [np.array(x) for x in jax.tree.leaves(args[:2])]
  g = jax.tree.map(np.array, args[2])
  g["m0"]["w"][3, 5] = np.nan
  g["m1"]["w"][7, 1] = np.inf
  out = compiled(args[0], args[1], jax.tree.map(jnp.asarray, g))
  after = [np.asarray(x) for x in jax.tree.leaves(out)]
  assert len(after) == len(before)
  for b, a in zip(before, after):
    np.testing.assert_array_equal(a, b)
  compiled, args = F._compiled_program(program, params, "m1")
  p0 = [np.array(x) for x in jax.tree.leaves(args[0])]
  p1 = jax.tree.leaves(compiled(*args)[0])
  assert all(np.all(np.isfinite(np.asarray(b))) for b in p1)
  assert any(not np.array_equal(np.asarray(b), a) for a, b in zip(p0, p1))
