r"""StableAdamW's update (optimi / Wortsman et al.), on the shared Adam core.

.. math::
  \hat\beta(\beta,t) = \beta\,\frac{1-\beta^{t-1}}{1-\beta^t},\quad
  m_t = \hat\beta_1 m_{t-1} + (1-\hat\beta_1) g_t,\quad
  v_t = \hat\beta_2 v_{t-1} + (1-\hat\beta_2) g_t^2

  \mathrm{RMS}_t = \sqrt{\operatorname{mean}\big(g_t^2/\max(v_t,\epsilon^2)\big)}\ \text{(per tensor)},
  \qquad \eta_t = \eta / \max(1, \mathrm{RMS}_t)

  p_t = p_{t-1} - \eta_t\big(m_t/(\sqrt{v_t}+\epsilon) + \lambda' p_{t-1}\big),\qquad
  \lambda' = \lambda \ \text{(decoupled)}\ \text{or}\ \lambda/\eta_{max}\ \text{(fully decoupled)}

The moments come from the shared Adam core (:func:`stax.transforms.adam.adam_update`, as
:func:`stax.scale_by_adam` with ``bias_correction="debiased"``: optimi's debiased betas, the EMAs
are already unbiased); the RMS uses the second moment the core formed the update from. The update clipping is computed on device (no
``.item()`` host sync per tensor as in optimi's PyTorch paths). Because StableAdamW clips the
*learning rate*, the clip also scales the weight decay, so the decay is applied inside
:func:`scale_by_stable_adam` (before ``optax.scale_by_learning_rate``) rather than by a separate
``optax.add_decayed_weights``.

Huge gradients: the moments see every gradient entry saturated at ±2**63 (float32 / bfloat16
moments; :func:`stax.numerics.square_bound`), so an entry beyond it — up to float32's maximum —
acts as ±2**63 there and no moment overflows; an entry whose own ``g²`` overflows (``|g| >=
2**64``), or a sum of ratios that overflows (see :func:`update_rms`), makes the RMS Inf, so that
tensor's step on that update is 0 (the clip at its limit). No parameter or state leaf becomes
non-finite, and the step is not skipped. Below the bounds nothing changes.

Reference: Wortsman et al., `Stable and low-precision training for large-scale vision-language
models <https://arxiv.org/abs/2304.13013>`_, 2023; ``torch-optimi`` 0.3.3 ``StableAdamW``.

Example:
  >>> import jax.numpy as jnp, optax, stax
  >>> tx = optax.chain(stax.scale_by_stable_adam(weight_decay=1e-2),
  ...                  optax.scale_by_learning_rate(1e-3))
  >>> state = tx.init({"w": jnp.ones(3)})
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics as onum

from stax import _leafwise
from stax import _validation as V
from stax import layout
from stax import numerics as num
from stax._trees import flatten_state
from stax.codecs.base import FullPrecision, SeparateStorage, StorageLike, resolve_storage
from stax.transforms.adam import (ScaleByAdamState, _moment_dtype, adam_config, adam_init,
                                  adam_update, debias_beta)
from stax.transforms.guards import NONFINITE_OK, PROBE, DeferredGate, gate_aware

__all__ = ["scale_by_stable_adam", "update_rms", "add_decoupled_weight_decay",
           "decay_coefficient"]


def update_rms(g: jax.Array, v: jax.Array, eps: Any) -> jax.Array:
  """optimi's per-tensor ``sqrt(mean(g² / max(v, eps²)))`` in float32 (a scalar).

  The mean of the ratios, as optimi computes it, summed in tiles on CPU
  (:func:`stax.numerics.tiled_means`: its one vectorised loop evaluates the division at 5.9 ms
  per 16M elements where a plain ``jnp.mean`` takes 8.1; equal to rounding, not bit for bit;
  small tensors and other backends take the plain mean). A finite ``|g| >= 2**64`` overflows
  its ``g²``, and the sum overflows where the mean ratio exceeds ``3.4e38 / n``; either makes
  the RMS Inf, and that tensor's update on that step is 0 (finite; its moments still take the
  saturated gradient).
  Every ratio is at most ``1/(1-b2)`` while ``v`` holds the current ``(1-b2)·g²`` (1,000 at the
  default ``b2``), so an overflowing sum needs a degenerate ``b2`` or ``v``, and the clipped
  update ``u / RMS`` would then be below ``sqrt(n / 3.4e38)·|u|`` anyway (``2e-16·|u|`` at
  ``n = 16M``). (The overflow-safe
  :func:`stax.numerics.mean` scaled every ratio inside the reduction: measured at 16M
  parameters, 10.3 ms against 8.1 for the mean, and the step 2.01× against 1.78× optax.adamw's
  in one interleaved loop.)
  """
  g = g.astype(jnp.float32)
  v = v.astype(jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  floor = eps * eps
  (mean,) = num.tiled_means((g, v), lambda g, v: jnp.square(g) / jnp.maximum(v, floor))
  return jnp.sqrt(mean)


def _ratio_sum(g, v, eps):
  """``(sum(g² / max(v, eps²)),)`` of one leaf in float32 (:func:`update_rms`'s sum)."""
  g = g.astype(jnp.float32)
  v = v.astype(jnp.float32)
  floor = jnp.asarray(eps, jnp.float32) * jnp.asarray(eps, jnp.float32)
  return num.tiled_means((g, v), num.total(lambda g, v: jnp.square(g) / jnp.maximum(v, floor)))


def _clip_scales(sums: jax.Array, g_leaves: list) -> list:
  """Each leaf's ``(1 / max(1, RMS),)`` from the vector of its ratio sums: the means and scales
  formed for every leaf at once and each picked (:func:`stax._leafwise.entries`), so that no
  leaf's kernels hold its size (a division by it was a scalar kernel per leaf shape). The update
  is multiplied by the scale (XLA's CPU backend turns a division by a scalar into this product
  anyway)."""
  sizes = _leafwise.sizes(g_leaves)
  scales = _leafwise.entries(1.0 / jnp.maximum(1.0, jnp.sqrt(sums / sizes)))
  return [None if g is None else (x,) for g, x in zip(g_leaves, scales)]


def _per_layer(fn, axes: tuple, arrays: tuple, scalars: tuple) -> tuple:
  """``fn(*arrays_b, *scalars)`` for each index ``b`` of the batch axes ``axes`` of the
  (same-shape) ``arrays``, vmapped: a tuple of ``(B,)`` results, ``B`` the batch axes' size."""
  k = len(axes)
  shape = jnp.shape(arrays[0])
  n = int(np.prod([shape[i] for i in axes], dtype=np.int64))
  flat = [jnp.moveaxis(jnp.broadcast_to(x, shape), axes, tuple(range(k))) for x in arrays]
  flat = [x.reshape((n,) + x.shape[k:]) for x in flat]
  return tuple(jax.vmap(fn, in_axes=(0,) * len(flat) + (None,) * len(scalars))(*flat, *scalars))


def _layer_scales(sums: jax.Array, g: jax.Array, axes: tuple) -> tuple:
  """``(1 / max(1, RMS),)`` per index of the batch axes ``axes`` from their ratio sums,
  shaped to broadcast against ``g`` (size-1 reduced axes)."""
  per = g.size // max(sums.size, 1)
  scale = 1.0 / jnp.maximum(1.0, jnp.sqrt(sums / jnp.float32(max(per, 1))))
  return (scale.reshape([d if i in axes else 1 for i, d in enumerate(g.shape)]),)


def _early_ratio_sum(g, v, m0, a2, d2, eps):
  """``(ratio sum, probe)`` of one float32 leaf before the Adam core runs: the sum of
  :func:`update_rms` over the new v the core will form, ``a2·|sat(g)|² + d2·v`` written as
  :func:`stax.transforms.adam.adam_step` writes it (saturated at the bound of the moments'
  dtypes, ``m0``'s and ``v``'s), evaluated inside the statistics' pass from the stored v, and
  the gradient's finiteness probe as one more output of that pass."""
  bound = num.square_bound(m0.dtype, v.dtype)
  b_sq = jnp.asarray(bound * bound, g.dtype)   # a power of two: exact
  floor = jnp.asarray(eps, jnp.float32) * jnp.asarray(eps, jnp.float32)

  def ratio(g, v):
    # min(g², B²) is |saturate(g, B)|² bit for bit (the core's reduces_nu form); a clamp of g
    # itself kept XLA's tiled reduction from vectorising (2.4 against 0.5 ms at 3.1M)
    v_new = (a2 * jnp.minimum(jnp.square(g), b_sq) + d2 * v).astype(_moment_dtype(v, g))
    return jnp.square(g.astype(jnp.float32)) / jnp.maximum(v_new.astype(jnp.float32), floor)

  # its own copies of g and v (stax.numerics.independent): else XLA's CSE shares the new v
  # with the core's v pass, which then materialises it for both
  return num.tiled_means(num.independent(g, v), num.total(ratio), PROBE)


def _early_clip_scales(cfg, g_leaves: list, treedef, state: ScaleByAdamState, eps,
                       stacked: list):
  """Every leaf's clip scale and one finiteness probe of every gradient, from one statistics
  pass per leaf that reads ``g`` and the *stored* v (:func:`_early_ratio_sum`), or ``None``
  where a leaf's storage is not full-precision float32 m and v (a codec's decoded v, another
  dtype: the RMS then reads the core's v after it ran).

  StableAdamW's RMS reads the new v, so computed after the core it needs the gate first, and
  the non-finite guard's check was a pass over every gradient of its own (its floor program,
  ``adamw+check+stats``); formed here the check's probe rides in the same pass, as STAM's
  statistics give theirs (:class:`stax.transforms.guards.DeferredGate`). The values are the
  same: on a step that is not skipped the core's new v is exactly this one."""
  mu_l, nu_l = flatten_state(treedef, state.mu), flatten_state(treedef, state.nu)
  ops = []
  for g, mu, nu in zip(g_leaves, mu_l, nu_l):
    if g is None:
      ops.append(None)
      continue
    st = resolve_storage(cfg.storage, g)
    plain = (type(st) is SeparateStorage and st.kernel is None and not st.follow_sharding
             and type(st.mu_codec) is FullPrecision and type(st.nu_codec) is FullPrecision)
    if not (plain and all(getattr(x, "dtype", None) == jnp.float32 for x in (g, mu, nu))
            and jnp.shape(nu) == jnp.shape(g)):
      return None
    ops.append((g, nu, jnp.zeros((), mu.dtype)))
  b2_t = debias_beta(cfg.b2, onum.safe_increment(state.count))
  a2, d2 = 1 - b2_t, b2_t
  # stacked leaves: one RMS per layer (their batch axes), the same pass vmapped over them
  layers = {i: _per_layer(_early_ratio_sum, stacked[i], o[:2], (o[2], a2, d2, eps))
            for i, o in enumerate(ops) if o is not None and stacked[i]}
  sums, probe = _leafwise.reduce_leaves(
      _leafwise.shared_trace(_early_ratio_sum),
      [None if o is None or i in layers else (*o, a2, d2, eps) for i, o in enumerate(ops)],
      stacked=True, width=2, totals=(1,))
  scales = _clip_scales(sums, g_leaves)
  # Every ratio sum also feeds the probe, as `min(sum, 0)`: 0 for every sum that is not NaN (a
  # ratio is >= 0, +Inf included) and NaN only for a gradient the probe already finds
  # non-finite, so the gate is unchanged. It orders each read of the stored v before the core's
  # in-place write of v, which the gate precedes: where XLA split a small leaf's pass, its probe
  # (of g) and its ratio (of g and v) were two reductions, the read of v came after nothing the
  # write needed, and XLA copied every such v each step (GPT-2 small's 98 vectors).
  probe = probe + jnp.minimum(jnp.min(sums), 0.0) if sums.size else probe
  for i, (layer_sums, layer_probes) in layers.items():
    scales[i] = _layer_scales(layer_sums, g_leaves[i], stacked[i])
    probe = probe + jnp.sum(layer_probes) + jnp.minimum(jnp.min(layer_sums), 0.0)
  return scales, (probe if any(o is not None for o in ops) else None)


def decay_coefficient(weight_decay: Any, decouple_lr: bool, max_lr: Any) -> Any:
  """``λ`` (decoupled) or ``λ / max_lr`` (fully decoupled; 0 when ``max_lr`` is 0)."""
  if not decouple_lr:
    return weight_decay
  max_lr = jnp.asarray(max_lr, jnp.float32)
  return jnp.where(max_lr > 0, weight_decay / jnp.where(max_lr > 0, max_lr, 1.0), 0.0)


def _mask_leaves(mask, tree):
  """Whether each leaf of ``tree`` decays: ``mask`` (or ``mask(tree)``) is a tree of bools laid
  out like ``tree`` or a prefix of it (a bool covers its sub-tree, as in ``optax.masked``)."""
  if mask is None:
    return [True] * len(jax.tree.leaves(tree))
  return jax.tree.leaves(V.mask_tree("weight_decay_mask", mask, tree))


def scale_by_stable_adam(
    b1: Any = 0.9,
    b2: Any = 0.99,
    eps: Any = 1e-6,
    *,
    weight_decay: Any = 0.0,
    mask: Optional[Any | Callable[[Any], Any]] = None,
    decouple_lr: bool = False,
    max_lr: Any = None,
    clip: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    storage: Optional[StorageLike] = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW's clipped Adam direction plus its (clipped) decoupled weight decay.

  Follow it with ``optax.scale_by_learning_rate(lr)``.

  Args:
    b1: first-moment decay in [0, 1) (default 0.9, optimi's).
    b2: second-moment decay in [0, 1) (default 0.99, optimi's).
    eps: denominator term >= 0, also the floor ``eps²`` of the RMS (default 1e-6).
    weight_decay: λ >= 0 (default 0 here; :func:`stax.stable_adamw` defaults to 1e-2).
    mask: pytree or callable selecting the leaves that decay (default: all, as optimi).
    decouple_lr: fully decoupled decay ``p ← p(1 − (η_t/max_lr)·λ)`` (default False).
    max_lr: the maximum scheduled learning rate > 0 for ``decouple_lr`` (required then).
    clip: apply the per-tensor RMS update clipping (default True; False gives AdamW with
      debiased betas).
    mu_dtype, nu_dtype: moment dtypes (default: the parameter's, as optimi; v of a float16
      parameter in float32, :func:`stax.scale_by_adam`).
    storage: a :class:`~stax.codecs.base.MomentStorage` (overrides the dtypes).
    dimension_numbers: the leaves' layout, any form :mod:`stax.layout` takes (default
      ``None``: :func:`stax.layout.default_dimension_numbers`): a leaf with batch axes there
      (stacked ``(L, in, out)`` layers) gets one RMS clip per layer, as the same layers
      unstacked do (optimi's one per tensor would clip every layer by the RMS of all).
      Biases and norm scales have no layout: a stacked ``(L, d)`` one is clipped as one tensor.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`stax.ScaleByAdamState`,
    gate-aware (:class:`~stax.transforms.guards.GateAwareTransformation`) as
    :func:`stax.scale_by_adam` is: on a skipped step its state comes back unchanged.
  """
  V.check_betas(b1=b1, b2=b2)
  V.check_number("eps", eps, low=0.0)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_bool("decouple_lr", decouple_lr)
  V.check_bool("clip", clip)
  V.check_dtype("mu_dtype", mu_dtype)
  V.check_dtype("nu_dtype", nu_dtype)
  if decouple_lr:
    if max_lr is None:
      raise ValueError("`max_lr` is required when `decouple_lr=True` (the maximum scheduled "
                       "learning rate, > 0).")
    V.check_number("max_lr", max_lr, low=0.0, low_inclusive=False)
  cfg = adam_config(b1, b2, eps, 0.0, bias_correction="debiased", mu_dtype=mu_dtype,
                    nu_dtype=nu_dtype, storage=storage)

  layout.check_dimension_numbers(dimension_numbers)

  def init_fn(params):
    _mask_leaves(mask, params)  # a mask of the wrong layout fails here, naming the argument
    if clip:
      layout.stacked_axes(dimension_numbers, params)  # a layout that does not fit fails here
    return adam_init(cfg, params)

  def update_fn(updates, state: ScaleByAdamState, params=None, **extra_args):
    ok = extra_args.get(NONFINITE_OK)
    g_leaves, treedef = jax.tree.flatten(updates)
    stacked = layout.stacked_axes(dimension_numbers, updates) if clip else [()] * len(g_leaves)
    early = None
    if clip and isinstance(ok, DeferredGate):
      # the RMS and the check's probe from one pass, before the core reads the gate
      early = _early_clip_scales(cfg, g_leaves, treedef, state, jnp.asarray(eps, jnp.float32),
                                 stacked)
      if early is not None and early[1] is not None:
        ok.offer(g_leaves, early[1])
    step, new_state = adam_update(cfg, updates, state, ok)
    d_leaves = treedef.flatten_up_to(step.update)
    v_leaves = treedef.flatten_up_to(step.nu_used)
    p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
    decays = _mask_leaves(mask, updates)
    lam = decay_coefficient(weight_decay, decouple_lr, max_lr)
    scales = [None] * len(g_leaves)
    if early is not None:
      scales = early[0]
    elif clip:  # per leaf; small alike leaves' together (stax._leafwise.reduce_leaves)
      e = jnp.asarray(eps, jnp.float32)
      (sums,) = _leafwise.reduce_leaves(_leafwise.shared_trace(_ratio_sum), [
          None if g is None or stacked[i] else (g, v, e)
          for i, (g, v) in enumerate(zip(g_leaves, v_leaves))], stacked=True, width=1)
      scales = _clip_scales(sums, g_leaves)
      for i, (g, v) in enumerate(zip(g_leaves, v_leaves)):
        if g is not None and stacked[i]:  # one RMS per layer of stacked layers
          (layer_sums,) = _per_layer(_ratio_sum, stacked[i], (g, v), (e,))
          scales[i] = _layer_scales(layer_sums, g, stacked[i])
    out = []
    for g, d, v, p, dec, scale in zip(g_leaves, d_leaves, v_leaves, p_leaves, decays, scales):
      if g is None:
        out.append(None)
        continue
      u = d.astype(jnp.float32)
      if dec and p is not None:
        u = u + jnp.asarray(lam, jnp.float32) * p.astype(jnp.float32)
      elif dec and params is None and not _is_zero(weight_decay):
        raise ValueError(optax.NO_PARAMS_MSG if hasattr(optax, "NO_PARAMS_MSG") else
                         "scale_by_stable_adam needs `params` for weight decay.")
      if clip:
        u = u * scale[0]
      # the core's update dtype (the gradient's promoted with its moments'): float32 for float32
      # parameters with bfloat16 gradients, as optax.adamw's (the gradient's dtype had rounded
      # every update to 8 bits there)
      out.append(u.astype(d.dtype))
    return jax.tree.unflatten(treedef, out), new_state

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return gate_aware(tx)


def _is_zero(x) -> bool:
  return V.is_concrete_number(x) and float(x) == 0.0


def add_decoupled_weight_decay(
    weight_decay: Any = 0.0,
    mask: Optional[Any | Callable[[Any], Any]] = None,
    *,
    decouple_lr: bool = False,
    max_lr: Any = None,
) -> optax.GradientTransformation:
  """Adds ``λ'·p`` (``λ' = λ`` or ``λ/max_lr`` with ``decouple_lr``), keeping the update dtype.

  The un-clipped counterpart of the decay inside :func:`scale_by_stable_adam` (used for the
  Muon leaves of :func:`stax.oadamw`); follow it with ``optax.scale_by_learning_rate``.
  """
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_bool("decouple_lr", decouple_lr)
  if decouple_lr:
    if max_lr is None:
      raise ValueError("`max_lr` is required when `decouple_lr=True`.")
    V.check_number("max_lr", max_lr, low=0.0, low_inclusive=False)

  def init_fn(params):
    _mask_leaves(mask, params)  # a mask of the wrong layout fails here, naming the argument
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decoupled_weight_decay needs `params`.")
    lam = jnp.asarray(decay_coefficient(weight_decay, decouple_lr, max_lr), jnp.float32)
    leaves, treedef = jax.tree.flatten(updates)
    ps = treedef.flatten_up_to(params)
    decays = _mask_leaves(mask, updates)
    out = [None if u is None else
           ((u.astype(jnp.float32) + lam * p.astype(jnp.float32)).astype(u.dtype) if dec else u)
           for u, p, dec in zip(leaves, ps, decays)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)
