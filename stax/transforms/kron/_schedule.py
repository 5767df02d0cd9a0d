r"""The SCAO schedule: Adam warm-up, linear blend and periodic curvature updates over a leaf rule.

The controller turns the gradient :math:`G` of each leaf (seen as a matrix, :mod:`._view`) into
the gradient that SCAO feeds to Adam's moments:

* **warm-up** — while ``step <= warmup_steps`` or fewer than ``min_precond_updates`` curvature
  updates have happened, :math:`g_{\rm eff} = G`;
* **preconditioned phase** — :math:`g_{\rm eff} = b\,\tilde G + (1-b)\,G` with the linear ramp
  :math:`b = \min(1, s/\text{blend\_steps})` (``s`` counts preconditioned steps), where
  :math:`\tilde G` is the rule's ``apply``;
* every ``precond_freq`` steps, *after* the current gradient was preconditioned with the
  previous factors, each leaf's curvature state takes the rule's ``update``, under
  ``lax.cond``. All shapes are static; nothing syncs with the host.

What a leaf's curvature state is and how it preconditions is the rule's business
(:class:`LeafRule`); this module knows nothing of any rule. The state is params-shaped: one
entry per parameter leaf in a tree laid out like the params (``optax.EmptyState()`` for a leaf
the rule passes through), plus the shared counters. A Flax NNX ``Variable`` around a parameter
is not repeated around its curvature state (see :func:`layout`).

The transformation is gate-aware (:mod:`stax.transforms.guards`): when the extra argument
``nonfinite_ok`` is false, no curvature update runs and every counter keeps its value, so
:func:`stax.nonfinite_guard` needs no select over the factors.

Under an explicit mesh the gradient is replicated for the factor work (the factors live
replicated) and the result is resharded like the gradient, so it equals the single-device
result. The periodic curvature updates — eigendecompositions, subspace iterations — run once
per leaf on an *owner* device (``refresh="owners"``, :mod:`stax.owners`: same-plan leaves
stacked over the mesh, owners balanced by the rule's ``cost``), and the new factors are
gathered back: one gather instead of every device repeating every decomposition. The result
is the replicated one up to float32 rounding (a product inside the owner's loop may round its
last bit differently; tested in ``tests/test_owners.py``).
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from stax import _eager
from stax import _leafwise
from stax import _sharding as _sh
from stax import _validation as V
from stax import numerics as num
from stax._trees import conform
from stax.codecs import rng
from stax.partition import _NNX_VALUE_KEYS  # pylint: disable=protected-access
from stax.transforms.guards import NONFINITE_OK, gate_aware, gate_value
from stax.owners import owner_map
from stax.transforms.kron import _view

__all__ = ["Schedule", "KronHyperparams", "LeafContext", "LeafRule", "ScaleByKronState",
           "STAT_BOUND", "check_schedule", "check_hyperparams", "layout", "scale_by_schedule"]

# A gradient block whose Frobenius norm exceeds this (2**61) enters a rule's curvature EMAs
# scaled down to it (stax.numerics.saturate_norm), so every EMA entry, trace and Ritz value
# stays below 2**122: sums of a few of them, the debiasing and eigh stay finite. Never reached
# in practice.
STAT_BOUND = num.square_bound(jnp.float32, terms=16)


class Schedule(NamedTuple):
  """The controller's hyperparameters (Python ints: structural, so static under
  ``inject_hyperparams``, where an array raises ``TypeError`` naming the argument).

  Attributes:
    warmup_steps: Adam-only steps, int >= 0 (default 100).
    precond_freq: curvature update period in steps, int >= 1 (default 20).
    min_precond_updates: curvature updates required before preconditioning, int >= 0
      (default 2; the low-rank rule uses at least 1).
    blend_steps: length of the linear blend into preconditioning, int >= 0 (default 50; 0: none).
  """

  warmup_steps: Any = 100
  precond_freq: Any = 20
  min_precond_updates: Any = 2
  blend_steps: Any = 50


class KronHyperparams(NamedTuple):
  """The curvature rules' hyperparameters (one record for both rules).

  Attributes:
    rho: curvature EMA decay per curvature update, in [0, 1) (default 0.999).
    epsilon_sparse: spectral mass the rank rule may leave out, in [0, 1) (default 0.05).
    k_min: smallest rank, int >= 1 (default 8; clamped to the matrix size).
    k_max: largest rank, int >= k_min (default 128).
    max_precond_dim: the faithful rule's block size (a larger matrix is cut into a block grid);
      the low-rank rule's largest side (a larger matrix uses Adam alone); int >= 2
      (default 4096).
    tau: the faithful rule's natural-gradient norm clip > 0, or ``None`` (default 1.0; the
      low-rank rule does not clip).
    eps: the faithful rule's floor in the clip, >= 0 (default 1e-8, Adam's eps; unused by the
      low-rank rule).
  """

  rho: Any = 0.999
  epsilon_sparse: Any = 0.05
  k_min: int = 8
  k_max: int = 128
  max_precond_dim: int = 4096
  tau: Any = 1.0
  eps: Any = 1e-8


def check_hyperparams(hp: KronHyperparams) -> None:
  """Validates the concrete values among the rules' hyperparameters (traced ones are skipped)."""
  V.check_int("k_min", hp.k_min, low=1)
  V.check_int("k_max", hp.k_max, low=1)
  V.check_int("max_precond_dim", hp.max_precond_dim, low=2)
  if hp.k_max < hp.k_min:
    raise ValueError(f"`k_max` must be >= `k_min` (= {hp.k_min}), got {hp.k_max}.")
  V.check_betas(rho=hp.rho)
  V.check_number("epsilon_sparse", hp.epsilon_sparse, low=0.0, high=1.0, high_inclusive=False)
  V.check_number("tau", hp.tau, low=0.0, low_inclusive=False, allow_none=True)
  V.check_number("eps", hp.eps, low=0.0)


