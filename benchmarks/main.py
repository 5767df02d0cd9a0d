"""The main job: training quality, step time and state memory of every optimizer, one command.

``python -m benchmarks.main`` (``bash scripts/bench.sh``) runs the quick comparison (under 5
minutes on a 2-core CPU; more when the machine is shared) on data that ships with packages or
this repository, shows progress bars, prints a summary table and writes ``results.json`` and
PNG plots into a new untracked folder ``runs/<UTC time>/`` (``--out`` names another). Only
``--update-results`` copies them into the tracked ``benchmarks/results/`` and regenerates the
README's results section. Nothing is downloaded.

Quick mode (default):
  * digits (300 steps): every optimizer (stax modes, baselines, the seeds' own packages), JAX
    and torch, learning rate swept over the fixed grid {3e-3, 1e-2, 3e-2}, one seed (the first
    recorded run used {1e-3, 3e-3, 1e-2}, and nearly every optimizer chose the grid's top
    point, so the grid moved up; the grid a run used is saved in its JSON);
  * speed and state memory at 1M and 16M parameters (the optax-vs-torch AdamW gap at 16M runs
    with ``--full`` or ``--update-results``, or when asked with ``--investigate``);
  * mnist and shakespeare run only when named with ``--task`` (about 3 minutes each on an idle
    2-core CPU): mnist (200 steps, every optimizer, JAX and torch, grid {3e-3, 1e-2}) and
    shakespeare (150 steps, batch 16 × 64 characters: the baselines and each stax optimizer's
    default mode, JAX only, one learning rate 3e-3). ``--task digits,mnist,shakespeare`` is
    the earlier quick run (about 10 minutes).
``--full`` (76 minutes measured on an idle 2-core CPU, speed included; torch on every
core): 3 seeds, every optimizer (faithful modes, seeds' packages, torch) on every task, 600/400/300 steps
(the char-LM evaluated every 50), and 128M in the speed benchmark's step memory. Each
learning-rate sweep starts at {1e-3, 3e-3, 1e-2} and extends along ``LADDER`` (1e-4 … 1e-1)
while its best point is at an edge of the rates tried, so the chosen rate is interior unless
the ladder ends (flagged ``lr_at_edge``). Each optimizer's validation loss at the training
seconds of ``optax.adamw`` is also recorded (equal wall-clock; an optimizer that finished
sooner reports its final loss, one still running is cut mid-schedule); the README shows it for
the char-LM, whose runs last long enough for it to mean something.
``--task``, ``--optimizer`` (comma-separated substrings of the names) and ``--device``
(``cpu``; ``gpu`` runs the JAX side on a GPU, torch stays on CPU) select.

The learning rate of each optimizer is the point with the lowest final validation loss
(seed 0); further seeds rerun that learning rate. "Time to target" is the wall-clock (compile
and evaluation excluded) and step count at which the validation loss first reaches 1.1× the
final validation loss of tuned ``optax.adamw`` on that task.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"   # tracked: refreshed only with --update-results
RUNS = ROOT / "runs"                         # untracked (.gitignore): one folder per run
README = ROOT / "README.md"                  # its results section, with --update-results

QUICK = {
    "digits": dict(steps=300, lrs=(3e-3, 1e-2, 3e-2), torch=True, faithful=True),
    # not in the default quick run (its 5-minute budget): only when named with --task
    "mnist": dict(steps=200, lrs=(3e-3, 1e-2), torch=True, faithful=True, default=False),
    "shakespeare": dict(steps=150, lrs=(3e-3,), torch=False, faithful=False, default=False),
}
# --full: every optimizer on every task; each sweep starts at 3 points and extends along
# LADDER while its best is at an edge (quality.sweep). Steps are what one full run affords on
# a 2-core CPU: 4,580 s measured with the speed part (a char-LM step ~80-95 ms in JAX, ~75 ms
# in torch with 2 threads; 23 optimizers x ~5.5 runs per task).
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
FULL = {
    "digits": dict(steps=600, lrs=(1e-3, 3e-3, 1e-2), ladder=LADDER, torch=True, faithful=True),
    "mnist": dict(steps=400, lrs=(1e-3, 3e-3, 1e-2), ladder=LADDER, torch=True, faithful=True),
    "shakespeare": dict(steps=300, eval_every=50, lrs=(1e-3, 3e-3, 1e-2), ladder=LADDER,
                        torch=True, faithful=True),
}
TARGET_FACTOR = 1.1


def parse_args(argv=None):
  ap = argparse.ArgumentParser(
      prog="python -m benchmarks.main",
      description="stax benchmark: quality, speed and memory (the main job, "
                  "`bash scripts/bench.sh`). The quick default (digits; speed at 1M and 16M) "
                  "takes under 5 minutes on a 2-core CPU.",
      epilog="Output: results.json and PNG plots in a new untracked folder runs/<UTC time>/ "
             "(printed at the end), or in --out. Tracked files (benchmarks/results/, README) "
             "change only with --update-results.")
  ap.add_argument("--full", action="store_true",
                  help="3 seeds, adaptive lr sweeps, every task, longer runs, 128M step memory")
  ap.add_argument("--task", default="",
                  help="comma-separated: digits,mnist,shakespeare (quick default: digits; "
                       "mnist and shakespeare add about 3 minutes each)")
  ap.add_argument("--optimizer", default="", help="comma-separated name substrings")
  ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                  help="JAX platform (torch always runs on CPU here)")
  ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
  ap.add_argument("--steps", type=int, default=None, help="override steps on every task")
  ap.add_argument("--lrs", default="", help="override the lr grid, e.g. 1e-3,3e-3")
  ap.add_argument("--sizes", default="", help="speed sizes, e.g. 1M,16M (default by mode)")
  ap.add_argument("--speed-steps", type=int, default=None)
  ap.add_argument("--no-speed", action="store_true")
  ap.add_argument("--step-memory", default=None, metavar="SIZE",
                  help="peak memory of one step at SIZE from XLA's buffer assignment (default: "
                       "128M with --update-results or --full, else off; 'off' to skip)")
  ap.add_argument("--no-quality", action="store_true")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--investigate", action=argparse.BooleanOptionalAction, default=None,
                  help="time the optax-vs-torch AdamW gap at 16M (default: with --full or "
                       "--update-results; about 20 s)")
  ap.add_argument("--torch-threads", type=int, default=None,
                  help="torch intra-op threads (default 1, with --full every core: on a shared "
                       "2-core CPU, 2 threads made small torch steps 5-15x slower from "
                       "oversubscription; on an idle one 2 threads run the CNN's step in 14 ms "
                       "against 25 and the char-LM's in 73 against 117, and JAX uses every core)")
  ap.add_argument("--out", default=None,
                  help="output folder (default: a new untracked runs/<UTC time>/)")
  ap.add_argument("--update-results", action="store_true",
                  help="also copy the JSON and plots into the tracked benchmarks/results/ and "
                       "regenerate README's results section (without it no tracked file is "
                       "written)")
  ap.add_argument("--no-plots", action="store_true")
  ap.add_argument("--quiet", action="store_true", help="no progress bars")
  ap.add_argument("--reuse-cpu-temporaries", action="store_true",
                  help="call stax.reuse_cpu_temporaries() first: glibc keeps freed memory, so "
                       "no step's temporaries page-fault in every call (torch's too), at the "
                       "price of one malloc arena, which slows steps without large "
                       "temporaries (benchmarks/cpu_allocation.py; recorded under machine)")
  ap.add_argument("--huge-page-malloc", action="store_true",
                  help="run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (stax.HUGE_PAGE_MALLOC; "
                       "the benchmark restarts itself with it): glibc backs the blocks it maps "
                       "with transparent huge pages, so a step's temporaries fault in 2 MiB at "
                       "a time (torch's too); no effect where glibc < 2.35 or huge pages are "
                       "off (recorded under machine)")
  args = ap.parse_args(argv)
  if args.torch_threads is None:
    args.torch_threads = (os.cpu_count() or 1) if args.full else 1
  if args.step_memory is None:
    args.step_memory = "128M" if (args.update_results or args.full) else None
  elif args.step_memory == "off":
    args.step_memory = None
  return args


def machine_description(device: str) -> dict:
  import jax
  import numpy as np
  import optax
  cpu = platform.processor() or ""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "jax_devices": [str(d) for d in jax.devices()], "device": device}
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  try:
    info["load_avg_start"] = os.getloadavg()
  except OSError:
    pass
  return info


def _nan_to_none(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _nan_to_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_nan_to_none(v) for v in x]
  return x


def save(results: dict, out: pathlib.Path):
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / "results.json.tmp"
  tmp.write_text(json.dumps(_nan_to_none(results), indent=1))
  tmp.replace(out / "results.json")


def _bar(total, desc, quiet):
  if quiet:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def run_quality(args, optimizers, cfgs, results, out, log):
  import numpy as np

  from benchmarks import quality as Q
  from benchmarks import tasks as T

  n_seeds = args.seeds or (3 if args.full else 1)
  task_names = [t for t in (args.task.split(",") if args.task else
                            [t for t in T.TASKS if cfgs[t].get("default", True)]) if t]
  for tname in task_names:
    t_task = time.time()
    cfg = dict(cfgs[tname])
    if args.steps:
      cfg["steps"] = args.steps
    if args.lrs:
      cfg["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    try:
      task = T.make_task(tname, quick=not args.full)
    except FileNotFoundError as e:
      log(f"[{tname}] skipped: {e}")
      results["skipped"].append({"task": tname, "reason": str(e)})
      continue
    if "eval_every" in cfg:
      task.eval_every = cfg["eval_every"]
    k = task.eval_every
    steps = max(k, cfg["steps"] // k * k)
    opts = [o for o in optimizers
            if (cfg["torch"] and not args.no_torch or o.framework == "jax")
            and (cfg["faithful"] or (o.mode != "faithful" and o.family != "seed"))]
    import jax
    params0 = jax.tree.map(np.asarray, task.init(0))
    results["tasks"][tname] = {"description": task.description, "n_params": T.n_params(params0),
                               "steps": steps, "batch_size": task.batch_size,
                               "eval_every": k, "lrs": list(cfg["lrs"]),
                               "ladder": list(cfg.get("ladder", ())), "seeds": n_seeds,
                               "metric": task.metric_name, "clip_global_norm": Q.CLIP,
                               "schedule": "linear warm-up 5% + cosine to 10% of peak"}
    total = len(opts) * (len(cfg["lrs"]) + n_seeds - 1)
    bar = _bar(total, f"{tname:11s}", args.quiet)
    for opt in opts:
      runs, err = [], None
      runner = None
      try:
        if opt.framework == "jax":
          runner = Q.JaxRunner(task, opt, steps)
          state_bytes = runner.state_bytes(jax.tree.map(jax.numpy.asarray, params0))
        def run_lr(lr):
          if bar is not None:
            bar.set_postfix_str(f"{opt.name} lr={lr:g}")
          r = runner.run(lr, 0) if runner else Q.run_torch(task, opt, lr, 0, steps)
          runs.append(r)
          if bar is not None:
            if len(runs) > len(cfg["lrs"]):
              bar.total += 1
            bar.update(1)
          return r

        _, best, at_edge = Q.sweep(run_lr, cfg["lrs"], cfg.get("ladder", ()))
        best_lr = best["lr"]
        seeds = [best]
        for s in range(1, n_seeds):
          if bar is not None:
            bar.set_postfix_str(f"{opt.name} seed={s}")
          r = runner.run(best_lr, s) if runner else Q.run_torch(task, opt, best_lr, s, steps)
          runs.append(r)
          seeds.append(r)
          if bar is not None:
            bar.update(1)
        if runner is None:
          state_bytes = best.get("state_bytes")
      except Exception as e:  # noqa: BLE001 - record and go on
        err = f"{type(e).__name__}: {e}"[:500]
        log(f"[{tname}] {opt.name}: {err}")
        if bar is not None:
          bar.update(max(0, len(cfg["lrs"]) + n_seeds - 1 - len(runs)))
        results["quality"].extend(runs)
        results["summary"].append({"task": tname, "optimizer": opt.name, "error": err,
                                   "framework": opt.framework, "family": opt.family,
                                   "mode": opt.mode})
        continue
      results["quality"].extend(runs)
      finals = [Q.final(r) for r in seeds]
      vl = np.array([f["val_loss"] for f in finals], float)
      vm = np.array([f["val_metric"] for f in finals], float)
      results["summary"].append({
          "task": tname, "optimizer": opt.name, "framework": opt.framework,
          "family": opt.family, "mode": opt.mode, "note": opt.note, "best_lr": best_lr,
          "sweep": {f"{r['lr']:g}": Q.final(r)["val_loss"] for r in runs if r["seed"] == 0},
          "lr_at_edge": bool(at_edge),
          "n_seeds": len(seeds), "val_loss_mean": float(np.mean(vl)),
          "val_loss_std": float(np.std(vl)), "val_metric_mean": float(np.mean(vm)),
          "val_metric_std": float(np.std(vm)), "metric": task.metric_name,
          "train_s_mean": float(np.mean([r["wall_s"][-1] if r["wall_s"] else math.nan
                                         for r in seeds])),
          "compile_s": float(best["compile_s"]),
          "state_bytes": state_bytes,
          "state_bytes_per_param": (state_bytes / results["tasks"][tname]["n_params"]
                                    if state_bytes is not None else None),
          "diverged_seeds": int(sum(r["diverged"] for r in seeds)), "error": None})
      save(results, out)
    if bar is not None:
      bar.close()
    _targets(results, tname)
    _equal_time(results, tname)
    results["timings_s"][tname] = time.time() - t_task
    save(results, out)


def _targets(results, tname):
  """Time/steps to reach TARGET_FACTOR × tuned optax.adamw's final val loss (per seed, mean)."""
  import numpy as np

  from benchmarks import quality as Q
  rows = [s for s in results["summary"] if s["task"] == tname and not s.get("error")]
  ref = [s for s in rows if s["optimizer"] == "optax.adamw"]
  if ref and ref[0]["val_loss_mean"] is not None and math.isfinite(ref[0]["val_loss_mean"]):
    base = ref[0]["val_loss_mean"]
  else:
    finite = [s["val_loss_mean"] for s in rows if math.isfinite(s["val_loss_mean"])]
    base = min(finite) if finite else math.nan
  target = TARGET_FACTOR * base
  results["tasks"][tname]["target_val_loss"] = target
  for s in rows:
    runs = [r for r in results["quality"] if r["task"] == tname and r["optimizer"] ==
            s["optimizer"] and r["lr"] == s["best_lr"]]
    hits = [Q.time_to_target(r, target) for r in runs]
    ok = [h for h in hits if h[0] is not None]
    s["target_reached"] = f"{len(ok)}/{len(hits)}"
    s["steps_to_target"] = float(np.mean([h[0] for h in ok])) if ok else None
    s["time_to_target_s"] = float(np.mean([h[1] for h in ok])) if ok else None


