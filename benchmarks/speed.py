"""Optimizer step time and state memory on transformer-shaped parameter sets.

For each size (``1M``, ``16M``; ``128M`` with ``--full``) the parameters have the shapes of
the benchmark's GPT (token/position embeddings, per block LayerNorms, qkv, proj, MLP in/out,
final LayerNorm, output head). One timed step is ``tx.update`` + ``apply_updates`` with a fixed
gradient, jitted with params and state *donated*; compile time is measured separately
(``lower().compile()``), warm-up steps are excluded, each step ends in ``block_until_ready``,
and the median over the timed steps is reported next to ``optax.adamw`` measured in the same
process. Up to :data:`INTERLEAVE_MAX_PARAMS` parameters the JAX steps of a size (and the floor
programs of :mod:`benchmarks.floors`) are compiled first and timed interleaved
(:func:`interleave`). Torch optimizers are timed one after the other (``.step()`` on tensors
whose ``.grad`` is set), threads as configured by the caller.

Exact state bytes: the sum of ``size * itemsize`` over every leaf of ``jax.eval_shape(tx.init)``
(counters, keys and the guard's counter included); for torch, every tensor storage in
``optimizer.state`` after one step.

Roofline (:func:`roofline`): per record, the bytes the compiled step accesses (XLA's cost
analysis) per parameter, the ideal bytes per parameter from the state layout
(:func:`ideal_bytes_per_param`: read p and g, write p, read and write the state once), the
achieved GB/s, and the bound (ideal bytes at this machine's copy bandwidth, measured in the same
run by :func:`copy_bandwidth_gbs`); with the issue's targets (:data:`TARGETS`) and the ratio to
each optimizer's seed package (:data:`SEEDS`).

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
import re
import statistics
import subprocess
import sys
import time
import types

import numpy as np

from benchmarks import floors as F
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


def prepare_jax(tx, params_np, *, donate: bool = True, flat_params: bool = False,
                cost: dict | None = None):
  """``(compiled, args, compile_s)`` of one donated update+apply step of ``tx``; ``args`` is
  the list ``[params, state, grads]`` a call takes (and whose first two it replaces).

  ``cost``, when given, receives XLA's cost analysis of the compiled step (``bytes accessed``,
  ``flops``) and its temporary memory (``temp_bytes``).
  """
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
  if cost is not None:
    cost.update(compiled_cost(compiled))
  return compiled, [params, state, grads], compile_s


def _call(compiled, args) -> float:
  """One timed call of a prepared step (seconds); its outputs become the next inputs."""
  import jax
  t0 = time.perf_counter()
  args[0], args[1] = compiled(*args)
  jax.block_until_ready(args[:2])
  return time.perf_counter() - t0


def time_jax(tx, params_np, *, steps: int, warmup: int = 2, donate: bool = True,
             flat_params: bool = False, cost: dict | None = None):
  """(median_ms, min_ms, compile_s) of one donated update+apply step, timed on its own
  (``steps`` calls after ``warmup``); ``cost`` as :func:`prepare_jax`'s."""
  compiled, args, compile_s = prepare_jax(tx, params_np, donate=donate,
                                          flat_params=flat_params, cost=cost)
  for _ in range(warmup):
    _call(compiled, args)
  times = [_call(compiled, args) for _ in range(steps)]
  return 1e3 * statistics.median(times), 1e3 * min(times), compile_s


def minor_faults() -> int | None:
  """The process's minor page faults so far (``getrusage``), or ``None`` where there is none."""
  try:
    import resource
  except ImportError:   # not on Windows
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleave(runs: dict, *, rounds: int, calls: int = 3, faults: dict | None = None) -> dict:
  """``{name: [seconds, ...]}``: ``rounds`` rounds, each calling every prepared step of
  ``runs`` (``{name: (compiled, args)}``) ``calls`` times in a row, after one warm-up round, so
  that the machine's load moves every contender alike (these shared 2-core machines drift by
  ±30 % within a minute). A step that raises is dropped; its entry is then the error's text.
  With ``faults`` (a dict), ``faults[name]`` gets each timed call's minor page faults too."""
  times = {k: [] for k in runs}
  failed = {}
  for r in range(rounds + 1):
    for k, (compiled, args) in runs.items():
      if k in failed:
        continue
      try:
        for _ in range(calls):
          f0 = minor_faults() if faults is not None else None
          t = _call(compiled, args)
          if r:
            times[k].append(t)
            if f0 is not None:
              faults.setdefault(k, []).append(minor_faults() - f0)
      except Exception as e:  # noqa: BLE001 - one failing step must not stop the others
        failed[k] = f"{type(e).__name__}: {e}"[:500]
  for k, err in failed.items():
    times[k] = err
  return times


