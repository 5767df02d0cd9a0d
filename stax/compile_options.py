r"""XLA compiler options for optimizer steps.

:func:`lean_memory_options` returns the options to pass to ``jax.jit(..., compiler_options=...)``
for a training step whose optimizer decodes and re-encodes compressed state (TurboAdam) or
reduces per tensor (STAMLite, StableAdamW).

On CPU, XLA's default scheduler is *concurrency-optimised*: it interleaves independent work of
all parameter leaves, so the float32 temporaries of every leaf's decode/encode (decoded v, its
log, the new m, ...) are live at the same time. The memory-minimising scheduler runs each leaf's
work to the end before the next. Measured in one compile at 128M parameters (GPT shapes,
donated step, ``benchmarks/speed.py``'s step-memory table): ``stax.turbo_adam``'s temporaries
2.06 GiB → 0.60 GiB (peak 3.20 → 1.74 GiB, under ``optax.adamw``'s 2.01 GiB), and at 16M
STAMLite's 79 MiB → 12 MiB, with the step time unchanged within this CPU's noise. Elementwise
optimizers (``optax.adamw``, ``stax.adamw``) need no temporaries either way. The option changes
only the order of independent work, never a result (tested bit for bit).

Example:
  >>> import jax, jax.numpy as jnp, optax, stax
  >>> tx = stax.turbo_adam(1e-3)
  >>> def step(p, s, g):
  ...   u, s = tx.update(g, s, p)
  ...   return optax.apply_updates(p, u), s
  >>> fast = jax.jit(step, donate_argnums=(0, 1), compiler_options=stax.lean_memory_options())
  >>> params = {"w": jnp.ones((64, 128))}
  >>> params, state = fast(params, tx.init(params), {"w": jnp.full((64, 128), 0.1)})
  >>> params["w"].shape
  (64, 128)
"""

from __future__ import annotations

from typing import Optional

import jax

__all__ = ["lean_memory_options"]

_CPU = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


def lean_memory_options(platform: Optional[str] = None) -> dict:
  """XLA options that schedule a step for the least live memory on ``platform``.

  Args:
    platform: ``"cpu"``, ``"gpu"``, ``"tpu"``, or ``None`` (default: JAX's default backend).

  Returns:
    A new dict for ``jax.jit(..., compiler_options=...)``: on CPU
    ``{"xla_cpu_enable_concurrency_optimized_scheduler": False}``; elsewhere empty (the GPU and
    TPU schedulers already account for memory).
  """
  platform = jax.default_backend() if platform is None else platform
  if platform not in ("cpu", "gpu", "tpu", "cuda", "rocm"):
    raise ValueError(f"`platform` must be None, 'cpu', 'gpu' or 'tpu', got {platform!r}.")
  return dict(_CPU) if platform == "cpu" else {}
