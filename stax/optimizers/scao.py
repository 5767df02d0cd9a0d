r"""SCAO — Sparse Curvature-Aware Adaptive Optimizer (seed: ``scao`` 0.2.4, PyTorch).

An Adam warm-up, then Kronecker-factored curvature preconditioning of each matrix's gradient,
fed into the *same* AdamW moments:

.. math::
  g_{\rm eff} = b\,\tilde G + (1-b)\,G,\quad
  m_t = \beta_1 m_{t-1} + (1-\beta_1) g_{\rm eff},\quad
  v_t = \beta_2 v_{t-1} + (1-\beta_2) g_{\rm eff}^2,\quad
  p_t = p_{t-1} - \eta\big(\hat m_t/(\sqrt{\hat v_t}+\epsilon) + \lambda p_{t-1}\big)

with :math:`b = 0` during the warm-up and a linear ramp to 1 over ``blend_steps`` after it.
The preconditioned gradient :math:`\tilde G` comes from one of two modes:

``mode="lowrank"`` (default) — the improved preconditioner (:func:`stax.scale_by_kron_lowrank`):

* **Low-rank for real**: per matrix only the top-K eigenvectors/values of each curvature EMA
  and the EMA trace — O((m+n)·K) floats, tracked by a warm-started randomized subspace
  iteration with Rayleigh–Ritz on the implicit EMA; no m×m / n×n array, no full ``eigh``.
* **Consistent complement**: the untracked eigenvalues are represented by the *tail level*
  :math:`\sigma = (\mathrm{tr} - \sum_{i<k} S_i)/(\mathrm{dim}-k)`, so the preconditioner is the
  inverse fourth root of :math:`USU^\top + \sigma(I-UU^\top)` on each side (Shampoo's
  :math:`L^{-1/4}GR^{-1/4}` for that approximation). The seed instead uses gain 1 on the
  complement and :math:`S^{-1/4}` inside, whose ratio depends on the gradient scale.
* **Principled rank**: per side, the smallest ``k`` holding ``1 - epsilon_sparse`` of the
  spectral mass *above the tail level* (an isotropic floor or white noise adds nothing, so it
  cannot push ``k`` to ``k_max`` as the seed's εI floor does).
* **Scale invariance and a warm-up without LR compensation**: :math:`\tilde G` is grafted to
  :math:`\|G\|_F`. All ingredients are homogeneous in the gradient scale, so gradients ×1e-3 and
  ×1e3 give the same updates (up to Adam's ``eps``), the blend mixes like-scaled gradients and
  Adam's moments carried over from the warm-up stay calibrated — no "1.17× LR" is needed.
* Vectors (and matrices with a side of 1 or above ``max_precond_dim``) use Adam alone;
  ``tau`` has no effect in this mode.

``mode="scao-0.2.4"`` — exactly the published algorithm (:func:`stax.scale_by_kron_scao`):
full EMAs from ``1e-4·I`` with bias correction, adaptive Tikhonov, full ``eigh`` every
``precond_freq`` steps, the spectral-mass rank with the −1/+4 rate limit, identity on the
complement, the ``tau`` clip on the natural-gradient norm, the diagonal path for vectors,
block grids above ``max_precond_dim`` and ``(shape[0], -1)`` for ``ndim >= 3`` (the seed's view
of a torch tensor; stax gives a JAX leaf its layer's matrix by default, see ``dimension_numbers``,
which is the seed's matrix of the same layer up to the order of its fan-in). It matches the
``scao`` 0.2.4 package (parity-tested over 240 steps through both phases).

Both modes: the phase switch, the blend and the periodic curvature update run inside ``jit``
(``lax.cond``; static shapes with ranks as masks; no host syncs); Adam moments are float32
(as the seed) and come from the shared Adam core; decoupled weight decay multiplies the
learning rate (as PyTorch/optax); the final update is cast to the parameter dtype.

How the default was chosen: on a 2-layer tanh MLP regression (64→64→16, 600 steps, 3 seeds,
lr 3e-3, ``warmup_steps=100, precond_freq=10``), see the README's SCAO section for the numbers.

References:
  ``scao`` 0.2.4 (PyPI; ``whispering3/scao``); ``reference/peers.md`` §3 (what the code does);
  Gupta et al., Shampoo, 2018; Vyas et al., SOAP, 2024.

Example:
  >>> import jax.numpy as jnp, stax
  >>> params = {"w": jnp.zeros((32, 16)), "b": jnp.zeros(16)}
  >>> tx = stax.scao(1e-3, warmup_steps=20, precond_freq=5, k_min=2, k_max=8)
  >>> state = tx.init(params)
  >>> stax.scao_diagnostics(state)["phase"]
  Array(0, dtype=int32)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from stax import _validation as V
from stax._trees import unwrap_variables
from stax.transforms import kron as K
from stax.transforms.adam import scale_by_adam
from stax.transforms.guards import gate_state, gated_chain, nonfinite_guard

__all__ = ["scao", "scao_diagnostics", "DEFAULT_MODE"]

DEFAULT_MODE = "lowrank"


def _cast_to_params():
  """Casts each update to its parameter's dtype (the seed: ``update.to(p.dtype)``)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      return updates, state
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def scao(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    warmup_steps: int = 100,
    precond_freq: int = 20,
    min_precond_updates: int = 2,
    rho: float = 0.999,
    epsilon_sparse: float = 0.05,
    k_min: int = 8,
    k_max: int = 128,
    tau: Optional[float] = 1.0,
    max_precond_dim: int = 4096,
    blend_steps: int = 50,
    *,
    mode: str = DEFAULT_MODE,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    dimension_numbers: K.DimensionNumbers = None,
    seed: int = 0,
    nonfinite: str = "skip",
    refresh: str = "owners",
) -> optax.GradientTransformationExtraArgs:
  """SCAO: Adam warm-up, then Kronecker curvature preconditioning under AdamW moments.

  Args:
    learning_rate: step size η >= 0 or a schedule (default 1e-3).
    b1: first-moment decay in [0, 1) (default 0.9).
    b2: second-moment decay in [0, 1) (default 0.999).
    eps: Adam denominator term >= 0 (default 1e-8).
    weight_decay: decoupled decay λ >= 0, multiplied by the learning rate (default 0.01).
    warmup_steps: Adam-only steps, int >= 0 (default 100).
    precond_freq: curvature update period in steps, int >= 1 (default 20).
    min_precond_updates: curvature updates required before preconditioning, int >= 0
      (default 2; ``lowrank`` uses at least 1).
    rho: curvature EMA decay per curvature update, in [0, 1) (default 0.999).
    epsilon_sparse: spectral mass the rank rule may leave out, in [0, 1) (default 0.05).
    k_min: smallest rank, int >= 1 (default 8; clamped to the matrix size).
    k_max: largest rank, int >= k_min (default 128; at most ``min(m, n)//2``).
    tau: natural-gradient norm clip > 0 or ``None`` (default 1.0; ``scao-0.2.4`` only). The
      norm is a leaf's: a stacked ``(L, d)`` bias or norm scale is clipped as one tensor (one
      norm over its layers; unstacked, each layer has its own), as a bias cannot be told
      from an attention bias ``(heads, head_dim)`` by its shape.
    max_precond_dim: ``scao-0.2.4``: block size of the block grid; ``lowrank``: matrices with a
      larger side use Adam alone; int >= 2 (default 4096).
    blend_steps: steps of the linear blend into preconditioning, int >= 0 (default 50).
    mode: ``"lowrank"`` (default, improved) or ``"scao-0.2.4"`` (faithful).
    mask: pytree or callable selecting the leaves that decay (default: all, as the seed).
    dimension_numbers: how a tensor becomes a matrix, any form of :mod:`stax.layout`: an int
      split axis (rows = the axes before it; ``1`` is the seed's ``(shape[0], -1)``, its view
      of torch tensors), a :class:`stax.MatrixDimensionNumbers` (rows and columns its
      reduction and output axes; other axes are batch axes: stacked matrices, each with its
      own factors), a tree of either, or a callable. Default ``None``: the layout every stax
      transform gives a JAX leaf (:func:`stax.layout.default_dimension_numbers`): a ``Dense``
      kernel itself, a Flax conv kernel ``(kh, kw, in, out)`` one ``kh·kw·in × out`` matrix,
      attention kernels ``(in, heads, dh)``/``(heads, dh, out)`` their matrix, stacked layers
      ``(L, in, out)`` L matrices; vectors and leaves named ``bias``/``scale`` (a Flax
      attention bias ``(heads, dh)``, stacked ``(L, d)`` biases) are one ``(1, n)`` row, as the
      seed sees a torch bias (the faithful mode's diagonal path; Adam alone in lowrank). (Until stop 53 the default was ``1`` but for attention kernels:
      a conv kernel was ``kh × kw·in·out``, stacked layers one ``L × in·out`` matrix.) The
      torch bridge passes torch's layouts (``(out, in·kh·kw)``, the seed's).
    seed: seed of the key of ``lowrank``'s randomized subspace iteration (default 0).
    nonfinite: ``"skip"`` (default), ``"error"`` or ``"ignore"``; see :func:`stax.nonfinite_guard`.
      Every part is gate-aware: a skipped step refreshes no factor and moves no counter.
    refresh: where the periodic curvature updates run on an explicit mesh: ``"owners"``
      (default: each matrix's ``eigh`` pair / subspace iteration once, on one device chosen to
      balance the work, and the factors gathered back; :mod:`stax.owners`) or ``"replicated"``
      (every device repeats every update). Same values up to float32 rounding; no effect off
      a mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; read its state with :func:`scao_diagnostics`.
    Parameters must be real floating-point (complex, integer and bool leaves raise
    ``TypeError`` at ``init``, naming the leaf); empty leaves get empty (no-op) updates. A
    gradient tree that does not match the parameters raises ``ValueError``. ``tau`` with
    ``mode="lowrank"`` and ``seed`` with ``mode="scao-0.2.4"`` have no effect: a non-default
    value gives a ``UserWarning``.
  """
  mask = V.check_mask("mask", mask)
  V.check_number("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  V.check_betas(b1=b1, b2=b2)
  V.check_number("eps", eps, low=0.0)
  V.check_number("weight_decay", weight_decay, low=0.0)
  V.check_choice("mode", mode, K.MODES)
  V.check_choice("refresh", refresh, K.REFRESHES)
  schedule = K.Schedule(warmup_steps, precond_freq, min_precond_updates, blend_steps)
  curvature = K.KronHyperparams(rho, epsilon_sparse, k_min, k_max, max_precond_dim, tau, eps)
  if mode == "lowrank":
    V.check_number("tau", tau, low=0.0, low_inclusive=False, allow_none=True)
    V.warn_no_effect("tau", tau, 1.0, "with mode='lowrank' (only mode='scao-0.2.4' clips)")
    precond = K.scale_by_kron_lowrank(schedule=schedule, hyperparams=curvature,
                                      dimension_numbers=dimension_numbers, seed=seed,
                                      refresh=refresh)
  else:
    V.warn_no_effect("seed", seed, 0, "with mode='scao-0.2.4' (it draws no random numbers)")
    precond = K.scale_by_kron_scao(schedule=schedule, hyperparams=curvature,
                                   dimension_numbers=dimension_numbers, refresh=refresh)
  tx = gated_chain(
      precond,
      scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.float32, nu_dtype=jnp.float32),
      gate_state(optax.add_decayed_weights(weight_decay, mask)),
      gate_state(optax.scale_by_learning_rate(learning_rate)),
      gate_state(_cast_to_params()),
  )
  return V.with_param_checks(nonfinite_guard(tx, nonfinite), optimizer="stax.scao")


