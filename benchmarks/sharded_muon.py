"""Sharded matrix work on an 8-device CPU mesh: Muon's Newton–Schulz and SCAO's refresh.

Newton–Schulz: ``mode="per_leaf"`` against ``"stacked"``. SCAO: the periodic curvature update
(``eigh`` pairs for ``scao-0.2.4``, subspace iterations for ``lowrank``) with
``refresh="replicated"`` (every device repeats every leaf) against ``"owners"`` (each leaf once,
on a balanced owner device, :mod:`stax.owners`); ``--part`` picks (default both).

``python -m benchmarks.sharded_muon [--out FILE]`` builds the hidden matrices of a small GPT
(``--layers`` blocks of q, k, v, o ``(d, d)`` and an MLP ``(d, 4d)``, ``(4d, d)``), places each
on 8 virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before
JAX starts) sharded along its rows, and compiles :func:`stax.orthogonalize_many` over them in
each mode under ``jax.set_mesh``. For each it prints and saves:

* the collectives of the compiled (partitioned) program, from its HLO: count and bytes of each
  kind's per-device result (``all-gather``, ``all-reduce``, ``all-to-all``,
  ``collective-permute``, ``reduce-scatter``), and an estimate of the bytes each device receives
  (all-gather and all-to-all: (n−1)/n of the result; all-reduce: 2(n−1)/n, a ring);
* the median time of one jitted call (the 8 "devices" share this machine's cores, so the time
  says how the work divides, not what 8 real devices would take);
* the largest difference to the unsharded single-device result.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "u8": 1, "pred": 1, "f64": 8}


def collectives(hlo: str, n_dev: int) -> dict:
  """Per kind: the number of collectives in the partitioned HLO and the bytes of their
  per-device results; plus ``received_bytes``, the estimate described in the module doc."""
  out = {k: {"count": 0, "bytes": 0} for k in KINDS}
  pat = re.compile(r"^\s*\S+ = (.*?) (" + "|".join(KINDS) + r")(?:-start)?\(")
  for line in hlo.splitlines():
    m = pat.match(line)
    if not m:
      continue
    size = 0
    for dt, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1)):
      size += _BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += size
  frac = (n_dev - 1) / n_dev
  out["received_bytes"] = int(frac * (out["all-gather"]["bytes"] + out["all-to-all"]["bytes"]
                                      + out["collective-permute"]["bytes"] / frac
                                      + 2 * out["all-reduce"]["bytes"]
                                      + n_dev * out["reduce-scatter"]["bytes"]))
  return out


def shapes(d: int, layers: int):
  return ([(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]) * layers


def run(d: int = 256, layers: int = 4, repeats: int = 10, modes=("per_leaf", "stacked")):
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import stax
  from stax.transforms.orthogonalize import orthogonalize_many

  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(0)
  xs_np = [rng.standard_normal(s).astype(np.float32) for s in shapes(d, layers)]
  dims = [stax.MatrixDimensionNumbers(0, 1)] * len(xs_np)
  ref = jax.jit(lambda xs: orthogonalize_many(xs, dims))([jnp.asarray(x) for x in xs_np])
  res = {"d": d, "layers": layers, "matrices": len(xs_np),
         "params": int(sum(x.size for x in xs_np)), "devices": 8, "modes": {}}
  for mode in modes:
    with jax.set_mesh(mesh):
      xs = [jax.device_put(x, NamedSharding(mesh, P("x", None))) for x in xs_np]
      fn = jax.jit(lambda xs, mode=mode: orthogonalize_many(xs, dims, mode=mode))
      t0 = time.perf_counter()
      compiled = fn.lower(xs).compile()
      compile_s = time.perf_counter() - t0
      y = compiled(xs)
      jax.block_until_ready(y)
      ts = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(xs))
        ts.append(time.perf_counter() - t0)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(y, ref))
    res["modes"][mode] = {"ms": 1e3 * statistics.median(ts), "compile_s": compile_s,
                          "max_abs_diff_vs_one_device": diff,
                          "collectives": collectives(compiled.as_text(), 8)}
    print(json.dumps({mode: res["modes"][mode]}), flush=True)
  return res


def run_scao(d: int = 128, layers: int = 2, repeats: int = 5,
             modes=("lowrank", "scao-0.2.4"), refreshes=("replicated", "owners")):
  """One jitted SCAO preconditioner step that refreshes every leaf (``precond_freq=1``, no
  warm-up) on the GPT matrices of width ``d``, row-sharded over 8 devices, per mode and
  ``refresh``: median time, compile time, collectives and the largest difference of the new
  factors and of the preconditioned gradient to the replicated refresh (absolute, and relative
  to each leaf's largest entry)."""
  import jax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from stax.transforms import kron as K

  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(0)
  gs_np = {f"w{i}": rng.standard_normal(s).astype(np.float32)
           for i, s in enumerate(shapes(d, layers))}
  sched = K.Schedule(warmup_steps=0, precond_freq=1, min_precond_updates=0, blend_steps=0)
  hp = K.KronHyperparams(k_min=8, k_max=32, max_precond_dim=4 * d)
  res = {"d": d, "layers": layers, "matrices": len(gs_np), "devices": 8, "modes": {}}
  for mode in modes:
    make = K.scale_by_kron_lowrank if mode == "lowrank" else K.scale_by_kron_scao
    outs, res["modes"][mode] = {}, {}
    for refresh in refreshes:
      tx = make(schedule=sched, hyperparams=hp, refresh=refresh)
      with jax.set_mesh(mesh):
        g = {k: jax.device_put(v, NamedSharding(mesh, P("x", None))) for k, v in gs_np.items()}
        state = jax.jit(tx.init)(g)
        fn = jax.jit(tx.update)
        t0 = time.perf_counter()
        compiled = fn.lower(g, state).compile()
        compile_s = time.perf_counter() - t0
        outs[refresh] = jax.device_get(compiled(g, state))
        ts = []
        for _ in range(repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(g, state))
          ts.append(time.perf_counter() - t0)
      diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - b)))
                 for a, b in zip(jax.tree.leaves(outs[refresh]),
                                 jax.tree.leaves(outs[refreshes[0]])) if np.size(a))
      rel = max(float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))
                for a, b in zip(jax.tree.leaves(outs[refresh]),
                                jax.tree.leaves(outs[refreshes[0]])) if np.size(a))
      row = {"ms": 1e3 * statistics.median(ts), "compile_s": compile_s,
             f"max_abs_diff_vs_{refreshes[0]}": diff,
             f"max_rel_diff_vs_{refreshes[0]}": rel,
             "collectives": collectives(compiled.as_text(), 8)}
      res["modes"][mode][refresh] = row
      print(json.dumps({mode: {refresh: row}}), flush=True)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--scao-d", type=int, default=128)
  ap.add_argument("--scao-layers", type=int, default=2)
  ap.add_argument("--part", choices=("all", "muon", "scao"), default="all")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  res = {}
  if args.part in ("all", "muon"):
    res = run(args.d, args.layers, args.repeats)
  if args.part in ("all", "scao"):
    res["scao"] = run_scao(args.scao_d, args.scao_layers, max(1, args.repeats // 2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
