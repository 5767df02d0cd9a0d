r"""Kronecker curvature preconditioners (SCAO): the faithful 0.2.4 rule and a low-rank one.

Both transforms turn the gradient :math:`G` of each matrix (m×n) into the gradient that SCAO
feeds to Adam's moments, after an Adam warm-up:

* **warm-up** — while ``step <= warmup_steps`` or fewer than ``min_precond_updates`` curvature
  updates have happened, :math:`g_{\rm eff} = G`;
* **preconditioned phase** — :math:`g_{\rm eff} = b\,\tilde G + (1-b)\,G` with the linear ramp
  :math:`b = \min(1, s/\text{blend\_steps})` (``s`` counts preconditioned steps);
* every ``precond_freq`` steps (``step % precond_freq == 0``), *after* the current gradient was
  preconditioned with the previous factors, the curvature EMAs take one step with decay
  ``rho``: :math:`L \leftarrow \rho L + (1-\rho) GG^\top`, :math:`R \leftarrow \rho R +
  (1-\rho) G^\top G`. The periodic work runs under ``lax.cond``; all shapes are static (the
  rank ``k`` is a masked prefix of ``k_max`` columns); nothing syncs with the host.

:func:`scale_by_kron_scao` (``mode="scao-0.2.4"``) is the algorithm of the ``scao`` 0.2.4
package: full m×m / n×n EMAs initialised at ``1e-4·I``, bias-corrected by ``1-rho^t``; Tikhonov
``max(1e-8, 1e-4·tr(D)/dim)``; a full ``eigh``; the rank is the smallest ``k`` whose eigenvalues
hold ``1 - epsilon_sparse`` of the spectral mass, clamped to ``[k_min', k_max']`` with
``k_min' = min(k_min, d)``, ``k_max' = min(k_max, d//2)`` if ``d > 2 k_min'`` else ``k_min'``
(``d = min(m, n)``), and moved by at most −1/+4 per update;

.. math::
  \tilde G = G + U_l\big((s_l^{-1/4} {s_r^{-1/4}}^\top - 1)\odot U_l^\top G U_r\big)U_r^\top,

then scaled by ``min(1, tau/‖g‖_nat)`` with :math:`\|g\|_{nat} = \|S_l^{-1/2} U_l^\top G U_r
S_r^{-1/2}\|_F`. Vectors and matrices with a side of 1 take the diagonal path
:math:`g/((d/(1-\rho^t))^{1/4} + 10^{-8})`; a matrix with a side above ``max_precond_dim`` is cut
into a grid of blocks of at most ``max_precond_dim`` (each block its own preconditioner, the clip
over all blocks); a tensor with ``ndim >= 3`` is seen as ``(shape[0], -1)`` like the seed (see
``dimension_numbers``). This is *not* scale invariant and *not* low-rank (see the module
:mod:`stax.optimizers.scao` and ``reference/peers.md`` §3).

:func:`scale_by_kron_lowrank` (``mode="lowrank"``) is the improved rule:

* **Low-rank for real.** Each side keeps only ``U`` (dim×K), ``S`` (K) and the EMA trace
  :math:`\tau = \mathrm{EMA}\,\|G\|_F^2` (``K = min(k_max, d//2)``). A curvature update is one
  warm-started randomized subspace iteration with Rayleigh–Ritz on the *implicit* EMA
  :math:`L' = \rho(U S U^\top + \sigma(I - UU^\top)) + (1-\rho)GG^\top`: ``Q = qr([U, GΩ])``,
  ``T = QᵀL'Q`` (2K×2K, formed from factors), ``eigh(T)``, keep the top K Ritz pairs. Memory is
  O((m+n)K) per matrix; no m×m or n×n array is ever formed; work is O(mnK).
* **The complement is the tail level.** The untracked eigenvalues are estimated by their mean,
  :math:`\sigma_k = (\tau - \sum_{i<k} S_i)/(\text{dim}-k)` (trace bookkeeping), so the
  preconditioner is the inverse fourth root of :math:`U S U^\top + \sigma_k(I - UU^\top)`: the
  complement is treated as the tail eigenvalue, not as an identity of unrelated scale.
  A relative Tikhonov term ``1e-4·tau/dim`` (the seed's) damps both.
* **Principled rank.** ``k`` (per side) is the smallest rank holding ``1 - epsilon_sparse`` of
  the spectral mass *above the tail level* :math:`\sum_i (S_i - \sigma_K)_+` — the directions
  where the preconditioner differs from its isotropic value. An isotropic floor or white noise
  gives ``k = k_min``, a rank-r signal gives ``k ≈ r``; no −1/+4 rate limit is needed.
* **Scale invariance, no LR compensation.** :math:`\tilde G = P(G)\,\|G\|_F/\|P(G)\|_F` (norm
  grafting). Every quantity above is homogeneous in the gradient scale, so :math:`\tilde G`
  scales exactly like :math:`G`; the blend mixes like-scaled gradients and the Adam moments
  carried over from the warm-up stay calibrated, so the step size after the warm-up needs no
  "1.17× LR" compensation. Gradients ×1e-3 and ×1e3 give the same updates up to Adam's ``eps``.
* Vectors and matrices with a side of 1 (and matrices whose larger side exceeds
  ``max_precond_dim``) are passed through: Adam's own diagonal scaling is their preconditioner.
  ``tau`` has no effect (the grafted norm already bounds the preconditioned gradient).

Under an explicit mesh, the gradient is replicated for the factor work (the small factors live
replicated) and the result is resharded like the gradient, so it equals the single-device result.

References:
  ``scao`` 0.2.4 (PyPI, ``whispering3/scao``), ``optimizer.py`` and ``preconditioner.py``.
  Gupta, Koren & Singer, `Shampoo <https://arxiv.org/abs/1802.09568>`_, 2018;
  Vyas et al., `SOAP <https://arxiv.org/abs/2409.11321>`_, 2024;
  Halko, Martinsson & Tropp, `Finding structure with randomness
  <https://arxiv.org/abs/0909.4061>`_, 2011 (randomized subspace iteration).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from stax import _sharding as _sh
from stax import _validation as V
from stax import numerics as num

__all__ = [
    "MODES",
    "ScaleByKronState",
    "KronBlockState",
    "DiagBlockState",
    "BlockGridState",
    "LowRankState",
    "scale_by_kron_scao",
    "scale_by_kron_lowrank",
    "kron_diagnostics",
]

MODES = ("scao-0.2.4", "lowrank")
_EYE_EPS = 1e-4       # the seed's initial L = R = 1e-4·I
_EPS = 1e-8           # the seed's numerical floors (regulariser, clamps)
# A gradient block whose Frobenius norm exceeds this (2**61) enters the curvature EMAs scaled down
# to it (stax.numerics.saturate_norm), so every EMA entry, trace and Ritz value stays below
# 2**122: sums of a few of them, the debiasing and eigh stay finite. Never reached in practice.
_STAT_BOUND = num.square_bound(jnp.float32, terms=16)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class KronBlockState(NamedTuple):
  """Faithful Kronecker block: full EMAs and the top-``k_max'`` eigenpairs (float32).

  Attributes:
    L: (m, m) left curvature EMA.  R: (n, n) right curvature EMA.
    U_l: (m, K) eigenvectors.  S_l: (K,) eigenvalues (descending).  U_r, S_r: right side.
    k: int32 scalar, the active rank (columns ``>= k`` are masked).
  """

  L: jax.Array
  R: jax.Array
  U_l: jax.Array
  S_l: jax.Array
  U_r: jax.Array
  S_r: jax.Array
  k: jax.Array


class DiagBlockState(NamedTuple):
  """Faithful diagonal path: the EMA of g² over the 2-D view of the block (float32)."""

  ema: jax.Array


class BlockGridState(NamedTuple):
  """Faithful block-diagonal path: one state per block of the grid, row-major."""

  blocks: tuple


class LowRankState(NamedTuple):
  """Low-rank factors of one matrix: O((m+n)·K) floats, no m×m or n×n array.

  Attributes:
    U_l: (m, K) left Ritz vectors.  S_l: (K,) left Ritz values of the (un-debiased) EMA.
    U_r: (n, K), S_r: (K,): right side.
    trace: float32 scalar, the EMA of ‖G‖_F² (= tr L = tr R).
    k: int32[2], the active ranks (left, right).
  """

  U_l: jax.Array
  S_l: jax.Array
  U_r: jax.Array
  S_r: jax.Array
  trace: jax.Array
  k: jax.Array


class ScaleByKronState(NamedTuple):
  """State of the SCAO preconditioners.

  Attributes:
    count: int32, steps taken.
    precond_count: int32, curvature updates taken.
    phase2_count: int32, preconditioned steps taken (0 during the warm-up).
    blend: float32, the blend weight ``b`` of the last step (0 during the warm-up).
    key: raw ``uint32[2]`` key of the randomized subspace iteration (``lowrank``), else ``None``.
    leaves: one entry per gradient leaf, in flatten order (``optax.EmptyState()`` for a leaf
      that is passed through).
  """

  count: jax.Array
  precond_count: jax.Array
  phase2_count: jax.Array
  blend: jax.Array
  key: Any
  leaves: tuple


# --------------------------------------------------------------------------------------------
# Shapes: the 2-D view of a leaf and its plan
# --------------------------------------------------------------------------------------------

DimensionNumbers = Union[None, int, Any, Callable[[Any], Any]]


def _split_axis(dn: Optional[int], ndim: int) -> int:
  if ndim <= 1:
    return 0
  if dn is None:
    return 1
  s = int(dn)
  if s < 0:
    s += ndim
  if not 1 <= s <= ndim - 1:
    raise ValueError(f"`dimension_numbers`: split axis {dn} is out of range for ndim {ndim}.")
  return s


def _default_split(path: Any, shape: tuple) -> Any:
  """The split axis used when ``dimension_numbers`` is ``None``: the seed's ``1``
  (``(shape[0], -1)``, torch's ``(out, in·kh·kw)``), except that a leaf named ``bias`` is never
  a matrix (``"pass"``: Adam alone; attention biases are ``(heads, head_dim)``) and a Flax
  attention projection is split where its matrix view is: ``query``/``key``/``value``
  ``(in, heads, dh)`` after axis 1, ``out`` ``(heads, dh, out)`` after axis 2 (see
  :func:`stax.transforms.orthogonalize.default_dimension_numbers`; leading stacked-layer axes
  cannot be a split, so such leaves are passed to Adam alone)."""
  from stax.transforms import orthogonalize as O  # pylint: disable=g-import-not-at-top
  from stax import partition  # pylint: disable=g-import-not-at-top
  parts = partition.normalize_path(path)
  if len(shape) >= 2 and parts and parts[-1] in O.NEVER_MATRICES:
    return "pass"
  module = parts[-2] if len(parts) >= 2 else ""
  if len(shape) >= 3 and module in O.ATTENTION_IN_PROJECTIONS + O.ATTENTION_OUT_PROJECTIONS:
    d = O.default_dimension_numbers(path, shape)
    red = O._axes(d.reduction_axis, len(shape))  # pylint: disable=protected-access
    out = O._axes(d.output_axis, len(shape))  # pylint: disable=protected-access
    if red + out != tuple(range(len(shape))):
      return "pass"
    return len(red)
  return None


def _view_shape(shape: tuple, split: int) -> tuple[int, int]:
  """(m, n) of the matrix view: 0-/1-D → (1, n); else rows = prod(shape[:split])."""
  if len(shape) == 0:
    return (1, 1)
  if len(shape) == 1:
    return (1, int(shape[0]))
  return (int(np.prod(shape[:split])), int(np.prod(shape[split:])))


def _chunks(d: int, maxd: int) -> list[int]:
  if d <= maxd:
    return [d]
  out = [maxd] * (d // maxd)
  if d % maxd:
    out.append(d % maxd)
  return out


def _faithful_ranks(m: int, n: int, k_min: int, k_max: int) -> tuple[int, int]:
  d = min(m, n)
  kmin = min(k_min, d)
  kmax = min(k_max, d // 2) if d > 2 * kmin else kmin
  return kmin, kmax


def _lowrank_ranks(m: int, n: int, k_min: int, k_max: int) -> tuple[int, int]:
  big_k = max(1, min(k_max, min(m, n) // 2))
  return min(k_min, big_k), big_k


@dataclasses.dataclass(frozen=True)
class _Plan:
  kind: str            # "pass", "diag", "kron", "grid", "lowrank"
  m: int = 1
  n: int = 1
  rows: tuple = ()     # grid row chunks
  cols: tuple = ()     # grid col chunks
  kmin: int = 0
  kmax: int = 0


def _faithful_plan(m: int, n: int, k_min: int, k_max: int, maxd: int) -> _Plan:
  if m * n == 0:  # an empty leaf: nothing to precondition (Adam gives it an empty update)
    return _Plan("pass", m, n)
  if m == 1 or n == 1:
    return _Plan("diag", m, n)
  if max(m, n) > maxd:
    return _Plan("grid", m, n, tuple(_chunks(m, maxd)), tuple(_chunks(n, maxd)))
  kmin, kmax = _faithful_ranks(m, n, k_min, k_max)
  return _Plan("kron", m, n, kmin=kmin, kmax=kmax)


def _lowrank_plan(m: int, n: int, k_min: int, k_max: int, maxd: int) -> _Plan:
  if m * n == 0 or m == 1 or n == 1 or max(m, n) > maxd:
    return _Plan("pass", m, n)
  kmin, kmax = _lowrank_ranks(m, n, k_min, k_max)
  return _Plan("lowrank", m, n, kmin=kmin, kmax=kmax)


def _state_fits(plan: _Plan, st: Any) -> bool:
  """Whether a leaf state was built for a leaf with this plan (same kind and 2-D view)."""
  if plan.kind == "pass":
    return isinstance(st, optax.EmptyState)
  if plan.kind == "lowrank":
    return (isinstance(st, LowRankState) and st.U_l.shape[0] == plan.m
            and st.U_r.shape[0] == plan.n)
  if plan.kind == "diag":
    return isinstance(st, DiagBlockState) and tuple(st.ema.shape) == (plan.m, plan.n)
  if plan.kind == "kron":
    return (isinstance(st, KronBlockState) and tuple(st.L.shape) == (plan.m, plan.m)
            and tuple(st.R.shape) == (plan.n, plan.n))
  return (isinstance(st, BlockGridState)
          and len(st.blocks) == len(plan.rows) * len(plan.cols))


def _check_leaves_match(g_leaves: list, leaf_plans: list, leaf_states: tuple) -> None:
  """ValueError unless the gradient leaves are those the state was initialised with."""
  if len(g_leaves) != len(leaf_states):
    raise ValueError(
        f"scao: the gradient tree does not match the params tree the state was initialised "
        f"with ({len(g_leaves)} gradient leaves, {len(leaf_states)} parameter leaves).")
  for i, (g, (_, plan), st) in enumerate(zip(g_leaves, leaf_plans, leaf_states)):
    if not _state_fits(plan, st):
      raise ValueError(
          f"scao: the gradient tree does not match the params tree the state was initialised "
          f"with (gradient leaf {i} in flatten order, of shape {tuple(np.shape(g))}, does not "
          f"fit the state of parameter leaf {i}).")


def _resolve_dims(dimension_numbers: DimensionNumbers, tree: Any) -> list:
  leaves = jax.tree.leaves(tree)
  if dimension_numbers is None or isinstance(dimension_numbers, int):
    return [dimension_numbers] * len(leaves)
  dn = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
  treedef = jax.tree.structure(tree)
  return treedef.flatten_up_to(dn)


# --------------------------------------------------------------------------------------------
# Sharding helpers: factor work runs replicated, results go back to the gradient's sharding
# --------------------------------------------------------------------------------------------


def _replicate(x):
  """``x`` replicated over its explicit mesh, and the sharding to restore (None: unsharded)."""
  spec = _sh.explicit_spec(x)
  if spec is None:
    return x, None
  return _sh.reshard(x, ()), _sh.named(x, spec)


def _restore(x, sharding):
  return x if sharding is None else jax.reshard(x, sharding)


# --------------------------------------------------------------------------------------------
# Faithful (scao 0.2.4) blocks
# --------------------------------------------------------------------------------------------


def _kron_init(m: int, n: int, kmin: int, kmax: int) -> KronBlockState:
  f32 = jnp.float32
  return KronBlockState(
      L=jnp.eye(m, dtype=f32) * _EYE_EPS, R=jnp.eye(n, dtype=f32) * _EYE_EPS,
      U_l=jnp.eye(m, kmax, dtype=f32), S_l=jnp.ones((kmax,), f32),
      U_r=jnp.eye(n, kmax, dtype=f32), S_r=jnp.ones((kmax,), f32),
      k=jnp.asarray(kmin, jnp.int32))


def _mask(kmax: int, k) -> jax.Array:
  return (jnp.arange(kmax) < k).astype(jnp.float32)


def _kron_apply(st: KronBlockState, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(preconditioned block, natural-norm² of the block)."""
  kmax = st.S_l.shape[0]
  mk = _mask(kmax, st.k)
  s_l = jnp.maximum(st.S_l, _EPS)
  s_r = jnp.maximum(st.S_r, _EPS)
  p = (st.U_l.T @ g) @ st.U_r
  outer = jnp.outer(s_l ** -0.25, s_r ** -0.25)
  delta = (outer - 1.0) * p * jnp.outer(mk, mk)
  out = g + (st.U_l @ delta) @ st.U_r.T
  nat = jnp.outer(s_l ** -0.5, s_r ** -0.5) * p * jnp.outer(mk, mk)
  return out, jnp.sum(nat * nat)


def _eig_desc(ema, bias, dim):
  d = ema / jnp.maximum(bias, _EPS)
  lam = jnp.maximum(_EPS, 1e-4 * jnp.trace(d) / dim)
  w, v = jnp.linalg.eigh(d + lam * jnp.eye(dim, dtype=d.dtype), UPLO="L",
                         symmetrize_input=False)
  return jnp.maximum(w[::-1], 0.0), v[:, ::-1]


def _spectral_rank(w, eps_sparse, kmin, kmax):
  """The seed's ``adaptive_rank``: smallest k with cumsum >= (1-eps)·total, clamped."""
  total = jnp.sum(w)
  cum = jnp.cumsum(w)
  k = jnp.minimum(jnp.sum(cum < (1.0 - eps_sparse) * total) + 1, w.shape[0])
  k = jnp.where(total < 1e-12, kmin, k)
  return jnp.clip(k, kmin, kmax).astype(jnp.int32)


def _kron_update(st: KronBlockState, g, rho, bias, eps_sparse, kmin, kmax) -> KronBlockState:
  m, n = g.shape
  g = num.saturate_norm(g, _STAT_BOUND)
  L = rho * st.L + (1.0 - rho) * (g @ g.T)
  R = rho * st.R + (1.0 - rho) * (g.T @ g)
  wl, vl = _eig_desc(L, bias, m)
  wr, vr = _eig_desc(R, bias, n)
  k_new = jnp.minimum(_spectral_rank(wl, eps_sparse, kmin, kmax),
                      _spectral_rank(wr, eps_sparse, kmin, kmax))
  k_new = jnp.maximum(k_new, st.k - 1)
  k_new = jnp.minimum(k_new, st.k + 4)
  k_new = jnp.clip(k_new, kmin, kmax).astype(jnp.int32)
  return KronBlockState(L=L.astype(jnp.float32), R=R.astype(jnp.float32),
                        U_l=vl[:, :kmax], S_l=wl[:kmax], U_r=vr[:, :kmax], S_r=wr[:kmax],
                        k=k_new)


def _diag_apply(st: DiagBlockState, g, bias, eps):
  d = st.ema / bias
  out = g / (d ** 0.25 + 1e-8)
  nat = jnp.sum(g * g / (jnp.sqrt(d) + eps))
  return out, nat


def _diag_update(st: DiagBlockState, g, rho) -> DiagBlockState:
  return DiagBlockState(rho * st.ema + (1.0 - rho) * g * g)


def _grid_slices(plan: _Plan):
  r0 = 0
  for bs in plan.rows:
    c0 = 0
    for cs in plan.cols:
      yield (r0, bs, c0, cs)
      c0 += cs
    r0 += bs


def _faithful_leaf_init(plan: _Plan, k_min, k_max):
  if plan.kind == "diag":
    return DiagBlockState(jnp.zeros((plan.m, plan.n), jnp.float32))
  if plan.kind == "kron":
    return _kron_init(plan.m, plan.n, plan.kmin, plan.kmax)
  blocks = []
  for (_, bs, _, cs) in _grid_slices(plan):
    if bs == 1 or cs == 1:
      blocks.append(DiagBlockState(jnp.zeros((bs, cs), jnp.float32)))
    else:
      kmin, kmax = _faithful_ranks(bs, cs, k_min, k_max)
      blocks.append(_kron_init(bs, cs, kmin, kmax))
  return BlockGridState(tuple(blocks))


def _faithful_leaf_apply(plan, st, g, diag_bias, eps):
  if plan.kind == "diag":
    return _diag_apply(st, g, diag_bias, eps)
  if plan.kind == "kron":
    return _kron_apply(st, g)
  nat = 0.0
  out_rows = []
  idx = 0
  r0 = 0
  for bs in plan.rows:
    c0 = 0
    row = []
    for cs in plan.cols:
      blk = st.blocks[idx]
      gb = g[r0:r0 + bs, c0:c0 + cs]
      if isinstance(blk, DiagBlockState):
        o, s = _diag_apply(blk, gb, diag_bias, eps)
      else:
        o, s = _kron_apply(blk, gb)
      row.append(o)
      nat = nat + s
      idx += 1
      c0 += cs
    out_rows.append(jnp.concatenate(row, axis=1) if len(row) > 1 else row[0])
    r0 += bs
  out = jnp.concatenate(out_rows, axis=0) if len(out_rows) > 1 else out_rows[0]
  return out, nat


def _faithful_leaf_update(plan, st, g, rho, bias, eps_sparse, k_min, k_max):
  if plan.kind == "diag":
    return _diag_update(st, g, rho)
  if plan.kind == "kron":
    return _kron_update(st, g, rho, bias, eps_sparse, plan.kmin, plan.kmax)
  new = []
  for blk, (r0, bs, c0, cs) in zip(st.blocks, _grid_slices(plan)):
    gb = g[r0:r0 + bs, c0:c0 + cs]
    if isinstance(blk, DiagBlockState):
      new.append(_diag_update(blk, gb, rho))
    else:
      kmin, kmax = _faithful_ranks(bs, cs, k_min, k_max)
      new.append(_kron_update(blk, gb, rho, bias, eps_sparse, kmin, kmax))
  return BlockGridState(tuple(new))


# --------------------------------------------------------------------------------------------
# Low-rank blocks
# --------------------------------------------------------------------------------------------


def _lowrank_init(m: int, n: int, kmin: int, kmax: int) -> LowRankState:
  f32 = jnp.float32
  return LowRankState(U_l=jnp.eye(m, kmax, dtype=f32), S_l=jnp.zeros((kmax,), f32),
                      U_r=jnp.eye(n, kmax, dtype=f32), S_r=jnp.zeros((kmax,), f32),
                      trace=jnp.zeros([], f32), k=jnp.full((2,), kmin, jnp.int32))


def _tail(trace, s, dim):
  """Mean of the untracked eigenvalues: (trace − Σ tracked)/(dim − K), >= 0."""
  big_k = s.shape[0]
  return jnp.maximum(trace - jnp.sum(s), 0.0) / max(dim - big_k, 1)


def _track(u, s, trace_old, gs, rho, omega):
  """One warm-started randomized subspace iteration + Rayleigh–Ritz on the implicit EMA.

  ``omega`` is a Gaussian test matrix (other_dim × K).
  """
  dim, big_k = u.shape
  sigma = _tail(trace_old, s, dim)
  q, _ = jnp.linalg.qr(jnp.concatenate([u, gs @ omega], axis=1))
  a = q.T @ u
  b = q.T @ gs
  eye = jnp.eye(q.shape[1], dtype=jnp.float32)
  t = rho * ((a * s) @ a.T + sigma * (eye - a @ a.T)) + (1.0 - rho) * (b @ b.T)
  t = 0.5 * (t + t.T)
  w, v = jnp.linalg.eigh(t)
  w = w[::-1][:big_k]
  v = v[:, ::-1][:, :big_k]
  return q @ v, jnp.maximum(w, 0.0)


def _excess_rank(s, trace, dim, eps_sparse, kmin):
  """Smallest k holding (1 − eps) of the spectral mass above the tail level."""
  big_k = s.shape[0]
  excess = jnp.maximum(s - _tail(trace, s, dim), 0.0)
  total = jnp.sum(excess)
  cum = jnp.cumsum(excess)
  k = jnp.minimum(jnp.sum(cum < (1.0 - eps_sparse) * total) + 1, big_k)
  k = jnp.where(total <= 1e-6 * jnp.maximum(trace, 0.0) + 1e-30, kmin, k)
  return jnp.clip(k, kmin, big_k).astype(jnp.int32)


def _lowrank_update(st: LowRankState, g, rho, eps_sparse, kmin, noise) -> LowRankState:
  """``noise``: flat Gaussian draws, (n + m)·K of them (one draw per update for all leaves)."""
  m, n = g.shape
  big_k = st.S_l.shape[0]
  omega_l = noise[:n * big_k].reshape(n, big_k)
  omega_r = noise[n * big_k:(n + m) * big_k].reshape(m, big_k)
  g = num.saturate_norm(g, _STAT_BOUND)
  trace = rho * st.trace + (1.0 - rho) * jnp.sum(g * g)
  u_l, s_l = _track(st.U_l, st.S_l, st.trace, g, rho, omega_l)
  u_r, s_r = _track(st.U_r, st.S_r, st.trace, g.T, rho, omega_r)
  k = jnp.stack([_excess_rank(s_l, trace, m, eps_sparse, kmin),
                 _excess_rank(s_r, trace, n, eps_sparse, kmin)])
  return LowRankState(U_l=u_l, S_l=s_l, U_r=u_r, S_r=s_r, trace=trace.astype(jnp.float32), k=k)


def _side_gain(s, k, trace, dim):
  """(α − 1) per tracked direction: α = ((S_i+λ)/(σ_k+λ))^(-1/4) for i < k, else 1."""
  big_k = s.shape[0]
  mk = jnp.arange(big_k) < k
  head = jnp.sum(jnp.where(mk, s, 0.0))
  sigma_k = jnp.maximum(trace - head, 0.0) / jnp.maximum(dim - k, 1).astype(jnp.float32)
  lam = 1e-4 * trace / dim
  den = sigma_k + lam
  ok = den > 0
  alpha = jnp.where(ok, ((s + lam) / jnp.where(ok, den, 1.0)) ** -0.25, 1.0)
  alpha = jnp.where(ok, jnp.maximum(alpha, 0.0), 1.0)
  return jnp.where(mk, alpha - 1.0, 0.0)


def lowrank_precondition(st: LowRankState, g: jax.Array) -> jax.Array:
  """:math:`(I + U_l D_l U_l^\\top)\\,G\\,(I + U_r D_r U_r^\\top)`, grafted to ‖G‖_F."""
  m, n = g.shape
  d_l = _side_gain(st.S_l, st.k[0], st.trace, m)
  d_r = _side_gain(st.S_r, st.k[1], st.trace, n)
  a = st.U_l.T @ g                       # K × n
  b = g @ st.U_r                         # m × K
  c = a @ st.U_r                         # K × K
  out = (g + st.U_l @ (d_l[:, None] * a) + (b * d_r[None, :]) @ st.U_r.T
         + st.U_l @ ((d_l[:, None] * c * d_r[None, :]) @ st.U_r.T))
  gn = num.norm(g)                       # overflow-safe; bit-identical for ordinary g
  on = num.norm(out)
  ok = on > 0
  return jnp.where(ok, out * (gn / jnp.where(ok, on, 1.0)), g)


# --------------------------------------------------------------------------------------------
# The transforms
# --------------------------------------------------------------------------------------------


def _validate(warmup_steps, precond_freq, min_precond_updates, rho, epsilon_sparse, k_min,
              k_max, tau, max_precond_dim, blend_steps):
  V.check_int("warmup_steps", warmup_steps, low=0)
  V.check_int("precond_freq", precond_freq, low=1)
  V.check_int("min_precond_updates", min_precond_updates, low=0)
  V.check_int("blend_steps", blend_steps, low=0)
  V.check_int("k_min", k_min, low=1)
  V.check_int("k_max", k_max, low=1)
  V.check_int("max_precond_dim", max_precond_dim, low=2)
  if k_max < k_min:
    raise ValueError(f"`k_max` must be >= `k_min` (= {k_min}), got {k_max}.")
  V.check_betas(rho=rho)
  V.check_number("epsilon_sparse", epsilon_sparse, low=0.0, high=1.0, high_inclusive=False)
  V.check_number("tau", tau, low=0.0, low_inclusive=False, allow_none=True)


def _as_2d(g, split):
  m, n = _view_shape(g.shape, split)
  return g.reshape(m, n).astype(jnp.float32)


def _scale_by_kron(mode, warmup_steps, precond_freq, min_precond_updates, rho, epsilon_sparse,
                   k_min, k_max, tau, max_precond_dim, blend_steps, eps, dimension_numbers,
                   seed):
  V.check_choice("mode", mode, MODES)
  _validate(warmup_steps, precond_freq, min_precond_updates, rho, epsilon_sparse, k_min, k_max,
            tau, max_precond_dim, blend_steps)
  V.check_number("eps", eps, low=0.0)
  if not isinstance(seed, jax.Array):  # inject_hyperparams passes defaults as arrays
    V.check_int("seed", seed)
  lowrank = mode == "lowrank"

  def plans(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    dims = _resolve_dims(dimension_numbers, tree)
    out = []
    for (path, x), dn in zip(flat, dims):
      shape = tuple(np.shape(x))
      if dimension_numbers is None:
        dn = _default_split(path, shape)
        if dn == "pass":
          out.append((1, _Plan("pass", *_view_shape(shape, min(1, len(shape))))))
          continue
      split = _split_axis(dn, len(shape))
      m, n = _view_shape(shape, split)
      if lowrank:
        out.append((split, _lowrank_plan(m, n, k_min, k_max, max_precond_dim)))
      else:
        out.append((split, _faithful_plan(m, n, k_min, k_max, max_precond_dim)))
    return out

  def init_fn(params):
    leaf_states = []
    for _, plan in plans(params):
      if plan.kind == "pass":
        leaf_states.append(optax.EmptyState())
      elif plan.kind == "lowrank":
        leaf_states.append(_lowrank_init(plan.m, plan.n, plan.kmin, plan.kmax))
      else:
        leaf_states.append(_faithful_leaf_init(plan, k_min, k_max))
    key = jax.random.key_data(jax.random.PRNGKey(seed)) if lowrank else None
    zero = lambda: jnp.zeros([], jnp.int32)  # distinct buffers (donation)
    return ScaleByKronState(count=zero(), precond_count=zero(), phase2_count=zero(),
                            blend=jnp.zeros([], jnp.float32), key=key,
                            leaves=tuple(leaf_states))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    g_leaves, treedef = jax.tree.flatten(updates)
    leaf_plans = plans(updates)
    _check_leaves_match(g_leaves, leaf_plans, state.leaves)
    count = numerics.safe_increment(state.count)
    min_pu = jnp.maximum(min_precond_updates, 1) if lowrank else min_precond_updates
    in_warmup = (count <= warmup_steps) | (state.precond_count < min_pu)
    phase2 = jnp.where(in_warmup, state.phase2_count, numerics.safe_increment(state.phase2_count))
    bsteps = jnp.asarray(blend_steps)
    blend = jnp.where(bsteps > 0,
                      jnp.minimum(1.0, phase2.astype(jnp.float32)
                                  / jnp.maximum(bsteps, 1).astype(jnp.float32)), 1.0)
    blend = jnp.where(in_warmup, 0.0, blend).astype(jnp.float32)
    do_update = (count % precond_freq) == 0
    t_next = (state.precond_count + 1).astype(jnp.float32)
    bias_next = 1.0 - jnp.asarray(rho, jnp.float32) ** t_next
    diag_bias = jnp.maximum(
        1.0 - jnp.asarray(rho, jnp.float32) ** state.precond_count.astype(jnp.float32), 1e-8)

    mats, specs = [], []
    for g, (split, plan) in zip(g_leaves, leaf_plans):
      if plan.kind == "pass":
        mats.append(None)
        specs.append(None)
        continue
      g_rep, spec = _replicate(g)   # replicate first: reshaping a sharded leaf may not be legal
      # Entries beyond ±2**63 act as ±2**63 (as in the Adam core that follows): every product
      # and square below stays finite for any finite gradient; below the bound, bit for bit.
      g2 = num.saturate(_as_2d(g_rep, split))
      mats.append(g2)
      specs.append(spec)

    # 1) Precondition with the current factors (the seed updates curvature afterwards).
    out = []
    for g, g2, spec, st, (split, plan) in zip(g_leaves, mats, specs, state.leaves, leaf_plans):
      if plan.kind == "pass":
        out.append(g)
        continue
      if plan.kind == "lowrank":
        gp = lowrank_precondition(st, g2)
      else:
        gp, nat_sq = _faithful_leaf_apply(plan, st, g2, diag_bias, eps)
        if tau is not None:
          nat = jnp.sqrt(nat_sq)
          gp = jnp.where(nat > tau, gp * (tau / jnp.maximum(nat, eps)), gp)
        # The seed casts the preconditioned gradient to the gradient dtype, then back.
        gp = gp.astype(g.dtype).astype(jnp.float32)
      eff = blend * gp + (1.0 - blend) * g2
      eff = jnp.where(in_warmup, g2, eff)
      eff = _restore(eff.reshape(g.shape), spec)
      out.append(eff)

    # 2) Periodic curvature update under lax.cond.
    key = state.key
    step_key = None if key is None else jax.random.fold_in(key, state.count)

    def do(leaves_state):
      sizes = [(p.m + p.n) * p.kmax if p.kind == "lowrank" else 0 for _, p in leaf_plans]
      noise = (jax.random.normal(step_key, (sum(sizes),), jnp.float32) if sum(sizes)
               else None)
      new, off = [], 0
      for i, (g2, st, (split, plan)) in enumerate(zip(mats, leaves_state, leaf_plans)):
        if plan.kind == "pass":
          new.append(st)
        elif plan.kind == "lowrank":
          new.append(_lowrank_update(st, g2, rho, epsilon_sparse, plan.kmin,
                                     noise[off:off + sizes[i]]))
          off += sizes[i]
        else:
          new.append(_faithful_leaf_update(plan, st, g2, rho, bias_next, epsilon_sparse,
                                           k_min, k_max))
      return tuple(new)

    def skip(leaves_state):
      return tuple(leaves_state)

    new_leaves = jax.lax.cond(do_update, do, skip, state.leaves)
    new_leaves = jax.tree.map(lambda n, o: n.astype(o.dtype), new_leaves, state.leaves)
    precond_count = jnp.where(do_update, numerics.safe_increment(state.precond_count),
                              state.precond_count)
    new_state = ScaleByKronState(count=count, precond_count=precond_count, phase2_count=phase2,
                                 blend=blend, key=key, leaves=new_leaves)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_kron_scao(
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
    eps: float = 1e-8,
    *,
    dimension_numbers: DimensionNumbers = None,
) -> optax.GradientTransformationExtraArgs:
  """The faithful ``scao`` 0.2.4 preconditioner (see the module docstring).

  Args:
    warmup_steps: Adam warm-up steps, int >= 0 (default 100).
    precond_freq: curvature update period, int >= 1 (default 20).
    min_precond_updates: curvature updates needed before preconditioning, int >= 0 (default 2).
    rho: curvature EMA decay in [0, 1) (default 0.999).
    epsilon_sparse: spectral mass left out by the rank rule, in [0, 1) (default 0.05).
    k_min: smallest rank, int >= 1 (default 8).
    k_max: largest rank, int >= k_min (default 128).
    tau: natural-gradient norm clip > 0, or ``None`` for no clip (default 1.0).
    max_precond_dim: block size above which a matrix is cut into blocks, int >= 2 (default 4096).
    blend_steps: length of the linear blend, int >= 0 (default 50; 0 = no blend).
    eps: Adam's eps, used as a floor by the clip, >= 0 (default 1e-8).
    dimension_numbers: how a tensor becomes a matrix: the split axis ``s`` (rows =
      ``prod(shape[:s])``), as an int, a pytree of ints or a callable ``params -> pytree``;
      default ``None`` = 1, the seed's ``(shape[0], -1)`` (use ``-1`` for Flax conv kernels).
  """
  return _scale_by_kron("scao-0.2.4", warmup_steps, precond_freq, min_precond_updates, rho,
                        epsilon_sparse, k_min, k_max, tau, max_precond_dim, blend_steps, eps,
                        dimension_numbers, 0)


def scale_by_kron_lowrank(
    warmup_steps: int = 100,
    precond_freq: int = 20,
    min_precond_updates: int = 2,
    rho: float = 0.999,
    epsilon_sparse: float = 0.05,
    k_min: int = 8,
    k_max: int = 128,
    max_precond_dim: int = 4096,
    blend_steps: int = 50,
    *,
    dimension_numbers: DimensionNumbers = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """The low-rank, scale-invariant preconditioner (see the module docstring).

  Arguments as :func:`scale_by_kron_scao` (``min_precond_updates`` is at least 1 here), plus
  ``seed`` (int) for the key of the randomized subspace iteration kept in the state.
  """
  return _scale_by_kron("lowrank", warmup_steps, precond_freq, min_precond_updates, rho,
                        epsilon_sparse, k_min, k_max, None, max_precond_dim, blend_steps, 1e-8,
                        dimension_numbers, seed)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def _leaf_diag(st, rho_bias):
  """(rank, curvature norm) of one leaf state; rank -1 and norm 0 for a passed-through leaf."""
  if isinstance(st, KronBlockState):
    return st.k, jnp.sqrt(jnp.sum(st.L * st.L)) / rho_bias
  if isinstance(st, DiagBlockState):
    return jnp.asarray(1, jnp.int32), jnp.sqrt(jnp.sum(st.ema * st.ema)) / rho_bias
  if isinstance(st, BlockGridState):
    ks, ns = zip(*[_leaf_diag(b, rho_bias) for b in st.blocks])
    ks = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks])
    return (jnp.sum(ks) // len(ks)).astype(jnp.int32), jnp.sqrt(sum(n * n for n in ns))
  if isinstance(st, LowRankState):
    m = st.U_l.shape[0]
    sigma = _tail(st.trace, st.S_l, m)
    norm = jnp.sqrt(jnp.sum(st.S_l ** 2) + (m - st.S_l.shape[0]) * sigma ** 2)
    return jnp.max(st.k).astype(jnp.int32), norm / rho_bias
  return jnp.asarray(-1, jnp.int32), jnp.zeros([], jnp.float32)


def kron_diagnostics(state: ScaleByKronState, rho: float = 0.999) -> dict:
  """Phase, blend, ranks and curvature norms of a :class:`ScaleByKronState` (jit-friendly).

  Returns a dict of arrays: ``phase`` (int32, 0 warm-up / 1 preconditioned), ``blend``,
  ``step``, ``curvature_updates``, ``rank`` (int32 per leaf in flatten order; −1 where a leaf is
  passed through; the mean over blocks for a block grid; the larger side's rank in ``lowrank``)
  and ``curvature_norm`` (float32 per leaf: Frobenius norm of the debiased left factor).
  """
  t = state.precond_count.astype(jnp.float32)
  bias = jnp.maximum(1.0 - jnp.asarray(rho, jnp.float32) ** t, 1e-8)
  pairs = [_leaf_diag(st, bias) for st in state.leaves]
  ranks = jnp.stack([jnp.asarray(p[0], jnp.int32) for p in pairs]) if pairs else jnp.zeros(
      (0,), jnp.int32)
  norms = jnp.stack([jnp.asarray(p[1], jnp.float32) for p in pairs]) if pairs else jnp.zeros(
      (0,), jnp.float32)
  return {
      "phase": (state.phase2_count > 0).astype(jnp.int32),
      "blend": state.blend,
      "step": state.count,
      "curvature_updates": state.precond_count,
      "rank": ranks,
      "curvature_norm": norms,
  }
