"""Training quality of TurboAdam's codecs vs AdamW (picks stax.turbo_adam's default codec).

Uses the project's quality harness (benchmarks/quality.py: same init, batches, clipping and
warm-up + cosine schedule for every optimizer). ``min_compress_elements=1024`` so every matrix of
the small tasks is compressed. Reports final validation loss/metric, mean over seeds.

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
]


def main(task_names=("digits",), seeds=(0, 1), lr=3e-3):
  out = []
  for tname in task_names:
    task = T.make_task(tname, quick=True)
    for name, build in CONFIGS:
      opt = BenchOptimizer(name, "jax", build, "stax")
      runner = Q.JaxRunner(task, opt, task.steps)
      res = [runner.run(lr, s) for s in seeds]
      row = {"task": tname, "optimizer": name, "lr": lr, "seeds": list(seeds),
             "final_val_loss": float(np.mean([r["val_loss"][-1] for r in res])),
             "final_val_metric": float(np.mean([r["val_metric"][-1] for r in res])),
             "final_train_loss": float(np.mean([r["train_loss"][-1] for r in res]))}
      out.append(row)
      print(f"{tname:12s} {name:36s} val_loss {row['final_val_loss']:.4f} "
            f"metric {row['final_val_metric']:.4f}", flush=True)
  return out


if __name__ == "__main__":
  names = tuple(sys.argv[1:]) or ("digits",)
  res = main(names)
  path = pathlib.Path(__file__).parent / "results" / "turbo_quality.json"
  path.write_text(json.dumps(res, indent=1))