def compiled_cost(compiled) -> dict:
  """``bytes_accessed``, ``flops``, ``transcendentals`` (XLA's cost analysis), ``fusions`` (the
  fused computations the step launches) and ``temp_bytes`` of a compiled step."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = ca or {}
  out = {"bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
         "flops": float(ca.get("flops", float("nan"))),
         "transcendentals": float(ca.get("transcendentals", float("nan")))}
  try:  # kernels per step: on a GPU each fusion is a launch
    text = compiled.as_text()
    out["fusions"] = len(re.findall(r"= [^=\n]*\bfusion\(", text))
    out["distinct_kernels"] = distinct_kernels(text)
  except Exception:  # noqa: BLE001
    out["fusions"] = out["distinct_kernels"] = None
  try:
    out["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    out["temp_bytes"] = None
  return out


def _fused_bodies(hlo_text: str) -> list[str]:
  """The fused computations of an optimised HLO module's text, each with its header, names and
  metadata taken out (two fusions that differ only in those give the same string)."""
  out = []
  for block in re.findall(r"\n(%[\w.\-]+ \([^\n]*\{\n.*?\n\})", hlo_text, re.S):
    head, body = block.split("\n", 1)
    if not (head.startswith("%fused") or "fusion" in head.split(" ")[0]):
      continue
    body = re.sub(r", metadata=\{.*?\}(?=,|$)", "", body, flags=re.M)
    names: dict = {}
    out.append(re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"),
                      body))
  return out


def distinct_kernels(hlo_text: str) -> int:
  """How many kernels XLA compiles for an optimised HLO module (``compiled.as_text()``): its
  distinct fused computations, names and metadata aside.

  XLA's CPU backend compiles each distinct fused computation once (``FusionCompiler::Compile``
  in its profile: 7-10 ms each on this project's CPU), so this count, not the number of
  fusions a step launches, drives its compile time: optax.adamw at 16M launches 234 fusions of
  33 distinct kernels (33 compilations in the profile). A per-leaf constant inside a fusion (a
  slice ``vec[i]`` of a per-leaf vector, an offset into a shared random draw) makes every
  leaf's kernels distinct."""
  return len(set(_fused_bodies(hlo_text)))


def kernels_compiled_twice(hlo_text: str, root: str = "") -> int:
  """How many of an optimised HLO module's :func:`distinct_kernels` are another one's body with
  its parameters numbered in another order (the same lines, names aside, in another order);
  with ``root`` (a regular expression), among the kernels whose ``ROOT`` line matches it.

  XLA numbers a fusion's parameters in the order its fusion pass met their producers, which
  follows the module's post order: a value every leaf shares (a debiased β, the non-finite
  gate) is first met inside the first leaf of each shape, so that leaf's kernel can take its
  operands in another order than the others' and be compiled again. A diagnostic: 0 when every
  same-shape leaf shares its kernels."""
  groups: dict = {}
  for body in set(_fused_bodies(hlo_text)):
    if root and not re.search(r"ROOT \S+ = " + root, body):
      continue
    lines = re.sub(r"%v\d+", "%", re.sub(r"parameter\(\d+\)", "parameter", body)).splitlines()
    key = "\n".join(sorted(lines))
    groups[key] = groups.get(key, 0) + 1
  return sum(n - 1 for n in groups.values())


