"""One dispatch for every kernel: ``implementation=`` in {"xla", "pallas", "triton", None}.

* ``"xla"``: the plain ``jax.numpy`` reference (the oracle in tests, the default on CPU);
* ``"pallas"``: the Pallas kernel; on a CPU backend it runs with ``interpret=True`` (slow, exact
  semantics) so CI checks it without a GPU;
* ``"triton"``: a jax-triton kernel (optional extra ``stax-optim[gpu]``; GPU only);
* ``None``: the best available — ``"pallas"`` on a GPU backend, ``"xla"`` elsewhere.

A kernel that cannot run where requested falls back to ``"xla"`` only when the request was
``None``; an explicit request that cannot be met raises ``ValueError`` naming the reason.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import jax

__all__ = ["IMPLEMENTATIONS", "resolve_implementation", "use_interpret", "backend"]

IMPLEMENTATIONS = ("xla", "pallas", "triton")


def backend() -> str:
  """The default JAX backend platform (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``)."""
  return jax.default_backend()


def _on_gpu() -> bool:
  return backend() in ("gpu", "cuda", "rocm")


def use_interpret() -> bool:
  """Pallas kernels run in interpret mode off GPU/TPU."""
  return backend() not in ("gpu", "cuda", "rocm", "tpu")


def resolve_implementation(implementation: Optional[str], *, has_pallas: bool = True,
                           has_triton: bool = False) -> str:
  """Validates ``implementation`` and returns the concrete one to run.

  Args:
    implementation: ``"xla"``, ``"pallas"``, ``"triton"`` or ``None`` (best available).
    has_pallas: whether the caller has a Pallas kernel.
    has_triton: whether the caller has a jax-triton kernel.
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"`implementation` must be one of {IMPLEMENTATIONS} or None, got {implementation!r}.")
  if implementation is None:
    return "pallas" if (has_pallas and _on_gpu()) else "xla"
  if implementation == "pallas" and not has_pallas:
    raise ValueError("`implementation='pallas'`: this operation has no Pallas kernel.")
  if implementation == "triton":
    if not has_triton:
      raise ValueError("`implementation='triton'`: this operation has no jax-triton kernel.")
    if importlib.util.find_spec("jax_triton") is None or not _on_gpu():
      raise ValueError("`implementation='triton'` needs the `gpu` extra (jax-triton) and a GPU.")
  return implementation