def _find_kron_states(state: Any) -> list:
  """Every :class:`~stax.transforms.kron.ScaleByKronState` inside ``state``."""
  found = optax.tree_utils.tree_get_all_with_path(state, K.ScaleByKronState.__name__)
  return [x for _, x in found]


def scao_diagnostics(state: Any, params: Any = None, rho: float = 0.999) -> dict:
  """Phase, blend, rank per layer and curvature norm, read from a SCAO state (jit-friendly).

  Finds the SCAO preconditioner state anywhere inside ``state`` (through the non-finite guard,
  ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``..., and ``nnx.Optimizer``'s
  ``opt_state``, whose arrays are ``nnx.OptArray`` variables).

  Args:
    state: the optimizer state.
    params: optional parameter tree; when given, ``rank``/``curvature_norm`` are dicts keyed by
      the leaf path names (``"layer_0/kernel"``) instead of arrays in flatten order.
    rho: the curvature decay the optimizer was built with (for debiasing the norm).

  Returns:
    ``{"phase", "blend", "step", "curvature_updates", "rank", "curvature_norm"}`` — see
    :func:`stax.transforms.kron.kron_diagnostics`; ``rank`` is −1 for a leaf that Adam handles
    alone.

  Raises:
    ValueError: if ``state`` holds no SCAO preconditioner state.
  """
  found = _find_kron_states(unwrap_variables(state))   # nnx.Optimizer's OptArrays: their values
  if not found:
    raise ValueError("`state` contains no SCAO preconditioner state (ScaleByKronState).")
  diag = K.kron_diagnostics(found[0], rho)
  if params is not None:
    from stax.partition import leaf_names
    names = leaf_names(params)
    diag["rank"] = {n: diag["rank"][i] for i, n in enumerate(names)}
    diag["curvature_norm"] = {n: diag["curvature_norm"][i] for i, n in enumerate(names)}
  return diag
