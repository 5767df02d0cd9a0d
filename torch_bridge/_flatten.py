"""Elementwise work on flat arrays: a jaxpr pass that runs a step in its arguments' flat form.

The bridge passes a tensor with a narrow last axis to its jitted step as a 1-D view
(:func:`torch_bridge.convert.boundary_shape`), because XLA's CPU backend loops over an
elementwise kernel in its output's shape and vectorises only the last axis. The transform must
still see the real shape (shape-based labels, matrix views, row-blocked codecs), so the step is
traced on the real shapes and :func:`flat_call` then evaluates its jaxpr with each flat argument
kept flat through every elementwise operation: ``add``, ``mul``, ``sqrt``, ``select_n``, a
broadcast scalar, ... run on the 1-D arrays, and an operation that depends on the shape (a
reduction, a dot, random bits, a loop) gets the value in its real shape.

Leaving the reshape to XLA does not work: its ``ReshapeMover`` sinks a reshape through an
elementwise op only when every user of the reshape moves, so a parameter read twice (weight
decay and the update) stays 4-D inside a kernel whose output is 1-D, and that kernel, indexing
4-D bitcasts of flat buffers, ran 3x *slower* than the plain 4-D one (8 weights ``(512, 512, 3,
3)``: ``p + lr * (g + wd * p)`` 27.3 ms mixed, 8.8 ms 4-D, 6.9 ms flat).

The result is bit for bit the step on the real shapes, which the bridge's tests check against
pure JAX: an elementwise op computes each element alone whatever the array's shape, and a
shape-dependent operation gets its operand in the real shape behind an
``optimization_barrier`` (else XLA rewrites a reduction of a reshape into one of the flat array,
which sums in another order). What would change rounding is an elementwise op that meets a flat
operand and a non-scalar one computed in the real shape (Adafactor's ``rows ⊗ cols`` against a
flat moment): XLA's simplifier then sees other expressions than in the real step (``a/b/c`` is
rewritten to ``a/(b·c)`` only when both divisions are in view) and the last bits differ. A dry
run over the jaxpr finds the arguments whose values meet such an op, and they enter in their
real shapes (those leaves run as before).

Example:
  >>> import jax, jax.numpy as jnp
  >>> f = lambda p, g: (p - 0.1 * (g + 0.01 * p), jnp.sum(g))
  >>> real = [jax.ShapeDtypeStruct((2, 3, 3), jnp.float32)] * 2
  >>> sorted(flattenable(f, real, [0, 1]))
  [0, 1]
  >>> p, g = jnp.ones(18), jnp.full(18, 2.0)
  >>> out = jax.jit(lambda p, g: flat_call(f, (p, g), [(2, 3, 3)] * 2, [(18,), ()]))(p, g)
  >>> [o.shape for o in out]
  [(18,), ()]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
from jax import lax
from jax.extend import core

__all__ = ["flat_call", "flattenable", "trace", "ELEMENTWISE"]

#: Primitives that compute each output element from the same element of each operand (operands
#: of one shape, or scalars): they run on the flat arrays unchanged.
ELEMENTWISE = frozenset((
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "conj", "convert_element_type", "copy", "cos", "cosh", "digamma", "div",
    "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min",
    "mul", "ne", "neg", "nextafter", "not", "or", "population_count", "pow", "real",
    "reduce_precision", "rem", "round", "rsqrt", "select_n", "shift_left",
    "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sinh", "sqrt", "square",
    "sub", "tan", "tanh", "xor",
))

#: Calls whose body is evaluated inline (nested ``jax.jit``, ``custom_jvp``/``custom_vjp``
#: functions: the step is not differentiated).
_CALLS = frozenset(("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr"))


#: Reductions whose result does not depend on the order of the elements (exactly, NaN too):
#: over every axis of a flat value they run on the flat array (a sum too when every element is
#: 0 or NaN).
_ORDERLESS = frozenset(("reduce_max", "reduce_min", "reduce_and", "reduce_or"))


class _Flat(NamedTuple):
  """A value held flat: ``data`` (1-D; ``None`` in a dry run) is the array of shape ``shape``
  in row-major order; ``scalar``: the scalar it broadcasts, if it is one's broadcast; ``src``:
  the arguments it is computed from; ``zero_or_nan``: every element is 0 or NaN (``x - x``,
  :func:`stax.transforms.guards.all_finite`'s probe), so its sum is the same in any order."""
  data: Any
  shape: tuple
  scalar: Any = None
  src: frozenset = frozenset()
  zero_or_nan: bool = False


@dataclasses.dataclass
class _Run:
  """One evaluation: ``dry`` (shapes only, nothing is computed) and the arguments found to meet
  real-shaped operands in an elementwise op (``mixed``)."""
  dry: bool
  mixed: set = dataclasses.field(default_factory=set)


def _real(v: Any) -> Any:
  """``v`` in its real shape: a broadcast scalar broadcast again, a flat array reshaped behind an
  ``optimization_barrier`` (module docstring; XLA's CPU pipeline removes barriers before fusion,
  so it costs no copy)."""
  if not isinstance(v, _Flat):
    return v
  if v.scalar is not None:
    return lax.broadcast_in_dim(v.scalar, v.shape, ())
  return lax.optimization_barrier(lax.reshape(v.data, v.shape))


def trace(fn: Callable, args: Sequence[Any]) -> Any:
  """The closed jaxpr of ``fn`` (returning a pytree) on ``args`` (real shapes), with its output
  leaves as outputs: what :func:`flattenable` and :func:`flat_call` take instead of ``fn`` when
  one trace should serve both."""
  return jax.make_jaxpr(lambda *xs: jax.tree.leaves(fn(*xs)))(*args)


def flattenable(fn: Any, args: Sequence[Any], candidates: Sequence[int]) -> frozenset:
  """The ``candidates`` (argument positions) that can enter ``fn`` flat: a dry run over its
  jaxpr (shapes only) drops every argument whose values meet a real-shaped operand in an
  elementwise op, until none does (module docstring).

  Args:
    fn: a function of real-shaped arrays, returning a pytree of arrays, or its :func:`trace`.
    args: its arguments' shapes and dtypes (``jax.ShapeDtypeStruct``), real shapes.
    candidates: the positions to try flat (arguments of two or more axes).
  """
  flat = {i for i in candidates if len(args[i].shape) > 1}
  if not flat:
    return frozenset()
  closed = fn if isinstance(fn, core.ClosedJaxpr) else trace(fn, args)
  consts = [jax.typeof(c) for c in closed.consts]
  while flat:
    run = _Run(dry=True)
    _eval(closed.jaxpr, consts, [_Flat(None, tuple(a.shape), src=frozenset((i,)))
                                 if i in flat else a for i, a in enumerate(args)], run)
    if not run.mixed & flat:
      break
    flat -= run.mixed
  return frozenset(flat)


def flat_call(fn: Any, args: Sequence[Any], shapes: Sequence[Sequence[int]],
              out_shapes: Optional[Sequence[Sequence[int]]] = None) -> list:
  """``fn(*real_args)``'s output leaves, where ``real_args[i]`` is ``args[i]`` in its real shape
  ``shapes[i]``, with the elementwise work of the 1-D arguments on the flat arrays (module
  docstring; :func:`flattenable` says which arguments may enter flat).

  Args:
    fn: a function of the real-shaped arrays, returning a pytree of arrays, or its
      :func:`trace`.
    args: the arrays: an argument of two or more real axes passed 1-D enters flat, any other
      enters in its real shape (which it must have).
    shapes: each argument's real shape.
    out_shapes: the shape each output leaf is returned in: its real shape or its flat one
      (default: the real shapes). A result computed in the other form is reshaped (behind an
      ``optimization_barrier`` when computed real).
  """
  shapes = [tuple(s) for s in shapes]
  flat = {i for i, (a, s) in enumerate(zip(args, shapes)) if tuple(a.shape) != s}
  if any(len(shapes[i]) < 2 or a.ndim != 1 for i, a in enumerate(args) if i in flat):
    raise ValueError("flat_call: an argument not in its real shape must be 1-D with two or "
                     "more real axes.")
  closed = fn if isinstance(fn, core.ClosedJaxpr) else None
  if flat:
    if closed is None:
      closed = trace(fn, [jax.ShapeDtypeStruct(s, a.dtype) for a, s in zip(args, shapes)])
    outs = _eval(closed.jaxpr, closed.consts,
                 [_Flat(a, s) if i in flat else a for i, (a, s) in enumerate(zip(args, shapes))],
                 _Run(dry=False))
  elif closed is not None:
    outs = _eval(closed.jaxpr, closed.consts, list(args), _Run(dry=False))
  else:                                                    # nothing flat: the function as is
    outs = jax.tree.leaves(fn(*args))
  res = []
  for k, o in enumerate(outs):
    x = o.data if isinstance(o, _Flat) else o
    want = tuple(x.shape if out_shapes is None and not isinstance(o, _Flat) else
                 o.shape if out_shapes is None else out_shapes[k])
    if tuple(x.shape) != want:   # a real result made flat: reshaped behind a barrier
      x = lax.reshape(x if isinstance(o, _Flat) else lax.optimization_barrier(x), want)
    res.append(x)
  return res


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], run: _Run) -> list:
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    outs = _apply(eqn, [read(v) for v in eqn.invars], run)
    for var, val in zip(eqn.outvars, outs):
      if not isinstance(var, core.DropVar):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _apply(eqn: Any, vals: list, run: _Run) -> list:
  name, params = eqn.primitive.name, eqn.params
  flats = [v for v in vals if isinstance(v, _Flat)]
  if name in _CALLS:                                             # inline nested calls
    inner = next(params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in params)
    jaxpr, consts = (inner.jaxpr, inner.consts) if hasattr(inner, "jaxpr") else (inner, ())
    if run.dry:
      consts = [jax.typeof(c) for c in consts]
    return _eval(jaxpr, consts, vals, run)
  if name in ELEMENTWISE and flats:
    shape = flats[0].shape
    src = frozenset().union(*(v.src for v in flats))
    if all(isinstance(v, _Flat) and v.shape == shape or _is_scalar(v) for v in vals):
      zero_or_nan = (name == "sub" and vals[0] is vals[1] and vals[0].scalar is None
                     or name == "convert_element_type" and vals[0].zero_or_nan)
      if run.dry:
        return [_Flat(None, shape, src=src, zero_or_nan=zero_or_nan) for _ in eqn.outvars]
      with eqn.ctx.manager:
        out = eqn.primitive.bind(*[v.data if isinstance(v, _Flat) else v for v in vals],
                                 **params)
      outs = out if eqn.primitive.multiple_results else [out]
      return [_Flat(o, shape, src=src, zero_or_nan=zero_or_nan) for o in outs]
    run.mixed |= src                           # meets a real-shaped operand: runs real
  if (flats and isinstance(vals[0], _Flat) and vals[0].scalar is None
      and (name in _ORDERLESS or name == "reduce_sum" and vals[0].zero_or_nan)
      and tuple(params["axes"]) == tuple(range(len(vals[0].shape)))):
    if run.dry:                                # over every axis, in any order the same value
      return [eqn.outvars[0].aval]
    with eqn.ctx.manager:
      return [eqn.primitive.bind(vals[0].data, **{**params, "axes": (0,)})]
  if name == "reshape" and isinstance(vals[0], _Flat) and len(params["new_sizes"]) == 1:
    return [vals[0].data if not run.dry else eqn.outvars[0].aval]   # raveled: the flat data
  if (name == "dynamic_update_slice" and all(isinstance(v, _Flat) for v in vals[:2])
      and vals[0].shape == vals[1].shape):     # a whole-array update (the start is clamped to 0)
    if run.dry:
      return [_Flat(None, vals[0].shape, src=vals[0].src | vals[1].src)]
    zero = lax.full((), 0, vals[2].dtype if hasattr(vals[2], "dtype") else "int32")
    return [_Flat(lax.dynamic_update_slice(vals[0].data, vals[1].data, (zero,)), vals[0].shape,
                  src=vals[0].src | vals[1].src)]
  if name == "broadcast_in_dim" and _is_scalar(vals[0]) and len(params["shape"]) >= 2:
    shape = tuple(params["shape"])
    if run.dry:
      return [_Flat(None, shape, scalar=vals[0])]
    return [_Flat(lax.broadcast_in_dim(vals[0], (math.prod(shape),), ()), shape, vals[0])]
  if run.dry:
    return [v.aval for v in eqn.outvars]
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*[_real(v) for v in vals], **eqn.primitive.get_bind_params(params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _is_scalar(v: Any) -> bool:
  return not isinstance(v, _Flat) and tuple(getattr(v, "shape", ())) == ()
