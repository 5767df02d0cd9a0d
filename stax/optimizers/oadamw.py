r"""OAdamW — StableAdamW with Newton–Schulz orthogonalisation for matrices (seed: ``jeb1399/OAdamW``),
and the StableAdamW core alone (:func:`stable_adamw`, ``torch-optimi``'s ``StableAdamW``).

``stax.oadamw(muon="momentum")`` (default) is **real Muon** on the matrix leaves and StableAdamW
on the rest:

.. math::
  \text{matrices: } M_t = \mu M_{t-1} + G_t,\ \ O_t = \mathrm{NS}(G_t + \mu M_t\ \text{(Nesterov)}),\ \
  W \leftarrow W - \eta\,(\mathrm{scale}\cdot 0.2\sqrt{\max(m,n)}\,O_t + \lambda W)

  \text{others: StableAdamW (debiased betas, per-tensor RMS-clipped learning rate).}

The ``0.2·sqrt(max(m, n))`` factor (Moonlight) gives the orthogonalised update an RMS of 0.2,
that of a typical AdamW update once training has settled, so AdamW's learning rate and weight
decay carry over there; early in training AdamW's updates have an RMS near 1 and Muon's steps
are about 5× smaller at the same learning rate (a short run at AdamW's learning rate ends
behind it: a 300-step MLP at lr 1e-3, loss 1.37 against AdamW's 0.73; a BatchNorm CNN at lr
3e-3 passes it after 200 steps, 0.001 against 0.009 at 300). ``scale`` multiplies it (the seed's
``scale`` was dead code).

``muon="gradient"`` is the seed's behaviour: ``NS`` of the raw gradient of each step is fed
into the StableAdamW moments (Adam's element-wise normalisation then removes most of the
orthogonal geometry). ``update_proj_gap=k`` there refreshes the orthogonaliser every ``k``
steps and applies the cached one to the *current* gradient in between (see
:func:`stax.scale_by_orthogonalization`); the seed instead returned a stale orthogonalised
gradient and threw the current one away.

Grouping (``grouping=``): ``"auto"`` (default) sends a leaf to the matrix path when it has
``ndim >= 2``, its path is not excluded (``exclude``: embeddings and output heads by default,
see :func:`stax.is_embedding_path`, :func:`stax.is_output_head_path`) and both sides of its
matrix view (under ``dimension_numbers``) are at least ``min_dim``; ``"seed"`` reproduces the
seed's rule (every ``ndim >= 2`` leaf, embeddings and heads included). Conv kernels, attention
projections and stacked layers go through dimension numbers instead of crashing as in the seed:
by default an attention ``query`` kernel ``(in, heads, dh)`` is the one ``in × heads·dh``
matrix it is (not ``in`` separate ``heads × dh`` matrices), and a leaf named ``bias`` is never a
matrix. :func:`stax.describe` lists which leaf went where, with its matrix view. ``labels=`` overrides
both with a pytree / callable of ``"muon"``/``"adam"``.

Weight decay applies to every leaf by default (the seed's and optimi's behaviour; pass
``weight_decay_mask`` to exempt biases and norms). ``kahan_sum`` (``None``: on for bf16/fp16
leaves) compensates the final update of low-precision parameters (:func:`stax.kahan_summation`).

References:
  The ``OAdamW`` repository (jeb1399/OAdamW); ``torch-optimi`` ``StableAdamW``;
  Jordan et al. 2024 (Muon); Liu et al. 2025, `Muon is Scalable for LLM Training
  <https://arxiv.org/abs/2502.16982>`_.

Example:
  >>> import jax, jax.numpy as jnp, stax
  >>> params = {"embed": {"embedding": jnp.ones((32, 16))},
  ...           "mlp": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)}}
  >>> tx = stax.oadamw(1e-3, weight_decay=1e-2)
  >>> stax.oadamw_labels(params)["mlp"]["kernel"]
  'muon'
  >>> state = tx.init(params)
"""

from __future__ import annotations

import numbers

