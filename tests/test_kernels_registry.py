"""The per-op kernel registry (stax/kernels/_registry.py) and its registered kernels."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stax
from stax.kernels import _registry as reg
from stax.kernels import newton_schulz as nsk
from stax.kernels import turbo_step as ts

POLAR = stax.ns_coefficients("polar_express", 2)[0]


def _toy_op(pallas_supports=lambda x: True):
  op = reg.Op("toy", default_order={"gpu": ("pallas", "xla"), "other": ("xla",)}, register=False)

  @op.register("xla")
  def _xla(x):
    return ("xla", x)

  @op.register("pallas")
  def _pallas(x):
    if not pallas_supports(x):
      raise NotImplementedError("odd inputs only")
    return ("pallas", x)

  return op


# ------------------------------------------------------------------------------ the registry
def test_registry_lists_exactly_the_existing_implementations():
  assert {"newton_schulz", "turbo_step"} <= set(reg.ops())
  assert reg.get_op("newton_schulz") is nsk.OP
  assert reg.get_op("turbo_step") is ts.OP
  assert nsk.OP.implementations == ("xla", "pallas", "gram")
  assert ts.OP.implementations == ("xla", "pallas", "chunked")
  with pytest.raises(ValueError, match="unknown kernel op 'nope'"):
    reg.get_op("nope")


def test_default_order_per_platform():
  # Newton–Schulz: the Pallas kernel is opt-in on every platform.
  for on in ("cpu", "gpu", "tpu"):
    assert nsk.OP.default_order(on) == ("gram", "xla")
  assert ts.OP.default_order("gpu") == ("xla",)   # the kernel has not run on a GPU yet
  assert ts.OP.default_order("cpu") == ("xla",)
  assert ts.OP.default_order("tpu") == ("xla",)
  # Names in an order that have no registered kernel are skipped.
  op = reg.Op("partial", default_order={"other": ("pallas", "xla")}, register=False)
  op.register("xla", lambda x: x)
  assert op.default_order("cpu") == ("xla",)


def test_none_picks_the_first_supported_implementation(monkeypatch):
  op = _toy_op()
  assert op(1) == (("pallas", 1) if reg.platform() == "gpu" else ("xla", 1))
  monkeypatch.setattr(reg, "platform", lambda: "cpu")
  assert op(1) == ("xla", 1)
  monkeypatch.setattr(reg, "platform", lambda: "gpu")
  assert op(1) == ("pallas", 1)
  assert op(1, implementation="xla") == ("xla", 1)


def test_not_implemented_falls_back_for_none_only(monkeypatch):
  monkeypatch.setattr(reg, "platform", lambda: "gpu")
  op = _toy_op(pallas_supports=lambda x: x % 2 == 1)
  assert op(3) == ("pallas", 3)
  assert op(2) == ("xla", 2)
  with pytest.raises(ValueError, match=r"op 'toy': `implementation='pallas'` does not support "
                                       r"this input: odd inputs only"):
    op(2, implementation="pallas")
  nothing = reg.Op("nothing", default_order={"other": ("xla",)}, register=False)

  @nothing.register("xla")
  def _never(x):
    raise NotImplementedError("never")

  with pytest.raises(NotImplementedError, match="no implementation supports this input"):
    nothing(1)


def _turbo_leaf(shape, implementation):
  """A TurboAdam step on one leaf (faithful codec, compressed): (updates, new state)."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=shape) * 0.05, jnp.float32)}
  tx = stax.turbo_adam(1e-2, codec="turboadam-0.2", min_compress_elements=1,
                       implementation=implementation)
  return tx.update(grads, tx.init(params), params)


def test_turbo_step_falls_back_to_reference_on_unsupported_length(monkeypatch):
  want = _turbo_leaf((2, 100), "xla")
  with pytest.raises(ValueError, match=r"row view.*100 elements.*multiple of block_size \(128\)"):
    _turbo_leaf((2, 100), "pallas")                      # interpret mode, on this CPU
  monkeypatch.setattr(reg, "platform", lambda: "gpu")
  got = _turbo_leaf((2, 100), None)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                  np.asarray(b.astype(jnp.float32)))


