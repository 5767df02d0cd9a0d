"""Newton–Schulz orthogonalisation: singular-value bands, layouts, optax agreement, Pallas, sharding."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import stax
from stax.kernels import newton_schulz as nsk
from stax.transforms import orthogonalize as orth


def _rand(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _scalar_poly(coeffs, ns_steps, s):
  rows, norm_scale = stax.ns_coefficients(coeffs, ns_steps)
  s = np.asarray(s, np.float64) / norm_scale
  for a, b, c in rows:
    s = a * s + b * s ** 3 + c * s ** 5
  return s


def _well_conditioned(shape, seed=0, lo=0.2):
  """A matrix with singular values spread in [lo, 1] (so σ/‖X‖_F stays above 3e-3)."""
  rng = np.random.default_rng(seed)
  m, n = shape[-2:]
  k = min(m, n)
  u, _ = np.linalg.qr(rng.normal(size=(m, k)))
  v, _ = np.linalg.qr(rng.normal(size=(n, k)))
  s = np.linspace(lo, 1.0, k)
  return (u * s) @ v.T


@pytest.mark.parametrize("coeffs", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(16, 16), (32, 12), (12, 32)], ids=["square", "tall", "wide"])
def test_singular_values_follow_the_polynomial_and_lie_in_band(shape, coeffs):
  x = _well_conditioned(shape)
  y = np.asarray(stax.orthogonalize(jnp.asarray(x, jnp.float32), coeffs, 5))
  s_in = np.linalg.svd(x, compute_uv=False) / np.linalg.norm(x)
  s_out = np.linalg.svd(y, compute_uv=False)
  # Each singular value maps through the composed scalar polynomial (independent oracle)...
  np.testing.assert_allclose(np.sort(s_out), np.sort(_scalar_poly(coeffs, 5, s_in)), atol=2e-4)
  # ... and lands in the documented band.
  lo, hi = stax.singular_value_band(coeffs, 5, sigma_min=3e-3)
  assert s_in.min() >= 3e-3
  assert lo - 1e-4 <= s_out.min() and s_out.max() <= hi + 1e-4, (s_out.min(), s_out.max())
  # Singular vectors are kept: Y = U diag(p(σ)) Vᵀ.
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  np.testing.assert_allclose(u.T @ y @ vt.T, np.diag(_scalar_poly(coeffs, 5, s_in)), atol=3e-4)


def test_documented_bands():
  lo, hi = stax.singular_value_band("jordan", 5, 3e-3)
  assert 0.67 < lo < 0.69 and 1.19 < hi < 1.21
  lo, hi = stax.singular_value_band("polar_express", 5, 3e-3)
  assert 0.84 < lo < 0.87 and 1.13 < hi < 1.15
  lo, hi = stax.singular_value_band("cubic", 40, 3e-3)
  assert lo > 0.999 and hi <= 1.0 + 1e-9


def test_rank_one_and_zero_singular_values():
  rng = np.random.default_rng(1)
  x = np.outer(rng.normal(size=24), rng.normal(size=10))
  y = np.asarray(stax.orthogonalize(jnp.asarray(x, jnp.float32)))
  s = np.linalg.svd(y, compute_uv=False)
  # One nonzero singular value: 1 (normalised) mapped by the quintic 5 times; the rest stay 0.
  np.testing.assert_allclose(s[0], _scalar_poly("jordan", 5, 1.0), rtol=1e-4)
  lo, hi = stax.singular_value_band("jordan", 5)
  assert lo <= s[0] <= hi
  assert np.all(s[1:] < 1e-4)


def test_batched_and_stacked_layers_equal_per_matrix():
  x = jnp.stack([jnp.asarray(_well_conditioned((8, 20), seed=i), jnp.float32) for i in range(3)])
  y = stax.orthogonalize(x)  # default for ndim 3: leading batch axis
  for i in range(3):
    np.testing.assert_allclose(y[i], stax.orthogonalize(x[i]), atol=1e-6)


def test_stacked_mode_transposes_a_tall_matrix_only_to_join_wide_ones():
  """``mode="stacked"`` flips a tall matrix to its wide shape only where wide matrices of that
  shape exist (one batch for both); a tall matrix with no such partner is orthogonalised as it
  lies (no transposed copy in the compiled program). Either way each result is the matrix's own
  orthogonalisation."""
  tall, wide, other = _rand((576, 128), 1), _rand((128, 576), 2), _rand((1152, 128), 3)
  dims = [stax.MatrixDimensionNumbers(0, 1)] * 3
  fn = jax.jit(lambda ts: stax.orthogonalize_many(ts, dims, mode="stacked"))
  text = fn.lower([tall, wide, other]).compile().as_text()
  assert "f32[2,128,576]" in text                    # the tall one joined the wide one
  assert not re.search(r"f32\[(1,)?128,1152\]", text)  # the lone tall one stayed tall
  for got, x in zip(fn([tall, wide, other]), (tall, wide, other)):
    np.testing.assert_allclose(got, stax.orthogonalize(x), atol=2e-6)


def test_torch_layout_and_conv_kernels_via_dimension_numbers():
  w = _rand((12, 20))
  torch_dims = stax.MatrixDimensionNumbers(reduction_axis=1, output_axis=0)
  np.testing.assert_allclose(stax.orthogonalize(w.T, dimension_numbers=torch_dims),
                             stax.orthogonalize(w).T, atol=1e-6)
  conv = _rand((3, 3, 4, 16), seed=1)  # Flax (kh, kw, in, out)
  got = stax.orthogonalize(conv, dimension_numbers=stax.conv_dimension_numbers(4))
  want = stax.orthogonalize(conv.reshape(36, 16)).reshape(3, 3, 4, 16)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # optax's own dimension numbers are accepted too.
  od = optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
  np.testing.assert_allclose(stax.orthogonalize(conv, dimension_numbers=od), want, atol=1e-6)


def test_bad_dimension_numbers_and_coeffs_raise():
  with pytest.raises(ValueError, match="dimension_numbers"):
    stax.orthogonalize(_rand((4, 4)), dimension_numbers=stax.MatrixDimensionNumbers(0, 0))
  with pytest.raises(ValueError, match="coeffs"):
    stax.ns_coefficients("nope")
  with pytest.raises(ValueError, match="coeffs"):
    stax.ns_coefficients((1.0, 2.0))
  with pytest.raises(ValueError, match="ns_steps"):
    stax.ns_coefficients("jordan", 0)


@pytest.mark.parametrize("shape", [(16, 16), (24, 40), (40, 24)])
def test_agrees_with_optax_contrib_muon(shape):
  x = _rand(shape, seed=3)
  coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
  ref = optax.contrib._muon.orthogonalize_via_newton_schulz(x, coeffs, ns_steps=5, eps=1e-8)
  got = stax.orthogonalize(x, "jordan", 5, eps=1e-8)
  np.testing.assert_allclose(got, ref, atol=2e-5)
  # Per-iteration coefficients too (optax's "dion" table).
  dion = jnp.asarray(orth.NS_PRESETS["dion"][0])
  ref = optax.contrib._muon.orthogonalize_via_newton_schulz(x, dion, eps=1e-8)
  np.testing.assert_allclose(stax.orthogonalize(x, "dion", 5, eps=1e-8), ref, atol=2e-5)


@pytest.mark.parametrize("shape,block", [((2, 16, 32), 16), ((1, 20, 12), 8)],
                         ids=["batched-wide", "tall-padded"])
def test_pallas_kernel_matches_reference_in_interpret_mode(shape, block):
  x = _rand(shape, seed=4)
  rows, _ = stax.ns_coefficients("polar_express", 2)
  ref = nsk.newton_schulz_reference(x, rows, norm_scale=1.02)
  got = jax.jit(lambda t: nsk.newton_schulz_pallas(t, rows, norm_scale=1.02, block=block,
                                                   block_k=8, interpret=True))(x)
  np.testing.assert_allclose(got, ref, atol=2e-5)


def test_dispatch_explicit_pallas_and_errors():
  x = _rand((8, 8), seed=5)
  got = jax.jit(lambda t: stax.orthogonalize(t, ns_steps=2, implementation="pallas"))(x)
  np.testing.assert_allclose(got, stax.orthogonalize(x, ns_steps=2), atol=2e-5)
  with pytest.raises(ValueError, match="implementation"):
    stax.orthogonalize(x, implementation="cuda")


# --------------------------------------------------------------------------- sharding
def _same_spec(a, b, ndim):
  pad = lambda t: tuple(t) + (None,) * (ndim - len(tuple(t)))
  return pad(a) == pad(b)


def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
  return jax.make_mesh((8,), ("x",))


@pytest.mark.parametrize("spec", [P("x", None), P(None, "x")], ids=["rows", "cols"])
@pytest.mark.parametrize("shape", [(16, 64), (64, 16)], ids=["wide", "tall"])
def test_explicit_mesh_sharded_matrix_gives_unsharded_result(shape, spec):
  mesh = _mesh()
  x = _rand(shape, seed=6)
  want = stax.orthogonalize(x)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    got = jax.jit(stax.orthogonalize)(xs)
    assert got.sharding.spec == spec
    # optax's orthogonaliser cannot even trace here.
    coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
    with pytest.raises(jax.sharding.ShardingTypeError if hasattr(jax.sharding, "ShardingTypeError")
                       else Exception):
      jax.jit(lambda t: optax.contrib._muon.orthogonalize_via_newton_schulz(t, coeffs))(xs)
  np.testing.assert_allclose(jax.device_get(got), want, atol=1e-5)


def test_stacked_mode_orthogonalises_whole_matrices_per_device():
  mesh = _mesh()
  xs = [_rand((16, 32), seed=i) for i in range(5)] + [_rand((3, 8, 8), seed=9)]
  dims = [None] * 5 + [stax.MatrixDimensionNumbers(1, 2)]
  dims = [d or stax.MatrixDimensionNumbers(0, 1) for d in dims]
  want = [stax.orthogonalize(x, dimension_numbers=d) for x, d in zip(xs, dims)]
  specs = [P(None, "x")] * 3 + [P("x", None)] * 2 + [P()]
  with jax.set_mesh(mesh):
    put = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(xs, specs)]
    fn = jax.jit(lambda ts: stax.orthogonalize_many(ts, dims, mode="stacked"))
    got = fn(put)
    hlo = fn.lower(put).compile().as_text()
    per_leaf = jax.jit(lambda ts: stax.orthogonalize_many(ts, dims, mode="per_leaf"))
    hlo_leaf = per_leaf.lower(put).compile().as_text()
  for g, w, s in zip(got, want, specs):
    assert _same_spec(g.sharding.spec, s, g.ndim)
    np.testing.assert_allclose(jax.device_get(g), w, atol=1e-5)
  # Stacked: the iteration is device-local (no all-reduce of Gram matrices); per-leaf on
  # column-sharded matrices all-reduces the Gram matrix every iteration.
  assert "all-reduce" not in hlo
  assert "all-reduce" in hlo_leaf


def test_stacked_mode_moves_only_owned_matrices():
  """Sharded matrices reach their owners by all-to-all (each device receives 1/8 of its
  groups), never by gathering every matrix everywhere, and tall matrices share the group of
  their transposed shape: for a GPT block's (d, d)×4, (d, 4d), (4d, d) the per-device bytes
  received are under half the matrices' total (each device gets the 1/8 it owns and sends it
  back, plus padding; the all-gathering version received 1.75× the total) and under 1/4 of what
  per-leaf sharded Newton–Schulz all-reduces (benchmarks/sharded_muon.py)."""
  from benchmarks.sharded_muon import collectives
  mesh = _mesh()
  shapes = ([(32, 32)] * 4 + [(32, 128), (128, 32)]) * 2
  xs = [_rand(s, seed=i) for i, s in enumerate(shapes)]
  dims = [stax.MatrixDimensionNumbers(0, 1)] * len(xs)
  want = [stax.orthogonalize(x) for x in xs]
  with jax.set_mesh(mesh):
    put = [jax.device_put(x, NamedSharding(mesh, P("x", None))) for x in xs]
    texts = {}
    for mode in ("stacked", "per_leaf"):
      fn = jax.jit(lambda ts, mode=mode: stax.orthogonalize_many(ts, dims, mode=mode))
      got = fn(put)
      texts[mode] = fn.lower(put).compile().as_text()
      for g, w in zip(got, want):
        assert _same_spec(g.sharding.spec, P("x", None), 2)
        np.testing.assert_allclose(jax.device_get(g), w, atol=1e-5)
  stacked, per_leaf = (collectives(texts[m], 8) for m in ("stacked", "per_leaf"))
  total = sum(4 * int(np.prod(s)) for s in shapes)
  assert stacked["all-gather"]["count"] == 0 and stacked["all-reduce"]["count"] == 0
  assert stacked["all-to-all"]["count"] > 0
  assert stacked["received_bytes"] < total / 2
  assert stacked["received_bytes"] < per_leaf["received_bytes"] / 4


def test_stacked_orthogonaliser_is_a_drop_in_for_optax_muon_on_a_mesh():
  """optax.contrib's Muon cannot take sharded matrices; the same Muon-style chain with stax's
  stacked orthogonaliser runs on an 8-device mesh (row- and column-sharded, tall and wide) and
  gives optax.contrib.scale_by_muon's single-device updates (nesterov off: optax's bias-corrected
  EMA is then the trace times (1-β)/(1-β^t), which the Frobenius normalisation removes)."""
  mesh = _mesh()
  shapes = {"a": (16, 16), "b": (16, 64), "c": (64, 16), "d": (16, 16)}
  specs = {"a": P("x", None), "b": P(None, "x"), "c": P("x", None), "d": P(None, "x")}
  params = {k: jnp.zeros(v) for k, v in shapes.items()}
  ref_tx = optax.contrib.scale_by_muon(
      beta=0.95, eps=1e-8, nesterov=False,
      weight_dimension_numbers={k: optax.contrib.MuonDimensionNumbers(0, 1) for k in shapes})
  tx = optax.chain(optax.trace(0.95), stax.scale_by_orthogonalization(
      "jordan", 5, eps=1e-8, mode="stacked"))
  ref_s = ref_tx.init(params)
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
    state = jax.jit(tx.init)(put(params))
    step = jax.jit(tx.update)
    for i in range(3):
      g = {k: _rand(v, seed=10 * i + j) for j, (k, v) in enumerate(shapes.items())}
      want, ref_s = ref_tx.update(g, ref_s)
      got, state = step(put(g), state, put(params))
      for k in shapes:
        assert _same_spec(got[k].sharding.spec, specs[k], 2)
        np.testing.assert_allclose(jax.device_get(got[k]), want[k], atol=3e-5)


def test_transform_match_rms_gives_rms_0p2_and_scale_is_applied():
  x = {"w": _rand((16, 48)), "b": _rand((5,))}
  dims = lambda path, leaf: stax.MatrixDimensionNumbers(0, 1) if leaf.ndim == 2 else None
  tx = stax.scale_by_orthogonalization("cubic", 40, dimension_numbers=dims,
                                       shape_scale="match_rms", scale=0.5)
  u, _ = tx.update(x, tx.init(x))
  rms = float(jnp.sqrt(jnp.mean(u["w"] ** 2)))
  np.testing.assert_allclose(rms, 0.5 * 0.2, rtol=1e-3)
  np.testing.assert_array_equal(u["b"], x["b"])  # non-matrix leaves pass through


def test_pallas_under_explicit_mesh_runs_in_shard_map():
  mesh = _mesh()
  xs = [_rand((8, 16), seed=i) for i in range(3)]
  dims = [stax.MatrixDimensionNumbers(0, 1)] * 3
  want = [stax.orthogonalize(x, ns_steps=2) for x in xs]
  with jax.set_mesh(mesh):
    put = [jax.device_put(x, NamedSharding(mesh, P(None, "x"))) for x in xs]
    got = jax.jit(lambda ts: stax.orthogonalize_many(ts, dims, ns_steps=2, mode="stacked",
                                                     implementation="pallas"))(put)
  for g, w in zip(got, want):
    assert _same_spec(g.sharding.spec, P(None, "x"), 2)
    np.testing.assert_allclose(jax.device_get(g), w, atol=2e-5)
