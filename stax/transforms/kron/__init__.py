r"""Kronecker curvature preconditioners (SCAO): the faithful 0.2.4 rule and a low-rank one.

Both transforms turn the gradient :math:`G` of each matrix (m×n) into the gradient that SCAO
feeds to Adam's moments, after an Adam warm-up. They share one controller and differ in the
per-leaf rule it drives:

* :mod:`._schedule` — the warm-up, the linear blend :math:`g_{\rm eff} = b\,\tilde G +
  (1-b)\,G` and the periodic curvature update under ``lax.cond``, over any
  :class:`~stax.transforms.kron._schedule.LeafRule`; the state
  :class:`ScaleByKronState` (counters, an optional key, and the per-leaf curvature states in a
  tree laid out like the params);
* :mod:`._view` — how a tensor becomes a matrix, or stacked matrices (``dimension_numbers``);
* :mod:`.scao` — :func:`scale_by_kron_scao` (``mode="scao-0.2.4"``), the algorithm of the
  ``scao`` 0.2.4 package: full EMAs, ``eigh``, the spectral-mass rank, the ``tau`` clip,
  diagonal and block-grid paths;
* :mod:`.lowrank` — :func:`scale_by_kron_lowrank` (``mode="lowrank"``), the improved rule:
  O((m+n)K) factors tracked by randomized subspace iteration, a tail level for the complement,
  norm grafting (scale invariant).

:func:`kron_diagnostics` reads the phase, blend, ranks and curvature norms of either state.

References:
  ``scao`` 0.2.4 (PyPI, ``whispering3/scao``); Gupta, Koren & Singer, Shampoo, 2018;
  Vyas et al., SOAP, 2024; Halko, Martinsson & Tropp, 2011.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from stax.transforms.kron import lowrank as _lowrank
from stax.transforms.kron import scao as _scao
from stax.transforms.kron._schedule import REFRESHES, KronHyperparams, ScaleByKronState, Schedule
from stax.transforms.kron._view import DimensionNumbers
from stax.transforms.kron.lowrank import LowRankState, lowrank_precondition, scale_by_kron_lowrank
from stax.transforms.kron.scao import (BlockGridState, DiagBlockState, KronBlockState,
                                       scale_by_kron_scao)

__all__ = [
    "MODES",
    "REFRESHES",
    "ScaleByKronState",
    "Schedule",
    "KronHyperparams",
    "KronBlockState",
    "DiagBlockState",
    "BlockGridState",
    "LowRankState",
    "DimensionNumbers",
    "scale_by_kron_scao",
    "scale_by_kron_lowrank",
    "lowrank_precondition",
    "kron_diagnostics",
    "leaf_states",
]

MODES = ("scao-0.2.4", "lowrank")

_LEAF_STATES = (KronBlockState, DiagBlockState, BlockGridState, LowRankState,
                optax.EmptyState)


def leaf_states(state: ScaleByKronState) -> list:
  """The per-leaf curvature states of ``state``, in the params' flatten order."""
  return jax.tree.leaves(state.leaves, is_leaf=lambda x: isinstance(x, _LEAF_STATES))


def _is_stacked(st: Any) -> bool:
  """Whether a leaf's curvature state holds stacked matrices' states (a leading layer axis)."""
  if isinstance(st, BlockGridState):
    return _is_stacked(st.blocks[0])
  ndim = {LowRankState: lambda s: s.U_l.ndim, KronBlockState: lambda s: s.L.ndim,
          DiagBlockState: lambda s: s.ema.ndim}.get(type(st))
  return ndim is not None and ndim(st) == 3


def _leaf_diag(st: Any, bias: jax.Array) -> tuple[Any, Any]:
  """(rank, curvature norm) of one leaf state; rank -1 and norm 0 for a passed-through leaf;
  for stacked matrices the mean rank (floored) and the norm of all layers' factors together."""
  if _is_stacked(st):
    ks, ns = jax.vmap(lambda s: _leaf_diag(s, bias))(st)
    return (jnp.sum(ks) // ks.shape[0]).astype(jnp.int32), jnp.sqrt(jnp.sum(ns * ns))
  if isinstance(st, LowRankState):
    return _lowrank.leaf_diagnostics(st, bias)
  if isinstance(st, (KronBlockState, DiagBlockState, BlockGridState)):
    return _scao.leaf_diagnostics(st, bias)
  return jnp.asarray(-1, jnp.int32), jnp.zeros([], jnp.float32)


def kron_diagnostics(state: ScaleByKronState, rho: float = 0.999) -> dict:
  """Phase, blend, ranks and curvature norms of a :class:`ScaleByKronState` (jit-friendly).

  Returns a dict of arrays: ``phase`` (int32, 0 warm-up / 1 preconditioned), ``blend``,
  ``step``, ``curvature_updates``, ``rank`` (int32 per leaf in flatten order; −1 where a leaf is
  passed through; the mean over blocks for a block grid and over layers for stacked matrices;
  the larger side's rank in ``lowrank``) and ``curvature_norm`` (float32 per leaf: Frobenius
  norm of the debiased left factor; of all layers' together for stacked matrices).
  """
  t = state.precond_count.astype(jnp.float32)
  bias = jnp.maximum(1.0 - jnp.asarray(rho, jnp.float32) ** t, 1e-8)
  pairs = [_leaf_diag(st, bias) for st in leaf_states(state)]
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
