"""The registry of every public optimizer, driving the shared contract tests.

Each optimizer family has a module ``tests/registry_<name>.py`` defining ``ENTRIES``, a list of
:class:`Entry`; this module collects them all.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
from typing import Any, Callable

import stax


@dataclasses.dataclass(frozen=True)
class Entry:
  """One optimizer configuration under contract.

  Attributes:
    name: test id.
    factory: the public factory (e.g. ``stax.adamw``).
    kwargs: keyword arguments (learning rate included) for the contract problems.
    static_args: arguments ``optax.inject_hyperparams`` must keep static (ints that set shapes
      or structure: ``last_n_modules``, ``ns_steps``, ``block_size``, ...).
    quadratic_tol: max distance to the optimum after ``steps`` on the quadratic.
    rosenbrock_tol: root-mean-square distance (over all coordinates) to the optimum after
      ``3 * steps`` on Rosenbrock (``None`` skips Rosenbrock: say why in ``note``). Not the max:
      the trajectory in Rosenbrock's valley is chaotic, so a last-bit difference (another CPU,
      another vector width) moves single coordinates along the valley by up to ~0.4, while the
      RMS distance of every entry stays below ~0.03 (see test_converges_on_rosenbrock).
    steps: steps for the convergence problems.
    rosenbrock_kwargs: kwargs overriding ``kwargs`` on Rosenbrock (e.g. another lr).
    sharding_atol: tolerance of the sharded-vs-single-device comparison.
    layout_dependent_modes: mesh modes (``"rows"``/``"cols"``) where a blockwise codec sees
      another row view than on one device (a sharded axis is never merged into a codec's row,
      :func:`stax.codecs.row_view.row_view_shape`), so its blocks and stochastic rounding
      differ: there the sharded run is compared with the single-device one only within
      ``layout_atol`` (the state types, specs and finiteness are still checked exactly).
    layout_atol: the bound for ``layout_dependent_modes``.
    note: why a contract is relaxed.
  """

  name: str
  factory: Callable[..., Any]
  kwargs: dict
  static_args: tuple = ()
  quadratic_tol: float = 5e-2
  rosenbrock_tol: float | None = 5e-2
  steps: int = 1000
  rosenbrock_kwargs: dict | None = None
  sharding_atol: float = 1e-6
  layout_dependent_modes: tuple = ()
  layout_atol: float = 0.2
  note: str = ""

  def make(self, **overrides):
    return self.factory(**{**self.kwargs, **overrides})


# For an entry whose codec blocks are longer than the contract problems' last axes (16, 8, 4):
# a compressed leaf's row view merges its trailing axes, which a column-sharded mesh forbids,
# so there its blocks (and its stochastic rounding) differ from the single-device run's.
ROW_VIEW_DEPENDENT = dict(layout_dependent_modes=("cols",),
                          note="cols: a sharded axis is not merged into a codec row")


# Module order of the contract problems' parameter trees (see tests/contract_problems.py).
CONTRACT_MODULE_ORDER = ["embed", "layer_0", "layer_1", "head"]

ENTRIES = [
    Entry("adamw", stax.adamw, dict(learning_rate=3e-2, weight_decay=0.0)),
    Entry("adamw_wd_nesterov", stax.adamw,
          dict(learning_rate=3e-2, weight_decay=1e-4, nesterov=True)),
    Entry("stac", stax.stac,
          dict(learning_rate=3e-2, last_n_modules=2, module_order=CONTRACT_MODULE_ORDER),
          static_args=("last_n_modules", "module_order"),
          quadratic_tol=0.1, rosenbrock_kwargs=dict(last_n_modules=4),
          note="the sign trunk moves by exactly lr per step, so it ends within ~lr of the "
               "optimum; Rosenbrock runs with every module in the AdamW cap (pure sign descent "
               "with a constant lr does not settle in Rosenbrock's valley)"),
    Entry("stac_sign_only", stax.stac,
          dict(learning_rate=lambda c: 3e-2 * 0.995 ** c, last_n_modules=0,
               module_order=CONTRACT_MODULE_ORDER),
          static_args=("last_n_modules", "module_order"), rosenbrock_tol=None,
          note="pure sign descent; converges on the quadratic with a decaying lr"),
]


def _collect() -> list[Entry]:
  entries = list(ENTRIES)
  here = pathlib.Path(__file__).parent
  for f in sorted(here.glob("registry_*.py")):
    mod = importlib.import_module(f"tests.{f.stem}")
    entries.extend(getattr(mod, "ENTRIES", []))
  return entries


ALL = _collect()

#: Entries that are another option of an optimizer whose main entry is registered too, with the
#: main entry's state layout and code path (a hyperparameter, a β1 rule, a flag). The machinery
#: contracts (inject_hyperparams, MultiSteps, dtypes, donation, pmap, mesh styles, orbax, empty
#: leaves, the bridge round trip) run on ``MAIN``; the numerical ones (convergence, huge and
#: non-finite gradients, validation, explicit-mesh sharding of every per-tensor statistic) on
#: ``ALL``. ``STAX_TEST_FULL=1`` (or ``STAX_ZOO_FULL=1``) runs every entry everywhere.
OPTION_VARIANTS = {"adamw_wd_nesterov": "adamw", "stac_sign_only": "stac", "stam_snr": "stam",
                   "stam_lite_snr": "stam_lite", "oadamw_gradient": "oadamw",
                   "turbo_adam_factored": "turbo_adam", "oadamw_m8": "oadamw",
                   "stable_adamw_factored": "stable_adamw", "stam_factored": "stam"}
FULL = "1" in (os.environ.get("STAX_TEST_FULL", ""), os.environ.get("STAX_ZOO_FULL", ""))
MAIN = [e for e in ALL if FULL or e.name not in OPTION_VARIANTS]
assert {e.name for e in ALL} >= set(OPTION_VARIANTS) | set(OPTION_VARIANTS.values())
