"""Per-op kernel registry: named implementations, a default order per platform, and fallback.

Every kernel op (``"newton_schulz"``, ``"turbo_step"``) is an :class:`Op` that lists its
implementations by name:

* ``"xla"``: the plain ``jax.numpy`` reference (the oracle in tests, and the fallback);
* ``"pallas"``: the Pallas kernel. Off GPU/TPU it runs with ``interpret=True`` (slow, exact
  semantics), so tests check it on CPU when they ask for it by name.

An implementation is listed only when a kernel for it exists. ``implementation=`` then means:

* a name: run that implementation. An unknown name raises ``ValueError`` naming the op and its
  implementations; an implementation that does not support the input (shape, dtype, sharding,
  an option) raises ``NotImplementedError``, which the dispatcher turns into a ``ValueError``
  naming the reason.
* ``None``: the best available. The op's default order for the current platform is tried in
  turn, and an implementation that raises ``NotImplementedError`` passes to the next one.

Example:
  >>> import jax.numpy as jnp
  >>> from stax.kernels._registry import Op
  >>> double = Op("double", default_order={"cpu": ("xla",)}, register=False)
  >>> @double.register("xla")
  ... def _double(x):
  ...   return 2 * x
  >>> double.implementations
  ('xla',)
  >>> int(double(jnp.int32(3)))
  6
  >>> double(jnp.int32(3), implementation="triton")
  Traceback (most recent call last):
  ...
  ValueError: `implementation` for op 'double' must be None or one of ('xla',), got 'triton'.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax

__all__ = ["Op", "get_op", "ops", "platform", "use_interpret", "check_implementation"]

_OPS: dict[str, "Op"] = {}

#: The platform key that an op's ``default_order`` falls back to for unlisted platforms.
OTHER = "other"


def platform() -> str:
  """The default JAX backend as a registry platform key: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  name = jax.default_backend()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def use_interpret() -> bool:
  """Whether Pallas kernels run in interpret mode (every backend but GPU and TPU)."""
  return platform() not in ("gpu", "tpu")


class Op:
  """One kernel op: its implementations by name and the order ``None`` tries them in.

  Args:
    name: the op's name (used in error messages and by :func:`get_op`).
    default_order: platform key (``"cpu"``, ``"gpu"``, ``"tpu"``, or ``"other"`` for the rest)
      to the implementation names tried for ``implementation=None``, best first. Names that are
      not registered are skipped, so an order may mention a kernel that is optional.
    register: add the op to the module-level registry (:func:`get_op`, :func:`ops`).
  """

  def __init__(self, name: str, default_order: Mapping[str, Sequence[str]], *,
               register: bool = True):
    self.name = name
    self._impls: dict[str, Callable] = {}
    self._order = {k: tuple(v) for k, v in default_order.items()}
    if register:
      if name in _OPS:
        raise ValueError(f"kernel op {name!r} is already registered.")
      _OPS[name] = self

  def register(self, impl_name: str, fn: Optional[Callable] = None):
    """Registers ``fn`` as implementation ``impl_name``; usable as a decorator."""
    if fn is None:
      return lambda f: self.register(impl_name, f)
    if impl_name in self._impls:
      raise ValueError(f"op {self.name!r} already has an implementation {impl_name!r}.")
    self._impls[impl_name] = fn
    return fn

  @property
  def implementations(self) -> tuple[str, ...]:
    """The registered implementation names, in registration order."""
    return tuple(self._impls)

  def default_order(self, on: Optional[str] = None) -> tuple[str, ...]:
    """The registered implementations ``None`` tries on platform ``on`` (default: current)."""
    on = platform() if on is None else on
    order = self._order.get(on, self._order.get(OTHER, ("xla",)))
    return tuple(n for n in order if n in self._impls)

  def check(self, implementation: Optional[str]) -> None:
    """Raises ``ValueError`` unless ``implementation`` is ``None`` or a registered name."""
    if implementation is not None and implementation not in self._impls:
      raise ValueError(f"`implementation` for op {self.name!r} must be None or one of "
                       f"{self.implementations}, got {implementation!r}.")

  def __call__(self, *args, implementation: Optional[str] = None, **kwargs):
    """Runs the op with ``implementation`` (a name, or ``None`` for the best available)."""
    self.check(implementation)
    if implementation is not None:
      try:
        return self._impls[implementation](*args, **kwargs)
      except NotImplementedError as e:
        raise ValueError(f"op {self.name!r}: `implementation={implementation!r}` does not "
                         f"support this input: {e}") from e
    reasons = []
    for name in self.default_order():
      try:
        return self._impls[name](*args, **kwargs)
      except NotImplementedError as e:
        reasons.append(f"{name}: {e}")
    raise NotImplementedError(f"op {self.name!r}: no implementation supports this input on "
                              f"{platform()!r} ({'; '.join(reasons) or 'none registered'}).")

  def __repr__(self) -> str:
    return f"Op({self.name!r}, implementations={self.implementations})"


def get_op(name: str) -> Op:
  """The registered op ``name`` (its module must have been imported)."""
  try:
    return _OPS[name]
  except KeyError:
    raise ValueError(f"unknown kernel op {name!r}; registered: {tuple(_OPS)}.") from None


def ops() -> tuple[str, ...]:
  """Names of the registered ops."""
  return tuple(_OPS)


def check_implementation(op: str, implementation: Optional[str]) -> None:
  """Validates ``implementation`` for op ``op`` (for factories that check at construction)."""
  get_op(op).check(implementation)