class LeafContext(NamedTuple):
  """What the controller tells a rule about the current step, for one leaf.

  Attributes:
    precond_count: int32, curvature updates taken before this step.
    dtype: the gradient leaf's dtype (the matrix view given to the rule is float32).
    noise: ``update`` only: this leaf's ``noise_size(plan)`` random draws, uniform on (-1, 1),
      for this curvature update (:func:`stax.codecs.rng.counter_symmetric`, seeded by the
      leaf's key of the step, :func:`stax.codecs.rng.leaf_keys`), else ``None``.
    dims: ``update`` only: the unit's matrix view's ``(rows, columns)`` as a float32 pair of
      runtime values (picked from one vector of every unit's, :func:`_runtime_dims`), for the
      rule's arithmetic on its dimensions (a tail level ``1/(dim - K)``, a damping ``/dim``),
      else ``None``. Written as Python numbers they are constants compiled into the kernels,
      which then differ from one matrix shape to the next even where the arrays they work on
      (a side's K Ritz values, the 2K×2K Rayleigh–Ritz matrix) have one shape.
  """

  precond_count: jax.Array
  dtype: Any
  noise: Optional[jax.Array] = None
  dims: Optional[jax.Array] = None


class LeafRule(Protocol):
  """A per-leaf curvature rule driven by :func:`scale_by_schedule`.

  Attributes:
    needs_key: whether the state keeps a PRNG key (the rule draws ``noise``).
    min_updates: a floor on ``min_precond_updates`` (curvature updates before preconditioning).
  """

  needs_key: bool
  min_updates: int

  def plan(self, m: int, n: int) -> Optional[Hashable]:
    """The static plan of an ``m×n`` matrix view, or ``None`` to pass the leaf through."""

  def init(self, plan: Any) -> Any:
    """The leaf's initial curvature state (a NamedTuple of float32/int32 arrays)."""

  def fits(self, plan: Any, st: Any) -> bool:
    """Whether ``st`` was built for a leaf with this plan."""

  def noise_size(self, plan: Any) -> int:
    """Random draws (``LeafContext.noise``) one curvature ``update`` of this leaf needs."""

  def apply(self, plan: Any, st: Any, g: jax.Array, ctx: LeafContext) -> jax.Array:
    """The preconditioned float32 matrix :math:`\\tilde G` of the float32 matrix ``g``."""

  def update(self, plan: Any, st: Any, g: jax.Array, ctx: LeafContext) -> Any:
    """The leaf's curvature state after one curvature update with gradient ``g``."""

  def cost(self, plan: Any) -> float:
    """Optional: the relative cost (≈ flops) of one ``update``, to balance owner devices
    (default: the matrix view's size)."""

  def units(self, plan: Any, st: Any, g: jax.Array, key: Any) -> list:
    """Optional: the leaf's update as independent ``(plan, state, g, key)`` units (``key``:
    the leaf's key, or ``None``; each unit draws its ``noise_size(plan)`` from it), each
    updated by ``update`` on its own (and owned by its own device); with :meth:`join`."""

  def join(self, plan: Any, states: list) -> Any:
    """Optional: the leaf's state from its units' updated states (inverse of :meth:`units`)."""