import inspect
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stax import _validation as V
from stax import numerics as num
from stax import partition
from stax.describe import labels_plan, register_plan
from stax.transforms.guards import (deferred_gate, gate_state, gated_chain, gated_partition,
                                   nonfinite_guard)
from stax.codecs.turbo import state_codec_storage
from stax.transforms.kahan import kahan_summation
from stax.transforms.trace import TRACE_BITS, saturating_trace, stored_trace
from stax.transforms.orthogonalize import (ORTHOGONALIZE_MODES, SHAPE_SCALES, matrix_shape,
                                           ns_coefficients, resolve_tree,
                                           scale_by_orthogonalization)
from stax.transforms.stable import add_decoupled_weight_decay, scale_by_stable_adam

__all__ = ["oadamw", "stable_adamw", "oadamw_labels", "saturating_trace", "MUON_MODES",
           "GROUPINGS"]

MUON, ADAM = "muon", "adam"
MUON_MODES = ("momentum", "gradient", "off")
GROUPINGS = ("auto", "seed")


def _max_lr(learning_rate, decouple_lr, max_lr):
  if not decouple_lr or max_lr is not None:
    return max_lr
  if callable(learning_rate):
    raise ValueError("`max_lr` must be given when `decouple_lr=True` and `learning_rate` is a "
                     "schedule (the maximum scheduled learning rate, > 0).")
  if not isinstance(learning_rate, numbers.Number):
    # an array: optax.inject_hyperparams (and the torch bridge) pass the current learning rate
    # as one, rebuilding the transformation with it each step, so a default max_lr would be
    # the current rate and the decay λ·lr_t/max_lr a constant λ (until 2026-12-07, silently)
    raise ValueError("`max_lr` must be given when `decouple_lr=True` and `learning_rate` is an "
                     "array (optax.inject_hyperparams and torch_bridge.Optimizer pass the "
                     "current, scheduled rate as one): the maximum scheduled learning rate, > 0.")
  return learning_rate


