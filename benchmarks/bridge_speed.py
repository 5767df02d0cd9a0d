"""Speed of one optimizer step through torch_bridge vs pure JAX vs torch optimizers.

For each size (1M and 16M parameters, square float32 matrices) it times, in one process and
interleaved (round-robin, so machine load hits every contender alike):

* ``jax``: ``stax.adamw`` in pure JAX — a jitted ``(params, state, grads) -> (params, state)``
  with params and state donated (the floor the bridge is measured against);
* ``bridge_param`` / ``bridge_group``: ``torch_bridge.Optimizer(params, stax.adamw)`` with one
  state per parameter (default, torch semantics) / one per group; gradients from torch by
  DLPack, new parameters written back with ``copy_``; ``bridge_param_swap`` /
  ``bridge_group_swap``: the same with ``writeback="swap"`` (torch views JAX-owned buffers
  that XLA updates in place: no copy); ``bridge_param_swap_lr``: the same with a new ``lr``
  written into the group before every step, as an LR scheduler does;
* ``torch_adamw_foreach`` / ``torch_adamw_fused``: ``torch.optim.AdamW``;
* the seeds' torch classes where installed (``stac_optimizer.STAC``, ``turboadam.TurboAdam``,
  ``scao.SCAO`` (in its Adam warm-up), ``optimi.StableAdamW``) next to the matching bridge
  drop-in (``torch_bridge.STAC`` / ``TurboAdam`` / ``SCAO`` / ``OAdamW(muon="off")``).

Each round runs ``--block`` (default 4) consecutive steps of every contender, in a new random
order each round (a cold step's cost depends on what ran before it). Reported: the
median time of a *cold* step (the first of a block, after the other contenders evicted this
one's arrays from the caches, as a forward/backward pass does in training) and of a *steady*
step (the block's later steps, back to back), and ratios to ``jax`` from the same run.
Results go to ``benchmarks/results/bridge_speed.json``.

Usage:
  python benchmarks/bridge_speed.py            # 1M and 16M parameters
  python benchmarks/bridge_speed.py --quick    # 1M only, fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# torch's OpenMP threads spin after each parallel region and steal the cores XLA's threads
# need (and vice versa): with both frameworks in one process on CPU, make them sleep instead.
# Measured here (1M params): torch fused AdamW 66 ms -> 0.9 ms, the bridge 76 ms -> 4 ms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

import stax  # noqa: E402
import torch_bridge  # noqa: E402
from benchmarks.model_shapes import gpt2_small_shapes, resnet18_shapes  # noqa: E402

SIZES = {"1M": (4, 512), "16M": (16, 1024)}  # (number of matrices, side): 1.05M / 16.8M


class _Stack(torch.nn.Module):
  """A model that is just a stack of square layers (STAC needs modules)."""

  def __init__(self, n, d):
    super().__init__()
    self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(n))


def _torch_model(n, d, device):
  torch.manual_seed(0)
  m = _Stack(n, d).to(device)
  for p in m.parameters():
    p.grad = torch.randn_like(p) * 1e-2
  return m


def _jax_contender(n, d, device):
  tx = stax.adamw(1e-3, weight_decay=1e-2, nonfinite="ignore")
  dev = jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  params = {f"layers_{i}": jax.device_put(jax.random.normal(k, (d, d)), dev)
            for i, k in enumerate(keys)}
  grads = jax.tree.map(lambda p: p * 1e-2, params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  step = jax.jit(step, donate_argnums=(0, 1))
  box = {"p": params, "s": state}

  def run():
    box["p"], box["s"] = step(box["p"], box["s"], grads)
    jax.block_until_ready(box["p"])

  return run


def _torch_contender(make_opt, n, d, device, lr_writes=False):
  m = _torch_model(n, d, device)
  opt = make_opt(m)

  def run():
    if lr_writes:  # what an LR scheduler does before every step
      for g in opt.param_groups:
        g["lr"] = g["lr"] * 0.9999
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  return run


def contenders(n, d, device):
  out = {
      "jax": lambda: _jax_contender(n, d, device),
      "bridge_param": lambda: _torch_contender(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-3,
                                           weight_decay=1e-2, nonfinite="ignore"), n, d, device),
      "bridge_param_swap": lambda: _torch_contender(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-3,
                                           weight_decay=1e-2, nonfinite="ignore",
                                           writeback="swap"), n, d, device),
      "bridge_param_swap_lr": lambda: _torch_contender(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-3,
                                           weight_decay=1e-2, nonfinite="ignore",
                                           writeback="swap"), n, d, device, lr_writes=True),
      "bridge_group": lambda: _torch_contender(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-3,
                                           weight_decay=1e-2, nonfinite="ignore",
                                           state_scope="group"), n, d, device),
      "bridge_group_swap": lambda: _torch_contender(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, lr=1e-3,
                                           weight_decay=1e-2, nonfinite="ignore",
                                           state_scope="group", writeback="swap"), n, d, device),
      "torch_adamw_foreach": lambda: _torch_contender(
          lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True),
          n, d, device),
      "torch_adamw_fused": lambda: _torch_contender(
          lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-2, fused=True),
          n, d, device),
  }
  try:
    import stac_optimizer  # pylint: disable=g-import-not-at-top
    out["seed_stac"] = lambda: _torch_contender(
        lambda m: stac_optimizer.STAC(m, lr=1e-3, last_n_modules=1, weight_decay=1e-2,
                                      foreach=True), n, d, device)
    out["bridge_stac"] = lambda: _torch_contender(
        lambda m: torch_bridge.STAC(m, lr=1e-3, last_n_modules=1, weight_decay=1e-2),
        n, d, device)
  except ImportError:
    pass
  try:
    import turboadam  # pylint: disable=g-import-not-at-top
    out["seed_turboadam"] = lambda: _torch_contender(
        lambda m: turboadam.TurboAdam(m.parameters(), lr=1e-3), n, d, device)
    out["bridge_turboadam_faithful"] = lambda: _torch_contender(
        lambda m: torch_bridge.TurboAdam(m, lr=1e-3, codec="turboadam-0.2"), n, d, device)
    out["bridge_turboadam"] = lambda: _torch_contender(
        lambda m: torch_bridge.TurboAdam(m, lr=1e-3), n, d, device)
  except ImportError:
    pass
  try:
    import scao  # pylint: disable=g-import-not-at-top
    out["seed_scao_warmup"] = lambda: _torch_contender(
        lambda m: scao.SCAO(m.parameters(), lr=1e-3), n, d, device)
    out["bridge_scao_warmup"] = lambda: _torch_contender(
        lambda m: torch_bridge.SCAO(m, lr=1e-3, mode="scao-0.2.4"), n, d, device)
  except ImportError:
    pass
  try:
    import optimi  # pylint: disable=g-import-not-at-top
    out["seed_optimi_stableadamw"] = lambda: _torch_contender(
        lambda m: optimi.StableAdamW(m.parameters(), lr=1e-3, foreach=True), n, d, device)
    out["bridge_oadamw_off"] = lambda: _torch_contender(
        lambda m: torch_bridge.OAdamW(m, lr=1e-3, muon="off"), n, d, device)
  except ImportError:
    pass
  return out


# --------------------------------------------------------------------------- real models
MODELS = {"resnet18": resnet18_shapes, "gpt2_small": gpt2_small_shapes}  # benchmarks/model_shapes.py


class _Shapes(torch.nn.Module):
  """Parameters of the given shapes, registered under their names ('.' → '_')."""

  def __init__(self, shapes):
    super().__init__()
    for name, shape in shapes.items():
      self.register_parameter(name.replace(".", "_"),
                              torch.nn.Parameter(torch.randn(shape) * 0.02))


def model_contenders(shapes, device):
  """Pure JAX vs the bridge vs torch, same transform, same shapes (stax.adamw, and the default
  stax.turbo_adam against torch_bridge.TurboAdam)."""
  kw = dict(lr=1e-3, weight_decay=1e-2)

  def torch_run(make_opt):
    torch.manual_seed(0)
    m = _Shapes(shapes).to(device)
    for p in m.parameters():
      p.grad = torch.randn_like(p) * 1e-2
    opt = make_opt(m)
    return lambda: opt.step()

  def jax_run(tx, flat=False):
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    params = {k.replace(".", "_"): jax.random.normal(key, s) * 0.02
              for key, (k, s) in zip(keys, shapes.items())}
    grads = jax.tree.map(lambda p: p * 0.5, params)
    box = {"p": params, "s": tx.init(params)}

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    if flat:  # the bridge's boundary in pure JAX: narrow leaves cross 1-D where they can
      box["p"], box["s"], grads, step = _flat_boundary(step, box["p"], box["s"], grads)
    step = jax.jit(step, donate_argnums=(0, 1))

    def run():
      box["p"], box["s"] = step(box["p"], box["s"], grads)
      jax.block_until_ready(box["p"])

    return run

  return {
      "jax_adamw": lambda: jax_run(stax.adamw(1e-3, weight_decay=1e-2)),
      "jax_adamw_flat": lambda: jax_run(stax.adamw(1e-3, weight_decay=1e-2), flat=True),
      "bridge_adamw": lambda: torch_run(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, **kw)),
      "bridge_adamw_swap": lambda: torch_run(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, writeback="swap",
                                           **kw)),
      # torch's AdamW checks no gradient for Inf/NaN: the same semantics through the bridge
      "bridge_adamw_swap_unguarded": lambda: torch_run(
          lambda m: torch_bridge.Optimizer(m.named_parameters(), stax.adamw, writeback="swap",
                                           nonfinite="ignore", **kw)),
      "torch_adamw_foreach": lambda: torch_run(
          lambda m: torch.optim.AdamW(m.parameters(), foreach=True, **kw)),
      "torch_adamw_fused": lambda: torch_run(
          lambda m: torch.optim.AdamW(m.parameters(), fused=True, **kw)),
      "jax_turbo_adam": lambda: jax_run(stax.turbo_adam(1e-3, weight_decay=1e-2)),
      "bridge_turbo_adam_swap": lambda: torch_run(
          lambda m: torch_bridge.TurboAdam(m, writeback="swap", **kw)),
  }


def _flat_boundary(step, params, state, grads):
  """``step(params, state, grads)`` with the leaves that :mod:`torch_bridge._flatten` lets cross
  1-D passed 1-D (as the bridge passes them): (params, state, grads, step over those)."""
  from torch_bridge import _flatten  # pylint: disable=g-import-not-at-top
  from torch_bridge.convert import boundary_shape  # pylint: disable=g-import-not-at-top
  leaves, tree = jax.tree.flatten((params, state, grads))
  avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  fn = lambda *xs: step(*tree.unflatten(xs))  # noqa: E731
  closed = _flatten.trace(fn, avals)
  flat = _flatten.flattenable(
      closed, avals, [i for i, a in enumerate(avals) if boundary_shape(a.shape) != a.shape])
  real = [tuple(a.shape) for a in avals]
  cross = [(x.size,) if i in flat else x.shape for i, x in enumerate(leaves)]
  n_out = len(jax.tree.leaves((params, state)))
  p, s, g = tree.unflatten([x.reshape(c) for x, c in zip(leaves, cross)])
  p_tree, s_tree = jax.tree.structure(p), jax.tree.structure(s)

  def flat_step(p, s, g):
    out = _flatten.flat_call(closed, jax.tree.leaves((p, s, g)), real, cross[:n_out])
    return p_tree.unflatten(out[:p_tree.num_leaves]), s_tree.unflatten(out[p_tree.num_leaves:])

  return p, s, g, flat_step


def bench_model(model, steps, warmup, device, block=2):
  """Like :func:`bench` on a real model's parameter shapes; ratios to the same transform in
  pure JAX (``jax_adamw`` / ``jax_turbo_adam``) and bridged AdamW against torch's foreach."""
  shapes = MODELS[model]()
  runs = {}
  for name, make in model_contenders(shapes, device).items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        run = make()
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        for _ in range(warmup):
          run()
        runs[name] = (run, first)
      except Exception as e:  # noqa: BLE001
        print(f"  {name}: skipped ({type(e).__name__}: {e})", flush=True)
  times = {k: [] for k in runs}
  rng = random.Random(0)
  for _ in range(steps):
    order = list(runs.items())
    rng.shuffle(order)
    for name, (run, _) in order:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(block):
          t0 = time.perf_counter()
          run()
          times[name].append(time.perf_counter() - t0)
  med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  ref = {"jax_adamw_flat": "jax_adamw", "bridge_adamw": "jax_adamw",
         "bridge_adamw_swap": "jax_adamw",
         "bridge_adamw_swap_unguarded": "jax_adamw",
         "bridge_turbo_adam_swap": "jax_turbo_adam"}
  return {"n_params": int(sum(int(np.prod(s)) for s in shapes.values())),
          "median_ms": med, "first_step_s": {k: v[1] for k, v in runs.items()},
          "bridge_vs_pure_jax": {k: med[k] / med[r] for k, r in ref.items()
                                 if k in med and r in med},
          # the same transform with the bridge's boundary (narrow leaves 1-D) in pure JAX
          "bridge_vs_pure_jax_flat": {k: med[k] / med["jax_adamw_flat"]
                                      for k in ("bridge_adamw", "bridge_adamw_swap",
                                                "bridge_adamw_swap_unguarded")
                                      if k in med and "jax_adamw_flat" in med},
          "bridge_adamw_vs_torch_foreach": {k: med[k] / med["torch_adamw_foreach"]
                                            for k in ("bridge_adamw", "bridge_adamw_swap",
                                                      "bridge_adamw_swap_unguarded")
                                            if k in med and "torch_adamw_foreach" in med}}


