"""Non-finite gradient guard: a wrapper with a policy, usable around any transformation.

``nonfinite_guard(inner, policy)`` checks ``all(isfinite(g))`` over the whole gradient tree on
device (one fused reduction, no host synchronisation) and then

* ``"skip"`` (default): if any gradient is NaN/Inf, returns all-zero updates and leaves the inner
  state *exactly* unchanged — the parameters and every moment, counter and RNG key stay as they
  were (as STAC's ``step()`` does); ``nonfinite_count`` in the guard state counts skipped steps.
  There is no branch (the default, ``gated=None``): the inner update always runs and either
  turns itself into an exact no-op (a gate-aware inner, given the gradients as they are; see
  "The gate" below) or, run on gradients whose bad step is zeroed, has its new state replaced
  by the old one with one select per state leaf, which XLA fuses into the loop that writes the
  leaf, so a donated state is still updated in place. ``gated=False`` is the ``lax.cond`` form: the inner update is not
  evaluated on a skipped step, but XLA copies the state through the branch on CPU (measured at
  16M parameters: a STAC step 46 → 23 ms without it; see the README's roofline table).
* ``"error"``: the same skip, plus a host callback that raises ``FloatingPointError`` naming the
  step. Under ``jit`` the exception surfaces at the next synchronisation (``block_until_ready``,
  reading a value) as a ``jax.errors.JaxRuntimeError`` whose message contains
  ``"non-finite gradient"``; outside ``jit`` it surfaces immediately. The callback is the only
  host round trip, and only this policy pays for it.
* ``"ignore"``: returns ``inner`` unchanged (no check at all).
* ``"zero"``: replaces NaN and ±Inf gradient entries by 0 before ``inner``
  (:func:`zero_nonfinite`; STAM's seed does this); the state is ``inner``'s own.

The gate. A *gate-aware* transformation (a :class:`GateAwareTransformation`) accepts the extra
argument :data:`NONFINITE_OK` (a scalar bool) in ``update``; when it is false the state it
returns equals the state it was given, bit for bit, counters included (its updates may be
anything: the guard zeroes them). It is given the gradients as they are, non-finite entries
included, so it must not let them reach its state on such a step. :func:`stax.scale_by_adam`
with one storage is one: on a skipped step each exact, full-precision moment is selected back
element by element in the loop that would have updated it (it stays bit for bit), the encoding
of a part that is not exact (a codec, a per-tensor mean) and a ``Beta1Rule``'s per-leaf scalars
are selected back, and its
counters are held; so are :func:`stax.scale_by_stable_adam` on such a core and
:func:`stax.kahan_summation` (it keeps its compensation). :func:`gate_state` makes any other
transformation gate-aware by selecting its old state (meant for small states: a schedule's step
count; inside a :func:`gated_chain` it sees the raw gradients too). :func:`gated_chain` chains gate-aware
transformations, :func:`gated_partition` partitions the leaves among them (``optax.partition``),
and ``nonfinite_guard(inner, gated=True)`` refuses, at construction, an
``inner`` that is not gate-aware.

The deferred gate. An inner declared with :func:`deferred_gate` (every part of it reads the gate
through :func:`gate_value`) gets a :class:`DeferredGate` instead of the flag: formed when first
read, from finiteness probes the inner offered for gradients it had already read (STAM's and
STAMLite's β1 rules compute them in their statistics' pass) and the guard's own probes of the
others, so those gradients are not read once more for the check.

Reference: STAC's ``error_if_nonfinite`` / skip semantics (``stac-optimizer`` 0.3.0), done on
device instead of with a ``.item()`` sync per parameter; ``optax.apply_if_finite`` is similar but
has no error policy and evaluates both branches.

Example:
  >>> import optax, stax
  >>> tx = stax.nonfinite_guard(optax.adam(1e-3), policy="skip")
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from stax import _eager
from stax import _leafwise
from stax import _validation as V
from stax import numerics as snum
from stax._trees import conform

__all__ = ["NonFiniteGuardState", "nonfinite_guard", "all_finite", "zero_nonfinite",
           "NONFINITE_POLICIES", "NONFINITE_OK", "GateAwareTransformation", "gate_aware",
           "is_gate_aware", "gate_state", "gated_chain", "gated_partition", "DeferredGate",
           "DeferredGateAware", "deferred_gate", "gate_value"]

NONFINITE_POLICIES = ("skip", "error", "ignore", "zero")

NONFINITE_OK = "nonfinite_ok"
"""The gate's extra-argument name: ``update(..., nonfinite_ok=ok)`` with ``ok`` a scalar bool
(or, for a :class:`DeferredGateAware` inner, a :class:`DeferredGate`: read it with
:func:`gate_value`)."""


class NonFiniteGuardState(NamedTuple):
  """State of :func:`nonfinite_guard`.

  Attributes:
    inner_state: the wrapped transformation's state.
    nonfinite_count: int32, number of steps skipped because of non-finite gradients.
  """

  inner_state: Any
  nonfinite_count: jax.Array


def all_finite(tree: Any) -> jax.Array:
  """Scalar bool: every element of every leaf of ``tree`` is finite.

  Computed as ``isfinite(sum(x - x))``: ``x - x`` is 0 for a finite ``x`` and NaN for NaN or
  ±Inf, so the sum is exactly 0 or NaN (no overflow, any float dtype). XLA keeps ``x - x``
  for floats (it is not 0 under IEEE rules; a test checks the detection under ``jit``), and
  a float sum is a vectorised reduction on CPU with no temporary: 1.8× faster than the
  boolean reduction of ``all(isfinite(x))`` (3.1 vs 5.5 ms at 16M float32 parameters on this
  project's CPU, which also needed 16 MB of temporaries). A complex leaf is probed through its
  real and imaginary parts separately (a float32 sum of ``x - x`` would drop the imaginary part).
  Small real leaves (:func:`stax._leafwise.groupable`: GPT-2 small's 98 vectors) are probed
  together, flattened and concatenated per dtype in runs of at most
  :data:`stax._leafwise.GROUP_MAX_TOTAL` elements (a temporary of at most 256 KiB of float32):
  one probe is three kernels on XLA's CPU backend, each compiled.
  """
  return _all_finite(_inexact_leaves(tree))


def _inexact_leaves(tree: Any) -> list:
  return [x for x in jax.tree.leaves(tree)
          if x is not None and jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def _all_finite(leaves: list, probes: tuple = ()) -> jax.Array:
  """:func:`all_finite` of ``leaves``, together with ``probes`` (0-d float32 probes formed
  elsewhere: 0 for finite values, NaN otherwise)."""
  if not leaves and not probes:
    return jnp.array(True)
  # small real leaves probed together, per dtype (no cast: a float64 beyond float32's range is
  # finite)
  keys = [jnp.result_type(x) if _leafwise.groupable(x) and not jnp.issubdtype(
      jnp.result_type(x), jnp.complexfloating) else None for x in leaves]
  groups, alone = _leafwise.alike(keys, [jnp.size(x) for x in leaves])
  probes = [*probes, *(_nan_probe(leaves[i]) for i in alone)]
  probes += [_nan_probe(jnp.concatenate([jnp.ravel(leaves[i]) for i in g])) for g in groups]
  return _materialized(jnp.isfinite(jnp.sum(jnp.stack(probes))))


def _materialized(flag: jax.Array) -> jax.Array:
  """``flag`` computed once, as a value of its own.

  Without this XLA fuses the last step of the check (the sum over every leaf's probe) into each
  consumer, so each leaf's update loop takes every leaf's probe as an operand: measured on CPU
  at 1M parameters in 60 leaves, ``stax.adamw`` compiled in 3.4 s instead of 1.0 s. A
  ``lax.cond`` on a scalar is the one boundary XLA CPU does not fuse through (an optimisation
  barrier is removed before fusion); it moves one bool at run time.
  """
  return jax.lax.cond(flag, _true, _false)


def _true() -> jax.Array:
  return jnp.array(True)


def _false() -> jax.Array:
  return jnp.array(False)


def _nan_probe(x: jax.Array) -> jax.Array:
  """float32 ``sum(x - x)``: 0 when every element is finite, else NaN (both parts if complex)."""
  if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
    re, im = jnp.real(x), jnp.imag(x)
    return jnp.sum(re - re, dtype=jnp.float32) + jnp.sum(im - im, dtype=jnp.float32)
  return jnp.sum(x - x, dtype=jnp.float32)


def _probe_terms(g, *_):
  return g.astype(jnp.float32) - g.astype(jnp.float32)


PROBE = snum.total(_probe_terms)
"""A finiteness probe of a statistics pass's first operand, ``g``, as one more statistic of
:func:`stax.numerics.tiled_means`: ``sum(g - g)``, 0 when every entry is finite and NaN
otherwise (``x - x`` is NaN for NaN and ±Inf; XLA keeps it for floats; a sum, not a mean: no
division per leaf). Offered to a :class:`DeferredGate` (STAM's and STAMLite's β1 rules,
StableAdamW's RMS clip), the gate reads no pass of its own for those gradients; unused, XLA
drops it."""


class DeferredGate:
  """The gate of one guarded update, formed when it is first read (:func:`gate_value`).

  The guard's check reads every gradient once, a pass of its own. A transformation that reads
  the raw gradients anyway before it needs the gate (STAM's and STAMLite's per-tensor
  statistics, :mod:`stax.transforms.adaptive_beta`) can compute each tensor's probe in the same
  pass (one more output of its reduction: ``sum(g - g)``, 0 when every entry is finite, else
  NaN) and :meth:`offer` it; the gate then reduces only the leaves nobody offered. Measured at
  16M parameters (four 2048×2048 leaves, one interleaved loop): a STAMLite step 0.79× →
  0.70× optax.adamw's (STAM's unchanged within noise), and 3–8 fewer compiled kernels.

  It lives for one ``update`` (the guard makes one per call, and nothing keeps it): no state
  outside the traced values. A probe counts only for the very array the guard was given (the
  same object), so a transformed gradient never stands in for the raw one.
  """

  def __init__(self, grads: Any):
    self._leaves = _inexact_leaves(grads)
    self._index = {id(x): i for i, x in enumerate(self._leaves)}
    self._covered: set = set()
    self._offered: list = []
    self._ok = None

  def offer(self, leaves: list, probe: jax.Array) -> bool:
    """Takes ``probe`` (a 0-d float: 0 when every entry of every array of ``leaves`` is finite,
    NaN otherwise; ``None`` entries ignored) as the probe of those arrays, if each is one of the
    guard's gradients (the same object) not yet offered and the gate has not been read; returns
    whether it was taken."""
    leaves = [x for x in leaves if x is not None]
    ids = [self._index.get(id(x)) for x in leaves]
    if self._ok is not None or None in ids or self._covered.intersection(ids):
      return False
    self._covered.update(ids)
    self._offered.append(jnp.asarray(probe, jnp.float32))
    return True

  def value(self) -> jax.Array:
    """The gate (a scalar bool): every gradient finite. Formed once."""
    if self._ok is None:
      rest = [x for i, x in enumerate(self._leaves) if i not in self._covered]
      self._ok = _all_finite(rest, tuple(self._offered))
    return self._ok


def gate_value(ok: Any) -> Any:
  """The gate as a scalar bool (``ok`` itself unless it is a :class:`DeferredGate`)."""
  return ok.value() if isinstance(ok, DeferredGate) else ok


class GateAwareTransformation(optax.GradientTransformationExtraArgs):
  """A transformation that honours the gate :data:`NONFINITE_OK` (see the module docstring).

  Its ``update`` accepts ``nonfinite_ok`` (a scalar bool); when it is false the returned state
  equals the given one bit for bit. Without the argument it behaves as usual.
  """

  __slots__ = ()


class DeferredGateAware(GateAwareTransformation):
  """A gate-aware transformation every part of which reads :data:`NONFINITE_OK` through
  :func:`gate_value`: ``nonfinite_guard(gated=True)`` hands it a :class:`DeferredGate`, so a
  part that reads the raw gradients first can offer their probes."""

  __slots__ = ()


def deferred_gate(tx: GateAwareTransformation) -> DeferredGateAware:
  """Declares the gate-aware ``tx`` ready for a :class:`DeferredGate`: the caller vouches that
  every part of it reads the gate through :func:`gate_value` (stax's Adam core,
  :func:`gate_state`, :func:`stax.saturating_trace`, :func:`stax.kahan_summation` and SCAO's
  schedule do; :func:`gated_chain` and :func:`gated_partition` pass it on as it is).

  Raises:
    ValueError: if ``tx`` is not gate-aware.
  """
  if not is_gate_aware(tx):
    raise ValueError(f"deferred_gate: {_name(tx)} is not gate-aware.")
  return DeferredGateAware(tx.init, tx.update)


def gate_aware(tx: optax.GradientTransformation) -> GateAwareTransformation:
  """Declares ``tx`` gate-aware: for transformations that implement the gate themselves."""
  tx = optax.with_extra_args_support(tx)
  return GateAwareTransformation(tx.init, tx.update)


def is_gate_aware(tx: Any) -> bool:
  """Whether ``tx`` declares that it honours the gate."""
  return isinstance(tx, GateAwareTransformation)


def gate_state(inner: optax.GradientTransformation) -> GateAwareTransformation:
  """``inner`` made gate-aware from outside: on a skipped step its new state is dropped.

  ``inner`` runs as usual (it never sees the gate); when :data:`NONFINITE_OK` is false each
  leaf of its new state is replaced by the old one (a select). Meant for transformations that
  keep little state, such as ``optax.scale_by_learning_rate`` with a schedule (its step count)
  or ``optax.add_decayed_weights`` (no state). A gate-aware ``inner`` is returned as is.
  """
  if is_gate_aware(inner):
    return inner
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    ok = extra_args.pop(NONFINITE_OK, None)
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    ok = gate_value(ok)
    if ok is not None:
      # conform: a framework may hand the old state back in other containers (stax._trees).
      new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state,
                               conform(state, new_state))
    return new_updates, new_state

  return GateAwareTransformation(inner.init, update_fn)


def _name(tx: Any) -> str:
  update = getattr(tx, "update", None)
  qualname = getattr(update, "__qualname__", "")
  return qualname.split(".<locals>")[0] or type(tx).__name__


def gated_chain(*txs: optax.GradientTransformation) -> GateAwareTransformation:
  """``optax.chain(*txs)`` declared gate-aware; every element must be gate-aware.

  Raises:
    ValueError: naming the first element that is not gate-aware (wrap a small-state one in
      :func:`gate_state`).
  """
  for i, tx in enumerate(txs):
    if not is_gate_aware(tx):
      raise ValueError(
          f"gated_chain: element {i} ({_name(tx)}) is not gate-aware: it does not declare that "
          f"it keeps its state unchanged when `{NONFINITE_OK}` is false. Wrap it in "
          f"stax.transforms.guards.gate_state (for a small state such as a schedule's count) "
          f"or use nonfinite_guard(gated=False).")
  return gate_aware(optax.chain(*txs))


def gated_partition(transforms: dict, param_labels: Any) -> GateAwareTransformation:
  """``optax.partition(transforms, param_labels)`` declared gate-aware; every transform must
  be gate-aware (:data:`NONFINITE_OK` reaches each through ``optax.partition``'s extra
  arguments, each on its own leaves).

  Raises:
    ValueError: naming the first label whose transform is not gate-aware.
  """
  for label, tx in transforms.items():
    if not is_gate_aware(tx):
      raise ValueError(
          f"gated_partition: the transform of label {label!r} ({_name(tx)}) is not "
          f"gate-aware; wrap it in stax.transforms.guards.gate_state or build it with "
          f"gated_chain.")
  return gate_aware(optax.partition(transforms, param_labels))


def _zero_nonfinite_tree(updates: Any) -> Any:
  return jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, jnp.zeros([], g.dtype)), updates)


def zero_nonfinite() -> optax.GradientTransformation:
  """Replaces NaN and ±Inf gradient entries by 0 (the seed's ``jnp.nan_to_num(g, 0, 0, 0)``)."""

  def update_fn(updates, state, params=None):
    del params
    return _zero_nonfinite_tree(updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _zeroing(inner: optax.GradientTransformationExtraArgs
             ) -> optax.GradientTransformationExtraArgs:
  """``inner`` on gradients whose NaN/±Inf entries are 0 (the ``"zero"`` policy)."""

  def update_fn(updates, state, params=None, **extra_args):
    return inner.update(_zero_nonfinite_tree(updates), state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _raise_nonfinite(ok, count):
  if not bool(ok):
    raise FloatingPointError(
        f"stax: non-finite gradient at step {int(count)} (policy='error'); the step was skipped.")


def nonfinite_guard(inner: optax.GradientTransformation,
                    policy: str = "skip", *, gated: Optional[bool] = None
                    ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so non-finite gradients never corrupt parameters or state.

  Args:
    inner: the transformation to protect.
    policy: ``"skip"`` (default), ``"error"``, ``"ignore"`` or ``"zero"``; see the module
      docstring.
    gated: ``None`` (default): no branch; the gate when ``inner`` is gate-aware, else the
      state select (:func:`gate_state` around ``inner``). ``True``: no branch, and ``inner``
      must be gate-aware (a :class:`GateAwareTransformation`, e.g. a :func:`gated_chain`):
      the inner update always runs, on gradients with the bad step's entries zeroed, and
      receives the gate :data:`NONFINITE_OK` (a scalar bool) as an extra argument; the guard
      zeroes the updates of a bad step, and ``inner`` keeps its own state. ``False``: skip
      with a ``lax.cond`` (any ``inner``; XLA copies the state through the branch on CPU: at
      16M parameters an AdamW step took 2.9× an ``optax.adamw`` step against 1.4× gated).
      Used only by ``"skip"`` and ``"error"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`NonFiniteGuardState`
    (for ``"ignore"`` and ``"zero"``: ``inner``'s state).

  Raises:
    ValueError: for ``gated=True`` (with ``"skip"`` or ``"error"``) when ``inner`` is not
      gate-aware.
  """
  V.check_choice("nonfinite", policy, NONFINITE_POLICIES)
  V.check_bool("gated", gated, allow_none=True)
  native = is_gate_aware(inner)
  deferred = isinstance(inner, DeferredGateAware)
  if gated is None and policy in ("skip", "error"):
    # No branch either way: the inner's own gate, or a select of its old state.
    inner, gated = gate_state(inner), True
  elif gated and policy in ("skip", "error") and not is_gate_aware(inner):
    raise ValueError(
        f"nonfinite_guard(gated=True) needs a gate-aware inner transformation (one that keeps "
        f"its state unchanged when `{NONFINITE_OK}` is false), got {_name(inner)}: build it "
        f"with stax.transforms.guards.gated_chain (stax.scale_by_adam, stax.kahan_summation, "
        f"gate_state(...)) or use gated=False.")
  inner = optax.with_extra_args_support(inner)
  if policy == "ignore":
    return inner
  if policy == "zero":
    return _zeroing(inner)

  def init_fn(params):
    return NonFiniteGuardState(inner.init(params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if gated and deferred:
      # formed when the inner first reads it, from the probes it offered and the other leaves'
      gate = DeferredGate(updates)
      new_updates, inner_state = inner.update(updates, state.inner_state, params,
                                              **{NONFINITE_OK: gate}, **extra_args)
      ok = gate.value()
    else:
      ok = all_finite(updates)
    if policy == "error":
      jax.debug.callback(_raise_nonfinite, ok, state.nonfinite_count)

    if gated:
      if not deferred:
        # A gate-aware inner gets the gradients as they are (it keeps them out of its state
        # itself): a zeroed copy feeding a reduction (a per-tensor statistic) is materialised
        # by XLA, one more pass over the gradients. Any other inner gets them zeroed.
        safe = updates if native else jax.tree.map(
            lambda g: jnp.where(ok, g, jnp.zeros((), g.dtype)), updates)
        new_updates, inner_state = inner.update(safe, state.inner_state, params,
                                                **{NONFINITE_OK: ok}, **extra_args)
      new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros((), u.dtype)),
                                 new_updates)
    else:
      def apply(_):
        return inner.update(updates, state.inner_state, params, **extra_args)

      def skip(_):
        shapes, state_shapes = jax.eval_shape(apply, None)
        # zeros_like(g) keeps g's sharding, so both branches agree under an explicit mesh.
        zeros = jax.tree.map(lambda s, g: jnp.zeros_like(g, dtype=s.dtype), shapes, updates)
        # The state as `apply` returns it: a framework may have handed it back in other
        # containers (Flax NNX's nnx.State for a codec's NamedTuple; see stax._trees.conform).
        return zeros, conform(state.inner_state, state_shapes)

      new_updates, inner_state = _eager.cond(ok, apply, skip, None)
    count = jnp.where(ok, state.nonfinite_count,
                      numerics.safe_increment(state.nonfinite_count))
    return new_updates, NonFiniteGuardState(inner_state, count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