class ScaleByKronState(NamedTuple):
  """State of the SCAO preconditioners.

  Attributes:
    count: int32, steps taken.
    precond_count: int32, curvature updates taken.
    phase2_count: int32, preconditioned steps taken (0 during the warm-up).
    blend: float32, the blend weight ``b`` of the last step (0 during the warm-up).
    key: raw ``uint32[2]`` key of a rule that draws random numbers (``lowrank``), else ``None``.
    leaves: the curvature state of each parameter leaf, in a tree laid out like the params
      (``optax.EmptyState()`` for a leaf that is passed through).

  Example:
    >>> import jax, jax.numpy as jnp, stax
    >>> state = stax.scao(1e-3).init({"w": jnp.zeros((8, 4))})
    >>> kron = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
    ...     x, stax.ScaleByKronState)) if isinstance(s, stax.ScaleByKronState)][0]
    >>> int(kron.count), int(kron.phase2_count), float(kron.blend)
    (0, 0, 0.0)
  """

  count: jax.Array
  precond_count: jax.Array
  phase2_count: jax.Array
  blend: jax.Array
  key: Optional[jax.Array]
  leaves: Any


def check_schedule(s: Schedule) -> None:
  """Validates the schedule hyperparameters (ints; ``TypeError`` for an array: they are
  structural)."""
  V.check_int("warmup_steps", s.warmup_steps, low=0)
  V.check_int("precond_freq", s.precond_freq, low=1)
  V.check_int("min_precond_updates", s.min_precond_updates, low=0)
  V.check_int("blend_steps", s.blend_steps, low=0)


def _is_value_box(x: Any) -> bool:
  """Whether ``x`` is a node holding one array under the attribute ``value`` (an NNX
  ``Variable``)."""
  if isinstance(x, (jax.Array, np.ndarray, optax.EmptyState)) or x is None:
    return False
  try:
    children = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda n: n is not x)[0]
  except (TypeError, ValueError):
    return False
  if len(children) != 1 or not children[0][0]:
    return False
  key = children[0][0][0]
  return isinstance(key, jax.tree_util.GetAttrKey) and key.name in _NNX_VALUE_KEYS


def layout(tree: Any) -> jax.tree_util.PyTreeDef:
  """The structure of ``tree`` with a Flax NNX ``Variable`` taken as the leaf it holds.

  The curvature state of a parameter is a NamedTuple; Flax keeps a params-shaped state leaf in
  a ``Variable`` and converts a NamedTuple held there into a ``State`` mapping, which a fresh
  optimizer does not have (its pure-dict checkpoints would not restore). Without the
  ``Variable`` the per-leaf states sit in the same nesting as the params and Flax wraps their
  arrays one by one. For trees without Variables this is ``jax.tree.structure(tree)``.
  """
  return jax.tree.structure(tree, is_leaf=_is_value_box)


class _Leaf(NamedTuple):
  """A leaf's static description: its matrix view (:class:`._view.View`) and the rule's plan
  of one ``m × n`` matrix of it (``None``: passed through)."""

  view: Any
  plan: Any

  @property
  def batch(self) -> Optional[int]:
    """The number of stacked matrices (``None``: one, unstacked)."""
    return None if self.plan is None else self.view.batch


def _leaf_plans(rule: LeafRule, dimension_numbers: Any, tree: Any) -> list[_Leaf]:
  out = []
  for view in _view.leaf_views(dimension_numbers, tree):
    if view == _view.PASS:
      out.append(_Leaf(None, None))
      continue
    out.append(_Leaf(view, rule.plan(view.m, view.n)))
  return out


def _stacked(st: Any, batch: int) -> Any:
  """``batch`` copies of one matrix's state ``st``, stacked on a new leading axis."""
  return jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a)[None], batch, axis=0), st)


def _layer(st: Any, i: int) -> Any:
  """Layer ``i`` of a stacked state."""
  return jax.tree.map(lambda a: a[i], st)


