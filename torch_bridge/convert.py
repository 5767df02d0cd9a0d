"""DLPack conversion between torch tensors and JAX arrays (zero-copy where possible).

Rules (observed on jax 0.10.2 / torch 2.13, see ``reference/ecosystem.md`` §4.2):

* ``requires_grad`` tensors cannot be exported: :func:`to_jax` always ``detach()``-es first
  (a view of the same storage, no copy).
* Only compact (C-contiguous) strides cross; a non-contiguous tensor is made contiguous first
  (a copy, counted in :data:`copy_counts`).
* A buffer whose address is not 64-byte aligned is silently copied by JAX; :func:`to_jax` asks
  for ``copy=False`` first and falls back to an explicit copy, so every copy is counted.
* 64-bit dtypes are silently narrowed by JAX unless ``jax_enable_x64`` is on: they are refused
  with a ``TypeError`` instead (:func:`check_dtype`).
* JAX → torch (:func:`to_torch`) is zero-copy; the torch tensor then aliases a JAX buffer, so
  the bridge only uses it as the *source* of a ``copy_`` (or clones it for ``state_dict``).
* An array with a narrow last axis may cross the jitted step *flat* (:func:`boundary_shape`,
  :func:`boundary_view`): a torch conv weight ``(out, in, 3, 3)`` is passed as a 1-D view of
  the same memory when the step's elementwise work on it can all run flat
  (:mod:`torch_bridge._flatten`); the transform still sees its real shape.

Example:
  >>> import torch
  >>> from torch_bridge import convert
  >>> t = torch.ones(4, 4)
  >>> a = convert.to_jax(t)
  >>> convert.shares_memory(t, a)
  True
"""

from __future__ import annotations

import collections
import math
from typing import Optional, Sequence

import jax
import numpy as np
import torch

from torch_bridge import _internals

__all__ = ["to_jax", "grad_to_jax", "to_torch", "shares_memory", "check_dtype",
           "copy_counts", "PARAM_DTYPES", "LANE_MIN", "boundary_shape", "boundary_view",
           "real_view"]

#: Parameter dtypes the bridge steps (float64 too when ``jax_enable_x64`` is on).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The narrowest last axis an array always keeps at the jitted step's boundary
#: (:func:`boundary_shape`). XLA's CPU backend loops over an elementwise kernel in the shape of
#: its output and vectorises the innermost loop, the last axis: over a torch conv weight
#: ``(512, 512, 3, 3)`` an AdamW step ran 2.3x slower than over the same memory as one axis (this
#: project's 2-core CPU, 8 such weights: ``optax.adamw`` 43 ms against 19; a plain ``x * a + b``
#: 3.4 ms against 1.6; a last axis of 16 or 32 also slow, 64 and wider as fast as 1-D).
LANE_MIN = 128

#: How many tensors had to be copied on their way to JAX, by reason (for tests and profiling).
copy_counts: collections.Counter = collections.Counter()


def check_dtype(t: torch.Tensor, what: str = "parameter") -> None:
  """Raises ``TypeError`` for dtypes the bridge cannot step (complex, integer, 64-bit w/o x64)."""
  if t.is_complex():
    raise TypeError(f"torch_bridge: complex {what}s are not supported (got {t.dtype}); split "
                    "them into real and imaginary parts.")
  if not t.is_floating_point():
    raise TypeError(f"torch_bridge: {what}s must be floating point, got {t.dtype}.")
  if t.dtype == torch.float64 and not jax.config.read("jax_enable_x64"):
    raise TypeError(f"torch_bridge: float64 {what}s need `jax.config.update('jax_enable_x64', "
                    "True)`; without it JAX would silently narrow them to float32.")
  if t.dtype not in PARAM_DTYPES and t.dtype != torch.float64:
    raise TypeError(f"torch_bridge: unsupported {what} dtype {t.dtype}; use float32, bfloat16 "
                    "or float16.")


def boundary_shape(shape: Sequence[int]) -> tuple:
  """The shape an array of ``shape`` may cross the bridge's jitted step in: 1-D when it has two
  or more axes and its last is narrower than :data:`LANE_MIN`, else ``shape`` itself. (It
  crosses 1-D when :func:`torch_bridge._flatten.flattenable` also allows it.)

  Example:
    >>> boundary_shape((64, 3, 7, 7)), boundary_shape((768, 2304)), boundary_shape((64,))
    ((9408,), (768, 2304), (64,))
  """
  shape = tuple(int(d) for d in shape)
  if len(shape) >= 2 and shape[-1] < LANE_MIN:
    return (math.prod(shape),)
  return shape


