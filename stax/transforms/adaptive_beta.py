r"""Adaptive first-moment decays: :class:`~stax.transforms.adam.Beta1Rule` s for the Adam core.

A rule returns one :math:`\beta_{1}` per leaf (a scalar per tensor) from the gradient ``g`` and
the decoded previous first moment ``m``; the Adam core (:func:`stax.scale_by_adam` with
``bias_correction="product"``) uses it in :math:`m \leftarrow \beta_1 m + (1-\beta_1) g` and
corrects the bias with :math:`1-\prod_i \beta_{1,i}`. Every rule keeps its per-leaf statistics in
the Adam state (``b1_state``) as float32 *vectors*, one entry per parameter leaf in flatten order,
including the last :math:`\beta_1` it returned (read it with :func:`stax.stam_beta1`, which gives
it back as a tree). One vector per statistic rather than one scalar per leaf and statistic: the
rule's arithmetic then runs once over all leaves, and a step has a few state buffers instead of
hundreds (at 1M parameters in 65 tensors, STAMLite's step took 1.93× optax.adamw's with 327
scalar state leaves and takes 1.28× with 5 vectors; see :class:`~stax.transforms.adam.Beta1Rule`'s
``stacked``).
The rules read the raw gradient (they are ``raw_grads`` rules: the Adam core hands them each
leaf's gradient with the bound ``B`` it saturates at, ``2**63`` for float32 moments) and bound
their *statistics* instead of every entry: a mean of squares saturates at ``R = 2**126``
(:func:`stax.numerics.statistic_bound`), a mean or mean absolute value at ``B``. Wherever every
``|g| <= B`` this is bit for bit the statistics of the saturated gradient the step uses; a
huge finite gradient still never makes a statistic non-finite. A rule's statistics of a leaf
come from one read of the raw operands (:func:`stax.numerics.tiled_means`: a tiled variadic
reduction that XLA's CPU backend runs as one vectorised loop; a clamp inside a reduction, or a
plain variadic one, runs 2-6× slower). Measured at 16M float32 elements: STAM's two residual
means 37.5 ms as one plain variadic reduction of the saturated residual, 27.4 ms as two
reductions of it, 14.8 ms as two reductions of the raw residual (an earlier run); in a later
run the two reductions of the raw residual (:func:`~stax.numerics.separate_means`, the previous
form) took 9.6 ms and the tiled pass 5.3 ms.

Three rules, all with the bounds :math:`[\beta_{lo}, \beta_{hi}] = [\max(0.5,
\beta_{base}(1-\alpha)), \beta_{base}]` unless ``b1_min`` overrides the lower one:

* :func:`residual_variance_beta1` — STAM's rule, exactly as ``stam-optimizer`` 0.1.0 codes it
  (``core/stam.py``). With :math:`r = g - m`,

  .. math::
    \sigma^2 \leftarrow \beta_2\sigma^2 + (1-\beta_2)\,\mathrm{mean}(r^2),\quad
    \tau \leftarrow \rho_\tau\tau + (1-\rho_\tau)\,\mathrm{mean}|r|,\quad
    z = \max(\sigma^2/(\tau^2+10^{-8}), 0),\quad
    \beta_1 = \mathrm{clip}(\beta_{base}(1-\alpha\,z/(1+z)), \beta_{lo}, \beta_{hi})

  and :math:`\beta_1 = \beta_{base}` (the *largest* momentum) when :math:`\sigma^2` is not finite
  or :math:`\sigma^2 \ge \text{threshold}\cdot(\tau^2+10^{-8})` (the seed's README says the
  variance is capped there; its code does this instead, and stax follows the code). Known
  behaviour, kept for parity: :math:`z \to E[r^2]/E|r|^2 \ge 1` whatever the signal-to-noise, so
  :math:`\beta_1` settles near 0.79 for Gaussian residuals, and the hard-coded :math:`10^{-8}`
  makes it depend on the absolute gradient scale (stuck at :math:`\beta_{base}` for
  :math:`|g|\sim 10^{-6}`).
* :func:`spatial_variance_beta1` — STAMLite's lazy rule (``core/stam_lite.py``): EMAs (decay
  :math:`\rho`) of the *spatial* ``mean(g)`` and ``mean(g^2)``, bias-corrected with
  :math:`1-\rho^{t}+\epsilon`, :math:`z = \max(\hat q - \hat a^2, 0)/(\hat q + \epsilon)`, the
  same map and clip, a non-finite candidate falls back to :math:`\beta_{base}`, and
  :math:`\beta_1` is refreshed only on steps ``0, k, 2k, ...`` (kept otherwise).
* :func:`snr_beta1` — the improved rule (stax): :math:`\beta_1` is a function of the residual's
  signal-to-noise ratio only. With EMAs (decay :math:`\rho`) :math:`G` of ``mean(g^2)`` and
  :math:`R` of ``mean(r^2)``, where :math:`r = g - \hat m` is the residual against the
  *bias-corrected* previous momentum,

  .. math::
    \mathrm{snr} = (G - R)/R,\qquad w = \frac{\mathrm{snr}}{1+\mathrm{snr}} =
    \mathrm{clip}(1 - R/G,\, 0,\, 1),\qquad \beta_1 = \beta_{lo} + (\beta_{hi}-\beta_{lo})\,w.

  Both EMAs are quadratic in the gradient and share one decay (their start-up bias cancels), and
  there is no absolute constant, so :math:`\beta_1` is invariant to the gradient's scale. For a
  constant gradient the residual vanishes and :math:`\beta_1 \to \beta_{hi}`; for pure noise
  :math:`R \approx 2G/(1+\beta_1) \ge G`, so :math:`\beta_1 = \beta_{lo}`. For
  :math:`g = \mu + \text{noise}` with per-element SNR :math:`\mu^2/\sigma^2 = S`,
  :math:`w \approx 1 - \frac{2}{1+\beta_1}\frac{1}{1+S}` rises monotonically with S.
  ``G = 0`` (no gradient seen yet) or a non-finite ratio gives :math:`\beta_{hi}`.

References:
  The ``stam-optimizer`` 0.1.0 package (A. Sabry, https://github.com/assemsabry/stam), its code.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stax import _eager
from stax import _leafwise
from stax import numerics as num
from stax._trees import unwrap_variables
from stax.transforms.adam import Beta1Rule
from stax.transforms.guards import PROBE

__all__ = [
    "ResidualVarianceState",
    "SpatialVarianceState",
    "SNRState",
    "BETA1_STATES",
    "beta1_bounds",
    "residual_variance_beta1",
    "spatial_variance_beta1",
    "snr_beta1",
    "find_beta1",
]

_F32 = jnp.float32


class ResidualVarianceState(NamedTuple):
  """State of :func:`residual_variance_beta1` (each field a float32 vector, one entry per leaf).

  Attributes:
    sigma_sq: EMA (decay ``b2``) of ``mean(r**2)``.
    tau: EMA (decay ``tau_decay``) of ``mean(|r|)``.
    beta1: the beta1 of the last step (``b1_base`` before the first).
  """

  sigma_sq: Any
  tau: Any
  beta1: Any


class SpatialVarianceState(NamedTuple):
  """State of :func:`spatial_variance_beta1` (float32 vectors, one entry per leaf).

  Attributes:
    grad_mean: EMA of ``mean(g)``.
    grad_sq_mean: EMA of ``mean(g**2)``.
    beta1: the current (lazily refreshed) beta1, ``b1_base`` at init.
  """

  grad_mean: Any
  grad_sq_mean: Any
  beta1: Any


class SNRState(NamedTuple):
  """State of :func:`snr_beta1` (float32 vectors, one entry per leaf).

  Attributes:
    grad_sq: EMA of ``mean(g**2)`` (G).
    resid_sq: EMA of ``mean(r**2)`` with ``r = g - m_hat`` (R).
    b1_prod: product of the beta1s returned so far (to bias-correct ``m``).
    beta1: the current beta1, the upper bound at init.
  """

  grad_sq: Any
  resid_sq: Any
  b1_prod: Any
  beta1: Any


BETA1_STATES = (ResidualVarianceState, SpatialVarianceState, SNRState)


def beta1_bounds(b1_base: Any, adapt_strength: Any, b1_min: Any = None):
  """``(lower, upper)``: ``(max(0.5, b1_base·(1-adapt_strength)), b1_base)``, or ``b1_min``."""
  hi = jnp.asarray(b1_base, _F32)
  if b1_min is None:
    lo = jnp.maximum(jnp.asarray(0.5, _F32), hi * (1.0 - jnp.asarray(adapt_strength, _F32)))
  else:
    lo = jnp.asarray(b1_min, _F32)
  return lo, hi


def _n_leaves(params) -> int:
  return len(jax.tree.leaves(params))


def _vector(params, value):
  """One float32 entry per leaf of ``params`` (flatten order)."""
  return jnp.full([_n_leaves(params)], value, _F32)


def _f32(x):
  return jnp.asarray(x).astype(_F32)


def _leaves(grads, mu):
  """The ``(g, bound)`` pairs of a ``raw_grads`` rule's gradient tree in the leaf order of
  ``mu`` (the decoded first moments). A ``None`` in the trees is no leaf, as in the
  ``jax.tree.leaves(params)`` that sized the rule's per-leaf vectors (until 2026-12-07 it was
  counted here: a params tree with a ``None`` in it, as ``eqx.filter`` makes, shifted every
  later leaf's entry, silently, STAMLite's step of ``{"a": None, "w": w}`` 1e5 where Adam's is
  1e-3, or failed with mismatched shapes)."""
  return jax.tree.structure(mu).flatten_up_to(grads)


def _m_leaves(mu):
  return jax.tree.leaves(mu)


def _live(pairs) -> np.ndarray:
  """Which leaves have statistics (a gradient with at least one entry): a static mask."""
  return np.array([p is not None and p[0].size > 0 for p in pairs], bool)


def _leaf_stats(pairs, stat, *extra):
  """``(live, a, b, probe)``: each live leaf's two statistics ``stat(pair, *(x[i] for x in
  extra))[:2]`` stacked into two vectors (0 for a leaf without statistics), the sum of their
  finiteness probes (the third result: 0 when every live gradient is finite, else NaN), and
  the static live mask. ``stat`` returns sums (:class:`stax.numerics.total`); they are divided
  by each leaf's size here, in the vectors (:func:`_means`), so that no leaf's kernels hold its
  size as a constant: a division by a leaf's size, with the saturation after it, was a scalar
  kernel per leaf shape (ResNet-18, STAM: 26 of 141 kernels). An
  ``extra`` is a list (one array per leaf) or a vector (an entry per leaf). Small live leaves of
  one shape are reduced together, vmapped over their stack
  (:func:`stax._leafwise.reduce_leaves`)."""
  live = _live(pairs)
  kinds = tuple("v" if isinstance(x, jax.Array) else "l" for x in extra)
  lists = [x for x in extra if not isinstance(x, jax.Array)]
  vectors = tuple(x for x in extra if isinstance(x, jax.Array))
  # the bound is an operand (a constant once inlined): leaves of every moment dtype share a trace
  operands = [(p[0], jnp.asarray(p[1], _F32), *(x[i] for x in lists)) if ok else None
              for i, (p, ok) in enumerate(zip(pairs, live))]
  fn = _leafwise.traced_once(_stat_fn, stat, kinds)
  a, b, probe = _leafwise.reduce_leaves(fn, operands, vectors, stacked=True, width=3,
                                        totals=(2,))
  return live, a, b, probe


def _means(pairs, *sums):
  """The vectors of per-leaf sums ``sums`` divided by each leaf's size (1 for a leaf without
  statistics, whose sums are 0): the means :func:`stax.numerics.tiled_means` gives, formed for
  every leaf at once (the sums are associated as there: equal to rounding)."""
  sizes = _leafwise.sizes([None if p is None else p[0] for p in pairs])
  return tuple(x / sizes for x in sums)


def _bounds(pairs):
  """Each leaf's saturation bound ``B`` as a float32 vector (1 for a leaf without one)."""
  if not pairs:
    return jnp.zeros([0], _F32)
  return jnp.stack([jnp.asarray(p[1] if p is not None else 1.0, _F32) for p in pairs])


