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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

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


# Leaves the contract's quadratic has not: on a 2-D explicit mesh (4 × 2 of the 8 devices), a
# bfloat16 matrix sharded along either axis (StableAdamW's and OAdamW's Kahan buffers, on by
# default for bfloat16), a matrix sharded along both axes whose rows a codec pads to its blocks,
# and stacked layers (L, in, out) sharded along L (and along L and out): STAMLite keeps one v per
# layer. Found by stop 54's sharding sweep: each of these configurations raised ShardingTypeError
# at its first update (the Kahan buffer and the per-layer means were made replicated, the
# padding a replicated broadcast, and a select or concatenate needs one sharding).
_MESH_2D_CASES = {
    "stable_adamw": lambda: stax.stable_adamw(1e-2),
    "oadamw": lambda: stax.oadamw(1e-2),
    "turbo_adam": lambda: stax.turbo_adam(1e-2, min_compress_elements=16),
    "turbo_adam_stax": lambda: stax.turbo_adam(1e-2, codec="stax", min_compress_elements=16),
    "turbo_adam_faithful": lambda: stax.turbo_adam(1e-2, codec="turboadam-0.2",
                                                   min_compress_elements=16),
    "adamw_codec": lambda: stax.adamw(1e-2, codec="stax", min_compress_elements=16),
    "stam_lite": lambda: stax.stam_lite(1e-2),
}
_CODECS = ("turbo_adam", "turbo_adam_stax", "turbo_adam_faithful", "adamw_codec")
#: leaves whose row view the sharding leaves as it is: layers sharded along L only, the bias
_SAME_ROW_VIEW = ("['layers']['kernel']", "['c']['bias']")


def _mesh_2d_tree():
  rng = np.random.default_rng(0)
  leaf = lambda shape, dtype=jnp.float32: jnp.asarray(rng.standard_normal(shape) * 0.1, dtype)
  params = {"a": {"kernel": leaf((64, 32), jnp.bfloat16)},
            "b": {"kernel": leaf((32, 64), jnp.bfloat16)},
            "c": {"kernel": leaf((36, 18)), "bias": leaf((18,))},
            "layers": {"kernel": leaf((4, 8, 16))},
            "layers2": {"kernel": leaf((4, 8, 16))}}
  specs = {"a": {"kernel": P(None, "t")}, "b": {"kernel": P("d", None)},
           "c": {"kernel": P("d", "t"), "bias": P()},
           "layers": {"kernel": P("d", None, None)}, "layers2": {"kernel": P("d", None, "t")}}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
           for _ in range(3)]
  return params, specs, grads


@pytest.mark.parametrize("name", list(_MESH_2D_CASES))
def test_a_2d_explicit_mesh_with_bf16_padded_and_stacked_leaves(name):
  """Three steps on a 4 × 2 explicit mesh equal the single-device run (float32 to 1e-6, bfloat16
  to one ulp, a codec's leaves whose row view the sharding changes to its rounding noise) and
  every parameter keeps its spec; each configuration raised ``ShardingTypeError`` before stop
  54 (see the comment above ``_MESH_2D_CASES``)."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
  params, specs, grads = _mesh_2d_tree()
  tx = _MESH_2D_CASES[name]()

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def run(p, gs):
    s = jax.jit(tx.init)(p)
    for g in gs:
      p, s = jax.jit(step)(p, s, g)
    return p, s

  ref, _ = run(params, grads)
  mesh = jax.make_mesh((4, 2), ("d", "t"), axis_types=(AxisType.Explicit,) * 2)
  put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
  with jax.set_mesh(mesh):
    got, _ = run(put(params), [put(g) for g in grads])
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda z: isinstance(z, P))
  for (path, x), r, spec in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref),
                                spec_leaves):
    assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) == tuple(
        spec) + (None,) * (x.ndim - len(spec)), (name, path)
    leaf = jax.tree_util.keystr(path)
    if name in _CODECS and leaf not in _SAME_ROW_VIEW:
      # a blockwise codec's blocks (and rounding streams) follow the sharded row view
      # (README: sharding); the parameters stay close and finite
      atol = 0.1
    else:
      atol = 4e-3 if x.dtype == jnp.bfloat16 else 1e-6   # bfloat16: one ulp at |p| < 1
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(r, np.float32),
                               rtol=0, atol=atol, err_msg=f"{name} {leaf}")