def _equal_time(results, tname):
  """Each optimizer's val loss at optax.adamw's training seconds (seed means; see quality)."""
  import numpy as np

  from benchmarks import quality as Q
  rows = [s for s in results["summary"] if s["task"] == tname and not s.get("error")]
  ref = next((s for s in rows if s["optimizer"] == "optax.adamw"), None)
  if ref is None or not math.isfinite(ref.get("train_s_mean", math.nan)):
    return
  t = ref["train_s_mean"]
  results["tasks"][tname]["equal_time_s"] = t
  for s in rows:
    runs = [r for r in results["quality"] if r["task"] == tname and r["optimizer"] ==
            s["optimizer"] and r["lr"] == s["best_lr"]]
    at = [Q.loss_at_time(r, t) for r in runs]
    vals = [a[0] for a in at if a[0] is not None]
    s["val_loss_at_equal_time"] = float(np.mean(vals)) if len(vals) == len(at) and at else None
    s["finished_by_equal_time"] = bool(at) and all(a[1] for a in at)


def run_speed_part(args, optimizers, results, out, log):
  from benchmarks import speed as S
  sizes = [s for s in (args.sizes.split(",") if args.sizes else
                       ["1M", "16M"]) if s]
  steps = args.speed_steps or (10 if args.full else 3)
  opts = [o for o in optimizers if not (args.no_torch and o.framework == "torch")]
  t_speed = time.time()
  bar = _bar(len(sizes) * len(opts), "speed      ", args.quiet)
  results["speed"] = S.run_speed(sizes, opts, steps=steps, progress=bar, log=log)
  if bar is not None:
    bar.close()
  results["speed_config"] = {"sizes": {s: S.n_params_of(s) for s in sizes}, "timed_steps": steps,
                             "warmup_steps": 2, "donated": True,
                             "interleaved_max_params": S.INTERLEAVE_MAX_PARAMS,
                             "torch_interleaved": True}
  if any(o.name.startswith("stax.scao") for o in opts) and "16M" in sizes:
    log("timing stax.scao's phases at 16M (warm-up, preconditioned, refresh)...")
    results["speed_phases"] = S.scao_phases("16M", log=log)
  if args.step_memory:
    log(f"step memory at {args.step_memory} (XLA buffer assignment, two schedulers)...")
    results["step_memory"] = S.step_memory(args.step_memory, log=log)
  results["timings_s"]["speed"] = time.time() - t_speed
  save(results, out)
  investigate = (args.investigate if args.investigate is not None
                 else bool(args.full or args.update_results))
  if investigate:
    flags = (S.INVESTIGATION_FLAGS if args.full else
             {k: v for k, v in S.INVESTIGATION_FLAGS.items() if k != "fast_math"})
    if not args.quiet:
      log(f"investigating the optax-vs-torch AdamW gap at 16M ({len(flags)} XLA flag sets)...")
    t_inv = time.time()
    results["speed_investigation"] = S.investigate("16M", steps=steps, flags=flags, log=log)
    results["timings_s"]["investigation"] = time.time() - t_inv
    save(results, out)