_probe = PROBE   # the gradient's finiteness probe, one more output of each rule's pass


def _stat_fn(stat, kinds):
  """``stat((g, bound), *extra)`` as a function of ``(g, bound, *lists, *vector entries)``,
  the extras put back in their order (``kinds``: ``"l"`` or ``"v"`` for each)."""
  n_lists = kinds.count("l")

  def fn(g, bound, *args):
    lists, vectors = iter(args[:n_lists]), iter(args[n_lists:])
    return tuple(stat((g, bound), *(next(lists) if k == "l" else next(vectors)
                                    for k in kinds)))
  return fn


def _ema(live, decay, old, new):
  """``decay·old + (1-decay)·new`` on the live leaves' entries, ``old`` on the others."""
  return jnp.where(live, decay * old + (1.0 - decay) * new, old)


def residual_variance_beta1(
    b1_base: Any = 0.9,
    adapt_strength: Any = 0.2,
    b2: Any = 0.999,
    tau_decay: Any = 0.99,
    fallback_threshold: Any = 100.0,
    b1_min: Any = None,
) -> Beta1Rule:
  """STAM's adaptive beta1 (faithful to ``stam-optimizer`` 0.1.0's code; see module docstring).

  Args:
    b1_base: the upper bound and fallback value, in (0, 1) (default 0.9).
    adapt_strength: α in [0, 0.5] (default 0.2).
    b2: decay of the σ² EMA (STAM shares Adam's b2), in (0, 1) (default 0.999).
    tau_decay: decay of the τ EMA, in [0, 1) (default 0.99).
    fallback_threshold: σ² >= threshold·(τ²+1e-8) falls back to ``b1_base`` (default 100).
    b1_min: lower bound (default ``None``: ``max(0.5, b1_base·(1-adapt_strength))``).

  Returns:
    A :class:`~stax.transforms.adam.Beta1Rule` with state :class:`ResidualVarianceState`.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> tx = stax.scale_by_adam(b1=stax.residual_variance_beta1(), bias_correction="product")
    >>> _, state = tx.update({"w": jnp.ones((4, 3))}, tx.init(params), params)
    >>> round(float(stax.stam_beta1(state, params)["w"]), 3)
    0.736
  """

  def init(params):
    return ResidualVarianceState(_vector(params, 0.0), _vector(params, 0.0),
                                 _vector(params, b1_base))

  def stats(gb, m):
    g, _ = gb
    resid = lambda g, m: _f32(g) - _f32(m)
    return num.tiled_means(
        num.independent(g, m), num.total(lambda g, m: jnp.square(resid(g, m))),
        num.total(lambda g, m: jnp.abs(resid(g, m))), _probe)

  def update(grads, mu, state, count):
    del count
    pairs = _leaves(grads, mu)
    live, ms, ma, probes = _leaf_stats(pairs, stats, _m_leaves(mu))
    ms, ma = _saturated(*_means(pairs, ms, ma), _bounds(pairs))
    base = _f32(b1_base)
    # the seed's mean() of an empty leaf is NaN forever; stax keeps such a leaf inert
    sigma_sq = _ema(live, _f32(b2), state.sigma_sq, ms)
    tau = _ema(live, _f32(tau_decay), state.tau, ma)
    scale = tau ** 2 + 1e-8
    fallback = jnp.logical_or(~jnp.isfinite(sigma_sq),
                              ~(sigma_sq < _f32(fallback_threshold) * scale))
    z = jnp.maximum(sigma_sq / scale, 0.0)
    s_ = z / (1.0 + z)
    lo, hi = beta1_bounds(base, adapt_strength, b1_min)
    b1 = jnp.clip(base * (1.0 - _f32(adapt_strength) * s_), lo, hi)
    b1 = jnp.where(fallback | ~live, base, b1)
    return b1, ResidualVarianceState(sigma_sq, tau, b1), probes

  return Beta1Rule(init, update, raw_grads=True, stacked=True, probes=True)


