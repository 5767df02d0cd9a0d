"""The one layout type (stax.layout): optax compatibility and every accepted form."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax
from stax import layout as L

MDN = stax.MatrixDimensionNumbers


def test_is_optax_muon_dimension_numbers_and_keeps_groups():
  d = MDN(1, 0, output_groups=3)
  assert isinstance(d, optax.contrib.MuonDimensionNumbers)
  assert (d.reduction_axis, d.output_axis, d.output_groups) == (1, 0, 3)
  assert d != MDN(1, 0) and MDN(1, 0) == optax.contrib.MuonDimensionNumbers(1, 0)
  assert MDN(1, 0) != None and not MDN(1, 0) == None and MDN(1, 0) != (1, 0, 1)  # noqa: E711
  assert MDN(1, 0) != "x" and d != (1, 0)
  assert len({d, MDN(1, 0, output_groups=3), MDN(1, 0)}) == 2
  for e in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d), d._replace(reduction_axis=1)):
    assert e == d and e.output_groups == 3
  # a static pytree node: tree operations keep it whole
  tree = {"w": d}
  assert jax.tree.leaves(tree) == []
  assert jax.tree.map(lambda x: x, tree)["w"].output_groups == 3
  with pytest.raises(AttributeError):
    d.output_groups = 1


def test_optax_muon_accepts_the_stax_type():
  """optax's muon with stax's dims equals optax's muon with its own type (torch layout)."""
  w = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  g = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
  outs = []
  for dims in (MDN(1, 0), optax.contrib.MuonDimensionNumbers(1, 0)):
    tx = optax.contrib.muon(1e-2, muon_weight_dimension_numbers={"w": dims})
    u, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
    outs.append(np.asarray(u["w"]))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_every_form_resolves_the_same():
  params = {"dense": {"kernel": jnp.ones((4, 6)), "bias": jnp.ones(6)},
            "conv": {"kernel": jnp.ones((3, 3, 2, 5))}}
  conv, dense = L.conv_dimension_numbers(4), MDN(0, 1)
  want = [conv, None, dense]        # flatten order: conv.kernel, dense.bias, dense.kernel
  assert L.resolve_tree(None, params) == want
  by_path = lambda name, x: None if x.ndim < 2 else (conv if x.ndim == 4 else dense)
  assert L.resolve_tree(by_path, params) == want
  as_tree = {"dense": {"kernel": dense, "bias": None}, "conv": {"kernel": conv}}
  assert L.resolve_tree(as_tree, params) == want
  assert L.resolve_tree(lambda p: as_tree, params) == want
  # an int is the split shorthand: rows = axes before it
  assert L.resolve_tree(1, {"w": jnp.ones((3, 4, 5))}) == [MDN((0,), (1, 2))]
  assert L.matrix_shape((3, 4, 5), L.split_dimension_numbers(2, 3)) == (1, 12, 5)
  with pytest.raises(TypeError, match="dimension_numbers"):
    L.resolve_tree("rows", params)
  with pytest.raises(ValueError, match="split axis"):
    L.split_dimension_numbers(3, 3)


