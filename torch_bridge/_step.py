"""One bridged step: the plan, the states, the compiled call and the write-back.

:func:`run` is ``Optimizer._run``: the parameters with a gradient form the has-grad mask; the
plan for the mask and the groups' static configuration is cached (:mod:`torch_bridge._plan`);
the units' JAX states come straight from the previous step with the same plan, or are gathered
(and initialised) from :class:`torch_bridge._state.StateStore`; the hyperparameters are fed as
float32 arrays; one jitted call updates every parameter; the write-back strategy
(:mod:`torch_bridge._writeback`) puts the new values into torch.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from torch_bridge import _plan as P
from torch_bridge import _state as S
from torch_bridge import _hyperparams as H
from torch_bridge import convert
from torch_bridge._dtensor import LocalShards, OwnedCopies
from torch_bridge._state import jax_dtype


def plan_for(opt: Any, params: list, mask: tuple, hyper: list, shapes: tuple, dtypes: tuple
             ) -> P.Plan:
  """The cached step plan of has-grad ``mask``, the parameters' ``shapes`` and ``dtypes`` (a
  parameter whose dtype changed gets a new plan) and the groups' static configuration. A new
  plan first checks the stepped parameters' dtypes (a float64 one after ``model.double()``
  without x64 raises, where JAX would narrow it)."""
  factories = [opt._factory(gi) for gi in range(len(hyper))]
  key = (mask, shapes, dtypes,
         tuple([(f, h.static_key, h.layout) for f, h in zip(factories, hyper)]))

  def make():
    for p, on in zip(params, mask):
      if on:
        convert.check_dtype(p)
    return P.make_plan(opt._units, mask, hyper, factories, opt._layout, opt._global_nonfinite,
                       opt._wb, shapes)

  return H.cached(opt._plans, key, make)


def init_states(opt: Any, keys: list, plan: P.Plan, hyper: list, hps: list, params: list
                ) -> dict:
  """The initial JAX states of the units ``keys``."""
  wanted = set(keys)
  units = [u for u in opt._units if u.indices in wanted]
  jparams = [tuple(opt._views.get(i, params[i]) for i in u.indices) for u in units]
  factories = [opt._factory(gi) for gi in range(len(hyper))]
  shapes = tuple(tuple(p.shape) for p in params)
  news = P.init_states(units, plan, hyper, factories, opt._layout, hps, jparams, shapes)
  return {u.indices: st for u, st in zip(units, news)}


def run(opt: Any, only: Optional[set]) -> None:
  """One step of the parameters with a gradient (and, if given, an index in ``only``)."""
  params = opt._ensure_units()
  mask = tuple([p.grad is not None and (only is None or i in only)
                for i, p in enumerate(params)])
  if True not in mask:
    return
  full = opt._full                          # FSDP2 / DTensor parameters (torch_bridge._dtensor)
  if full is None:
    _run_masked(opt, params, mask)
  elif isinstance(full, LocalShards):       # element-wise: each rank steps its own shards
    _run_masked(opt, full.proxies(params, nonfinite=full.nonfinite(params, mask)), mask)
  else:                                     # full copies; with an owner, only it steps
    stepped = [i for i, on in enumerate(mask) if on]
    copies = full.gather(params)
    if isinstance(full, OwnedCopies):
      mask = tuple([on and full.owned(i) for i, on in enumerate(mask)])
    if True in mask:
      _run_masked(opt, copies, mask)
    full.scatter(params, stepped)


def _run_masked(opt: Any, params: list, mask: tuple) -> None:
  """The compiled step of the parameters in ``mask`` (at least one)."""
  hyper = [opt._group_hyper(gi) for gi in range(len(opt.param_groups))]
  shapes = tuple([tuple(p.shape) for p in params])
  dtypes = tuple([p.dtype for p in params])
  plan, wb = plan_for(opt, params, mask, hyper, shapes, dtypes), opt._wb
  if opt._device is None:
    opt._device = opt._views.get(plan.idx_on[0], params[plan.idx_on[0]]).sharding
  if opt._skipped is None:
    opt._skipped = jax.device_put(np.zeros((), np.int32), opt._device)
  hps = [hyper[gi].on(opt._device) for gi in plan.groups]
  skipped = [] if opt._global_nonfinite is None else [opt._skipped]
  compiled = plan.compiled
  states = None if compiled is None else opt._states.live_leaves(compiled)
  if states is None:  # not the previous step's outputs: gather (and initialise) them
    units = {u.indices: u for u in opt._units}
    states, defs = opt._states.leaves(
        plan.state_keys, lambda keys: init_states(opt, keys, plan, hyper, hps, params),
        lambda key: S.param_signature([params[i] for i in key]), lambda key: units[key].names)
    if compiled is not None and compiled.state_defs != defs:
      compiled = None
    if compiled is None:
      on = [jax.ShapeDtypeStruct(s, jax_dtype(params[i]))
            for i, s in zip(plan.idx_on, plan.shapes_on)]
      off = [jax.ShapeDtypeStruct(s, jax_dtype(params[i]))
             for i, s in zip(plan.idx_off, plan.shapes_off)]
      try:
        compiled = plan.compiled = P.compile_step(
            plan, defs, P.StepArgs(states, on, on, hps, skipped, on if plan.n_scratch else [],
                                   off), hyper, opt._layout)
      except Exception as e:   # pylint: disable=broad-except
        _explain_state_mismatch(opt, plan, defs, hyper, hps, params, units, e)
        raise
      opt._used_fns[id(compiled.fn)] = compiled.fn
    # the shapes the step takes them in (a copy of the filed state where one crosses 1-D)
    states = [x if x.shape == s else jnp.reshape(x, s)
              for x, s in zip(states, compiled.state_shapes)]
  p_on = [opt._views.get(i, params[i], s) for i, s in zip(plan.idx_on, compiled.on_shapes)]
  p_off = [opt._views.get(i, params[i], s) for i, s in zip(plan.idx_off, compiled.off_shapes)]
  args = P.StepArgs(states, p_on,
                    [convert.grad_to_jax(convert.boundary_view(convert.grad_of(params[i]), s))
                     for i, s in zip(plan.idx_on, compiled.on_shapes)],
                    hps, skipped, wb.scratch_for(plan, p_on), p_off)
  leaves = args.flat()
  guards = wb.prepare(compiled, leaves, params, plan.idx_on, p_on)
  try:
    out = compiled.fn(*leaves)
  except BaseException:
    wb.abort(plan, params, p_on)
    raise
  # Drop the inputs now: the donated ones die while XLA runs, not after the wait.
  opt._states.drop_live()
  del leaves, args, states, guards, p_off
  n_state, n_on = compiled.n_state, len(plan.idx_on)
  # Bookkeeping while XLA runs: the outputs' buffers are known at dispatch.
  opt._states.keep(compiled, plan.state_keys, compiled.state_defs, out[:n_state])
  flat_new = out[n_state:n_state + n_on]
  if opt._global_nonfinite is not None:
    opt._skipped, ok = out[n_state + n_on], out[n_state + n_on + 1]
  pending = wb.dispatched(params, plan.idx_on, flat_new)
  del out, p_on
  # Torch reads only the parameters; the next JAX call orders itself after the states.
  jax.block_until_ready(flat_new)
  wb.finish(plan, params, plan.idx_on, flat_new, pending)
  if opt._global_nonfinite == "error" and not bool(ok):
    raise RuntimeError("torch_bridge: non-finite gradient (NaN/Inf); the step was skipped "
                       "for every parameter.")


def _explain_state_mismatch(opt: Any, plan: P.Plan, defs: tuple, hyper: list, hps: list,
                            params: list, units: dict, error: Exception) -> None:
  """Raises ``ValueError`` naming the parameters whose held state is not what the step's
  transformation makes now (a static hyperparameter that shapes the state, such as ``codec``
  or ``nonfinite``, changed in their group after they had state; JAX then fails inside the
  trace), chained from ``error``; returns when every state has the structure it would have."""
  try:
    fresh = jax.eval_shape(lambda: init_states(opt, list(plan.state_keys), plan, hyper, hps,
                                               params))
  except Exception:   # pylint: disable=broad-except
    return
  stale = []
  for key, (tdef, _, shapes) in zip(plan.state_keys, defs):
    leaves, want = jax.tree.flatten(fresh[key])
    if want != tdef or tuple(tuple(x.shape) for x in leaves) != shapes:
      stale.append(", ".join(repr(n) for n in units[key].names))
  if stale:
    raise ValueError(
        f"torch_bridge: the optimizer state of {'; '.join(stale)} was made under other settings "
        "of its param group, and the step's transformation now keeps another state (a "
        "hyperparameter that shapes the state, such as `codec` or `nonfinite`, changed after "
        "the first step). Restore the old value, or drop those parameters' state (`del "
        "optimizer.state[p]`) to restart them under the new one.") from error
