r"""Drop-in torch classes for the seeds' optimizers, on :class:`torch_bridge.Optimizer`.

Each class keeps the seed's constructor argument names and defaults where they make sense and
runs the stax factory through the bridge (one jitted step, DLPack, donated state). A model
(``nn.Module``) is grouped automatically; parameter lists and param-group dicts work too, and
unlike some seeds the second positional argument is always ``lr``.

STAC module order
  :class:`STAC` partitions a model exactly like ``stac_optimizer.STAC``: it walks
  ``model.named_modules()`` (pre-order, *registration* order: ``__init__`` assignment order,
  parent before children), counts only modules that directly own a trainable parameter, and
  gives a tied (shared) parameter to its **first** owner — with a tied embedding/output head the
  head owns nothing new, is not counted, and the tied matrix follows the embedding (usually into
  the sign trunk). The last ``last_n_modules`` counted modules form the AdamW cap; the rest the
  sign trunk. The JAX factory :func:`stax.stac` instead ranks modules by execution order and can
  give the tied head to the cap (``tied="last_use"``); the drop-in reproduces the seed.

Argument checks
  Every class checks its arguments at construction: ``betas`` must be a pair of floats in
  [0, 1) (``TypeError``/``ValueError`` naming ``betas``), flags must be bools (``TypeError``),
  and a scalar argument may be a 1-element tensor (as torch accepts a tensor ``lr``) but not a
  larger one (``ValueError`` naming it); the stax factory then checks every value's range.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import torch

import stax
from stax import _validation as V
from stax.optimizers import stac as stac_rules
from torch_bridge.layout import ModuleLayout
from torch_bridge.optimizer import Optimizer, named_by_model

__all__ = ["STAC", "STAM", "STAMLite", "SCAO", "OAdamW", "TurboAdam", "stac_modules"]


def _stac_inputs(model_or_params: Any) -> tuple[list, bool]:
  """``([(overrides, [(name, tensor), ...]), ...], named)``: STAC's input as torch reads it.

  An ``nn.Module`` is one group of its ``named_parameters()`` (frozen ones included, a tied
  parameter under its first owner); an iterable holds tensors, ``(name, tensor)`` pairs or
  param-group dicts (``{"params": ..., "lr": ...}``). Unnamed tensors are called
  ``param_<position>``. torch's errors: ``TypeError`` for a tensor or a set given as the
  iterable, for a group's set of parameters and for a non-tensor parameter, ``ValueError`` for
  no parameters and for named and unnamed parameters mixed.
  """
  if isinstance(model_or_params, torch.nn.Module):
    return [({}, list(model_or_params.named_parameters()))], True
  if isinstance(model_or_params, torch.Tensor):
    raise TypeError("params argument given to the optimizer should be an iterable of Tensors "
                    f"or dicts, but got {torch.typename(model_or_params)}")
  items = list(model_or_params)
  if not items:
    raise ValueError("optimizer got an empty parameter list")
  if all(isinstance(x, dict) for x in items):
    raw = [({k: v for k, v in g.items() if k != "params"}, g["params"]) for g in items]
  elif any(isinstance(x, dict) for x in items):
    raise TypeError("STAC takes tensors, (name, tensor) pairs or param-group dicts, not a mix "
                    "of groups and parameters.")
  else:
    raw = [({}, items)]
  groups, kinds, pos = [], set(), 0
  for overrides, params in raw:
    if isinstance(params, torch.Tensor):
      params = [params]
    elif isinstance(params, (set, frozenset)):
      raise TypeError("optimizer parameters need to be organized in ordered collections, but "
                      "the ordering of tensors in sets will change between runs. Please use a "
                      "list instead.")
    entries = []
    for item in params:
      named = isinstance(item, tuple)
      name, p = item if named else (f"param_{pos}", item)
      pos += 1
      kinds.add(named)
      if not isinstance(p, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                        f"{torch.typename(p)}")
      if not p.is_leaf:
        raise ValueError("can't optimize a non-leaf Tensor")
      entries.append((str(name), p))
    groups.append((overrides, entries))
  if len(kinds) > 1:
    raise ValueError("all optimizer params should be with/without names. Some param names are "
                     "missing")
  return groups, kinds == {True}


def _module_of(name: str, named: bool) -> str:
  """The module that owns a parameter: its name without the last component (``"<root>"`` for
  a top-level name); an unnamed tensor is its own module."""
  if not named:
    return name
  return name.rsplit(".", 1)[0] if "." in name else "<root>"


def stac_modules(model_or_params: Any) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
  """``[(module_name, [(param_name, param), ...]), ...]`` in STAC's order (see module doc).

  ``model_or_params`` is an ``nn.Module`` (registration order, trainable parameters only, tied
  parameters owned by their first module, root parameters under ``"<root>"``), a sequence of
  ``(name, tensor)`` pairs (module = the name without its last component, in first-appearance
  order), plain tensors (each tensor its own module) or param-group dicts of these (their
  parameters in order). Frozen parameters and repeated tensors are not counted.

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> [(name, [n for n, _ in ps]) for name, ps in torch_bridge.stac_modules(model)]
    [('0', ['0.weight', '0.bias']), ('2', ['2.weight', '2.bias'])]
  """
  return _modules(*_stac_inputs(model_or_params))


def _modules(groups: list, named: bool) -> list:
  """:func:`stac_modules` of parsed inputs (:func:`_stac_inputs`)."""
  seen: set = set()
  index: dict = {}
  modules: list = []
  for _, entries in groups:
    for name, p in entries:
      if id(p) in seen or not p.requires_grad:
        continue
      seen.add(id(p))
      mname = _module_of(name, named)
      if mname not in index:
        index[mname] = len(modules)
        modules.append((mname, []))
      modules[index[mname]][1].append((name, p))
  return modules


def _scalar(name: str, value: Any) -> Any:
  """``value`` as a plain number: a 1-element tensor stands for its value (as torch accepts a
  tensor ``lr``); a tensor with more elements raises ``ValueError`` naming ``name``."""
  if isinstance(value, torch.Tensor):
    if value.numel() != 1:
      raise ValueError(f"`{name}` must be a number or a 1-element tensor (Tensor {name} must "
                       f"be 1-element), got a tensor of shape {tuple(value.shape)}.")
    return value.item()
  return value


def _betas(betas: Any) -> tuple:
  """``betas`` checked as a pair of decay rates in [0, 1) and returned as a tuple of floats."""
  if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)):
    raise TypeError(f"`betas` must be a pair (beta1, beta2) of floats in [0, 1), got "
                    f"{type(betas).__name__} {betas!r}.")
  if len(betas) != 2:
    raise ValueError(f"`betas` must be a pair (beta1, beta2) of floats in [0, 1), got "
                     f"{len(betas)} value(s): {betas!r}.")
  out = tuple(_scalar(f"betas[{i}]", b) for i, b in enumerate(betas))
  V.check_betas(**{f"betas[{i}]": b for i, b in enumerate(out)})
  return out


def _check_scalars(**values: Any) -> None:
  """Refuses multi-element tensors for the drop-ins' scalar arguments (see :func:`_scalar`)."""
  for name, value in values.items():
    _scalar(name, value)


