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
    ``momentum`` always) are fed to the jitted step as float32 arrays, as
    ``optax.inject_hyperparams`` does, so LR schedulers (``StepLR``, ``OneCycleLR`` which also
    writes ``betas``, ``ReduceLROnPlateau``, ...) never cause a recompilation. Other values
    (ints, strings, bools, lists, callables, names in ``static_args``) are static: changing
    one rebuilds the step.
  * One jitted call updates every parameter of every group. It *donates* the JAX-owned optimizer
    state (no state copy per step). Parameters and gradients cross by DLPack without a copy
    (``detach()``, contiguous, 64-byte aligned; see :mod:`torch_bridge.convert`); new
    parameters are written back with one ``copy_`` each, or, with ``writeback="swap"``, XLA
    updates in place JAX-owned buffers that torch views through DLPack (torch lets go of them
    for the call). A tensor with a narrow last axis (a conv weight ``(out, in, 3, 3)``) and its
    gradient and moments cross as 1-D views of the same memory when the step's elementwise work
    on them can run flat, which XLA's CPU loops vectorise (:mod:`torch_bridge._flatten`; the
    transform still sees the real shape, and results are bit for bit the same).
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
  * Matrix transforms: torch weights are ``(out, in)`` (conv ``(out, in, kh, kw)``). With
    ``layout_kwarg="<the factory's dimension-numbers argument>"`` (by default
    ``"dimension_numbers"`` for a factory that takes it: every stax factory that sees leaves
    as matrices, Muon's, SCAO's and the factored moment codec's) the bridge supplies, per
    parameter, ``layout_fn(tensor_shape, name)`` (default :func:`torch_dimension_numbers`:
    reduction axes ``1..ndim-1``, output axis ``0``, fused q/k/v as three matrices, ``None``
    for vectors), as a tree laid out like the parameters.
  * ``state_dict()`` has torch's shape (:mod:`torch_bridge._checkpoint`): each parameter's JAX
    state leaves, named by their path in the state tree, as tensors of *their own* dtypes (an
    unsigned one wider than a byte, a uint32 key, as its bits in int32: torch restores those
    dtypes only in part); ``load_state_dict`` never casts them and checks each leaf's shape and
    dtype, and a load that fails changes nothing.
    ``torch.save`` → ``torch.load`` → continue equals the uninterrupted run bit for bit. A
    parameter's leaf names do not contain its own name, so state dicts move between optimizers
    built from ``model.parameters()`` and ``model.named_parameters()``; a parameter listed
    twice keeps its first index, as in torch.
  * ``optimizer.state`` is torch's mapping (:class:`torch_bridge._state.StateView`):
    ``state[p]`` shows ``p``'s state leaves (copies) and keeps what a user or a hook puts there
    (saved and loaded with the state dict); ``del state[p]`` restarts ``p``. State stays with
    its parameter tensor when the groups change (a parameter removed takes it along; a new
    tensor in its place starts afresh), as torch keys its state by tensor.
  * ``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` carry settings, groups and
    state (not hooks or gradient release, which torch does not carry either); a ready
    transformation (not a factory) is held in a local function, which ``pickle`` refuses.

Errors
  torch's own: ``TypeError`` for a tensor given as ``params`` and for non-tensor parameters,
  ``ValueError`` for no parameters, for named and unnamed parameters mixed, for a parameter in
  two groups and for a tensor ``lr`` with more than one element ("Tensor lr must be 1-element");
  a repeated parameter in one group warns. Frozen parameters (``requires_grad=False``) stay in
  their group and are never stepped (no gradient), as torch does.
  Sparse gradients raise ``RuntimeError`` at ``step()``; complex, integer and (without x64)
  float64 parameters raise ``TypeError`` at construction and at ``step()`` (a dtype changed
  since), a gradient of another dtype than its parameter's ``TypeError`` at ``step()``; a
  parameter whose dtype or shape changed after it had state raises ``ValueError`` at
  ``step()`` before anything is written (``del optimizer.state[p]`` restarts it);
  hyperparameters the factory does not accept raise ``TypeError`` (in a param group, those
  torch knows: ``betas``, ``eps``, ...); invalid values raise the factory's own ``ValueError`` at
  construction; a transform whose ``update`` needs extra arguments a torch loop cannot give
  (``value=`` for ``reduce_on_plateau``, ``value_fn`` for L-BFGS line searches) raises
  ``TypeError``.

GPU
  CUDA tensors work when jaxlib has CUDA: the JAX step runs on the same device. Set
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (or ``XLA_CLIENT_MEM_FRACTION``) *before* importing
  JAX, or JAX takes 75 % of the GPU memory and torch runs out.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import optax
import torch

from torch_bridge._dtensor import FullCopies, LocalShards, OwnedCopies, has_dtensors, resolve_mode
from torch_bridge import _checkpoint as C
from torch_bridge import _internals, convert
from torch_bridge import _release as R
from torch_bridge import _hyperparams as H
from torch_bridge import _state as S
from torch_bridge import _step
from torch_bridge._hyperparams import TORCH_TO_FACTORY
from torch_bridge._units import Layout, build_units, check_update_args, describe_units
from torch_bridge._release import prepare_for_gradient_release, remove_gradient_release
from torch_bridge._writeback import ParamViews, make_writeback
from torch_bridge.layout import ModuleLayout, torch_dimension_numbers

__all__ = ["Optimizer", "torch_dimension_numbers", "prepare_for_gradient_release",
           "remove_gradient_release", "TORCH_TO_FACTORY", "named_by_model"]

_NONFINITE = (None, "skip", "error")


def named_by_model(params: Any, model: Optional[torch.nn.Module]) -> Any:
  """``params`` with every unnamed tensor (alone or in a param-group dict) paired with its name
  in ``model`` (``model.named_parameters()``; a tied parameter under its first name), so that
  path-based rules and the model's layout reach parameter groups built from bare tensors, as
  Hugging Face's ``Trainer`` builds them for ``optimizer_cls_and_kwargs``. ``(name, tensor)``
  pairs and a model given as ``params`` pass as they are; ``model=None`` returns ``params``.

  Raises:
    TypeError: ``model`` is not an ``nn.Module``.
    ValueError: a tensor is not a parameter of ``model`` (naming its position and shape).
  """
  if model is None or isinstance(params, torch.nn.Module):
    return params
  if not isinstance(model, torch.nn.Module):
    raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
  if isinstance(params, torch.Tensor):
    return params                                        # torch's TypeError follows
  names = {id(p): n for n, p in model.named_parameters()}
  pos = [0]

  def name(item):
    if not isinstance(item, torch.Tensor):
      return item                                        # a pair, or torch's TypeError follows
    k = pos[0]
    pos[0] += 1
    if id(item) not in names:
      raise ValueError(f"`model`: the parameter at position {k} (shape {tuple(item.shape)}) is "
                       f"not a parameter of the given {type(model).__name__}.")
    return (names[id(item)], item)

  def members(ps):
    if isinstance(ps, torch.Tensor):
      return [name(ps)]
    if isinstance(ps, (set, frozenset)):
      return ps                                          # torch's TypeError follows
    return [name(x) for x in ps]

  return [dict(x, params=members(x["params"])) if isinstance(x, dict) and "params" in x
          else name(x) for x in params]


class Optimizer(torch.optim.Optimizer):
  """A ``torch.optim.Optimizer`` running an optax/stax transformation through DLPack.

  Args:
    params: tensors, ``(name, tensor)`` pairs or param-group dicts (a group may carry its own
      ``"transform"`` factory), or an ``nn.Module``: its named parameters, and its modules'
      layout (:class:`torch_bridge.ModuleLayout`) as the default ``layout_fn``.
    model: the ``nn.Module`` that unnamed tensors in ``params`` belong to (default ``None``):
      each gets its name there (:func:`named_by_model`) and the model's layout is the default
      ``layout_fn``, as for a model given as ``params``. For param groups of bare tensors, as
      Hugging Face's ``Trainer`` passes to ``optimizer_cls_and_kwargs=(cls, {"model": model,
      ...})``: without names, OAdamW had put GPT-2's embeddings under Muon and read its
      ``Conv1D`` weights as ``(out, in)``, STAC had ordered modules by group.
    transform: a factory returning an ``optax.GradientTransformation`` (``stax.adamw``,
      ``optax.lion``, ...), called with each group's hyperparameters; or a ready transformation
      (then no hyperparameters may be given and schedulers have no effect).
    state_scope: ``"param"`` (default: one state per parameter, torch's ``None``-grad semantics)
      or ``"group"`` (one state per group; for transforms that couple parameters).
    static_args: factory arguments that must stay Python values (structural floats such as a
      ratio used in ``math.ceil``); ints, bools, strings and callables are static anyway.
    layout_kwarg: name of the factory's per-leaf dimension-numbers argument, filled with
      ``layout_fn(shape, name)`` per parameter (default ``None``: ``"dimension_numbers"`` for a
      factory that takes it and was not given it, as every stax factory that sees parameters
      as matrices does; else not passed; decided for each group's factory, so a group's own
      ``"transform"`` gets it exactly when it takes it).
    layout_fn: ``(shape, dotted name) -> dimension numbers`` or ``shape -> dimension numbers``
      (default :func:`torch_dimension_numbers`).
    writeback: ``"copy"`` (default: new values are copied into each parameter's storage, which
      keeps every view, DDP bucket and tied alias valid) or ``"swap"`` (opt-in, no copy: the
      first step moves each parameter into a JAX-owned buffer — a view taken before it, or
      FSDP's flat parameters, keeps the old storage — that XLA then updates in place, at the
      same address step after step. Torch views it through DLPack and lets go of it for the
      call; a view held elsewhere blocks the donation and keeps the old values, and the
      parameter moves: torch never views memory JAX could free). A parameter in another memory
      format (a ``channels_last`` conv weight) stays in its own storage and format and gets its
      new values copied in, as in copy mode).
    global_nonfinite: ``None`` (default: leave it to the transform), ``"skip"`` (if any gradient
      of the step is NaN/Inf, no parameter and no state changes; counted in
      :attr:`nonfinite_skipped_steps`) or ``"error"`` (the same, then ``RuntimeError``; costs one
      host sync per step).
    dtensor: for ``DTensor`` parameters (FSDP2's ``fully_shard``; ignored for plain tensors,
      see :mod:`torch_bridge._dtensor`): ``"auto"`` (default: ``"local"`` for the element-wise
      transforms listed below, else ``"full"``), ``"full"`` (every rank steps full copies;
      any transform, state replicated), ``"owner"`` (one rank per parameter steps it and keeps
      its state; needs ``state_scope="param"`` and no ``global_nonfinite``) or ``"local"``
      (each rank steps its shards; element-wise transforms only: ``stax.adamw`` without a
      codec, ``optax.adam``/``adamw``/``sgd``/``lion``, and ``writeback="copy"``). A mode
      that is not allowed raises ``ValueError`` here.
    **defaults: default hyperparameters of every group, torch names (``lr``, ``betas``,
      ``eps``, ``weight_decay``) or the factory's own names. ``lr``, ``betas``, ``eps`` and
      ``weight_decay`` are filled from the factory's defaults when it has them.

  What a non-finite gradient skips:
    * In JAX, ``stax.adamw(...)`` over a whole parameter tree checks every gradient at once
      (:func:`stax.transforms.guards.all_finite`): one NaN/Inf skips the *whole step* (no
      parameter, moment or count changes).
    * Here, with ``global_nonfinite=None`` (default), the transform's own guard sees what it is
      given. With ``state_scope="param"`` (default) each parameter is its own transform call,
      so only the *parameters whose gradient is non-finite* are skipped (their value, moments
      and step count stay); the others step. With ``state_scope="group"`` the skip covers the
      group. Transforms without a guard (``optax.adamw``) apply the NaN as JAX would.
    * ``global_nonfinite="skip"`` or ``"error"`` gives JAX's whole-step semantics across every
      group: the same ``all_finite`` over all gradients of the step, in one ``lax.cond``.

  Example:
    >>> import torch, stax, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.Optimizer(model.parameters(), stax.adamw, lr=1e-3)
  """

  def __init__(self, params: Iterable[Any], transform: Any, *, state_scope: str = "param",
               static_args: Iterable[str] = (), layout_kwarg: Optional[str] = None,
               layout_fn: Callable[..., Any] = torch_dimension_numbers,
               global_nonfinite: Optional[str] = None, writeback: str = "copy",
               dtensor: str = "auto", model: Optional[torch.nn.Module] = None,
               **defaults: Any):
    if state_scope not in ("param", "group"):
      raise ValueError(f"`state_scope` must be 'param' or 'group', got {state_scope!r}.")
    params = named_by_model(params, model)
    if model is not None and layout_fn is torch_dimension_numbers:
      layout_fn = ModuleLayout(model)
    if isinstance(params, torch.nn.Module):
      # a model: its named parameters (names reach path-based rules) and, by default, the
      # layout its modules' types give (ModuleLayout: transposed and grouped convs, RNN gates)
      if layout_fn is torch_dimension_numbers:
        layout_fn = ModuleLayout(params)
      params = list(params.named_parameters())
    if global_nonfinite not in _NONFINITE:
      raise ValueError(f"`global_nonfinite` must be one of {_NONFINITE}, got "
                       f"{global_nonfinite!r}.")
    if writeback not in ("copy", "swap"):
      raise ValueError(f"`writeback` must be 'copy' or 'swap', got {writeback!r}.")
    self._dtensor_mode = resolve_mode(dtensor, transform, defaults, writeback=writeback,
                                      state_scope=state_scope,
                                      global_nonfinite=global_nonfinite)
    if isinstance(static_args, str):
      static_args = (static_args,)
    if isinstance(transform, optax.GradientTransformation):
      if defaults:
        raise TypeError("torch_bridge: a ready transformation takes no hyperparameters "
                        f"(got {sorted(defaults)}); pass a factory such as stax.adamw instead.")
      transform = (lambda tx: lambda: tx)(transform)  # a factory with no arguments
    elif not callable(transform):
      raise TypeError("`transform` must be a factory (e.g. stax.adamw) or an "
                      f"optax.GradientTransformation, got {type(transform).__name__}.")
    self._transform = transform
    self._state_scope = state_scope
    self._static_args = frozenset(static_args)
    auto = False
    if layout_kwarg is None and "dimension_numbers" not in defaults:
      # a stax factory that sees leaves as matrices (its `dimension_numbers`: Muon, SCAO, the
      # factored moment codec) gets the torch layout, not the Flax defaults; decided per
      # factory when a unit is built (a group's own "transform" may take it or not)
      layout_kwarg, auto = "dimension_numbers", True
    self._layout = Layout(layout_kwarg, layout_fn, auto)
    self._global_nonfinite = global_nonfinite
    self._wb_name = writeback
    self._init_runtime(writeback)
    H.check_tensor_lr(defaults)
    filled = H.fill_defaults(transform, dict(defaults))
    # the keys the default factory's own signature filled in (not the user's): a group with its
    # own "transform" takes its factory's values for them instead (add_param_group)
    self._implicit_defaults = frozenset(k for k in filled if k not in defaults)
    super().__init__(params, filled)

  def _init_runtime(self, writeback: str) -> None:
    """The per-process caches and the state (again after unpickling)."""
    self._states = S.StateStore()          # unit key (parameter indices) -> JAX state
    self._user = S.UserEntries()           # what users put into optimizer.state
    self._views = ParamViews()             # parameter index -> JAX view of its memory
    self._wb = make_writeback(writeback, self._views)
    self._hyper = H.HyperCache()           # group index -> GroupHyper
    self._units: list = []
    self._units_sig = None
    self._unit_params: Optional[list] = None  # the flat parameters the units were built for
    self._plans: dict = {}                 # (mask, per-group static config) -> Plan
    self._used_fns: dict = {}              # id -> jitted steps this optimizer has run
    self._skipped = None                   # int32 JAX scalar, steps skipped by global_nonfinite
    self._device = None                    # the parameters' JAX sharding (from the first step)
    self._release_handles: Optional[list] = None
    self._full: Optional[FullCopies] = None   # FSDP2: full copies of DTensor parameters

  def __getstate__(self) -> dict:
    """``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` keep the settings, param
    groups and state (:func:`torch_bridge._checkpoint.getstate`); hooks and gradient release
    are not carried (torch drops hooks too)."""
    return C.getstate(self)

  def __setstate__(self, state: dict) -> None:
    C.setstate(self, state)

  # ---------------------------------------------------------------------------------- groups
  def _factory(self, gi: int) -> Callable:
    return self.param_groups[gi].get("transform", self._transform)

  def add_param_group(self, param_group: dict) -> None:
    factory = param_group.get("transform", None) if isinstance(param_group, dict) else None
    if factory is not None and not callable(factory):
      raise TypeError("a param group's `transform` must be a factory.")
    if isinstance(param_group, dict):
      H.check_tensor_lr(param_group)
      H.check_group_keys(factory or self._transform, param_group)
      if factory is not None:
        # what the user left unset takes this group's factory's defaults, not those of the
        # optimizer's default transform (the constructor's own keyword arguments still apply
        # to every group, as in torch)
        own = H.fill_defaults(factory, {})
        implicit = getattr(self, "_implicit_defaults", frozenset())
        param_group = dict(param_group)
        for key in implicit:
          if key not in param_group and key in own:
            param_group[key] = own[key]
    super().add_param_group(param_group)
    for p in self.param_groups[-1]["params"]:
      convert.check_dtype(p)
    # Build the transform once with concrete values: the factory validates them (ValueError).
    traced, static = self._hyperparams(len(self.param_groups) - 1)
    check_update_args(self._factory(len(self.param_groups) - 1)(**H.concrete(traced),
                                                                  **dict(static)))
    self._units_sig = None

  def _parse_group(self, gi: int) -> H.Parsed:
    """Group ``gi``'s hyperparameters under the factory's names (no cache)."""
    return H.parse(self.param_groups[gi], H.factory_spec(self._factory(gi)), self._static_args)

  def _hyperparams(self, gi: int) -> tuple:
    """(traced: {name: float32 value}, static: ((name, value), ...)) for group ``gi``."""
    return self._parse_group(gi)[:2]

  def _group_hyper(self, gi: int) -> H.GroupHyper:
    return self._hyper.entry(gi, self.param_groups[gi], lambda: self._parse_group(gi))

  def _flat_params(self) -> list:
    return [p for g in self.param_groups for p in g["params"]]

  def _ensure_units(self) -> list:
    """The flat parameter list; (re)builds the units when the groups changed."""
    params = self._flat_params()
    sig = (tuple(map(id, params)), tuple([len(g["params"]) for g in self.param_groups]))
    if sig != self._units_sig:
      units = build_units(self.param_groups, self._state_scope)
      if self._unit_params is not None:
        self._follow_parameters(self._unit_params, params, units)
      self._units, self._unit_params = units, params
      self._units_sig, self._plans = sig, {}
      mode = getattr(self, "_dtensor_mode", "full")   # (a pickled optimizer from before)
      self._full = None if not has_dtensors(params) else (
          LocalShards() if mode == "local" else
          OwnedCopies(params) if mode == "owner" else FullCopies())
    return params

  def _follow_parameters(self, before: list, after: list, units: list) -> None:
    """Refiles what is kept per parameter position after the groups changed: state stays with
    its parameter *tensor*, as torch keys ``optimizer.state`` by tensor. A parameter removed
    from the groups loses its state; one put in (a new tensor in a removed one's place, as
    model surgery does) starts afresh; a moved one keeps its own. A ``state_scope="group"``
    unit keeps its state only while it has the same tensors in the same order."""
    moved = S.position_map(before, after)
    self._states.refile(moved, self._units, units)
    self._views.cache = {moved[i]: v for i, v in self._views.cache.items() if i in moved}
    owned = getattr(self._wb, "owned", None)
    if owned is not None:
      self._wb.owned = {moved[i]: k for i, k in owned.items() if i in moved}

  # ---------------------------------------------------------------------------------- step
  @_internals.mark_step_hooked
  @torch.compiler.disable
  def step(self, *args: Any, **kwargs: Any):
    """``step(closure=None)``: performs one optimization step; ``closure`` re-evaluates the
    model and returns the loss (given positionally or as ``closure=``; the step hooks see it as
    it was given, as torch's do).

    Always runs eagerly: inside a ``torch.compile``-d function TorchDynamo does not trace into
    it (a graph break; the JAX step is compiled by XLA already), so a compiled train step that
    calls ``optimizer.step()`` works as with torch's own optimizers.

    Step pre/post hooks (global and this optimizer's) run as torch runs them, and the step
    is recorded as ``Optimizer.step#<class>.step`` when a profiler is active; torch's own
    wrapper is not installed (its ``record_function`` costs ~5-20 us per step even with no
    profiler, a tenth of a 1M-parameter step).
    """
    if len(args) > 1 or set(kwargs) - {"closure"} or (args and kwargs):
      raise TypeError("step() takes one optional argument, `closure`; got "
                      f"{len(args)} positional and {sorted(kwargs)} keyword arguments.")
    if _internals.profiler_enabled():
      with torch.autograd.profiler.record_function(
          f"Optimizer.step#{type(self).__name__}.step"):
        return self._hooked_step(args, kwargs)
    return self._hooked_step(args, kwargs)

  def _hooked_step(self, args: tuple, kwargs: dict):
    args = (self, *args)
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    pre, post = _internals.global_step_hooks()
    if pre or self._optimizer_step_pre_hooks:
      for hook in (*pre.values(), *self._optimizer_step_pre_hooks.values()):
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
    if self._release_handles is None:  # else each parameter was stepped by its grad hook
      with torch.no_grad():
        if torch.is_inference_mode_enabled():
          # tensors made here (swap mode's new parameter storage) must not be inference
          # tensors, which autograd refuses afterwards; torch's optimizers write in place
          with torch.inference_mode(False), torch.no_grad():
            self._run(None)
        else:
          self._run(None)
    self._optimizer_step_code()
    if post or self._optimizer_step_post_hooks:
      for hook in (*self._optimizer_step_post_hooks.values(), *post.values()):
        hook(self, args, kwargs)
    return loss

  def _run(self, only: Optional[set]) -> None:
    """One step of the parameters with a gradient (and, if given, an index in ``only``)."""
    _step.run(self, only)

  # ---------------------------------------------------------------------------------- info
  @property
  def state(self) -> S.StateView:
    """Parameter → its state entries (copies of the JAX state leaves, then what was put there),
    and any other key a user sets; see :class:`torch_bridge._state.StateView`."""
    return S.StateView(self)

  @state.setter
  def state(self, value: Any) -> None:
    # torch.optim.Optimizer.__init__ assigns an empty defaultdict: the state is reset, then
    # set from the mapping.
    view = S.StateView(self)
    view.clear()
    for k, v in dict(value).items():
      view[k] = v

  def describe(self) -> Any:
    """Every parameter: its rule, matrix view and state, by torch name (:func:`stax.describe`).

    Built from each group's current hyperparameters and the transform each parameter (or,
    with ``state_scope="group"``, each group) runs; nothing is stepped or allocated.
    Returns a :class:`stax.Description` whose paths are the parameters' dotted names.
    """
    params = self._ensure_units()
    return describe_units(self._units, params, lambda gi: (self._factory(gi),
                                                           *self._hyperparams(gi)), self._layout)

  @property
  def trace_count(self) -> int:
    """Compilations of the steps this optimizer ran (one per has-grad pattern and shape set;
    hyperparameter changes add none). A compiled step is shared by the optimizers of one
    configuration in a process, so their compilations count here too."""
    return sum(_internals.compiled_count(fn) for fn in self._used_fns.values())

  @property
  def nonfinite_skipped_steps(self) -> int:
    """Steps skipped by ``global_nonfinite`` (host sync when read)."""
    return 0 if self._skipped is None else int(self._skipped)

  # ---------------------------------------------------------------------------------- state_dict
  def state_dict(self) -> dict:
    """torch-shaped state: ``{'state': {index: {leaf_path: tensor}}, 'param_groups': [...]}``."""
    return C.state_dict(self)

  def load_state_dict(self, state_dict: dict) -> None:
    """Loads a :meth:`state_dict`; state tensors keep their dtypes (no cast to the param's)."""
    C.load_state_dict(self, state_dict)

  # ---------------------------------------------------------------------------------- release
  def enable_gradient_release(self, params_or_model: Any = None) -> list:
    """Steps each parameter from its post-accumulate-grad hook, then frees its gradient.

    After ``loss.backward()`` every parameter is already updated and its ``grad`` is ``None``;
    ``step()`` only runs the closure. ``params_or_model``: an ``nn.Module`` or tensors (default:
    every parameter of the optimizer). Needs ``state_scope="param"`` (each parameter has its
    own state) and no ``global_nonfinite`` policy. Each parameter's step is compiled once
    (first backward). Returns the hook handles; :meth:`disable_gradient_release` removes them.

    Not with ``torch.amp.GradScaler`` (float16 loss scaling): each parameter steps inside
    ``backward()`` from its gradient as it is, before the scaler can unscale or check it, and
    ``scaler.step(optimizer)`` then finds no gradient (torch's ``AssertionError: No inf checks
    were recorded``). bfloat16 autocast needs no scaler; torch's own gradient-release recipe
    has the same limit.
    """
    if has_dtensors(self._flat_params()):
      raise ValueError("torch_bridge: gradient release does not support DTensor (FSDP2) "
                       "parameters: their step gathers every parameter at once; call step().")
    return R.enable(self, params_or_model)

  def disable_gradient_release(self) -> None:
    """Removes the hooks of :meth:`enable_gradient_release`; ``step()`` steps again."""
    R.disable(self)
