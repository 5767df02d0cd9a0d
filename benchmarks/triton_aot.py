"""The project's Pallas GPU kernels compiled to PTX and a cubin on a machine with no GPU.

``python -m benchmarks.triton_aot [--out FILE] [--arch 90]`` lowers each kernel for CUDA
(``lowering_platforms=("cuda",)``; with jax >= 0.11 under an abstract H200 device, which its
Triton lowering asks for), takes the Triton IR that Pallas generates, and compiles it with the
``triton`` package (``triton.compile`` of the ``.ttir``, ``GPUTarget("cuda", arch, 32)``: Triton's
own passes, LLVM's NVPTX backend and ``ptxas``; no GPU or driver needed). For each distinct
kernel it prints and saves whether it compiled, its PTX and cubin sizes, the rounding of its
float32 divisions, square roots and exponentials in the PTX (Triton emits ``div.full.f32`` and
``.approx`` forms, which are not IEEE-exact: on a GPU the kernel's arithmetic is not XLA's bit
for bit), and ``ptxas -v``'s registers per thread, spill bytes and Triton's shared memory.
The kernels:

* ``turbo_step``: TurboAdam's fused faithful update (:mod:`stax.kernels.turbo_step.pallas`) on
  a 4096 × 4096 leaf, 4-bit v;
* ``newton_schulz``: the Pallas Newton–Schulz (:mod:`stax.kernels.newton_schulz.pallas`) on a
  ``(2, 64, 128)`` batch, five quintic steps (three kernels per step, the same three each).

This checks the stage after the lowering that ``tests/test_kernels_registry.py`` checks: that
Triton accepts what Pallas emits and ``ptxas`` assembles it. It is a proxy for XLA's own
compile on a GPU (XLA bundles its own Triton, not the package's), not a run: numerics and
speed still need a device (``benchmarks/gpu.py``). The project's environment does not hold
``triton`` (a large optional package); run it where ``jax`` and ``triton`` are installed, e.g.::

    python3.12 -m venv /tmp/aot && /tmp/aot/bin/pip install jax optax triton
    JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/aot/bin/python -m benchmarks.triton_aot

It reads Pallas's private lowering entry point
(``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``) to capture the IR, so a jax
release that renames it needs this script updated.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import tempfile
import traceback


def _capture_ttir(fn, *args) -> list[str]:
  """The Triton IR (MLIR text) of every Pallas kernel in ``jax.jit(fn)`` lowered for CUDA."""
  import contextlib

  import jax
  from jax._src.pallas.triton import lowering as tl
  from jax._src.pallas.triton import pallas_call_registration as pr
  dumps: list[str] = []
  orig = tl.lower_jaxpr_to_triton_module

  def hook(*a, **k):
    res = orig(*a, **k)
    dumps.append(res.module.operation.get_asm(enable_debug_info=False))
    return res

  ctx = contextlib.nullcontext()
  if hasattr(jax.sharding, "AbstractDevice"):     # jax >= 0.11: Triton needs a GPU's kind
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType
    mesh = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", num_cores=132, platform="gpu"))
    ctx = jax.sharding.use_abstract_mesh(mesh)
  pr.lowering.lower_jaxpr_to_triton_module = hook
  try:
    with ctx:
      jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    pr.lowering.lower_jaxpr_to_triton_module = orig
  return dumps


def _kernels() -> dict:
  """``{name: (fn, args)}`` of the kernels to compile, their Pallas paths forced on."""
  import jax.numpy as jnp
  import optax

  import stax
  from stax.kernels import _registry as reg
  from stax.kernels.newton_schulz import pallas as nsp
  from stax.kernels.turbo_step import pallas as tp

  reg.platform = lambda: "gpu"
  tp.use_interpret = lambda: False
  p = {"w": jnp.zeros((4096, 4096))}
  tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1,
                       implementation="pallas")

  def turbo(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  polar = ((3.4445, -4.7750, 2.0315),) * 5
  return {"turbo_step": (turbo, (p, tx.init(p), p)),
          "newton_schulz": (lambda t: nsp.newton_schulz_pallas(t, polar, interpret=False),
                            (jnp.ones((2, 64, 128)),))}


def _ptxas_report(ptx: str, arch: int) -> dict:
  """``ptxas -v`` on ``ptx``: registers, spill bytes, shared memory (the first of Triton's
  bundled ``ptxas`` binaries that takes the PTX version)."""
  import triton
  tools = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__),
                                        "backends", "nvidia", "bin", "ptxas*")))
  with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "k.ptx")
    with open(src, "w") as f:
      f.write(ptx)
    for tool in tools:
      r = subprocess.run([tool, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(d, "k.o")],
                         capture_output=True, text=True)
      if r.returncode == 0:
        out = r.stdout + r.stderr
        get = lambda pat: [int(x) for x in re.findall(pat, out)]
        return {"ptxas": os.path.basename(tool), "registers": max(get(r"Used (\d+) registers")
                                                                  or [0]),
                "spill_store_bytes": sum(get(r"(\d+) bytes spill stores")),
                "spill_load_bytes": sum(get(r"(\d+) bytes spill loads"))}
  return {"ptxas": "none of the bundled ptxas binaries took the PTX"}


def run(arch: int = 90) -> dict:
  import jax
  import triton
  from triton.backends.compiler import GPUTarget
  res = {"jax": jax.__version__, "triton": triton.__version__, "arch": arch, "kernels": {}}
  for name, (fn, args) in _kernels().items():
    row: dict = {}
    try:
      irs = _capture_ttir(fn, *args)
      row["pallas_calls"] = len(irs)
      row["distinct"] = []
      for i, ir in enumerate(dict.fromkeys(irs)):         # each distinct kernel once
        with tempfile.TemporaryDirectory() as d:
          path = os.path.join(d, f"{name}_{i}.ttir")
          with open(path, "w") as f:
            f.write(ir)
          k = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": 4, "num_stages": 1})
        one = {"ptx_lines": len(k.asm["ptx"].splitlines()),
               # the rounding of the float operations Triton chose (div.full and the .approx
               # forms are not IEEE-exact, as XLA's divisions and square roots are)
               "ptx_ops": dict(sorted(collections.Counter(re.findall(
                   r"\b((?:div|sqrt|rsqrt|ex2|lg2|rcp)\.[a-z]+(?:\.ftz)?)\.f32",
                   k.asm["ptx"])).items())),
               "cubin_bytes": len(k.asm.get("cubin", b"")),
               "shared_bytes": int(getattr(k.metadata, "shared", 0))}
        one.update(_ptxas_report(k.asm["ptx"], arch))
        row["distinct"].append(one)
      row["compiled"] = True
    except Exception as e:  # noqa: BLE001 - record why a kernel did not compile
      row.update(compiled=False, error=f"{type(e).__name__}: {e}"[:1500])
      traceback.print_exc()
    res["kernels"][name] = row
    print(f"{name:14s} {json.dumps(row)}", flush=True)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None)
  ap.add_argument("--arch", type=int, default=90, help="compute capability (90: H100/H200)")
  args = ap.parse_args(argv)
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  res = run(args.arch)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