def _saturated(mean_sq, mean_abs=None, bound=None):
  """The statistics of the raw gradient as the saturated gradient bounds them: a mean of
  squares at ``R = 2**126`` (:func:`stax.numerics.statistic_bound`) and a mean of absolute
  values at the gradient's bound ``B``. Below the bounds (every ``|g| <= B``) both are the
  saturated gradient's own statistics bit for bit; beyond, they stay finite (an overflowing
  sum of squares is +Inf and becomes ``R``)."""
  ms = jnp.minimum(mean_sq, num.statistic_bound(_F32))
  if mean_abs is None:
    return ms, None
  return ms, jnp.minimum(mean_abs, jnp.asarray(bound, _F32))


def _lazy(count, interval, candidate, previous):
  return jnp.where(jnp.asarray(count) % jnp.asarray(interval) == 0, candidate, previous)


def spatial_variance_beta1(
    b1_base: Any = 0.9,
    adapt_strength: Any = 0.2,
    moment_decay: Any = 0.99,
    interval: Any = 5,
    eps: Any = 1e-8,
    b1_min: Any = None,
) -> Beta1Rule:
  """STAMLite's lazy spatial-variance beta1 (faithful to ``stam-optimizer`` 0.1.0).

  Args:
    b1_base: upper bound and fallback, in (0, 1) (default 0.9).
    adapt_strength: α in [0, 0.5] (default 0.2).
    moment_decay: ρ of the ``mean(g)`` / ``mean(g**2)`` EMAs, in (0, 1) (default 0.99).
    interval: beta1 is recomputed on steps ``0, k, 2k, ...``, k >= 1 (default 5).
    eps: added to the bias correction and to the normaliser (default 1e-8).
    b1_min: lower bound (default ``None``: ``max(0.5, b1_base·(1-adapt_strength))``).

  Returns:
    A :class:`~stax.transforms.adam.Beta1Rule` with state :class:`SpatialVarianceState`.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> params = {"w": jnp.zeros(4)}
    >>> tx = stax.scale_by_adam(b1=stax.spatial_variance_beta1(), bias_correction="product")
    >>> _, state = tx.update({"w": jnp.array([1.0, -1.0, 1.0, -1.0])}, tx.init(params), params)
    >>> round(float(stax.stam_beta1(state, params)["w"]), 3)   # mean(g) = 0: 0.9·(1 - 0.2/2)
    0.81
  """

  def init(params):
    return SpatialVarianceState(_vector(params, 0.0), _vector(params, 0.0),
                                _vector(params, b1_base))

  def stats(gb):
    g, _ = gb
    # sum(g·c)/n/c: mean(g), never overflowing (c = num.mean_scale(n), a power of two)
    c = jnp.asarray(num.mean_scale(g.size), _F32)
    return num.tiled_means(num.independent(g, c), num.total(lambda g, c: _f32(g) * c),
                           num.total(lambda g, c: jnp.square(_f32(g))), _probe)

  def update(grads, mu, state, count):
    pairs = _leaves(grads, mu)
    scales = np.array([num.mean_scale(p[0].size) if p is not None and p[0].size else 1.0
                       for p in pairs], np.float32)
    live, g_mean, g_sq, probes = _leaf_stats(pairs, stats)
    g_mean, g_sq = _means(pairs, g_mean, g_sq)
    bounds = _bounds(pairs)
    g_mean = jnp.clip(g_mean / scales, -bounds, bounds)
    g_sq = _saturated(g_sq)[0]
    base = _f32(b1_base)
    rho = _f32(moment_decay)
    e = _f32(eps)
    a = _ema(live, rho, state.grad_mean, g_mean)
    q = _ema(live, rho, state.grad_sq_mean, g_sq)
    c = 1.0 - _eager.power(rho, count + 1)
    a_hat = a / (c + e)
    q_hat = q / (c + e)
    var = jnp.maximum(q_hat - a_hat ** 2, 0.0)
    z = var / (q_hat + e)
    s = z / (1.0 + z)
    lo, hi = beta1_bounds(base, adapt_strength, b1_min)
    cand = jnp.clip(base * (1.0 - _f32(adapt_strength) * s), lo, hi)
    cand = jnp.where(jnp.isfinite(cand), cand, base)
    b1 = jnp.where(live, _lazy(count, interval, cand, state.beta1), state.beta1)
    return b1, SpatialVarianceState(a, q, b1), g_sq, probes

  return Beta1Rule(init, update, raw_grads=True, sq_means=True, stacked=True, probes=True)


