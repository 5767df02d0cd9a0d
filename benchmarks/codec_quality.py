"""Low-bit state on every optimizer family, each against its own full-precision self (issue 17).

For each pair the same optimizer runs with float32 state and with a codec: the Adam family
(``stax.adamw``, ``stax.stable_adamw``, ``stax.stam``) with ``codec="factored"`` (signed 4-bit m
+ Adafactor's row/column v on matrices) and ``codec="stax"`` (4-bit m + 4-bit log v), OAdamW with
8-bit Muon momentum (``muon_momentum_bits=8``) alone and with the factored codec on its
StableAdamW leaves. The harness is benchmarks/quality.py (same init, batches, clipping and
warm-up + cosine schedule); ``min_compress_elements=1024`` so every matrix of the small tasks is
compressed. Reports each configuration's whole-model state bits/param and the final validation
loss, mean ± std over seeds 0, 1, 2, and the gap to the optimizer's own float32 run.

Run: ``python -m benchmarks.codec_quality [task ...] [--only=name,...] [--out=path]`` ->
benchmarks/results/codec_quality.json (``--only`` keeps the configurations whose name contains
one of the substrings; ``--merge`` adds the rows to the saved file, replacing those of the
same task and configuration, and recomputes every gap to its family's float32 run);
``python -m benchmarks.codec_quality --plot`` -> benchmarks/results/codec_frontier.png from
this file and turbo_quality.json; ``--table`` prints the README's table.
"""

from __future__ import annotations

import json
import pathlib
import sys

from benchmarks import tasks as T
from benchmarks.turbo_quality import seeds_row

WD = 0.01
MIN = 1024


def _build(factory: str, **kw):
  def build(lr, task):
    import stax
    return getattr(stax, factory)(lr, weight_decay=WD, **kw)
  return build


# (family, configuration name, builder); the first of each family is its float32 self
CONFIGS = [
    ("adamw", "stax.adamw fp32", _build("adamw")),
    ("adamw", "stax.adamw factored", _build("adamw", codec="factored", min_compress_elements=MIN)),
    ("adamw", "stax.adamw stax m4v4", _build("adamw", codec="stax", min_compress_elements=MIN)),
    ("stable_adamw", "stax.stable_adamw fp32", _build("stable_adamw")),
    ("stable_adamw", "stax.stable_adamw factored",
     _build("stable_adamw", codec="factored", min_compress_elements=MIN)),
    ("stable_adamw", "stax.stable_adamw stax m4v4",
     _build("stable_adamw", codec="stax", min_compress_elements=MIN)),
    ("adamw", "stax.adamw factored m4/128",   # turbo_adam's arguments, m's scale per 128
     lambda lr, task: __import__("stax").turbo_adam(lr, weight_decay=WD, codec="factored",
                                                    m_block_size=128, min_compress_elements=MIN,
                                                    seed=0)),
    ("stam", "stax.stam fp32", _build("stam")),
    ("stam", "stax.stam factored", _build("stam", codec="factored", min_compress_elements=MIN)),
    ("oadamw", "stax.oadamw fp32", _build("oadamw")),
    ("oadamw", "stax.oadamw muon m8",
     _build("oadamw", muon_momentum_bits=8, min_compress_elements=MIN)),
    ("oadamw", "stax.oadamw muon m4",
     _build("oadamw", muon_momentum_bits=4, min_compress_elements=MIN)),
    ("oadamw", "stax.oadamw muon m8 + factored",
     _build("oadamw", muon_momentum_bits=8, codec="factored", min_compress_elements=MIN)),
]


def with_gaps(rows: list[dict]) -> list[dict]:
  """Each row's ``gap_to_fp32``: its final val loss over its family's float32 run's on the same
  task, minus 1 (``None`` when that run is missing)."""
  base = {(r["task"], r["family"]): r["final_val_loss"] for r in rows
          if r["optimizer"].endswith("fp32")}
  for r in rows:
    b = base.get((r["task"], r["family"]))
    r["gap_to_fp32"] = None if b is None else r["final_val_loss"] / b - 1
  return rows


