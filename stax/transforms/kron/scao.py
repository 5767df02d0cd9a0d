r"""The faithful ``scao`` 0.2.4 curvature rule: Kronecker, diagonal and block-grid leaves.

Per matrix view ``m×n`` of a leaf (float32 throughout, as the seed):

* **Kronecker block** (both sides > 1, no side above ``max_precond_dim``): full m×m / n×n EMAs
  initialised at ``1e-4·I``, :math:`L \leftarrow \rho L + (1-\rho) GG^\top`,
  :math:`R \leftarrow \rho R + (1-\rho) G^\top G`, bias-corrected by ``1-rho^t``; Tikhonov
  ``max(1e-8, 1e-4·tr(D)/dim)``; a full ``eigh``; the rank is the smallest ``k`` whose
  eigenvalues hold ``1 - epsilon_sparse`` of the spectral mass, clamped to
  ``[k_min', k_max']`` with ``k_min' = min(k_min, d)``, ``k_max' = min(k_max, d//2)`` if
  ``d > 2 k_min'`` else ``k_min'`` (``d = min(m, n)``), and moved by at most −1/+4 per update;

  .. math::
    \tilde G = G + U_l\big((s_l^{-1/4} {s_r^{-1/4}}^\top - 1)\odot U_l^\top G U_r\big)U_r^\top;

* **diagonal path** (vectors, a side of 1): :math:`g/((d/(1-\rho^t))^{1/4} + 10^{-8})` with
  ``d`` the EMA of ``g²``;
* **block grid** (a side above ``max_precond_dim``): blocks of at most ``max_precond_dim``,
  each its own Kronecker or diagonal block.

The result is scaled by ``min(1, tau/‖g‖_nat)`` with :math:`\|g\|_{nat} = \|S_l^{-1/2}
U_l^\top G U_r S_r^{-1/2}\|_F` summed over the blocks of the leaf, then cast to the gradient's
dtype and back (as the seed). This is *not* scale invariant and *not* low-rank (see
:mod:`stax.optimizers.scao` and ``reference/peers.md`` §3).

References:
  ``scao`` 0.2.4 (PyPI, ``whispering3/scao``), ``optimizer.py`` and ``preconditioner.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from stax import numerics as num
from stax.transforms.kron import _schedule
from stax.transforms.kron._schedule import KronHyperparams, LeafContext, Schedule
from stax.transforms.kron._view import DimensionNumbers

__all__ = ["KronBlockState", "DiagBlockState", "BlockGridState", "BlockPlan",
           "ScaoRule", "scale_by_kron_scao", "leaf_diagnostics"]

_EYE_EPS = 1e-4       # the seed's initial L = R = 1e-4·I
_EPS = 1e-8           # the seed's numerical floors (regulariser, clamps)


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


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Static plan of an m×n block.

  Attributes:
    kind: ``"diag"``, ``"kron"`` or ``"grid"``.
    m, n: the block's shape.
    kmin, kmax: ``"kron"``: the rank bounds ``k_min'``, ``k_max'``.
    rows, cols: ``"grid"``: the row and column chunk sizes.
    blocks: ``"grid"``: ``(row offset, column offset, BlockPlan)`` per block, row-major.
  """

  kind: str
  m: int
  n: int
  kmin: int = 0
  kmax: int = 0
  rows: tuple = ()
  cols: tuple = ()
  blocks: tuple = ()


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def _chunks(d: int, maxd: int) -> list[int]:
  if d <= maxd:
    return [d]
  out = [maxd] * (d // maxd)
  if d % maxd:
    out.append(d % maxd)
  return out


def _ranks(m: int, n: int, k_min: int, k_max: int) -> tuple[int, int]:
  d = min(m, n)
  kmin = min(k_min, d)
  kmax = min(k_max, d // 2) if d > 2 * kmin else kmin
  return kmin, kmax


def _block_plan(m: int, n: int, k_min: int, k_max: int) -> BlockPlan:
  if m == 1 or n == 1:
    return BlockPlan("diag", m, n)
  kmin, kmax = _ranks(m, n, k_min, k_max)
  return BlockPlan("kron", m, n, kmin=kmin, kmax=kmax)


def _plan(m: int, n: int, k_min: int, k_max: int, maxd: int) -> Optional[BlockPlan]:
  """The seed's ``SparsePreconditioner`` layout of an m×n view (``None``: an empty leaf)."""
  if m * n == 0:  # nothing to precondition (Adam gives it an empty update)
    return None
  if m > 1 and n > 1 and max(m, n) > maxd:
    rows, cols = tuple(_chunks(m, maxd)), tuple(_chunks(n, maxd))
    blocks, r0 = [], 0
    for bs in rows:
      c0 = 0
      for cs in cols:
        blocks.append((r0, c0, _block_plan(bs, cs, k_min, k_max)))
        c0 += cs
      r0 += bs
    return BlockPlan("grid", m, n, rows=rows, cols=cols, blocks=tuple(blocks))
  return _block_plan(m, n, k_min, k_max)


# --------------------------------------------------------------------------------------------
# Kronecker and diagonal blocks
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
  # LAPACK reads the lower triangle of a column-major operand. Handed the EMA itself, XLA lays
  # the EMA out column-major through the whole step, and every step (refresh or not) ends with
  # a transposing copy of each factor into the donated row-major state: 2.7 s of copies per
  # step at 16M parameters (4096² blocks), measured in the step's profile. So LAPACK gets the
  # transpose of the matrix symmetrised from its lower triangle: the same operand bit for bit
  # (eigh(d, UPLO="L") reads nothing else), and its column-major layout is the row-major EMA's.
  x = d + lam * jnp.eye(dim, dtype=d.dtype)
  lower = jnp.tril(jnp.ones((dim, dim), bool))
  w, v = jnp.linalg.eigh(jnp.where(lower, x, x.T).T, UPLO="L", symmetrize_input=False)
  return jnp.maximum(w[::-1], 0.0), v[:, ::-1]


def _spectral_rank(w, eps_sparse, kmin, kmax):
  """The seed's ``adaptive_rank``: smallest k with cumsum >= (1-eps)·total, clamped."""
  total = jnp.sum(w)
  cum = jnp.cumsum(w)
  k = jnp.minimum(jnp.sum(cum < (1.0 - eps_sparse) * total) + 1, w.shape[0])
  k = jnp.where(total < 1e-12, kmin, k)
  return jnp.clip(k, kmin, kmax).astype(jnp.int32)


def _kron_update(st: KronBlockState, g, *, rho, bias, eps_sparse, kmin,
                 kmax) -> KronBlockState:
  m, n = g.shape
  g = num.saturate_norm(g, _schedule.STAT_BOUND)
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


def _diag_apply(st: DiagBlockState, g, *, bias, eps):
  d = st.ema / bias
  out = g / (d ** 0.25 + 1e-8)
  nat = jnp.sum(g * g / (jnp.sqrt(d) + eps))
  return out, nat


def _diag_update(st: DiagBlockState, g, *, rho) -> DiagBlockState:
  return DiagBlockState(rho * st.ema + (1.0 - rho) * g * g)


# --------------------------------------------------------------------------------------------
# Leaves: one block, or a grid of blocks
# --------------------------------------------------------------------------------------------


def _block_init(plan: BlockPlan):
  if plan.kind == "diag":
    return DiagBlockState(jnp.zeros((plan.m, plan.n), jnp.float32))
  if plan.kind == "kron":
    return _kron_init(plan.m, plan.n, plan.kmin, plan.kmax)
  return BlockGridState(tuple(_block_init(b) for _, _, b in plan.blocks))


def _block_apply(plan: BlockPlan, st, g, *, bias, eps):
  """(preconditioned block, natural-norm² of the block)."""
  if plan.kind == "diag":
    return _diag_apply(st, g, bias=bias, eps=eps)
  if plan.kind == "kron":
    return _kron_apply(st, g)
  nat = 0.0
  parts = iter(zip(plan.blocks, st.blocks))
  out_rows = []
  for _ in plan.rows:
    row = []
    for _ in plan.cols:
      (r0, c0, sub), blk = next(parts)
      o, s = _block_apply(sub, blk, g[r0:r0 + sub.m, c0:c0 + sub.n], bias=bias, eps=eps)
      row.append(o)
      nat = nat + s
    out_rows.append(jnp.concatenate(row, axis=1) if len(row) > 1 else row[0])
  out = jnp.concatenate(out_rows, axis=0) if len(out_rows) > 1 else out_rows[0]
  return out, nat


def _block_update(plan: BlockPlan, st, g, *, rho, bias, eps_sparse):
  if plan.kind == "diag":
    return _diag_update(st, g, rho=rho)
  if plan.kind == "kron":
    return _kron_update(st, g, rho=rho, bias=bias, eps_sparse=eps_sparse, kmin=plan.kmin,
                        kmax=plan.kmax)
  return BlockGridState(tuple(
      _block_update(sub, blk, g[r0:r0 + sub.m, c0:c0 + sub.n], rho=rho, bias=bias,
                    eps_sparse=eps_sparse)
      for (r0, c0, sub), blk in zip(plan.blocks, st.blocks)))


def _fits(plan: BlockPlan, st: Any) -> bool:
  if plan.kind == "diag":
    return isinstance(st, DiagBlockState) and tuple(st.ema.shape) == (plan.m, plan.n)
  if plan.kind == "kron":
    return (isinstance(st, KronBlockState) and tuple(st.L.shape) == (plan.m, plan.m)
            and tuple(st.R.shape) == (plan.n, plan.n))
  return isinstance(st, BlockGridState) and len(st.blocks) == len(plan.blocks)


def _cost(plan: BlockPlan) -> float:
  """≈ flops of one curvature update: two ``eigh`` (≈ d³ each) and the EMA products."""
  if plan.kind == "diag":
    return float(plan.m * plan.n)
  if plan.kind == "kron":
    m, n = plan.m, plan.n
    return float(m ** 3 + n ** 3 + m * n * (m + n))
  return sum(_cost(b) for _, _, b in plan.blocks)


@dataclasses.dataclass(frozen=True)
class ScaoRule:
  """The faithful rule as a :class:`stax.transforms.kron._schedule.LeafRule`."""

  hp: KronHyperparams
  needs_key: bool = False
  min_updates: int = 0

  def plan(self, m: int, n: int) -> Optional[BlockPlan]:
    return _plan(m, n, self.hp.k_min, self.hp.k_max, self.hp.max_precond_dim)

  def init(self, plan: BlockPlan):
    return _block_init(plan)

  def fits(self, plan: BlockPlan, st: Any) -> bool:
    return _fits(plan, st)

  def noise_size(self, plan: BlockPlan) -> int:
    del plan
    return 0

  def _rho(self):
    return jnp.asarray(self.hp.rho, jnp.float32)

  def apply(self, plan: BlockPlan, st, g: jax.Array, ctx: LeafContext) -> jax.Array:
    # The diagonal path debiases by the curvature updates taken so far.
    bias = jnp.maximum(1.0 - self._rho() ** ctx.precond_count.astype(jnp.float32), 1e-8)
    gp, nat_sq = _block_apply(plan, st, g, bias=bias, eps=self.hp.eps)
    tau = self.hp.tau
    if tau is not None:
      nat = jnp.sqrt(nat_sq)
      gp = jnp.where(nat > tau, gp * (tau / jnp.maximum(nat, self.hp.eps)), gp)
    # The seed casts the preconditioned gradient to the gradient dtype, then back.
    return gp.astype(ctx.dtype).astype(jnp.float32)

  def cost(self, plan: BlockPlan) -> float:
    return _cost(plan)

  def units(self, plan: BlockPlan, st, g: jax.Array, key) -> list:
    """A block grid's blocks as separate units (each its own ``eigh`` pair, so each can have
    its own owner device); any other leaf is one unit."""
    if plan.kind != "grid":
      return [(plan, st, g, key)]
    return [(sub, blk, g[r0:r0 + sub.m, c0:c0 + sub.n], key)
            for (r0, c0, sub), blk in zip(plan.blocks, st.blocks)]

  def join(self, plan: BlockPlan, states: list):
    return BlockGridState(tuple(states)) if plan.kind == "grid" else states[0]

  def update(self, plan: BlockPlan, st, g: jax.Array, ctx: LeafContext):
    # The Kronecker EMAs are debiased including this update.
    bias = 1.0 - self._rho() ** (ctx.precond_count + 1).astype(jnp.float32)
    return _block_update(plan, st, g, rho=self.hp.rho, bias=bias,
                         eps_sparse=self.hp.epsilon_sparse)


def scale_by_kron_scao(
    *,
    schedule: Schedule = Schedule(),
    hyperparams: KronHyperparams = KronHyperparams(),
    dimension_numbers: DimensionNumbers = None,
    refresh: str = "owners",
) -> optax.GradientTransformationExtraArgs:
  """The faithful ``scao`` 0.2.4 preconditioner (module docstring) under the SCAO schedule.

  Args:
    schedule: the warm-up / blend / refresh schedule (:class:`~._schedule.Schedule`).
    hyperparams: the curvature hyperparameters (:class:`~._schedule.KronHyperparams`, all
      fields used: ``tau`` clips the natural-gradient norm, ``eps`` floors it).
    dimension_numbers: how a tensor becomes a matrix (or stacked matrices), any form of
      :mod:`stax.layout`, as for :func:`stax.scao` (an int split axis ``s``: rows =
      ``prod(shape[:s])``; ``1`` is the seed's ``(shape[0], -1)``); default ``None``:
      :func:`stax.layout.default_dimension_numbers` (:mod:`._view`).
    refresh: under an explicit mesh, ``"owners"`` (default: each leaf's ``eigh`` pair on one
      device, :mod:`stax.owners`) or ``"replicated"`` (on every device).

  Example:
    >>> import jax.numpy as jnp
    >>> from stax.transforms.kron import KronHyperparams, Schedule, scale_by_kron_scao
    >>> tx = scale_by_kron_scao(schedule=Schedule(warmup_steps=0, precond_freq=1),
    ...                         hyperparams=KronHyperparams(k_min=1, k_max=2))
    >>> state = tx.init({"w": jnp.ones((4, 3)), "b": jnp.ones(3)})
    >>> type(state.leaves["w"]).__name__, type(state.leaves["b"]).__name__
    ('KronBlockState', 'DiagBlockState')
  """
  _schedule.check_schedule(schedule)
  _schedule.check_hyperparams(hyperparams)
  return _schedule.scale_by_schedule(ScaoRule(hyperparams), schedule,
                                     dimension_numbers=dimension_numbers, refresh=refresh)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def leaf_diagnostics(st: Any, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(rank, curvature norm) of one faithful leaf state; ``bias`` debiases the EMA."""
  if isinstance(st, KronBlockState):
    return st.k, jnp.sqrt(jnp.sum(st.L * st.L)) / bias
  if isinstance(st, DiagBlockState):
    return jnp.asarray(1, jnp.int32), jnp.sqrt(jnp.sum(st.ema * st.ema)) / bias
  ks, ns = zip(*[leaf_diagnostics(b, bias) for b in st.blocks])
  ks = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks])
  return (jnp.sum(ks) // len(ks)).astype(jnp.int32), jnp.sqrt(sum(n * n for n in ns))
