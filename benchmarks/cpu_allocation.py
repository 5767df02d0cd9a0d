"""Page faults of a step's temporaries on CPU: the same steps under six process settings.

XLA's CPU runtime allocates a compiled step's temporaries (one block sized by its buffer
assignment) afresh on every call. glibc serves a block above its mmap threshold (at most 32 MiB)
with a new ``mmap`` and gives it back on ``free``, so the kernel zero-fills every page again on
the next step: the step pays a page fault per 4 KiB of temporaries (about 3 GB/s here, against
~50 GB/s for a streaming pass). Steps without temporaries (``optax.adamw``'s in-place update)
do not notice; those that decode and re-encode compressed state (TurboAdam) do.

``python -m benchmarks.cpu_allocation [--size 16M] [--steps 12] [--out FILE]`` times the donated,
jitted steps of a few optimizers at the speed benchmark's GPT shapes in one subprocess per
setting, and counts the minor page faults per step (``getrusage``):

* ``default``;
* ``lean``: ``XLA_FLAGS`` with :data:`stax.LEAN_MEMORY_FLAG` (XLA's memory-minimising
  scheduler: fewer temporaries live at once, so a smaller block);
* ``reuse``: :func:`stax.reuse_cpu_temporaries` called in the child before its first JAX
  computation (glibc keeps freed memory: no mmap per block, no trimming, one arena so XLA's
  threads allocate from the reusable heap; the same as the environment
  ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` before Python
  starts);
* ``both``;
* ``huge``: the process started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
  (:data:`stax.HUGE_PAGE_MALLOC`): glibc backs the blocks it maps with transparent huge pages,
  so a block faults in 2 MiB at a time, with no change to the arenas;
* ``huge+lean``.

SCAO's steps are timed in its Adam warm-up (100 steps by default), beside the seed's torch
SCAO (also in its warm-up) in the same loop, so the *vs seed* comparison of the speed issue
can be read under each setting.

Ratios are to ``optax.adamw`` in the same subprocess (the settings run one after another, so
compare ratios, not milliseconds, across them).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
REUSE_ENV = {"STAX_BENCH_REUSE_CPU_TEMPORARIES": "1"}   # read by the child only
OPTIMIZERS = ("optax.adamw", "stax.adamw", "stax.stable_adamw", "stax.stam",
              "stax.turbo_adam", "stax.scao", "stax.scao[scao-0.2.4]")
#: The seed's torch SCAO, timed in the same loop (its steps are Adam warm-up steps, as are the
#: JAX SCAO steps here: warm-up 100 steps); skipped when torch or ``scao`` is missing.
TORCH_SEEDS = ("seed:scao.SCAO",)


def _settings() -> dict:
  import stax
  lean = stax.lean_memory_xla_flags(os.environ.get("XLA_FLAGS"))
  huge = {"GLIBC_TUNABLES": stax.huge_page_malloc_env({})["GLIBC_TUNABLES"]}
  return {"default": {}, "lean": {"XLA_FLAGS": lean}, "reuse": dict(REUSE_ENV),
          "both": dict(REUSE_ENV, XLA_FLAGS=lean), "huge": huge,
          "huge+lean": dict(huge, XLA_FLAGS=lean)}


def child(size: str, steps: int) -> dict:
  """Runs in the subprocess: median step ms and minor page faults per step, per optimizer."""
  import statistics
  import time

  import stax
  if os.environ.get("STAX_BENCH_REUSE_CPU_TEMPORARIES") == "1":
    assert stax.reuse_cpu_temporaries(), "glibc's mallopt is needed for this setting"

  import jax
  import jax.numpy as jnp
  import optax

  from benchmarks.optimizers import WEIGHT_DECAY
  from benchmarks.speed import make_params, minor_faults

  params_np, order = make_params(size)
  params = jax.tree.map(jnp.asarray, params_np)
  grads = jax.tree.map(lambda x: x * 0.01 + 0.001, params)
  makers = {"optax.adamw": lambda: optax.adamw(1e-3), "stax.adamw": lambda: stax.adamw(1e-3),
            "stax.stable_adamw": lambda: stax.stable_adamw(1e-3),
            "stax.stam": lambda: stax.stam(1e-3), "stax.turbo_adam": lambda: stax.turbo_adam(1e-3),
            "stax.scao": lambda: stax.scao(1e-3, weight_decay=WEIGHT_DECAY),
            "stax.scao[scao-0.2.4]": lambda: stax.scao(1e-3, weight_decay=WEIGHT_DECAY,
                                                       mode="scao-0.2.4")}
  compiled = {}
  for name in OPTIMIZERS:
    tx = makers[name]()
    state = tx.init(params)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    fn = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    p, s = fn(jax.tree.map(jnp.copy, params), state, grads)
    jax.block_until_ready(p)
    temp = fn.memory_analysis().temp_size_in_bytes
    compiled[name] = [fn, p, s, [], [], temp]
  for name in TORCH_SEEDS:
    try:
      from benchmarks import optimizers as bench_opts
      from benchmarks.speed import torch_step
      seed = {o.name: o for o in bench_opts.all_optimizers(torch=True)}[name]
    except (ImportError, KeyError):
      continue
    (step_fn, _), _ = torch_step(lambda m, seed=seed: seed.build(1e-3, m, None), params_np,
                                 order)
    step_fn(None, None)
    compiled[name] = [lambda p, s, g, f=step_fn: f(p, s), None, None, [], [], None]
  for _ in range(steps):   # interleaved: every optimizer sees the same machine state
    for name, rec in compiled.items():
      fn, p, s = rec[:3]
      f0 = minor_faults()
      t0 = time.perf_counter()
      p, s = fn(p, s, grads)
      if p is not None:
        jax.block_until_ready(p)
      rec[3].append(time.perf_counter() - t0)
      rec[4].append(minor_faults() - f0)
      rec[1], rec[2] = p, s
  base = statistics.median(compiled["optax.adamw"][3][1:])
  out = {}
  for name, rec in compiled.items():
    ms = statistics.median(rec[3][1:])
    out[name] = {"step_ms": 1e3 * ms, "vs_optax_adamw": ms / base,
                 "minor_faults_per_step": statistics.median(rec[4][1:]),
                 "temp_mib": None if rec[5] is None else rec[5] / 2**20}
  return out


def run(size: str = "16M", steps: int = 12) -> dict:
  res = {"size": size, "steps": steps, "settings": {}}
  for name, env in _settings().items():
    cmd = [sys.executable, "-m", "benchmarks.cpu_allocation", "--child", "--size", size,
           "--steps", str(steps)]
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # each sets its own
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(base, PYTHONPATH=str(ROOT), **env),
                          capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    res["settings"][name] = {"env": env, "optimizers": rows}
    for opt, row in rows.items():
      temp = "" if row["temp_mib"] is None else f"  temp {row['temp_mib']:7.1f} MiB"
      print(f"{name:8s} {opt:22s} {row['step_ms']:8.1f} ms {row['vs_optax_adamw']:6.2f}x "
            f"{row['minor_faults_per_step']:9.0f} faults/step{temp}", flush=True)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="16M")
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--out", default=None)
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.size, args.steps)))
    return
  res = run(args.size, args.steps)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
