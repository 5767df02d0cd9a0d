"""stax.numerics: overflow-safe squares, means and norms against a float64 numpy reference."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stax import numerics

F32_EPS = float(np.finfo(np.float32).eps)


def _huge_matrix():
  """float32 (6, 8) with entries near float32's maximum, yet a representable norm."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  x[0, 0], x[2, 3], x[5, 7] = 2.5e38, -1.5e38, 8e37
  x[1, :] = 1e30
  x[3, 1] = -3e19
  return x


def test_square_bound_per_dtype():
  assert numerics.square_bound() == 2.0 ** 63
  assert numerics.square_bound(jnp.float32) == 2.0 ** 63
  assert numerics.square_bound(jnp.bfloat16) == 2.0 ** 63
  assert numerics.square_bound(jnp.float16) == 2.0 ** 7
  assert numerics.square_bound(jnp.float32, jnp.float16) == 2.0 ** 7
  assert numerics.square_bound(jnp.float32, terms=2 ** 24) == 2.0 ** 51
  for dt in (jnp.float32, jnp.bfloat16, jnp.float16):
    b = numerics.square_bound(dt, terms=1000)
    assert 1000 * b * b <= float(jnp.finfo(dt).max) / 4


def test_saturate_clips_keeps_nan_and_small_entries():
  x = jnp.array([np.nan, np.inf, -np.inf, 3e38, -1e30, 1.5, -2.0 ** 62], jnp.float32)
  y = np.asarray(numerics.saturate(x))
  b = 2.0 ** 63
  assert np.isnan(y[0])
  np.testing.assert_array_equal(y[1:], np.array([b, -b, b, -b, 1.5, -2.0 ** 62], np.float32))


@pytest.mark.parametrize("axis", [None, 1, (0, 1)])
def test_norm_near_float32_max_matches_float64(axis):
  x = _huge_matrix()
  ref = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=axis))
  got = np.asarray(jax.jit(lambda v: numerics.norm(v, axis=axis))(x), np.float64)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref, rtol=4 * F32_EPS)
  # The plain float32 expression overflows on the same input.
  assert not np.isfinite(np.asarray(jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(x)))))).all()


def test_normalize_near_float32_max_matches_float64():
  x = _huge_matrix()[None]
  x64 = x.astype(np.float64)
  eps = 1e-7
  ref = x64 / (np.sqrt(np.sum(x64 ** 2, axis=(-2, -1), keepdims=True)) * 1.02 + eps)
  got = np.asarray(numerics.normalize(x, eps, 1.02, axis=(-2, -1)), np.float64)
  np.testing.assert_allclose(got, ref, rtol=4 * F32_EPS, atol=1e-30)
  # Even an unrepresentable norm (every entry at the maximum) normalises to finite values.
  full = jnp.full((64, 64), 3.4e38, jnp.float32)
  np.testing.assert_allclose(np.asarray(numerics.normalize(full)), 1 / 64, rtol=4 * F32_EPS)


def test_normalize_forms_one_scale_kernel_for_every_shape():
  """The scalars that scale a norm (the power of two from ``max|x|``, ``2**-k / norm``) compare
  with one threshold for every reduction of up to 2**24 entries, so normalising matrices of
  different sizes compiles those scalar kernels once, not once per size (OAdamW's
  Newton–Schulz on ResNet-18's 12 matrix shapes compiled two per shape); the results stay the
  plain expression's bit for bit."""
  from benchmarks.speed import _fused_bodies
  xs = [jax.random.normal(jax.random.PRNGKey(i), (1, m, n)) for i, (m, n) in
        enumerate([(64, 147), (128, 576), (256, 1152), (512, 2304)])]
  fn = jax.jit(lambda xs: [numerics.normalize(x, 1e-7, 1.02, axis=(-2, -1)) for x in xs])
  bodies = set(_fused_bodies(fn.lower(xs).compile().as_text()))
  scalar = [b for b in bodies
            if max(int(np.prod([int(d) for d in s.split(",") if d] or [1]))
                   for s in re.findall(r"= [a-z0-9]+\[([\d,]*)\]", b)) == 1]
  assert len(scalar) <= 2, len(scalar)
  plain = lambda x: x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
                         * 1.02 + 1e-7)
  for got, x in zip(fn(xs), xs):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(plain)(x)))


