r"""``torch_bridge.Optimizer``: any optax / stax transformation as a real ``torch.optim.Optimizer``.

.. code-block:: python

  opt = torch_bridge.Optimizer(model.parameters(), stax.adamw, lr=1e-3, weight_decay=1e-2)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
  for x, y in loader:
    loss_fn(model(x), y).backward()
    opt.step(); sched.step(); opt.zero_grad()

How it works
  * ``transform`` is a *factory* (``stax.adamw``, ``optax.adamw``, ...). Each param group's
    hyperparameters are mapped to the factory's argument names (``lr`` → ``learning_rate``,
    ``betas`` → ``b1, b2``; the other names pass through) and read from ``param_groups`` at every
    ``step()``. Floating-point values (and ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``momentum`` always) are fed to the jitted step as float32 scalars (packed into one vector
    per group, placed on the device once per change of values), exactly the
    ``optax.inject_hyperparams`` mechanism: the factory is re-invoked inside the trace with
    traced values, so LR schedulers (``StepLR``, ``CosineAnnealingLR``, ``OneCycleLR`` which also
    writes ``betas``, ``ReduceLROnPlateau``) never cause a recompilation. Other values (ints,
    strings, bools, lists, callables, or names in ``static_args``) are static: changing one
    rebuilds the step.
  * One jitted call updates every parameter of every group. It *donates* the JAX-owned optimizer
    state (no state copy per step). Parameters and gradients cross by DLPack without a copy
    (``detach()``, contiguous, 64-byte aligned; see :mod:`torch_bridge.convert`); new
    parameters are written back with one ``copy_`` each (XLA cannot write into torch memory),
    or, with ``writeback="swap"``, XLA updates JAX-owned buffers that torch views, in place
    (on CPU through :func:`convert.owned_view`, which JAX does not count as a reference, after
    checking once per compiled step that each new parameter is written into its own buffer).
  * ``state_scope="param"`` (default): every parameter has its own transform state, like torch
    optimizers. A parameter whose ``grad`` is ``None`` is skipped exactly as torch does: no
    moment decay, no weight decay, its step count does not advance. Which parameters have
    gradients is part of the compiled step's signature (one compilation per pattern; a fixed
    set of frozen parameters costs one). This needs an *elementwise or per-tensor* transform
    (AdamW, Lion, STAM, SCAO, Muon, ...): the transform sees one parameter at a time, under
    its full dotted name (``{"layers": {"0": {"weight": w}}}``), so path- and shape-based
    labels still work.
  * ``state_scope="group"``: one transform state per param group over the group's whole
    parameter tree (names split on ``.``). Use it for transforms that couple parameters
    (global-norm clipping, a whole-model ``optax.partition`` such as ``stax.stac`` with a
    module order). A ``None`` gradient then enters as zeros; the parameter is left unchanged
    and every state sub-tree laid out like the parameters (moments, codes) keeps its old value
    for that parameter, but state shared by the group (the step count) advances.
  * Matrix transforms: torch weights are ``(out, in)`` (conv ``(out, in, kh, kw)``). Pass
    ``layout_kwarg="<the factory's dimension-numbers argument>"`` and the bridge supplies, per
    parameter, ``layout_fn(tensor_shape)`` (default :func:`torch_dimension_numbers`: reduction
    axes ``1..ndim-1``, output axis ``0``, ``None`` for vectors).
  * ``state_dict()`` has torch's shape, ``{'state': {index: {name: tensor}}, 'param_groups':
    [...]}``: each parameter's JAX state leaves, named by their path in the state tree, as
    tensors of *their own* dtype. ``load_state_dict`` is overridden: ``uint8`` codes, integer
    counters and ``uint32`` RNG keys are never cast (torch's default casts every non-``step``
    tensor to the parameter dtype), and every leaf's shape and dtype is checked.
    ``torch.save`` → ``torch.load`` → continue equals the uninterrupted run bit for bit.

Errors
  Sparse gradients raise ``RuntimeError`` at ``step()``; complex, integer and (without x64)
  float64 parameters raise ``TypeError`` at construction; hyperparameters the factory does not
  accept raise ``TypeError``; invalid values raise the factory's own ``ValueError`` at
  construction; a transform whose ``update`` needs extra arguments a torch loop cannot give
  (``value=`` for ``reduce_on_plateau``, ``value_fn`` for L-BFGS line searches) raises
  ``TypeError``.

GPU
  CUDA tensors work when jaxlib has CUDA: the JAX step runs on the same device. Set
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (or ``XLA_CLIENT_MEM_FRACTION``) *before* importing
  JAX, or JAX takes 75 % of the GPU memory and torch runs out.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
# torch's global step-hook registries (``Optimizer.step`` runs them as torch's wrapper would)
from torch.optim.optimizer import _global_optimizer_post_hooks as _GLOBAL_POST_HOOKS
from torch.optim.optimizer import _global_optimizer_pre_hooks as _GLOBAL_PRE_HOOKS

from stax.transforms.guards import all_finite

from torch_bridge import convert

__all__ = ["Optimizer", "torch_dimension_numbers", "prepare_for_gradient_release",
           "remove_gradient_release", "TORCH_TO_FACTORY"]

#: Group keys that are torch bookkeeping, never factory arguments.
_RESERVED = frozenset({"params", "param_names", "transform"})
#: Hyperparameters always fed as float32 arrays (even if a user writes ``weight_decay=0``).
_FLOAT_KEYS = frozenset({"lr", "learning_rate", "eps", "eps_root", "weight_decay", "b1", "b2",
                         "betas", "momentum", "dampening", "beta", "beta1", "beta2"})
#: torch name → factory name(s), used when the factory does not take the torch name itself.
TORCH_TO_FACTORY = {"lr": ("learning_rate",), "betas": ("b1", "b2")}
_NONFINITE = (None, "skip", "error")
# torch's profiler switch (``Optimizer.step`` records itself only while one is active).
_profiler_enabled = torch._C._autograd._profiler_enabled  # pylint: disable=protected-access


def torch_dimension_numbers(shape: Sequence[int]) -> Any:
  """optax-style dimension numbers of a torch weight: output axis 0, reduction axes 1..ndim-1.

  ``None`` for tensors with fewer than two dimensions (they are not matrices).
  """
  if len(shape) < 2:
    return None
  from optax.contrib import MuonDimensionNumbers  # pylint: disable=g-import-not-at-top
  red = tuple(range(1, len(shape)))
  return MuonDimensionNumbers(reduction_axis=red if len(red) > 1 else red[0], output_axis=0)


def _nest(names: Sequence[str], leaves: Sequence[Any]) -> dict:
  """``{"a": {"0": {"weight": x}}}`` from dotted names (the tree the transform sees)."""
  tree: dict = {}
  for name, leaf in zip(names, leaves):
    parts = [p for p in str(name).split(".") if p] or [str(name)]
    node = tree
    for part in parts[:-1]:
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(f"torch_bridge: parameter name {name!r} clashes with another "
                         "parameter's name; pass distinct (name, tensor) pairs.")
      node = child
    if parts[-1] in node:
      raise ValueError(f"torch_bridge: duplicate parameter name {name!r} in one group.")
    node[parts[-1]] = leaf
  return tree


def _get(tree: dict, name: str) -> Any:
  node = tree
  for part in [p for p in str(name).split(".") if p] or [str(name)]:
    node = node[part]
  return node


def _freeze(v: Any) -> Any:
  """A hashable stand-in for a static hyperparameter (part of the compiled step's key)."""
  if isinstance(v, (list, tuple)):
    return (type(v).__name__,) + tuple(_freeze(x) for x in v)
  if isinstance(v, dict):
    return ("dict",) + tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
  try:
    hash(v)
    return (type(v).__name__, v)
  except TypeError:
    return ("id", id(v))


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _required_kwonly(fn: Callable) -> list[str]:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return []
  return [n for n, p in sig.parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty]


class _Unit(NamedTuple):
  """A set of parameters sharing one transform state (one parameter, or one whole group)."""
  group: int
  indices: tuple   # global parameter indices (positions across all groups)
  names: tuple     # their names (dotted)


class _Plan:
  """A compiled step and what feeding it needs, for one has-grad mask and static config.

  The step is jitted over a *flat* argument list (state leaves, updated parameters,
  gradients, hyperparameter vectors, [skip count], [scratch], read-only parameters): the
  per-parameter state trees of torch's semantics have ~20 pytree nodes per parameter, and
  flattening them on every call cost ~35 us at 4 parameters, as much as the rest of the
  dispatch. Hashed by identity (its cache key is a large tuple).
  """
  __slots__ = ("key", "tree_step", "fn", "donate", "units", "active", "slot", "idx_on",
               "idx_off", "inplace", "groups", "state_keys", "state_defs", "n_state")

  def __init__(self, key, tree_step, donate, units, active, slot, idx_on, idx_off, groups,
               state_keys):
    self.key = key                # the step's cache key (static configuration)
    self.tree_step = tree_step    # the step over argument trees (not jitted)
    self.donate = donate          # which of the 7 tree arguments are donated
    self.fn = None                # the jitted flat step (from the first call on)
    self.inplace = None           # per updated parameter: output written into its own buffer
    self.units = units            # ((factory, static, names, mask, slot), ...) active units
    self.active = active          # indices of the active units in ``Optimizer._units``
    self.slot = slot              # group index -> position in the hyperparameter tuple
    self.idx_on = idx_on          # parameter indices updated by the step, in output order
    self.idx_off = idx_off        # parameter indices read only (no gradient), in order
    self.groups = groups          # the groups of the active units, in slot order
    self.state_keys = state_keys  # each active unit's key in ``Optimizer._jstate``
    self.state_defs = None        # per active unit: (state treedef, number of leaves)
    self.n_state = None           # state leaves in all


class _Spec(NamedTuple):
  factory: Callable
  accepted: Optional[frozenset]   # factory argument names; None = accepts **kwargs


def _factory_spec(factory: Callable) -> _Spec:
  try:
    return _cached(_SPEC_CACHE, factory, lambda: _factory_spec_uncached(factory))
  except TypeError:  # an unhashable callable
    return _factory_spec_uncached(factory)


_SPEC_CACHE: dict = {}


def _factory_spec_uncached(factory: Callable) -> _Spec:
  try:
    sig = inspect.signature(factory)
  except (TypeError, ValueError):
    return _Spec(factory, None)
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
    return _Spec(factory, None)
  return _Spec(factory, frozenset(sig.parameters))


def _factory_defaults(factory: Callable) -> dict:
  try:
    return {n: p.default for n, p in inspect.signature(factory).parameters.items()
            if p.default is not inspect.Parameter.empty}
  except (TypeError, ValueError):
    return {}


# --------------------------------------------------------------------------------- JAX side
# Compiled steps are cached by their plan (factories, static hyperparameters, parameter names,
# has-grad masks, layout, policy), not per optimizer instance: re-creating an optimizer (e.g. to
# resume from a checkpoint) reuses the compiled step. jax.jit adds the shapes/dtypes.
_STEP_CACHE: dict = {}
_INIT_CACHE: dict = {}
_CACHE_LIMIT = 256


def _cached(cache: dict, key, make):
  fn = cache.get(key)
  if fn is None:
    if len(cache) >= _CACHE_LIMIT:
      cache.pop(next(iter(cache)))
    fn = cache[key] = make()
  return fn


def _build_tx(factory, static, traced, shapes, names, layout):
  kwargs = dict(static)
  kwargs.update(traced)
  layout_kwarg, layout_fn = layout
  if layout_kwarg is not None:
    kwargs[layout_kwarg] = _nest(names, [layout_fn(tuple(s)) for s in shapes])
  return optax.with_extra_args_support(factory(**kwargs))


def _pack(traced: dict) -> tuple:
  """(layout, float32 vector) of a group's traced hyperparameters: one jit argument instead of
  one per value (each argument costs ~2 us per call). ``layout``: ((name, n), ...), ``n`` the
  length of a tuple value (``betas``) or 0 for a scalar."""
  layout = tuple((name, len(v) if isinstance(v, tuple) else 0)
                 for name, v in sorted(traced.items()))
  vals = _layout_values(layout, traced.__getitem__)
  # the numpy view of a torch tensor: 64-byte aligned, so a CPU placement can alias it
  return layout, torch.tensor([float(v) for v in vals], dtype=torch.float32).numpy()


def _layout_values(layout: tuple, get: Callable[[str], Any]) -> list:
  """The scalars of a packed vector in order, ``get(name)`` giving each name's value."""
  vals = []
  for name, n in layout:
    if n:
      vals.extend(get(name))
    else:
      vals.append(get(name))
  return vals


def _place(vec: np.ndarray, sharding) -> tuple:
  """(``vec`` as a committed JAX array on ``sharding``'s device, whether it aliases ``vec``).

  On the CPU it is a DLPack import of ``vec``'s own (aligned) memory: writing new values
  into ``vec`` between steps updates it with no new array (a scheduler's write costs a list
  assignment, against ~19 us for ``jax.device_put`` and far more right after a memory-bound
  step). Elsewhere, or if the import had to copy, a fresh ``device_put`` per change."""
  if all(d.platform == "cpu" for d in sharding.device_set):
    t = torch.from_numpy(vec)
    a = convert.to_jax(t)
    return a, convert.shares_memory(t, a)
  return jax.device_put(vec, sharding), False


def _unpack(layout: tuple, vec) -> dict:
  """The traced hyperparameters (scalars, or tuples of them) from :func:`_pack`'s vector."""
  out, k = {}, 0
  for name, n in layout:
    if n:
      out[name] = tuple(vec[k + j] for j in range(n))
      k += n
    else:
      out[name] = vec[k]
      k += 1
  return out


def _make_init(units, layout, hp_layouts):
  """units: ((factory, static_items, names, slot), ...); hp_layouts: per slot, the layout of
  its packed hyperparameter vector."""

  def init(params, hps):
    out = []
    for (factory, static, names, slot), ps in zip(units, params):
      tx = _build_tx(factory, static, _unpack(hp_layouts[slot], hps[slot]),
                     [p.shape for p in ps], names, layout)
      st = tx.init(_nest(names, ps))
      out.append(jax.tree.map(jnp.copy, st))  # never alias a torch buffer into the state
    return tuple(out)

  return jax.jit(init)


def _make_step(units, layout, policy, hp_layouts):
  """units: ((factory, static_items, names, mask, slot), ...) for the active units;
  hp_layouts: per slot, the layout of its packed hyperparameter vector.

  The step takes each unit's parameters split by ``mask``: ``params_on`` (those with a
  gradient, updated) and ``params_off`` (read only). Which arguments are donated is the
  plan's choice (:func:`_make_flat`).
  """

  def step(states, params_on, grads, hps, skipped, scratch, params_off):
    # ``scratch``: the previous step's output parameter buffers (already copied into torch),
    # donated so XLA writes the new parameters into them instead of allocating (fresh large
    # CPU allocations page-fault on every step). A whole-array dynamic_update_slice makes the
    # buffer "used" (JAX prunes unused donations); XLA simplifies it to a plain write.
    def merged(k):
      on, off = iter(params_on[k]), iter(params_off[k])
      return tuple(next(on) if m else next(off) for m in units[k][3])

    params = tuple(merged(k) for k in range(len(units)))

    def compute(_):
      new_states, new_params = [], []
      for (factory, static, names, mask, slot), st, ps, gs in zip(units, states, params, grads):
        tx = _build_tx(factory, static, _unpack(hp_layouts[slot], hps[slot]),
                       [p.shape for p in ps], names, layout)
        full = [g if m else jnp.zeros_like(p) for g, p, m in zip(gs, ps, mask)]
        ptree = _nest(names, ps)
        try:
          upd, nst = tx.update(_nest(names, full), st, ptree)
        except (TypeError, KeyError) as e:
          if re.search(r"value|grad|missing|required", str(e)):
            raise TypeError(
                "torch_bridge: this transform's update needs arguments a torch training loop "
                f"cannot provide (optimizer.step() passes gradients and parameters): {e}") from e
          raise
        newp = optax.apply_updates(ptree, upd)
        if not all(mask):
          nst = _keep_masked(nst, st, jax.tree.structure(ptree), names, mask)
        new_params.append(tuple(_get(newp, n) for n, m in zip(names, mask) if m))
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


def _make_flat(tree_step, in_tree, counts: Sequence[int], donate: Sequence[int]):
  """``tree_step`` jitted over the flat leaves of its 7 arguments (structure ``in_tree``,
  ``counts`` leaves per argument), returning the flat leaves of its outputs; the leaves of
  the arguments in ``donate`` are donated."""
  offsets = np.cumsum([0] + list(counts))
  donate_argnums = tuple(j for a in donate for j in range(offsets[a], offsets[a + 1]))

  def flat(*leaves):
    return tuple(jax.tree.leaves(tree_step(*jax.tree.unflatten(in_tree, leaves))))

  return jax.jit(flat, donate_argnums=donate_argnums)


_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)")


