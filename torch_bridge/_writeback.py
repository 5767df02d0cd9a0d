"""How new parameter values get back into torch: ``"copy"`` and ``"swap"`` writeback.

* :class:`CopyWriteback`: XLA writes the new values into the previous step's output buffers
  (donated "scratch", already copied into torch), then one batched ``copy_`` per step puts
  them into each parameter's own storage, which keeps every view, DDP bucket and tied alias.
* :class:`SwapWriteback`: from the first step on, each parameter's storage is a JAX-owned
  buffer that torch views through DLPack. For the call, torch lets go of it (the parameter
  holds an empty placeholder), the step donates it and XLA writes the new values in place (the
  same address step after step); once they are ready, torch views the buffer again. Torch
  therefore never views memory JAX could free or reuse: a view of the parameter held elsewhere
  keeps a DLPack reference, which blocks the donation (JAX writes a new buffer, the parameter
  moves there, the view keeps the old values). The same on CPU and CUDA. (An earlier CPU path
  let torch view the buffer with no DLPack reference while JAX donated it; in full test runs it
  returned garbage values now and then, so it was removed.) A parameter that is not contiguous
  (a ``channels_last`` conv weight) is copied into, as in copy mode: a JAX buffer is row-major.

Both share :class:`ParamViews`, the cache of each parameter's JAX view.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import torch

from torch_bridge import _internals, convert


def storage_key(p: torch.Tensor) -> tuple:
  """What identifies a tensor's memory for a cached view: address, shape, dtype, device."""
  return (p.data_ptr(), p.shape, p.dtype, p.device)


_PLACEHOLDERS: dict = {}


def _placeholder(p: torch.Tensor) -> torch.Tensor:
  """An empty tensor of ``p``'s dtype and device, for ``p.data`` while XLA owns its buffer."""
  key = (p.dtype, p.device)
  t = _PLACEHOLDERS.get(key)
  if t is None:
    t = _PLACEHOLDERS[key] = torch.empty((0,), dtype=p.dtype, device=p.device)
  return t


class ParamViews:
  """Parameter index → JAX view of the parameter's memory (in its shape or 1-D, as the step
  takes it), cached while its storage stays put (the view aliases the memory, so it always
  reads current values)."""

  def __init__(self):
    self.cache: dict = {}    # param index -> (storage key, JAX view)

  def get(self, i: int, p: torch.Tensor, shape: Optional[tuple] = None) -> jax.Array:
    """The view of parameter ``i`` (``p``) in ``shape`` (its own, or 1-D; default its own)."""
    key = storage_key(p)
    hit = self.cache.get(i)
    if hit is not None and hit[0] == key and (shape is None or hit[1].shape == shape):
      return hit[1]
    a = convert.to_jax(convert.boundary_view(p, shape))
    if convert.shares_memory(p, a):
      self.cache[i] = (key, a)
    return a


class CopyWriteback:
  """New values are copied into each parameter's storage (see the module docstring)."""
  name = "copy"
  donate = (0, 4, 5)   # states, skip count, scratch
  scratch = True

  def __init__(self, views: ParamViews):
    self.views = views
    self._scratch: dict = {}   # plan -> last output parameter buffers (donated next step)

  def scratch_for(self, plan: Any, p_on: Sequence[jax.Array]) -> list:
    """The buffers XLA writes the new parameters into: the last outputs of ``plan``."""
    scratch = self._scratch.pop(plan, None)
    if scratch is None:
      scratch = [jnp.zeros(a.shape, a.dtype, device=a.sharding) for a in p_on]
    return scratch

  def prepare(self, compiled, leaves, params, idx_on, p_on) -> list:
    return []

  def abort(self, plan, params, p_on) -> None:
    pass

  def dispatched(self, params, idx_on, flat_new) -> list:
    return []

  def finish(self, plan, params, idx_on, flat_new, pending) -> None:
    _internals.foreach_copy([params[i] for i in idx_on],
                            [convert.real_view(convert.to_torch(a), shape)
                             for a, shape in zip(flat_new, plan.shapes_on)])
    self._scratch = {plan: list(flat_new)}  # donated to the next step with this plan


class SwapWriteback:
  """Parameters move into JAX-owned buffers updated in place (see the module docstring)."""
  name = "swap"
  donate = (0, 1, 4)   # states, params_on, skip count
  scratch = False

  def __init__(self, views: ParamViews):
    self.views = views
    self.owned: dict = {}   # param index -> storage key of torch's DLPack view of a JAX buffer
    self._released: list = []

  def scratch_for(self, plan: Any, p_on: Sequence[jax.Array]) -> list:
    return []

  def prepare(self, compiled, leaves, params, idx_on, p_on) -> list:
    """Before the call: each parameter that views a JAX-owned buffer lets go of it, so JAX may
    donate the buffer (a view held elsewhere keeps a reference, and JAX then writes a new
    buffer). A parameter still in torch's own memory (its first step, or ``p.data`` replaced)
    keeps it: JAX only reads it."""
    self._released = []
    for i in idx_on:
      if self.owned.get(i) == storage_key(params[i]):
        params[i].data = _placeholder(params[i])
        self._released.append(i)
    return []

  def abort(self, plan, params, p_on) -> None:
    """The call failed before running: the released parameters view their buffers again."""
    released = set(self._released)
    for i, a, shape in zip(plan.idx_on, p_on, plan.shapes_on):
      if i in released:
        params[i].data = convert.real_view(convert.to_torch(a), shape)
    self._released = []

  def dispatched(self, params, idx_on, flat_new) -> list:
    """Right after dispatch: the new buffers, to be viewed once ready."""
    return list(zip(idx_on, flat_new))

  def finish(self, plan, params, idx_on, flat_new, pending) -> None:
    strided = []
    for (i, a), shape in zip(pending, plan.shapes_on):  # DLPack views, once the buffers are ready
      t = convert.real_view(convert.to_torch(a), shape)
      if not params[i].is_contiguous():
        # a parameter in another memory format (a channels_last conv weight) keeps it, as
        # torch's optimizers keep it: its new values are copied in, as copy mode does (a JAX
        # buffer is row-major; viewing it had made the weight, and its next gradient,
        # contiguous). It crossed to JAX as a contiguous copy anyway.
        strided.append((params[i], t))
        continue
      params[i].data = t
      # new values, as an in-place update makes: a graph built before the step that saved the
      # parameter then fails its backward, as in copy mode and torch's optimizers, instead of
      # differentiating at the new values (`.data =` leaves the version counter alone)
      torch.autograd.graph.increment_version(params[i])
      key = storage_key(t)
      self.views.cache[i] = (key, a)
      self.owned[i] = key
    if strided:
      _internals.foreach_copy([p for p, _ in strided], [t for _, t in strided])
    self._released = []


def make_writeback(name: str, views: Optional[ParamViews] = None):
  """The writeback strategy called ``name`` (``"copy"`` or ``"swap"``)."""
  views = ParamViews() if views is None else views
  return CopyWriteback(views) if name == "copy" else SwapWriteback(views)
