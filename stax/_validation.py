"""Construction-time argument checks.

Every public factory validates its *concrete* Python/NumPy arguments here, so bad input fails
with a ``ValueError``/``TypeError`` that names the argument and its allowed range, before any
tracing. Traced values (inside ``optax.inject_hyperparams`` or ``jit``) and schedules (callables)
are skipped: they cannot be checked without a host sync, and ``inject_hyperparams`` re-calls the
factory with tracers on every step.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable

import jax
import numpy as np

__all__ = ["check_number", "check_int", "check_choice", "check_betas", "is_concrete_number"]


def is_concrete_number(value: Any) -> bool:
  """True for Python/NumPy numbers and concrete 0-d arrays (not tracers, not callables)."""
  if isinstance(value, bool):
    return False
  if isinstance(value, numbers.Number):
    return True
  if isinstance(value, jax.core.Tracer):
    return False
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    try:
      float(value)
      return True
    except Exception:  # noqa: BLE001 - abstract/traced values cannot be read
      return False
  return False


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_schedule: bool = False,
    allow_none: bool = False,
) -> None:
  """Validates a real hyperparameter against ``[low, high]`` (bounds optional).

  Raises:
    TypeError: if ``value`` is not a real number (or a schedule where allowed).
    ValueError: if ``value`` lies outside the range, or is not finite.
  """
  if value is None and allow_none:
    return
  if callable(value):
    if allow_schedule:
      return
    raise TypeError(f"`{name}` must be a number, got a callable {value!r}.")
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, bool) or not (
      isinstance(value, numbers.Real) or
      (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0)):
    what = "a number or a schedule" if allow_schedule else "a number"
    raise TypeError(f"`{name}` must be {what}, got {type(value).__name__} {value!r}.")
  if not is_concrete_number(value):
    return
  v = float(value)
  lo = "[" if low_inclusive else "("
  hi = "]" if high_inclusive else ")"
  rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
  if not np.isfinite(v):
    raise ValueError(f"`{name}` must be finite and in {rng}, got {value!r}.")
  if low is not None and (v < low or (v == low and not low_inclusive)):
    raise ValueError(f"`{name}` must be in {rng}, got {value!r}.")
  if high is not None and (v > high or (v == high and not high_inclusive)):
    raise ValueError(f"`{name}` must be in {rng}, got {value!r}.")


def check_int(name: str, value: Any, *, low: int | None = None,
              high: int | None = None, allow_none: bool = False) -> None:
  """Validates an integer (structural) argument against ``[low, high]``."""
  if value is None and allow_none:
    return
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"`{name}` is structural and must be a Python int, got a traced value; "
        f"list it in `static_args` of optax.inject_hyperparams.")
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
  rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
  if (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"`{name}` must be an int in {rng}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """Validates that ``value`` is one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_betas(**betas: Any) -> None:
  """Validates decay rates in ``[0, 1)``."""
  for name, value in betas.items():
    check_number(name, value, low=0.0, high=1.0, high_inclusive=False)