def _inplace_outputs(fn, leaves: Sequence[Any], first: int, n_params: int) -> tuple:
  """Per updated parameter of the flat step ``fn`` (inputs and outputs ``first + k``), whether
  the compiled executable writes its new value into the parameter's own (donated) buffer.

  Read from the executable's input/output alias table (HLO parameter numbers count only the
  inputs JAX kept); ``False`` for every parameter when it cannot be read. The compilation is
  the one the call itself uses (jit's cache), so this costs one text dump per plan.
  """
  try:
    compiled = fn.lower(*leaves).compile()
    kept = sorted(compiled._executable._kept_var_idx)  # pylint: disable=protected-access
    head = compiled.as_text().split("\n", 1)[0]
  except Exception:  # noqa: BLE001 - e.g. a jax without these internals: never in place
    return (False,) * n_params
  aliases = {int(out): kept[int(inp)] for out, inp in _ALIAS.findall(head)}
  return tuple(aliases.get(first + k) == first + k for k in range(n_params))


class Optimizer(torch.optim.Optimizer):
  """A ``torch.optim.Optimizer`` running an optax/stax transformation through DLPack.

  Args:
    params: tensors, ``(name, tensor)`` pairs or param-group dicts (a group may carry its own
      ``"transform"`` factory).
    transform: a factory returning an ``optax.GradientTransformation`` (``stax.adamw``,
      ``optax.lion``, ...), called with each group's hyperparameters; or a ready transformation
      (then no hyperparameters may be given and schedulers have no effect).
    state_scope: ``"param"`` (default: one state per parameter, torch's ``None``-grad semantics)
      or ``"group"`` (one state per group; for transforms that couple parameters).
    static_args: factory arguments that must stay Python values (structural floats such as a
      ratio used in ``math.ceil``); ints, bools, strings and callables are static anyway.
    layout_kwarg: name of the factory's per-leaf dimension-numbers argument, filled with
      ``layout_fn(shape)`` per parameter (default ``None``: not passed).
    layout_fn: ``shape -> dimension numbers`` (default :func:`torch_dimension_numbers`).
    writeback: ``"copy"`` (default: new values are copied into each parameter's storage, which
      keeps every view, DDP bucket and tied alias valid) or ``"swap"`` (opt-in, no copy: the
      first step moves each parameter into a JAX-owned buffer — a view taken before it, or
      FSDP's flat parameters, keeps the old storage — and from then on XLA updates that buffer
      in place, the same address every step, so every later view sees each update as with a
      torch optimizer. On CUDA the view is a DLPack export: a view held elsewhere then blocks
      the donation and keeps the old values, never overwritten; the parameter moves).
    global_nonfinite: ``None`` (default: leave it to the transform), ``"skip"`` (if any gradient
      of the step is NaN/Inf, no parameter and no state changes; counted in
      :attr:`nonfinite_skipped_steps`) or ``"error"`` (the same, then ``RuntimeError``; costs one
      host sync per step).
    **defaults: default hyperparameters of every group, torch names (``lr``, ``betas``,
      ``eps``, ``weight_decay``) or the factory's own names. ``lr``, ``betas``, ``eps`` and
      ``weight_decay`` are filled from the factory's defaults when it has them.

  Example:
    >>> import torch, stax, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.Optimizer(model.parameters(), stax.adamw, lr=1e-3)
  """

  def __init__(self, params: Iterable[Any], transform: Any, *, state_scope: str = "param",
               static_args: Iterable[str] = (), layout_kwarg: Optional[str] = None,
               layout_fn: Callable[[Sequence[int]], Any] = torch_dimension_numbers,
               global_nonfinite: Optional[str] = None, writeback: str = "copy",
               **defaults: Any):
    if state_scope not in ("param", "group"):
      raise ValueError(f"`state_scope` must be 'param' or 'group', got {state_scope!r}.")
    if global_nonfinite not in _NONFINITE:
      raise ValueError(f"`global_nonfinite` must be one of {_NONFINITE}, got "
                       f"{global_nonfinite!r}.")
    if writeback not in ("copy", "swap"):
      raise ValueError(f"`writeback` must be 'copy' or 'swap', got {writeback!r}.")
    self._writeback = writeback
    if isinstance(static_args, str):
      static_args = (static_args,)
    self._fixed_tx = None
    if isinstance(transform, optax.GradientTransformation):
      if defaults:
        raise TypeError("torch_bridge: a ready transformation takes no hyperparameters "
                        f"(got {sorted(defaults)}); pass a factory such as stax.adamw instead.")
      self._fixed_tx = transform
      transform = (lambda tx: lambda: tx)(transform)  # a factory with no arguments
    elif not callable(transform):
      raise TypeError("`transform` must be a factory (e.g. stax.adamw) or an "
                      f"optax.GradientTransformation, got {type(transform).__name__}.")
    self._transform = transform
    self._state_scope = state_scope
    self._static_args = frozenset(static_args)
    self._layout_kwarg = layout_kwarg
    self._layout_fn = layout_fn
    self._global_nonfinite = global_nonfinite
    # Python-side bookkeeping (never part of the JAX state).
    self._units: list[_Unit] = []
    self._units_sig = None
    self._jstate_d: dict = {}        # unit key (tuple of indices) -> JAX state pytree
    self._live = None                # (plan, its last output states), not yet in _jstate_d
    self._used_fns: dict = {}        # plan -> jitted step this optimizer has run
    self._scratch: dict = {}         # plan -> last output parameter buffers (donated next step)
    self._pcache: dict = {}          # param index -> (storage key, JAX view of it)
    self._owners: dict = {}          # param index -> convert.Owner ("swap" on CPU)
    self._plans: dict = {}           # (units, mask, static hyperparameters) -> _Plan
    self._hp_cache: dict = {}        # group index -> (values signature, group, hyperparameters)
    self._skipped = None             # int32 JAX scalar, steps skipped by global_nonfinite
    self._device = None              # the parameters' JAX sharding (from the first step)
    self._gradient_release = False
    defaults = self._fill_defaults(transform, dict(defaults))
    super().__init__(params, defaults)

  # ----------------------------------------------------------------------------- groups
  def _fill_defaults(self, factory: Callable, defaults: dict) -> dict:
    spec = _factory_spec(factory)
    fdef = _factory_defaults(factory)
    if "lr" not in defaults and "learning_rate" not in defaults and "learning_rate" in fdef:
      if isinstance(fdef["learning_rate"], (int, float)):
        defaults["lr"] = fdef["learning_rate"]
    if "betas" not in defaults and "b1" not in defaults and "b2" not in defaults:
      if isinstance(fdef.get("b1"), (int, float)) and isinstance(fdef.get("b2"), (int, float)):
        defaults["betas"] = (fdef["b1"], fdef["b2"])
    for k in ("eps", "weight_decay"):
      if k not in defaults and isinstance(fdef.get(k), (int, float)):
        defaults[k] = fdef[k]
    for k in defaults:
      if self._map_key(spec, k, defaults[k]) is None:
        raise TypeError(f"torch_bridge: {getattr(factory, '__name__', factory)!s} has no "
                        f"argument {k!r} (torch names map as {TORCH_TO_FACTORY}).")
    return defaults

  @staticmethod
  def _map_key(spec: _Spec, key: str, value: Any):
    """[(factory_name, value), ...] for a group key, or None when the factory ignores it."""
    acc = spec.accepted
    if acc is None or key in acc:
      return [(key, value)]
    targets = TORCH_TO_FACTORY.get(key)
    if targets and all(t in acc for t in targets):
      if len(targets) == 1:
        return [(targets[0], value)]
      if not isinstance(value, (tuple, list, torch.Tensor)):
        raise TypeError(f"torch_bridge: `{key}` must be a tuple of {len(targets)} values "
                        f"({', '.join(targets)}), got {type(value).__name__} {value!r}.")
      vals = tuple(value)
      if len(vals) != len(targets):
        raise ValueError(f"torch_bridge: `{key}` must have {len(targets)} values, got {value!r}.")
      return list(zip(targets, vals))
    return None

  def _group_spec(self, group: dict) -> _Spec:
    return _factory_spec(group.get("transform", self._transform))

  def add_param_group(self, param_group: dict) -> None:
    factory = param_group.get("transform", None)
    if factory is not None and not callable(factory):
      raise TypeError("a param group's `transform` must be a factory.")
    super().add_param_group(param_group)
    group = self.param_groups[-1]
    for p in group["params"]:
      convert.check_dtype(p)
    spec = self._group_spec(group)
    # Group keys the factory does not take are metadata (torch allows any, e.g. "name").
    # Build the transform once with concrete values: the factory validates them (ValueError).
    traced, static = self._hyperparams(len(self.param_groups) - 1)
    tx = spec.factory(**{k: (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v))
                         for k, v in traced.items()}, **dict(static))
    missing = _required_kwonly(getattr(tx, "update", lambda *a, **k: None))
    if missing:
      raise TypeError(f"torch_bridge: this transform's update needs {missing}, which a torch "
                      "training loop cannot provide (optimizer.step() passes only gradients "
                      "and parameters).")
    self._units_sig = None

  def _hyperparams(self, gi: int):
    """(traced: {name: float32 array}, static: ((name, value), ...)) for group ``gi``."""
    return self._hyperparams_uncached(gi)[:2]

  def _hp_entry(self, gi: int):
    """(static, hashable key of static, layout of the packed traced values, the packed float32
    vector, {device: that vector placed there}) for group ``gi``: what a step needs. (A
    committed array costs ~20 us less per call than a numpy argument, and the step must be
    fed one kind only, or it compiles twice.)

    Cached while the group's values are unchanged plain Python values (tensors and mutable
    values are read every step). When only traced values change (a scheduler writes a new
    ``lr``), the vector is refilled from the group without re-parsing it."""
    group = self.param_groups[gi]
    sig = _signature(group)
    hit = self._hp_cache.get(gi)
    if hit is not None and hit[1] is group:
      if hit[0] == sig:
        return hit[2]
      if _is_plain(sig) and _only_traced_changed(hit[0], sig, hit[4]):
        vals = _refill(group, hit[2][2], hit[3])
        out = hit[2]
        if len(vals) == out[3].size:
          # In place: the previous step has finished reading (it blocked on its outputs),
          # and every CPU placement aliases this vector; others are placed again.
          out[3][:] = vals
          for sh in [sh for sh, (_, aliased) in out[4].items() if not aliased]:
            del out[4][sh]
          self._hp_cache[gi] = (sig, group, out, hit[3], hit[4])
          return out
    traced, static, sources = self._hyperparams_uncached(gi)
    out = (static, _freeze(static)) + _pack(traced) + ({},)
    if _is_plain(sig):
      self._hp_cache[gi] = (sig, group, out, sources,
                            frozenset(key for key, _ in sources.values()))
    return out

  def _hyperparams_uncached(self, gi: int):
    """(traced, static, sources): ``sources`` maps each traced name to the group key it came
    from and the index within that key's tuple (``betas`` → ``b1``, ``b2``), else ``None``."""
    group = self.param_groups[gi]
    spec = self._group_spec(group)
    traced, static, sources = {}, [], {}
    for key, value in group.items():
      if key in _RESERVED:
        continue
      pairs = self._map_key(spec, key, value)
      if pairs is None:
        continue  # scheduler bookkeeping (initial_lr, max_lr, base_momentum, ...)
      for j, (name, v) in enumerate(pairs):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
          v = v.item()
        floaty = key in _FLOAT_KEYS or name in _FLOAT_KEYS
        if name in self._static_args:
          static.append((name, v))
          continue
        if _is_float(v, floaty):
          traced[name] = np.asarray(v, np.float32)
        elif (isinstance(v, (tuple, list)) and v and floaty
              and all(_is_float(x, True) for x in v)):
          traced[name] = tuple(np.asarray(x, np.float32) for x in v)  # e.g. betas=(b1, b2)
        else:
          static.append((name, v))
          continue
        sources[name] = (key, j if len(pairs) > 1 else None)
    return traced, tuple(sorted(static, key=lambda kv: kv[0])), sources

  def _flat_params(self) -> list:
    return [p for g in self.param_groups for p in g["params"]]

  def _ensure_units(self) -> list:
    """The flat parameter list; (re)builds the units when the groups changed."""
    params = [p for g in self.param_groups for p in g["params"]]
    sig = (tuple(map(id, params)), tuple([len(g["params"]) for g in self.param_groups]))
    if sig != self._units_sig:
      self._build_units(sig)
    return params

  def _build_units(self, sig) -> None:
    units, idx = [], 0
    for gi, g in enumerate(self.param_groups):
      n = len(g["params"])
      names = list(g.get("param_names") or [f"param_{i}" for i in range(idx, idx + n)])
      names = [str(x) for x in names]
      ids = list(range(idx, idx + n))
      if self._state_scope == "param":
        units += [_Unit(gi, (i,), (nm,)) for i, nm in zip(ids, names)]
      elif n:
        _nest(names, [0] * n)  # name clash check
        units.append(_Unit(gi, tuple(ids), tuple(names)))
      idx += n
    self._units, self._units_sig = units, sig
    self._plans = {}  # plans index units: rebuild them

  # ----------------------------------------------------------------------------- stepping
  def step(self, closure: Optional[Callable[[], Any]] = None):
    """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss.

    Step pre/post hooks (global and this optimizer's) run as torch runs them, and the step
    is recorded as ``Optimizer.step#<class>.step`` when a profiler is active; torch's own
    wrapper is not installed (its ``record_function`` costs ~5-20 us per step even with no
    profiler, a tenth of a 1M-parameter step).
    """
    if _profiler_enabled():
      with torch.autograd.profiler.record_function(
          f"Optimizer.step#{type(self).__name__}.step"):
        return self._hooked_step(closure)
    return self._hooked_step(closure)

  step.hooked = True  # torch.optim.Optimizer does not wrap it again (see _patch_step_function)

  def _hooked_step(self, closure):
    args, kwargs = (self,) if closure is None else (self, closure), {}
    if _GLOBAL_PRE_HOOKS or self._optimizer_step_pre_hooks:
      for hook in (*_GLOBAL_PRE_HOOKS.values(), *self._optimizer_step_pre_hooks.values()):
        result = hook(self, args, kwargs)
        if result is not None:
          if not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got "
                               f"{result!r}.")
          args, kwargs = result
      closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    if not self._gradient_release:  # else each parameter was stepped by its grad hook
      with torch.no_grad():
        self._run(None)
    self._optimizer_step_code()
    if _GLOBAL_POST_HOOKS or self._optimizer_step_post_hooks:
      for hook in (*self._optimizer_step_post_hooks.values(), *_GLOBAL_POST_HOOKS.values()):
        hook(self, args, kwargs)
    return loss

  def _run(self, only: Optional[set]) -> None:
    params = self._ensure_units()
    if only is None:
      mask = tuple([p.grad is not None for p in params])
    else:
      mask = tuple([p.grad is not None and i in only for i, p in enumerate(params)])
    if True not in mask:
      return
    hp = [self._hp_entry(gi) for gi in range(len(self.param_groups))]
    pkey = (mask, tuple([(self._factory(gi), h[1], h[2]) for gi, h in enumerate(hp)]))
    plan = self._plans.get(pkey)
    if plan is None:
      plan = _cached(self._plans, pkey, lambda: self._make_plan(mask, hp))
    idx_on, idx_off = plan.idx_on, plan.idx_off
    p_on = [self._param_jax(i, params[i]) for i in idx_on]
    p_off = [self._param_jax(i, params[i]) for i in idx_off]
    if self._skipped is None:
      self._skipped = jax.device_put(np.zeros((), np.int32), p_on[0].device)
    if self._device is None:
      self._device = p_on[0].sharding
    hps = []
    for gi in plan.groups:  # each group's vector, placed on the device once per change
      placed = hp[gi][4].get(self._device)
      if placed is None:
        placed = hp[gi][4][self._device] = _place(hp[gi][3], self._device)
      hps.append(placed[0])
    live = self._live
    if live is not None and live[0] is plan:
      state_leaves = live[1]  # the previous step's outputs, same plan: no bookkeeping
    else:
      state_leaves = self._state_leaves(plan, hp, hps, params)
    grads = [convert.grad_to_jax(params[i].grad) for i in idx_on]  # sparse: raises
    skipped = [] if self._global_nonfinite is None else [self._skipped]
    swap = self._writeback == "swap"
    guards = []
    if swap:
      # "swap": from the first step on, each parameter's storage is a JAX-owned buffer that
      # the step donates and XLA updates in place. On CPU torch views it through an
      # ``Owner`` (no DLPack reference, so JAX may donate it while torch keeps viewing it):
      # nothing to hand over per step, and every view of the parameter sees the update. That
      # needs the compiled step to write each new parameter into its own input buffer (checked
      # once per plan from the executable's aliases); otherwise a DLPack export per parameter
      # blocks the donation (JAX writes new buffers, torch is re-pointed to them). Elsewhere
      # (CUDA) torch views the buffers through DLPack and lets go of them for the call.
      scratch = []
    else:
      # "copy": the previous step's outputs (already copied into torch) are overwritten.
      scratch = self._scratch.pop(plan, None)
      if scratch is None:
        scratch = [jnp.zeros(a.shape, a.dtype, device=a.sharding) for a in p_on]
    leaves = [*state_leaves, *p_on, *grads, *hps, *skipped, *scratch, *p_off]
    if plan.fn is None:
      self._compile(plan, leaves)
    if swap:
      if self._owners and plan.inplace is None:
        plan.inplace = _inplace_outputs(plan.fn, leaves, plan.n_state, len(p_on))
      for k, i in enumerate(idx_on):
        if i in self._owners:
          if not plan.inplace[k]:
            guards.append(convert.to_torch(p_on[k]))
        elif not params[i].is_cpu:
          params[i].data = _placeholder(params[i])
    try:
      out = plan.fn(*leaves)
    except BaseException:
      if swap:  # the call failed before running: give torch its (undonated) buffers back
        for i, a in zip(idx_on, p_on):
          if not params[i].is_cpu:
            params[i].data = convert.to_torch(a)
      raise
    # Drop the inputs now: the donated ones die while XLA runs, not after the wait.
    self._live = None
    del leaves, state_leaves, grads, scratch, guards, p_off, live
    n_state, n_on = plan.n_state, len(idx_on)
    # Bookkeeping while XLA runs: the outputs' buffers are known at dispatch.
    self._live = (plan, out[:n_state])
    flat_new = out[n_state:n_state + n_on]
    if skipped:
      self._skipped, ok = out[n_state + n_on], out[n_state + n_on + 1]
    late = ()
    if swap:
      late = []
      for i, a in zip(idx_on, flat_new):
        owner = self._owners.get(i)
        if owner is not None and a.unsafe_buffer_pointer() == owner.ptr:
          owner.array = a  # updated in place: torch already views this buffer
        elif params[i].is_cpu:
          t, owner = convert.owned_view(a)  # the JAX buffer itself (read after the wait)
          params[i].data = t
          owner.key = (t.shape, t.dtype)
          self._owners[i] = owner
          self._pcache.pop(i, None)
        else:
          late.append((i, a))
    del out, p_on
    # Torch reads only the parameters; the next JAX call orders itself after the states.
    jax.block_until_ready(flat_new)
    if not swap:
      torch._foreach_copy_([params[i] for i in idx_on],  # pylint: disable=protected-access
                           [convert.to_torch(a) for a in flat_new])
      self._scratch = {plan: list(flat_new)}  # donated to the next step with this plan
    for i, a in late:  # DLPack views (CUDA): made once the buffers are ready
      t = convert.to_torch(a)
      params[i].data = t
      self._pcache[i] = (_storage_key(t), a)
    if self._global_nonfinite == "error" and not bool(ok):
      raise RuntimeError("torch_bridge: non-finite gradient (NaN/Inf); the step was skipped "
                         "for every parameter.")

  def _state_leaves(self, plan: "_Plan", hp: list, hps: list, params: list) -> list:
    """The flat state leaves of ``plan``'s units, from their filed states (initialised if
    missing); records each unit's state structure in the plan."""
    jstate = self._jstate
    missing = [k for k, key in enumerate(plan.state_keys) if key not in jstate]
    if missing:
      jparams = [tuple(self._param_jax(i, params[i]) for i in self._units[plan.active[k]].indices)
                 for k in missing]
      self._init_states(missing, plan, hp, tuple(hps), jparams)
    leaves, defs = [], []
    for key in plan.state_keys:
      ls, tdef = jax.tree.flatten(jstate[key])
      leaves.extend(ls)
      defs.append((tdef, len(ls)))
    plan.state_defs, plan.n_state = tuple(defs), len(leaves)
    return leaves

  def _compile(self, plan: "_Plan", leaves: list) -> None:
    """Builds ``plan.fn``, the flat jitted step, from the argument structure of ``leaves``
    (rebuilt into the step's 7 argument trees once, to learn that structure)."""
    n_on, n_off = len(plan.idx_on), len(plan.idx_off)
    units = plan.units
    n_hps, n_skip = len(plan.groups), 0 if self._global_nonfinite is None else 1
    n_scratch = 0 if self._writeback == "swap" else n_on

    def split(seq, masks, keep):
      it = iter(seq)
      return tuple(tuple(next(it) for m in mask if m == keep) for mask in masks)

    masks = [u[3] for u in units]
    k = 0
    states = []
    for tdef, n in plan.state_defs:
      states.append(jax.tree.unflatten(tdef, leaves[k:k + n]))
      k += n
    on = leaves[k:k + n_on]
    k += n_on
    gr = iter(leaves[k:k + n_on])
    grads = tuple(tuple(next(gr) if m else None for m in mask) for mask in masks)
    k += n_on
    hps = tuple(leaves[k:k + n_hps])
    k += n_hps
    skipped = leaves[k] if n_skip else None
    k += n_skip
    scratch = split(leaves[k:k + n_scratch], masks, True) if n_scratch else None
    k += n_scratch
    args = (tuple(states), split(on, masks, True), grads, hps, skipped, scratch,
            split(leaves[k:k + n_off], masks, False))
    flat, in_tree = jax.tree.flatten(args)
    if len(flat) != len(leaves) or any(a is not b for a, b in zip(flat, leaves)):
      raise AssertionError("torch_bridge: internal error, the step's flat arguments are out "
                           "of order.")
    counts = [len(jax.tree.leaves(a)) for a in args]
    plan.fn = _cached(_STEP_CACHE, (plan.key, in_tree),
                      lambda: _make_flat(plan.tree_step, in_tree, counts, plan.donate))
    self._used_fns[id(plan.fn)] = plan.fn

  @property
  def _jstate(self) -> dict:
    """unit key (tuple of parameter indices) -> the unit's current JAX state."""
    self._flush_live()
    return self._jstate_d

  def _flush_live(self) -> None:
    """Files the last step's output states under their units (a step keeps them as one tuple,
    handed straight to the next step with the same plan)."""
    if self._live is not None:
      plan, leaves = self._live
      self._live = None
      k = 0
      for key, (tdef, n) in zip(plan.state_keys, plan.state_defs):
        self._jstate_d[key] = jax.tree.unflatten(tdef, leaves[k:k + n])
        k += n

  def _factory(self, gi: int) -> Callable:
    return self.param_groups[gi].get("transform", self._transform)

  def _make_plan(self, mask: tuple, hp: list) -> "_Plan":
    """What one has-grad pattern and set of static hyperparameters compiles to (cached)."""
    active = tuple(ui for ui, u in enumerate(self._units) if any(mask[i] for i in u.indices))
    groups = sorted({self._units[ui].group for ui in active})
    slot = {gi: k for k, gi in enumerate(groups)}
    layout = (self._layout_kwarg, self._layout_fn)
    units = tuple((self._factory(u.group), hp[u.group][0], u.names,
                   tuple(mask[i] for i in u.indices), slot[u.group])
                  for u in (self._units[ui] for ui in active))
    hp_layouts = tuple(hp[gi][2] for gi in groups)
    key = (tuple((f, _freeze(st), n, m, sl) for f, st, n, m, sl in units), layout,
           self._global_nonfinite, self._writeback, hp_layouts)
    swap = self._writeback == "swap"
    tree_step = _make_step(units, layout, self._global_nonfinite, hp_layouts)
    idx_on = tuple(i for ui in active for i in self._units[ui].indices if mask[i])
    idx_off = tuple(i for ui in active for i in self._units[ui].indices if not mask[i])
    # donated: states, [params_on (swap)], skip count, [scratch (copy)]
    donate = (0, 1, 4) if swap else (0, 4, 5)
    return _Plan(key, tree_step, donate, units, active, slot, idx_on, idx_off, tuple(groups),
                 tuple(self._units[ui].indices for ui in active))

  def _init_states(self, missing, plan, hp, hps, jparams) -> None:
    layout = (self._layout_kwarg, self._layout_fn)
    units = tuple((self._factory(u.group), hp[u.group][0], u.names, plan.slot[u.group])
                  for u in (self._units[plan.active[k]] for k in missing))
    hp_layouts = tuple(hp[gi][2] for gi in plan.groups)
    key = (tuple((f, _freeze(st), n, sl) for f, st, n, sl in units), layout, hp_layouts)
    fn = _cached(_INIT_CACHE, key, lambda: _make_init(units, layout, hp_layouts))
    news = fn(tuple(jparams), hps)  # jparams: the missing units' parameters
    for k, st, ps in zip(missing, news, jparams):
      # commit to the parameters' device, as step outputs are (else the step compiles twice)
      self._jstate[self._units[plan.active[k]].indices] = jax.device_put(st, ps[0].device)

  def _param_jax(self, i: int, p: torch.Tensor) -> jax.Array:
    """The JAX view of parameter ``i``, cached while its storage stays put (``copy_``
    writeback keeps it): the view aliases the memory, so it always reads current values."""
    owner = self._owners.get(i)
    if owner is not None:
      if p.data_ptr() == owner.ptr and p.shape == owner.key[0] and p.dtype is owner.key[1]:
        return owner.array
      del self._owners[i]  # p.data was replaced: its new storage is torch's
    key = _storage_key(p)
    hit = self._pcache.get(i)
    if hit is not None and hit[0] == key:
      return hit[1]
    a = convert.to_jax(p)
    if convert.shares_memory(p, a):
      self._pcache[i] = (key, a)
    return a

  def describe(self) -> Any:
    """Every parameter: its rule, matrix view and state, by torch name (:func:`stax.describe`).

    Built from each group's current hyperparameters and the transform each parameter (or,
    with ``state_scope="group"``, each group) runs; nothing is stepped or allocated.
    Returns a :class:`stax.Description` whose paths are the parameters' dotted names.
    """
    from stax.describe import Description  # pylint: disable=g-import-not-at-top
    import stax  # pylint: disable=g-import-not-at-top
    params = self._ensure_units()
    rows, shared = [], 0
    for u in self._units:
      traced, static = self._hyperparams(u.group)
      spec = self._group_spec(self.param_groups[u.group])
      plain = {k: (tuple(float(x) for x in v) if isinstance(v, tuple) else float(v))
               for k, v in traced.items()}
      shapes = [tuple(params[i].shape) for i in u.indices]
      tx = _build_tx(spec.factory, static, plain, shapes, u.names,
                     (self._layout_kwarg, self._layout_fn))
      tree = _nest(u.names, [jax.ShapeDtypeStruct(tuple(params[i].shape),
                                                  jnp.dtype(str(params[i].dtype)[6:]))
                             for i in u.indices])
      d = stax.describe(tx, tree)
      by = d.by_path
      shared += d.shared_bytes
      for name in u.names:
        r = by["/".join(p for p in str(name).split(".") if p) or str(name)]
        rows.append(r._replace(path=str(name)))
    out = Description(rows)
    out.shared_bytes = shared
    return out

  @property
  def trace_count(self) -> int:
    """Compilations of the steps this optimizer ran (one per has-grad pattern and shape set;
    hyperparameter changes add none)."""
    return sum(fn._cache_size() for fn in self._used_fns.values())  # pylint: disable=protected-access

  @property
  def nonfinite_skipped_steps(self) -> int:
    """Steps skipped by ``global_nonfinite`` (host sync when read)."""
    return 0 if self._skipped is None else int(self._skipped)

  # ----------------------------------------------------------------------------- state_dict
  def state_dict(self) -> dict:
    """torch-shaped state: ``{'state': {index: {leaf_path: tensor}}, 'param_groups': [...]}``."""
    for hook in self._optimizer_state_dict_pre_hooks.values():
      hook(self)
    groups, start = [], 0
    for g in self.param_groups:
      # Callables (factories, schedules) are code, not data: not saved; a loaded group keeps
      # the current ones.
      packed = {k: v for k, v in g.items() if k not in ("params", "transform")
                and not callable(v)}
      packed["params"] = list(range(start, start + len(g["params"])))
      start += len(g["params"])
      groups.append(packed)
    state = {}
    for key, st in self._jstate.items():
      leaves = jax.tree_util.tree_flatten_with_path(st)[0]
      state[key[0]] = {_path_str(p): convert.to_torch(x).clone() for p, x in leaves}
    out = {"state": state, "param_groups": groups}
    if self._skipped is not None:
      out["bridge"] = {"nonfinite_skipped_steps": convert.to_torch(self._skipped).clone()}
    for hook in self._optimizer_state_dict_post_hooks.values():
      hooked = hook(self, out)
      if hooked is not None:
        out = hooked
    return out

  def load_state_dict(self, state_dict: dict) -> None:
    """Loads a :meth:`state_dict`; state tensors keep their dtypes (no cast to the param's)."""
    for hook in self._optimizer_load_state_dict_pre_hooks.values():
      hooked = hook(self, state_dict)
      if hooked is not None:
        state_dict = hooked
    saved = state_dict["param_groups"]
    if len(saved) != len(self.param_groups):
      raise ValueError("loaded state dict has a different number of parameter groups")
    for g, sg in zip(self.param_groups, saved):
      if len(g["params"]) != len(sg["params"]):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the "
                         "size of optimizer's group")
    for g, sg in zip(self.param_groups, saved):
      for k, v in sg.items():
        if k != "params":
          g[k] = v
    self._ensure_units()
    params = self._flat_params()
    saved_state = state_dict["state"]
    new_jstate = {}
    for ui, unit in enumerate(self._units):
      entry = saved_state.get(unit.indices[0])
      if entry is None:
        continue
      template = self._state_template(ui)
      leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
      dev = params[unit.indices[0]].device
      vals = []
      for path, spec in leaves:
        name = _path_str(path)
        if name not in entry:
          raise ValueError(f"torch_bridge: state of parameter {unit.indices[0]} lacks {name!r}.")
        t = entry[name]
        if not isinstance(t, torch.Tensor):
          t = torch.as_tensor(t)
        if (tuple(t.shape) != tuple(spec.shape)
            or str(t.dtype).replace("torch.", "") != jnp.dtype(spec.dtype).name):
          raise ValueError(
              f"torch_bridge: state {name!r} of parameter {unit.indices[0]} is "
              f"{t.dtype}{tuple(t.shape)}, expected {spec.dtype}{tuple(spec.shape)}.")
        a = convert.to_jax(t.to(device=dev))
        if tuple(a.shape) != tuple(spec.shape) or a.dtype != spec.dtype:
          raise ValueError(
              f"torch_bridge: state {name!r} of parameter {unit.indices[0]} is "
              f"{a.dtype}{tuple(a.shape)}, expected {spec.dtype}{tuple(spec.shape)}.")
        vals.append(jax.device_put(a, list(a.devices())[0], may_alias=False))
      extra = set(entry) - {_path_str(p) for p, _ in leaves}
      if extra:
        raise ValueError(f"torch_bridge: unexpected state keys {sorted(extra)} for parameter "
                         f"{unit.indices[0]}.")
      new_jstate[unit.indices] = jax.tree_util.tree_unflatten(
          jax.tree.structure(template), vals)
    self._live = None
    self._jstate_d = new_jstate
    bridge = state_dict.get("bridge")
    self._skipped = None
    if bridge is not None:
      sk = convert.to_jax(bridge["nonfinite_skipped_steps"])
      self._skipped = jax.device_put(sk, list(sk.devices())[0], may_alias=False)
    for hook in self._optimizer_load_state_dict_post_hooks.values():
      hook(self)

  def _state_template(self, ui: int):
    unit = self._units[ui]
    params = self._flat_params()
    traced, static = self._hyperparams(unit.group)
    factory = self.param_groups[unit.group].get("transform", self._transform)
    layout = (self._layout_kwarg, self._layout_fn)
    shapes = [jax.ShapeDtypeStruct(tuple(params[i].shape),
                                   jnp.dtype(str(params[i].dtype).replace("torch.", "")))
              for i in unit.indices]

    def init(ps, hps):
      tx = _build_tx(factory, static, hps, [p.shape for p in ps], unit.names, layout)
      return tx.init(_nest(unit.names, ps))

    return jax.eval_shape(init, shapes, traced)

  # ----------------------------------------------------------------------------- release
  def _step_param(self, p: torch.Tensor) -> None:
    params = self._flat_params()
    for i, q in enumerate(params):
      if q is p:
        self._run({i})
        return
    raise ValueError("torch_bridge: this parameter is not in the optimizer.")


