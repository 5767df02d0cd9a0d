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

import torch

import stax
from stax import _validation as V
from stax.optimizers import stac as stac_rules
from torch_bridge.optimizer import Optimizer

__all__ = ["STAC", "STAM", "STAMLite", "SCAO", "OAdamW", "TurboAdam", "stac_modules"]


def stac_modules(model_or_params: Any) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
  """``[(module_name, [(param_name, param), ...]), ...]`` in STAC's order (see module doc).

  ``model_or_params`` is an ``nn.Module`` (registration order, trainable parameters only, tied
  parameters owned by their first module, root parameters under ``"<root>"``), a sequence of
  ``(name, tensor)`` pairs (module = the name without its last component, in first-appearance
  order), or plain tensors (each tensor its own module).
  """
  seen: set = set()
  modules: list = []
  if isinstance(model_or_params, torch.nn.Module):
    for mname, module in model_or_params.named_modules():
      entries = []
      for pname, p in module.named_parameters(recurse=False):
        if not p.requires_grad or id(p) in seen:
          continue
        seen.add(id(p))
        entries.append((f"{mname}.{pname}" if mname else pname, p))
      if entries:
        modules.append((mname or "<root>", entries))
    return modules
  index: dict = {}
  for i, item in enumerate(model_or_params):
    name, p = item if isinstance(item, tuple) else (f"param_{i}", item)
    if not isinstance(p, torch.Tensor):
      raise TypeError(f"STAC takes a model, (name, tensor) pairs or tensors; got {type(p)}.")
    if id(p) in seen or not p.requires_grad:
      continue
    seen.add(id(p))
    mname = name.rsplit(".", 1)[0] if (isinstance(item, tuple) and "." in name) else (
        "<root>" if isinstance(item, tuple) else name)
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
      raise ValueError(f"`{name}` must be a number or a 1-element tensor, got a tensor of "
                       f"shape {tuple(value.shape)}.")
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
  import optax  # pylint: disable=g-import-not-at-top
  return optax.chain(optax.scale(-1.0), tx) if maximize else tx


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

  Args:
    model_or_params: an ``nn.Module`` (recommended), ``(name, tensor)`` pairs or tensors; see
      :func:`stac_modules`.
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
               amsgrad: bool = False, writeback: str = "copy"):
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
    modules = stac_modules(model_or_params)
    if not modules:
      raise ValueError("STAC requires at least one trainable parameter.")
    n = len(modules)
    k = stac_rules.cap_size(n, last_n_modules, last_n_ratio)
    sign_mods, cap_mods = modules[:n - k], modules[n - k:]
    hybrid = bool(sign_mods) and bool(cap_mods)
    lam_s = stac_rules.trunk_weight_decay(weight_decay, sign_weight_decay, hybrid)
    lam_a = weight_decay if adamw_weight_decay is None else adamw_weight_decay
    common = dict(exclude_1d_from_weight_decay=exclude_1d_from_weight_decay,
                  exclude_bias_from_weight_decay=exclude_bias_from_weight_decay,
                  maximize=maximize)
    groups = []
    if sign_mods:
      groups.append(dict(
          params=[np_ for _, entries in sign_mods for np_ in entries], transform=_stac_sign,
          stac_role="sign", module_names=tuple(m for m, _ in sign_mods),
          lr=lr * sign_lr_scale if hybrid else lr, weight_decay=lam_s, **common))
    if cap_mods:
      groups.append(dict(
          params=[np_ for _, entries in cap_mods for np_ in entries], transform=_stac_adamw,
          stac_role="adamw", module_names=tuple(m for m, _ in cap_mods), lr=lr,
          betas=tuple(betas), eps=eps, weight_decay=lam_a, **common))
    self.sign_lr_scale = sign_lr_scale
    self.resolved_last_n_modules = k
    self.trainable_module_count = n
    super().__init__(groups, _stac_adamw, state_scope="param", writeback=writeback,
                     global_nonfinite="error" if error_if_nonfinite else "skip",
                     lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    self._initialized = True

  def add_param_group(self, param_group: dict) -> None:
    if getattr(self, "_initialized", False):
      raise RuntimeError("STAC does not support add_param_group(); construct a new optimizer "
                         "so the sign/AdamW partition stays deterministic (as the seed).")
    super().add_param_group(param_group)


# --------------------------------------------------------------------------------- the others
def _named(params: Any) -> Any:
  """A model's trainable ``(name, tensor)`` pairs (names reach path-based rules); else as is."""
  if isinstance(params, torch.nn.Module):
    return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
  return params


def _torch_layout(kwargs: dict) -> dict:
  """``kwargs`` with the bridge passing each parameter's torch layout
  (:func:`torch_bridge.torch_dimension_numbers`) as ``dimension_numbers``, unless given."""
  if "dimension_numbers" in kwargs or kwargs.get("layout_kwarg") is not None:
    return kwargs
  return dict(kwargs, layout_kwarg="dimension_numbers")


class STAM(Optimizer):
  """STAM (Adam with a residual-variance-adapted beta1) as a torch optimizer.

  Arguments as :func:`stax.stam` and the seed's ``STAM`` (``b1_base``, ``b2``, ``eps``,
  ``weight_decay``, ``adapt_strength``, ``tau_decay``, ``fallback_threshold``), with torch's
  ``lr``; ``beta1_signal="seed"`` (default) is the seed's rule, ``"snr"`` stax's improved one.
  The seed is JAX-only, so its parity is tested in JAX (``tests/test_stam.py``); this class is
  the same transform through the bridge.
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
  as :func:`stax.stam_lite` and the seed's ``STAMLite``, with torch's ``lr``."""

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
                     **_torch_layout(kwargs))


