r"""STAM and STAMLite — "Stable Training with Adaptive Momentum" (seed: ``stam-optimizer`` 0.1.0).

Both are the shared Adam core (:func:`stax.scale_by_adam`) with a per-tensor, per-step
:math:`\beta_1` (a :class:`~stax.transforms.adam.Beta1Rule` from
:mod:`stax.transforms.adaptive_beta`), the variable-:math:`\beta_1` bias correction
:math:`\hat m = m/(1-\prod_i\beta_{1,i}+\epsilon)` (``bias_correction="product"``,
``correction_eps=eps``), decoupled weight decay and the learning rate:

.. math::
  m \leftarrow \beta_{1,t} m + (1-\beta_{1,t}) g,\quad
  v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
  p \leftarrow p - \eta\Big(\frac{m/(1-\prod\beta_1+\epsilon)}
      {\sqrt{v/(1-\beta_2^t+\epsilon)}+\epsilon} + \lambda p\Big)

* **STAM** keeps Adam's per-element :math:`v`; :math:`\beta_{1,t}` comes from the residual
  :math:`r = g - m_{t-1}`.
* **STAMLite** keeps one :math:`v` *per tensor*: :math:`v` is the EMA (decay ``moment_decay``)
  of ``mean(g**2)`` (:mod:`stax.codecs.tensor_rms`), so the update is momentum normalised by
  the tensor's gradient RMS (like normalised SGD/LARS, not Adam's per-coordinate scaling), and
  :math:`\beta_{1,t}` comes from the tensor's *spatial* mean/variance, refreshed every
  ``beta1_update_interval`` steps. Its state is the first moment plus a few scalars per tensor:
  about half of AdamW's.

``beta1_signal`` chooses how :math:`\beta_1` adapts:

* ``"seed"`` (default, faithful): the seed's code, reproduced to float32 rounding (a parity test
  runs the installed ``stam-optimizer`` package for 200+ steps). Where the seed's README and
  code disagree stax follows the **code**: on a "variance explosion"
  (:math:`\sigma^2 \ge \text{fallback\_threshold}\cdot(\tau^2+10^{-8})`) or a non-finite
  :math:`\sigma^2`, :math:`\beta_1` is set to ``b1_base`` (the largest momentum; the README says
  the variance is capped); :math:`z` uses a hard-coded :math:`10^{-8}`, not ``eps``; ``eps`` is
  also added to both bias corrections. What this rule does in practice: STAM's :math:`\beta_1`
  settles near 0.79 whatever the signal-to-noise (:math:`z\to E[r^2]/E|r|^2\ge1`) and depends on
  the gradient's absolute scale; STAMLite's sits near 0.81 for zero-mean tensors.
* ``"snr"`` (improved): :math:`\beta_1 = \beta_{lo} + (\beta_{hi}-\beta_{lo})\,\mathrm{clip}(1 -
  R/G, 0, 1)` with EMAs :math:`G` of ``mean(g**2)`` and :math:`R` of ``mean((g - m_hat)**2)``
  (:func:`stax.transforms.adaptive_beta.snr_beta1`): a function of the residual's
  signal-to-noise ratio only, invariant to the gradient's scale, :math:`\to\beta_{hi}` =
  ``b1_base`` for a consistent gradient and :math:`\to\beta_{lo}` for pure noise. The EMAs use
  ``tau_decay`` (STAM) or ``moment_decay`` (STAMLite); ``fallback_threshold`` is unused.

Bounds: :math:`\beta_1 \in [\beta_{lo}, \beta_{hi}] = [\max(0.5, b1\_base(1-adapt\_strength)),
b1\_base]` (``b1_min`` overrides the lower one).

Non-finite gradients: the seed silently replaces NaN/±Inf gradient entries by 0 (moments still
decay, weight decay still applies). stax's default ``nonfinite="skip"`` skips such a step
entirely (:func:`stax.nonfinite_guard`); ``nonfinite="zero"`` reproduces the seed (used by the
parity test; the guard's ``"zero"`` policy, :func:`stax.zero_nonfinite`); ``"error"`` and
``"ignore"`` as in :func:`stax.nonfinite_guard`.

Other differences from the seed: updates follow optax's sign convention (the seed's
``STAM.update`` returns descent steps; only its optax wrapper negates); learning rates may be
schedules; ``mask`` restricts weight decay (the seed decays every leaf, the default here too);
the adaptive-:math:`\beta_1` statistics are float32 whatever the parameter dtype, one vector per
statistic with an entry per tensor (the seed keeps STAM's as scalars in the parameter dtype); empty leaves are inert (the seed's ``mean`` of an
empty array is NaN forever). Stacked layers (a leaf ``(L, in, out)`` from ``nnx.vmap``/
``nn.scan``, any leaf with batch axes under ``dimension_numbers``): STAMLite keeps one ``v`` per
layer, as the same model unstacked does (until 2026-12-07 one per leaf: with one layer's
gradients 100× the others', the other layers stepped ~70× less stacked than unstacked); the β1
statistics of both rules stay one per leaf, so a stacked leaf's layers share one β1 (with
layer gradient scales 1/10/100, STAMLite's steps differ from the unstacked model's by 5e-4
relative over four steps, the ``"snr"`` rule's by 1e-7). The seeds are torch code, where
layers are never stacked. STAM's moments default to the parameter dtype as in the seed; with
bfloat16 parameters pass ``nu_dtype=jnp.float32`` (bf16 cannot hold ``v``'s 0.1% increments).
Parameters must be real floating-point: complex, integer and bool leaves raise ``TypeError``
at ``init``, naming the leaf (the per-tensor statistics are not defined for complex values).

Reference: ``stam-optimizer`` 0.1.0 (A. Sabry, https://github.com/assemsabry/stam).

Example:
  >>> import jax, jax.numpy as jnp, stax
  >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  >>> tx = stax.stam(1e-3, beta1_signal="snr")
  >>> state = tx.init(params)
  >>> updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
  >>> stax.stam_beta1(state, params)["w"].shape
  ()
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stax import _validation as V
from stax import layout
from stax.codecs.tensor_rms import tensor_rms_storage
from stax.codecs.turbo import state_codec_storage
from stax.transforms import adaptive_beta as AB
from stax.transforms.adam import scale_by_adam
from stax.transforms.guards import (NONFINITE_POLICIES, deferred_gate, gate_aware, gate_state,
                                   gated_chain, is_gate_aware, nonfinite_guard, zero_nonfinite)

__all__ = ["stam", "stam_lite", "stam_beta1", "zero_nonfinite", "BETA1_SIGNALS",
           "STAM_NONFINITE_POLICIES"]

BETA1_SIGNALS = ("seed", "snr")
STAM_NONFINITE_POLICIES = NONFINITE_POLICIES  # "zero" included (the seed's behaviour)


def _check_common(learning_rate, b1_base, eps, weight_decay, adapt_strength, b1_min,
                  beta1_signal, nonfinite):
  V.check_number("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  V.check_decay("b1_base", b1_base, low_inclusive=False)
  V.check_number("eps", eps, low=0.0)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_number("adapt_strength", adapt_strength, low=0.0, high=0.5)
  V.check_decay("b1_min", b1_min, allow_none=True)
  if V.is_concrete_number(b1_min) and V.is_concrete_number(b1_base) and (
      float(b1_min) > float(b1_base)):
    raise ValueError(f"`b1_min` must be <= `b1_base` ({b1_base!r}), got {b1_min!r}.")
  V.check_choice("beta1_signal", beta1_signal, BETA1_SIGNALS)
  V.check_choice("nonfinite", nonfinite, STAM_NONFINITE_POLICIES)


def _f32_hyper(value):
  """A concrete decay as a float32 scalar, so ``1 - b2`` is formed in float32 as the seed does.

  (A Python float would be subtracted in float64 and then rounded: ``1 - 0.999`` then differs
  from the seed's ``1 - float32(0.999)`` by 1.3e-5 relative.) Traced values pass through.
  """
  return np.float32(value) if V.is_concrete_number(value) else value


def _keep_grad_dtype(inner) -> optax.GradientTransformationExtraArgs:
  """``inner`` with its updates cast back to the incoming gradients' dtypes, promoted with the
  parameters' when ``params`` are given.

  The seed returns updates in the gradient's dtype even when its state is wider (STAMLite's
  float32 ``state_dtype`` with bfloat16 gradients); the Adam core returns the wider dtype.
  stax does the same for parameters of the gradient's dtype, but float32 parameters with
  bfloat16 gradients (a mixed-precision backward) get float32 updates, as ``optax.adamw``'s:
  the seed's bfloat16 update rounds every step to 8 bits (until 2026-12-07 stax's did too).
  """
  aware = is_gate_aware(inner)
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    out, state = inner.update(updates, state, params, **extra_args)
    leaves, treedef = jax.tree.flatten(updates)
    ps = treedef.flatten_up_to(params) if params is not None else [None] * len(leaves)
    dtypes = [g.dtype if p is None or not hasattr(p, "dtype") else
              jnp.promote_types(g.dtype, p.dtype) for g, p in zip(leaves, ps)]
    us = treedef.flatten_up_to(out)
    return jax.tree.unflatten(treedef, [u.astype(d) for u, d in zip(us, dtypes)]), state

  tx = optax.GradientTransformationExtraArgs(inner.init, update_fn)
  return gate_aware(tx) if aware else tx


def _finish(core, weight_decay, mask, learning_rate, nonfinite, name):
  # Gate-aware (no lax.cond and no state select: on a skipped step the core keeps its moments
  # and its rule's statistics itself), so XLA updates the donated state in place; and the gate
  # is deferred: the β1 rule's pass over the raw gradients also forms the guard's finiteness
  # probes (stax.transforms.guards.DeferredGate), one read of every gradient fewer.
  tx = deferred_gate(gated_chain(
      gate_state(_keep_grad_dtype(core)),
      gate_state(optax.add_decayed_weights(weight_decay, mask)),
      gate_state(optax.scale_by_learning_rate(learning_rate))))
  return V.with_param_checks(nonfinite_guard(tx, nonfinite), optimizer=name)


def stam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1_base: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    adapt_strength: float = 0.2,
    tau_decay: float = 0.99,
    fallback_threshold: float = 100.0,
    *,
    beta1_signal: str = "seed",
    b1_min: Optional[float] = None,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    codec: Optional[str] = None,
    min_compress_elements: int = 4096,
    nonfinite: str = "skip",
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""STAM: Adam with a per-tensor adaptive :math:`\beta_1` (see the module docstring).

  Faithful rule (``beta1_signal="seed"``), per tensor, with :math:`r = g - m_{t-1}`:

  .. math::
    \sigma^2 \leftarrow \beta_2\sigma^2 + (1-\beta_2)\,\mathrm{mean}(r^2),\quad
    \tau \leftarrow \rho_\tau\tau + (1-\rho_\tau)\,\mathrm{mean}|r|,\quad
    z = \frac{\sigma^2}{\tau^2+10^{-8}},\quad
    \beta_1 = \mathrm{clip}\Big(\beta_{base}\big(1-\alpha\frac{z}{1+z}\big),
      \beta_{lo}, \beta_{base}\Big)

  and :math:`\beta_1 = \beta_{base}` if :math:`\sigma^2` is non-finite or
  :math:`\sigma^2 \ge \text{fallback\_threshold}\,(\tau^2+10^{-8})`.

  Args:
    learning_rate: η >= 0 or a schedule (default 1e-3).
    b1_base: base (and maximum) first-moment decay, in (0, 1) (default 0.9).
    b2: second-moment decay, also the decay of σ², in (0, 1) (default 0.999).
    eps: denominator term, also added to both bias corrections, >= 0 (default 1e-8).
    weight_decay: decoupled decay λ >= 0, multiplied by η (default 0.01, the seed's).
    adapt_strength: α in [0, 0.5]: how far β1 may drop below ``b1_base`` (default 0.2).
    tau_decay: decay of τ (``"seed"``) or of the SNR statistics (``"snr"``), in [0, 1)
      (default 0.99).
    fallback_threshold: variance-explosion threshold > 0 (default 100; ``"seed"`` only).
    beta1_signal: ``"seed"`` (default, faithful) or ``"snr"`` (scale-invariant, improved).
    b1_min: lower bound of β1 in [0, b1_base] (default ``None``:
      ``max(0.5, b1_base·(1-adapt_strength))``, the seed's).
    mask: pytree or callable selecting the leaves that decay (default ``None``: all, as the seed).
    mu_dtype, nu_dtype: moment dtypes (default ``None``: the parameter's, as the seed; v of a
      float16 parameter in float32, :func:`stax.scale_by_adam`).
    codec: ``None`` (default) or ``"stax"`` / ``"factored"``: the moments of every leaf with at
      least ``min_compress_elements`` elements stored as :func:`stax.turbo_adam` stores them
      (≈ 8.75 / ≈ 4.5 bits/param; :func:`stax.codecs.state_codec_storage`); the β1 rule then
      reads the decoded m. Exclusive with ``mu_dtype``/``nu_dtype``.
    min_compress_elements: smallest leaf the codec compresses, >= 0 (default 4096).
    nonfinite: ``"skip"`` (default), ``"error"``, ``"ignore"`` or ``"zero"`` (the seed's
      zeroing of NaN/Inf gradient entries).
    dimension_numbers: the matrices the ``"factored"`` codec's v is factored over, any form
      :mod:`stax.layout` takes (default ``None``: :func:`stax.layout.default_dimension_numbers`,
      Flax layouts; stacked ``(L, in, out)`` layers are ``L`` matrices); only with
      ``codec="factored"``. The torch bridge passes the torch layout.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; read the current per-tensor β1 with
    :func:`stam_beta1`.

  References:
    ``stam-optimizer`` 0.1.0, ``core/stam.py`` (https://github.com/assemsabry/stam).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> tx = stax.stam(1e-3, weight_decay=0.0)
    >>> state = tx.init({"w": jnp.ones((4, 3))})
  """
  mask = V.check_mask("mask", mask)
  _check_common(learning_rate, b1_base, eps, weight_decay, adapt_strength, b1_min,
                beta1_signal, nonfinite)
  V.check_decay("b2", b2, low_inclusive=False)
  V.check_decay("tau_decay", tau_decay)
  V.check_number("fallback_threshold", fallback_threshold, low=0.0, low_inclusive=False)
  V.check_dtype("mu_dtype", mu_dtype)
  V.check_dtype("nu_dtype", nu_dtype)
  if beta1_signal == "snr":
    V.warn_no_effect("fallback_threshold", fallback_threshold, 100.0,
                     "with beta1_signal='snr' (only the 'seed' rule has a fallback)")
  if beta1_signal == "seed":
    rule = AB.residual_variance_beta1(b1_base, adapt_strength, b2, tau_decay,
                                      fallback_threshold, b1_min)
  else:
    lo, _ = AB.beta1_bounds(b1_base, adapt_strength, b1_min)
    rule = AB.snr_beta1(b1_max=b1_base, b1_min=lo, decay=tau_decay, interval=1)
  storage = state_codec_storage(codec, min_compress_elements=min_compress_elements,
                                mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                                dimension_numbers=dimension_numbers)
  core = scale_by_adam(rule, _f32_hyper(b2), eps, bias_correction="product", correction_eps=eps,
                       mu_dtype=mu_dtype, nu_dtype=nu_dtype, storage=storage)
  return _finish(core, weight_decay, mask, learning_rate, nonfinite, "stax.stam")


