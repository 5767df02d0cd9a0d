"""Compiled steps: what one has-grad pattern and set of static hyperparameters compiles to.

A :class:`Plan` says which units a step updates and how its arguments are laid out; its
:class:`CompiledStep` is the jitted function over the *flat* argument list (state leaves,
updated parameters, gradients, hyperparameter vectors, [skip count], [scratch], read-only
parameters). The per-parameter state trees of torch's semantics have ~20 pytree nodes per
parameter, and flattening them on every call cost ~35 us at 4 parameters, as much as the rest
of the dispatch.

Compiled steps are cached by their plan's key (factories, static hyperparameters, parameter
names, has-grad masks, layout, policy), not per optimizer instance: re-creating an optimizer
(e.g. to resume from a checkpoint) reuses the compiled step. ``jax.jit`` adds the shapes and
dtypes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stax.transforms.guards import all_finite
from torch_bridge import convert
from torch_bridge._flatten import flat_call, flattenable, trace
from torch_bridge._hyperparams import GroupHyper, cached, freeze, unpack
from torch_bridge._state import keep_masked
from torch_bridge._units import Layout, Unit, build_tx, get_leaf, nest

_STEP_CACHE: dict = {}
_INIT_CACHE: dict = {}


class UnitSpec(NamedTuple):
  """What the compiled step needs to run one unit's transform."""
  factory: Callable
  static: tuple        # static factory arguments, ((name, value), ...)
  names: tuple         # the unit's parameter names
  mask: tuple          # per parameter: has a gradient this step
  slot: int            # position of the unit's group among the step's hyperparameter vectors
  shapes: tuple        # per parameter: its real shape
  position: tuple = (0, 0)   # the unit's (group, first parameter in it): Unit.position


@dataclasses.dataclass
class CompiledStep:
  """The jitted flat step of a plan and what reading its outputs needs.

  An argument leaf of two or more axes with a narrow last one
  (:func:`torch_bridge.convert.boundary_shape`) crosses 1-D when the step's elementwise work on
  it can all run flat (:func:`torch_bridge._flatten.flattenable`); ``arg_shapes`` are the shapes
  the leaves cross in (the same for a state leaf or parameter and its output)."""
  fn: Callable                  # flat leaves -> flat outputs (states, new params, [skip, ok])
  state_defs: tuple             # per active unit: (state treedef, number of leaves, shapes)
  n_state: int                  # state leaves in all
  arg_shapes: tuple             # each argument leaf's shape at the call (StepArgs order)
  n_on: int                     # parameters updated
  n_off: int = 0                # parameters read only

  @property
  def state_shapes(self) -> tuple:
    return self.arg_shapes[:self.n_state]

  @property
  def on_shapes(self) -> tuple:
    return self.arg_shapes[self.n_state:self.n_state + self.n_on]

  @property
  def off_shapes(self) -> tuple:
    return self.arg_shapes[len(self.arg_shapes) - self.n_off:] if self.n_off else ()


@dataclasses.dataclass(eq=False)
class Plan:
  """One has-grad mask and static configuration: the step's units and argument layout.

  Hashed by identity (its cache key is a large tuple).
  """
  key: tuple              # the step's cache key (static configuration)
  units: tuple            # UnitSpec per active unit
  groups: tuple           # the groups of the active units, in slot order
  state_keys: tuple       # each active unit's key (its parameter indices)
  idx_on: tuple           # parameter indices updated by the step, in output order
  idx_off: tuple          # parameter indices read only (no gradient), in order
  policy: Optional[str]   # global_nonfinite
  donate: tuple           # which of the 7 tree arguments are donated
  n_scratch: int          # scratch buffers passed (copy writeback: one per updated parameter)
  shapes_on: tuple        # the real shapes of the parameters ``idx_on``
  shapes_off: tuple       # and of ``idx_off``
  compiled: Optional[CompiledStep] = None


