"""PNG plots from the results JSON (matplotlib, Agg backend).

``make_all(results, out)`` writes, per task, validation loss against steps and against
wall-clock (each optimizer at its chosen learning rate, mean over seeds) and the learning-rate
sweep; for the speed benchmark, step time relative to ``optax.adamw`` and state bytes per
parameter. Returns the list of file names. ``python -m benchmarks.plots [results.json]``
redraws them from a saved file.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np


def _style(name, framework, i):
  import matplotlib.pyplot as plt
  cmap = plt.get_cmap("tab20")
  ls = "--" if framework == "torch" else ("-." if name.startswith("seed:") else "-")
  if name in ("optax.adamw", "torch.optim.AdamW(fused)"):
    return dict(color="black", ls=ls, lw=2.2)
  return dict(color=cmap(i % 20), ls=ls, lw=1.4)


def _curves(results, task, name, lr):
  runs = [r for r in results["quality"] if r["task"] == task and r["optimizer"] == name
          and r["lr"] == lr and not r.get("diverged") and r["steps"]]
  if not runs:
    return None
  n = min(len(r["steps"]) for r in runs)
  steps = np.array(runs[0]["steps"][:n])
  vl = np.mean([r["val_loss"][:n] for r in runs], axis=0)
  wall = np.mean([r["wall_s"][:n] for r in runs], axis=0)
  return steps, vl, wall


def task_plots(results, task, out: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [s for s in results["summary"] if s["task"] == task and not s.get("error")]
  if not rows:
    return []
  t = results["tasks"][task]
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
  for i, s in enumerate(rows):
    c = _curves(results, task, s["optimizer"], s["best_lr"])
    if c is None:
      continue
    steps, vl, wall = c
    st = _style(s["optimizer"], s["framework"], i)
    lab = f"{s['optimizer']} (lr {s['best_lr']:g})"
    axes[0].plot(steps, vl, label=lab, **st)
    axes[1].plot(wall, vl, label=lab, **st)
  target = t.get("target_val_loss")
  for ax, xl in zip(axes, ("step", "training wall-clock (s, compile and eval excluded)")):
    if target is not None and math.isfinite(target):
      ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(xl)
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[1].set_xscale("log")
  axes[0].set_title(f"{task}: validation loss vs steps")
  axes[1].set_title(f"{task}: validation loss vs wall-clock")
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  f1 = out / f"{task}_loss.png"
  fig.savefig(f1, dpi=110, bbox_inches="tight")
  plt.close(fig)
  files = [f1.name]

  if len(t.get("lrs", [])) > 1:
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, s in enumerate(rows):
      sw = s.get("sweep") or {}
      lrs = sorted(float(k) for k in sw)
      vals = [sw[f"{lr:g}"] for lr in lrs]
      vals = [v if v is not None and math.isfinite(v) else np.nan for v in vals]
      ax.plot(lrs, vals, marker="o", label=s["optimizer"],
              **_style(s["optimizer"], s["framework"], i))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (seed 0)")
    ax.set_title(f"{task}: learning-rate sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    f2 = out / f"{task}_lr_sweep.png"
    fig.savefig(f2, dpi=110, bbox_inches="tight")
    plt.close(fig)
    files.append(f2.name)
  return files


def speed_plots(results, out: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  recs = [r for r in results.get("speed", []) if not r.get("error")]
  if not recs:
    return []
  sizes = list(dict.fromkeys(r["size"] for r in recs))
  names = list(dict.fromkeys(r["optimizer"] for r in recs))
  fig, axes = plt.subplots(1, 2, figsize=(15, max(5, 0.32 * len(names) + 1.5)))
  y = np.arange(len(names))
  h = 0.8 / len(sizes)
  for j, size in enumerate(sizes):
    vals = []
    for n in names:
      r = next((r for r in recs if r["optimizer"] == n and r["size"] == size), None)
      vals.append(r["step_ms"] if r else np.nan)
    axes[0].barh(y + j * h, vals, height=h, label=f"{size} params")
  axes[0].set_yticks(y + h * (len(sizes) - 1) / 2)
  axes[0].set_yticklabels(names, fontsize=8)
  axes[0].invert_yaxis()
  axes[0].set_xscale("log")
  axes[0].set_xlabel("step time, ms (median, donated, CPU)")
  axes[0].set_title("optimizer step time")
  axes[0].legend()
  axes[0].grid(alpha=0.3, axis="x")
  bpp = []
  for n in names:
    r = next((r for r in recs if r["optimizer"] == n and r["size"] == sizes[-1]), None)
    bpp.append(r["state_bytes_per_param"] if r else np.nan)
  axes[1].barh(y, bpp, color="tab:orange")
  for yi, b in zip(y, bpp):
    if np.isfinite(b):
      axes[1].text(b, yi, f" {b:.3f}", va="center", fontsize=7)
  axes[1].set_yticks(y)
  axes[1].set_yticklabels([])
  axes[1].invert_yaxis()
  axes[1].axvline(8.0, color="grey", ls=":", lw=0.8)
  axes[1].set_xlabel(f"optimizer state bytes per parameter ({sizes[-1]} params)")
  axes[1].set_title("state memory (fp32 AdamW = 8)")
  axes[1].grid(alpha=0.3, axis="x")
  fig.tight_layout()
  f = out / "speed_memory.png"
  fig.savefig(f, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return [f.name]


def roofline_plot(results, out: pathlib.Path):
  """Step time against its bandwidth bound, per optimizer, at the largest size of the run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  recs = [r for r in results.get("speed", []) if not r.get("error") and r.get("bound_ms")]
  if not recs:
    return []
  size = list(dict.fromkeys(r["size"] for r in recs))[-1]
  recs = [r for r in recs if r["size"] == size]
  names = [r["optimizer"] for r in recs]
  y = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(9, max(4, 0.32 * len(names) + 1.5)))
  ax.barh(y - 0.2, [r["step_ms"] for r in recs], height=0.4, label="measured step")
  ax.barh(y + 0.2, [r["bound_ms"] for r in recs], height=0.4, color="tab:grey",
          label=f"bound: ideal bytes at {recs[0]['copy_gbs']:.1f} GB/s, or XLA's flops at the "
                "measured matmul rate if larger (c)")
  for yi, r in zip(y, recs):
    kind = " (c)" if r.get("bound_kind") == "compute" else ""
    ax.text(r["step_ms"], yi - 0.2, f" {r['vs_bound']:.1f}× bound{kind}", va="center",
            fontsize=7)
  ax.set_yticks(y)
  ax.set_yticklabels(names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel(f"ms per step at {size} parameters (CPU, donated)")
  ax.set_title("roofline: step time vs its memory-traffic or compute bound")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  f = out / "roofline.png"
  fig.savefig(f, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return [f.name]


def frontier_points(turbo_rows, codec_rows) -> list[dict]:
  """(task, name, bits/param, gap to float32) for every low-bit configuration measured:
  turbo_quality's codecs against optax.adamw, codec_quality's against their own float32 run."""
  pts = []
  for t in dict.fromkeys(r["task"] for r in turbo_rows):
    rows = [r for r in turbo_rows if r["task"] == t]
    base = next((r for r in rows if r["optimizer"].startswith("optax.adamw")), None)
    if base is None:
      continue
    for r in rows:
      if r is not base:
        pts.append(dict(task=t, name="turbo_adam " + r["optimizer"].split(" (")[0],
                        bits=r["bits_per_param"], std=r["final_val_loss_std"] / base["final_val_loss"],
                        gap=r["final_val_loss"] / base["final_val_loss"] - 1))
  for r in codec_rows:
    if r.get("gap_to_fp32") and not r["optimizer"].endswith("fp32"):
      base = r["final_val_loss"] / (1 + r["gap_to_fp32"])
      pts.append(dict(task=r["task"], name=r["optimizer"], bits=r["bits_per_param"],
                      std=r["final_val_loss_std"] / base, gap=r["gap_to_fp32"]))
  return pts


def quality_points(results) -> list[dict]:
  """(task, name, bits/param, gap to tuned optax.adamw) for every optimizer of a main run."""
  pts = []
  for t in results.get("tasks", {}):
    rows = [s for s in results.get("summary", []) if s["task"] == t and not s.get("error")
            and s.get("state_bytes_per_param") is not None
            and s.get("val_loss_mean") is not None and math.isfinite(s["val_loss_mean"])]
    base = next((s for s in rows if s["optimizer"] == "optax.adamw"), None)
    if base is None:
      continue
    for s in rows:
      if s is not base:
        pts.append(dict(task=t, name=s["optimizer"], bits=8 * s["state_bytes_per_param"],
                        std=s["val_loss_std"] / base["val_loss_mean"],
                        gap=s["val_loss_mean"] / base["val_loss_mean"] - 1))
  return pts


def frontier_plot(points, out: pathlib.Path, name: str = "codec_frontier.png",
                  xlim=(4, 16), reference="float32 self"):
  """Bits/param of state against the final validation loss gap to a reference, one panel a task.

  ``reference`` names what the gap is to (the configuration's float32 self for the codec
  frontier, tuned ``optax.adamw`` for the main run's); ``xlim`` the bits shown (log2 axis).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(dict.fromkeys(p["task"] for p in points))
  if not tasks:
    return []
  names = list(dict.fromkeys(p["name"] for p in points))      # one colour per configuration
  import matplotlib.ticker  # noqa: F401  (the minor-tick formatter)
  fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 7.5), squeeze=False)
  for ax, t in zip(axes[0], tasks):
    pts = [p for p in points if p["task"] == t]
    # % gap shown: enough for every point within 50 %; one beyond is drawn at the edge
    inside = [100 * (abs(p["gap"]) + p["std"]) for p in pts if abs(p["gap"]) <= 0.5]
    lim = min(50.0, max([3.0] + [1.15 * x for x in inside]))
    for p in pts:
      gap, color = 100 * p["gap"], plt.get_cmap("tab20")(names.index(p["name"]) % 20)
      if abs(gap) <= 50.0:
        ax.errorbar(p["bits"], gap, yerr=100 * p["std"], fmt="o", ms=5, capsize=2,
                    color=color, label=p["name"])
      else:
        edge = math.copysign(lim * 0.97, gap)
        ax.plot(p["bits"], edge, "^" if gap > 0 else "v", ms=8, color=color,
                label=f"{p['name']} ({gap:+.0f}%, off scale)")
    ax.set_ylim(-lim, lim)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhspan(-1, 1, color="tab:green", alpha=0.12, label=f"within 1% of {reference}")
    ax.axvline(5, color="tab:grey", ls="--", lw=0.8, label="5 bits/param")
    ax.set_xscale("log", base=2)
    ax.set_xlim(*xlim)
    ticks = ([4, 5, 6, 8, 10, 12, 16] if tuple(xlim) == (4, 16) else
             [2.0 ** k for k in range(math.floor(math.log2(xlim[0])),
                                      math.ceil(math.log2(xlim[1])) + 1)])
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("optimizer state, bits per parameter (whole model)")
    ax.set_ylabel(f"final val loss vs {reference} (%; ± std of the seeds)")
    ax.set_title(f"{t}: " + ("low-bit state frontier" if reference == "float32 self"
                              else f"state bits against quality vs {reference}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
  fig.tight_layout()
  f = pathlib.Path(out) / name
  fig.savefig(f, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return [f.name]


def make_all(results, out) -> list[str]:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  files = []
  for task in results.get("tasks", {}):
    files += task_plots(results, task, out)
  files += speed_plots(results, out)
  files += roofline_plot(results, out)
  pts = quality_points(results)
  if pts:
    lo = min(p["bits"] for p in pts)
    hi = max(p["bits"] for p in pts)
    files += frontier_plot(pts, out, name="quality_frontier.png",
                           xlim=(2.0 ** math.floor(math.log2(lo)), 2.0 ** math.ceil(math.log2(hi))),
                           reference="optax.adamw")
  return files


if __name__ == "__main__":
  path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                      pathlib.Path(__file__).parent / "results" / "results.json")
  res = json.loads(path.read_text())
  # JSON stores NaN as null
  for r in res.get("quality", []):
    r["val_loss"] = [math.nan if v is None else v for v in r["val_loss"]]
  print(make_all(res, path.parent))