def test_newton_schulz_left_multiplier_needs_xla():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 12))
  y, left = nsk.newton_schulz(x, POLAR, return_left=True)
  y_ref, left_ref = nsk.newton_schulz_reference(x, POLAR, return_left=True)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(left, left_ref)
  with pytest.raises(ValueError, match="does not return the left multiplier"):
    nsk.newton_schulz(x, POLAR, return_left=True, implementation="pallas")


@pytest.mark.parametrize("name", ["triton", "cuda", "XLA", "bogus"])
def test_unknown_implementation_names_the_op_and_the_allowed_set(name):
  x = jnp.ones((1, 4, 4))
  for op in ("newton_schulz", "turbo_step"):
    impls = (r"\('xla', 'pallas', 'gram'\)" if op == "newton_schulz"
             else r"\('xla', 'pallas', 'chunked'\)")
    with pytest.raises(ValueError, match=rf"`implementation` for op '{op}' must be None or one of "
                                         rf"{impls}, got '{name}'"):
      reg.check_implementation(op, name)
  with pytest.raises(ValueError, match=r"op 'newton_schulz' .*\('xla', 'pallas', 'gram'\)"):
    nsk.newton_schulz(x, POLAR, implementation=name)
  with pytest.raises(ValueError, match=r"op 'newton_schulz' .*\('xla', 'pallas', 'gram'\)"):
    stax.orthogonalize(x[0], implementation=name)
  for ok in (None, "xla", "pallas", "gram"):
    reg.check_implementation("newton_schulz", ok)


def test_duplicate_registration_is_refused():
  with pytest.raises(ValueError, match="already registered"):
    reg.Op("newton_schulz", default_order={})
  op = _toy_op()
  with pytest.raises(ValueError, match="already has an implementation 'xla'"):
    op.register("xla", lambda x: x)


# ------------------------------------------------------------- Pallas kernels vs references
@pytest.mark.parametrize("shape,block", [((3, 8, 24), 8), ((1, 40, 16), 16), ((2, 12, 12), 8)],
                         ids=["wide", "tall-padded", "square-padded"])
def test_newton_schulz_pallas_equals_reference(shape, block):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  ref = nsk.newton_schulz(x, POLAR, norm_scale=1.02, implementation="xla")
  got = jax.jit(lambda t: nsk.newton_schulz(t, POLAR, norm_scale=1.02, implementation="pallas",
                                            block=block, block_k=8))(x)
  np.testing.assert_allclose(got, ref, atol=2e-5)


@pytest.mark.parametrize("shape", [(128,), (3, 256)], ids=["vector", "matrix"])
def test_turbo_step_pallas_equals_reference(shape):
  (u_ref, s_ref), (u_ker, s_ker) = _turbo_leaf(shape, "xla"), _turbo_leaf(shape, "pallas")
  for a, b in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_ker)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype in (jnp.uint8, jnp.float16, jnp.bfloat16):       # codes, endpoints, means
      np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)),
                                    np.asarray(b.astype(jnp.float32)))
    else:                                                      # UState's step scalars, counts
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
  # XLA contracts a·b+c into FMAs differently in the two programs: float32 rounding.
  np.testing.assert_allclose(np.asarray(u_ker["w"]), np.asarray(u_ref["w"]), rtol=1e-6,
                             atol=1e-9)


def test_orthogonalization_factories_reject_unknown_implementation_at_construction():
  """A name with no kernel behind it fails when the transform is built, not when it runs."""
  with pytest.raises(ValueError, match="newton_schulz.*triton"):
    stax.scale_by_orthogonalization(implementation="triton")
  with pytest.raises(ValueError, match="newton_schulz.*triton"):
    stax.orthogonalize(jnp.ones((3, 3)), implementation="triton")


