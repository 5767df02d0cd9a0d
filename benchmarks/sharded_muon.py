"""Sharded Newton–Schulz on an 8-device CPU mesh: ``mode="per_leaf"`` against ``"stacked"``.

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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  res = run(args.d, args.layers, args.repeats)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
