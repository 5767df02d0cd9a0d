"""Construction-time argument checks.

Every public factory validates its *concrete* Python/NumPy arguments here, so bad input fails
with a ``ValueError``/``TypeError`` that names the argument and its allowed range, before any
tracing. Traced values (inside ``optax.inject_hyperparams`` or ``jit``) and schedules (callables)
are skipped: they cannot be checked without a host sync, and ``inject_hyperparams`` re-calls the
factory with tracers on every step.

Properties of the parameters themselves (integer, bool or complex leaves) are checked at ``init``
and the gradient tree against the parameters at ``update``: every optimizer factory returns its
transformation wrapped by :func:`with_param_checks`.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["check_number", "check_int", "check_choice", "check_betas", "check_decay",
           "check_bool", "check_mask", "mask_tree", "check_dtype", "check_param_leaves", "check_tree_match",
           "with_param_checks", "warn_no_effect", "is_concrete_number"]


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
  if isinstance(value, (jax.core.Tracer, jax.Array)):
    # optax.inject_hyperparams hands every numeric argument, its defaults included, over as an
    # array unless it is listed in static_args
    got = "a traced value" if isinstance(value, jax.core.Tracer) else f"an array ({value!r})"
    raise TypeError(
        f"`{name}` is structural and must be a Python int, got {got}; "
        f"list it in `static_args` of optax.inject_hyperparams.")
  if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
    raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
  rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
  if (low is not None and value < low) or (high is not None and value > high):
    raise ValueError(f"`{name}` must be an int in {rng}, got {value!r}.")


def check_mask(name: str, value: Any) -> Any:
  """Validates a weight-decay mask: ``None``, a callable ``params -> pytree of bools``, a bool
  (a prefix of any tree) or a pytree of bools laid out like the params (or a prefix); a number
  or string (``mask=5``) had been taken as truthy, or failed deep inside ``update``.

  Returns ``None`` for ``None``, else a callable ``params -> tree of bools`` (see
  :func:`mask_tree`) to hand to ``optax.add_decayed_weights``: a mask of the wrong structure or
  with a leaf that is not a bool then raises at ``init``, naming ``name``, instead of optax's
  bare pytree-structure error inside ``update``.
  """
  if value is None:
    return None
  if callable(value) or isinstance(value, (bool, np.bool_)):
    return functools.partial(mask_tree, name, value)
  if isinstance(value, (numbers.Number, str, bytes, np.ndarray, jax.Array)):
    raise TypeError(f"`{name}` must be None, a callable params -> pytree of bools, or a pytree "
                    f"of bools laid out like the params; got {type(value).__name__} {value!r}.")
  return functools.partial(mask_tree, name, value)


def _as_bool(name: str, path: Any, b: Any) -> bool:
  if isinstance(b, (bool, np.bool_)):
    return bool(b)
  if (isinstance(b, (np.ndarray, jax.Array)) and not isinstance(b, jax.core.Tracer)
      and np.ndim(b) == 0 and np.asarray(b).dtype == np.bool_):
    return bool(b)
  where = jax.tree_util.keystr(path) or "the mask"
  raise TypeError(f"`{name}` must hold bools; at {where} it holds {type(b).__name__} {b!r}.")


def mask_tree(name: str, mask: Any, tree: Any) -> Any:
  """The tree of bools, laid out like ``tree``, that the weight-decay mask ``mask`` selects.

  ``mask`` is a bool, a tree of bools laid out like ``tree`` or a prefix of it (a bool covers its
  sub-tree, as in ``optax.masked``), or a callable ``tree -> such a tree``.

  Raises:
    ValueError: naming ``name``, if the mask's structure is not ``tree``'s or a prefix of it.
    TypeError: naming ``name`` and the leaf's path, for a mask leaf that is not a bool.
  """
  m = mask(tree) if callable(mask) else mask
  flat, treedef = jax.tree_util.tree_flatten_with_path(m)
  m = jax.tree.unflatten(treedef, [_as_bool(name, path, b) for path, b in flat])
  return _broadcast_prefix(name, "bools", m, tree)


def _broadcast_prefix(name: str, what: str, prefix: Any, tree: Any) -> Any:
  """``prefix`` (a tree laid out like ``tree`` or a prefix of it) with each leaf repeated over
  its sub-tree of ``tree``; ``ValueError`` naming ``name`` for another layout."""
  try:
    return jax.tree.map(lambda b, sub: jax.tree.map(lambda _: b, sub), prefix, tree)
  except ValueError as e:
    raise ValueError(f"`{name}` must be a tree of {what} laid out like the parameters, or a "
                     f"prefix of them: {e}") from None


def check_labels(name: str, value: Any, choices: Iterable[str]) -> Any:
  """Validates a labels argument (OAdamW's ``labels``): ``None``, a callable ``params -> pytree
  of labels``, or a pytree of labels in ``choices`` laid out like the params (or a prefix of
  them: a label covers its sub-tree, as a mask's bool does). A number, an array or an unknown
  label is refused here; ``labels=5``, a tree of another structure or ``"muonn"`` had failed at
  ``init`` with JAX's or optax's errors, which do not name the argument.

  Returns ``None`` for ``None``, else a callable ``params -> full tree of labels``
  (:func:`label_tree`), which raises at ``init`` naming ``name`` (and the path of a bad leaf).
  """
  choices = tuple(choices)
  if value is None:
    return None
  if not callable(value):
    if isinstance(value, (numbers.Number, bytes, np.ndarray, jax.Array)) or (
        isinstance(value, str) and value not in choices):
      raise TypeError(f"`{name}` must be None, a callable params -> pytree of labels, or a "
                      f"pytree of labels in {choices} laid out like the params; got "
                      f"{type(value).__name__} {value!r}.")
    _check_label_leaves(name, value, choices)
  return functools.partial(label_tree, name, value, choices)


def _check_label_leaves(name: str, labels: Any, choices: tuple) -> None:
  for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]:
    if not isinstance(lab, str) or lab not in choices:
      where = jax.tree_util.keystr(path) or "the root"
      raise ValueError(f"`{name}` must hold labels in {choices}; at {where} it holds "
                       f"{type(lab).__name__} {lab!r}.")


def label_tree(name: str, labels: Any, choices: tuple, tree: Any) -> Any:
  """The tree of labels, laid out like ``tree``, that ``labels`` (a tree of labels or a prefix
  of one, or a callable ``tree -> such a tree``) gives.

  Raises:
    ValueError: naming ``name``, for a label not in ``choices`` (with its path) or a structure
      that is neither ``tree``'s nor a prefix of it.
  """
  lab = labels(tree) if callable(labels) else labels
  _check_label_leaves(name, lab, choices)
  return _broadcast_prefix(name, "labels", lab, tree)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """Validates that ``value`` is one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_betas(**betas: Any) -> None:
  """Validates decay rates in ``[0, 1)`` that stay below 1 in float32 (see :func:`check_decay`)."""
  for name, value in betas.items():
    check_decay(name, value)


#: The largest float32 below 1 (``1 - 2**-24``).
_F32_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


def check_decay(name: str, value: Any, *, low_inclusive: bool = True,
                allow_none: bool = False) -> None:
  """Validates a decay rate in ``[0, 1)`` (``(0, 1)`` without ``low_inclusive``).

  The optimizers compute in float32, where a rate within ``2**-25`` of 1 (``1 - 1e-9``) rounds
  to exactly 1: the bias correction ``1 - b**t`` is then 0 and the parameters become NaN. Such a
  rate is refused: it must satisfy ``np.float32(value) < 1``.

  Raises:
    TypeError: if ``value`` is not a real number.
    ValueError: if ``value`` is outside the range or rounds to 1 in float32.
  """
  check_number(name, value, low=0.0, high=1.0, low_inclusive=low_inclusive,
               high_inclusive=False, allow_none=allow_none)
  if is_concrete_number(value) and not np.float32(float(value)) < 1.0:
    lo = "[" if low_inclusive else "("
    raise ValueError(
        f"`{name}` must be in {lo}0, 1) after rounding to float32 (the optimizer computes in "
        f"float32), got {value!r}, which rounds to 1.0; the largest usable value is "
        f"{_F32_BELOW_ONE!r} (1 - 2**-24).")


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> None:
  """Validates a flag: a Python or NumPy bool (``None`` too with ``allow_none``).

  Strings and numbers are refused (``"False"`` is truthy).
  """
  if value is None and allow_none:
    return
  if isinstance(value, (bool, np.bool_)):
    return
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"`{name}` is structural and must be a Python bool, got a traced value; "
        f"list it in `static_args` of optax.inject_hyperparams.")
  allowed = "True, False or None" if allow_none else "True or False"
  raise TypeError(f"`{name}` must be a bool ({allowed}), got {type(value).__name__} {value!r}.")


def check_dtype(name: str, value: Any, *, allow_none: bool = True) -> None:
  """Validates a dtype argument: ``None`` (where allowed) or a floating dtype.

  Raises:
    TypeError: if ``value`` is not a dtype (``"notadtype"``, ``4.0``).
    ValueError: if ``value`` is a dtype but not a floating one (``int8``, ``complex64``).
  """
  allowed = "None or a floating dtype" if allow_none else "a floating dtype"
  allowed += " (e.g. jnp.float32, jnp.bfloat16)"
  if value is None:
    if allow_none:
      return
    raise TypeError(f"`{name}` must be {allowed}, got None.")
  try:
    dt = np.dtype(value)
  except Exception:  # noqa: BLE001 - numpy raises TypeError, or others for odd objects
    raise TypeError(f"`{name}` must be {allowed}, got {type(value).__name__} {value!r}.") from None
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"`{name}` must be {allowed}, got the dtype {dt.name}.")


