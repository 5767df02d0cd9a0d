r"""Three CPU process settings for optimizer steps with temporaries: the lean XLA scheduler,
glibc backing large blocks with huge pages, and glibc keeping freed memory.

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

The same flag also keeps XLA:CPU's collectives from deadlocking on a multi-device CPU mesh
with fewer cores than devices (``--xla_force_host_platform_device_count``, a test set-up): the
concurrency-optimised schedule lets one device enter two collectives at once, and the
rendezvous of another waits for a thread that never comes, until XLA aborts the process
("Termination timeout for all gather ..."). Measured on a 2-core machine, an 8-leaf model
FSDP-sharded over 4 forced host devices stepped by ``stax.scao`` (the optimizer whose step has
the most independent collectives): 3 aborts in 6 runs with the default scheduler, 0 in 13 with
this flag (2026-12-07; found at stop 50, 3 in 10 then, 0 in 8).

XLA reads this choice from the process's flags, not from a compilation's options:
``jax.jit(..., compiler_options={"xla_cpu_enable_concurrency_optimized_scheduler": False})`` is
accepted and has no effect (measured with jax 0.10.2). So the flag goes into ``XLA_FLAGS``
before JAX creates its CPU backend (before the first computation), e.g. at the top of a
training script::

    import os, stax
    os.environ["XLA_FLAGS"] = stax.lean_memory_xla_flags(os.environ.get("XLA_FLAGS"))
    import jax  # the CPU backend is created at the first computation, with the flag

The second setting, :func:`reuse_cpu_temporaries`, removes the page faults whatever the size of
the temporaries (up to 2 GiB): it tells glibc to keep the memory a step frees (no ``mmap`` per
block, no trimming, one arena for every thread), so the next step's block comes from memory
already mapped. Call it after ``import stax`` and before JAX's first computation (XLA's threads
take their malloc arenas when they start). Measured (``benchmarks/cpu_allocation.py``, 16M
parameters, one process per setting, ratio to ``optax.adamw`` in the same process):
``stax.scao(mode="scao-0.2.4")`` 2.93× → 1.64× (23,653 faults per step → 1; the seed's torch
SCAO in the same loops 3.66× → 1.92×), ``stax.scao`` 1.93× → 1.32×, ``stax.turbo_adam`` 3.96× →
2.58×. **The price**: every thread then allocates from one malloc arena, and XLA's runtime
allocates small buffers on several threads every call, so steps *without* large temporaries get
slower: ``stax.adamw`` 1.10–1.20× → 1.44–1.49× ``optax.adamw`` at 1M and 1.20–1.22× →
1.35–1.42× at 16M, STAC 0.64–0.71× → 0.80–0.90×, and ``optax.adamw``'s own 1M step 1.5–2.0 →
2.4–2.6 ms (two processes per setting, ``mallopt`` with only the mmap and trim settings, no
arena limit, costs nothing but removes no fault: the block is allocated on one of XLA's threads,
whose own arena maps any block above 64 MiB). And memory the process frees is not returned to
the system (its resident size stays at its peak). So it pays where a step's temporaries are
large (TurboAdam, SCAO, OAdamW's Newton–Schulz at scale), not in general.

The third, and the one to prefer where it works, is glibc's tunable :data:`HUGE_PAGE_MALLOC`
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35 or later): glibc then asks the kernel for
transparent huge pages (``madvise``) on the blocks it maps, so a step's block of temporaries
faults in 2 MiB at a time instead of 4 KiB (the pages are still zero-filled, but a fault per 512
pages fewer), with no change to the arenas and so no cost to steps without temporaries. glibc
reads tunables once, when the process starts: set it in the environment that starts Python
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py``), or build a child process's
environment with :func:`huge_page_malloc_env`; :func:`huge_page_malloc_active` tells whether the
running process has it. It needs the kernel's transparent huge pages in ``madvise`` or
``always`` mode (``/sys/kernel/mm/transparent_hugepage/enabled``; elsewhere it changes
nothing). Measured (16M parameters, one interleaved loop per process, ratio to ``optax.adamw``,
``benchmarks/cpu_allocation.py`` and ``python -m benchmarks.main --huge-page-malloc``):
``stax.turbo_adam`` 5.5× → 3.1× (21,886 faults per step → 428), ``stax.scao`` 2.5× → 1.7×, its
faithful mode 4.1× → 2.2× (23,652 → 89), the faithful codec 172 → 116 ms, ``stax.oadamw`` 458 →
411 ms; ``stax.adamw``, STAM, STAMLite and StableAdamW (no temporaries) unchanged within the
machine's noise.

(The TurboAdam figures above are from before stop 46, when its default step wrote the decoded
first moment out as float32 for the block absmax: it now recomputes it inside each pass, from
``stax.numerics.absmax`` and whole-word code packing, and its temporaries at 16M are 18 MiB, under
glibc's mmap threshold, so it faults in nothing per step with any of the three settings; the
settings still matter for its larger models, its other codecs, SCAO and OAdamW.)

Example:
  >>> import stax
  >>> stax.lean_memory_xla_flags("--xla_cpu_multi_thread_eigen=false")
  '--xla_cpu_multi_thread_eigen=false --xla_cpu_enable_concurrency_optimized_scheduler=false'
  >>> stax.lean_memory_xla_flags(stax.lean_memory_xla_flags())      # idempotent
  '--xla_cpu_enable_concurrency_optimized_scheduler=false'
"""

