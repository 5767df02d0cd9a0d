"""The GPU checks: the Pallas kernels compiled for the GPU against their references, and the
optimizers' step times at their memory bound (``python -m benchmarks.gpu --out DIR``).

Run on a machine with an NVIDIA GPU (the project's device tool); every section writes
``gpu.json`` in ``--out`` as soon as it finishes, so a run cut short keeps what it measured.
Sections, in order (``--only`` picks some):

* ``machine``: device, jax version, copy bandwidth (a donated ``x * c`` over 1 GiB, read +
  write counted) and the float32 / bfloat16 matmul rates (8192², best of 5);
* ``newton_schulz``: the ``"pallas"`` kernel (Triton lowering), ``"gram"`` and ``"xla"`` on
  square and 4:1 batches (Muon's 5 quintic steps): time, achieved TFLOP/s (the standard
  iteration's ``4·m²·n + 2·m³`` flops per step, ``m ≤ n``), the distance to the ``"xla"`` result
  and each result's orthogonality (the spread of its singular values);
* ``turbo_step``: TurboAdam's faithful codec through ``implementation="pallas"`` against
  ``"xla"`` (20 steps on one leaf, gradient scales cycling ×200): code mismatches, the largest
  update difference, and the step time and achieved GB/s of each (and ``implementation=None``,
  which is what a GPU user gets);
* ``speed``: every JAX optimizer of the speed benchmark (``benchmarks.optimizers``) at
  ``--size`` (default 128M): step ms, ratio to optax.adamw, ideal bytes per parameter and the
  fraction of the measured copy bandwidth it reaches (the roofline of :mod:`benchmarks.speed`).

``--table benchmarks/results/gpu.json`` prints the README's tables of a saved run.
``--small`` shrinks every problem so the script can be checked on a CPU (Pallas then runs in
interpret mode; the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

import numpy as np

SECTIONS = ("machine", "newton_schulz", "turbo_step", "speed", "barrier")
MUON = ((3.4445, -4.7750, 2.0315),) * 5


def _timed(fn, *args, repeats: int = 10):
  """(median ms, min ms) of ``fn(*args)`` after one warm-up call (the compile)."""
  import jax
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts), 1e3 * min(ts)


def machine(small: bool) -> dict:
  import jax
  import jax.numpy as jnp
  from benchmarks import speed as S
  n = 1024 if small else 8192
  out = {"jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()],
         "device_kind": jax.devices()[0].device_kind,
         "copy_gbs": S.copy_bandwidth_gbs((16 if small else 1024) << 20)}
  for name, dt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
    _, mn = _timed(jax.jit(lambda x: x @ x), a, repeats=5)
    out[f"matmul_tflops_{name}"] = 2 * n ** 3 / (mn * 1e-3) / 1e12
  return out


def _sv_spread(y) -> dict:
  """Singular values of each matrix in the batch: their min and max over the batch."""
  s = np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)
  return {"sv_min": float(s.min()), "sv_max": float(s.max())}


def newton_schulz(small: bool) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from stax.kernels.newton_schulz import newton_schulz as ns
  shapes = ([(2, 64, 64), (2, 64, 256)] if small else
            [(1, 1024, 1024), (1, 4096, 4096), (8, 1024, 4096), (1, 4096, 1024)])
  out = []
  for shape in shapes:
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
    m, n = sorted(shape[1:])
    flops = shape[0] * len(MUON) * (4 * m * m * n + 2 * m ** 3)
    ref = None
    for impl, kw in (("xla", {}), ("gram", {}), ("pallas", {"block": 64, "block_k": 32}),
                     ("pallas", {"block": 128, "block_k": 32})):
      rec = {"shape": list(shape), "implementation": impl, **kw}
      try:
        fn = jax.jit(lambda t, impl=impl, kw=kw: ns(t, MUON, implementation=impl, **kw))
        med, mn = _timed(fn, x, repeats=5 if small else 10)
        y = fn(x)
        rec.update(ms=med, ms_min=mn, tflops=flops / (mn * 1e-3) / 1e12, **_sv_spread(y))
        if ref is None:
          ref = y
        rel = jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)
        rec["rel_diff_vs_xla"] = float(rel)
      except Exception as e:  # noqa: BLE001 - record and go on
        rec["error"] = f"{type(e).__name__}: {e}"[:800]
      print(json.dumps(rec), flush=True)
      out.append(rec)
  return out


def _turbo_run(impl, shape, steps: int):
  import jax
  import jax.numpy as jnp
  import optax
  import stax
  tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1,
                       implementation=impl)
  p = {"w": jnp.zeros(shape, jnp.float32)}
  s = tx.init(p)
  key = jax.random.PRNGKey(3)

  @jax.jit
  def step(p, s, i):
    g = jax.random.normal(jax.random.fold_in(key, i), shape) * (0.01 + 100.0 * (i % 3 == 1))
    u, s = tx.update({"w": g}, s, p)
    return optax.apply_updates(p, u), s, u

  us = []
  for i in range(steps):
    p, s, u = step(p, s, jnp.int32(i))
    us.append(u["w"])
  return p, s, us, tx


def turbo_step(small: bool) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import optax
  shape = (8, 256) if small else (4096, 4096)
  out = []
  try:
    ref = _turbo_run("xla", shape, 20 if not small else 5)
  except Exception as e:  # noqa: BLE001
    return [{"error": f"xla: {type(e).__name__}: {e}"[:800]}]
  for impl in ("pallas", None):
    rec = {"shape": list(shape), "implementation": impl}
    try:
      got = _turbo_run(impl, shape, 20 if not small else 5)
      mism, total, by_field = 0, 0, {}
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref[1]),
                              jax.tree.leaves(got[1])):
        a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        k = int(np.sum(a != b))
        mism += k
        total += a.size
        if k:   # which state array parts (codes, scales, means, step scalars): the diagnosis
          by_field[jax.tree_util.keystr(path)] = k
      rec["state_mismatches"] = mism
      rec["state_elements"] = total
      rec["state_mismatches_by_field"] = by_field
      rec["max_update_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref[2], got[2]))
      rec["max_param_diff"] = float(jnp.max(jnp.abs(ref[0]["w"] - got[0]["w"])))
    except Exception as e:  # noqa: BLE001
      rec["error"] = f"{type(e).__name__}: {e}"[:800]
      traceback.print_exc()
    print(json.dumps(rec), flush=True)
    out.append(rec)
  # time one donated step of each implementation on a 16M-element leaf
  for impl in ("xla", "pallas"):
    rec = {"shape": list(shape), "implementation": impl, "timing": True}
    try:
      import stax
      tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1,
                           implementation=impl)
      p = {"w": jnp.zeros(shape, jnp.float32)}
      g = {"w": jax.random.normal(jax.random.PRNGKey(0), shape) * 1e-3}
      s = tx.init(p)

      def f(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
      fn = jax.jit(f, donate_argnums=(0, 1))
      p, s = fn(p, s, g)
      jax.block_until_ready((p, s))
      ts = []
      for _ in range(10):
        t0 = time.perf_counter()
        p, s = fn(p, s, g)
        jax.block_until_ready((p, s))
        ts.append(time.perf_counter() - t0)
      ms = 1e3 * statistics.median(ts)
      n = int(np.prod(shape))
      state_b = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s)) / n
      ideal = 12 + 2 * state_b
      rec.update(ms=ms, state_bytes_per_param=state_b, ideal_bytes_per_param=ideal,
                 achieved_gbs_ideal=ideal * n / (ms * 1e-3) / 1e9)
    except Exception as e:  # noqa: BLE001
      rec["error"] = f"{type(e).__name__}: {e}"[:800]
    print(json.dumps(rec), flush=True)
    out.append(rec)
  return out


def speed(small: bool, size: str, deadline: float, copy_gbs: float | None = None,
          tflops: float | None = None, patterns: str = "") -> list[dict]:
  import types
  import jax
  from benchmarks import optimizers as O
  from benchmarks import speed as S
  size = "tiny" if small else size
  opts = [o for o in O.all_optimizers(torch=False)
          if o.framework == "jax" and not o.name.startswith("seed:")]
  if patterns:  # the baseline always runs first
    opts = [opts[0]] + [o for o in O.select(opts[1:], [patterns])]
  params, order = S.make_params(size)
  n = S.n_params_of(size)
  task = types.SimpleNamespace(module_order=order, name=f"speed-{size}")
  recs, base_ms = [], None
  for o in opts:
    rec = {"size": size, "n_params": n, "optimizer": o.name, "framework": o.framework,
           "family": o.family, "mode": o.mode, "backend": jax.default_backend(), "error": None}
    if time.time() > deadline:
      rec["error"] = "skipped: time budget"
      recs.append(rec)
      continue
    try:
      tx = o.build(1e-3, task)
      rec["state_bytes"] = S.jax_state_bytes(tx, jax.tree.map(np.asarray, params))
      cost = {}
      med, mn, comp = S.time_jax(tx, params, steps=5 if small else 20, cost=cost)
      rec.update(step_ms=med, step_ms_min=mn, compile_s=comp, **cost)
      rec["state_bytes_per_param"] = rec["state_bytes"] / n
      if o.name == "optax.adamw":
        base_ms = med
      rec["vs_optax_adamw"] = med / base_ms if base_ms else None
    except Exception as e:  # noqa: BLE001 - one optimizer failing must not stop the run
      rec["error"] = f"{type(e).__name__}: {e}"[:500]
    print(json.dumps({k: rec.get(k) for k in ("optimizer", "step_ms", "vs_optax_adamw",
                                                "compile_s", "error")}), flush=True)
    recs.append(rec)
  S.roofline(recs, copy_gbs or S.copy_bandwidth_gbs(),
             1e3 * tflops if tflops else S.matmul_gflops())
  return recs


BARRIER_OPTIMIZERS = ("optax.adamw", "stax.adamw", "stax.stam[seed]", "stax.stam_lite[seed]",
                      "stax.stable_adamw")


def barrier(small: bool, size: str) -> list[dict]:
  """The CPU-tuned ``optimization_barrier`` of :func:`stax.numerics.independent` on and off:
  step ms and the number of fusions in the compiled step, for the optimizers that use it."""
  import types
  import jax.numpy as jnp
  from benchmarks import optimizers as O
  from benchmarks import speed as S
  from stax import numerics as num
  size = "tiny" if small else size
  params_np, order = S.make_params(size)
  task = types.SimpleNamespace(module_order=order, name=f"speed-{size}")
  opts = {o.name: o for o in O.all_optimizers(torch=False)}
  original = num.independent
  out = []
  for barrier_on in (True, False):
    num.independent = original if barrier_on else (
        lambda *xs: tuple(jnp.asarray(x) if isinstance(x, (int, float)) else x for x in xs))
    for name in BARRIER_OPTIMIZERS:
      rec = {"optimizer": name, "barrier": barrier_on, "size": size}
      try:
        tx = opts[name].build(1e-3, task)
        cost = {}
        med, mn, comp = S.time_jax(tx, params_np, steps=5 if small else 20, cost=cost)
        rec.update(ms=med, ms_min=mn, compile_s=comp, fusions=cost.get("fusions"))
      except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
      print(json.dumps(rec), flush=True)
      out.append(rec)
  num.independent = original
  return out


def table(res: dict) -> str:
  """Markdown tables of a saved ``gpu.json`` (the README's GPU section)."""
  m = res["machine"]
  lines = [f"{m['device_kind']}, jax {m['jax']}: copy bandwidth **{m['copy_gbs'] / 1e3:.2f} TB/s** "
           f"(donated `x * c` over 1 GiB), matmul 8192² **{m['matmul_tflops_f32']:.0f} TFLOP/s** "
           f"float32 inputs (XLA's default precision: TF32 products) and "
           f"**{m['matmul_tflops_bf16']:.0f}** bfloat16.", "",
           "Newton–Schulz, 5 quintic steps (Muon's coefficients), float32, jitted; TFLOP/s count "
           "the standard iteration's `5·(4m²n + 2m³)` per matrix (m ≤ n), so the Gram variant's "
           "figure is an effective rate; *rel. diff*: ‖y − y_xla‖/‖y_xla‖; *σ range*: the "
           "singular values of the result:", "",
           "| shape | implementation | ms (min) | TFLOP/s | rel. diff vs xla | σ range |",
           "|---|---|---:|---:|---:|---|"]
  for r in res["newton_schulz"]:
    name = r["implementation"] + (f" (tile {r['block']})" if "block" in r else "")
    if r.get("error"):
      lines.append(f"| {tuple(r['shape'])} | {name} | error: {r['error'][:80]} | | | |")
      continue
    lines.append(f"| {tuple(r['shape'])} | {name} | {r['ms_min']:.2f} | {r['tflops']:.0f} | "
                 f"{r['rel_diff_vs_xla']:.1e} | {r['sv_min']:.3g}–{r['sv_max']:.3g} |")
  lines += ["", "Every optimizer's donated, jitted step at 128M parameters (GPT-shaped, 135M "
            "float32; median of 20 steps); *ideal B/param*: read p and g, write p, read and "
            "write the state once; *× bound*: the step over those bytes at the copy bandwidth "
            "(or XLA's flops at the matmul rate, whichever is larger); *compile ×*: first "
            "compile over optax.adamw's:", "",
            "| optimizer | step ms | × optax.adamw | ideal B/param | XLA B/param | GB/s (XLA) "
            "| × bound | compile s | compile × |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  base = {r["run"]: r for r in res["speed"] if r["optimizer"] == "optax.adamw"}
  for r in res["speed"]:
    if r.get("error"):
      lines.append(f"| {r['optimizer']} | {r['error'][:60]} | | | | | | | |")
      continue
    tag = " (run 2)" if r["run"] == 2 else ""
    lines.append(f"| {r['optimizer']}{tag} | {r['step_ms']:.2f} | "
                 f"{r['step_ms'] / base[r['run']]['step_ms']:.2f} | "
                 f"{r['ideal_bytes_per_param']:.1f} | {r.get('xla_bytes_per_param', float('nan')):.1f} | "
                 f"{r.get('achieved_gbs', float('nan')):.0f} | {r['vs_bound']:.1f} | "
                 f"{r['compile_s']:.1f} | {r['compile_s'] / base[r['run']]['compile_s']:.1f} |")
  if res.get("barrier"):
    rows = {}
    for r in res["barrier"]:
      rows.setdefault(r["optimizer"], {})[r["barrier"]] = r
    lines += ["", "`stax.numerics.independent`'s `optimization_barrier` (a CPU tuning) on and off, "
              "128M parameters, one run (run 3; optax.adamw itself moved 2.95 → 3.74 ms between "
              "the two passes, so compare the ratios):", "",
              "| optimizer | barrier: ms | × optax.adamw | fusions | no barrier: ms | "
              "× optax.adamw | fusions |", "|---|---:|---:|---:|---:|---:|---:|"]
    base = rows.get("optax.adamw", {})
    for name, by in rows.items():
      if any(by[k].get("error") for k in by):
        continue
      cells = []
      for k in (True, False):
        cells += [f"{by[k]['ms']:.2f}", f"{by[k]['ms'] / base[k]['ms']:.2f}",
                  str(by[k]["fusions"])]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--only", default=",".join(SECTIONS))
  ap.add_argument("--size", default="128M")
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--optimizer", default="",
                  help="speed section: comma-separated name substrings (optax.adamw always runs)")
  ap.add_argument("--budget-s", type=float, default=420.0,
                  help="the speed section starts no optimizer after this many seconds")
  ap.add_argument("--table", default=None, metavar="GPU_JSON",
                  help="print the README's markdown tables of a saved gpu.json and exit")
  args = ap.parse_args(argv)
  if args.table:
    print(table(json.loads(pathlib.Path(args.table).read_text())))
    return
  t0 = time.time()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  res: dict = {"argv": sys.argv[1:] if argv is None else list(argv)}
  for sec in [s for s in args.only.split(",") if s]:
    ts = time.time()
    try:
      if sec == "machine":
        res[sec] = machine(args.small)
      elif sec == "newton_schulz":
        res[sec] = newton_schulz(args.small)
      elif sec == "turbo_step":
        res[sec] = turbo_step(args.small)
      elif sec == "speed":
        m = res.get("machine") if isinstance(res.get("machine"), dict) else {}
        res[sec] = speed(args.small, args.size, t0 + args.budget_s, m.get("copy_gbs"),
                         m.get("matmul_tflops_f32"), args.optimizer)
      elif sec == "barrier":
        res[sec] = barrier(args.small, args.size)
      else:
        raise ValueError(f"unknown section {sec!r}; known: {SECTIONS}")
    except Exception as e:  # noqa: BLE001 - keep the other sections
      res[sec] = {"error": f"{type(e).__name__}: {e}"[:1500]}
      traceback.print_exc()
    res.setdefault("seconds", {})[sec] = time.time() - ts
    (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"== {sec} done in {time.time() - ts:.1f}s", flush=True)


if __name__ == "__main__":
  main()