def _maybe_maximize(tx, maximize):
  """``tx`` on the negated gradients when ``maximize``, with ``tx``'s own state (so a group's
  ``maximize`` can change between steps, as torch reads it every step; until 2026-12-07 an
  ``optax.scale(-1)`` chained in front changed the state's structure and the next step failed
  inside optax)."""
  if not maximize:
    return tx
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    return tx.update(jax.tree.map(jnp.negative, updates), state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _stac_sign(learning_rate, weight_decay, exclude_1d_from_weight_decay=True,
               exclude_bias_from_weight_decay=True, maximize=False):
  """STAC's sign trunk for one parameter: ``p -= lr·(sign(g) + λ_s·mask·p)``."""
  return _maybe_maximize(stax.stac(
      learning_rate, last_n_modules=0, weight_decay=0.0, sign_weight_decay=weight_decay,
      exclude_1d_from_weight_decay=exclude_1d_from_weight_decay,
      exclude_bias_from_weight_decay=exclude_bias_from_weight_decay, nonfinite="ignore"),
      maximize)


def _stac_adamw(learning_rate, b1, b2, eps, weight_decay, exclude_1d_from_weight_decay=True,
                exclude_bias_from_weight_decay=True, maximize=False):
  """STAC's AdamW cap for one parameter (torch AdamW, decay masked like the seed)."""
  return _maybe_maximize(stax.stac(
      learning_rate, last_n_modules=1, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
      exclude_1d_from_weight_decay=exclude_1d_from_weight_decay,
      exclude_bias_from_weight_decay=exclude_bias_from_weight_decay, nonfinite="ignore"),
      maximize)


class STAC(Optimizer):
  r"""STAC ("SignSGD Trunk, AdamW Cap") as a torch optimizer, partitioned like the seed.

  Sign descent (no state) on every counted module but the last ``last_n_modules``; AdamW on
  those. Two param groups ``[sign, adamw]`` (an empty one is omitted), with the seed's keys
  ``stac_role`` and ``module_names``; each parameter has its own state (``None`` gradients are
  skipped as torch does).

  As a torch optimizer: param-group dicts are accepted, each split into its ``[sign, adamw]``
  parts (in that order, each carrying the group's own ``lr``, ``betas``, ``eps``,
  ``weight_decay``, ``sign_weight_decay``, ``adamw_weight_decay`` and flags; other keys pass
  through), the partition counting every group's modules in order. Frozen parameters stay with
  their module's group and are never stepped; a module with no trainable parameter is not
  counted (the seed's rule) and its parameters join the trunk. A 1-element tensor is accepted
  wherever a number is. torch's errors and warning for bad ``params`` apply. Two torch
  behaviours cannot: ``add_param_group`` after construction raises ``RuntimeError`` (the
  seed's partition is fixed at construction), and unnamed tensors are each their own module,
  so named and unnamed inputs partition differently and their state dicts move between each
  other only when both partitions agree.

  Args:
    model_or_params: an ``nn.Module`` (recommended), ``(name, tensor)`` pairs, tensors or
      param-group dicts of these; see :func:`stac_modules`.
    lr: learning rate >= 0 (default 1e-3).
    last_n_modules: counted modules in the AdamW cap, >= 0 (default 1). ``None`` uses
      ``last_n_ratio``.
    last_n_ratio: cap = ``ceil(N·ratio)`` modules (at least 1 unless 0), in [0, 1] (default
      ``None`` → 0.125, used only when ``last_n_modules is None``).
    sign_lr_scale: trunk lr multiplier > 0 in hybrid mode (default 1.0).
    betas: AdamW decays in [0, 1) (default (0.9, 0.999)).
    eps: AdamW epsilon >= 0 (default 1e-8).
    weight_decay: decoupled decay >= 0 (default 0).
    sign_weight_decay: trunk decay >= 0 (default ``None``: 0.5·weight_decay in hybrid mode,
      else weight_decay).
    adamw_weight_decay: cap decay >= 0 (default ``None``: weight_decay).
    exclude_bias_from_weight_decay: parameters named ``bias`` do not decay (default True).
    exclude_1d_from_weight_decay: parameters with ndim <= 1 do not decay (default True).
    maximize: ascend instead (default False).
    error_if_nonfinite: raise ``RuntimeError`` on a NaN/Inf gradient (default False: skip the
      whole step, counted in ``nonfinite_skipped_steps``). Either way no parameter changes.
    foreach: accepted for compatibility; the bridge always runs one fused XLA step.
    amsgrad: not supported (``ValueError`` if True).
    writeback: ``"copy"`` (default) or ``"swap"`` (no copy); see :class:`torch_bridge.Optimizer`.
    model: the ``nn.Module`` that unnamed tensors belong to (default ``None``): they get their
      names there and the modules are counted in its registration order, as for the model
      itself. For param groups of bare tensors (Hugging Face's ``Trainer`` with
      ``optimizer_cls_and_kwargs=(STAC, {"model": model, ...})``, which groups decaying
      weights before biases and norms: counted by group, a LayerNorm had been the cap).

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> opt = torch_bridge.STAC(model, lr=1e-3, last_n_modules=1, weight_decay=1e-2)
    >>> [g["stac_role"] for g in opt.param_groups]
    ['sign', 'adamw']
  """

  def __init__(self, model_or_params: Any, lr: float = 1e-3, last_n_modules: Optional[int] = 1,
               *, last_n_ratio: Optional[float] = None, sign_lr_scale: float = 1.0,
               betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
               sign_weight_decay: Optional[float] = None,
               adamw_weight_decay: Optional[float] = None,
               exclude_bias_from_weight_decay: bool = True,
               exclude_1d_from_weight_decay: bool = True, maximize: bool = False,
               error_if_nonfinite: bool = False, foreach: bool = False,
               amsgrad: bool = False, writeback: str = "copy",
               model: Optional[torch.nn.Module] = None):
    for name, flag in (("exclude_bias_from_weight_decay", exclude_bias_from_weight_decay),
                       ("exclude_1d_from_weight_decay", exclude_1d_from_weight_decay),
                       ("maximize", maximize), ("error_if_nonfinite", error_if_nonfinite),
                       ("foreach", foreach), ("amsgrad", amsgrad)):
      V.check_bool(name, flag)
    del foreach
    if amsgrad:
      raise ValueError("STAC: `amsgrad=True` is not supported by the stax drop-in.")
    betas = _betas(betas)
    lr, last_n_modules, last_n_ratio, sign_lr_scale, eps, weight_decay = (
        _scalar(n, v) for n, v in (("lr", lr), ("last_n_modules", last_n_modules),
                                   ("last_n_ratio", last_n_ratio),
                                   ("sign_lr_scale", sign_lr_scale), ("eps", eps),
                                   ("weight_decay", weight_decay)))
    sign_weight_decay = _scalar("sign_weight_decay", sign_weight_decay)
    adamw_weight_decay = _scalar("adamw_weight_decay", adamw_weight_decay)
    # The factory validates every number with a ValueError naming it (and its range).
    stax.stac(lr, last_n_modules=last_n_modules, weight_decay=weight_decay,
              sign_weight_decay=sign_weight_decay, adamw_weight_decay=adamw_weight_decay,
              sign_lr_scale=sign_lr_scale, last_n_ratio=last_n_ratio, b1=betas[0],
              b2=betas[1], eps=eps)
    inputs, named = _stac_inputs(named_by_model(model_or_params, model))
    modules = _modules(inputs, named)
    if model is not None and named:  # the model's registration order, not the groups'
      order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
      modules.sort(key=lambda m: min(order.get(id(p), len(order)) for _, p in m[1]))
    n = len(modules)
    k = stac_rules.cap_size(n, last_n_modules, last_n_ratio)
    cap_names = {m for m, _ in modules[n - k:]}
    owner = {id(p): m for m, entries in modules for _, p in entries}
    hybrid = n - k > 0 and k > 0
    defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    sign_weight_decay=sign_weight_decay, adamw_weight_decay=adamw_weight_decay,
                    exclude_1d_from_weight_decay=exclude_1d_from_weight_decay,
                    exclude_bias_from_weight_decay=exclude_bias_from_weight_decay,
                    maximize=maximize)
    groups = []
    for overrides, entries in inputs:
      groups += self._split_group(overrides, entries, named, owner, cap_names, hybrid,
                                  sign_lr_scale, defaults)
    self.sign_lr_scale = sign_lr_scale
    self.resolved_last_n_modules = k
    self.trainable_module_count = n
    super().__init__(groups, _stac_adamw, state_scope="param", writeback=writeback,
                     global_nonfinite="error" if error_if_nonfinite else "skip",
                     lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    self._initialized = True

  @staticmethod
  def _split_group(overrides: dict, entries: list, named: bool, owner: dict, cap_names: set,
                   hybrid: bool, sign_lr_scale: float, defaults: dict) -> list:
    """One input group as up to two bridge groups, ``[sign, adamw]``: each parameter goes with
    its module (a frozen parameter of an uncounted module with the sign trunk), and the group's
    own values (``lr``, ``betas``, ``eps``, ``weight_decay``, ``sign_weight_decay``,
    ``adamw_weight_decay``, the flags) override the constructor's; other keys pass through."""
    hp = dict(defaults)
    extra = {}
    for key, v in overrides.items():
      (hp if key in hp else extra)[key] = v
    hp["betas"] = _betas(hp["betas"])
    for name in ("lr", "eps", "weight_decay", "sign_weight_decay", "adamw_weight_decay"):
      hp[name] = _scalar(name, hp[name])
    for name in ("exclude_bias_from_weight_decay", "exclude_1d_from_weight_decay", "maximize"):
      V.check_bool(name, hp[name])
    stax.stac(hp["lr"], last_n_modules=1, weight_decay=hp["weight_decay"],
              sign_weight_decay=hp["sign_weight_decay"],
              adamw_weight_decay=hp["adamw_weight_decay"], b1=hp["betas"][0],
              b2=hp["betas"][1], eps=hp["eps"])  # a ValueError naming a bad group value
    lam_s = stac_rules.trunk_weight_decay(hp["weight_decay"], hp["sign_weight_decay"], hybrid)
    lam_a = hp["weight_decay"] if hp["adamw_weight_decay"] is None else hp["adamw_weight_decay"]
    common = {k: hp[k] for k in ("exclude_1d_from_weight_decay",
                                 "exclude_bias_from_weight_decay", "maximize")}
    parts: dict = {"sign": [], "adamw": []}
    mods: dict = {"sign": [], "adamw": []}
    for name, p in entries:
      mname = owner.get(id(p), _module_of(name, named))  # a repeated tensor: its first module
      role = "adamw" if mname in cap_names else "sign"
      parts[role].append((name, p) if named else p)
      if mname not in mods[role] and (mname in cap_names or p.requires_grad):
        mods[role].append(mname)
    out = []
    if parts["sign"]:
      out.append(dict(extra, params=parts["sign"], transform=_stac_sign, stac_role="sign",
                      module_names=tuple(mods["sign"]),
                      lr=hp["lr"] * sign_lr_scale if hybrid else hp["lr"], weight_decay=lam_s,
                      **common))
    if parts["adamw"]:
      out.append(dict(extra, params=parts["adamw"], transform=_stac_adamw, stac_role="adamw",
                      module_names=tuple(mods["adamw"]), lr=hp["lr"], betas=hp["betas"],
                      eps=hp["eps"], weight_decay=lam_a, **common))
    return out

  def add_param_group(self, param_group: dict) -> None:
    if getattr(self, "_initialized", False):
      raise RuntimeError("STAC does not support add_param_group(); construct a new optimizer "
                         "so the sign/AdamW partition stays deterministic (as the seed).")
    super().add_param_group(param_group)


# --------------------------------------------------------------------------------- the others
def _named(params: Any) -> Any:
  """A model's ``(name, tensor)`` pairs (names reach path-based rules); else as is. Frozen
  parameters are kept, as torch's optimizers keep what they are given: one frozen now (no
  gradient) is not stepped, and steps once it is unfrozen (gradual unfreezing)."""
  if isinstance(params, torch.nn.Module):
    return list(params.named_parameters())
  return params


def _torch_layout(kwargs: dict, params: Any = None, embeddings: bool = True) -> dict:
  """``kwargs`` with the bridge passing each parameter's torch layout
  (:func:`torch_bridge.torch_dimension_numbers`; for a model ``params``,
  :class:`torch_bridge.layout.ModuleLayout`, which knows its ``(in, out)`` ``Conv1D``
  weights) as ``dimension_numbers``, unless given."""
  if "dimension_numbers" in kwargs or kwargs.get("layout_kwarg") is not None:
    return kwargs
  model = params if isinstance(params, torch.nn.Module) else kwargs.get("model")
  if isinstance(model, torch.nn.Module) and "layout_fn" not in kwargs:
    kwargs = dict(kwargs, layout_fn=ModuleLayout(model, embeddings=embeddings))
  return dict(kwargs, layout_kwarg="dimension_numbers")


class STAM(Optimizer):
  """STAM (Adam with a residual-variance-adapted beta1) as a torch optimizer.

  Arguments as :func:`stax.stam` and the seed's ``STAM`` (``b1_base``, ``b2``, ``eps``,
  ``weight_decay``, ``adapt_strength``, ``tau_decay``, ``fallback_threshold``), with torch's
  ``lr``; ``beta1_signal="seed"`` (default) is the seed's rule, ``"snr"`` stax's improved one.
  The seed is JAX-only, so its parity is tested in JAX (``tests/test_stam.py``); this class is
  the same transform through the bridge.

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.STAM(model, lr=1e-3, beta1_signal="snr")
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> opt.step()
    >>> opt.param_groups[0]["param_names"], opt.param_groups[0]["beta1_signal"]
    (['weight', 'bias'], 'snr')
  """

  def __init__(self, params: Any, lr: float = 1e-3, b1_base: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 0.01, adapt_strength: float = 0.2,
               tau_decay: float = 0.99, fallback_threshold: float = 100.0, **kwargs: Any):
    _check_scalars(lr=lr, b1_base=b1_base, b2=b2, eps=eps, weight_decay=weight_decay,
                   adapt_strength=adapt_strength, tau_decay=tau_decay,
                   fallback_threshold=fallback_threshold)
    super().__init__(_named(params), stax.stam, lr=lr, b1_base=b1_base, b2=b2, eps=eps,
                     weight_decay=weight_decay, adapt_strength=adapt_strength,
                     tau_decay=tau_decay, fallback_threshold=fallback_threshold, **kwargs)


class STAMLite(Optimizer):
  """STAMLite (tensor-RMS second moment, lazily updated beta1) as a torch optimizer; arguments
  as :func:`stax.stam_lite` and the seed's ``STAMLite``, with torch's ``lr``.

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.STAMLite(model, lr=1e-3, beta1_update_interval=10)
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> opt.step()
    >>> opt.param_groups[0]["beta1_update_interval"]
    10
  """

  def __init__(self, params: Any, lr: float = 1e-3, b1_base: float = 0.9, eps: float = 1e-8,
               weight_decay: float = 0.01, adapt_strength: float = 0.2,
               moment_decay: float = 0.99, beta1_update_interval: int = 5, **kwargs: Any):
    _check_scalars(lr=lr, b1_base=b1_base, eps=eps, weight_decay=weight_decay,
                   adapt_strength=adapt_strength, moment_decay=moment_decay,
                   beta1_update_interval=beta1_update_interval)
    super().__init__(_named(params), stax.stam_lite, lr=lr, b1_base=b1_base, eps=eps,
                     weight_decay=weight_decay, adapt_strength=adapt_strength,
                     moment_decay=moment_decay, beta1_update_interval=beta1_update_interval,
                     **kwargs)


class SCAO(Optimizer):
  """SCAO as a torch optimizer; the seed's argument names and defaults (``scao`` 0.2.4).

  ``mode="scao-0.2.4"`` reproduces the seed; ``mode="lowrank"`` (default) is stax's scale-
  invariant low-rank variant (see :func:`stax.scao`). Matrices are viewed as
  ``(shape[0], prod(shape[1:]))`` — torch's ``(out, in·kh·kw)``, the seed's view. Seed options
  stax does not implement (``use_int8_ema``, ``lookahead_k``, ...) are not accepted.

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.SCAO(model, lr=1e-3, warmup_steps=10)
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> opt.step()
    >>> opt.param_groups[0]["warmup_steps"], opt.param_groups[0]["precond_freq"]
    (10, 20)
  """

  def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.01, precond_freq: int = 20,
               epsilon_sparse: float = 0.05, k_min: int = 8, k_max: int = 128, rho: float = 0.999,
               tau: Optional[float] = 1.0, warmup_steps: int = 100, blend_steps: int = 50,
               min_precond_updates: int = 2, max_precond_dim: int = 4096, **kwargs: Any):
    _check_scalars(lr=lr, eps=eps, weight_decay=weight_decay, precond_freq=precond_freq,
                   epsilon_sparse=epsilon_sparse, k_min=k_min, k_max=k_max, rho=rho, tau=tau,
                   warmup_steps=warmup_steps, blend_steps=blend_steps,
                   min_precond_updates=min_precond_updates, max_precond_dim=max_precond_dim)
    super().__init__(_named(params), stax.scao, lr=lr, betas=_betas(betas), eps=eps,
                     weight_decay=weight_decay, precond_freq=precond_freq,
                     epsilon_sparse=epsilon_sparse, k_min=k_min, k_max=k_max, rho=rho, tau=tau,
                     warmup_steps=warmup_steps, blend_steps=blend_steps,
                     min_precond_updates=min_precond_updates, max_precond_dim=max_precond_dim,
                     **_torch_layout(kwargs, params))