def stam_lite(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1_base: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    adapt_strength: float = 0.2,
    moment_decay: float = 0.99,
    beta1_update_interval: int = 5,
    state_dtype: Any = None,
    *,
    beta1_signal: str = "seed",
    b1_min: Optional[float] = None,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    nonfinite: str = "skip",
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""STAMLite: momentum normalised by one gradient RMS per tensor, lazy adaptive :math:`\beta_1`.

  Per tensor, with :math:`\rho` = ``moment_decay`` and :math:`c_t = 1-\rho^t`:

  .. math::
    a \leftarrow \rho a + (1-\rho)\,\mathrm{mean}(g),\quad
    q \leftarrow \rho q + (1-\rho)\,\mathrm{mean}(g^2),\quad
    z = \frac{\max(\hat q-\hat a^2, 0)}{\hat q+\epsilon},\ \hat x = \frac{x}{c_t+\epsilon},\quad
    \beta_1 = \mathrm{clip}\Big(\beta_{base}\big(1-\alpha\frac{z}{1+z}\big),
      \beta_{lo}, \beta_{base}\Big)\ \text{on steps } 0, k, 2k, \dots

  (a non-finite candidate gives ``b1_base``), then
  :math:`p \leftarrow p - \eta\big(\hat m/(\sqrt{q/(c_t+\epsilon)}+\epsilon) + \lambda p\big)`.
  The per-tensor :math:`q` is the Adam core's second moment stored by
  :class:`stax.codecs.tensor_rms.TensorMean`.

  Args:
    learning_rate: η >= 0 or a schedule (default 1e-3).
    b1_base: base (and maximum) first-moment decay, in (0, 1) (default 0.9).
    eps: denominator / bias-correction term >= 0 (default 1e-8).
    weight_decay: decoupled decay λ >= 0, multiplied by η (default 0.01).
    adapt_strength: α in [0, 0.5] (default 0.2).
    moment_decay: ρ in (0, 1) of the per-tensor gradient moments (default 0.99).
    beta1_update_interval: k >= 1, β1 is recomputed every k steps (default 5).
    state_dtype: dtype of the first moment (default ``None``: float32, the seed's default); the
      per-tensor statistics are always float32.
    beta1_signal: ``"seed"`` (default, faithful: spatial variance) or ``"snr"`` (the
      scale-invariant temporal SNR rule, statistics every step, β1 refreshed every k steps).
    b1_min: lower bound of β1 in [0, b1_base] (default ``None``:
      ``max(0.5, b1_base·(1-adapt_strength))``).
    mask: pytree or callable selecting the leaves that decay (default ``None``: all).
    nonfinite: ``"skip"`` (default), ``"error"``, ``"ignore"`` or ``"zero"`` (the seed's).
    dimension_numbers: the leaves' layout, any form :mod:`stax.layout` takes (default ``None``:
      :func:`stax.layout.default_dimension_numbers`): a leaf with batch axes there (stacked
      ``(L, in, out)`` layers, ``nnx.scan``/``nnx.vmap``'d modules) keeps one :math:`q` per
      layer, as the same layers unstacked do; the seed has one per tensor, which for a stacked
      leaf divides every layer by the RMS of all of them (with one layer's gradients 100×
      the others', they had stepped ~70× less than unstacked). Biases and norm scales have no
      layout: a stacked ``(L, d)`` one keeps one :math:`q`. The β1 statistics stay per leaf.
      The torch bridge passes the torch layout (no batch axes: one per tensor, as the seed).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    ``stam-optimizer`` 0.1.0, ``core/stam_lite.py`` (https://github.com/assemsabry/stam).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> tx = stax.stam_lite(1e-3)
    >>> state = tx.init({"w": jnp.ones((4, 3))})
  """
  mask = V.check_mask("mask", mask)
  _check_common(learning_rate, b1_base, eps, weight_decay, adapt_strength, b1_min,
                beta1_signal, nonfinite)
  V.check_decay("moment_decay", moment_decay, low_inclusive=False)
  V.check_int("beta1_update_interval", beta1_update_interval, low=1)
  V.check_dtype("state_dtype", state_dtype)
  dt = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  if beta1_signal == "seed":
    rule = AB.spatial_variance_beta1(b1_base, adapt_strength, moment_decay,
                                     beta1_update_interval, eps, b1_min)
  else:
    lo, _ = AB.beta1_bounds(b1_base, adapt_strength, b1_min)
    rule = AB.snr_beta1(b1_max=b1_base, b1_min=lo, decay=moment_decay,
                        interval=beta1_update_interval)
  layout.check_dimension_numbers(dimension_numbers)
  storage = tensor_rms_storage(dt, stacked=True, dimension_numbers=dimension_numbers)
  core = scale_by_adam(rule, _f32_hyper(moment_decay), eps, bias_correction="product",
                       correction_eps=eps, storage=storage)
  return _finish(core, weight_decay, mask, learning_rate, nonfinite, "stax.stam_lite")


def stam_beta1(state: Any, params: Any = None) -> Any:
  """The current per-tensor β1 of a :func:`stam` / :func:`stam_lite` state (works under ``jit``).

  The β1 used at the last step (before the first step: ``b1_base``), one per parameter leaf:
  as the float32 vector the state keeps (leaves in flatten order), or, given ``params`` (the
  parameters, or any tree laid out like them), as a tree like the parameters with one 0-d
  float32 array per leaf. Accepts the optimizer's state as is, or wrapped by
  ``optax.inject_hyperparams``, ``optax.MultiSteps``, chains, ...; with several STAM states
  inside (e.g. an ``optax.partition``) returns a tuple.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> params = {"b": jnp.zeros(2), "w": jnp.ones(3)}
    >>> state = stax.stam().init(params)
    >>> stax.stam_beta1(state).shape
    (2,)
    >>> float(stax.stam_beta1(state, params)["w"])  # doctest: +ELLIPSIS
    0.89999...
  """
  return AB.find_beta1(state, params)