def _one_layer_shapes(st: Any, batch: int) -> Any:
  """A stacked state's per-layer shapes (``None`` unless every array has ``batch`` layers)."""
  arrays = jax.tree.leaves(st)
  if not all(np.ndim(a) >= 1 and np.shape(a)[0] == batch for a in arrays):
    return None
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), st)


def _init(rule: LeafRule, leaf: _Leaf) -> Any:
  """A leaf's initial curvature state: the rule's, one per stacked matrix."""
  if leaf.plan is None:
    return optax.EmptyState()
  st = rule.init(leaf.plan)
  return st if leaf.batch is None else _stacked(st, leaf.batch)


def _as_built(rule: LeafRule, leaf: _Leaf, st: Any) -> Any:
  """``st`` in the containers ``rule.init`` builds: a checkpoint restored without a target
  hands a NamedTuple back as a mapping (see :func:`stax._trees.conform`)."""
  if _fits(rule, leaf, st):
    return st
  return conform(st, jax.eval_shape(lambda: _init(rule, leaf)))


def _fits(rule: LeafRule, leaf: _Leaf, st: Any) -> bool:
  if leaf.plan is None:
    return not jax.tree.leaves(st)
  if leaf.batch is None:
    return rule.fits(leaf.plan, st)
  one = _one_layer_shapes(st, leaf.batch)
  return one is not None and rule.fits(leaf.plan, one)


def _mismatch(detail: str) -> ValueError:
  return ValueError("scao: the gradient tree does not match the params tree the state was "
                    f"initialised with ({detail}).")


def _leaf_states(rule: LeafRule, updates: Any, leaves: list, plans: list, tree: Any) -> list:
  """The per-leaf states of ``tree`` in the flatten order of ``updates``; ``ValueError`` unless
  the gradient leaves are those the state was initialised with."""
  try:
    states = layout(updates).flatten_up_to(tree)
  except (ValueError, TypeError):
    raise _mismatch(f"the {len(leaves)} gradient leaves are not laid out like the "
                    "parameters") from None
  out = []
  for i, (g, leaf, st) in enumerate(zip(leaves, plans, states)):
    try:
      st = _as_built(rule, leaf, st)
    except (KeyError, AttributeError, TypeError, ValueError):
      pass  # reported just below
    if not _fits(rule, leaf, st):
      raise _mismatch(f"gradient leaf {i} in flatten order, of shape {tuple(np.shape(g))}, "
                      f"does not fit the state of parameter leaf {i}")
    out.append(st)
  return out


def _replicate(x: jax.Array) -> tuple[jax.Array, Any]:
  """``x`` replicated over its explicit mesh, and the sharding to restore (None: unsharded)."""
  spec = _sh.explicit_spec(x)
  if spec is None:
    return x, None
  return _sh.reshard(x, ()), _sh.named(x, spec)


def _restore(x: jax.Array, sharding: Any) -> jax.Array:
  return x if sharding is None else jax.reshard(x, sharding)


def _blend_weight(phase2, blend_steps):
  """The linear ramp ``min(1, phase2/blend_steps)`` (1 when ``blend_steps`` is 0)."""
  bsteps = jnp.asarray(blend_steps)
  return jnp.where(bsteps > 0,
                   jnp.minimum(1.0, phase2.astype(jnp.float32)
                               / jnp.maximum(bsteps, 1).astype(jnp.float32)), 1.0)


def _cost(rule: LeafRule, plan: Any, g2: jax.Array) -> float:
  """The relative cost of one curvature update (the rule's ``cost``, else the view's size)."""
  cost = getattr(rule, "cost", None)
  return float(cost(plan)) if cost is not None else float(np.prod(g2.shape))


def _units(rule: LeafRule, plan: Any, st: Any, g2: jax.Array, key: Any) -> list:
  """The rule's independent units of one leaf's update (``rule.units``), else the leaf."""
  units = getattr(rule, "units", None)
  return units(plan, st, g2, key) if units is not None else [(plan, st, g2, key)]


def _layers(leaf: _Leaf, st: Any, g2: jax.Array, key: Any) -> list:
  """``(state, g, key)`` of each matrix of a leaf: the leaf itself, or each layer of stacked
  matrices, whose keys are drawn from the leaf's (:func:`stax.codecs.rng.leaf_keys`)."""
  if leaf.batch is None:
    return [(st, g2, key)]
  keys = None if key is None else rng.leaf_keys(key, jnp.zeros([], jnp.int32), leaf.batch)
  return [(_layer(st, l), g2[l], None if keys is None else _leafwise.pick(keys, l))
          for l in range(leaf.batch)]