class OAdamW(Optimizer):
  """OAdamW (StableAdamW + Newton–Schulz on matrices) as a torch optimizer.

  ``OAdamW(model_or_params, lr, ...)``: unlike the seed, the second positional argument is
  ``lr`` (the seed's ``training_args`` broke ``OAdamW(params, 3e-4)``); a model is grouped
  automatically by :func:`stax.oadamw` (``grouping="auto"``: ``ndim >= 2`` weights but not
  embeddings/heads; ``grouping="seed"`` for the seed's every-matrix rule), with torch's
  ``(out, in)`` layout (:func:`torch_bridge.torch_dimension_numbers`, passed per parameter
  as ``dimension_numbers``; fused q/k/v projections are three matrices; given a model,
  :class:`torch_bridge.ModuleLayout`, which also reads its Hugging Face ``Conv1D`` weights as
  the ``(in, out)`` matrices they are). ``muon="gradient"`` is the seed's update,
  ``muon="off"`` is optimi's ``StableAdamW``. Defaults are the seed's (``betas=(0.9, 0.99)``,
  ``weight_decay=1e-2``, ``eps=1e-6``).

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.OAdamW(model, 3e-4)   # lr: the second positional argument
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> opt.step()
    >>> opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
    (0.0003, (0.9, 0.99))
  """

  def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.99),
               weight_decay: float = 1e-2, eps: float = 1e-6, decouple_lr: bool = False,
               max_lr: Optional[float] = None, kahan_sum: Optional[bool] = None,
               **kwargs: Any):
    _check_scalars(lr=lr, weight_decay=weight_decay, eps=eps, max_lr=max_lr)
    if decouple_lr and max_lr is None:
      # optimi's default: the constructor's lr (the bridge passes each step's lr as an array,
      # which a scheduler changes; stax.oadamw asks for max_lr then)
      max_lr = _scalar("lr", lr)
    if kwargs.get("muon", "momentum") != "off":  # "off" has no matrices
      # (a model's nn.Embedding weights are no matrices here: out of Muon whatever their names,
      # T5's `shared`, an `encoder` tied to its `decoder`; not with the seed's grouping, Muon
      # on every matrix, or given `labels`)
      kwargs = _torch_layout(kwargs, params, embeddings=(
          "labels" in kwargs or kwargs.get("grouping") == "seed"))
    super().__init__(_named(params), stax.oadamw, lr=lr, betas=_betas(betas),
                     weight_decay=weight_decay, eps=eps, decouple_lr=decouple_lr,
                     max_lr=max_lr, kahan_sum=kahan_sum, **kwargs)


