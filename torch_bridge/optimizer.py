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
    ``momentum`` always) are fed to the jitted step as typed float32 arrays, exactly the
    ``optax.inject_hyperparams`` mechanism: the factory is re-invoked inside the trace with
    traced values, so LR schedulers (``StepLR``, ``CosineAnnealingLR``, ``OneCycleLR`` which also
    writes ``betas``, ``ReduceLROnPlateau``) never cause a recompilation. Other values (ints,
    strings, bools, lists, callables, or names in ``static_args``) are static: changing one
    rebuilds the step.
  * One jitted call updates every parameter of every group. It *donates* the JAX-owned optimizer
    state (no state copy per step). Parameters and gradients cross by DLPack without a copy
    (``detach()``, contiguous, 64-byte aligned; see :mod:`torch_bridge.convert`); new
    parameters are written back with one ``copy_`` each (XLA cannot write into torch memory),
    or, with ``writeback="swap"``, XLA updates JAX-owned buffers that torch views, in place.
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

  Hashed by identity: the step cache key it carries is a large tuple, too slow to hash on
  every step.
  """
  __slots__ = ("fn", "units", "active", "slot", "idx_on")

  def __init__(self, fn, units, active, slot, idx_on):
    self.fn = fn            # the jitted step (shared through _STEP_CACHE)
    self.units = units      # ((factory, static, names, mask, slot), ...) of the active units
    self.active = active    # indices of the active units in ``Optimizer._units``
    self.slot = slot        # group index -> position in the step's hyperparameter tuple
    self.idx_on = idx_on    # parameter indices updated by the step, in output order


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


def _make_init(units, layout):
  """units: ((factory, static_items, names, slot), ...)."""

  def init(params, hps):
    out = []
    for (factory, static, names, slot), ps in zip(units, params):
      tx = _build_tx(factory, static, hps[slot], [p.shape for p in ps], names, layout)
      st = tx.init(_nest(names, ps))
      out.append(jax.tree.map(jnp.copy, st))  # never alias a torch buffer into the state
    return tuple(out)

  return jax.jit(init)


def _make_step(units, layout, policy, donate_params):
  """units: ((factory, static_items, names, mask, slot), ...) for the active units.

  The step takes each unit's parameters split by ``mask``: ``params_on`` (those with a
  gradient, updated; donated when ``donate_params``) and ``params_off`` (read only).
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
        tx = _build_tx(factory, static, hps[slot], [p.shape for p in ps], names, layout)
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
    if policy is None:
      new_params, new_states = compute(None)
      return new_states, into_scratch(new_params), skipped, jnp.array(True)
    ok = all_finite([g for gs in grads for g in gs if g is not None])

    def skip(_):
      return tuple(params_on), tuple(states)

    new_params, new_states = jax.lax.cond(ok, compute, skip, None)
    skipped = jnp.where(ok, skipped, optax.safe_increment(skipped))
    return new_states, into_scratch(new_params), skipped, ok

  return jax.jit(step, donate_argnums=(0, 1, 4) if donate_params else (0, 4, 5))


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
      keeps every view, DDP bucket and tied alias valid) or ``"swap"`` (opt-in, no copy: from
      the first step each ``p.data`` is a torch view of a JAX-owned buffer that XLA updates in
      place, the same address every step; a view held elsewhere — ``p.detach()``, FSDP flat
      parameters — blocks that, and is then left with the old values, never overwritten).
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
    self._jstate: dict = {}          # unit key (tuple of indices) -> JAX state pytree
    self._used_fns: dict = {}        # plan -> jitted step this optimizer has run
    self._scratch: dict = {}         # plan -> last output parameter buffers (donated next step)
    self._pcache: dict = {}          # param index -> (storage key, JAX view of it)
    self._plans: dict = {}           # (units, mask, static hyperparameters) -> _Plan
    self._hp_cache: dict = {}        # group index -> (values signature, group, hyperparameters)
    self._skipped = None             # int32 JAX scalar, steps skipped by global_nonfinite
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
    """(traced: {name: float32 array}, static: ((name, value), ...)) for group ``gi``.

    Cached while the group's values are unchanged plain Python values (a scheduler writes new
    floats, which changes the signature; tensors and mutable values are read every step)."""
    group = self.param_groups[gi]
    sig = _plain_signature(group)
    if sig is not None:
      hit = self._hp_cache.get(gi)
      if hit is not None and hit[0] == sig and hit[1] is group:
        return hit[2]
    out = self._hyperparams_uncached(gi)
    if sig is not None:
      self._hp_cache[gi] = (sig, group, out)
    return out

  def _hyperparams_uncached(self, gi: int):
    group = self.param_groups[gi]
    spec = self._group_spec(group)
    traced, static = {}, []
    for key, value in group.items():
      if key in _RESERVED:
        continue
      pairs = self._map_key(spec, key, value)
      if pairs is None:
        continue  # scheduler bookkeeping (initial_lr, max_lr, base_momentum, ...)
      for name, v in pairs:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
          v = v.item()
        floaty = key in _FLOAT_KEYS or name in _FLOAT_KEYS
        if name in self._static_args:
          static.append((name, v))
        elif _is_float(v, floaty):
          traced[name] = np.asarray(v, np.float32)
        elif (isinstance(v, (tuple, list)) and v and floaty
              and all(_is_float(x, True) for x in v)):
          traced[name] = tuple(np.asarray(x, np.float32) for x in v)  # e.g. betas=(b1, b2)
        else:
          static.append((name, v))
    return traced, tuple(sorted(static, key=lambda kv: kv[0]))

  def _flat_params(self) -> list:
    return [p for g in self.param_groups for p in g["params"]]

  def _ensure_units(self) -> None:
    sig = tuple(tuple(id(p) for p in g["params"]) for g in self.param_groups)
    if sig == self._units_sig:
      return
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
  @torch.no_grad()
  def step(self, closure: Optional[Callable[[], Any]] = None):
    """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    if self._gradient_release:
      return loss  # each parameter was already stepped by its post-accumulate-grad hook
    self._run(None)
    return loss

  def _run(self, only: Optional[set]) -> None:
    self._ensure_units()
    params = self._flat_params()
    mask = []
    for i, p in enumerate(params):
      g = p.grad
      has = g is not None and (only is None or i in only)
      if has and g.is_sparse:
        raise RuntimeError("torch_bridge: sparse gradients are not supported; use a dense "
                           "embedding (sparse=False) or torch.optim.SparseAdam for it.")
      mask.append(has)
    mask = tuple(mask)
    if not any(mask):
      return
    groups = sorted({self._units[ui].group for ui in range(len(self._units))
                     if any(mask[i] for i in self._units[ui].indices)})
    hp = {gi: self._hyperparams(gi) for gi in groups}
    hps = tuple(hp[gi][0] for gi in groups)
    pkey = (mask,
            tuple((gi, self._factory(gi), _freeze(hp[gi][1])) for gi in groups))
    plan = _cached(self._plans, pkey, lambda: self._make_plan(mask, groups, hp))
    units, active = plan.units, plan.active

    jparams = [tuple(self._param_jax(i, params[i]) for i in self._units[ui].indices)
               for ui in active]
    missing = [k for k, ui in enumerate(active) if self._units[ui].indices not in self._jstate]
    if missing:
      self._init_states(missing, plan, hp, hps, jparams)
    self._used_fns[id(plan.fn)] = plan.fn
    jgrads = tuple(tuple(convert.to_jax(params[i].grad) if mask[i] else None
                         for i in self._units[ui].indices) for ui in active)
    states = tuple(self._jstate[self._units[ui].indices] for ui in active)
    if self._skipped is None:
      self._skipped = jax.device_put(np.zeros((), np.int32), jparams[0][0].device)
    p_on = tuple(tuple(p for p, m in zip(ps, u[3]) if m) for ps, u in zip(jparams, units))
    p_off = tuple(tuple(p for p, m in zip(ps, u[3]) if not m) for ps, u in zip(jparams, units))
    idx_on = plan.idx_on
    del jparams
    swap = self._writeback == "swap"
    if swap:
      # "swap": torch's parameters view JAX-owned buffers (from the first step on). Torch lets
      # go of them for the call (a placeholder storage), so the donated buffers have no
      # outside reference and XLA updates them in place; torch then views the outputs, which
      # are the same buffers. A buffer still viewed elsewhere (a user's ``p.detach()``) cannot
      # be donated: JAX writes a fresh buffer instead, and that view keeps the old values.
      scratch = None
      for i in idx_on:
        params[i].data = _placeholder(params[i])
    else:
      # "copy": the previous step's outputs (already copied into torch) are overwritten.
      scratch = self._scratch.pop(plan, None)
      if scratch is None:
        scratch = tuple(tuple(jnp.zeros(p.shape, p.dtype, device=list(p.devices())[0])
                              for p in ps) for ps in p_on)
    try:
      new_states, new_params, self._skipped, ok = plan.fn(states, p_on, jgrads, hps,
                                                          self._skipped, scratch, p_off)
    except BaseException:
      if swap:  # the call failed before running: give torch its (undonated) buffers back
        for i, a in zip(idx_on, (a for ps in p_on for a in ps)):
          params[i].data = convert.to_torch(a)
      raise
    del jgrads, scratch, p_on
    jax.block_until_ready((new_params, new_states))
    for ui, st in zip(active, new_states):
      self._jstate[self._units[ui].indices] = st
    for i, a in zip(idx_on, (a for ps in new_params for a in ps)):
      if swap:
        t = convert.to_torch(a)  # the JAX buffer itself: no copy
        params[i].data = t
        self._pcache[i] = (_storage_key(t), a)
      else:
        params[i].copy_(convert.to_torch(a))
    if not swap:
      self._scratch = {plan: new_params}  # donated to the next step with this plan
    if self._global_nonfinite == "error" and not bool(ok):
      raise RuntimeError("torch_bridge: non-finite gradient (NaN/Inf); the step was skipped "
                         "for every parameter.")

  def _factory(self, gi: int) -> Callable:
    return self.param_groups[gi].get("transform", self._transform)

  def _make_plan(self, mask: tuple, groups: list, hp: dict) -> "_Plan":
    """What one has-grad pattern and set of static hyperparameters compiles to (cached)."""
    active = tuple(ui for ui, u in enumerate(self._units) if any(mask[i] for i in u.indices))
    slot = {gi: k for k, gi in enumerate(groups)}
    layout = (self._layout_kwarg, self._layout_fn)
    units = tuple((self._factory(u.group), hp[u.group][1], u.names,
                   tuple(mask[i] for i in u.indices), slot[u.group])
                  for u in (self._units[ui] for ui in active))
    key = (tuple((f, _freeze(st), n, m, sl) for f, st, n, m, sl in units), layout,
           self._global_nonfinite, self._writeback)
    swap = self._writeback == "swap"
    fn = _cached(_STEP_CACHE, key,
                 lambda: _make_step(units, layout, self._global_nonfinite, swap))
    idx_on = tuple(i for ui in active for i in self._units[ui].indices if mask[i])
    return _Plan(fn, units, active, slot, idx_on)

  def _init_states(self, missing, plan, hp, hps, jparams) -> None:
    layout = (self._layout_kwarg, self._layout_fn)
    units = tuple((self._factory(u.group), hp[u.group][1], u.names, plan.slot[u.group])
                  for u in (self._units[plan.active[k]] for k in missing))
    key = (tuple((f, _freeze(st), n, sl) for f, st, n, sl in units), layout)
    fn = _cached(_INIT_CACHE, key, lambda: _make_init(units, layout))
    news = fn(tuple(jparams[k] for k in missing), hps)
    for k, st in zip(missing, news):
      # commit to the parameters' device, as step outputs are (else the step compiles twice)
      self._jstate[self._units[plan.active[k]].indices] = jax.device_put(st,
                                                                         jparams[k][0].device)

  def _param_jax(self, i: int, p: torch.Tensor) -> jax.Array:
    """The JAX view of parameter ``i``, cached while its storage stays put (``copy_``
    writeback keeps it): the view aliases the memory, so it always reads current values."""
    key = _storage_key(p)
    hit = self._pcache.get(i)
    if hit is not None and hit[0] == key:
      return hit[1]
    a = convert.to_jax(p)
    if convert.shares_memory(p, a):
      self._pcache[i] = (key, a)
    return a

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
    self._jstate = new_jstate
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


def _plain_signature(group: dict) -> Optional[tuple]:
  """The group's non-parameter items when all are immutable plain values (else ``None``)."""
  items = []
  for k, v in group.items():
    if k in _RESERVED:
      continue
    if isinstance(v, tuple):
      if not all(isinstance(x, _PLAIN) for x in v):
        return None
    elif not isinstance(v, _PLAIN):
      return None
    items.append((k, type(v), v))
  return tuple(items)


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