def make_plan(units: Sequence[Unit], mask: tuple, hyper: Sequence[GroupHyper],
              factories: Sequence[Callable], layout: Layout, policy: Optional[str],
              writeback: Any, shapes: tuple) -> Plan:
  """The :class:`Plan` of the units with a gradient in ``mask`` (``hyper`` and ``factories``
  per group; ``writeback`` gives ``name``, ``donate`` and whether it passes scratch;
  ``shapes``: every parameter's real shape)."""
  active = [u for u in units if any(mask[i] for i in u.indices)]
  groups = sorted({u.group for u in active})
  slot = {gi: k for k, gi in enumerate(groups)}
  specs = tuple(UnitSpec(factories[u.group], hyper[u.group].static, u.names,
                         tuple(mask[i] for i in u.indices), slot[u.group],
                         tuple(shapes[i] for i in u.indices), u.position) for u in active)
  hp_layouts = tuple(hyper[gi].layout for gi in groups)
  key = (tuple((s.factory, freeze(s.static), s.names, s.mask, s.slot, s.shapes, s.position)
               for s in specs), layout, policy, writeback.name, hp_layouts)
  idx_on = tuple(i for u in active for i in u.indices if mask[i])
  idx_off = tuple(i for u in active for i in u.indices if not mask[i])
  return Plan(key, specs, tuple(groups), tuple(u.indices for u in active), idx_on, idx_off,
              policy, writeback.donate, len(idx_on) if writeback.scratch else 0,
              tuple(shapes[i] for i in idx_on), tuple(shapes[i] for i in idx_off))


def hp_layouts(plan: Plan, hyper: Sequence[GroupHyper]) -> tuple:
  return tuple(hyper[gi].layout for gi in plan.groups)


# ---------------------------------------------------------------------------------------- init
def init_states(units: Sequence[Unit], plan: Plan, hyper: Sequence[GroupHyper],
                factories: Sequence[Callable], layout: Layout, hps: Sequence[jax.Array],
                params: Sequence[tuple], shapes: tuple) -> list:
  """The initial states of ``units`` (a subset of ``plan``'s) over their JAX ``params`` (in
  their boundary shapes; ``shapes``: every parameter's real shape), committed to the
  parameters' device as step outputs are (else the step compiles twice)."""
  slot = {gi: k for k, gi in enumerate(plan.groups)}
  specs = tuple(UnitSpec(factories[u.group], hyper[u.group].static, u.names, (),
                         slot[u.group], tuple(shapes[i] for i in u.indices), u.position)
                for u in units)
  layouts = hp_layouts(plan, hyper)
  key = (tuple((s.factory, freeze(s.static), s.names, s.slot, s.shapes, s.position)
               for s in specs), layout, layouts)
  fn = cached(_INIT_CACHE, key, lambda: _make_init(specs, layout, layouts))
  news = fn(tuple(params), tuple(hps))
  return [jax.device_put(st, ps[0].device) for st, ps in zip(news, params)]


def _make_init(specs: tuple, layout: Layout, layouts: tuple) -> Callable:

  def init(params, hps):
    out = []
    for s, ps in zip(specs, params):
      ps = [p.reshape(shape) for p, shape in zip(ps, s.shapes)]
      tx = build_tx(s.factory, s.static, unpack(layouts[s.slot], hps[s.slot]),
                    [p.shape for p in ps], s.names, layout, s.position)
      st = tx.init(nest(s.names, ps))
      out.append(jax.tree.map(jnp.copy, st))  # never alias a torch buffer into the state
    return tuple(out)

  return jax.jit(init)


# ---------------------------------------------------------------------------------------- step
def _update(tx, grads, state, params):
  try:
    return tx.update(grads, state, params)
  except (TypeError, KeyError) as e:
    if re.search(r"value|grad|missing|required", str(e)):
      raise TypeError(
          "torch_bridge: this transform's update needs arguments a torch training loop "
          f"cannot provide (optimizer.step() passes gradients and parameters): {e}") from e
    raise