def snr_beta1(
    b1_max: Any = 0.9,
    b1_min: Any = 0.72,
    decay: Any = 0.99,
    interval: Any = 1,
) -> Beta1Rule:
  """Scale-invariant beta1 from the residual's signal-to-noise ratio (see module docstring).

  Args:
    b1_max: upper bound, reached for a constant gradient, in [0, 1) (default 0.9).
    b1_min: lower bound, reached for pure noise, in [0, b1_max] (default 0.72, STAM's
      ``max(0.5, 0.9·(1-0.2))``).
    decay: ρ of the G and R EMAs, in [0, 1) (default 0.99).
    interval: beta1 is recomputed on steps ``0, k, 2k, ...`` (the statistics every step),
      k >= 1 (default 1).

  Returns:
    A :class:`~stax.transforms.adam.Beta1Rule` with state :class:`SNRState`.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> tx = stax.scale_by_adam(b1=stax.snr_beta1(), bias_correction="product")
    >>> _, state = tx.update({"w": jnp.ones((4, 3))}, tx.init(params), params)
    >>> round(float(stax.stam_beta1(state, params)["w"]), 3)   # first step: R = G, so b1_min
    0.72
  """

  def init(params):
    return SNRState(_vector(params, 0.0), _vector(params, 0.0), _vector(params, 1.0),
                    _vector(params, b1_max))

  def stats(gb, m, c_safe, live):
    g, _ = gb
    # m_hat = m / c, 0 while c = 0 (then m = 0): a scalar factor, not a select, so the
    # reduction stays in XLA's vectorised kernel (m is finite, so m/1·0 is 0).
    return num.tiled_means(
        num.independent(g, m, c_safe, live), num.total(lambda g, m, c, w: jnp.square(_f32(g))),
        num.total(lambda g, m, c, w: jnp.square(_f32(g) - _f32(m) / c * w)), _probe)

  def update(grads, mu, state, count):
    c = 1.0 - state.b1_prod
    c_safe, started = jnp.where(c > 0, c, 1.0), (c > 0).astype(_F32)
    pairs = _leaves(grads, mu)
    live, g_sq, r_sq, probes = _leaf_stats(pairs, stats, _m_leaves(mu), c_safe, started)
    g_sq, r_sq = (_saturated(x)[0] for x in _means(pairs, g_sq, r_sq))
    hi = _f32(b1_max)
    lo = _f32(b1_min)
    rho = _f32(decay)
    big_g = _ema(live, rho, state.grad_sq, g_sq)
    big_r = _ema(live, rho, state.resid_sq, r_sq)
    ok = big_g > 0
    w = jnp.clip(1.0 - big_r / jnp.where(ok, big_g, 1.0), 0.0, 1.0)
    w = jnp.where(ok & jnp.isfinite(w), w, 1.0)
    b1 = jnp.where(live, _lazy(count, interval, lo + (hi - lo) * w, state.beta1), state.beta1)
    prod = jnp.where(live, state.b1_prod * b1, state.b1_prod)
    return b1, SNRState(big_g, big_r, prod, b1), g_sq, probes

  return Beta1Rule(init, update, raw_grads=True, sq_means=True, stacked=True, probes=True)