_PLACEHOLDERS: dict = {}


def _placeholder(p: torch.Tensor) -> torch.Tensor:
  """An empty tensor of ``p``'s dtype and device, for ``p.data`` while XLA owns its buffer."""
  key = (p.dtype, p.device)
  t = _PLACEHOLDERS.get(key)
  if t is None:
    t = _PLACEHOLDERS[key] = torch.empty((0,), dtype=p.dtype, device=p.device)
  return t


def _storage_key(p: torch.Tensor) -> tuple:
  return (p.data_ptr(), p.shape, p.dtype, p.device)


_PLAIN = (int, float, str, bool, type(None))


def _signature(group: dict) -> tuple:
  """The group's non-parameter items with their types (compared step to step)."""
  return tuple([(k, v.__class__, v) for k, v in group.items() if k not in _RESERVED])


def _only_traced_changed(old: tuple, new: tuple, traced_keys: frozenset) -> bool:
  """True when two :func:`_signature` s differ only in the values of ``traced_keys``."""
  if len(old) != len(new):
    return False
  for (k0, t0, v0), (k1, t1, v1) in zip(old, new):
    if k0 != k1 or t0 is not t1 or (k0 not in traced_keys and v0 != v1):
      return False
  return True


def _refill(group: dict, layout: tuple, sources: dict) -> list:
  """The values of :func:`_pack`'s vector read again from the group's current values."""

  def get(name):
    key, j = sources[name]
    return group[key] if j is None else group[key][j]

  return _layout_values(layout, get)


