"""Optimizer step time and state memory on transformer-shaped parameter sets.

For each size (``1M``, ``16M``; ``128M`` with ``--full``) the parameters have the shapes of
the benchmark's GPT (token/position embeddings, per block LayerNorms, qkv, proj, MLP in/out,
final LayerNorm, output head). One timed step is ``tx.update`` + ``apply_updates`` with a fixed
gradient, jitted with params and state *donated*; compile time is measured separately
(``lower().compile()``), warm-up steps are excluded, each step ends in ``block_until_ready``,
and the median over the timed steps is reported next to ``optax.adamw`` measured in the same
process. Torch optimizers are timed the same way (``.step()`` on tensors whose ``.grad`` is
set), threads as configured by the caller.

Exact state bytes: the sum of ``size * itemsize`` over every leaf of ``jax.eval_shape(tx.init)``
(counters, keys and the guard's counter included); for torch, every tensor storage in
``optimizer.state`` after one step.

``investigate()`` records what closes the gap between optax's per-leaf AdamW and torch's fused
AdamW on CPU: donation, ``optax.flatten`` (one flat vector for the moments), keeping the
parameters themselves as one flat buffer, and XLA CPU flags (each flag set in a fresh
subprocess, since XLA reads them once).

Run alone: ``python -m benchmarks.speed [--sizes 1M,16M] [--steps 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np

from benchmarks import tasks as T

SIZES = {
    # name: (d_model, n_layers, vocab, context); "tiny" is for the smoke test
    "tiny": (32, 1, 64, 16),
    "1M": (128, 5, 128, 64),
    "16M": (384, 6, 8192, 256),
    "128M": (768, 12, 32000, 512),
}


def param_shapes(size: str):
  d, n, v, ctx = SIZES[size]
  cfg = T.GPTConfig(vocab=v, d_model=d, n_layers=n, context=ctx)
  return cfg


def make_params(size: str, seed: int = 0):
  """numpy parameters with the GPT's shapes (small random values), and the module order."""
  cfg = param_shapes(size)
  rng = np.random.default_rng(seed)
  shapes = _gpt_shapes(cfg)
  params = {m: {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in leaves.items()}
            for m, leaves in shapes.items()}
  return params, T.gpt_module_order(cfg)


def _gpt_shapes(cfg):
  d, v = cfg.d_model, cfg.vocab
  out = {"embed": {"embedding": (v, d)}, "pos": {"embedding": (cfg.context, d)}}
  for i in range(cfg.n_layers):
    out[f"block_{i}_ln_0"] = {"scale": (d,), "bias": (d,)}
    out[f"block_{i}_qkv"] = {"kernel": (d, 3 * d), "bias": (3 * d,)}
    out[f"block_{i}_proj"] = {"kernel": (d, d), "bias": (d,)}
    out[f"block_{i}_ln_1"] = {"scale": (d,), "bias": (d,)}
    out[f"block_{i}_mlp_in"] = {"kernel": (d, 4 * d), "bias": (4 * d,)}
    out[f"block_{i}_mlp_out"] = {"kernel": (4 * d, d), "bias": (d,)}
  out["ln_f"] = {"scale": (d,), "bias": (d,)}
  out["head"] = {"kernel": (d, v)}
  return out


def n_params_of(size: str) -> int:
  return int(sum(int(np.prod(s)) for m in _gpt_shapes(param_shapes(size)).values()
                 for s in m.values()))


def jax_state_bytes(tx, params) -> int:
  import jax
  st = jax.eval_shape(tx.init, params)
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(st)))


def time_jax(tx, params_np, *, steps: int, warmup: int = 2, donate: bool = True,
             flat_params: bool = False):
  """(median_ms, min_ms, compile_s) of one donated update+apply step."""
  import jax
  import jax.numpy as jnp
  import optax

  params = jax.tree.map(jnp.asarray, params_np)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32)
                                             * 1e-3), params_np)
  if flat_params:
    from jax.flatten_util import ravel_pytree
    params, _ = ravel_pytree(params)
    grads, _ = ravel_pytree(grads)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = jax.jit(tx.init)(params)
  fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  t0 = time.perf_counter()
  compiled = fn.lower(params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    params, state = compiled(params, state, grads)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), 1e3 * min(times), compile_s


def time_torch(make_opt, params_np, module_order, *, steps: int, warmup: int = 2):
  """(median_ms, min_ms, first_step_s, state_bytes) for a torch optimizer."""
  import torch

  from benchmarks.quality import torch_module, torch_state_bytes
  module, _ = torch_module(params_np, module_order)
  rng = np.random.default_rng(1)
  for p in module.parameters():
    p.grad = torch.as_tensor(rng.standard_normal(tuple(p.shape), dtype=np.float32) * 1e-3)
  opt = make_opt(module)
  t0 = time.perf_counter()
  opt.step()
  first = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    opt.step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), 1e3 * min(times), first, torch_state_bytes(opt)


