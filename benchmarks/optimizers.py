"""The benchmark's optimizer registry.

JAX side: ``optax.adamw``, ``optax.contrib.muon`` and every public stax optimizer present at
run time (found by import, so optimizers that land later join automatically), in each of its
modes (faithful / improved) when the factory exposes one; the STAM seed's own optax
transforms (``stam-optimizer`` is a JAX package). Torch side: ``torch.optim.AdamW(fused=True)``
and the seeds' own torch packages that install (``stac-optimizer``, ``turboadam``, ``scao``,
``torch-optimi``'s StableAdamW, which OAdamW builds on; OAdamW itself is not on PyPI).

Every optimizer gets the same treatment from the harness: decoupled weight decay
``WEIGHT_DECAY`` where the factory has a ``weight_decay`` argument, the same global-norm
gradient clipping, the same warm-up + cosine learning-rate shape applied as a multiplier of
the peak learning rate, which the sweep chooses.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
from typing import Any, Callable

WEIGHT_DECAY = 0.01

# stax optimizers the project plans; whichever exist at run time are benchmarked.
STAX_CANDIDATES = ("adamw", "stac", "stam", "stam_lite", "oadamw", "stable_adamw",
                   "turbo_adam", "scao")


@dataclasses.dataclass
class BenchOptimizer:
  """One optimizer configuration in the comparison.

  Attributes:
    name: display name (``framework:package.name[mode]``).
    framework: ``"jax"`` or ``"torch"``.
    build: JAX: ``build(lr, task) -> optax.GradientTransformation`` (``lr`` may be traced);
      torch: ``build(lr, module, task) -> torch.optim.Optimizer``.
    family: ``"baseline"``, ``"stax"`` or ``"seed"``.
    note: anything a reader of the table should know.
    traced_lr: whether ``build`` accepts a traced learning rate (one compilation per sweep).
    mode: ``"faithful"`` (reproduces the seed), ``"improved"`` (stax's default where it
      differs), or ``""`` (one mode only).
  """

  name: str
  framework: str
  build: Callable[..., Any]
  family: str
  note: str = ""
  traced_lr: bool = True
  mode: str = ""


def _accepts(fn, name):
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _filter_kwargs(fn, kwargs):
  try:
    sig = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return {}
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.values()):
    return dict(kwargs)
  return {k: v for k, v in kwargs.items() if k in sig}


# --------------------------------------------------------------------------- JAX baselines
def _optax_adamw(lr, task):
  import optax
  return optax.adamw(lr, weight_decay=WEIGHT_DECAY)


def muon_dimension_numbers(params):
  """Muon on hidden matrices and conv kernels (HWIO → reduce over H, W, I); Adam elsewhere.

  Embeddings and the output head stay on Adam (the Muon authors' recommendation), as do
  vectors. Flax/JAX kernels are (in, out): reduction axis 0, output axis 1.
  """
  import jax
  from optax.contrib import MuonDimensionNumbers

  from stax import partition

  def label(path, x):
    name = partition.path_name(path)
    if partition.is_embedding_path(name) or partition.is_output_head_path(name):
      return None
    if x.ndim == 2:
      return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    if x.ndim == 4:
      return MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    return None

  return jax.tree_util.tree_map_with_path(label, params)


def _optax_muon(lr, task):
  from optax.contrib import muon
  return muon(lr, weight_decay=WEIGHT_DECAY, adam_weight_decay=WEIGHT_DECAY,
              consistent_rms=0.2, muon_weight_dimension_numbers=muon_dimension_numbers)


# --------------------------------------------------------------------------- stax
def _stax_builder(fn, extra):
  def build(lr, task):
    kw = {"weight_decay": WEIGHT_DECAY, "module_order": list(task.module_order)}
    kw = _filter_kwargs(fn, kw)
    kw.update(extra)
    return fn(lr, **kw)
  return build


# (suffix, kwargs, mode) per stax optimizer: the default and the seed-faithful mode. Names not
# listed run once with their defaults.
STAX_MODES = {
    "stam": [("[seed]", {}, "faithful"), ("[snr]", {"beta1_signal": "snr"}, "improved")],
    "stam_lite": [("[seed]", {}, "faithful"), ("[snr]", {"beta1_signal": "snr"}, "improved")],
    "scao": [("", {}, "improved"), ("[scao-0.2.4]", {"mode": "scao-0.2.4"}, "faithful")],
    "oadamw": [("", {}, "improved"), ("[gradient]", {"muon": "gradient"}, "faithful")],
    "turbo_adam": [("", {}, "improved"), ("[stax]", {"codec": "stax"}, "improved"),
                   ("[turboadam-0.2]", {"codec": "turboadam-0.2"}, "faithful")],
}


def _mode_variants(name, fn):
  variants = STAX_MODES.get(name, [("", {}, "")])
  out = []
  for suffix, kw, mode in variants:
    if all(_accepts(fn, k) for k in kw):
      out.append((suffix, kw, mode))
  return out or [("", {}, "")]


def stax_optimizers() -> list[BenchOptimizer]:
  """Every public stax optimizer present now, each mode a separate entry."""
  import stax
  out = []
  for name in STAX_CANDIDATES:
    fn = getattr(stax, name, None)
    if fn is None:
      try:
        fn = getattr(importlib.import_module(f"stax.optimizers.{name}"), name)
      except Exception:  # noqa: BLE001 - not written yet
        fn = None
    if not callable(fn):
      continue
    for suffix, extra, mode in _mode_variants(name, fn):
      out.append(BenchOptimizer(f"stax.{name}{suffix}", "jax", _stax_builder(fn, extra), "stax",
                                mode=mode))
  return out


# --------------------------------------------------------------------------- seeds (JAX)
def _seed_stam(lite):
  def build(lr, task):
    import stam_optimizer
    fn = stam_optimizer.stam_lite if lite else stam_optimizer.stam
    return fn(learning_rate=lr, weight_decay=WEIGHT_DECAY)
  return build


# --------------------------------------------------------------------------- torch
def _torch_adamw(lr, module, task):
  import torch
  return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=True)


def _torch_stac(lr, module, task):
  import stac_optimizer
  return stac_optimizer.STAC(module, lr=lr, last_n_modules=1, weight_decay=WEIGHT_DECAY)


def _torch_turbo(lr, module, task):
  import turboadam
  return turboadam.TurboAdam(module.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)


def _torch_scao(lr, module, task):
  import warnings

  import scao
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return scao.SCAO(module.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)


def _torch_stable_adamw(lr, module, task):
  import optimi
  return optimi.StableAdamW(module.parameters(), lr=lr, weight_decay=WEIGHT_DECAY,
                            foreach=False, triton=False)


def _have(mod):
  return importlib.util.find_spec(mod) is not None


def all_optimizers(*, torch: bool = True) -> list[BenchOptimizer]:
  """The registry, in table order."""
  out = [BenchOptimizer("optax.adamw", "jax", _optax_adamw, "baseline"),
         BenchOptimizer("optax.contrib.muon", "jax", _optax_muon, "baseline",
                        note="consistent_rms=0.2 (Moonlight), Muon on hidden matrices and conv "
                             "kernels, Adam on embeddings/head/vectors")]
  out += stax_optimizers()
  if _have("stam_optimizer"):
    out += [BenchOptimizer("seed:stam_optimizer.stam", "jax", _seed_stam(False), "seed"),
            BenchOptimizer("seed:stam_optimizer.stam_lite", "jax", _seed_stam(True), "seed")]
  if torch and _have("torch"):
    out.append(BenchOptimizer("torch.optim.AdamW(fused)", "torch", _torch_adamw, "baseline"))
    if _have("stac_optimizer"):
      out.append(BenchOptimizer("seed:stac_optimizer.STAC", "torch", _torch_stac, "seed",
                                note="last_n_modules=1 in registration (= execution) order"))
    if _have("turboadam"):
      out.append(BenchOptimizer("seed:turboadam.TurboAdam", "torch", _torch_turbo, "seed"))
    if _have("scao"):
      out.append(BenchOptimizer("seed:scao.SCAO", "torch", _torch_scao, "seed"))
    if _have("optimi"):
      out.append(BenchOptimizer("seed:optimi.StableAdamW", "torch", _torch_stable_adamw, "seed",
                                note="OAdamW's base (OAdamW itself is not on PyPI)"))
  return out


def select(optimizers: list[BenchOptimizer], patterns) -> list[BenchOptimizer]:
  """Keep optimizers whose name contains any of the comma-separated ``patterns``."""
  if not patterns:
    return optimizers
  pats = [p.strip().lower() for p in ",".join(patterns).split(",") if p.strip()]
  return [o for o in optimizers if any(p in o.name.lower() for p in pats)]