def _join(rule: LeafRule, plan: Any, pieces: list) -> Any:
  """A leaf's new state from its units' new states (``rule.join``; one unit: itself)."""
  join = getattr(rule, "join", None)
  return join(plan, pieces) if join is not None else pieces[0]


def _update_fn(rule: LeafRule, plan: Any, dtype: str):
  """``(state, g, key, precond_count) -> rule.update(...)`` for the leaves of one plan and
  dtype (the counter is an input: a ``shard_map`` may not close over a traced value). The
  unit's ``noise_size(plan)`` random draws are made here from its key (``None``: no draws), so
  that a group of alike units mapped by one loop (:func:`stax.owners.owner_map`) draws in its
  body. (Uniform draws from the counter hash, not ``jax.random.normal``: a subspace
  iteration's test matrix needs no Gaussian (Halko, Martinsson & Tropp 2011, §4.6), and the
  normal draws' threefry and inverse-erf kernels were a fifth of SCAO's compiled kernel code
  on GPT-2 small. Random signs, cheaper still, are a discrete distribution: on a 16×12 matrix
  one seed in twelve drew a test matrix nearly dependent on the tracked subspace.)"""
  size = rule.noise_size(plan)

  def fn(item):
    st, g2, key, precond_count, dims = item
    draws = rng.counter_symmetric(size, rng.key_to_seed(key)) if key is not None and size else None
    return rule.update(plan, st, g2, LeafContext(precond_count, jnp.dtype(dtype), draws, dims))
  return fn


def _runtime_dims(shapes: list, anchor: jax.Array) -> list:
  """Each ``(rows, columns)`` of ``shapes`` as a float32 pair the compiler cannot fold: one
  table of them selected on ``anchor >= 0`` (a runtime int; always true), each unit's row
  picked from it (:func:`stax._leafwise.entries`, a kernel that does not depend on the row)."""
  if not shapes:
    return []
  table = jnp.where(anchor >= 0, jnp.asarray(np.asarray(shapes, np.float32)), 0.0)
  return _leafwise.entries(table)


def _apply_fn(rule: LeafRule, plan: Any, dtype: str):
  """``(state, g, precond_count) -> rule.apply(...)`` for the leaves of one plan and dtype."""
  def fn(st, g2, precond_count):
    return rule.apply(plan, st, g2, LeafContext(precond_count, jnp.dtype(dtype)))
  return fn


def _like(new: Any, old: Any, reshard: bool = True) -> Any:
  """``new`` (replicated) in ``old``'s dtypes and (``reshard``) laid out like ``old``'s
  explicitly sharded leaves (both branches of the refresh's ``lax.cond`` must have one type: under
  ``jax_enable_x64``, float64 hyperparameters from ``optax.inject_hyperparams`` promote the
  refresh's math of float32 factors to float64)."""

  def like(n, o):
    n = n if n.dtype == o.dtype else n.astype(o.dtype)
    if not reshard or _sh.explicit_spec(o) is None:
      return n
    return jax.reshard(n, jax.typeof(o).sharding)

  return jax.tree.map(like, new, old)


REFRESHES = ("owners", "replicated")