from __future__ import annotations

import ctypes
import os
from typing import Mapping, Optional

__all__ = ["LEAN_MEMORY_FLAG", "lean_memory_xla_flags", "reuse_cpu_temporaries",
           "HUGE_PAGE_MALLOC", "huge_page_malloc_env", "huge_page_malloc_active"]

#: The glibc tunable (a ``GLIBC_TUNABLES`` entry) that makes malloc ask for transparent huge
#: pages on the memory it maps (module docstring).
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"
_TUNABLE = HUGE_PAGE_MALLOC.split("=")[0]
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

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


# glibc's mallopt parameters (malloc.h) and the values reuse_cpu_temporaries sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_FREED_BYTES = 2**31 - 1   # the largest trim threshold mallopt's int takes (2 GiB)


def _glibc_version() -> Optional[tuple[int, int]]:
  """``(major, minor)`` of the process's glibc, or ``None`` when the C library is another."""
  try:
    version = ctypes.CDLL(None).gnu_get_libc_version
    version.restype = ctypes.c_char_p
    major, minor = (int(x) for x in version().decode().split(".")[:2])
  except (OSError, AttributeError, ValueError):
    return None
  return major, minor


def _backends_initialized() -> bool:
  """Whether JAX has created its backends (and with them XLA's CPU threads)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  check = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(check()) if check is not None else bool(getattr(xla_bridge, "_backends", None))


def reuse_cpu_temporaries() -> bool:
  """Makes glibc keep the memory a CPU step frees, so its temporaries stop page-faulting.

  XLA's CPU runtime allocates a compiled step's temporaries (one block) afresh on every call;
  glibc serves a block above its mmap threshold (at most 32 MiB, or 64 MiB in a thread's arena)
  with a new ``mmap`` and unmaps it on ``free``, so every page of the block faults in (and is
  zero-filled) again at the next step: 2.4 µs per 4 KiB page on one thread of the (virtualised)
  machine measured, where a streaming pass moves 4 KiB in under 0.1 µs. This sets, through
  ``mallopt``: ``M_MMAP_MAX = 0`` (no block is mapped on its own),
  ``M_TRIM_THRESHOLD = 2**31 - 1`` (freed memory at the top of the heap is kept, up to 2 GiB) and
  ``M_ARENA_MAX = 1`` (every thread allocates from the main heap, where those two apply; a
  thread's own arena would still map a block above 64 MiB). The next step's block then reuses
  pages already mapped. Results do not change; only where memory comes from.

  Call it once, after ``import stax`` and before JAX's first computation: XLA's worker threads
  choose their arena when they start, with the backend. The setting is process-wide and lasts
  for the process: freed memory is not returned to the system (the resident size stays at its
  peak), and every thread shares one arena, whose lock the runtime's small per-call allocations
  then contend for: steps without large temporaries get 10–35 % slower (module docstring). Use
  it for steps whose temporaries exceed 32 MiB (``compiled.memory_analysis()``), measured in
  ``benchmarks/cpu_allocation.py`` and ``python -m benchmarks.main --reuse-cpu-temporaries``.
  Where glibc is 2.35 or later and transparent huge pages are on, prefer starting the process
  with :data:`HUGE_PAGE_MALLOC`, which costs other steps nothing.

  Returns:
    ``True`` when the settings were applied; ``False`` when the C library is not glibc (e.g.
    macOS, musl), where nothing is changed.

  Raises:
    RuntimeError: when JAX's backends already exist (the threads that allocate a step's
      temporaries already have their arenas; the setting would not take effect).

  Example (in a fresh process)::

    import stax
    stax.reuse_cpu_temporaries()   # before the first jax computation
    import jax.numpy as jnp
    ...
  """
  if _glibc_version() is None:
    return False
  mallopt = ctypes.CDLL(None).mallopt
  if _backends_initialized():
    raise RuntimeError(
        "reuse_cpu_temporaries() must run before JAX's first computation: its backends (and "
        "XLA's CPU threads, which pick their malloc arenas when they start) already exist, so "
        "the setting would not take effect. Call it right after `import stax`.")
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                       (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)):
    if mallopt(param, value) != 1:
      raise RuntimeError(f"mallopt({param}, {value}) failed")
  return True


def huge_page_malloc_env(env: Optional[Mapping[str, str]] = None) -> dict:
  """A copy of ``env`` (default: this process's ``os.environ``) whose ``GLIBC_TUNABLES`` holds
  :data:`HUGE_PAGE_MALLOC`: added to the tunables already set (colon-separated), or replacing
  another ``glibc.malloc.hugetlb`` value. For the environment of a process to start
  (``subprocess.run(cmd, env=stax.huge_page_malloc_env())``): glibc reads it at start-up only.

  Raises:
    TypeError: when ``env`` is not a mapping of strings, or ``None``.

  Example:
    >>> import stax
    >>> stax.huge_page_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}
  """
  if env is None:
    env = os.environ
  if not isinstance(env, Mapping):
    raise TypeError(f"`env` must be a mapping (like os.environ) or None, got "
                    f"{type(env).__name__}.")
  out = dict(env)
  current = out.get("GLIBC_TUNABLES", "")
  if not isinstance(current, str):
    raise TypeError(f"`env['GLIBC_TUNABLES']` must be a string, got {type(current).__name__}.")
  kept = [t for t in current.split(":") if t and t.split("=")[0] != _TUNABLE]
  out["GLIBC_TUNABLES"] = ":".join(kept + [HUGE_PAGE_MALLOC])
  return out


def huge_page_malloc_active() -> bool:
  """Whether this process runs with :data:`HUGE_PAGE_MALLOC` in effect: it was started with the
  tunable (``glibc.malloc.hugetlb`` 1 or 2 in ``GLIBC_TUNABLES``), its C library is glibc 2.35
  or later, and the kernel's transparent huge pages are not off."""
  tunables = dict(t.split("=", 1) for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                  if "=" in t)
  if tunables.get(_TUNABLE) not in ("1", "2"):
    return False
  version = _glibc_version()
  if version is None or version < (2, 35):
    return False
  try:
    with open(_THP_ENABLED, encoding="ascii") as f:
      return "[never]" not in f.read()
  except OSError:
    return False