def test_mean_square_and_mean_saturate_and_match_float64():
  r = numerics.statistic_bound(jnp.float32)
  assert r == 2.0 ** 126
  # Large but representable: the float64 mean of squares.
  x = _huge_matrix()
  x[np.abs(x) > 1e19] = 1.7e18
  np.testing.assert_allclose(float(numerics.mean_square(x)),
                             np.mean(x.astype(np.float64) ** 2), rtol=4 * F32_EPS)
  # Squares or sums that float32 cannot hold saturate at R (the plain mean is Inf there).
  for big in (_huge_matrix(), np.full((1000,), 3e19, np.float32)):
    assert float(jnp.mean(jnp.square(jnp.asarray(big)))) == np.inf
    assert float(numerics.mean_square(big)) == r
  # mean: exact, its sum never overflows (the plain one does).
  for big in (np.full((1000,), 3.4e38, np.float32), np.full((7,), -3.4e38, np.float32),
              _huge_matrix()):
    np.testing.assert_allclose(float(numerics.mean(big)), np.mean(big.astype(np.float64)),
                               rtol=4 * F32_EPS)
  assert float(jnp.mean(jnp.full((1000,), 3.4e38, jnp.float32))) == np.inf
  assert np.isnan(float(numerics.mean_square(np.array([1.0, np.nan], np.float32))))
  # Per-row means, ordinary values: the float64 mean.
  y = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(numerics.mean_square(y, axis=1)),
                             np.mean(y.astype(np.float64) ** 2, axis=1), rtol=4 * F32_EPS)
  np.testing.assert_allclose(np.asarray(numerics.mean(y, axis=0)),
                             np.mean(y.astype(np.float64), axis=0), rtol=4 * F32_EPS, atol=1e-7)


def test_saturate_norm_bounds_the_norm_and_keeps_the_direction():
  x = _huge_matrix()
  bound = 2.0 ** 61
  y = np.asarray(numerics.saturate_norm(x, bound), np.float64)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(np.sqrt(np.sum(y ** 2)), bound, rtol=4 * F32_EPS)
  np.testing.assert_allclose(y, x64 * (bound / np.sqrt(np.sum(x64 ** 2))), rtol=4 * F32_EPS,
                             atol=1e-30)


def test_ordinary_inputs_are_bit_identical_to_the_plain_expressions():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 32, 48)) * 10.0 ** rng.integers(-6, 6, size=(3, 1, 1)),
                  jnp.float32)
  plain_norm = jax.jit(lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(-2, -1))))
  np.testing.assert_array_equal(np.asarray(jax.jit(
      lambda v: numerics.norm(v, axis=(-2, -1)))(x)), np.asarray(plain_norm(x)))
  plain_normalize = jax.jit(lambda v: v / (jnp.sqrt(jnp.sum(
      jnp.square(v), axis=(-2, -1), keepdims=True)) * 1.02 + 1e-7))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: numerics.normalize(v, 1e-7, 1.02, axis=(-2, -1)))(x)),
      np.asarray(plain_normalize(x)))
  np.testing.assert_array_equal(np.asarray(jax.jit(numerics.mean_square)(x)),
                                np.asarray(jax.jit(lambda v: jnp.mean(v ** 2))(x)))
  np.testing.assert_array_equal(np.asarray(jax.jit(numerics.mean)(x)),
                                np.asarray(jax.jit(jnp.mean)(x)))
  np.testing.assert_array_equal(np.asarray(jax.jit(numerics.saturate_norm)(x, 2.0 ** 61)),
                                np.asarray(x))
  np.testing.assert_array_equal(np.asarray(numerics.saturate(x)), np.asarray(x))


