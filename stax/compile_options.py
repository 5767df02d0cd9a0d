r"""The XLA flag that keeps an optimizer step's temporaries small on CPU.

:data:`LEAN_MEMORY_FLAG` (and :func:`lean_memory_xla_flags`, which adds it to an ``XLA_FLAGS``
value) selects XLA's memory-minimising CPU scheduler instead of its default
*concurrency-optimised* one. The default interleaves independent work of all parameter leaves,
so the float32 temporaries of every leaf's decode/encode (decoded v, its log, the new m, ...)
are live at the same time; the memory-minimising scheduler runs each leaf's work to the end
before the next. It matters for optimizers that decode and re-encode compressed state
(TurboAdam) or reduce per tensor (STAMLite, StableAdamW); elementwise ones (``optax.adamw``,
``stax.adamw``) need no temporaries either way. It changes only the order of independent work,
never a result (tested bit for bit).

Measured (``benchmarks/speed.py``'s step-memory table, XLA's buffer assignment of a donated step
at 128M parameters with GPT shapes): ``stax.turbo_adam``'s temporaries 2.06 GiB → 0.60 GiB, its
peak 3.20 → 1.74 GiB (``optax.adamw``: 2.01 GiB); at 16M STAMLite's 79 MiB → 12 MiB. Smaller
temporaries are also faster on CPU: XLA allocates them afresh every step and glibc maps a block
above 32 MiB anew each time, so every page faults in again (``benchmarks/cpu_allocation.py``: a
16M TurboAdam step, 85.5 MiB of temporaries and 21,888 faults per step, 3.77× ``optax.adamw``;
with this flag 21.5 MiB, 14 faults, 2.82×).

XLA reads this choice from the process's flags, not from a compilation's options:
``jax.jit(..., compiler_options={"xla_cpu_enable_concurrency_optimized_scheduler": False})`` is
accepted and has no effect (measured with jax 0.10.2). So the flag goes into ``XLA_FLAGS``
before JAX creates its CPU backend (before the first computation), e.g. at the top of a
training script::

    import os, stax
    os.environ["XLA_FLAGS"] = stax.lean_memory_xla_flags(os.environ.get("XLA_FLAGS"))
    import jax  # the CPU backend is created at the first computation, with the flag

Example:
  >>> import stax
  >>> stax.lean_memory_xla_flags("--xla_cpu_multi_thread_eigen=false")
  '--xla_cpu_multi_thread_eigen=false --xla_cpu_enable_concurrency_optimized_scheduler=false'
  >>> stax.lean_memory_xla_flags(stax.lean_memory_xla_flags())      # idempotent
  '--xla_cpu_enable_concurrency_optimized_scheduler=false'
"""

from __future__ import annotations

from typing import Optional

__all__ = ["LEAN_MEMORY_FLAG", "lean_memory_xla_flags"]

#: The XLA flag for the memory-minimising CPU scheduler.
LEAN_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_NAME = LEAN_MEMORY_FLAG.split("=")[0]


def lean_memory_xla_flags(xla_flags: Optional[str] = None) -> str:
  """``xla_flags`` (an ``XLA_FLAGS`` value; ``None`` or ``""`` for none) with
  :data:`LEAN_MEMORY_FLAG` set: appended, or replacing another value of the same flag.

  Raises:
    TypeError: when ``xla_flags`` is not a string or ``None``.
  """
  if xla_flags is not None and not isinstance(xla_flags, str):
    raise TypeError(f"`xla_flags` must be a string or None, got {type(xla_flags).__name__}.")
  kept = [f for f in (xla_flags or "").split() if f.split("=")[0] != _NAME]
  return " ".join(kept + [LEAN_MEMORY_FLAG])
