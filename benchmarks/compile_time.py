"""First-step compile time of every JAX optimizer on real models' shapes, against optax.adamw.

For ResNet-18 (11.7M parameters) and GPT-2 small (124M, Hugging Face layout), as a JAX user's
``{module: {leaf: array}}`` tree (:mod:`benchmarks.model_shapes`; ResNet-18 in Flax's layout,
:func:`~benchmarks.model_shapes.flax_layout`: conv ``kernel`` ``(kh, kw, in, out)``, the head's
``(in, out)``, norm ``scale``), each optimizer of the benchmark (optax's and stax's, every mode)
gets the speed benchmark's step with its JAX defaults: ``update`` + ``apply_updates``, jitted with
parameters and state donated. (Until stop 54 the ResNet-18 tree had torch's ``(out, in, kh, kw)``
kernels, which OAdamW, TurboAdam, optax's Muon and the floor programs read as Flax conv kernels:
those rows timed matrices of other shapes than any real model's.) Measured: the first step's cost before it runs, ``trace`` + ``lower`` +
``compile`` in seconds (on abstract shapes: no parameter memory is allocated), its ratio to
``optax.adamw``'s in the same process (the speed issue's target: ≤ 3), and the distinct kernels
XLA compiled (:func:`benchmarks.speed.distinct_kernels`; of them, ``kernels_compiled_twice``:
another kernel's body with its parameters in another order, :func:`benchmarks.speed.kernels_compiled_twice`). Each compile runs ``--repeats`` times
(default 2) and the fastest counts (a compile is deterministic work; the machine's load is not).
Each repeat is paired with a compile of optax.adamw's step just before it, and the ratio is the
fastest of the optimizer's over the fastest of those adjacent baselines (``optax_adamw_s``): this
machine's speed drifts by ±30 % within minutes, so one baseline measured at the start moved
every later ratio by up to ±0.5 between runs.
Each optimizer with a floor program (:mod:`benchmarks.floors`' ``COMPILE_FLOOR_PROGRAMS``: the
passes its step needs on XLA:CPU, and OAdamW's Newton–Schulz and SCAO's products, QRs and
eigendecompositions written out, nothing else) also gets that program's compile ratio on the same shapes, the floor of
its first step: ``floor_verdict`` says whether the target is met, reachable (the program is
within 3×) or below the floor.

Usage: ``python -m benchmarks.compile_time [--models resnet18 gpt2_small] [--out FILE]``;
results in ``benchmarks/results/compile_time.json`` with ``--out`` pointing there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

#: The speed issue's target: a first step compiles in at most 3× optax.adamw's time.
TARGET = 3.0


def _stages(tx, params) -> dict:
  """Seconds of trace, lower and compile of one donated step on abstract ``params``, and the
  compiled step's distinct kernels."""
  import jax
  import optax
  from benchmarks import speed

  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  fn = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  traced = fn.trace(params, state, params)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  text = compiled.as_text()
  return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0,
          "distinct_kernels": speed.distinct_kernels(text),
          "kernels_compiled_twice": speed.kernels_compiled_twice(text)}