# ------------------------------------------------------------------ Gram Newton–Schulz
def _ns_float64(x, rows, norm_scale, eps=1e-7):
  """The standard iteration in float64 numpy (the oracle for both float32 implementations)."""
  x = np.asarray(x, np.float64)
  tr = x.shape[-2] > x.shape[-1]
  if tr:
    x = np.swapaxes(x, -1, -2)
  x = x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) * norm_scale + eps)
  for a, b, c in rows:
    g = x @ np.swapaxes(x, -1, -2)
    x = a * x + (b * g + c * g @ g) @ x
  return np.swapaxes(x, -1, -2) if tr else x


@pytest.mark.parametrize("preset", ["jordan", "polar_express"])
@pytest.mark.parametrize("shape", [(3, 16, 64), (2, 96, 24), (1, 8, 80)],
                         ids=["wide_4to1", "tall_4to1", "wide_10to1"])
def test_gram_newton_schulz_is_the_standard_iteration(preset, shape):
  """In exact arithmetic the Gram iteration is the standard one; in float32 (one restart) its
  distance to the float64 standard iteration is within 3× the float32 standard iteration's own,
  and its left multiplier L reproduces the output from the normalised input."""
  rows, ns = stax.ns_coefficients(preset, 5)
  x = jax.random.normal(jax.random.PRNGKey(1), shape) * jnp.linspace(0.01, 1.0, shape[-1])
  want = _ns_float64(x, rows, ns)
  std = np.asarray(nsk.newton_schulz(x, rows, norm_scale=ns, implementation="xla"), np.float64)
  got, left = nsk.newton_schulz(x, rows, norm_scale=ns, implementation="gram", return_left=True)
  err_std = np.max(np.abs(std - want))
  err_gram = np.max(np.abs(np.asarray(got, np.float64) - want))
  assert err_gram <= 3 * err_std + 1e-6, (err_gram, err_std)
  x0, tr = nsk.reference.gram_orientation(x)
  x0 = nsk.reference.normalise(x0, 1e-7, ns)
  via_left = np.einsum("bij,bjk->bik", np.asarray(left, np.float64), np.asarray(x0, np.float64))
  if tr:
    via_left = np.swapaxes(via_left, -1, -2)
  np.testing.assert_allclose(via_left, np.asarray(got, np.float64), atol=1e-5)


def test_gram_newton_schulz_runs_the_standard_iteration_where_it_would_be_slower():
  rows, ns = stax.ns_coefficients("jordan", 5)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 24, 40))   # aspect 1.67 < 2
  np.testing.assert_array_equal(nsk.newton_schulz(x, rows, implementation="gram"),
                                nsk.newton_schulz_reference(x, rows))
  with pytest.raises(ValueError, match=r"`restart` must be in \[0, 5\]"):
    nsk.newton_schulz_gram(jnp.ones((1, 4, 16)), rows, restart=6)


@pytest.mark.parametrize("batch", [1, 3])
def test_gram_newton_schulz_iterates_a_tall_matrix_as_it_lies(batch):
  """A tall matrix is orthogonalised without a transposed copy: no array of the transposed
  shape is in the compiled program (each consumer of the normalised matrix fused a transpose of
  its own before), and the result is the wide iteration's on the transpose, transposed, within
  float32 rounding of the float64 standard iteration."""
  rows, ns = stax.ns_coefficients("jordan", 5)
  x = jax.random.normal(jax.random.PRNGKey(4), (batch, 576, 128))
  fn = jax.jit(lambda x: nsk.newton_schulz(x, rows, norm_scale=ns, implementation="gram"))
  text = fn.lower(x).compile().as_text()
  transposed = r"f32\[(%d,)?128,576\]" % batch
  assert not re.search(transposed, text), re.findall(r".*" + transposed + r".*", text)[:3]
  got = np.asarray(fn(x), np.float64)
  wide = nsk.newton_schulz(jnp.swapaxes(x, 1, 2), rows, norm_scale=ns, implementation="gram")
  np.testing.assert_allclose(got, np.swapaxes(np.asarray(wide, np.float64), 1, 2), atol=2e-6)
  np.testing.assert_allclose(got, _ns_float64(x, rows, ns), atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 200, 96), (2, 64, 64)], ids=["tall", "square"])