def boundary_view(t: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
  """``t`` in ``shape`` (its own or 1-D; default its own): a detached view of the same memory
  (a contiguous copy, counted in :data:`copy_counts`, if ``t`` is not contiguous)."""
  if shape is None or tuple(shape) == tuple(t.shape) or t.layout is not torch.strided:
    return t                       # (a sparse tensor goes on to :func:`to_jax`'s error)
  t = t.detach()
  if not t.is_contiguous():
    copy_counts["non_contiguous"] += 1
    t = t.contiguous()
  return t.view(shape)


def real_view(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
  """``t`` (a step output in its boundary shape) viewed in the parameter's ``shape``."""
  return t if t.shape == shape else t.view(shape)


def to_jax(t: torch.Tensor) -> jax.Array:
  """A JAX array over ``t``'s memory (zero-copy when contiguous and 64-byte aligned).

  The JAX array aliases the tensor: the caller must not mutate ``t`` while the array is in use
  (the bridge blocks on its step's outputs before returning control to torch).
  """
  if (t.is_cpu and t.layout is torch.strided and t.dtype in PARAM_DTYPES
      and t.is_contiguous()):
    a = _internals.import_cpu(t)  # per tensor per step: no public wrapper
    if a is not None:
      return a
  if t.layout is not torch.strided:
    raise TypeError(f"torch_bridge: only dense (strided) tensors cross to JAX, got {t.layout}.")
  if t.requires_grad:
    t = t.detach()
  if not t.is_contiguous():
    copy_counts["non_contiguous"] += 1
    t = t.contiguous()
  if t.is_conj():
    t = t.resolve_conj()
  try:  # the public path (also for the rare tensors above: parameters are imported once)
    return jax.dlpack.from_dlpack(t, copy=False)
  except (ValueError, BufferError, RuntimeError):
    # Misaligned storage offset (JAX needs 64-byte alignment on CPU): copy explicitly.
    copy_counts["unaligned"] += 1
    return jax.dlpack.from_dlpack(t, copy=True)


def grad_of(p: torch.Tensor) -> torch.Tensor:
  """``p.grad``, which must have ``p``'s dtype (``TypeError`` otherwise: a gradient in another
  dtype, which torch allows with ``grad_dtype``, would reach the compiled step as another
  type; torch's own optimizers refuse it too)."""
  g = p.grad
  if g.dtype != p.dtype:
    raise TypeError(f"torch_bridge: a parameter's gradient is {g.dtype} where the parameter is "
                    f"{p.dtype} (shape {list(p.shape)}); the bridge steps gradients in their "
                    "parameter's dtype: cast the gradient (p.grad = p.grad.to(p.dtype)).")
  return g


def grad_to_jax(g: torch.Tensor) -> jax.Array:
  """:func:`to_jax` for a step's gradient; a sparse gradient raises ``RuntimeError``."""
  try:
    return to_jax(g)
  except TypeError:
    if g.is_sparse:
      raise RuntimeError("torch_bridge: sparse gradients are not supported; use a dense "
                         "embedding (sparse=False) or torch.optim.SparseAdam for it.") from None
    raise


def to_torch(a: jax.Array) -> torch.Tensor:
  """A torch tensor aliasing JAX array ``a`` (zero-copy).

  JAX treats its buffers as immutable: use the result only as a read-only source (``copy_``) or
  ``clone()`` it — or, as ``writeback="swap"`` does, hand the buffer over to torch and stop
  using the JAX array.
  """
  t = _internals.export_cpu(a)
  return torch.from_dlpack(a) if t is None else t


def shares_memory(t: torch.Tensor, a: jax.Array) -> bool:
  """True when ``a`` is backed by ``t``'s memory (same data pointer)."""
  try:
    return int(a.unsafe_buffer_pointer()) == int(t.data_ptr())
  except Exception:  # noqa: BLE001 - sharded/deleted arrays have no single pointer
    return False