def make_step(specs: tuple, layout: Layout, policy: Optional[str], layouts: tuple) -> Callable:
  """The step over argument trees ``(states, params_on, grads, hps, skipped, scratch,
  params_off)``, each a tuple per unit (``hps`` per slot). ``params_on`` are the parameters
  with a gradient (updated), ``params_off`` those without (read only). ``policy`` is the
  bridge's ``global_nonfinite``: with ``"skip"``/``"error"`` one :func:`stax.all_finite` over
  every gradient of the step decides, in a ``lax.cond``, whether the whole step runs."""

  def step(states, params_on, grads, hps, skipped, scratch, params_off):
    # ``scratch``: the previous step's output parameter buffers (already copied into torch),
    # donated so XLA writes the new parameters into them instead of allocating (fresh large
    # CPU allocations page-fault on every step). A whole-array dynamic_update_slice makes the
    # buffer "used" (JAX prunes unused donations); XLA simplifies it to a plain write.
    def merged(k):
      on, off = iter(params_on[k]), iter(params_off[k])
      return tuple(next(on) if m else next(off) for m in specs[k].mask)

    params = tuple(merged(k) for k in range(len(specs)))

    def compute(_):
      new_states, new_params = [], []
      for s, st, ps, gs in zip(specs, states, params, grads):
        tx = build_tx(s.factory, s.static, unpack(layouts[s.slot], hps[s.slot]),
                      [p.shape for p in ps], s.names, layout, s.position)
        full = [g if m else jnp.zeros_like(p) for g, p, m in zip(gs, ps, s.mask)]
        ptree = nest(s.names, ps)
        upd, nst = _update(tx, nest(s.names, full), st, ptree)
        newp = optax.apply_updates(ptree, upd)
        if not all(s.mask):
          nst = keep_masked(nst, st, jax.tree.structure(ptree), s.names, s.mask)
        new_params.append(tuple(get_leaf(newp, n) for n, m in zip(s.names, s.mask) if m))
        new_states.append(nst)
      return tuple(new_params), tuple(new_states)

    def into_scratch(new_params):
      if scratch is None:
        return new_params
      return tuple(tuple(jax.lax.dynamic_update_slice(b, a.astype(b.dtype), (0,) * a.ndim)
                         for a, b in zip(ps, bs)) for ps, bs in zip(new_params, scratch))

    # Outputs come in the donated inputs' order (states, params_on, skipped, scratch): JAX
    # pairs each output with the first unused donated input of the same shape and dtype, so any
    # other order would alias a new parameter onto a moment buffer and force XLA to copy the
    # moments (measured: 63 copies, 1.8x the step time at 16M parameters).
    if policy is None:  # ``skipped`` is None then: no extra argument, no extra output
      new_params, new_states = compute(None)
      return new_states, into_scratch(new_params), None, None
    ok = all_finite([g for gs in grads for g in gs if g is not None])

    def skip(_):
      return tuple(params_on), tuple(states)

    new_params, new_states = jax.lax.cond(ok, compute, skip, None)
    skipped = jnp.where(ok, skipped, optax.safe_increment(skipped))
    return new_states, into_scratch(new_params), skipped, ok

  return step


def _make_flat(tree_step: Any, counts: Sequence[int], donate: Sequence[int], shapes: tuple,
               out_shapes: tuple) -> Callable:
  """``tree_step`` (a function of the flat leaves of the step's 7 arguments, ``counts`` leaves
  per argument, returning the flat leaves of its outputs, or its traced jaxpr) jitted, the
  leaves of the arguments in ``donate`` donated.

  ``tree_step`` sees each argument leaf in its real shape in ``shapes``; a leaf passed 1-D has
  its elementwise work run on the flat array (:func:`torch_bridge._flatten.flat_call`); each
  output leaf comes back in ``out_shapes``."""
  offsets = np.cumsum([0] + list(counts))
  donate_argnums = tuple(j for a in donate for j in range(offsets[a], offsets[a + 1]))

  def flat(*leaves):
    return tuple(flat_call(tree_step, leaves, shapes, out_shapes))

  return jax.jit(flat, donate_argnums=donate_argnums)


