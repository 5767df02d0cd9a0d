"""Every registry optimizer in every sharding style users use equals its single-device run.

The styles, each within the entry's ``sharding_atol`` of one device (8 virtual CPU devices,
tests/conftest.py):

1. explicit-axis mesh under ``jax.set_mesh`` (row- and column-sharded params):
   ``tests/test_contract.py::test_explicit_mesh_sharding``;
2. explicit-axis mesh (``jax.make_mesh``'s default) *without* a mesh context: params
   ``device_put`` with ``NamedSharding``, eager ``init``, plain ``jax.jit`` (here);
3. Auto-axis mesh with ``NamedSharding`` params, no mesh context: XLA propagates the
   shardings (here);
4. ``jax.pmap`` with an axis name, gradients ``pmean``'d:
   ``tests/test_contract.py::test_pmap_mean_gradient``.

Styles 2 and 3 run the contract's check (:func:`tests.test_contract._check_mesh_sharding`) on
its ``"mixed"`` layout (row- and column-sharded, long- and short-axis-sharded matrices in one
tree) only, to keep the compilations few. A faithful mode whose sharding code is its default
mode's (SCAO's two modes share the schedule controller that replicates and reshards each leaf;
TurboAdam's two codecs share the row view and ``follow_sharding``) runs styles 2 and 3 through
its default mode only, and style 1 and 4 itself; an option variant (``tests.registry.MAIN``)
runs style 1 only (``STAX_TEST_FULL=1`` runs every pair; about 30 s of the CI's two workers).
"""

from __future__ import annotations

import pytest
from jax.sharding import AxisType

import stax
from tests.registry import ALL, FULL, MAIN, Entry
from tests.test_contract import IDS, _check_mesh_sharding

STYLES = {
    "explicit_no_mesh_context": dict(set_mesh=False, axis_type=AxisType.Explicit),
    "auto_axes": dict(set_mesh=False, axis_type=AxisType.Auto),
}


SAME_SHARDING_CODE = {"scao_0.2.4": "scao_lowrank", "turbo_adam_faithful": "turbo_adam"}
_STYLED = [e for e in MAIN if FULL or e.name not in SAME_SHARDING_CODE]
assert {e.name for e in ALL} >= set(SAME_SHARDING_CODE) | set(SAME_SHARDING_CODE.values())


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("entry", _STYLED, ids=[e.name for e in _STYLED])
def test_sharding_style(entry, style):
  _check_mesh_sharding(entry, "mixed", **STYLES[style])


# Orthogonalisation paths no registry entry takes, on an explicit mesh: same-shape matrices
# stacked and sharded over the mesh (mode="stacked"; under jax.set_mesh in tests/test_oadamw.py)
# and the cached left multiplier of update_proj_gap > 1 (refreshed on steps 1 and 3).
_OADAMW = dict(learning_rate=3e-2, weight_decay=0.0)
_STACKED = Entry("oadamw_stacked", stax.oadamw, dict(_OADAMW, mode="stacked"))
_PROJ_GAP = Entry("oadamw_proj_gap_2", stax.oadamw, dict(_OADAMW, update_proj_gap=2))


@pytest.mark.parametrize("entry, set_mesh", [
    pytest.param(_STACKED, False, id="stacked-explicit_no_mesh_context"),
    pytest.param(_PROJ_GAP, True, id="proj_gap-set_mesh"),
    pytest.param(_PROJ_GAP, False, id="proj_gap-explicit_no_mesh_context"),
])
def test_orthogonalize_paths_on_explicit_mesh(entry, set_mesh):
  _check_mesh_sharding(entry, "mixed", set_mesh=set_mesh)