def bench(size, steps, warmup, device, only=None, block=4):
  """Round-robin over the contenders: each round runs ``block`` consecutive steps of each.

  ``cold``: the first step of each block, right after the other contenders ran (their arrays
  evicted this one's from the caches, as a forward/backward pass does in training).
  ``steady``: the block's later steps, back to back (an optimizer-only loop).
  """
  n, d = SIZES[size]
  runs = {}
  for name, make in contenders(n, d, device).items():
    if only and name not in only:
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        run = make()
        for _ in range(warmup):
          run()
        runs[name] = run
      except Exception as e:  # noqa: BLE001 - a seed failing must not stop the benchmark
        print(f"  {name}: skipped ({type(e).__name__}: {e})", flush=True)
  cold = {k: [] for k in runs}
  steady = {k: [] for k in runs}
  rng = random.Random(0)
  for _ in range(steps):  # round-robin: load on the machine hits everyone alike
    order = list(runs.items())
    rng.shuffle(order)  # a fresh order each round: no contender always follows the same one
    for name, run in order:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(block):
          t0 = time.perf_counter()
          run()
          (cold if j == 0 else steady)[name].append(time.perf_counter() - t0)
  res = {"n_params": n * d * d, "layers": f"{n} x ({d}, {d}) float32", "block": block}
  for label, times in (("", cold), ("steady_", steady)):
    med = {k: 1e3 * statistics.median(v) for k, v in times.items() if v}
    base = med.get("jax")
    res[f"{label}median_ms"] = med
    res[f"{label}ratio_to_jax"] = {k: v / base for k, v in med.items()} if base else {}
    if base:
      res[f"{label}bridge_overhead_vs_jax"] = {k: med[k] / base - 1.0 for k in med
                                              if k.startswith(("bridge_param", "bridge_group"))}
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  ap.add_argument("--only", nargs="*", default=None, help="contender names to run")
  ap.add_argument("--block", type=int, default=4,
                  help="consecutive steps per contender per round (1st = cold, rest = steady)")
  ap.add_argument("--quick", action="store_true", help="1M only, 5 steps")
  ap.add_argument("--models", nargs="*", default=None, choices=list(MODELS),
                  help="real models' parameter shapes instead of --sizes (resnet18, gpt2_small)")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bridge_speed.json"))
  a = ap.parse_args(argv)
  if a.quick:
    a.sizes, a.steps, a.warmup = ["1M"], 5, 2
  if a.block < 1:
    ap.error("--block must be >= 1")
  out = {"device": a.device, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "jax_backend": jax.default_backend(),
         "torch": torch.__version__, "jax": jax.__version__, "cpu_threads": torch.get_num_threads(),
         "machine": platform.processor() or platform.machine(), "steps": a.steps, "results": {}}
  if a.models:
    out["models"] = {}
    for model in a.models:
      print(f"[{model}]", flush=True)
      r = bench_model(model, a.steps, a.warmup, a.device)
      out["models"][model] = r
      for k, v in r["median_ms"].items():
        print(f"  {k:28s} {v:9.2f} ms  first step {r['first_step_s'][k]:6.2f} s", flush=True)
      print(f"  bridge / pure JAX: {r['bridge_vs_pure_jax']}", flush=True)
      print(f"  bridge / pure JAX with the bridge's boundary: {r['bridge_vs_pure_jax_flat']}",
            flush=True)
      print(f"  bridged AdamW / torch foreach: {r['bridge_adamw_vs_torch_foreach']}", flush=True)
    a.sizes = []
    a.out = a.out.replace("bridge_speed.json", "bridge_models.json")
  for size in a.sizes:
    print(f"[{size}]", flush=True)
    r = bench(size, a.steps, a.warmup, a.device, a.only, a.block)
    out["results"][size] = r
    print(f"  {'':28s} {'cold':>9s}            {'steady':>9s}", flush=True)
    for k, v in r["median_ms"].items():
      sv = r["steady_median_ms"].get(k, float("nan"))
      print(f"  {k:28s} {v:9.2f} ms x{r['ratio_to_jax'].get(k, float('nan')):5.2f}   "
            f"{sv:9.2f} ms x{r['steady_ratio_to_jax'].get(k, float('nan')):5.2f}", flush=True)
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(out, indent=2))
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