class TurboAdam(Optimizer):
  """TurboAdam (compressed Adam state) as a torch optimizer; the seed's (``turboadam`` 0.2.0)
  argument names and defaults.

  ``codec="turboadam-0.2"`` reproduces the seed's codecs, ``codec="factored"`` (default: 4-bit
  m + Adafactor's factored v, ≈ 4.6–5 bits/param) and ``codec="stax"`` (4-bit m + 4-bit log v,
  8.75 bits/param) are stax's (see :func:`stax.turbo_adam`). The seed's separate
  ``min_m_compress_elements``/``min_v_compress_elements`` must be equal (stax has one
  threshold); ``rounding_seed`` seeds the JAX key kept in the state. ``capturable`` is accepted
  and ignored (the bridge step is one jitted call).

  Example:
    >>> import torch, torch_bridge
    >>> model = torch.nn.Linear(64, 128)
    >>> opt = torch_bridge.TurboAdam(model, lr=1e-3)   # the 128×64 weight is compressed
    >>> model(torch.ones(1, 64)).sum().backward()
    >>> opt.step()
    >>> opt.param_groups[0]["codec"], opt.param_groups[0]["min_compress_elements"]
    ('factored', 4096)
  """

  def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0, block_size: int = 128,
               v_bits: int = 4, compress_m: bool = True, compress_v: bool = True,
               capturable: bool = False, min_m_compress_elements: int = 4096,
               min_v_compress_elements: int = 4096, m_block_size: Optional[int] = None,
               rounding_seed: int = 305419896, codec: str = "factored",
               **kwargs: Any):
    V.check_bool("capturable", capturable)
    del capturable
    _check_scalars(lr=lr, eps=eps, weight_decay=weight_decay, block_size=block_size,
                   v_bits=v_bits, min_m_compress_elements=min_m_compress_elements,
                   min_v_compress_elements=min_v_compress_elements, m_block_size=m_block_size,
                   rounding_seed=rounding_seed)
    if _scalar("min_m_compress_elements", min_m_compress_elements) != _scalar(
        "min_v_compress_elements", min_v_compress_elements):
      raise ValueError("TurboAdam: stax uses one threshold; `min_m_compress_elements` and "
                       "`min_v_compress_elements` must be equal.")
    # a model's layout (ModuleLayout: Conv1D, transposed and grouped convs, RNN gates) for the
    # factored v's matrices
    kwargs = _torch_layout(kwargs, params)
    super().__init__(_named(params), stax.turbo_adam, lr=lr, betas=_betas(betas), eps=eps,
                     weight_decay=weight_decay, block_size=block_size, v_bits=v_bits,
                     compress_m=compress_m, compress_v=compress_v,
                     min_compress_elements=min_m_compress_elements, m_block_size=m_block_size,
                     seed=rounding_seed, codec=codec, **kwargs)