def run_speed(sizes, optimizers, *, steps: int = 10, progress=None, log=print):
  """Step time + state bytes for every optimizer at every size. Returns a list of records."""
  import jax

  records = []
  for size in sizes:
    params, order = make_params(size)
    n = n_params_of(size)
    task = types.SimpleNamespace(module_order=order, name=f"speed-{size}")
    base_ms = None
    for opt in optimizers:
      rec = {"size": size, "n_params": n, "optimizer": opt.name, "framework": opt.framework,
             "family": opt.family, "mode": opt.mode, "backend": "cpu", "error": None}
      try:
        if opt.framework == "jax":
          tx = opt.build(1e-3, task)
          rec["state_bytes"] = jax_state_bytes(tx, jax.tree.map(np.asarray, params))
          med, mn, comp = time_jax(tx, params, steps=steps)
          rec.update(step_ms=med, step_ms_min=mn, compile_s=comp)
        else:
          med, mn, first, sb = time_torch(lambda m: opt.build(1e-3, m, task), params, order,
                                          steps=steps)
          rec.update(step_ms=med, step_ms_min=mn, compile_s=first, state_bytes=sb)
        rec["state_bytes_per_param"] = rec["state_bytes"] / n
        if opt.name == "optax.adamw":
          base_ms = rec["step_ms"]
        rec["vs_optax_adamw"] = rec["step_ms"] / base_ms if base_ms else None
      except Exception as e:  # noqa: BLE001 - one optimizer failing must not stop the run
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        log(f"  speed {size} {opt.name}: {rec['error']}")
      records.append(rec)
      if progress is not None:
        progress.update(1)
  return records


# --------------------------------------------------------------------------- the CPU gap
INVESTIGATION_FLAGS = {
    "default": "",
    "no_multithread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def _variants(steps):
  import optax
  return {
      "optax.adamw (per leaf, donated)": dict(tx=optax.adamw(1e-3), donate=True),
      "optax.adamw (per leaf, not donated)": dict(tx=optax.adamw(1e-3), donate=False),
      "optax.flatten(optax.adamw) (donated)": dict(tx=optax.flatten(optax.adamw(1e-3)),
                                                   donate=True),
      "optax.adamw on one flat param buffer (donated)": dict(tx=optax.adamw(1e-3), donate=True,
                                                             flat_params=True),
  }


def investigate_child(size: str, steps: int) -> list[dict]:
  params, _ = make_params(size)
  out = []
  for name, v in _variants(steps).items():
    med, mn, comp = time_jax(v["tx"], params, steps=steps, donate=v["donate"],
                             flat_params=v.get("flat_params", False))
    out.append({"variant": name, "step_ms": med, "step_ms_min": mn, "compile_s": comp})
  return out


def investigate(size: str = "16M", *, steps: int = 10, flags=None, torch_threads=None,
                log=print) -> list[dict]:
  """The optax-vs-torch-fused gap at ``size``: JAX variants under each XLA flag set (fresh
  subprocess each), then torch AdamW fused / foreach / for-loop in this process."""
  flags = INVESTIGATION_FLAGS if flags is None else flags
  records = []
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for fname, fval in flags.items():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + fval).strip()
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.speed", "--child", "--sizes", size,
           "--steps", str(steps)]
    try:
      out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
      rows = json.loads(out.stdout.strip().splitlines()[-1])
      for r in rows:
        r.update(xla_flags=fval or "(none)", flag_set=fname, framework="jax", size=size)
        records.append(r)
    except Exception as e:  # noqa: BLE001
      log(f"  investigation {fname}: {type(e).__name__}: {e}; stderr: "
          f"{getattr(locals().get('out'), 'stderr', '')[-500:]}")
  try:
    import torch
    params, order = make_params(size)
    threads0 = torch.get_num_threads()
    for label, kw, threads in (("torch AdamW fused", dict(fused=True), threads0),
                               ("torch AdamW fused", dict(fused=True), os.cpu_count() or 1),
                               ("torch AdamW foreach", dict(foreach=True), threads0),
                               ("torch AdamW for-loop", dict(foreach=False), threads0)):
      if label.endswith("fused") and threads == threads0 and kw.get("fused") and \
          any(r.get("variant") == label and r.get("torch_threads") == threads for r in records):
        continue
      torch.set_num_threads(threads)
      try:
        med, mn, first, _ = time_torch(
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, **kw), params, order,
            steps=steps)
      finally:
        torch.set_num_threads(threads0)
      records.append({"variant": label, "step_ms": med, "step_ms_min": mn,
                      "compile_s": first, "framework": "torch", "size": size,
                      "torch_threads": threads})
  except Exception as e:  # noqa: BLE001
    log(f"  investigation torch: {type(e).__name__}: {e}")
  return records


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="1M,16M")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  if args.child:
    print(json.dumps(investigate_child(sizes[0], args.steps)))
    return
  from benchmarks import optimizers as O
  recs = run_speed(sizes, O.all_optimizers(), steps=args.steps)
  for r in recs:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