def _is_plain(sig: tuple) -> bool:
  """True when every value of a :func:`_signature` is an immutable plain value (or a tuple of
  them): only such a signature may be cached, since a mutable value (a list, a tensor) could
  change in place and still compare equal to itself. A later signature compares equal to a
  plain one only by value, so the cache stays correct whatever that later one holds."""
  for _, t, v in sig:
    if t is tuple:
      if not all(isinstance(x, _PLAIN) for x in v):
        return False
    elif not issubclass(t, _PLAIN):
      return False
  return True


def _is_float(v: Any, floaty: bool) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, (float, np.floating)):
    return True
  return floaty and isinstance(v, (int, np.integer))


def _keep_masked(new, old, ptreedef, names, mask):
  """Keeps ``old`` for unmasked parameters in every state sub-tree laid out like the params."""

  def param_like(x):
    if x is None or isinstance(x, (jax.Array, np.ndarray)):
      return False
    try:
      ptreedef.flatten_up_to(x)
      return True
    except (ValueError, TypeError):
      return False

  def select(n, o):
    if not param_like(n):
      return n
    ns, os_ = ptreedef.flatten_up_to(n), ptreedef.flatten_up_to(o)
    # flatten order of a dict tree is sorted by key: map each name to its flatten position.
    order = _flat_names(ptreedef, names)
    keep = dict(zip(names, mask))
    return ptreedef.unflatten([a if keep[nm] else b for nm, a, b in zip(order, ns, os_)])

  return jax.tree.map(select, new, old, is_leaf=param_like)