def summary_table(results) -> str:
  lines = []
  for tname, t in results["tasks"].items():
    lines.append("")
    lines.append(f"== {tname}: {t['description']} — {t['n_params']:,} params, {t['steps']} "
                 f"steps, lrs {t['lrs']}, seeds {t['seeds']}, target val loss "
                 f"{t.get('target_val_loss', float('nan')):.4f}")
    lines.append(f"{'optimizer':34s} {'lr':>7s} {'val loss':>15s} {'val acc':>15s} "
                 f"{'to target':>16s} {'train s':>8s} {'state B/p':>9s}")
    rows = [s for s in results["summary"] if s["task"] == tname]
    rows.sort(key=lambda s: (s.get("error") is not None,
                             s.get("val_loss_mean") if s.get("val_loss_mean") is not None
                             and math.isfinite(s.get("val_loss_mean")) else math.inf))
    for s in rows:
      if s.get("error"):
        lines.append(f"{s['optimizer']:34s} ERROR {s['error'][:80]}")
        continue
      pm = lambda m, sd: (f"{m:.4f}±{sd:.4f}" if s["n_seeds"] > 1 else f"{m:.4f}")
      tt = (f"{s['steps_to_target']:.0f} st/{s['time_to_target_s']:.1f}s"
            if s.get("time_to_target_s") is not None else "—")
      sb = s.get("state_bytes_per_param")
      lines.append(f"{s['optimizer']:34s} {s['best_lr']:7.0e} "
                   f"{pm(s['val_loss_mean'], s['val_loss_std']):>15s} "
                   f"{pm(s['val_metric_mean'], s['val_metric_std']):>15s} {tt:>16s} "
                   f"{s['train_s_mean']:8.2f} {sb if sb is None else f'{sb:.3f}':>9}")
  if results.get("speed"):
    lines.append("")
    lines.append("== speed: one donated step (median), state bytes per parameter")
    sizes = list(dict.fromkeys(r["size"] for r in results["speed"]))
    hdr = f"{'optimizer':34s}" + "".join(f" {s + ' ms':>10s} {'×adamw':>7s}" for s in sizes) + \
        f" {'B/param':>8s}"
    lines.append(hdr)
    names = list(dict.fromkeys(r["optimizer"] for r in results["speed"]))
    for n in names:
      row = f"{n:34s}"
      bpp = None
      for s in sizes:
        r = next((r for r in results["speed"] if r["optimizer"] == n and r["size"] == s), None)
        if r is None or r.get("error"):
          row += f" {'err':>10s} {'':>7s}"
          continue
        ratio = r.get("vs_optax_adamw")
        row += f" {r['step_ms']:10.2f} {ratio if ratio is None else f'{ratio:.2f}':>7}"
        bpp = r.get("state_bytes_per_param")
      row += f" {bpp if bpp is None else f'{bpp:.3f}':>8}"
      lines.append(row)
  if results.get("speed_investigation"):
    lines.append("")
    lines.append("== AdamW at 16M: what closes the gap to torch's fused AdamW on CPU")
    for r in results["speed_investigation"]:
      fl = f" [XLA_FLAGS {r['xla_flags']}]" if r.get("framework") == "jax" else ""
      lines.append(f"{r['variant'] + fl:78s} {r['step_ms']:9.2f} ms (min {r['step_ms_min']:.2f})")
  return "\n".join(lines)