def merge(old: list[dict], new: list[dict]) -> list[dict]:
  """``old`` with the rows of ``new`` added or replaced (same task and configuration), in
  CONFIGS order per task."""
  rows = {(r["task"], r["optimizer"]): r for r in old}
  rows.update({(r["task"], r["optimizer"]): r for r in new})
  order = {name: i for i, (_, name, _) in enumerate(CONFIGS)}
  tasks = list(dict.fromkeys(t for t, _ in rows))
  return with_gaps(sorted(rows.values(), key=lambda r: (tasks.index(r["task"]),
                                                         order.get(r["optimizer"], 99))))


def main(task_names=("digits",), seeds=(0, 1, 2), lr=3e-3, only=None):
  out = []
  for tname in task_names:
    task = T.make_task(tname, quick=True)
    for family, name, build in CONFIGS:
      if only and not any(o in name for o in only):
        continue
      row = dict(seeds_row(task, name, build, lr, seeds), family=family)
      out.append(row)
      gap = with_gaps(list(out))[-1]["gap_to_fp32"]
      print(f"{tname:12s} {name:34s} {row['bits_per_param']:6.2f} bits  val_loss "
            f"{row['final_val_loss']:.4f} ± {row['final_val_loss_std']:.4f}  gap "
            + ("n/a" if gap is None else f"{100 * gap:+.1f}%"), flush=True)
  return with_gaps(out)


RESULTS = pathlib.Path(__file__).parent / "results"


def frontier(out: pathlib.Path = RESULTS) -> list[str]:
  """codec_frontier.png from turbo_quality.json and codec_quality.json (bits/param against the
  gap to float32, every low-bit configuration measured)."""
  from benchmarks import plots
  load = lambda name: json.loads((RESULTS / name).read_text()) if (RESULTS / name).exists() else []
  return plots.frontier_plot(plots.frontier_points(load("turbo_quality.json"),
                                                   load("codec_quality.json")), out)


def markdown(rows: list[dict]) -> str:
  """The README table: one line per configuration, one column per task (bits/param, final val
  loss ± std over the seeds, gap to the family's float32 run)."""
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  by = {(r["task"], r["optimizer"]): r for r in rows}
  names = [n for _, n, _ in CONFIGS if any((t, n) in by for t in tasks)]
  lines = ["| configuration | " + " | ".join(f"{t}: bits, val loss ± std, gap" for t in tasks)
           + " |", "|---|" + "---|" * len(tasks)]
  for n in names:
    cells = []
    for t in tasks:
      r = by.get((t, n))
      if r is None:
        cells.append("—")
        continue
      gap = "" if r["optimizer"].endswith("fp32") or r["gap_to_fp32"] is None else (
          f", **{100 * r['gap_to_fp32']:+.1f} %**")
      cells.append(f"{r['bits_per_param']:.2f}, {r['final_val_loss']:.4f} ± "
                   f"{r['final_val_loss_std']:.4f}{gap}")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  args = sys.argv[1:]
  if "--plot" in args:
    print(frontier())
    sys.exit(0)
  if "--table" in args:
    print(markdown(json.loads((RESULTS / "codec_quality.json").read_text())))
    sys.exit(0)
  names = tuple(a for a in args if not a.startswith("--")) or ("digits",)
  only = [o for a in args if a.startswith("--only=") for o in a[7:].split(",")]
  out = [a[6:] for a in args if a.startswith("--out=")]
  res = main(names, only=only or None)
  path = pathlib.Path(out[0]) if out else RESULTS / "codec_quality.json"
  if "--merge" in args and path.exists():   # add to (or replace in) the saved rows
    res = merge(json.loads(path.read_text()), res)
  path.write_text(json.dumps(res, indent=1))