@pytest.mark.parametrize("shape", [(7,), (33, 65), (3, 5, 129), ()])
def test_mean_square_and_abs_is_both_means(shape):
  """The pair equals float64 means to float32 rounding, saturates the square as
  mean_square does (the mean of |x| is the plain mean's, as STAM's seed computes it), and keeps
  NaN."""
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
  ms, ma = numerics.mean_square_and_abs(jnp.asarray(x))
  np.testing.assert_allclose(float(ms), np.mean(x.astype(np.float64) ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(ma), np.mean(np.abs(x.astype(np.float64))), rtol=1e-5)
  big = jnp.full((4,), 3e38, jnp.float32)
  ms, ma = numerics.mean_square_and_abs(big)
  assert float(ms) == float(numerics.mean_square(big)) and np.isfinite(float(ms))
  assert float(ma) == float(jnp.mean(jnp.abs(big)))  # as the plain mean (it overflows)
  ms, ma = numerics.mean_square_and_abs(jnp.array([1.0, jnp.nan]))
  assert np.isnan(float(ms)) and np.isnan(float(ma))


def test_separate_means_are_the_plain_means_each_its_own_reduction():
  """Each result is jnp.mean of its expression bit for bit (an empty one 0), and the compiled
  program has one reduction per mean (no variadic or multi-output reduction, which XLA's CPU
  backend runs as a slow scalar loop)."""
  rng = np.random.default_rng(3)
  g, m = (jnp.asarray(rng.standard_normal((64, 33)).astype(np.float32)) for _ in range(2))
  fns = (lambda g, m: jnp.square(g - m), lambda g, m: jnp.abs(g - m), lambda g, m: g * 0.25)
  got = jax.jit(lambda g, m: numerics.separate_means(numerics.independent(g, m), *fns))(g, m)
  for fn, value in zip(fns, got):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(jax.jit(
        lambda g, m, fn=fn: jnp.mean(fn(g, m)))(g, m)))
  (empty,) = numerics.separate_means((jnp.zeros((0, 3)),), jnp.square)
  assert float(empty) == 0.0
  hlo = jax.jit(lambda g, m: numerics.separate_means((g, m), *fns)).lower(g, m).as_text()
  assert hlo.count("stablehlo.reduce") == 3 and "optimization_barrier" in hlo


def test_the_barrier_is_a_cpu_tuning_only(monkeypatch):
  """Off the CPU (where each fused kernel is a launch; measured on an H200, see
  ``independent``'s docstring) no barrier is placed, and the means are the same values."""
  rng = np.random.default_rng(4)
  g, m = (jnp.asarray(rng.standard_normal((64, 33)).astype(np.float32)) for _ in range(2))
  fns = (lambda g, m: jnp.square(g - m), lambda g, m: jnp.abs(g - m))
  def fn(g, m):  # a new function each time: JAX caches traces by function
    return numerics.separate_means(numerics.independent(g, m), *fns)
  on_cpu = jax.jit(lambda g, m: fn(g, m))(g, m)
  monkeypatch.setattr(numerics.jax, "default_backend", lambda: "gpu")
  assert "optimization_barrier" not in str(jax.make_jaxpr(lambda g, m: fn(g, m))(g, m))
  off_cpu = jax.jit(lambda g, m: fn(g, m))(g, m)
  for a, b in zip(on_cpu, off_cpu):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_absmax_is_the_largest_magnitude_bit_for_bit(dtype):
  """``absmax`` (an integer max of the magnitudes' bits) equals numpy's ``max(|x|)`` bit for bit
  on every non-NaN input, zeros of both signs, subnormals and infinities included, over any
  axis; a NaN in the reduced slice gives a NaN."""
  rng = np.random.default_rng(7)
  x = (rng.standard_normal((6, 5, 32)) * 10.0 ** rng.integers(-3, 4, (6, 5, 32))).astype(
      np.float32)
  x[0, 0, :] = -0.0
  x[0, 1, :] = 0.0
  x[0, 1, 3] = -0.0
  x[0, 2, :] = -1e-42 * np.arange(32)        # float32 subnormals (zero in the 16-bit types)
  x[0, 3, 5] = np.inf
  x[0, 4, 6] = -np.inf
  x[1, 0, :] = -x[1, 0, :] ** 2
  x = np.asarray(jnp.asarray(x, dtype))      # the values the dtype holds
  for axis in (-1, 0, (0, 2), None):
    got = np.asarray(jax.jit(lambda a: numerics.absmax(a, axis=axis))(jnp.asarray(x)))
    want = np.abs(x.astype(np.float32)).max(axis=axis).astype(x.dtype)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got.view(np.uint16 if x.itemsize == 2 else np.uint32),
                                  want.view(np.uint16 if x.itemsize == 2 else np.uint32))
  y = x.copy()
  y[2, 3, 4] = np.nan
  got = np.asarray(numerics.absmax(jnp.asarray(y), axis=-1))
  assert np.isnan(got[2, 3]) and not np.isnan(np.delete(got.reshape(-1), 2 * 5 + 3)).any()
  keep = np.asarray(numerics.absmax(jnp.asarray(x), axis=-1, keepdims=True))
  assert keep.shape == (6, 5, 1)


