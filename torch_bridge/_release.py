"""Gradient release: each parameter stepped from its post-accumulate-grad hook.

After ``loss.backward()`` every parameter is already updated and its ``grad`` freed, so peak
memory holds one gradient at a time (the pattern of torch's "optimizer in backward").
"""

from __future__ import annotations

from typing import Any

import torch


def enable(opt: Any, params_or_model: Any = None) -> list:
  """``opt.enable_gradient_release(params_or_model)``: registers the hooks, returns them."""
  if opt._state_scope != "param" or opt._global_nonfinite is not None:
    raise ValueError("gradient release needs state_scope='param' and global_nonfinite=None.")
  if params_or_model is None:
    params_or_model = opt._flat_params()
  params = (params_or_model.parameters() if isinstance(params_or_model, torch.nn.Module)
            else params_or_model)

  def hook(p):
    if p.grad is None:
      return
    step_param(opt, p)
    p.grad = None

  handles = [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
  opt._release_handles = (opt._release_handles or []) + handles
  return handles


def disable(opt: Any) -> None:
  """``opt.disable_gradient_release()``: removes the hooks; ``step()`` steps again."""
  for h in opt._release_handles or []:
    h.remove()
  opt._release_handles = None


def step_param(opt: Any, p: torch.Tensor) -> None:
  """Steps the one parameter ``p`` (its own compiled step)."""
  for i, q in enumerate(opt._flat_params()):
    if q is p:
      opt._run({i})
      return
  raise ValueError("torch_bridge: this parameter is not in the optimizer.")


def prepare_for_gradient_release(params_or_model: Any, optimizer: Any) -> list:
  """``optimizer.enable_gradient_release(params_or_model)`` (see
  :meth:`Optimizer.enable_gradient_release`).

  Example:
    >>> import torch, stax, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.Optimizer(model.parameters(), stax.adamw, lr=1e-3)
    >>> handles = torch_bridge.prepare_for_gradient_release(model, opt)
    >>> model(torch.ones(1, 4)).sum().backward()   # steps each parameter, frees its grad
    >>> len(handles), model.weight.grad is None
    (2, True)
  """
  from torch_bridge.optimizer import Optimizer  # pylint: disable=g-import-not-at-top
  if not isinstance(optimizer, Optimizer):
    raise TypeError("prepare_for_gradient_release needs a torch_bridge.Optimizer.")
  return optimizer.enable_gradient_release(params_or_model)


def remove_gradient_release(optimizer: Any) -> None:
  """``optimizer.disable_gradient_release()``: ``step()`` steps again.

  Example:
    >>> import torch, stax, torch_bridge
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torch_bridge.Optimizer(model.parameters(), stax.adamw, lr=1e-3)
    >>> handles = torch_bridge.prepare_for_gradient_release(model, opt)
    >>> torch_bridge.remove_gradient_release(opt)
    >>> model(torch.ones(1, 4)).sum().backward()   # no step in backward: the grad is kept
    >>> model.weight.grad is not None
    True
  """
  optimizer.disable_gradient_release()