def _check_common(learning_rate, betas, eps, weight_decay, kahan_sum, *, decouple_lr=False,
                  max_lr=None, kahan_dtype=None, mu_dtype=None, nu_dtype=None):
  V.check_number("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  if not isinstance(betas, (tuple, list)) or len(betas) != 2:
    raise TypeError(f"`betas` must be a pair (beta1, beta2), got {betas!r}.")
  V.check_betas(**{"betas[0] (beta1)": betas[0], "betas[1] (beta2)": betas[1]})
  V.check_number("eps", eps, low=0.0)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_bool("kahan_sum", kahan_sum, allow_none=True)
  V.check_bool("decouple_lr", decouple_lr)
  V.check_number("max_lr", max_lr, low=0.0, low_inclusive=False, allow_none=True)
  for name, dt in (("kahan_dtype", kahan_dtype), ("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)):
    V.check_dtype(name, dt)
  if not decouple_lr:
    V.warn_no_effect("max_lr", max_lr, None, "without decouple_lr=True", stacklevel=4)
  if kahan_sum is False:
    V.warn_no_effect("kahan_dtype", kahan_dtype, None, "with kahan_sum=False", stacklevel=4)


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    betas: Sequence[float] = (0.9, 0.99),
    eps: float = 1e-6,
    weight_decay: float = 1e-2,
    *,
    decouple_lr: bool = False,
    max_lr: Optional[float] = None,
    kahan_sum: Optional[bool] = None,
    kahan_dtype: Any = None,
    weight_decay_mask: Optional[Any | Callable[[Any], Any]] = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    codec: Optional[str] = None,
    min_compress_elements: int = 4096,
    nonfinite: str = "skip",
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW (``torch-optimi`` 0.3.3 semantics) on the shared Adam core.

  See :mod:`stax.transforms.stable` for the equations. With ``nonfinite="ignore"`` and float32
  parameters it reproduces ``optimi.StableAdamW`` (tested over 200 steps to 1e-6).
  A finite gradient entry beyond ±2**63 (up to float32's maximum) is saturated to ±2**63 in the
  moments, and one whose ``g²`` overflows sets that tensor's RMS-clipped step to 0 (optimi's
  overflow makes the parameters NaN); nothing becomes non-finite and the step is not skipped
  (see :mod:`stax.transforms.stable`).
  Parameters must be real floating-point: complex, integer and bool leaves raise ``TypeError``
  at ``init``, naming the leaf. ``max_lr`` without ``decouple_lr`` and ``kahan_dtype`` with
  ``kahan_sum=False`` have no effect and give a ``UserWarning``.

  Args:
    learning_rate: η >= 0 or a schedule (default 1e-3).
    betas: (β1, β2), each in [0, 1) (default (0.9, 0.99), optimi's).
    eps: >= 0 (default 1e-6).
    weight_decay: λ >= 0, decoupled (multiplied by the clipped learning rate) (default 1e-2).
    decouple_lr: fully decoupled decay ``λ·η_t/max_lr`` (default False).
    max_lr: maximum scheduled learning rate > 0 for ``decouple_lr`` (default: ``learning_rate``
      when it is a number; required with a schedule).
    kahan_sum: ``None`` (default) or ``True``: Kahan-compensated updates for bf16/fp16 leaves;
      ``False``: off.
    kahan_dtype: compensation-buffer dtype (default: the parameter's, as optimi).
    weight_decay_mask: pytree or callable of booleans (default: every leaf decays, as optimi).
    mu_dtype, nu_dtype: moment dtypes (default: the parameter's, as optimi; v of a float16
      parameter in float32, :func:`stax.scale_by_adam`).
    codec: ``None`` (default: ``mu_dtype``/``nu_dtype``), ``"stax"`` (4-bit m + 4-bit log v,
      ≈ 8.75 bits/param) or ``"factored"`` (4-bit m + Adafactor's row/column v on matrices,
      ≈ 4.5 bits/param): the moments of every leaf with at least ``min_compress_elements``
      elements stored as :func:`stax.turbo_adam` stores them
      (:func:`stax.codecs.state_codec_storage`); the RMS clip then reads the decoded v.
      Exclusive with ``mu_dtype``/``nu_dtype``.
    min_compress_elements: smallest leaf the codec compresses, >= 0 (default 4096).
    nonfinite: ``"skip"`` (default), ``"error"`` or ``"ignore"``; see :func:`stax.nonfinite_guard`.
    dimension_numbers: the leaves' layout, any form :mod:`stax.layout` takes (default
      ``None``: :func:`stax.layout.default_dimension_numbers`, Flax layouts; stacked
      ``(L, in, out)`` layers are ``L`` matrices): the matrices the ``"factored"`` codec's v is
      factored over, and the RMS clip's tensors (a stacked leaf is clipped per layer, as the
      same layers unstacked are; optimi clips per tensor). The torch bridge passes the torch
      layout (no batch axes: per tensor, as optimi).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> tx = stax.stable_adamw(1e-3, weight_decay=1e-2)
    >>> state = tx.init({"w": jnp.ones(3)})
    >>> tx = stax.stable_adamw(1e-3, codec="factored")     # ≈ 4.5 bits/param of state
    >>> params = {"w": jnp.ones((256, 512))}
    >>> round(stax.state_bits_per_param(tx.init(params), params, exclude_scalars=True), 2)
    4.69
  """
  weight_decay_mask = V.check_mask("weight_decay_mask", weight_decay_mask)
  _check_common(learning_rate, betas, eps, weight_decay, kahan_sum, decouple_lr=decouple_lr,
                max_lr=max_lr, kahan_dtype=kahan_dtype, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  max_lr = _max_lr(learning_rate, decouple_lr, max_lr)
  storage = state_codec_storage(codec, min_compress_elements=min_compress_elements,
                                mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                                dimension_numbers=dimension_numbers)
  core = scale_by_stable_adam(betas[0], betas[1], eps, weight_decay=weight_decay,
                              mask=weight_decay_mask, decouple_lr=decouple_lr, max_lr=max_lr,
                              mu_dtype=mu_dtype, nu_dtype=nu_dtype, storage=storage,
                              dimension_numbers=dimension_numbers)
  # gated (no lax.cond, which copies the state on CPU): on a skipped step the core selects its
  # moments back (a codec's encodings, which cannot be rewritten unchanged, by a select of the
  # old ones) and holds its count, the schedule's count is held by gate_state and Kahan keeps
  # its compensation; bit-identical state to the cond version.
  # The gate is deferred (stax.transforms.guards.DeferredGate): the core's RMS statistics read
  # every raw gradient before any state is written, and their pass gives the check its probes
  # (no pass of the check's own).
  tx = deferred_gate(gated_chain(
      core,
      gate_state(optax.scale_by_learning_rate(learning_rate)),
      kahan_summation(kahan_dtype, enabled=kahan_sum is not False),
  ))
  return V.with_param_checks(nonfinite_guard(tx, nonfinite, gated=True),
                             optimizer="stax.stable_adamw")


def oadamw_labels(params: Any, *, grouping: str = "auto",
                  exclude: Sequence[Callable[[str], bool]] = (partition.is_embedding_path,
                                                              partition.is_output_head_path),
                  min_dim: int = 4, dimension_numbers: Any = None) -> Any:
  """``"muon"``/``"adam"`` per leaf, as :func:`oadamw` groups them (see the module docstring)."""
  V.check_choice("grouping", grouping, GROUPINGS)
  V.check_int("min_dim", min_dim, low=1)
  if grouping == "seed":
    return partition.matrix_labels(params, exclude=(), min_dim=1, matrix_label=MUON,
                                   other_label=ADAM)
  cand = partition.matrix_labels(params, exclude=tuple(exclude), min_dim=1, matrix_label=MUON,
                                 other_label=ADAM)

  def refine(x, d, lab):
    if lab != MUON or d is None:
      return ADAM
    _, m, n = matrix_shape(np.shape(x), d)
    return MUON if min(m, n) >= min_dim else ADAM

  leaves, treedef = jax.tree.flatten(params)
  labs = treedef.flatten_up_to(cand)
  dims = resolve_tree(dimension_numbers, params)
  return jax.tree.unflatten(treedef, [refine(x, d, l) for x, d, l in zip(leaves, dims, labs)])


def _warn_unused_muon_args(muon, labels, values):
  """``UserWarning`` for each non-default argument the chosen ``muon`` mode does not use."""
  defaults = {k: p.default for k, p in inspect.signature(oadamw).parameters.items()}
  momentum_only = ("muon_momentum", "muon_nesterov", "shape_scale", "rms",
                   "muon_momentum_bits")
  for name, value in values.items():
    if muon == "off":
      why = "with muon='off' (StableAdamW on every leaf)"
    elif muon == "gradient" and name in momentum_only:
      why = "with muon='gradient' (only muon='momentum' uses it)"
    elif (name == "rms" and muon == "momentum"
          and isinstance(values["shape_scale"], str) and values["shape_scale"] != "match_rms"):
      why = f"with shape_scale={values['shape_scale']!r} (only 'match_rms' uses it)"
    elif labels is not None and name in ("grouping", "exclude", "min_dim"):
      why = "when `labels` is given (the labels decide the groups)"
    else:
      continue
    V.warn_no_effect(name, value, defaults[name], why, stacklevel=4)


def oadamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    betas: Sequence[float] = (0.9, 0.99),
    eps: float = 1e-6,
    weight_decay: float = 1e-2,
    *,
    muon: str = "momentum",
    muon_momentum: float = 0.95,
    muon_nesterov: bool = True,
    decouple_lr: bool = False,
    max_lr: Optional[float] = None,
    kahan_sum: Optional[bool] = None,
    kahan_dtype: Any = None,
    ns_steps: int = 5,
    ns_coeffs: Any = "jordan",
    ns_eps: float = 1e-7,
    update_proj_gap: int = 1,
    scale: float = 1.0,
    shape_scale: str = "match_rms",
    rms: float = 0.2,
    grouping: str = "auto",
    labels: Any = None,
    exclude: Sequence[Callable[[str], bool]] = (partition.is_embedding_path,
                                                partition.is_output_head_path),
    min_dim: int = 4,
    dimension_numbers: Any = None,
    mode: str = "stacked",
    implementation: Optional[str] = None,
    weight_decay_mask: Optional[Any | Callable[[Any], Any]] = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    muon_momentum_bits: Optional[int] = None,
    codec: Optional[str] = None,
    min_compress_elements: int = 4096,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
  """OAdamW: Muon (or the seed's NS-then-Adam) on matrices, StableAdamW elsewhere.

  Args:
    learning_rate: η >= 0 or a schedule (default 1e-3), shared by both groups.
    betas: StableAdamW (β1, β2) in [0, 1) (default (0.9, 0.99)).
    eps: StableAdamW eps >= 0 (default 1e-6).
    weight_decay: decoupled λ >= 0 for every group (default 1e-2).
    muon: ``"momentum"`` (default, real Muon), ``"gradient"`` (the seed: NS of the gradient
      into StableAdamW's moments) or ``"off"`` (StableAdamW everywhere).
    muon_momentum: Muon momentum μ in [0, 1) (default 0.95; ``"momentum"`` only).
    muon_nesterov: Nesterov momentum (default True; ``"momentum"`` only).
    decouple_lr: fully decoupled decay ``λ·η_t/max_lr`` in both groups (default False).
    max_lr: maximum scheduled lr > 0 (default: ``learning_rate`` when a number).
    kahan_sum: ``None``/``True``: Kahan-compensated updates for bf16/fp16 leaves; ``False``: off.
    kahan_dtype: compensation-buffer dtype (default: the parameter's).
    ns_steps: Newton–Schulz iterations >= 1 (default 5; static for inject_hyperparams).
    ns_coeffs: preset (``"jordan"`` default, ``"polar_express"``, ``"dion"``, ``"cubic"``) or
      coefficients (:func:`stax.ns_coefficients`).
    ns_eps: Frobenius-norm epsilon >= 0 (default 1e-7, as the seed).
    update_proj_gap: >= 1 (default 1): refresh the orthogonaliser every k steps and apply the
      cached one to the *current* gradient (or momentum) in between; the seed reused a stale
      orthogonalised gradient instead (see :func:`stax.scale_by_orthogonalization`).
    scale: multiplier >= 0 on the orthogonalised update (default 1).
    shape_scale: ``"match_rms"`` (default, Moonlight ``rms·sqrt(max(m, n))``), ``"original"``
      (``sqrt(max(1, fan_out/fan_in))``) or ``"none"``; ``"momentum"`` only.
    rms: target update RMS > 0 for ``"match_rms"`` (default 0.2).
    grouping: ``"auto"`` (default) or ``"seed"`` (every ndim >= 2 leaf).
    labels: optional pytree or callable ``params -> pytree`` of ``"muon"``/``"adam"``, laid
      out like the params or a prefix of them (a label covers its sub-tree); overrides
      ``grouping``; list it in ``static_args`` of inject_hyperparams if callable. Another value,
      label or structure raises ``TypeError``/``ValueError`` naming ``labels`` (at construction,
      or at ``init`` for the structure).
    exclude: path predicates sending a leaf to StableAdamW (default: embeddings, output heads).
    min_dim: smallest matrix side >= 1 for the Muon group under ``"auto"`` (default 4).
    dimension_numbers: the matrix view of each leaf, any form :mod:`stax.layout` accepts: a
      :class:`stax.MatrixDimensionNumbers` (optax's ``MuonDimensionNumbers`` too), a tree of
      them laid out like the params, a callable ``(path, leaf) -> dims | None`` or
      ``params -> tree`` (default :func:`stax.layout.default_dimension_numbers`: 2-D ``(in, out)``;
      attention ``query``/``key``/``value`` kernels ``(in, heads, dh)`` as one
      ``in × heads·dh`` matrix and the ``out`` kernel ``(heads, dh, out)`` as one
      ``heads·dh × out`` matrix; 3-D stacked layers ``(L, in, out)`` as L matrices; 4-D+ Flax
      conv kernels as ``(spatial·in) × out``; biases never). Torch layout:
      ``MatrixDimensionNumbers(1, 0)`` (``torch_bridge.OAdamW`` passes a tree of
      :func:`torch_bridge.torch_dimension_numbers`, with q/k/v of a fused ``in_proj_weight``
      split by ``output_groups=3``). The StableAdamW leaves' RMS clip reads it too: a leaf
      with batch axes (stacked layers) is clipped per layer.
    mode: ``"stacked"`` (default: same-shape matrices orthogonalised as one batch, its stack
      axis sharded over an explicit mesh; compiled once per shape) or ``"per_leaf"`` (each
      matrix where its sharding puts it); :mod:`stax.transforms.orthogonalize`.
    implementation: Newton–Schulz kernel (``"xla"``, ``"pallas"``, ``"gram"``: the iteration on
      the small Gram matrix, :mod:`stax.kernels.newton_schulz.gram`; ``None``: ``"xla"``).
    weight_decay_mask: pytree or callable of booleans (default: all leaves decay, as the seed).
    mu_dtype, nu_dtype: StableAdamW moment dtypes / Muon momentum dtype (``mu_dtype``)
      (default: the parameter's).
    muon_momentum_bits: ``None`` (default: Muon's momentum in ``mu_dtype``) or bits in
      (2, 3, 4, 6, 8): the momentum of each Muon leaf with at least ``min_compress_elements``
      elements stored in a blockwise signed code with stochastic rounding
      (:func:`stax.stored_trace`; 8 bits: 8.125 bits/param, as 8-bit Muon); ``"momentum"`` only.
    codec: ``None`` (default) or a moment codec for the StableAdamW leaves (``"stax"``,
      ``"factored"``; see :func:`stable_adamw`).
    min_compress_elements: smallest leaf the codec and the low-bit momentum compress, >= 0
      (default 4096).
    nonfinite: ``"skip"`` (default), ``"error"`` or ``"ignore"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Parameters must be real floating-point
    (complex, integer and bool leaves raise ``TypeError`` at ``init``, naming the leaf).
    Non-default arguments the chosen mode does not use (the Muon arguments with
    ``muon="off"``, ``muon_momentum``/``muon_nesterov``/``shape_scale``/``rms`` with
    ``muon="gradient"``, ``rms`` without ``shape_scale="match_rms"``, ``grouping``/``exclude``/
    ``min_dim`` with ``labels``, ``max_lr`` without ``decouple_lr``, ``kahan_dtype`` with
    ``kahan_sum=False``) give a ``UserWarning``.
  """
  weight_decay_mask = V.check_mask("weight_decay_mask", weight_decay_mask)
  _check_common(learning_rate, betas, eps, weight_decay, kahan_sum, decouple_lr=decouple_lr,
                max_lr=max_lr, kahan_dtype=kahan_dtype, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  V.check_choice("muon", muon, MUON_MODES)
  V.check_betas(muon_momentum=muon_momentum)
  V.check_bool("muon_nesterov", muon_nesterov)
  V.check_choice("implementation", implementation, (None, "xla", "pallas", "gram"))
  V.check_int("ns_steps", ns_steps, low=1)
  ns_coefficients(ns_coeffs, ns_steps)
  V.check_number("ns_eps", ns_eps, low=0.0)
  V.check_int("update_proj_gap", update_proj_gap, low=1)
  V.check_number("scale", scale, low=0.0)
  V.check_choice("shape_scale", shape_scale, SHAPE_SCALES)
  V.check_number("rms", rms, low=0.0, low_inclusive=False)
  V.check_choice("grouping", grouping, GROUPINGS)
  V.check_int("min_dim", min_dim, low=1)
  V.check_choice("mode", mode, ORTHOGONALIZE_MODES)
  if muon_momentum_bits is not None:
    V.check_int("muon_momentum_bits", muon_momentum_bits)
    V.check_choice("muon_momentum_bits", muon_momentum_bits, TRACE_BITS)
  storage = state_codec_storage(codec, min_compress_elements=min_compress_elements,
                                mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                                threshold_used=muon_momentum_bits is not None,
                                dimension_numbers=dimension_numbers)
  _warn_unused_muon_args(muon, labels, dict(muon_momentum_bits=muon_momentum_bits,
      muon_momentum=muon_momentum, muon_nesterov=muon_nesterov, ns_steps=ns_steps,
      ns_coeffs=ns_coeffs, ns_eps=ns_eps, update_proj_gap=update_proj_gap, scale=scale,
      shape_scale=shape_scale, rms=rms, grouping=grouping, labels=labels, exclude=exclude,
      min_dim=min_dim, dimension_numbers=dimension_numbers, mode=mode,
      implementation=implementation))
  max_lr = _max_lr(learning_rate, decouple_lr, max_lr)
  b1, b2 = betas

  checked_labels = V.check_labels("labels", labels, (MUON, ADAM))

  def label_fn(tree):
    if checked_labels is not None:
      return checked_labels(tree)
    return oadamw_labels(tree, grouping=grouping, exclude=exclude, min_dim=min_dim,
                         dimension_numbers=dimension_numbers)

  def stable(**kw):
    return scale_by_stable_adam(b1, b2, eps, weight_decay=weight_decay, mask=weight_decay_mask,
                                decouple_lr=decouple_lr, max_lr=max_lr, mu_dtype=mu_dtype,
                                nu_dtype=nu_dtype, storage=storage,
                                dimension_numbers=dimension_numbers, **kw)

  def orth(**kw):
    return scale_by_orthogonalization(ns_coeffs, ns_steps, ns_eps,
                                      dimension_numbers=dimension_numbers, mode=mode,
                                      implementation=implementation, scale=scale, **kw)

  # Gate-aware throughout (stax.transforms.guards), so the non-finite guard needs no select of
  # the whole state: the StableAdamW core (a compressed one too) and the Muon trace select
  # their moments back, Kahan keeps its compensation, and the small states (the
  # orthogonalisation's count, the schedule's) are held by gate_state, which returns a
  # gate-aware transformation as it is. (With a select of the state XLA copied every moment
  # each step: 40 of ResNet-18's, 52 of GPT-2 small's.)
  if muon == "off":
    body = stable()
  elif muon == "gradient":
    # The seed: NS(g) feeds the StableAdamW moments of the matrix leaves.
    body = gated_chain(
        gated_partition({MUON: gate_state(orth(shape_scale="none",
                                                update_proj_gap=update_proj_gap)),
                         ADAM: gate_state(optax.identity())}, label_fn),
        gate_state(stable()))
  else:
    muon_tx = gated_chain(
        (saturating_trace(muon_momentum, muon_nesterov, accumulator_dtype=mu_dtype)
         if muon_momentum_bits is None else
         gate_state(stored_trace(muon_momentum, muon_nesterov, bits=muon_momentum_bits,
                                 min_compress_elements=min_compress_elements,
                                 accumulator_dtype=mu_dtype))),
        gate_state(orth(shape_scale=shape_scale, rms=rms, update_proj_gap=update_proj_gap)),
        gate_state(add_decoupled_weight_decay(weight_decay, weight_decay_mask,
                                              decouple_lr=decouple_lr, max_lr=max_lr)),
    )
    body = gated_partition({MUON: muon_tx, ADAM: gate_state(stable())}, label_fn)
  tx = gated_chain(
      gate_state(body),
      gate_state(optax.scale_by_learning_rate(learning_rate)),
      kahan_summation(kahan_dtype, enabled=kahan_sum is not False),
  )
  tx = V.with_param_checks(nonfinite_guard(tx, nonfinite, gated=True), optimizer="stax.oadamw")
  if muon == "off":
    return tx
  return register_plan(tx, labels_plan(
      label_fn, {MUON: "muon" if muon == "momentum" else "ns+adam", ADAM: "adam"},
      dimension_numbers, ("muon", "ns+adam")))