def _best_seconds(fn, x, repeats: int, chain: bool) -> float:
  """Best wall time of ``fn(x)`` over ``repeats`` calls after one warm-up call; with ``chain``
  each call's output is the next call's (donated) input."""
  y = fn(x).block_until_ready()
  x = y if chain else x
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    y = fn(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
    x = y if chain else x
  return best


def copy_bandwidth_gbs(n_bytes: int = 256 << 20, repeats: int = 7) -> float:
  """This machine's streaming bandwidth in GB/s, measured now: a jitted, donated ``x * c`` over
  ``n_bytes`` of float32 (each byte read once and written once; both counted), best of
  ``repeats``. The roofline's bound: a step that must move B bytes takes at least B / this."""
  import jax
  import jax.numpy as jnp

  fn = jax.jit(lambda a: a * jnp.float32(1.0000001), donate_argnums=0)
  best = _best_seconds(fn, jnp.ones((n_bytes // 4,), jnp.float32), repeats, chain=True)
  return 2 * n_bytes / best / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """This machine's float32 matrix-multiply throughput in GFLOP/s, measured now: a jitted
  ``n×n @ n×n`` (``2n³`` flops), best of ``repeats``. The roofline's compute bound: a step that
  must do F flops takes at least F / this (a lower bound for elementwise work too, which runs
  below the matmul peak)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  best = _best_seconds(jax.jit(lambda x: x @ x), a, repeats, chain=False)
  return 2 * n ** 3 / best / 1e9


def exp_rate_gelems(n: int = 1 << 25, repeats: int = 5) -> float:
  """This machine's throughput of a float32 transcendental in G elements/s, measured now: a
  jitted, donated ``exp(x · 1e-9)`` over ``n`` elements, best of ``repeats`` (XLA counts each
  log/exp/power as one transcendental). The roofline's floor for a step with T transcendentals
  is at least T / this (TurboAdam's codecs: a log and exps per element)."""
  import jax
  import jax.numpy as jnp

  fn = jax.jit(lambda a: jnp.exp(a * jnp.float32(1e-9)), donate_argnums=0)
  best = _best_seconds(fn, jnp.ones((n,), jnp.float32), repeats, chain=True)
  return n / best / 1e9


def page_fault_us(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
  """Microseconds per 4 KiB page to fault in fresh memory (best of ``repeats``): one byte
  written per page of a newly mapped anonymous ``n_bytes`` block (``mmap``, 4 KiB pages: not
  numpy's allocation, which asks for transparent huge pages), the kernel's fault and zero-fill
  included. What each page of a step's temporaries costs every call when XLA's block of them is
  mapped anew (glibc maps blocks above 32 MiB; see ``stax.reuse_cpu_temporaries``)."""
  import mmap
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    block = mmap.mmap(-1, n_bytes)
    view = np.frombuffer(block, np.uint8)
    view[::4096] = 1
    best = min(best, time.perf_counter() - t0)
    del view
    block.close()
  return 1e6 * best / (n_bytes // 4096)


def ideal_bytes_per_param(state_bytes_per_param: float, param_itemsize: int = 4) -> float:
  """The bytes one step must move per parameter: read p and g, write p, and read and write
  the optimizer state once (a single fused pass; per-tensor statistics and the non-finite
  check need a second read of g on top of this, see the README's roofline)."""
  return 3 * param_itemsize + 2 * state_bytes_per_param


# Targets of the speed issue, as (baseline, ratio): at 16M parameters a stax optimizer's step
# within `ratio` x the baseline's step in the same run.
TARGETS = {
    "stax.adamw": ("optax.adamw", 1.05),
    "stax.stac": ("optax.adamw", 0.6),
    "stax.stam[seed]": ("optax.adamw", 1.3),
    "stax.stam[snr]": ("optax.adamw", 1.3),
    "stax.stam_lite[seed]": ("optax.adamw", 1.3),
    "stax.stam_lite[snr]": ("optax.adamw", 1.3),
    "stax.stable_adamw": ("optax.adamw", 1.3),
    "stax.turbo_adam": ("optax.adamw", 1.0),
    "stax.turbo_adam[turboadam-0.2]": ("optax.adamw", 1.3),
    "stax.scao": ("optax.adamw", 1.5),
    "stax.oadamw": ("optax.contrib.muon", 1.05),
    "stax.oadamw[gradient]": ("optax.contrib.muon", 1.05),
}

# On a backend with multi-output fusion (a GPU; benchmarks/gpu.py), what a step cannot avoid beyond
# its one-pass ideal bytes: extra float32 reads per parameter (bytes) and why. The floor of a step (``roofline``) is the largest of (ideal + extra) bytes at
# the copy bandwidth, XLA's flops at the matmul rate and XLA's transcendentals at the exp rate,
# all measured in the same run; its ratio to the target's baseline says whether the target is
# reachable with this design (floor <= target) or not.
_CHECK = "the non-finite check reads g before the update pass can start"
FLOORS = {
    "stax.adamw": (4, _CHECK),
    "stax.stac": (4, _CHECK),
    "stax.stam[seed]": (8, "g and m are read again for the per-tensor residual statistics "
                        "that set β1 before the update pass (the non-finite check's probe in "
                        "the same pass)"),
    "stax.stam[snr]": (8, "g and m are read again for the per-tensor SNR statistics that set "
                       "β1 before the update pass (the non-finite check's probe in the same "
                       "pass)"),
    "stax.stam_lite[seed]": (4, "g is read again for the per-tensor mean of g² (the stored v) "
                             "before the update pass (the non-finite check's probe in the same "
                             "pass)"),
    "stax.stam_lite[snr]": (8, "g and m are read again for the per-tensor statistics before "
                            "the update pass (the non-finite check's probe in the same pass)"),
    "stax.stable_adamw": (12, _CHECK + "; g and v are read again for the per-tensor RMS "
                          "clip before the update pass"),
    "stax.turbo_adam": (8, _CHECK + "; g is read again: the update divides by the rank-1 "
                        "estimate of the new v, whose row and column means take a pass over "
                        "g² first (the factored codec)"),
    "stax.turbo_adam[stax]": (4, _CHECK + "; the codec's log and exps per element "
                              "(transcendentals)"),
    "stax.turbo_adam[turboadam-0.2]": (4, _CHECK + "; the codec's log and exps per element "
                                       "(transcendentals)"),
    "stax.oadamw": (4, _CHECK + "; Newton–Schulz's matrix products (flops)"),
    "stax.oadamw[gradient]": (4, _CHECK + "; Newton–Schulz's matrix products (flops)"),
}

# Each stax optimizer's seed package in the benchmark (OAdamW is not on PyPI: its base,
# optimi's StableAdamW, stands in for stable_adamw only).
SEEDS = {
    "stax.stac": "seed:stac_optimizer.STAC",
    "stax.stam[seed]": "seed:stam_optimizer.stam",
    "stax.stam[snr]": "seed:stam_optimizer.stam",
    "stax.stam_lite[seed]": "seed:stam_optimizer.stam_lite",
    "stax.stam_lite[snr]": "seed:stam_optimizer.stam_lite",
    "stax.stable_adamw": "seed:optimi.StableAdamW",
    "stax.turbo_adam": "seed:turboadam.TurboAdam",
    "stax.turbo_adam[stax]": "seed:turboadam.TurboAdam",
    "stax.turbo_adam[turboadam-0.2]": "seed:turboadam.TurboAdam",
    "stax.scao": "seed:scao.SCAO",
    "stax.scao[scao-0.2.4]": "seed:scao.SCAO",
}


def _partners(name: str, by_name: dict) -> list[str]:
  """The steps ``name`` is compared with besides optax.adamw (its target's baseline, its seed
  package, JAX or torch), timed in its loop so that the comparison is within one loop."""
  out = []
  for other in (TARGETS.get(name, (None,))[0], SEEDS.get(name)):
    if other and other != "optax.adamw" and other in by_name:
      out.append(other)
  return out


def relative(rec: dict, other: dict) -> float:
  """``rec``'s step over ``other``'s: within ``rec``'s own interleaved loop when ``other`` ran
  in it (optax.adamw always, a target's baseline or a seed's JAX package as a partner; a
  step as heavy as Muon's slows the optax.adamw steps beside it, so ratios of ratios from two
  loops are not used), otherwise the ratio of the medians."""
  if rec.get("timing") == "interleaved":
    if other["optimizer"] == "optax.adamw" and rec.get("vs_optax_adamw"):
      return rec["vs_optax_adamw"]
    if other["optimizer"] in (rec.get("vs_partner") or {}):
      return rec["vs_partner"][other["optimizer"]]
  return rec["step_ms"] / other["step_ms"]


def _floor_program(rec: dict, floors: dict | None, by: dict):
  """``(program, ms)`` of a record's minimal XLA:CPU program, if it was timed: its ratio to
  optax.adamw (in the record's own interleaved loop, else in :func:`benchmarks.floors.
  time_floors`' loop) times optax.adamw's step in this table."""
  entry = F.FLOOR_PROGRAMS.get(rec["optimizer"])
  base = by.get((rec["size"], "optax.adamw"))
  if entry is None or base is None:
    return None
  if rec.get("floor_program_vs_optax_adamw") is None:
    timed = ((floors or {}).get(rec["size"]) or {}).get(entry[0])
    if timed is None:
      return None
    rec["floor_program"] = entry[0]
    rec["floor_program_vs_optax_adamw"] = timed["vs_optax_adamw"]
  return entry[0], rec["floor_program_vs_optax_adamw"] * base["step_ms"]


def roofline(records: list[dict], copy_gbs: float, gflops: float | None = None,
             exp_gelems: float | None = None, floors: dict | None = None,
             fault_us: float | None = None) -> None:
  """Adds the roofline fields to each speed record, in place: ``ideal_bytes_per_param``,
  ``memory_bound_ms`` (the ideal bytes at the measured copy bandwidth), ``compute_bound_ms``
  (XLA's flop count of the compiled step at the measured matmul throughput ``gflops``, JAX
  records only), ``bound_ms`` (the larger) and ``bound_kind`` ("memory" or "compute"),
  ``vs_bound`` (step / bound), ``xla_bytes_per_param``, ``flops_per_param`` and
  ``achieved_gbs`` (XLA's count of the bytes the compiled step accesses, over the step time),
  and the target and seed comparisons (same size, same run). For an optimizer with a target,
  ``floor``: the floor's ms, its ratio to the baseline's measured step and the reason. With
  ``floors`` (``{size: benchmarks.floors.time_floors(size, ...)}``, on a CPU) the memory part
  of the floor is the optimizer's minimal XLA:CPU program
  (:data:`benchmarks.floors.FLOOR_PROGRAMS`), timed interleaved with optax.adamw: its ratio to
  optax.adamw there, times optax.adamw's step here (``floor_program_vs_optax_adamw``; optax.adamw
  gets one too, the method's check, about 1); without it (a GPU) the one-pass ideal bytes plus
  :data:`FLOORS`' extra reads at the copy bandwidth. The flops and transcendental bounds count
  either way. A record whose minor page faults per step were counted (``faults_per_step``: a
  step's temporaries mapped afresh every call) gets ``fault_mib_per_step`` (the memory faulted
  in, 4 KiB a fault) and, with ``fault_us`` (:func:`page_fault_us`), ``page_fault_us`` (one
  thread's cost per fault on this machine; a step's threads fault in parallel, so it bounds
  their cost from above)."""
  by = {(r["size"], r["optimizer"]): r for r in records if not r.get("error")}
  for r in records:
    if r.get("error") or "state_bytes_per_param" not in r:
      continue
    n = r["n_params"]
    ideal = ideal_bytes_per_param(r["state_bytes_per_param"])
    r["ideal_bytes_per_param"] = ideal
    r["copy_gbs"] = copy_gbs
    r["memory_bound_ms"] = 1e3 * ideal * n / (copy_gbs * 1e9)
    r["bound_ms"], r["bound_kind"] = r["memory_bound_ms"], "memory"
    flops = r.get("flops")
    if gflops and flops is not None and np.isfinite(flops):
      r["matmul_gflops"] = gflops
      r["flops_per_param"] = flops / n
      r["compute_bound_ms"] = 1e3 * flops / (gflops * 1e9)
      if r["compute_bound_ms"] > r["memory_bound_ms"]:
        r["bound_ms"], r["bound_kind"] = r["compute_bound_ms"], "compute"
    r["vs_bound"] = r["step_ms"] / r["bound_ms"]
    if r.get("faults_per_step") is not None:
      r["fault_mib_per_step"] = r["faults_per_step"] * 4096 / 2**20
      if fault_us:
        r["page_fault_us"] = fault_us
    ba = r.get("bytes_accessed")
    if ba is not None and np.isfinite(ba):
      r["xla_bytes_per_param"] = ba / n
      r["achieved_gbs"] = ba / (r["step_ms"] * 1e-3) / 1e9
    prog = _floor_program(r, floors, by)
    if prog is not None:
      r["floor_program"], r["floor_program_ms"] = prog
    base_rec = by.get((r["size"], "optax.adamw"))
    if r["framework"] == "jax" and base_rec is not None:
      r["compile_vs_optax_adamw"] = r["compile_s"] / base_rec["compile_s"]
    if r["optimizer"] in TARGETS:
      base, ratio = TARGETS[r["optimizer"]]
      b = by.get((r["size"], base))
      if b is not None:
        measured = relative(r, b)
        r["target"] = {"baseline": base, "ratio": ratio, "measured": measured,
                       "met": measured <= ratio}
        if prog is not None or (not floors and r["optimizer"] in FLOORS):
          if prog is not None:
            extra, why = None, F.FLOOR_PROGRAMS[r["optimizer"]][1]
            parts = {"passes": prog[1]}
          else:
            extra, why = FLOORS[r["optimizer"]]
            parts = {"memory": 1e3 * (ideal + extra) * n / (copy_gbs * 1e9)}
          if r.get("compute_bound_ms") is not None:
            parts["flops"] = r["compute_bound_ms"]
          tr = r.get("transcendentals")
          if exp_gelems and tr is not None and np.isfinite(tr):
            parts["transcendentals"] = 1e3 * tr / (exp_gelems * 1e9)
          kind = max(parts, key=parts.get)
          r["floor"] = {"ms": parts[kind], "kind": kind, "parts_ms": parts,
                        "extra_bytes_per_param": extra, "reason": why,
                        "ratio": parts[kind] / b["step_ms"],
                        "reachable": parts[kind] / b["step_ms"] <= ratio}
          if prog is not None:
            r["floor"]["program"] = prog[0]
            if r.get("floor_program_compile_s") and base_rec is not None:
              r["floor"]["compile_vs_optax_adamw"] = (r["floor_program_compile_s"]
                                                      / base_rec["compile_s"])
    if r["optimizer"] in SEEDS:
      sd = by.get((r["size"], SEEDS[r["optimizer"]]))
      if sd is not None:
        r["vs_seed"] = {"seed": SEEDS[r["optimizer"]], "ratio": relative(r, sd)}


#: ``stax.scao`` variants timed by phase: the default (low-rank, rank up to 128 per side) and
#: the same at rank up to 32 (its preconditioner's four m·n·K products are compute-bound, so
#: the step scales with K). The faithful ``scao-0.2.4`` mode, with full curvature matrices,
#: took 66 s per refresh at 16M on this CPU: add ``("stax.scao[scao-0.2.4]", {"mode":
#: "scao-0.2.4"})`` to time it.
SCAO_PHASE_VARIANTS = (("stax.scao", {}), ("stax.scao[k_max=32]", {"k_max": 32}))


def _scao_plans(size: str, k_max: int, k_min: int, max_precond_dim: int) -> list:
  """The low-rank plans ``stax.scao`` makes for the GPT parameter set ``size`` (vectors, sides
  of 1 and sides above ``max_precond_dim`` pass through)."""
  from stax.transforms.kron.lowrank import _plan
  plans = []
  for leaves in _gpt_shapes(param_shapes(size)).values():
    for shape in leaves.values():
      if len(shape) == 2:
        plan = _plan(shape[0], shape[1], k_min, k_max, max_precond_dim)
        if plan is not None:
          plans.append(plan)
  return plans


def scao_precond_flops(size: str, k_max: int = 128, k_min: int = 8,
                       max_precond_dim: int = 4096) -> float:
  """Flops of the low-rank preconditioner on the GPT parameter set ``size``: four m·n·K
  products per preconditioned matrix (``stax.transforms.kron.lowrank``), 8·m·n·K flops, with
  the plan ``stax.scao`` makes."""
  return sum(8.0 * p.m * p.n * p.kmax for p in _scao_plans(size, k_max, k_min, max_precond_dim))


def scao_refresh_flops(size: str, k_max: int = 128, k_min: int = 8,
                       max_precond_dim: int = 4096) -> float:
  """A lower bound on a low-rank curvature update's flops on the GPT parameter set ``size``:
  per matrix and side, the subspace iteration's two products with the gradient (``G·Ω`` and
  ``Qᵀ·G``: 2·m·n·K + 4·m·n·K) and the Householder QR of the side's dim × 2K block with its
  explicit Q (≈ 16·dim·K²); the 2K×2K eigendecompositions and the small products not
  counted."""
  return sum(12.0 * p.m * p.n * p.kmax + 16.0 * (p.m + p.n) * p.kmax ** 2
             for p in _scao_plans(size, k_max, k_min, max_precond_dim))


def scao_phases(size: str = "16M", *, warmup_steps: int = 20, precond_freq: int = 20,
                periods: int = 1, variants=SCAO_PHASE_VARIANTS, log=print) -> list[dict]:
  """Step time of each ``stax.scao`` variant (``(name, keyword arguments)``; default
  :data:`SCAO_PHASE_VARIANTS`) in each phase, and amortised over its period.

  One donated compiled step runs on a fixed gradient, each call timed, until ``periods``
  preconditioned refresh steps and a period of preconditioned steps were seen. A step is
  *preconditioned* when the state says so afterwards (``stax.scao_diagnostics``'s ``phase``:
  after ``warmup_steps`` *and* ``min_precond_updates`` curvature updates, so by default from
  step 41 with a period of 20, recorded as ``first_precond_step``), a *warm-up* step before;
  either is also a *refresh* step when ``t % precond_freq == 0`` (the curvature update,
  :mod:`stax.transforms.kron._schedule`). (Before 2026-12-05 the phase was read from the step
  number alone, so the "preconditioned" steps of the default schedule were warm-up steps.)
  Reported per mode: the median of each phase, and the amortised preconditioned step
  ``(refresh + (precond_freq - 1) * preconditioned) / precond_freq``, with ``optax.adamw``'s
  median step from the same process (its ratio is the speed issue's target, <= 1.5), and the
  amortised step's floor: it can go no faster than AdamW's passes with the non-finite check
  (the ``adamw+check`` floor program of :mod:`benchmarks.floors`, timed interleaved with
  optax.adamw here: the Adam core runs on the preconditioned gradient), plus the
  preconditioner's products (:func:`scao_precond_flops`) and the refresh's
  (:func:`scao_refresh_flops`, over the period) at the matmul rate measured here: XLA:CPU runs
  the matrix products and the bandwidth-bound passes one after the other, so their times add.
  (Until 2026-12-06 the floor was the larger of the ideal bytes at the copy bandwidth and the
  preconditioner's products alone: 0.68× optax.adamw at ``k_max=32``, which no step with
  Adam's passes could reach.)
  """
  import jax
  import jax.numpy as jnp
  import optax

  import stax
  from benchmarks.optimizers import WEIGHT_DECAY
  params_np, order = make_params(size)
  runs = {"base": prepare_jax(optax.adamw(1e-3, weight_decay=WEIGHT_DECAY), params_np)[:2],
          "passes": F._compiled_program("adamw+check", params_np, order[-1])}
  times = interleave(runs, rounds=5)
  base_ms, passes_ms = (1e3 * statistics.median(times[k]) for k in ("base", "passes"))
  del runs
  gflops = matmul_gflops()
  out = []
  for name, kwargs in variants:
    mode = kwargs.get("mode", "lowrank")
    try:
      tx = stax.scao(1e-3, weight_decay=WEIGHT_DECAY, warmup_steps=warmup_steps,
                     precond_freq=precond_freq, **kwargs)
      params = jax.tree.map(jnp.asarray, params_np)
      rng = np.random.default_rng(1)
      grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32)
                                                 * 1e-3), params_np)

      def step(p, s, g, tx=tx):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      state = jax.jit(tx.init)(params)
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
      phases = {"warmup": [], "warmup_refresh": [], "precond": [], "refresh": []}
      first_precond, t = None, 0
      limit = warmup_steps + (periods + 4) * precond_freq
      while t < limit and (len(phases["refresh"]) < periods
                           or len(phases["precond"]) < precond_freq - 1):
        t += 1
        t0 = time.perf_counter()
        params, state = compiled(params, state, grads)
        jax.block_until_ready((params, state))
        ms = 1e3 * (time.perf_counter() - t0)
        # the step's phase from the state (preconditioning starts after the warm-up *and*
        # min_precond_updates refreshes, so not at warmup_steps + 1 by default)
        pre = int(stax.scao_diagnostics(state)["phase"]) == 1
        first_precond = t if pre and first_precond is None else first_precond
        refresh = t % precond_freq == 0
        key = ("refresh" if refresh else "precond") if pre else (
            "warmup_refresh" if refresh else "warmup")
        phases[key].append(ms)
      med = {k: (statistics.median(v) if v else None) for k, v in phases.items()}
      amort = (med["refresh"] + (precond_freq - 1) * med["precond"]) / precond_freq
      rec = {"size": size, "optimizer": name, "mode": mode, "warmup_steps": warmup_steps,
             "precond_freq": precond_freq, "first_precond_step": first_precond,
             "optax_adamw_ms": base_ms,
             **{f"{k}_ms": v for k, v in med.items()}, "amortised_ms": amort,
             "amortised_vs_optax_adamw": amort / base_ms,
             "warmup_vs_optax_adamw": med["warmup"] / base_ms, "error": None}
      if mode == "lowrank":
        k = kwargs.get("k_max", 128)
        parts = {"passes": passes_ms,
                 "products": 1e3 * scao_precond_flops(size, k) / (gflops * 1e9),
                 "refresh": 1e3 * scao_refresh_flops(size, k) / (gflops * 1e9) / precond_freq}
        floor_ms = sum(parts.values())
        rec["floor"] = {"ms": floor_ms, "kind": "passes + flops", "parts_ms": parts,
                        "ratio": floor_ms / base_ms, "reachable": floor_ms / base_ms <= 1.5,
                        "matmul_gflops": gflops}
        rec["target"] = {"value": 1.5, "met": amort / base_ms <= 1.5}
    except Exception as e:  # noqa: BLE001 - one mode failing must not stop the run
      rec = {"size": size, "optimizer": name, "mode": mode, "error": f"{type(e).__name__}: {e}"}
      log(f"  scao phases {name}: {rec['error']}")
    out.append(rec)
  return out


MEMORY_ENTRIES = ("optax.adamw", "stax.adamw", "stax.stam_lite", "stax.turbo_adam",
                  "stax.turbo_adam[stax]", "stax.turbo_adam[chunked]",
                  "stax.turbo_adam[turboadam-0.2]")


def _memory_tx(name: str):
  import optax

  import stax
  from benchmarks.optimizers import WEIGHT_DECAY
  wd = WEIGHT_DECAY
  return {"optax.adamw": lambda: optax.adamw(1e-3, weight_decay=wd),
          "stax.adamw": lambda: stax.adamw(1e-3, weight_decay=wd),
          "stax.stam_lite": lambda: stax.stam_lite(1e-3, weight_decay=wd),
          "stax.turbo_adam": lambda: stax.turbo_adam(1e-3, weight_decay=wd),
          "stax.turbo_adam[stax]": lambda: stax.turbo_adam(1e-3, weight_decay=wd, codec="stax"),
          "stax.turbo_adam[chunked]": lambda: stax.turbo_adam(1e-3, weight_decay=wd, codec="stax",
                                                              implementation="chunked"),
          "stax.turbo_adam[turboadam-0.2]": lambda: stax.turbo_adam(
              1e-3, weight_decay=wd, codec="turboadam-0.2")}[name]()


def _memory_records(size: str, names) -> list[dict]:
  """Peak memory of each optimizer's step at ``size`` under this process's XLA flags."""
  import jax
  import jax.numpy as jnp
  import optax

  shapes = _gpt_shapes(param_shapes(size))
  params = {m: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in leaves.items()}
            for m, leaves in shapes.items()}
  out = []
  for name in names:
    tx = _memory_tx(name)

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    t0 = time.perf_counter()
    state = jax.eval_shape(tx.init, params)
    m = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile(
        ).memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    out.append({"size": size, "n_params": n_params_of(size), "optimizer": name,
                "argument_gib": m.argument_size_in_bytes / 2 ** 30,
                "temp_gib": m.temp_size_in_bytes / 2 ** 30, "peak_gib": peak / 2 ** 30,
                "compile_s": time.perf_counter() - t0})
  return out


def step_memory(size: str = "128M", names=MEMORY_ENTRIES, log=print) -> list[dict]:
  """Peak memory of one donated, jitted ``update`` + ``apply_updates`` step at ``size``, from
  XLA's buffer assignment (``compiled.memory_analysis()``; compiled on abstract shapes, nothing
  is allocated): arguments (params, state, gradients) + outputs not aliased to a donated
  argument + temporaries. Each optimizer is compiled with XLA's default CPU scheduler (in this
  process) and with :data:`stax.LEAN_MEMORY_FLAG` (in a subprocess: XLA reads the flag when it
  creates its backend). ``vs_optax_adamw`` is the peak over ``optax.adamw``'s with the default
  scheduler (the speed issue's target for TurboAdam: <= 1).
  """
  import stax
  names = list(names)
  recs = [dict(r, scheduler="default") for r in _memory_records(size, names)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["XLA_FLAGS"] = stax.lean_memory_xla_flags(env.get("XLA_FLAGS"))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "benchmarks.speed", "--memory-child", size, *names]
  out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
  try:
    lean = json.loads(out.stdout.strip().splitlines()[-1])
  except (IndexError, json.JSONDecodeError):
    raise RuntimeError(f"step_memory: the lean-scheduler child failed: {out.stderr[-800:]}")
  by_name = {r["optimizer"]: r for r in lean}
  base = recs[0]["peak_gib"]
  result = []
  for r in recs:
    for rec in (r, dict(by_name[r["optimizer"]], scheduler="lean")):
      rec["vs_optax_adamw"] = rec["peak_gib"] / base
      log(f"  step memory {size} {rec['optimizer']} ({rec['scheduler']}): peak "
          f"{rec['peak_gib']:.2f} GiB, temporaries {rec['temp_gib']:.2f} GiB "
          f"({rec['vs_optax_adamw']:.2f}x {names[0]})")
      result.append(rec)
  return result


def torch_step(make_opt, params_np, module_order):
  """A torch optimizer's step on a fixed gradient, prepared for :func:`interleave`.

  Returns ``((step, args), optimizer)``: ``step(*args)`` runs ``optimizer.step()`` and hands
  ``args`` back, the shape of a prepared JAX step, so torch and JAX steps share one loop.
  """
  import torch

  from benchmarks.quality import torch_module
  module, _ = torch_module(params_np, module_order)
  rng = np.random.default_rng(1)
  for p in module.parameters():
    p.grad = torch.as_tensor(rng.standard_normal(tuple(p.shape), dtype=np.float32) * 1e-3)
  opt = make_opt(module)

  def step(a, b):
    opt.step()
    return a, b

  return (step, [None, None]), opt


def time_torch(make_opt, params_np, module_order, *, steps: int, warmup: int = 2):
  """(median_ms, min_ms, first_step_s, state_bytes) for a torch optimizer, timed on its own."""
  from benchmarks.quality import torch_state_bytes
  (step, args), opt = torch_step(make_opt, params_np, module_order)
  first = _call(step, args)
  for _ in range(max(0, warmup - 1)):
    _call(step, args)
  times = [_call(step, args) for _ in range(steps)]
  return 1e3 * statistics.median(times), 1e3 * min(times), first, torch_state_bytes(opt)


#: Up to this many parameters each JAX step is timed interleaved with optax.adamw's and with
#: its floor program (:func:`interleave`); above it (128M: ~2 GB per optimizer) each step is
#: timed on its own, one optimizer after the other.
INTERLEAVE_MAX_PARAMS = 40_000_000


def _timed_loop(rec: dict, runs: dict, steps: int) -> dict:
  """Interleaves ``runs`` (``"base"``: optax.adamw's step, ``"step"``: the one timed) and
  records the step's median/min ms, optax.adamw's in the loop and their ratio in ``rec``;
  returns the times. Raises when the step failed."""
  faults = {}
  times = interleave(runs, rounds=max(1, -(-steps // 2)), calls=2, faults=faults)
  if isinstance(times["step"], str):
    raise RuntimeError(times["step"])
  b, m = statistics.median(times["base"]), statistics.median(times["step"])
  rec.update(step_ms=1e3 * m, step_ms_min=1e3 * min(times["step"]), optax_adamw_loop_ms=1e3 * b,
             vs_optax_adamw=m / b)
  if faults.get("step"):
    rec["faults_per_step"] = statistics.median(faults["step"])
  if faults.get("floor"):
    rec["floor_program_faults_per_step"] = statistics.median(faults["floor"])
  return times


def run_speed(sizes, optimizers, *, steps: int = 10, progress=None, log=print):
  """Step time + state bytes for every optimizer at every size. Returns a list of records.

  Up to :data:`INTERLEAVE_MAX_PARAMS` parameters each JAX optimizer's step is timed in a loop
  of its own with optax.adamw's step and its floor program (:mod:`benchmarks.floors`),
  interleaved (``steps`` calls each, in rounds of 2): ``vs_optax_adamw`` and
  ``floor_program_vs_optax_adamw`` are ratios within that loop (measured with 30 contenders in
  one loop instead, rounds of several seconds let the machine's drift into the ratios: 1.42×
  where three-way loops gave 1.18× three times in a row). Torch steps too run interleaved up
  to that size: with optax.adamw's step for their own row, and in the loop of a stax step
  whose seed is a torch package, as its partner; above it every step is timed on its own."""
  import jax
  import optax

  records, floors = [], {}
  for size in sizes:
    params, order = make_params(size)
    n = n_params_of(size)
    task = types.SimpleNamespace(module_order=order, name=f"speed-{size}")
    together = n <= INTERLEAVE_MAX_PARAMS
    base = prepare_jax(optax.adamw(1e-3), params)[:2] if together else None
    programs, program_compile_s, partners, recs = {}, {}, {}, []
    by_name = {o.name: o for o in optimizers}
    for opt in optimizers:
      rec = {"size": size, "n_params": n, "optimizer": opt.name, "framework": opt.framework,
             "family": opt.family, "mode": opt.mode, "backend": "cpu", "error": None}
      try:
        if opt.framework == "jax":
          tx = opt.build(1e-3, task)
          rec["state_bytes"] = jax_state_bytes(tx, jax.tree.map(np.asarray, params))
          cost = {}
          if together:
            compiled, args, comp = prepare_jax(tx, params, cost=cost)
            rec.update(compile_s=comp, timing="interleaved", **cost)
            runs = {"base": base, "step": (compiled, args)}
            prog = F.FLOOR_PROGRAMS.get(opt.name, (None,))[0]
            if prog is not None:
              if prog not in programs:
                programs[prog] = F._compiled_program(prog, params, order[-1],
                                                     program_compile_s)
              runs["floor"] = programs[prog]
            for other in _partners(opt.name, by_name):
              if other not in partners:
                po = by_name[other]
                partners[other] = (
                    prepare_jax(po.build(1e-3, task), params)[:2] if po.framework == "jax" else
                    torch_step(lambda m, po=po: po.build(1e-3, m, task), params, order)[0])
              runs["partner:" + other] = partners[other]
            times = _timed_loop(rec, runs, steps)
            rec["vs_partner"] = {
                k.split(":", 1)[1]: statistics.median(times["step"]) / statistics.median(t)
                for k, t in times.items() if k.startswith("partner:") and isinstance(t, list)}
            b = statistics.median(times["base"])
            if isinstance(times.get("floor"), list):
              rec["floor_program"] = prog
              rec["floor_program_vs_optax_adamw"] = statistics.median(times["floor"]) / b
              rec["floor_program_compile_s"] = program_compile_s.get(prog)
            del runs, compiled, args
          else:
            med, mn, comp = time_jax(tx, params, steps=steps, cost=cost)
            rec.update(step_ms=med, step_ms_min=mn, compile_s=comp, timing="alone", **cost)
        elif together:
          from benchmarks.quality import torch_state_bytes
          stepper, topt = torch_step(lambda m: opt.build(1e-3, m, task), params, order)
          first = _call(*stepper)
          _timed_loop(rec, {"base": base, "step": stepper}, steps)
          rec.update(compile_s=first, state_bytes=torch_state_bytes(topt), timing="interleaved")
          del stepper, topt
        else:
          med, mn, first, sb = time_torch(lambda m: opt.build(1e-3, m, task), params, order,
                                          steps=steps)
          rec.update(step_ms=med, step_ms_min=mn, compile_s=first, state_bytes=sb,
                     timing="alone")
        rec["state_bytes_per_param"] = rec["state_bytes"] / n
      except Exception as e:  # noqa: BLE001 - one optimizer failing must not stop the run
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        log(f"  speed {size} {opt.name}: {rec['error']}")
      recs.append(rec)
      if progress is not None:
        progress.update(1)
    del base, programs, partners
    if not together:
      floors[size] = F.time_floors(size, [o.name for o in optimizers], rounds=steps)
    base_ms = next((r["step_ms"] for r in recs if r["optimizer"] == "optax.adamw"
                    and not r["error"]), None)
    for rec in recs:
      if not rec["error"] and "vs_optax_adamw" not in rec:
        rec["vs_optax_adamw"] = rec["step_ms"] / base_ms if base_ms else None
    records += recs
  roofline(records, copy_bandwidth_gbs(), matmul_gflops(), exp_rate_gelems(), floors,
           page_fault_us())
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
  ap.add_argument("--memory-child", nargs="+", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  sizes = [s for s in args.sizes.split(",") if s]
  if args.child:
    print(json.dumps(investigate_child(sizes[0], args.steps)))
    return
  if args.memory_child:
    print(json.dumps(_memory_records(args.memory_child[0], args.memory_child[1:])))
    return
  from benchmarks import optimizers as O
  recs = run_speed(sizes, O.all_optimizers(), steps=args.steps)
  for r in recs:
    print(json.dumps(r))


if __name__ == "__main__":
  main()
