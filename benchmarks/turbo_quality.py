"""Training quality of TurboAdam's codecs vs AdamW (picks stax.turbo_adam's default codec).

Uses the project's quality harness (benchmarks/quality.py: same init, batches, clipping and
warm-up + cosine schedule for every optimizer). ``min_compress_elements=1024`` so every matrix of
the small tasks is compressed. Reports each configuration's state bits per parameter on the
task's model and the final validation loss/metric, mean (± std) over seeds 0, 1, 2.

Run: ``python benchmarks/turbo_quality.py [task ...]`` -> benchmarks/results/turbo_quality.json
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from benchmarks import quality as Q
from benchmarks import tasks as T
from benchmarks.optimizers import BenchOptimizer

WD = 0.01


def _turbo(**kw):
  def build(lr, task):
    import stax
    return stax.turbo_adam(lr, weight_decay=WD, min_compress_elements=1024, **kw)
  return build


def _adamw(lr, task):
  import optax
  return optax.adamw(lr, weight_decay=WD)


CONFIGS = [
    ("optax.adamw (fp32, 64 bits)", _adamw),
    ("turboadam-0.2 v4 (6.5 bits)", _turbo(codec="turboadam-0.2")),
    ("stax m4 v4 (8.75 bits)", _turbo(codec="stax")),
    ("stax m4 v6 (10.75 bits)", _turbo(codec="stax", v_bits=6)),
    ("stax m4 v8 (12.75 bits)", _turbo(codec="stax", v_bits=8)),
    ("turboadam-0.2 m + v8 (10.5 bits)", _turbo(codec="turboadam-0.2", v_bits=8)),
    ("stax factored: m4 + Adafactor v", _turbo(codec="factored")),
]


def _bits(build, task) -> float:
  """State bits per parameter of ``build`` on the task's model (scalars excluded)."""
  import jax
  import jax.numpy as jnp
  import stax
  params = jax.tree.map(jnp.asarray, task.init(0))
  state = jax.eval_shape(build(1e-3, task).init, params)
  return float(stax.state_bits_per_param(state, params, exclude_scalars=True))


def seeds_row(task, name: str, build, lr: float, seeds) -> dict:
  """One configuration on ``task`` at ``lr`` for every seed: bits/param and the final losses'
  mean and std (the row both quality scripts save)."""
  runner = Q.JaxRunner(task, BenchOptimizer(name, "jax", build, "stax"), task.steps)
  res = [runner.run(lr, s) for s in seeds]
  last = lambda key: [r[key][-1] for r in res]
  return {"task": task.name, "optimizer": name, "lr": lr, "seeds": list(seeds),
          "bits_per_param": _bits(build, task),
          "final_val_loss": float(np.mean(last("val_loss"))),
          "final_val_loss_std": float(np.std(last("val_loss"))),
          "final_val_metric": float(np.mean(last("val_metric"))),
          "final_train_loss": float(np.mean(last("train_loss"))),
          "wall_s": float(np.mean(last("wall_s")))}


def main(task_names=("digits",), seeds=(0, 1, 2), lr=3e-3):
  out = []
  for tname in task_names:
    task = T.make_task(tname, quick=True)
    for name, build in CONFIGS:
      row = seeds_row(task, name, build, lr, seeds)
      out.append(row)
      print(f"{tname:12s} {name:36s} {row['bits_per_param']:6.2f} bits  val_loss "
            f"{row['final_val_loss']:.4f} ± {row['final_val_loss_std']:.4f} "
            f"metric {row['final_val_metric']:.4f}", flush=True)
  return out


if __name__ == "__main__":
  names = tuple(sys.argv[1:]) or ("digits",)
  res = main(names)
  path = pathlib.Path(__file__).parent / "results" / "turbo_quality.json"
  path.write_text(json.dumps(res, indent=1))
