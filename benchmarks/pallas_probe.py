"""Which Pallas building blocks a GPU kernel of the codecs can use, and whether they match XLA.

``python -m benchmarks.pallas_probe [--out FILE]`` runs small ``pallas_call`` kernels through the
Triton lowering (``jax.experimental.pallas.triton.CompilerParams``) and compares each with the
same ``jax.numpy`` expression compiled by XLA on the same device: float division, ``exp``,
``log``, ``sqrt``, strided ref loads and stores (``pl.ds(start, n, stride=2)``, nibble pairs
without reshapes), a last-axis reshape split with a block reduction, the counter hash in uint32
arithmetic, bf16 rounding and its next value up by bit increment, and a 2-D iota. For each it
prints and saves whether it lowers, whether it runs, and the largest difference to XLA in units
in the last place (0: bit for bit). On a CPU it only records which kernels *lower* for CUDA
(``lowering_platforms=("cuda",)``).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np


def _probes():
  from jax.experimental import pallas as pl

  def ew(fn):
    def kernel(x_ref, y_ref, o_ref):
      o_ref[...] = fn(x_ref[...], y_ref[...])
    return kernel, fn

  def strided(x_ref, y_ref, o_ref):
    del y_ref
    o_ref[...] = x_ref[:, pl.ds(0, 64, stride=2)] * 2.0 + x_ref[:, pl.ds(1, 64, stride=2)]

  def strided_ref(x, y):
    del y
    return x[:, 0::2] * 2.0 + x[:, 1::2]

  def block_max(x_ref, y_ref, o_ref):
    del y_ref
    o_ref[...] = jnp.max(jnp.abs(x_ref[...]).reshape(8, 4, 32), axis=-1)

  def block_max_ref(x, y):
    del y
    return jnp.max(jnp.abs(x).reshape(8, 4, 32), axis=-1)

  def mix32(x, y):
    del y
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    u = u ^ (u >> jnp.uint32(16))
    u = u * jnp.uint32(0x7FEB352D)
    u = u ^ (u >> jnp.uint32(15))
    u = u * jnp.uint32(0x846CA68B)
    u = u ^ (u >> jnp.uint32(16))
    return (u >> jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0 ** -24)

  def bf16_up(x, y):
    del y
    s = jnp.abs(x).astype(jnp.bfloat16)
    b = jax.lax.bitcast_convert_type(s, jnp.uint16) + jnp.uint16(1)
    return jax.lax.bitcast_convert_type(b, jnp.bfloat16).astype(jnp.float32)

  def bf16_up_ref(x, y):
    del y
    s = jnp.abs(x).astype(jnp.bfloat16)
    return jnp.nextafter(s, jnp.full_like(s, jnp.inf)).astype(jnp.float32)

  def iota(x, y):
    del y
    i = (jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) * jnp.uint32(x.shape[1])
         + jax.lax.broadcasted_iota(jnp.uint32, x.shape, 1))
    return x + i.astype(jnp.float32)

  def tail_nibbles(x, y):
    del y
    k = (jnp.abs(x) * 7.0).astype(jnp.int32) & 15
    return ((k & 3) + (k >> 2)).astype(jnp.float32)

  out = {}
  for name, fn in (("div", lambda x, y: x / y), ("exp", lambda x, y: jnp.exp(x)),
                   ("log", lambda x, y: jnp.log(jnp.abs(y))),
                   ("sqrt", lambda x, y: jnp.sqrt(jnp.abs(x)) + y),
                   ("fma-shaped a*b+c", lambda x, y: x * y + 0.1),
                   ("uint32 counter hash", mix32), ("bf16 round up by bits", bf16_up),
                   ("2-D iota", iota), ("int nibble ops", tail_nibbles)):
    kernel, ref = ew(fn)
    out[name] = (kernel, bf16_up_ref if name == "bf16 round up by bits" else ref, (8, 128))
  out["strided ref loads"] = (strided, strided_ref, (8, 64))
  out["reshape split + block max"] = (block_max, block_max_ref, (8, 4))
  return out


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
  ai = a.astype(np.float32).view(np.int32).astype(np.int64)
  bi = b.astype(np.float32).view(np.int32).astype(np.int64)
  return int(np.max(np.abs(ai - bi))) if a.size else 0


def run() -> dict:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
  params = pltriton.CompilerParams(num_warps=4, num_stages=1)
  gpu = jax.default_backend() == "gpu"
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((8, 128)) + 3.0, jnp.float32)
  res = {"backend": jax.default_backend(), "jax": jax.__version__,
         "device": str(jax.devices()[0]), "probes": {}}
  for name, (kernel, ref, out_shape) in _probes().items():
    call = lambda a, b, kernel=kernel, out_shape=out_shape: pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=params)(a, b)
    row = {}
    try:
      jax.jit(call).trace(x, y).lower(lowering_platforms=("cuda",))
      row["lowers"] = True
    except Exception as e:  # noqa: BLE001 - a probe records why
      row["lowers"], row["error"] = False, str(e).splitlines()[0][:200]
    if gpu and row["lowers"]:
      try:
        got = np.asarray(jax.jit(call)(x, y))
        want = np.asarray(jax.jit(ref)(x, y))
        row["runs"] = True
        row["max_ulps_vs_xla"] = _ulps(got, want)
        row["max_abs_vs_xla"] = float(np.max(np.abs(got - want)))
      except Exception as e:  # noqa: BLE001
        row["runs"], row["error"] = False, str(e).splitlines()[0][:200]
    res["probes"][name] = row
    print(f"{name:28s} {json.dumps(row)}", flush=True)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  res = run()
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
