"""Every private jax / torch entry point the bridge uses, each with its self-check and fallback.

The bridge runs a few hot paths per tensor per step where the public wrappers cost as much as
the step itself on small models, and reads facts that no public API exposes. Each use is
here, behind a function that works (more slowly, or more conservatively) when the private
entry point is missing or fails its self-check:

* :func:`import_cpu`: jaxlib's DLPack import without ``jax.dlpack.from_dlpack``'s wrapper
  (fallback: ``None``, the caller takes the public path).
* :func:`export_cpu`: jaxlib's DLPack export without ``jax.Array.__dlpack__``'s wrapper
  (fallback: ``None``, the caller uses ``torch.from_dlpack``).
* :func:`compiled_count`: ``jax.jit``'s ``_cache_size`` (fallback: 0).
* :func:`profiler_enabled`: torch's profiler switch (fallback: ``True``, always record).
* :func:`global_step_hooks`: torch's global optimizer step-hook registries (fallback: none).
* :func:`mark_step_hooked`: the ``hooked`` flag torch's ``_patch_step_function`` reads so it
  does not wrap ``step`` again.
* :func:`foreach_copy`: ``torch._foreach_copy_`` (fallback: one ``copy_`` per tensor).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import torch

__all__ = ["import_cpu", "export_cpu", "compiled_count", "profiler_enabled",
           "global_step_hooks", "mark_step_hooked", "foreach_copy"]

_DL_CPU = 1  # DLDeviceType.kDLCPU
_TORCH_TO_DLPACK = torch.utils.dlpack.to_dlpack  # C entry point (Tensor.__dlpack__ wraps it)


# ------------------------------------------------------------------------------------ DLPack
def _fast_import_fn(cpu: Any) -> Optional[Callable]:
  """jaxlib's 5-argument DLPack import (``None`` without it or when the self-check fails)."""
  try:
    from jax._src.lib import _jax, jaxlib_extension_version  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  fn = getattr(_jax, "dlpack_managed_tensor_to_buffer", None)
  if fn is None or jaxlib_extension_version < 467:
    return None
  try:  # self-check once: same memory, same dtype, a jax.Array
    t = torch.arange(16, dtype=torch.float32)
    a = fn(_TORCH_TO_DLPACK(t), cpu, None, False, _DL_CPU)
    if (isinstance(a, jax.Array) and a.dtype == np.float32 and a.shape == (16,)
        and int(a.unsafe_buffer_pointer()) == t.data_ptr()):
      return fn
  except Exception:  # noqa: BLE001
    pass
  return None


def _fast_export_fn(cpu: Any) -> Optional[Callable]:
  """jaxlib's DLPack export (``None`` without it or when the self-check fails)."""
  try:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
    fn = _jax.buffer_to_dlpack_managed_tensor
    a = jax.device_put(np.arange(16, dtype=np.float32), cpu)
    t = torch.utils.dlpack.from_dlpack(fn(a, stream=None))
    if (t.dtype == torch.float32 and tuple(t.shape) == (16,)
        and t.data_ptr() == int(a.unsafe_buffer_pointer())):
      return fn
  except Exception:  # noqa: BLE001
    pass
  return None


_FAST: Optional[tuple] = None   # (the CPU device, the fast import, the fast export)


def _fast() -> tuple:
  """``(CPU device, fast import, fast export)``, found on first use, not at import: asking JAX
  for a device starts its backends, after which ``XLA_FLAGS`` set by the user (the README's
  ``stax.LEAN_MEMORY_FLAG``, a host device count) are ignored (``import torch_bridge`` had
  started them)."""
  global _FAST
  if _FAST is None:
    cpu = jax.devices("cpu")[0]
    _FAST = (cpu, _fast_import_fn(cpu), _fast_export_fn(cpu))
  return _FAST


def import_cpu(t: torch.Tensor) -> Optional[jax.Array]:
  """A JAX array over CPU tensor ``t``'s memory through jaxlib's import, or ``None``.

  Skips ``jax.dlpack.from_dlpack``'s Python wrapper (~20 us per tensor, a third of a small
  step's overhead), which adds nothing for a dense, contiguous CPU tensor of a non-64-bit
  dtype (no stream, no dtype canonicalisation, no device move). ``None`` when the fast entry
  point is missing or refuses the tensor (``requires_grad``, misaligned): the caller then takes
  the public, checked path.
  """
  cpu, fast_import, _ = _FAST or _fast()
  if fast_import is None:
    return None
  try:
    return fast_import(_TORCH_TO_DLPACK(t), cpu, None, False, _DL_CPU)
  except Exception:  # noqa: BLE001
    return None


def export_cpu(a: jax.Array) -> Optional[torch.Tensor]:
  """A torch tensor over JAX CPU array ``a``'s buffer through jaxlib's export, or ``None``
  (not on this process's CPU device, or no fast entry point)."""
  cpu, _, fast_export = _FAST or _fast()
  if fast_export is None or a.sharding.device_set != {cpu}:
    return None
  return torch.utils.dlpack.from_dlpack(fast_export(a, stream=None))


# ------------------------------------------------------------------------------- executables
def compiled_count(fn: Any) -> int:
  """How many executables ``jax.jit`` function ``fn`` has compiled (0 when unknown)."""
  try:
    return int(fn._cache_size())  # pylint: disable=protected-access
  except Exception:  # noqa: BLE001
    return 0


# --------------------------------------------------------------------------------- torch.optim
def _profiler_flag() -> Callable[[], bool]:
  try:
    fn = torch._C._autograd._profiler_enabled  # pylint: disable=protected-access
    if isinstance(fn(), bool):
      return fn
  except Exception:  # noqa: BLE001
    pass
  return lambda: True


#: ``True`` while a torch profiler is active (then ``step`` records itself).
profiler_enabled: Callable[[], bool] = _profiler_flag()


def global_step_hooks() -> tuple[dict, dict]:
  """torch's global ``(pre, post)`` optimizer step-hook registries (empty when absent)."""
  try:
    from torch.optim import optimizer as topt  # pylint: disable=import-outside-toplevel
    pre, post = topt._global_optimizer_pre_hooks, topt._global_optimizer_post_hooks  # pylint: disable=protected-access
    if isinstance(pre, dict) and isinstance(post, dict):
      return pre, post
  except Exception:  # noqa: BLE001
    pass
  return {}, {}


def mark_step_hooked(step: Callable) -> Callable:
  """Marks an optimizer's ``step`` as running its hooks itself: ``torch.optim.Optimizer``
  (``_patch_step_function``) then does not wrap it in its own hook/profiler wrapper."""
  step.hooked = True
  return step


def _foreach_copy_fn() -> Optional[Callable]:
  fn = getattr(torch, "_foreach_copy_", None)
  if fn is None:
    return None
  try:  # self-check once
    a, b = [torch.zeros(2)], [torch.ones(2)]
    fn(a, b)
    if torch.equal(a[0], b[0]):
      return fn
  except Exception:  # noqa: BLE001
    pass
  return None


_FOREACH_COPY = _foreach_copy_fn()


def foreach_copy(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
  """``dst[k].copy_(src[k])`` for every ``k``, as one batched call where torch has it."""
  if _FOREACH_COPY is not None:
    _FOREACH_COPY(list(dst), list(src))
    return
  for d, s in zip(dst, src):
    d.copy_(s)