def run(models=("resnet18", "gpt2_small"), repeats: int = 2, names=None, log=print) -> dict:
  import jax
  import jax.numpy as jnp
  from benchmarks import model_shapes as M
  from benchmarks import optimizers as O

  opts = [o for o in O.all_optimizers(torch=False) if o.framework == "jax"]
  if names:
    opts = [o for o in opts if o.name in names or o.name == "optax.adamw"]
  opts.sort(key=lambda o: o.name != "optax.adamw")   # the baseline first
  out = {"machine": {"python": platform.python_version(), "jax": jax.__version__,
                     "cpu": platform.processor() or platform.machine(),
                     "cores": os.cpu_count()},
         "repeats": repeats, "models": {}}
  for model in models:
    shapes = getattr(M, f"{model}_shapes")()
    if model == "resnet18":
      shapes = M.flax_layout(shapes)   # torchvision's names and layouts → Flax's
    tree, order = M.nested(shapes)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), tree,
                          is_leaf=lambda x: isinstance(x, tuple))
    task = type("Task", (), {"module_order": order, "name": model})()
    rows = {}
    baseline = lambda: _stages(opts[0].build(1e-3, task), params)["total_s"]
    for o in opts:
      try:
        runs, bases = _paired(lambda: _stages(o.build(1e-3, task), params),
                              None if o is opts[0] else baseline, repeats)
      except Exception as e:  # noqa: BLE001 - one failing optimizer must not stop the others
        rows[o.name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        log(f"{model:10s} {o.name:34s} error {rows[o.name]['error'][:120]}")
        continue
      best = dict(min(runs, key=lambda r: r["total_s"]), total_s_runs=[r["total_s"] for r in runs])
      best["optax_adamw_adjacent_s"] = bases
      best["optax_adamw_s"] = min(bases) if bases else best["total_s"]
      best["vs_optax_adamw"] = best["total_s"] / best["optax_adamw_s"]
      rows[o.name] = best
      log(f"{model:10s} {o.name:34s} {best['total_s']:6.2f} s "
          f"(trace {best['trace_s']:.2f}, lower {best['lower_s']:.2f}, compile "
          f"{best['compile_s']:.2f}) ×{best['vs_optax_adamw']:5.2f}  "
          f"{best['distinct_kernels']} kernels ({best['kernels_compiled_twice']} twice)")
    floors = _floors(rows, params, order, repeats, log, model, baseline)
    out["models"][model] = {"n_params": int(sum(_size(s) for s in shapes.values())),
                            "leaves": len(shapes), "optimizers": rows, "floors": floors}
  return out


def _paired(measure, baseline, repeats: int) -> tuple[list, list]:
  """``repeats`` calls of ``measure``, each just after one of ``baseline`` (optax.adamw's
  compile; ``None``: no baseline): ``(measurements, baseline seconds)``."""
  runs, bases = [], []
  for _ in range(repeats):
    if baseline is not None:
      bases.append(baseline())
    runs.append(measure())
  return runs, bases


def _floors(rows: dict, params, order, repeats: int, log, model: str, baseline) -> dict:
  """Each benchmarked optimizer's floor program (:mod:`benchmarks.floors`: the passes its step
  needs on XLA:CPU, written plainly) compiled the same way on the same abstract shapes:
  ``{program: {"total_s", "distinct_kernels", "vs_optax_adamw", "optax_adamw_s"}}`` (each repeat
  paired with ``baseline()``, optax.adamw's compile, as in :func:`run`); each optimizer's row gets
  its program's name, compile ratio and the verdict against the target of 3 (``floor_verdict``:
  ``"met"``, ``"reachable"`` when the program is within it and the step is not, ``"below the
  floor"`` when the program itself is above it)."""
  import jax
  from benchmarks import floors as F
  head = order[-1]
  out = {}
  for name, row in rows.items():
    if name not in F.COMPILE_FLOOR_PROGRAMS or "error" in row:
      continue
    prog = F.COMPILE_FLOOR_PROGRAMS[name][0]
    if prog not in out:
      def stages(prog=prog):
        state = jax.eval_shape(lambda p: F.init_state(prog, p, head), params)
        fn = jax.jit(F.program_step(prog, head), donate_argnums=(0, 1))
        t0 = time.perf_counter()
        compiled = fn.trace(params, state, params).lower().compile()
        return time.perf_counter() - t0, compiled
      runs, bases = _paired(stages, baseline, repeats)
      best, compiled = min(runs, key=lambda r: r[0])
      base = min(bases)
      from benchmarks import speed
      out[prog] = {"total_s": best, "vs_optax_adamw": best / base, "optax_adamw_s": base,
                   "distinct_kernels": speed.distinct_kernels(compiled.as_text())}
      log(f"{model:10s} {'floor:' + prog:34s} {best:6.2f} s ×{best / base:5.2f}  "
          f"{out[prog]['distinct_kernels']} kernels")
    ratio = out[prog]["vs_optax_adamw"]
    row["floor_program"] = prog
    row["floor_vs_optax_adamw"] = ratio
    row["floor_verdict"] = ("met" if row["vs_optax_adamw"] <= TARGET else
                            "reachable" if ratio <= TARGET else "below the floor")
  return out


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= d
  return n


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["resnet18", "gpt2_small"])
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--only", nargs="*", default=None, help="optimizer names (optax.adamw always)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import warnings
  warnings.filterwarnings("ignore")
  res = run(args.models, args.repeats, args.only)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