def run_dir(out: str | None, now: _dt.datetime) -> pathlib.Path:
  """The folder a run writes into: ``out`` if given, else a new ``RUNS/<UTC time>``.

  Args:
    out: the ``--out`` argument, or ``None``.
    now: the run's start time (UTC); names the folder.

  Returns:
    The folder (created).
  """
  if out:
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path
  base = RUNS / now.strftime("%Y%m%dT%H%M%SZ")
  path, i = base, 1
  while True:
    try:
      path.mkdir(parents=True)
      return path
    except FileExistsError:
      i += 1
      path = base.with_name(f"{base.name}-{i}")


QUALITY_KEYS = ("tasks", "quality", "summary", "skipped")


def carry_quality(results: dict, old: dict, results_dir: pathlib.Path) -> dict:
  """A run without quality (``--no-quality``) keeps the tracked quality tables it would erase.

  Returns ``results`` with ``old``'s tasks, runs, summary rows and task plots (those still in
  ``results_dir``), and ``quality_run`` naming the run they came from (its start, mode, argv,
  wall time and machine), so the README can say which run each table is from.
  """
  merged = dict(results)
  for k in QUALITY_KEYS:
    merged[k] = old.get(k, [] if k != "tasks" else {})
  # a run that carried them over already names their run; otherwise ``old`` is that run
  merged["quality_run"] = old.get("quality_run") or dict(
      {k: old.get(k) for k in ("started", "mode", "argv", "wall_s", "machine")},
      timings_s={t: v for t, v in (old.get("timings_s") or {}).items() if t in merged["tasks"]})
  own = set(results.get("plots") or [])
  carried = [p for p in (old.get("plots") or []) if p not in own and (results_dir / p).exists()
             and (p == "quality_frontier.png" or any(p.startswith(f"{t}_")
                                                     for t in merged["tasks"]))]
  merged["plots"] = [*(results.get("plots") or []), *carried]
  return merged


