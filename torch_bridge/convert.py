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
import jax
import numpy as np
import torch

from torch_bridge import _internals

__all__ = ["to_jax", "grad_to_jax", "to_torch", "owned_view", "Owner", "shares_memory", "check_dtype",
           "copy_counts", "PARAM_DTYPES"]

#: Parameter dtypes the bridge steps (float64 too when ``jax_enable_x64`` is on).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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


class Owner:
  """Keeps the JAX array whose CPU buffer a torch tensor views (see :func:`owned_view`).

  Attributes:
    array: the JAX array owning the buffer; whoever updates the buffer in place (a donated
      step whose output reuses it) must rebind ``array`` to the output, which then owns it.
    ptr: the buffer's address.
    key: free for the caller (the bridge keeps the tensor's storage key there).
  """
  __slots__ = ("array", "ptr", "key", "__array_interface__", "__weakref__")


# JAX dtype name -> (torch dtype, numpy typestr of the buffer); bf16 crosses as uint16.
_OWNED_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2"),
                 "bfloat16": (torch.bfloat16, "<u2"), "float64": (torch.float64, "<f8")}


def owned_view(a: jax.Array) -> tuple[torch.Tensor, Owner]:
  """A torch tensor over JAX CPU array ``a``'s buffer that holds *no* DLPack reference.

  ``to_torch`` exports through DLPack, which JAX counts as an external reference: the buffer
  can then never be donated. Here the tensor is made from a numpy array over the address
  (``__array_interface__``), whose base is an :class:`Owner` holding ``a``: the memory lives
  as long as the tensor (or any view of it) does, and JAX still sees no outside user, so a
  jitted call may donate ``owner.array`` and write its output into the same buffer — which
  torch then sees, in place. The caller must make sure the output really reuses the buffer
  (the bridge checks the compiled executable's input/output aliases) and rebind
  ``owner.array`` to it; a donated buffer that is *not* reused is freed under the tensor.

  CPU only; float32, float16, bfloat16 (viewed through ``uint16``) and float64.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> t, owner = owned_view(jnp.ones(4))
    >>> step = jax.jit(lambda x: x * 3, donate_argnums=0)
    >>> owner.array = step(owner.array)  # written into the same buffer
    >>> t.tolist()
    [3.0, 3.0, 3.0, 3.0]
  """
  kind = _OWNED_DTYPES.get(a.dtype.name)
  if kind is None:
    raise TypeError(f"owned_view: unsupported dtype {a.dtype}.")
  owner = Owner()
  owner.array = a
  owner.ptr = int(a.unsafe_buffer_pointer())
  owner.key = None
  owner.__array_interface__ = {"data": (owner.ptr, False), "shape": tuple(a.shape),
                               "typestr": kind[1], "version": 3}
  t = torch.from_numpy(np.asarray(owner))
  return (t.view(kind[0]) if kind[0] == torch.bfloat16 else t), owner


def shares_memory(t: torch.Tensor, a: jax.Array) -> bool:
  """True when ``a`` is backed by ``t``'s memory (same data pointer)."""
  try:
    return int(a.unsafe_buffer_pointer()) == int(t.data_ptr())
  except Exception:  # noqa: BLE001 - sharded/deleted arrays have no single pointer
    return False