def test_standard_newton_schulz_compiles_the_same_kernels_for_every_iteration(shape):
  """Each iteration of the XLA standard iteration is the same kernels (X's new value is one
  product's output, ``(a·I + b·A + c·A²)·X``), so 7 iterations compile no more distinct
  kernels than 3; written ``a·X + B·X`` XLA fused the sum into X's next uses and recomputed
  every earlier iteration's in each, a larger kernel per iteration for a tall matrix. The
  result is the float64 iteration's within float32 rounding."""
  from benchmarks.speed import distinct_kernels
  x = jax.random.normal(jax.random.PRNGKey(3), shape)
  counts = []
  for steps in (3, 7):
    rows, _ = stax.ns_coefficients("jordan", steps)
    fn = jax.jit(lambda x: nsk.newton_schulz_reference(x, rows))
    counts.append(distinct_kernels(fn.lower(x).compile().as_text()))
    np.testing.assert_allclose(np.asarray(fn(x), np.float64), _ns_float64(x, rows, 1.0),
                               atol=2e-5)
  assert counts[0] == counts[1], counts


# ------------------------------------------------- what is compiled for a GPU (lowered on CPU)
def _lower_for_cuda(fn, *args):
  """StableHLO of ``fn(*args)`` lowered for CUDA on this machine (no GPU needed)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("shape,v_bits", [((64, 256), 4), ((16, 8, 4, 4), 2), ((6, 384), 8),
                                           ((128,), 4)], ids=["matrix", "conv-2bit", "rows6-8bit",
                                                              "vector"])
def test_faithful_turbo_step_pallas_lowers_to_triton_for_gpu(monkeypatch, shape, v_bits):
  """The fused kernel reads and writes its codes by strided ref loads and stores (four phases of
  each block, no value slices or reshapes), so it lowers through Pallas's Triton backend for
  CUDA: one Triton call per compressed leaf, its codec's divisions and square roots
  IEEE-rounded (``numerics.ptx_ieee_arithmetic``). (On an H200, jax 0.11.2, the earlier kernel
  stopped at ``lax.slice``.) ``implementation=None`` still runs the XLA reference on a GPU:
  the kernel has not yet been run on one."""
  import optax
  from stax.kernels.turbo_step import pallas as tp
  monkeypatch.setattr(reg, "platform", lambda: "gpu")
  monkeypatch.setattr(tp, "use_interpret", lambda: False)
  p = {"w": jnp.zeros(shape)}

  def lowered(implementation):
    tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1, v_bits=v_bits,
                         implementation=implementation)

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return _lower_for_cuda(step, p, tx.init(p), p)
  assert "__gpu$xla.gpu.triton" not in lowered(None)
  text = lowered("pallas")
  assert text.count("__gpu$xla.gpu.triton") == 1
  # the codec's divisions and square roots as PTX's IEEE-rounded instructions (inline
  # assembly: Triton's own are div.full / sqrt.approx), as XLA's are
  assert "div.rn.f32" in text and "sqrt.rn.f32" in text


def test_faithful_turbo_step_pallas_refuses_what_it_cannot_read():
  """3- and 6-bit v codes straddle bytes, which the kernel's phase loads cannot read: an
  explicit ``"pallas"`` is a ValueError naming the reason; ``None`` runs the reference."""
  p = {"w": jnp.ones((4, 256))}
  with pytest.raises(ValueError, match=r"v_bits in \(2, 4, 8\), got 3"):
    tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1, v_bits=3,
                         implementation="pallas")
    tx.update(p, tx.init(p), p)
  tx = stax.turbo_adam(1e-3, codec="turboadam-0.2", min_compress_elements=1, v_bits=3)
  tx.update(p, tx.init(p), p)


def test_newton_schulz_pallas_lowers_to_triton_for_gpu():
  """The compiled Newton–Schulz kernel (checked on an H200 against "xla": relative difference
  1e-3, TF32 products) lowers through Pallas's Triton backend: three kernels per iteration."""
  from stax.kernels.newton_schulz import pallas as nsp
  x = jnp.ones((2, 64, 128))
  text = _lower_for_cuda(lambda t: nsp.newton_schulz_pallas(t, POLAR, interpret=False),
                         x)
  assert text.count("__gpu$xla.gpu.triton") == 6