class StepArgs(NamedTuple):
  """The flat arguments of one step, by role (concatenated in this order)."""
  states: Sequence[Any]
  params_on: Sequence[Any]
  grads: Sequence[Any]
  hps: Sequence[Any]
  skipped: Sequence[Any]    # [] or [count]
  scratch: Sequence[Any]    # [] (swap) or one per updated parameter (copy)
  params_off: Sequence[Any]

  def flat(self) -> list:
    return [*self.states, *self.params_on, *self.grads, *self.hps, *self.skipped,
            *self.scratch, *self.params_off]


def compile_step(plan: Plan, state_defs: tuple, args: StepArgs, hyper: Sequence[GroupHyper],
                 layout: Layout) -> CompiledStep:
  """The :class:`CompiledStep` of ``plan`` for state trees ``state_defs`` (per unit: treedef,
  number of leaves, their real shapes), from ``args`` (arrays or ``jax.ShapeDtypeStruct``s in
  their real shapes; rebuilt into the step's 7 argument trees once, to learn that structure)."""
  masks = [s.mask for s in plan.units]

  def split(seq, keep):
    it = iter(seq)
    return tuple(tuple(next(it) for m in mask if m == keep) for mask in masks)

  states, k = [], 0
  for tdef, n, _ in state_defs:
    states.append(jax.tree.unflatten(tdef, args.states[k:k + n]))
    k += n
  gr = iter(args.grads)
  grads = tuple(tuple(next(gr) if m else None for m in mask) for mask in masks)
  trees = (tuple(states), split(args.params_on, True), grads, tuple(args.hps),
           args.skipped[0] if args.skipped else None,
           split(args.scratch, True) if args.scratch else None, split(args.params_off, False))
  leaves = args.flat()
  flat, in_tree = jax.tree.flatten(trees)
  if len(flat) != len(leaves) or any(a is not b for a, b in zip(flat, leaves)):
    raise AssertionError("torch_bridge: internal error, the step's flat arguments are out "
                         "of order.")
  counts = [len(jax.tree.leaves(a)) for a in trees]
  layouts = hp_layouts(plan, hyper)
  avals = [jax.ShapeDtypeStruct(tuple(a.shape), a.dtype) for a in leaves]
  key = (plan.key, in_tree, tuple((a.shape, a.dtype) for a in avals))

  def make():
    tree_step = make_step(plan.units, layout, plan.policy, layouts)
    step = lambda *xs: tree_step(*jax.tree.unflatten(in_tree, xs))  # noqa: E731
    step, arg_shapes = _arg_shapes(step, avals, args)
    n_out = len(args.states) + len(args.params_on)
    out_shapes = (*arg_shapes[:n_out], *([()] * (2 if plan.policy is not None else 0)))
    return (_make_flat(step, counts, plan.donate, tuple(a.shape for a in avals), out_shapes),
            arg_shapes)

  fn, arg_shapes = cached(_STEP_CACHE, key, make)
  return CompiledStep(fn, state_defs, len(args.states), arg_shapes, len(args.params_on),
                      len(args.params_off))


def _arg_shapes(step: Callable, avals: list, args: StepArgs) -> tuple[Any, tuple]:
  """(``step`` or its traced jaxpr, the shape each argument leaf crosses in): 1-D for a state
  leaf, parameter or gradient with a narrow last axis whose elementwise work can all run flat
  (``flattenable``), else its own. A scratch buffer (written whole with the new parameter)
  takes its parameter's shape. The jaxpr traced for the dry run is returned for the step to
  evaluate (one trace, not two)."""
  n_s, n_on = len(args.states), len(args.params_on)
  n_hp = len(args.hps) + len(args.skipped)
  scratch = range(2 * n_on + n_s + n_hp, 2 * n_on + n_s + n_hp + len(args.scratch))
  cands = [i for i, a in enumerate(avals)
           if i not in scratch and convert.boundary_shape(a.shape) != tuple(a.shape)]
  if not cands:
    return step, tuple(tuple(a.shape) for a in avals)
  closed = trace(step, avals)
  flat = flattenable(closed, avals, cands)
  shapes = [(math.prod(a.shape),) if i in flat else tuple(a.shape) for i, a in enumerate(avals)]
  for k, i in enumerate(scratch):
    shapes[i] = shapes[n_s + k]
  return (closed if flat else step), tuple(shapes)
