r"""STAC — "SignSGD Trunk, AdamW Cap" (seed: ``stac-optimizer`` 0.3.0, PyTorch).

Plain sign descent (no state) on every module but the last N, AdamW on the last N:

.. math::
  \text{trunk: } p \leftarrow p - \eta_s(\operatorname{sign}(g) + \lambda_s p),\qquad
  \text{cap: } p \leftarrow p - \eta(\hat m/(\sqrt{\hat v}+\epsilon) + \lambda_a p)

What differs from the seed, and why:

* **Module order.** The seed takes "the last N modules" in PyTorch registration order, which in
  JAX does not exist (pytrees sort their keys). stax ranks modules by ``module_order``: pass
  ``stax.execution_order(apply_fn, params, x, tied="last_use")`` (forward order, recommended) or
  any explicit list; without it, a natural sort of the module names is the documented fallback
  (right for ``Dense_0..Dense_11``, wrong for an NNX ``head`` attribute declared after
  ``layers``).
* **Tied parameters.** A tied embedding/output matrix belongs to the module that stores it. With
  ``execution_order(..., tied="last_use")`` that module ranks at the output end, so the tied
  output head gets the AdamW cap; the seed gives it to its first owner, the embedding, which
  usually lands in the sign trunk (``tied="first_use"`` reproduces that).
* **Non-finite gradients** skip the whole step on device (no host sync); ``nonfinite="error"``
  raises (see :func:`stax.nonfinite_guard`), like the seed's ``error_if_nonfinite=True``.
* The AdamW cap's moments default to the parameter dtype as in the seed (v of a float16
  parameter in float32, :func:`stax.scale_by_adam`); pass ``mu_dtype`` / ``nu_dtype``.

Defaults follow the seed where it makes sense: ``sign_weight_decay=None`` means
``0.5·weight_decay`` when both sections are non-empty, else ``weight_decay``; ``sign_lr_scale``
scales the trunk's learning rate only in hybrid mode; parameters with ``ndim <= 1`` and those
named ``bias`` are exempt from weight decay in both sections.

Reference: the ``stac-optimizer`` package (``smturtle2/stac-optimizer``) README and code.

Example:
  >>> import jax, jax.numpy as jnp, stax
  >>> params = {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
  ...           "Dense_1": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
  >>> tx = stax.stac(1e-3, last_n_modules=1, weight_decay=1e-2,
  ...                module_order=["Dense_0", "Dense_1"])
  >>> state = tx.init(params)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stax import _validation as V
from stax import partition
from stax.describe import labels_plan, register_plan
from stax.layout import NEVER_MATRICES
from stax.transforms.adam import scale_by_adam
from stax.transforms.guards import gate_aware, gate_state, gated_chain, nonfinite_guard

__all__ = ["stac", "stac_labels", "decay_mask"]

TRUNK, CAP = "trunk", "cap"

ModuleOrder = Optional[Union[Sequence[str], Callable[[Any], Sequence[str]]]]


def decay_mask(params: Any, *, exclude_1d: bool = True, exclude_bias: bool = True) -> Any:
  """True where a leaf decays: not a vector with ``exclude_1d`` and not named ``bias`` with
  ``exclude_bias`` (the seed's rule). A vector is a leaf of ``ndim <= 1``, or one named ``bias``
  or ``scale`` (:data:`stax.layout.NEVER_MATRICES`: stacked layers' norm scales and biases
  ``(L, d)``, one vector per layer; until 2026-12-07 a stacked norm scale decayed where the
  same model unstacked did not)."""

  def keep(path, x):
    name = partition.normalize_path(path)
    if exclude_1d and (np.ndim(x) <= 1 or (name and name[-1] in NEVER_MATRICES)):
      return False
    if exclude_bias and name and name[-1] == "bias":
      return False
    return True

  return jax.tree_util.tree_map_with_path(keep, params)


def _resolve_order(module_order: ModuleOrder, tree: Any):
  if module_order is None or isinstance(module_order, (list, tuple)):
    return module_order
  return module_order(tree)


def cap_size(n_modules: int, last_n_modules: Optional[int] = 1,
             last_n_ratio: Optional[float] = None) -> int:
  """How many of ``n_modules`` modules the AdamW cap takes (the seed's rule): ``last_n_modules``
  (at most ``n_modules``), or when it is ``None``, ``ceil(n·ratio)`` but at least 1 unless the
  ratio is 0 (``last_n_ratio`` default ``None`` → 0.125)."""
  if last_n_modules is not None:
    return min(last_n_modules, n_modules)
  r = 0.125 if last_n_ratio is None else last_n_ratio
  return 0 if r == 0 else min(max(math.ceil(n_modules * r), 1), n_modules)


def trunk_weight_decay(weight_decay: float, sign_weight_decay: Optional[float],
                       hybrid: bool) -> float:
  """The sign trunk's decay (the seed's rule): ``sign_weight_decay`` when given, else half of
  ``weight_decay`` when the model has both a trunk and a cap, else ``weight_decay``."""
  if sign_weight_decay is not None:
    return sign_weight_decay
  return 0.5 * weight_decay if hybrid else weight_decay


def stac_labels(params: Any, last_n_modules: Optional[int] = 1,
                module_order: ModuleOrder = None, last_n_ratio: Optional[float] = None) -> Any:
  """``"cap"``/``"trunk"`` label per leaf, as :func:`stac` partitions them."""
  ranks = partition.module_ranks(params, _resolve_order(module_order, params))
  k = cap_size(len(ranks), last_n_modules, last_n_ratio)
  return partition.last_n_modules_labels(params, k, list(ranks), last_label=CAP,
                                         rest_label=TRUNK)


def scale_by_sign_in_param_dtype() -> optax.GradientTransformation:
  """``optax.scale_by_sign`` whose update has the dtype the Adam core's would: the promotion of
  the gradient's and the parameter's (float32 parameters with bfloat16 gradients: a float32
  ±1). The sign is exact in any dtype, but what follows it is not: in bfloat16 the learning
  rate times ±1 is the learning rate rounded to 8 bits (1e-3 became 1.0004e-3, one bias for
  every entry) and the decay ``λ·p`` is added at bfloat16's precision; ``optax.adamw``'s update
  of such a model is float32. Without ``params`` (or for a parameter of the gradient's dtype)
  it is ``optax.scale_by_sign`` exactly."""

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    ps = treedef.flatten_up_to(params) if params is not None else [None] * len(leaves)
    out = [jnp.sign(g) if p is None or not hasattr(p, "dtype")
           else jnp.sign(g).astype(jnp.promote_types(g.dtype, p.dtype))
           for g, p in zip(leaves, ps)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def stac(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    last_n_modules: Optional[int] = 1,
    weight_decay: float = 0.0,
    sign_weight_decay: Optional[float] = None,
    sign_lr_scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    adamw_weight_decay: Optional[float] = None,
    last_n_ratio: Optional[float] = None,
    module_order: ModuleOrder = None,
    exclude_1d_from_weight_decay: bool = True,
    exclude_bias_from_weight_decay: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nonfinite: str = "skip",
) -> optax.GradientTransformationExtraArgs:
  """Sign-descent trunk with an AdamW cap on the last ``last_n_modules`` modules.

  Args:
    learning_rate: η >= 0 or a schedule (default 1e-3), shared by both sections.
    last_n_modules: modules in the AdamW cap, >= 0 (default 1; ``0`` is pure sign descent,
      >= the module count is plain AdamW). ``None`` uses ``last_n_ratio``.
    weight_decay: decoupled decay λ >= 0 for the cap, and the trunk's default (default 0).
    sign_weight_decay: trunk decay λ_s >= 0 (default ``None``: 0.5·weight_decay when both
      sections exist, else weight_decay — the seed's rule since 0.2.0).
    sign_lr_scale: trunk lr multiplier > 0 in hybrid mode (default 1.0).
    b1, b2: AdamW decays in [0, 1) (defaults 0.9, 0.999).
    eps: AdamW denominator term >= 0 (default 1e-8).
    adamw_weight_decay: cap decay >= 0 overriding ``weight_decay`` (default ``None``).
    last_n_ratio: when ``last_n_modules is None``, the cap is ``ceil(N·ratio)`` modules (at least
      1 unless the ratio is 0), ratio in [0, 1] (default ``None`` → the seed's 0.125).
    module_order: module names first to last, or a callable ``params -> names``
      (e.g. ``lambda p: stax.execution_order(apply_fn, p, x, tied="last_use")``); default
      ``None``: natural sort of the names (fallback, see :mod:`stax.partition`). Stacked layers
      (one ``nn.scan``/``nnx.vmap`` leaf ``(L, ...)``) are one module: the cap takes the whole
      stack or none of it, so with ``last_n_modules > 1`` or ``last_n_ratio`` the cap of a
      stacked model differs from that of the same layers unstacked (its last layer alone);
      keep the capped modules outside the stack, as the default cap of 1 (the head) does.
      (Reported by stop 54's stacked-layers sweep.)
    exclude_1d_from_weight_decay: exempt vectors: leaves with ndim <= 1, and stacked norm scales
      and biases (named ``scale``/``bias``, :func:`decay_mask`) (default True).
    exclude_bias_from_weight_decay: exempt leaves named ``bias`` (default True).
    mu_dtype: dtype of the cap's first moment, ``None`` or a floating dtype (default: the
      parameter's).
    nu_dtype: dtype of the cap's second moment, ``None`` or a floating dtype (default: the
      parameter's, float32 for a float16 one; pass ``jnp.float32`` with bfloat16 parameters,
      :func:`stax.adamw`).
    nonfinite: ``"skip"`` (default), ``"error"`` or ``"ignore"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; the trunk keeps no state. Parameters must be
    floating-point; complex ones are accepted in the AdamW cap (as ``optax.adamw``) and refused
    in the sign trunk; integer/bool leaves raise ``TypeError`` at ``init``, naming the leaf.
    Arguments with no effect (``last_n_ratio`` with ``last_n_modules`` set; the cap's
    arguments with ``last_n_modules=0``) give a ``UserWarning``.
  """
  V.check_number("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  V.check_int("last_n_modules", last_n_modules, low=0, allow_none=True)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_number("sign_weight_decay", sign_weight_decay, low=0.0, allow_none=True)
  V.check_number("adamw_weight_decay", adamw_weight_decay, low=0.0, allow_none=True)
  V.check_number("sign_lr_scale", sign_lr_scale, low=0.0, low_inclusive=False)
  V.check_number("last_n_ratio", last_n_ratio, low=0.0, high=1.0, allow_none=True)
  V.check_betas(b1=b1, b2=b2)
  V.check_number("eps", eps, low=0.0)
  if module_order is not None and not (isinstance(module_order, (list, tuple))
                                       or callable(module_order)):
    raise TypeError("`module_order` must be a sequence of module names, a callable or None.")
  V.check_bool("exclude_1d_from_weight_decay", exclude_1d_from_weight_decay)
  V.check_bool("exclude_bias_from_weight_decay", exclude_bias_from_weight_decay)
  V.check_dtype("mu_dtype", mu_dtype)
  V.check_dtype("nu_dtype", nu_dtype)
  if last_n_modules is not None:
    V.warn_no_effect("last_n_ratio", last_n_ratio, None,
                     "unless last_n_modules=None (the cap size is last_n_modules)")
  if last_n_modules == 0 or (last_n_modules is None and last_n_ratio == 0):
    why = "without an AdamW cap (last_n_modules=0: pure sign descent)"
    for name, value, default in (("b1", b1, 0.9), ("b2", b2, 0.999), ("eps", eps, 1e-8),
                                 ("adamw_weight_decay", adamw_weight_decay, None),
                                 ("mu_dtype", mu_dtype, None),
                                 ("nu_dtype", nu_dtype, None),
                                 ("sign_lr_scale", sign_lr_scale, 1.0)):
      V.warn_no_effect(name, value, default, why)

  def mask_fn(p):
    return decay_mask(p, exclude_1d=exclude_1d_from_weight_decay,
                      exclude_bias=exclude_bias_from_weight_decay)

  def build(tree):
    labels = stac_labels(tree, last_n_modules, module_order, last_n_ratio)
    present = set(jax.tree.leaves(labels))
    hybrid = TRUNK in present and CAP in present
    lam_s = trunk_weight_decay(weight_decay, sign_weight_decay, hybrid)
    lam_a = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    lr_s = learning_rate
    if hybrid:
      lr_s = ((lambda c: learning_rate(c) * sign_lr_scale) if callable(learning_rate)
              else learning_rate * sign_lr_scale)
    # Gate-aware throughout (the trunk keeps no state but a schedule's count, the cap is the
    # exact Adam core), so a skipped step needs neither a lax.cond nor a state select.
    trunk = gated_chain(gate_state(scale_by_sign_in_param_dtype()),
                        gate_state(optax.add_decayed_weights(lam_s, mask_fn)),
                        gate_state(optax.scale_by_learning_rate(lr_s)))
    cap = gated_chain(scale_by_adam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
                      gate_state(optax.add_decayed_weights(lam_a, mask_fn)),
                      gate_state(optax.scale_by_learning_rate(learning_rate)))
    return gate_aware(optax.partition({TRUNK: trunk, CAP: cap}, labels))

  def init_fn(params):
    # The sign trunk refuses complex leaves (the seed's torch.sign does; sign descent has no
    # single complex meaning); the AdamW cap takes them as optax.adamw does.
    labels = stac_labels(params, last_n_modules, module_order, last_n_ratio)
    V.check_param_leaves(jax.tree.map(lambda p, l: p if l == TRUNK else None, params, labels),
                         allow_complex=False, optimizer="stax.stac (sign trunk)",
                         complex_note="complex parameters are supported in the AdamW cap only "
                                      "(raise last_n_modules or adjust module_order)")
    return build(params).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return build(updates).update(updates, state, params, **extra_args)

  tx = V.with_param_checks(
      nonfinite_guard(gate_aware(optax.GradientTransformationExtraArgs(init_fn, update_fn)),
                      nonfinite),
      optimizer="stax.stac", allow_complex=mu_dtype is None,
      complex_note="a real `mu_dtype` cannot hold a complex first moment; leave "
                   "mu_dtype=None for complex parameters")
  return register_plan(tx, labels_plan(
      lambda p: stac_labels(p, last_n_modules, module_order, last_n_ratio),
      {TRUNK: "sign", CAP: "adam"}))