def warn_no_effect(name: str, value: Any, default: Any, reason: str, *,
                   stacklevel: int = 3) -> None:
  """Warns (``UserWarning``) that ``name`` has no effect ``reason``, unless it is the default.

  Traced values (inside ``inject_hyperparams``/``jit``) cannot be compared and are skipped.
  """
  if value is default or isinstance(value, jax.core.Tracer):
    return
  try:
    same = value == default
    same = bool(same) if np.ndim(same) == 0 else False
  except Exception:  # noqa: BLE001 - incomparable values differ
    same = False
  if same:
    return
  warnings.warn(f"`{name}`={value!r} has no effect {reason}; it is ignored.", UserWarning,
                stacklevel=stacklevel)


def _leaf_dtype(leaf: Any):
  dt = getattr(leaf, "dtype", None)
  if dt is not None:
    return dt
  try:
    return np.result_type(leaf)
  except Exception:  # noqa: BLE001 - not an array-like leaf
    return None


def check_param_leaves(params: Any, *, allow_complex: bool, optimizer: str = "this optimizer",
                       complex_note: str | None = None) -> None:
  """Refuses parameter leaves the optimizer cannot update correctly, naming each leaf's path.

  Allowed: floating dtypes (float16, bfloat16, float32, float64, ...) and, with
  ``allow_complex``, complex ones. Integer and bool leaves (counters, masks, indices) have no
  gradient to descend along; exclude them with ``optax.partition``/``optax.masked``.
  ``complex_note`` replaces the advice given with a refused complex leaf.

  Raises:
    TypeError: naming the first offending leaf (``params['layer']['kernel']``) and its dtype.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in flat:
    dt = _leaf_dtype(leaf)
    where = f"params{jax.tree_util.keystr(path)}"
    if dt is not None and jnp.issubdtype(dt, jnp.floating):
      continue
    if dt is not None and jnp.issubdtype(dt, jnp.complexfloating):
      if allow_complex:
        continue
      note = complex_note or ("stax.adamw (and stax.stac's AdamW cap) support complex "
                              "parameters, or optimise the real and imaginary parts as two "
                              "real leaves")
      raise TypeError(
          f"{optimizer}: parameter {where} is complex ({np.dtype(dt).name}); this optimizer "
          f"supports real floating-point parameters only (float16, bfloat16, float32, "
          f"float64); {note}.")
    what = f"dtype {np.dtype(dt).name}" if dt is not None else f"type {type(leaf).__name__}"
    kinds = "floating-point or complex" if allow_complex else "floating-point"
    raise TypeError(
        f"{optimizer}: parameter {where} has {what}; only {kinds} parameters can be optimised. "
        f"Keep integer/bool leaves out of the optimiser (e.g. optax.partition with "
        f"optax.set_to_zero() for them).")


def check_tree_match(updates: Any, params: Any, *, optimizer: str = "this optimizer") -> None:
  """Refuses a gradient tree whose structure or leaf shapes differ from the parameters'.

  ``None`` gradient leaves are allowed where the parameters have a leaf.

  Raises:
    ValueError: saying which leaf paths or shapes differ.
  """
  is_none = lambda x: x is None  # noqa: E731
  u_flat, u_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_none)
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
  if u_def != p_def:
    u_paths = [jax.tree_util.keystr(p) for p, _ in u_flat]
    p_paths = [jax.tree_util.keystr(p) for p, _ in p_flat]
    u_set, p_set = set(u_paths), set(p_paths)
    extra = [p for p in u_paths if p not in p_set]
    missing = [p for p in p_paths if p not in u_set]
    detail = []
    if extra:
      detail.append(f"gradient leaves not in the params: {extra[:5]}")
    if missing:
      detail.append(f"params leaves without a gradient: {missing[:5]}")
    if not detail:
      detail.append(f"same leaf paths but different containers: gradients {u_def}, "
                    f"params {p_def}"[:400])
    raise ValueError(f"{optimizer}: the gradient tree does not match the params tree ("
                     + "; ".join(detail) + ").")
  for (path, u), (_, p) in zip(u_flat, p_flat):
    if u is None or p is None:
      continue
    if np.shape(u) != np.shape(p):
      raise ValueError(
          f"{optimizer}: the gradient tree does not match the params tree: gradient "
          f"{jax.tree_util.keystr(path)} has shape {np.shape(u)}, the parameter "
          f"{np.shape(p)}.")


def _state_shapes(state: Any) -> list:
  """The sorted shapes of a state's array leaves (order-free: frameworks may rebuild
  containers)."""
  return sorted(tuple(np.shape(x)) for x in jax.tree.leaves(state) if hasattr(x, "shape"))


def with_param_checks(tx: optax.GradientTransformation, *, optimizer: str,
                      allow_complex: bool = False, complex_note: str | None = None
                      ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` checks the parameter leaves (:func:`check_param_leaves`) and whose
  ``update`` checks the gradient tree against ``params`` when given (:func:`check_tree_match`).

  The state is ``tx``'s own; both checks run on static information only (dtypes, structure,
  shapes), at trace time under ``jit``.
  """
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    check_param_leaves(params, allow_complex=allow_complex, optimizer=optimizer,
                       complex_note=complex_note)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      check_tree_match(updates, params, optimizer=optimizer)
      return tx.update(updates, state, params, **extra_args)
    try:
      return tx.update(updates, state, params, **extra_args)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as e:
      # Without params, diagnose only after a failure (no cost on the normal path): the state
      # ``init`` would build from the gradients must hold arrays of the same shapes.
      try:
        fits = _state_shapes(jax.eval_shape(tx.init, updates)) == _state_shapes(state)
      except Exception:  # noqa: BLE001 - no diagnosis possible: report the original error
        fits = True
      if not fits:
        raise ValueError(
            f"{optimizer}: the gradient tree does not match the params tree the state was "
            f"initialised with (its leaves or shapes differ).") from e
      raise

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