def test_absmax_fuses_its_operand_where_a_float_max_does_not():
  """The reason for ``absmax``: on XLA's CPU backend a float max-reduction of an elementwise
  expression that another pass also reads (here a 4-bit-style decode) writes part of that
  expression out (YNNPACK's reduction takes materialised operands); the integer max fuses it,
  so nothing but the block maxima is written."""
  if jax.default_backend() != "cpu":
    pytest.skip("a property of XLA's CPU backend")
  def step(absmax):
    def f(c, b):
      m = 0.9 * ((c >> 4).astype(jnp.float32) - 7.0) + 0.1 * b
      s = absmax(m.reshape(256, 16, 32), axis=-1)
      return m * jnp.repeat(s, 32, axis=-1)
    return jax.jit(f).lower(jnp.ones((256, 512), jnp.uint8), jnp.ones((256, 512))).compile()
  plain = step(lambda x, axis: jnp.max(jnp.abs(x), axis=axis)).memory_analysis()
  ours = step(numerics.absmax).memory_analysis()
  assert ours.temp_size_in_bytes <= 256 * 16 * 4      # the block maxima only
  assert plain.temp_size_in_bytes > ours.temp_size_in_bytes   # what it fixes


def test_divide_is_correctly_rounded_where_the_divisor_broadcasts():
  """numerics.divide equals NumPy's float32 division bit for bit for a constant, a scalar array
  and a per-row divisor (all of which XLA would otherwise turn into a multiplication by the
  reciprocal, an ulp off in ~30–70 % of elements on CPU), inside jit, and keeps NaN and Inf."""
  rng = np.random.default_rng(0)
  x = rng.uniform(-20, 20, (64, 100)).astype(np.float32)
  rows = rng.uniform(0.5, 300, (64, 1)).astype(np.float32)
  f = jax.jit(numerics.divide)
  for d in (np.float32(255), np.asarray(np.float32(7.3)), rows):
    np.testing.assert_array_equal(np.asarray(f(x, d)), x / d)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: numerics.divide(x, 255.0))(x)),
                                x / np.float32(255))
  odd = np.asarray([np.nan, 1.0, -1.0, 0.0], np.float32)
  np.testing.assert_array_equal(np.asarray(f(odd, np.float32(0))), odd / np.float32(0))
  assert np.isnan(f(np.float32(1), np.float32(np.nan)))


def test_rounded_product_is_rounded_before_the_add():
  """``a + rounded(b * c)`` rounds twice, as NumPy does (XLA would fuse an FMA: one rounding);
  NaN stays NaN."""
  rng = np.random.default_rng(1)
  a = rng.uniform(-20, -2, (256, 1)).astype(np.float32)
  b = rng.integers(0, 255, (256, 128)).astype(np.float32)
  c = rng.uniform(0.001, 0.1, (256, 1)).astype(np.float32)
  got = jax.jit(lambda a, b, c: a + numerics.rounded(b * c))(a, b, c)
  np.testing.assert_array_equal(np.asarray(got), a + (b * c))
  assert np.isnan(numerics.rounded(jnp.float32(np.nan)))


@pytest.mark.parametrize("shape", [(64, 33), (512, 256), (384, 1152), (3, 70001), (2 ** 19,)])
def test_tiled_means_equal_the_float64_means(shape):
  """Every statistic equals NumPy's float64 mean to float32 rounding, for tensors below the
  threshold (plain reductions), on whole tiles, and with a tail (3 × 70001 is not a multiple of
  16·2048); a scalar operand broadcasts."""
  rng = np.random.default_rng(5)
  g = rng.standard_normal(shape).astype(np.float32) * 3.0
  m = rng.standard_normal(shape).astype(np.float32)
  fns = (lambda g, m, c: jnp.square(g - m), lambda g, m, c: jnp.abs(g - m),
         lambda g, m, c: g * c)
  got = jax.jit(lambda g, m, c: numerics.tiled_means(numerics.independent(g, m, c), *fns))(
      g, m, np.float32(0.5))
  g64, m64 = g.astype(np.float64), m.astype(np.float64)
  want = (np.mean((g64 - m64) ** 2), np.mean(np.abs(g64 - m64)), np.mean(g64 * 0.5))
  for a, b in zip(got, want):
    np.testing.assert_allclose(float(a), b, rtol=2e-6, atol=1e-7)