def _flat_names(ptreedef, names):
  tree = _nest(names, list(names))
  return ptreedef.flatten_up_to(tree)


def prepare_for_gradient_release(params_or_model: Any, optimizer: Optimizer) -> list:
  """Steps each parameter from its post-accumulate-grad hook, then frees its gradient.

  After ``loss.backward()`` every parameter is already updated and its ``grad`` is ``None``;
  ``optimizer.step()`` only runs the closure. Needs ``state_scope="param"`` (each parameter has
  its own state) and no ``global_nonfinite`` policy. Each parameter's step is compiled once
  (first backward). Returns the hook handles; :func:`remove_gradient_release` removes them.
  """
  if not isinstance(optimizer, Optimizer):
    raise TypeError("prepare_for_gradient_release needs a torch_bridge.Optimizer.")
  if optimizer._state_scope != "param" or optimizer._global_nonfinite is not None:  # pylint: disable=protected-access
    raise ValueError("gradient release needs state_scope='param' and global_nonfinite=None.")
  params = (params_or_model.parameters() if isinstance(params_or_model, torch.nn.Module)
            else params_or_model)

  def hook(p):
    if p.grad is None:
      return
    optimizer._step_param(p)  # pylint: disable=protected-access
    p.grad = None

  handles = [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
  optimizer._gradient_release = True  # pylint: disable=protected-access
  optimizer._release_handles = handles  # pylint: disable=protected-access
  return handles


def remove_gradient_release(optimizer: Optimizer) -> None:
  """Removes the hooks of :func:`prepare_for_gradient_release`; ``step()`` steps again."""
  for h in getattr(optimizer, "_release_handles", []):
    h.remove()
  optimizer._release_handles = []  # pylint: disable=protected-access
  optimizer._gradient_release = False  # pylint: disable=protected-access