def test_codec_kernel_building_blocks_lower_through_triton_but_slice_does_not():
  """The facts a GPU codec kernel is designed around (benchmarks/pallas_probe.py): with Triton
  compiler params, strided ref loads, a last-axis reshape split with a block reduction, uint32
  hashing, bf16 bitcasts, 2-D iota and the transcendentals lower for CUDA; ``lax.slice`` (what
  stops the faithful TurboAdam kernel) does not."""
  from benchmarks.pallas_probe import run
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
  res = run()["probes"]
  assert all(row["lowers"] for row in res.values()), res

  def sliced(x_ref, o_ref):
    o_ref[...] = x_ref[...][:, 0:16] * 2.0

  call = lambda x: pl.pallas_call(sliced, out_shape=jax.ShapeDtypeStruct((8, 16), jnp.float32),
                                  compiler_params=pltriton.CompilerParams(num_warps=4))(x)
  with pytest.raises(Exception, match="slice"):
    _lower_for_cuda(call, jnp.ones((8, 32)))


def test_gpu_scripts_turbo_step_section_runs_here_and_names_each_mismatch():
  """``benchmarks/gpu.py``'s ``turbo_step`` section, what a lent GPU runs first, in its
  ``--small`` form on this CPU (the kernel in interpret mode): it runs, every code, endpoint and
  mean of the kernel's state equals the ``"xla"`` path's, and a mismatch is reported by state
  field; the only one allowed is UState's ``encode_step`` scalar (the kernel sums Σr² per block,
  then over blocks: another order, an ulp)."""
  from benchmarks import gpu
  rows = gpu.turbo_step(small=True)
  errors = [r["error"] for r in rows if "error" in r]
  assert not errors, errors      # (the text lets conftest.py skip a float16 build limitation)
  checks = {r["implementation"]: r for r in rows if not r.get("timing")}
  assert checks[None]["state_mismatches"] == 0
  assert set(checks["pallas"]["state_mismatches_by_field"]) <= {
      ".inner_state[0].mu['w'].encode_step"}, checks["pallas"]
  assert checks["pallas"]["state_elements"] > 1000
  assert all(r["ms"] > 0 for r in rows if r.get("timing"))


def test_ptx_ieee_arithmetic_rounds_a_kernels_division_and_root_as_ieee():
  """``numerics.ptx_ieee_arithmetic``: a Pallas kernel traced inside it divides and takes roots
  with PTX's ``div.rn.f32`` / ``sqrt.rn.f32`` (inline assembly); traced outside, with Triton's
  own (``div.full``, ``sqrt.approx``: not IEEE-exact). Everywhere else ``div_rn`` and
  ``sqrt_rn`` are the plain operations, bit for bit."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
  from stax import numerics

  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = numerics.sqrt_rn(numerics.divide(x_ref[...], y_ref[...]))

  def call():    # a new function each time: jit caches a trace by function, not by context
    return lambda x, y: pl.pallas_call(
        functools.partial(kernel), out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4))(x, y)
  x, y = jnp.ones((8, 128)), jnp.full((8, 128), 3.0)
  with numerics.ptx_ieee_arithmetic():
    inside = _lower_for_cuda(call(), x, y)
  outside = _lower_for_cuda(call(), x, y)
  assert "div.rn.f32" in inside and "sqrt.rn.f32" in inside
  assert "div.rn.f32" not in outside and "sqrt.rn.f32" not in outside
  a = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
  b = np.abs(a) + 0.5
  np.testing.assert_array_equal(np.asarray(jax.jit(numerics.div_rn)(a, b)),
                                np.asarray(jax.jit(lambda u, v: u / v)(a, b)))
  np.testing.assert_array_equal(np.asarray(jax.jit(numerics.sqrt_rn)(b)),
                                np.asarray(jax.jit(jnp.sqrt)(b)))