def publish(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """Copies a run's JSON and plots into ``RESULTS`` and regenerates ``README``'s results section.

  Only ``--update-results`` calls this: it is the one path by which the main job writes
  tracked files. A run without quality results (``--no-quality``) keeps the tracked quality
  tables (:func:`carry_quality`), so refreshing the speed tables does not erase a full run's.

  Args:
    results: the run's results (``plots`` names the PNG files in ``out``).
    out: the run's folder.

  Returns:
    The files written.
  """
  import shutil

  from benchmarks import make_readme
  RESULTS.mkdir(parents=True, exist_ok=True)
  written = []
  tracked = RESULTS / "results.json"
  old = None
  if not results.get("summary") and tracked.exists():
    try:
      old = json.loads(tracked.read_text())
    except json.JSONDecodeError:
      old = None
  merged = carry_quality(results, old, RESULTS) if old and old.get("summary") else None
  for name in ["results.json", *(results.get("plots") or [])]:
    src, dst = out / name, RESULTS / name
    if name == "results.json" and merged is not None:
      dst.write_text(json.dumps(_nan_to_none(merged), indent=1))
    elif src.resolve() != dst.resolve():
      shutil.copyfile(src, dst)
    written.append(dst)
  if make_readme.update_file(README, json.loads((RESULTS / "results.json").read_text()),
                             RESULTS.resolve()):
    written.append(README)
  return written


_HUGE_PAGE_RESTART = "STAX_BENCH_HUGE_PAGE_RESTARTED"


def main(argv=None):
  args = parse_args(argv)
  if args.huge_page_malloc and not os.environ.get(_HUGE_PAGE_RESTART):
    import stax   # glibc reads its tunables at start-up: restart with them (once)
    if not stax.huge_page_malloc_active():
      env = dict(stax.huge_page_malloc_env(), **{_HUGE_PAGE_RESTART: "1"})
      rest = sys.argv[1:] if argv is None else list(argv)
      os.execve(sys.executable, [sys.executable, "-m", "benchmarks.main", *rest], env)
  os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
  reused = None
  if args.reuse_cpu_temporaries:   # before JAX's first computation (it raises after)
    import stax
    reused = stax.reuse_cpu_temporaries()
  now = _dt.datetime.now(_dt.timezone.utc)
  out = run_dir(args.out, now)
  t_start = time.time()
  try:
    import torch
    torch.set_num_threads(args.torch_threads)
  except ImportError:
    pass
  import warnings
  warnings.filterwarnings("ignore")

  from benchmarks import optimizers as O
  log = (lambda m: print(m, file=sys.stderr, flush=True))
  optimizers = O.select(O.all_optimizers(torch=not args.no_torch),
                        [args.optimizer] if args.optimizer else [])
  results = {"schema": 1, "mode": "full" if args.full else "quick",
             "started": now.isoformat(timespec="seconds"),
             "machine": machine_description(args.device), "argv": sys.argv[1:] if argv is None
             else list(argv), "optimizers": [{"name": o.name, "framework": o.framework,
                                              "family": o.family, "mode": o.mode,
                                              "note": o.note} for o in optimizers],
             "tasks": {}, "quality": [], "summary": [], "speed": [], "skipped": [],
             "timings_s": {}}   # wall seconds of each part (task, speed, investigation)
  if reused is not None:
    results["machine"]["reuse_cpu_temporaries"] = reused
  import stax
  results["machine"]["huge_page_malloc"] = stax.huge_page_malloc_active()
  log(f"stax benchmark ({results['mode']}): {len(optimizers)} optimizers, "
      f"{results['machine']['cpu']} × {results['machine']['cores']}, load "
      f"{results['machine'].get('load_avg_start')}")
  if not args.no_quality:
    run_quality(args, optimizers, FULL if args.full else QUICK, results, out, log)
  if not args.no_speed:
    run_speed_part(args, optimizers, results, out, log)
  results["wall_s"] = time.time() - t_start
  try:
    results["machine"]["load_avg_end"] = os.getloadavg()
  except OSError:
    pass
  save(results, out)
  if not args.no_plots:
    try:
      from benchmarks import plots
      results["plots"] = plots.make_all(results, out)
      save(results, out)
    except Exception as e:  # noqa: BLE001
      log(f"plots failed: {type(e).__name__}: {e}")
  print(summary_table(results))
  print(f"\nwall time {results['wall_s']:.0f}s; results in {out / 'results.json'}")
  if args.update_results:
    written = publish(results, out)
    print("updated tracked files: " + ", ".join(os.path.relpath(w, ROOT) for w in written))
  else:
    print(f"run folder: {out} (untracked; --update-results refreshes benchmarks/results/ "
          "and README)")
  return results


if __name__ == "__main__":
  main()