def test_tiled_means_read_the_operands_once():
  """On a large tensor the statistics come from one variadic reduction over the tiles (one
  loop reading g and m once, XLA's bytes accessed ≈ 8 per element plus the partial sums),
  where separate_means reads them once per statistic; a small tensor or another backend keep
  separate_means' plain reductions. A single statistic is reduced in the same loop, paired with
  itself (two equal sums: XLA keeps the variadic loop instead of a YNNPACK reduction)."""
  n = 16 * 2048 * 8
  g = jnp.arange(n, dtype=jnp.float32) / n
  m = g * 0.5
  fns = (lambda g, m: jnp.square(g - m), lambda g, m: jnp.abs(g - m))
  one = jax.jit(lambda g, m: numerics.tiled_means((g, m), *fns)).lower(g, m)
  sep = jax.jit(lambda g, m: numerics.separate_means((g, m), *fns)).lower(g, m)
  jaxpr = str(jax.make_jaxpr(lambda g, m: numerics.tiled_means((g, m), *fns))(g, m))
  assert jaxpr.count("reduce[") == 1 and "f32[8,2048] " in jaxpr  # both sums, 16 rows each
  bytes_one = one.compile().cost_analysis()["bytes accessed"] / n
  bytes_sep = sep.compile().cost_analysis()["bytes accessed"] / n
  assert bytes_one < 10.5 and bytes_sep >= 15.9, (bytes_one, bytes_sep)
  small = jax.make_jaxpr(lambda g, m: numerics.tiled_means((g, m), *fns))(g[:1000], m[:1000])
  assert str(small).count("reduce_sum") == 2 and "reduce[" not in str(small)
  ms, ma = numerics.tiled_means((g, m), *fns)
  np.testing.assert_allclose(float(ms), np.mean((np.asarray(g, np.float64) * 0.5) ** 2),
                             rtol=2e-6)
  ratio = lambda g, m: jnp.square(g) / jnp.maximum(m, 1e-12)
  single = jax.jit(lambda g, m: numerics.tiled_means((g, m), ratio))
  assert str(jax.make_jaxpr(single)(g, m)).count("reduce[") == 1
  hlo = single.lower(g, m).compile().as_text()
  assert re.search(r"\(f32\[8,2048\]\{1,0\}, f32\[8,2048\]\{1,0\}\) reduce\(", hlo), hlo
  (r,) = single(g, m)
  g64 = np.asarray(g, np.float64)
  want = np.mean(g64 ** 2 / np.maximum(np.asarray(m, np.float64), 1e-12))
  np.testing.assert_allclose(float(r), want, rtol=2e-6)


def test_tiled_means_off_the_cpu_are_separate_means(monkeypatch):
  n = 16 * 2048 * 4
  g = jnp.linspace(-1, 1, n, dtype=jnp.float32)
  fns = (jnp.square, jnp.abs)
  monkeypatch.setattr(numerics.jax, "default_backend", lambda: "gpu")
  jaxpr = str(jax.make_jaxpr(lambda g: numerics.tiled_means((g,), *fns))(g))
  assert jaxpr.count("reduce_sum") == 2 and "reduce[" not in jaxpr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_next_float_is_numpys_nextafter_for_every_bit_pattern(dtype, up):
  """``numerics.next_float`` (integer arithmetic on the bits, what a Pallas kernel lowers) is
  NumPy's ``nextafter`` toward ±inf: every float16 and bfloat16 bit pattern, and a sample of
  float32 ones with the edges (±0, subnormals, the largest finite, ±inf); NaN stays NaN."""
  import ml_dtypes
  npdt = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
  if dtype == "float32":
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 1 << 32, 200_000, dtype=np.uint64),
                           [0, 1, 2, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000,
                            0x80000000, 0x80000001, 0x807FFFFF, 0xFF7FFFFF, 0xFF800000]])
    x = bits.astype(np.uint32).view(np.float32)
  else:
    x = np.arange(1 << 16, dtype=np.uint16).view(npdt)
  with np.errstate(all="ignore"):
    want = np.nextafter(x, np.array(np.inf if up else -np.inf, dtype=npdt))
  got = np.asarray(jax.jit(lambda a: numerics.next_float(a, up))(jnp.asarray(x)))
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
  width = np.uint16 if dtype != "float32" else np.uint32
  np.testing.assert_array_equal(got[~nan].view(width), want[~nan].view(width))
