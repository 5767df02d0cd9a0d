"""Picks SCAO's default mode: AdamW vs scao(mode="scao-0.2.4") vs scao(mode="lowrank").

Task: a 2-layer tanh MLP (32 → 64 → 16) regressing a random teacher MLP on inputs with
ill-conditioned features (scales 0.1 … 10), minibatch 64, 600 steps, 3 seeds, lr 3e-3,
SCAO with warmup_steps=100, precond_freq=10, blend_steps=20, k_min=2, k_max=16 — and the same
task with the loss scaled by 1e-3 (a loss-scale change that Adam-type methods should ignore).
Reports the mean training loss over the last 50 steps (scaled back) and the µs per step after
compilation. Run: ``python benchmarks/scao_modes.py`` (CPU, about a minute).
"""

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import stax  # noqa: E402

STEPS, BATCH = 600, 64


def problem(seed):
  rng = np.random.default_rng(seed)
  scales = np.geomspace(0.1, 10.0, 32)
  x = rng.normal(size=(4096, 32)) * scales
  w1t, w2t = rng.normal(size=(32, 64)) / scales[:, None] / 4, rng.normal(size=(64, 16)) / 8
  y = np.tanh(x @ w1t) @ w2t
  params = {"l1": {"kernel": jnp.asarray(rng.normal(size=(32, 64)) * 0.05, jnp.float32),
                   "bias": jnp.zeros(64)},
            "l2": {"kernel": jnp.asarray(rng.normal(size=(64, 16)) * 0.1, jnp.float32),
                   "bias": jnp.zeros(16)}}
  return params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def loss_fn(p, x, y):
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)


def run(tx, seed, scale):
  params, x, y = problem(seed)

  @jax.jit
  def train(params):
    def body(carry, i):
      p, s = carry
      idx = (i * BATCH + jnp.arange(BATCH)) % x.shape[0]
      l, g = jax.value_and_grad(lambda q: scale * loss_fn(q, x[idx], y[idx]))(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), l / scale
    return jax.lax.scan(body, (params, tx.init(params)), jnp.arange(STEPS))[1]

  losses = train(params).block_until_ready()
  t = time.perf_counter()
  losses = train(params).block_until_ready()
  return float(jnp.mean(losses[-50:])), (time.perf_counter() - t) / STEPS * 1e6


def main():
  kw = dict(warmup_steps=100, precond_freq=10, blend_steps=20, k_min=2, k_max=16,
            weight_decay=0.0)
  configs = {"adamw": lambda: stax.adamw(3e-3, weight_decay=0.0),
             "scao-0.2.4": lambda: stax.scao(3e-3, mode="scao-0.2.4", **kw),
             "lowrank": lambda: stax.scao(3e-3, mode="lowrank", **kw)}
  results = {}
  for name, make in configs.items():
    for scale in (1.0, 1e-3):
      losses, times = zip(*[run(make(), s, scale) for s in range(3)])
      results[f"{name}@{scale:g}"] = dict(final_loss_mean=float(np.mean(losses)),
                                          final_loss_per_seed=list(losses),
                                          us_per_step=float(np.median(times)))
      print(f"{name:11s} loss-scale {scale:g}: final loss {np.mean(losses):.5f} "
            f"(seeds {', '.join(f'{l:.5f}' for l in losses)}), {np.median(times):.0f} µs/step")
  out = pathlib.Path(__file__).parent / "results" / "scao_modes.json"
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