def test_orthogonalization_takes_a_tree_of_dims():
  params = {"a": jax.random.normal(jax.random.PRNGKey(0), (8, 4)),
            "b": jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3))}
  tree = {"a": MDN(1, 0), "b": MDN(2, 1)}
  fn = lambda name, x: tree[name]
  outs = []
  for dims in (tree, fn, lambda p: tree):
    tx = stax.scale_by_orthogonalization(dimension_numbers=dims)
    u, _ = tx.update(params, tx.init(params))
    outs.append(jax.tree.map(np.asarray, u))
  for o in outs[1:]:
    jax.tree.map(np.testing.assert_array_equal, outs[0], o)
  # per leaf, each leaf's orthogonalisation is one compiled function, also when called eagerly
  # (it is traced once per shape: stax._leafwise.traced_once), so the reference is compiled too
  ref = jax.jit(lambda x: stax.orthogonalize(x, dimension_numbers=MDN(1, 0)))(params["a"])
  tx = stax.scale_by_orthogonalization(dimension_numbers=tree, mode="per_leaf")
  per_leaf = tx.update(params, tx.init(params))[0]
  np.testing.assert_allclose(np.asarray(per_leaf["a"]), np.asarray(ref), rtol=0, atol=0)
  # the default (stacked) mode runs the same iteration, eagerly op by op here
  np.testing.assert_allclose(np.asarray(outs[0]["a"]), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_scao_takes_the_layout_type():
  """SCAO's view from dims equals its int split bit for bit; dims with batch axes stack."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 4, 3)),
            "b": jnp.zeros(6)}
  grads = jax.tree.map(lambda x: jnp.cos(x + 1.0), params)
  kw = dict(learning_rate=1e-2, warmup_steps=1, blend_steps=1, precond_freq=1,
            min_precond_updates=1, k_min=2, k_max=4)
  outs = []
  for dims in (1, MDN((1, 2), 0), {"w": MDN(0, (1, 2)), "b": None},
               lambda name, x: MDN((1, 2), 0) if x.ndim == 3 else None):
    tx = stax.scao(dimension_numbers=dims, **kw)
    update = jax.jit(tx.update)
    state = tx.init(params)
    p = params
    for _ in range(3):
      u, state = update(grads, state, p)
      p = optax.apply_updates(p, u)
    outs.append(p)
  for o in outs[1:]:
    jax.tree.map(np.testing.assert_array_equal, outs[0], o)
  # dims with a batch axis: 6 stacked 4×3 matrices (tests/test_scao.py checks their steps)
  state = stax.scao(dimension_numbers=MDN(1, 2), **kw).init(params)
  (kron,) = [x for x in jax.tree.leaves(state, is_leaf=lambda z: isinstance(
      z, stax.ScaleByKronState)) if isinstance(x, stax.ScaleByKronState)]
  assert (kron.leaves["w"].U_l.shape, kron.leaves["w"].U_r.shape) == ((6, 4, 1), (6, 3, 1))


@pytest.mark.parametrize("shape,name,torch_layout", [
    ((128, 128, 3, 3), "conv.weight", True), ((256, 512), "fc.weight", True),
    ((512, 8, 64), "attn/query/kernel", False), ((8, 64, 512), "attn/out/kernel", False),
    ((256, 512), "dense/kernel", False), ((4, 256, 512), "layers/kernel", False)])
def test_turbo_adam_block_rows_are_the_layouts_trailing_axis_group(shape, name, torch_layout):
  """TurboAdam's blocks (the row view) run along the trailing axis group of the tensor's matrix
  layout (fan-in for torch weights, heads·head_dim for a Flax query kernel, fan-out for a Dense
  kernel) whenever that group's length is a block multiple (otherwise it merges further, to pad
  less): the packing follows the one layout type without transposing anything."""
  from stax.codecs.row_view import row_view_shape
  from torch_bridge.layout import torch_dimension_numbers
  dims = (torch_dimension_numbers(shape, name) if torch_layout
          else stax.layout.default_dimension_numbers(name.split("/"), shape))
  nd = len(shape)
  groups = [stax.layout.axes(dims.reduction_axis, nd), stax.layout.axes(dims.output_axis, nd)]
  trailing = next(g for g in groups if nd - 1 in g)
  assert sorted(trailing) == list(range(nd - len(trailing), nd))       # a contiguous tail
  assert row_view_shape(shape, 128) == shape[:nd - len(trailing)] + (
      int(np.prod([shape[i] for i in trailing])),)


def test_dimension_numbers_out_of_range_or_overlapping_are_refused_naming_the_leaf():
  """An axis outside ``[-ndim, ndim)`` had wrapped around (``MatrixDimensionNumbers(0, 5)`` on
  an ``(8, 16)`` kernel read as ``(0, 1)``; ``(7, 9)`` passed ``init`` and ``stax.describe``
  showed an 8×16×16 matrix view); now ``init`` and ``describe`` raise ``ValueError`` naming the
  leaf. One dims for a whole tree still leaves its vectors alone, and negative axes work."""
  import optax
  params = {"l1": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones((16,))}}
  for dn in (stax.MatrixDimensionNumbers(0, 5), stax.MatrixDimensionNumbers(7, 9),
             stax.MatrixDimensionNumbers(1, 1), stax.MatrixDimensionNumbers((0, 1), 1)):
    tx = stax.oadamw(1e-2, dimension_numbers=dn)
    with pytest.raises(ValueError, match=r"`dimension_numbers` for l1/kernel \(shape \(8, 16\)\)"):
      tx.init(params)
    with pytest.raises(ValueError, match="l1/kernel"):
      stax.describe(tx, params)
  for dn in (stax.MatrixDimensionNumbers(0, 1), optax.contrib.MuonDimensionNumbers(-2, -1)):
    tx = stax.oadamw(1e-2, dimension_numbers=dn)
    u, _ = tx.update(params, tx.init(params), params)
    assert jax.tree.map(jnp.shape, u) == jax.tree.map(jnp.shape, params)
    assert [r.rule for r in stax.describe(tx, params)] == ["adam", "muon"]
