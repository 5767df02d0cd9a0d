"""Repository-wide pytest hooks (tests/ and the docstring examples of stax and torch_bridge).

One hook: XLA's CPU backend cannot compile float16 conversions when ``XLA_FLAGS`` caps its
instruction set below F16C (``--xla_cpu_max_isa=SSE4_2``): LLVM emits calls to the
``__truncsfhf2`` / ``__extendhfsf2`` runtime helpers, which XLA's JIT does not link, and every
program that converts to or from float16 raises ``JaxRuntimeError: INTERNAL: Failed to
materialize symbols``. That is a limit of the XLA build, not of stax (every x86 CPU that runs
jaxlib at its default ISA has F16C). A test that fails with exactly that error, on a machine
where a bare ``float32 -> float16`` conversion fails the same way, is reported as skipped with
the reason, so ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`` runs the rest of the suite; any other
failure is reported as it is.
"""

from __future__ import annotations

import functools

import pytest

_SYMBOLS = ("__truncsfhf2", "__extendhfsf2", "__truncdfhf2")
_MESSAGE = "Failed to materialize symbols"


@functools.lru_cache(maxsize=None)
def _float16_unsupported() -> bool:
  """True when this XLA CPU build cannot compile a float32 <-> float16 conversion."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  try:
    x = jax.jit(lambda v: v.astype(jnp.float16).astype(jnp.float32))(np.ones(4, np.float32))
    jax.block_until_ready(x)
  except Exception as e:  # noqa: BLE001 - the probe only classifies the failure
    return _MESSAGE in str(e)
  return False


def _is_float16_symbol_error(excinfo) -> bool:
  exc = excinfo.value
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    inner = getattr(exc, "exc_info", None)          # doctest.UnexpectedException
    if inner is not None and inner[1] is not None and inner[1] is not exc:
      exc = inner[1]
      continue
    text = str(exc)
    if _MESSAGE in text or any(s in text for s in _SYMBOLS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if (report.failed and call.excinfo is not None and _is_float16_symbol_error(call.excinfo)
      and _float16_unsupported()):
    report.outcome = "skipped"
    report.longrepr = (str(item.path), item.location[1] or 0,
                       "Skipped: this XLA CPU build cannot compile float16 conversions under "
                       "XLA_FLAGS --xla_cpu_max_isa below F16C (missing __truncsfhf2 / "
                       "__extendhfsf2); see conftest.py")
