"""How new parameter values get back into torch: ``"copy"`` and ``"swap"`` writeback.

* :class:`CopyWriteback`: XLA writes the new values into the previous step's output buffers
  (donated "scratch", already copied into torch), then one batched ``copy_`` per step puts
  them into each parameter's own storage, which keeps every view, DDP bucket and tied alias.
* :class:`SwapWriteback`: from the first step on, each parameter's storage is a JAX-owned
  buffer that the step donates and XLA updates in place. On CPU torch views it through
  :func:`convert.owned_view` (no DLPack reference, so JAX may donate it while torch keeps
  viewing it): nothing is handed over per step, and every view of the parameter sees the
  update. That needs the compiled step to write each new parameter into its own input buffer
  (checked once per compiled step from the executable's alias table); otherwise a DLPack
  export per parameter, held for the call, blocks the donation (JAX writes a new buffer and
  torch is re-pointed to it). Elsewhere (CUDA) torch views the buffers through DLPack and
  lets go of them for the call.

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
  """Parameter index → JAX view of the parameter's memory, cached while its storage stays put
  (the view aliases the memory, so it always reads current values). Under swap writeback on
  CPU, ``owners`` holds the :class:`convert.Owner` of each JAX-owned parameter buffer."""

  def __init__(self):
    self.cache: dict = {}    # param index -> (storage key, JAX view)
    self.owners: dict = {}   # param index -> convert.Owner

  def get(self, i: int, p: torch.Tensor) -> jax.Array:
    owner = self.owners.get(i)
    if owner is not None:
      if p.data_ptr() == owner.ptr and p.shape == owner.key[0] and p.dtype is owner.key[1]:
        return owner.array
      del self.owners[i]  # p.data was replaced: its new storage is torch's
    key = storage_key(p)
    hit = self.cache.get(i)
    if hit is not None and hit[0] == key:
      return hit[1]
    a = convert.to_jax(p)
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

  def abort(self, params, idx_on, p_on) -> None:
    pass

  def dispatched(self, params, idx_on, flat_new) -> list:
    return []

  def finish(self, plan, params, idx_on, flat_new, pending) -> None:
    _internals.foreach_copy([params[i] for i in idx_on],
                            [convert.to_torch(a) for a in flat_new])
    self._scratch = {plan: list(flat_new)}  # donated to the next step with this plan


class SwapWriteback:
  """Parameters move into JAX-owned buffers updated in place (see the module docstring)."""
  name = "swap"
  donate = (0, 1, 4)   # states, params_on, skip count
  scratch = False

  def __init__(self, views: ParamViews):
    self.views = views

  def scratch_for(self, plan: Any, p_on: Sequence[jax.Array]) -> list:
    return []

  def prepare(self, compiled, leaves, params, idx_on, p_on) -> list:
    """Before the call: the DLPack exports that block donating a JAX-owned buffer the step
    does not update in place (held until the call returns); CUDA parameters let go of their
    buffers."""
    owners = self.views.owners
    if owners and compiled.inplace is None:
      compiled.inplace = _internals.inplace_outputs(compiled.fn, leaves, compiled.n_state,
                                                    len(p_on))
    guards = []
    for k, i in enumerate(idx_on):
      if i in owners:
        if not compiled.inplace[k]:
          guards.append(convert.to_torch(p_on[k]))
      elif not params[i].is_cpu:
        params[i].data = _placeholder(params[i])
    return guards

  def abort(self, params, idx_on, p_on) -> None:
    """The call failed before running: torch gets its (undonated) buffers back."""
    for i, a in zip(idx_on, p_on):
      if not params[i].is_cpu:
        params[i].data = convert.to_torch(a)

  def dispatched(self, params, idx_on, flat_new) -> list:
    """Right after dispatch (buffers are known): CPU parameters view their new buffers; the
    CUDA ones are returned, to be viewed once ready."""
    owners, late = self.views.owners, []
    for i, a in zip(idx_on, flat_new):
      owner = owners.get(i)
      if owner is not None and a.unsafe_buffer_pointer() == owner.ptr:
        owner.array = a  # updated in place: torch already views this buffer
      elif params[i].is_cpu:
        t, owner = convert.owned_view(a)  # the JAX buffer itself (read after the wait)
        params[i].data = t
        owner.key = (t.shape, t.dtype)
        owners[i] = owner
        self.views.cache.pop(i, None)
      else:
        late.append((i, a))
    return late

  def finish(self, plan, params, idx_on, flat_new, pending) -> None:
    for i, a in pending:  # DLPack views (CUDA): made once the buffers are ready
      t = convert.to_torch(a)
      params[i].data = t
      self.views.cache[i] = (storage_key(t), a)


def make_writeback(name: str, views: Optional[ParamViews] = None):
  """The writeback strategy called ``name`` (``"copy"`` or ``"swap"``)."""
  views = ParamViews() if views is None else views
  return CopyWriteback(views) if name == "copy" else SwapWriteback(views)