def scale_by_schedule(rule: LeafRule, schedule: Schedule, *, dimension_numbers: Any = None,
                      seed: Any = 0, refresh: str = "owners"
                      ) -> optax.GradientTransformationExtraArgs:
  """The SCAO controller (module docstring) over ``rule``.

  Args:
    rule: the per-leaf curvature rule.
    schedule: warm-up, blend and update period.
    dimension_numbers: how a leaf becomes a matrix (:mod:`stax.transforms.kron._view`).
    seed: seed of the state's key when ``rule.needs_key``.
    refresh: where the periodic curvature updates run under an explicit mesh: ``"owners"``
      (default; each leaf's update on one device, balanced, :func:`stax.owners.owner_map`) or
      ``"replicated"`` (every device computes every leaf). Without a mesh both run every leaf
      on the one device, ``"owners"`` alike leaves as one ``lax.map`` (compiled once).
  """
  V.check_choice("refresh", refresh, REFRESHES)

  def plans(tree):
    return _leaf_plans(rule, dimension_numbers, tree)

  def init_fn(params):
    states = [_init(rule, leaf) for leaf in plans(params)]
    key = jax.random.key_data(jax.random.PRNGKey(seed)) if rule.needs_key else None
    zero = lambda: jnp.zeros([], jnp.int32)  # distinct buffers (donation)
    return ScaleByKronState(count=zero(), precond_count=zero(), phase2_count=zero(),
                            blend=jnp.zeros([], jnp.float32), key=key,
                            leaves=layout(params).unflatten(states))

  def update_fn(updates, state, params=None, **extra_args):
    del params
    ok = gate_value(extra_args.get(NONFINITE_OK))
    g_leaves, treedef = jax.tree.flatten(updates)
    leaf_plans = plans(updates)
    old = _leaf_states(rule, updates, g_leaves, leaf_plans, state.leaves)
    count = numerics.safe_increment(state.count)
    min_pu = (jnp.maximum(schedule.min_precond_updates, rule.min_updates) if rule.min_updates
              else schedule.min_precond_updates)
    in_warmup = (count <= schedule.warmup_steps) | (state.precond_count < min_pu)
    phase2 = jnp.where(in_warmup, state.phase2_count, numerics.safe_increment(state.phase2_count))
    blend = jnp.where(in_warmup, 0.0, _blend_weight(phase2, schedule.blend_steps))
    blend = blend.astype(jnp.float32)
    do_update = (count % schedule.precond_freq) == 0
    if ok is not None:
      # The gate (stax.nonfinite_guard): a skipped step refreshes nothing and keeps every
      # counter, so the factors never pass through a select (a select of the whole state made
      # XLA copy the Adam moments that follow: 2.5x an Adam step at 16M parameters).
      do_update = do_update & ok

    mats, specs = [], []
    for g, leaf in zip(g_leaves, leaf_plans):
      if leaf.plan is None:
        mats.append(None)
        specs.append(None)
        continue
      g_rep, spec = _replicate(g)   # replicate first: reshaping a sharded leaf may not be legal
      # Entries beyond ±2**63 act as ±2**63 (as in the Adam core that follows): every product
      # and square below stays finite for any finite gradient; below the bound, bit for bit.
      # (Saturated inside the branches below, where it fuses into what reads it.)
      mats.append(_view.as_matrix(g_rep, leaf.view))
      specs.append(spec)

    # 1) Precondition with the current factors (curvature is updated afterwards): one
    # conditional for every leaf, on the warm-up (the matrix products only run after it). The
    # refresh below is a conditional of its own whose predicate reads one entry of the first
    # effective gradient, so it runs after every read of the factors and XLA updates them in
    # place. (With the preconditioning inside the refresh's conditional, XLA kept a copy of
    # every factor that a refresh replaces wholesale and that the preconditioning reads, in
    # the no-refresh branch and at the output, with or without an optimization_barrier: at
    # 16M parameters the faithful mode's warm-up step faulted 92 MiB in per call, now 65,
    # and 47.5 -> 36.6 ms. With each leaf's preconditioning a cond of its own, every factor
    # array was copied every step.) The effective gradients (the conditional's outputs) are
    # the step's temporaries, which page-fault in every call (2 MiB at a time under
    # stax.HUGE_PAGE_MALLOC, not at all with stax.reuse_cpu_temporaries(); README,
    # "Temporaries cost page faults").
    live = [i for i, leaf in enumerate(leaf_plans) if leaf.plan is not None]

    def warm(states):
      del states
      return [num.saturate(mats[i]) for i in live]

    def preconditioned(states):
      effs = []
      for i in live:
        g2 = num.saturate(mats[i])
        # traced once per plan and dtype, not per leaf (stax._leafwise.traced_once)
        apply = _leafwise.traced_once(_apply_fn, rule, leaf_plans[i].plan,
                                      jnp.dtype(g_leaves[i].dtype).name)
        if leaf_plans[i].batch is not None:   # stacked matrices: each its own factors
          apply = jax.vmap(apply, in_axes=(0, 0, None))
        gp = apply(states[i], g2, state.precond_count)
        effs.append(blend * gp + (1.0 - blend) * g2)
      return effs

    def effective(states):
      return _eager.cond(in_warmup, warm, preconditioned, states)

    # 2) Periodic curvature update under lax.cond.
    sizes = [0 if leaf.plan is None else rule.noise_size(leaf.plan) for leaf in leaf_plans]

    def do(states):
      # Each leaf draws from its own key (the state key hashed with the step and the leaf's
      # index, stax.codecs.rng.leaf_keys: no threefry loop), all leaves' keys made at once and
      # each picked (stax._leafwise), inside its update
      # (_update_fn): alike leaves' updates, draws included, are then one loop's body
      # (owner_map). (Slices of one shared draw put each leaf's offset into its kernel: two
      # distinct kernels per matrix, 49 at 16M; draws made per leaf outside the loop, a
      # threefry loop per leaf: 11k of GPT-2 small's 48k HLO instructions.)
      keys = (rng.leaf_keys(state.key, state.count, len(sizes))
              if sum(sizes) and state.key is not None else None)
      items, groups, costs, at = [], [], [], []
      for i, (g, g2, st, leaf, size) in enumerate(zip(g_leaves, mats, states, leaf_plans, sizes)):
        if leaf.plan is None:
          continue
        g2 = num.saturate(g2)
        key = _leafwise.pick(keys, i) if size else None
        # a leaf's independent pieces of work (a block grid's blocks; each layer of stacked
        # matrices, with a key of its own), each with its own owner
        for layer, (st_l, g_l, key_l) in enumerate(_layers(leaf, st, g2, key)):
          for plan, st_u, g_u, key_u in _units(rule, leaf.plan, st_l, g_l, key_l):
            items.append([st_u, g_u, key_u, state.precond_count])
            groups.append((plan, jnp.dtype(g.dtype).name))
            costs.append(_cost(rule, plan, g_u))
            at.append((i, layer))
      # every unit's dimensions as runtime values (LeafContext.dims), then the items as tuples
      dims = _runtime_dims([tuple(it[1].shape) for it in items], state.count)
      items = [(*it, d) for it, d in zip(items, dims)]
      fns = {grp: _leafwise.traced_once(_update_fn, rule, *grp) for grp in groups}
      if refresh == "owners":
        outs = owner_map(fns, items, groups=groups, costs=costs)
      else:
        outs = [fns[grp](item) for grp, item in zip(groups, items)]
      new = list(states)
      for i in dict.fromkeys(i for i, _ in at):
        layers = [_join(rule, leaf_plans[i].plan, [o for o, j in zip(outs, at) if j == (i, l)])
                  for l in dict.fromkeys(l for j, l in at if j == i)]
        joined = layers[0] if leaf_plans[i].batch is None else jax.tree.map(
            lambda *xs: jnp.stack(xs), *layers)
        new[i] = _like(joined, states[i], reshard=refresh == "owners")
      return tuple(new)

    effs = effective(tuple(old))
    if live:
      # The refresh's predicate reads one entry of the first effective gradient, so every
      # read of the factors (the conditional above) is ordered before the refresh replaces
      # them: XLA then updates them in place instead of copying them
      # (tests/test_scao.py::test_the_refresh_is_ordered_after_every_read_of_the_factors).
      # The entry is compared with one NaN bit pattern (all payload bits set), which only a
      # NaN gradient can bring (the gate skips that refresh anyway; without the gate it would
      # only spread the NaN), so for any other input the predicate is do_update.
      first = jax.lax.bitcast_convert_type(effs[0][(0,) * effs[0].ndim].astype(jnp.float32),
                                           jnp.uint32)
      do_update = do_update & (first != jnp.uint32(0xFFFFFFFF))
    new = _eager.cond(do_update, do, lambda st: st, tuple(old))
    out = list(g_leaves)
    for i, eff in zip(live, effs):
      out[i] = _restore(_view.from_matrix(eff, leaf_plans[i].view, g_leaves[i].shape), specs[i])
    new = jax.tree.map(lambda n, o: n.astype(o.dtype), new, tuple(old))
    precond_count = jnp.where(do_update, numerics.safe_increment(state.precond_count),
                              state.precond_count)
    if ok is not None:
      count = jnp.where(ok, count, state.count)
      phase2 = jnp.where(ok, phase2, state.phase2_count)
      blend = jnp.where(ok, blend, state.blend)
    new_state = ScaleByKronState(count=count, precond_count=precond_count, phase2_count=phase2,
                                 blend=blend, key=state.key,
                                 leaves=layout(updates).unflatten(new))
    return treedef.unflatten(out), new_state

  return gate_aware(optax.GradientTransformationExtraArgs(init_fn, update_fn))