def find_beta1(state: Any, params: Any = None) -> Any:
  """The per-leaf beta1 kept by an adaptive-beta1 rule somewhere inside ``state``.

  Works on any optimizer state (``optax.chain``, :func:`stax.nonfinite_guard`,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, ``nnx.Optimizer``'s ``opt_state``, ...)
  and under ``jit`` (it only indexes).

  Args:
    state: an optimizer state.
    params: ``None`` (default), or a tree laid out like the parameters the state was built
      for (the parameters themselves, or their shapes): the result is then a tree of 0-d
      float32 arrays in that layout instead of the float32 vector (one entry per leaf in
      flatten order) that the rule keeps.

  Raises:
    ValueError: if ``state`` holds no adaptive-beta1 state, or ``params`` has another number
      of leaves than the rule's vector. With several (e.g. an ``optax.partition``), returns a
      tuple of them in flatten order.
  """
  state = unwrap_variables(state)   # nnx.Optimizer's opt_state: its OptArrays' values
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, BETA1_STATES))
           if isinstance(x, BETA1_STATES)]
  if not found:
    raise ValueError("`state` holds no adaptive-beta1 state (is it a stax.stam/stam_lite state?)")

  def view(b1):
    if params is None:
      return b1
    leaves, treedef = jax.tree.flatten(params)
    if len(leaves) != b1.shape[0]:
      raise ValueError(f"`params` has {len(leaves)} leaves but the adaptive-beta1 state keeps "
                       f"{b1.shape[0]} (pass the parameters this part of the state was built for)")
    return jax.tree.unflatten(treedef, list(b1))

  if len(found) == 1:
    return view(found[0].beta1)
  return tuple(view(f.beta1) for f in found)
