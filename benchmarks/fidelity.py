"""Multi-step fidelity of the compressed Adam moments (TurboAdam; peers.md §5.4.6).

v: one 128-element block, Gaussian gradients whose per-element scales are log-uniform over a
range, beta2 = 0.999, T = 3000 steps; the stored v is re-encoded every step exactly as the
optimizer does (decode -> EMA -> stochastic re-encode). Reported: p5/p50/p95 of v_hat/v_exact over
elements and the last 1000 steps, and the p95 of the update amplification sqrt(v_exact/v_hat).

m: g = mu + 1e-2·N(0, 1) with per-element mean mu at signal-to-noise ratio SNR (mu = SNR·1e-2·z),
exact v (to isolate m), beta1 = 0.9; reported: mean cos(m_hat, m_exact) over the last 1000 steps
for UState (0.2.0) and stax's blockwise signed 4-bit m (blocks of 32, bf16 scale; "signed4_128":
blocks of 128; a trailing "n": nearest instead of stochastic rounding).

v on a matrix (``v_matrix``): a 64×128 matrix of Gaussian gradients whose scales are rank-1
(``s_ij = a_i b_j``, a and b log-uniform so s spans [1e-3, 1e-1]), rank-1 times a per-element
factor log-uniform in [1/2, 2] (``"rank1x2"``), or per element log-uniform over the same range
(``"unstructured"``): the stored v of the factored codec (Adafactor's row/column means, decoded
as their rank-1 estimate) and of the 1Q log codec (4 bits, blocks of 128 along the rows) against
the exact EMA, same percentiles.

Run: ``python benchmarks/fidelity.py`` (writes benchmarks/results/fidelity.json).
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from stax.codecs import block_signed as BS
from stax.codecs.factored import Factored
from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs.rng import counter_uniform, seed_for
from stax.codecs.turbo import bias_corrections

BLOCK = 128


def v_fidelity(bits: int, lo: float, hi: float, steps: int = 3000, b2: float = 0.999,
               seed: int = 0, n: int = BLOCK) -> dict:
  """p5/p50/p95 of v_hat/v for the 1Q codec at ``bits`` on a block with scales in [lo, hi]."""
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n)).astype(np.float32)
  g = jnp.asarray(rng.normal(size=(steps, n)).astype(np.float32) * scales)
  idx = jnp.arange(n, dtype=jnp.uint32)

  def body(carry, xs):
    enc, v_exact = carry
    t, gt = xs
    v_hat = LQ.log_decode(enc, bits, BLOCK, n)
    v_new = b2 * v_hat + (1 - b2) * gt * gt
    v_exact = b2 * v_exact + (1 - b2) * gt * gt
    u = counter_uniform(idx, seed_for(seed + 1, t, 0, 0, 2))
    enc = LQ.log_encode(v_new, bits, BLOCK, u)
    # The optimizer's denominator at step t+1 uses the persisted v times beta2 (+ new g^2);
    # report the persisted v against the exact EMA.
    ratio = LQ.log_decode(enc, bits, BLOCK, n) / v_exact
    return (enc, v_exact), ratio

  enc0 = LQ.log_init(jnp.zeros((n,)), bits, BLOCK)
  _, ratios = jax.jit(lambda: jax.lax.scan(
      body, (enc0, jnp.zeros((n,), jnp.float32)),
      (jnp.arange(1, steps + 1, dtype=jnp.int32), g)))()
  r = np.asarray(ratios[-1000:]).ravel()
  amp = np.sqrt(1.0 / r)
  return {"bits": bits, "scale_range": [lo, hi], "p5": float(np.percentile(r, 5)),
          "p50": float(np.percentile(r, 50)), "p95": float(np.percentile(r, 95)),
          "mean": float(r.mean()), "update_amp_p95": float(np.percentile(amp, 95)),
          "update_amp_max": float(amp.max())}


def _matrix_scales(structure: str, shape, lo: float, hi: float, rng) -> np.ndarray:
  m, n = shape
  half = lambda k: np.exp(rng.uniform(np.log(lo) / 2, np.log(hi) / 2, size=k))
  if structure == "unstructured":
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size=shape))
  s = np.outer(half(m), half(n))
  if structure == "rank1x2":
    s = s * np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=shape))
  return s


def v_matrix_fidelity(codec: str, structure: str, steps: int = 3000, b2: float = 0.999,
                      seed: int = 0, shape=(64, 128), lo: float = 1e-3, hi: float = 1e-1) -> dict:
  """p5/p50/p95 of the stored v over the exact EMA for ``codec`` ("factored" or "log4") on a
  matrix whose gradient scales have ``structure`` (see the module docstring)."""
  rng = np.random.default_rng(seed)
  scales = _matrix_scales(structure, shape, lo, hi, rng).astype(np.float32)
  c = Factored() if codec == "factored" else LQ.LogQuantCodec(4, BLOCK)
  like = jnp.zeros(shape, jnp.float32)
  key0 = jax.random.key_data(jax.random.PRNGKey(seed + 1))

  def body(carry, t):
    enc, v_exact = carry
    gt = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), t), shape) * scales
    v_new = b2 * c.decode(enc, like) + (1 - b2) * gt * gt
    v_exact = b2 * v_exact + (1 - b2) * gt * gt
    enc = c.encode(v_new, jax.random.fold_in(key0, t))
    return (enc, v_exact), c.decode(enc, like) / v_exact

  _, ratios = jax.jit(lambda: jax.lax.scan(body, (c.init(like), like),
                                           jnp.arange(1, steps + 1)))()
  r = np.asarray(ratios[-1000:]).ravel()
  amp = np.sqrt(1.0 / r)
  bits = 32 * sum(shape) / np.prod(shape) if codec == "factored" else 4 + 32 / BLOCK
  return {"codec": codec, "structure": structure, "shape": list(shape), "scale_range": [lo, hi],
          "v_bits": float(bits), "p5": float(np.percentile(r, 5)),
          "p50": float(np.percentile(r, 50)), "p95": float(np.percentile(r, 95)),
          "update_amp_p95": float(np.percentile(amp, 95)), "update_amp_max": float(amp.max())}


def m_fidelity(codec: str, snr: float, steps: int = 3000, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, seed: int = 0, n: int = 4 * BLOCK) -> dict:
  """mean cos(m_hat, m_exact) over the last 1000 steps, exact v (isolates m's codec)."""
  rng = np.random.default_rng(seed)
  mu = (snr * 1e-2 * rng.normal(size=n)).astype(np.float32)
  g = jnp.asarray(mu + 1e-2 * rng.normal(size=(steps, n)).astype(np.float32))
  m_block = 64
  mb_signed = BLOCK if "128" in codec else 32
  idx = jnp.arange(n, dtype=jnp.uint32)

  def body(carry, xs):
    enc, m_exact, v, = carry
    t, gt = xs
    tf = t.astype(jnp.float32)
    v = b2 * v + (1 - b2) * gt * gt
    if codec == "ustate":
      c1p, c2p = bias_corrections(b1, b2, tf - 1)
      c2p = jnp.where(t > 1, c2p, 1.0)
      v_prev = (v - (1 - b2) * gt * gt) / b2
      m_hat = US.ustate_decode(enc, n, m_block, BLOCK) * c1p * (jnp.sqrt(v_prev) / c2p + eps)
    else:
      m_hat = BS.signed_decode(enc, 4, mb_signed, n)
    m_new = b1 * m_hat + (1 - b1) * gt
    m_exact = b1 * m_exact + (1 - b1) * gt
    u = counter_uniform(idx, seed_for(seed + 1, t, 0, 0, 1))
    if codec == "ustate":
      c1, c2 = bias_corrections(b1, b2, tf)
      enc = US.ustate_encode(m_new / c1 / (jnp.sqrt(v) / c2 + eps), enc, u, n, m_block, BLOCK)
      m_dec = US.ustate_decode(enc, n, m_block, BLOCK) * c1 * (jnp.sqrt(v) / c2 + eps)
    else:
      enc = BS.signed_encode(m_new, 4, mb_signed, None if codec.endswith("n") else u)
      m_dec = BS.signed_decode(enc, 4, mb_signed, n)
    cos = jnp.sum(m_dec * m_exact) / (jnp.linalg.norm(m_dec) * jnp.linalg.norm(m_exact) + 1e-30)
    return (enc, m_exact, v), cos

  if codec == "ustate":
    enc0 = US.ustate_init(jnp.zeros((n,)), m_block, BLOCK)
  else:
    enc0 = BS.signed_init(jnp.zeros((n,)), 4, mb_signed)
  z = jnp.zeros((n,), jnp.float32)
  _, cos = jax.jit(lambda: jax.lax.scan(body, (enc0, z, z),
                                        (jnp.arange(1, steps + 1, dtype=jnp.int32), g)))()
  c = np.asarray(cos[-1000:])
  return {"codec": codec, "snr": snr, "cos_mean": float(c.mean()), "cos_p5": float(np.percentile(c, 5))}


BITS_PER_PARAM = {  # large tensors, from the state arrays (see stax.state_bits_per_param)
    "turboadam-0.2 (UState m + 1Q v4)": 2 + 16 / 64 + 4 + 32 / 128,
    "stax (signed m4/32 + 1Q v4)": 4 + 16 / 32 + 4 + 32 / 128,
    "stax (signed m4/32 + 1Q v6)": 4 + 16 / 32 + 6 + 32 / 128,
    "stax (signed m4/32 + 1Q v8)": 4 + 16 / 32 + 8 + 32 / 128,
    "UState m + 1Q v8": 2 + 16 / 64 + 8 + 32 / 128,
    "fp32 AdamW": 64.0,
    "factored (signed m4/32 + row/col v), 1024x1024": 4 + 16 / 32 + 32 * 2048 / 1024 ** 2,
}


def main(steps: int = 3000) -> dict:
  out = {"steps": steps, "v": [], "m": [], "bits_per_param": BITS_PER_PARAM}
  for bits in (4, 6, 8):
    for lo, hi in ((0.05, 0.05), (3e-2, 1e-1), (1e-3, 1e-1)):
      out["v"].append(v_fidelity(bits, lo, hi, steps))
  out["v_matrix"] = [v_matrix_fidelity(codec, structure, steps)
                     for structure in ("rank1", "rank1x2", "unstructured")
                     for codec in ("factored", "log4")]
  for codec in ("ustate", "signed4", "signed4_128", "signed4n"):
    for snr in (0.0, 0.3, 1.0):
      out["m"].append(m_fidelity(codec, snr, steps))
  return out


if __name__ == "__main__":
  res = main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
  path = pathlib.Path(__file__).parent / "results" / "fidelity.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(res, indent=1))
  for r in res["v"]:
    print(f"v{r['bits']} {r['scale_range']}: p5-p95 {r['p5']:.2f}-{r['p95']:.2f} "
          f"median {r['p50']:.2f} amp p95 {r['update_amp_p95']:.2f}")
  for r in res["v_matrix"]:
    print(f"v {r['codec']:8s} {r['structure']:12s}: p5-p95 {r['p5']:.2f}-{r['p95']:.2f} "
          f"median {r['p50']:.2f} amp p95 {r['update_amp_p95']:.2f}")
  for r in res["m"]:
    print(f"m {r['codec']} snr {r['snr']}: cos {r['cos_mean']:.3f} (p5 {r['cos_p5']:.3f})")