class OAdamW(Optimizer):
  """OAdamW (StableAdamW + Newton–Schulz on matrices) as a torch optimizer.

  ``OAdamW(model_or_params, lr, ...)``: unlike the seed, the second positional argument is
  ``lr`` (the seed's ``training_args`` broke ``OAdamW(params, 3e-4)``); a model is grouped
  automatically by :func:`stax.oadamw` (``grouping="auto"``: ``ndim >= 2`` weights but not
  embeddings/heads; ``grouping="seed"`` for the seed's every-matrix rule), with torch's
  ``(out, in)`` layout (:func:`torch_bridge.torch_dimension_numbers`, passed per parameter
  as ``dimension_numbers``; fused q/k/v projections are three matrices). ``muon="gradient"`` is the seed's update,
  ``muon="off"`` is optimi's ``StableAdamW``. Defaults are the seed's (``betas=(0.9, 0.99)``,
  ``weight_decay=1e-2``, ``eps=1e-6``).
  """

  def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.99),
               weight_decay: float = 1e-2, eps: float = 1e-6, decouple_lr: bool = False,
               max_lr: Optional[float] = None, kahan_sum: Optional[bool] = None,
               **kwargs: Any):
    _check_scalars(lr=lr, weight_decay=weight_decay, eps=eps, max_lr=max_lr)
    if kwargs.get("muon", "momentum") != "off":  # "off" has no matrices
      kwargs = _torch_layout(kwargs)
    super().__init__(_named(params), stax.oadamw, lr=lr, betas=_betas(betas),
                     weight_decay=weight_decay, eps=eps, decouple_lr=decouple_lr,
                     max_lr=max_lr, kahan_sum=kahan_sum, **kwargs)


class TurboAdam(Optimizer):
  """TurboAdam (compressed Adam state) as a torch optimizer; the seed's (``turboadam`` 0.2.0)
  argument names and defaults.

  ``codec="turboadam-0.2"`` reproduces the seed's codecs, ``codec="stax"`` (default) is stax's
  rank-preserving variant (see :func:`stax.turbo_adam`). The seed's separate
  ``min_m_compress_elements``/``min_v_compress_elements`` must be equal (stax has one
  threshold); ``rounding_seed`` seeds the JAX key kept in the state. ``capturable`` is accepted
  and ignored (the bridge step is one jitted call).
  """

  def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0, block_size: int = 128,
               v_bits: int = 4, compress_m: bool = True, compress_v: bool = True,
               capturable: bool = False, min_m_compress_elements: int = 4096,
               min_v_compress_elements: int = 4096, m_block_size: Optional[int] = None,
               rounding_seed: int = 305419896, codec: str = "stax", **kwargs: Any):
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
    super().__init__(_named(params), stax.turbo_adam, lr=lr, betas=_betas(betas), eps=eps,
                     weight_decay=weight_decay, block_size=block_size, v_bits=v_bits,
                     compress_m=compress_m, compress_v=compress_v,
                     min_compress_elements=min_m_compress_elements, m_block_size=m_block_size,
                     seed=rounding_seed, codec=codec, **kwargs)
