r"""Momentum traces (``t ← g + μ·t``, Muon's momentum) that stay finite, optionally stored low-bit.

* :func:`saturating_trace`: ``optax.trace`` whose sums saturate at ±B (B =
  :func:`stax.numerics.square_bound`), so no finite gradient makes it non-finite.
* :func:`stored_trace`: the same trace stored in a blockwise signed ``bits``-bit code
  (:class:`stax.codecs.BlockSignedCodec`: per block an absmax scale in bfloat16, unbiased
  stochastic rounding to ``2^{bits-1}-1`` levels each side of zero), as 8-bit Muon
  (Gupta et al., *Effective Quantization of Muon Optimizer States*, 2025: 8-bit blockwise Muon
  momentum matching full-precision Muon). Each step decodes the stored trace
  :math:`\hat t_{t-1}`, forms :math:`t_t = g_t + \mu \hat t_{t-1}` in float32 (the step's output,
  as the Adam core uses the exact new moment) and stores :math:`t_t` re-encoded. The rounding
  key lives in the state (hashed with the step count and the leaf index), so runs are
  reproducible and a checkpoint resumes bit-exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from stax import _leafwise
from stax._trees import flatten_state, unflatten_state
from stax import _validation as V
from stax import numerics as num
from stax.codecs.base import _follow
from stax.codecs import rng
from stax.codecs.block_signed import BlockSignedCodec
from stax.codecs.row_view import from_row_view, to_row_view
from stax.transforms.guards import NONFINITE_OK, GateAwareTransformation, gate_aware, gate_value

__all__ = ["saturating_trace", "stored_trace", "StoredTraceState", "TRACE_BITS"]

TRACE_BITS = (2, 3, 4, 6, 8)


def _saturated_sum(g, t, decay):
  b = num.square_bound(g.dtype, t.dtype)
  return num.saturate(num.saturate(g, b) + decay * t, b)


def saturating_trace(decay: Any, nesterov: bool = False,
                     accumulator_dtype: Any = None) -> GateAwareTransformation:
  """``optax.trace`` (``t ← g + decay·t``, same state) whose sums saturate at ±B.

  Muon's momentum has no ``(1-decay)`` factor, so huge gradients would grow it past any bound;
  here the gradient, the new trace and the Nesterov output are each saturated at
  ``B = stax.numerics.square_bound`` of the gradient's and accumulator's dtypes (2**63 for
  float32/bfloat16), so they stay finite for any finite gradient. Below ``B`` this is
  ``optax.trace`` bit for bit, but for one thing: the trace is stored in its state's dtype
  (``accumulator_dtype``, else the parameter's), where ``optax.trace`` stores a wider gradient's
  sum in the gradient's dtype and its state changes type at the first step.

  Gate-aware (:mod:`stax.transforms.guards`): given :data:`~stax.transforms.guards.NONFINITE_OK`
  false, the new trace is the old one, selected element by element in the same pass that would
  have updated it (no select of the whole state afterwards: in :func:`stax.oadamw`, whose guard
  selected its whole state until it was gate-aware, XLA copied every moment each step).

  Example:
    >>> import jax.numpy as jnp, stax
    >>> tx = stax.saturating_trace(0.9)
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> u, state = tx.update({"w": jnp.array([1e30, 1.0])}, state)
    >>> float(u["w"][0]) == 2.0 ** 63, float(u["w"][1])
    (True, 1.0)
  """
  base = optax.trace(decay=decay, nesterov=nesterov, accumulator_dtype=accumulator_dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    ok = gate_value(extra_args.get(NONFINITE_OK))

    def step(g, t):
      new = _saturated_sum(g, t, decay)
      # one select per element (a zeroed gradient and a decay of 1 took three, and a bigger
      # loop for XLA to compile in every leaf)
      return new if ok is None else jnp.where(ok, new, t)

    new_trace = jax.tree.map(lambda g, t: None if g is None else step(g, t), updates,
                             state.trace, is_leaf=lambda g: g is None)
    f = lambda g, t: _saturated_sum(g, t, decay)
    updates = jax.tree.map(f, updates, new_trace) if nesterov else new_trace
    # stored in the state's dtype (``accumulator_dtype``, else the parameter's, as ``init``
    # made it): a gradient of a wider dtype (float32 gradients of bfloat16 parameters) made the
    # stored trace float32, so the state's type changed at the first step (a recompile, and a
    # ``lax.scan`` carry or checkpoint template that no longer fits)
    stored = jax.tree.map(lambda n, t: None if n is None else n.astype(t.dtype), new_trace,
                          state.trace, is_leaf=lambda n: n is None)
    return updates, optax.TraceState(trace=stored)

  return gate_aware(optax.GradientTransformationExtraArgs(base.init, update_fn))


class StoredTraceState(NamedTuple):
  """State of :func:`stored_trace`.

  Attributes:
    count: int32 steps taken (folded into the rounding key).
    key: raw ``uint32[2]`` PRNG key of the stochastic rounding.
    trace: per leaf, the codec's encoding of the trace on the leaf's row view (a
      :class:`stax.codecs.BlockSignedState`), or a float array for a leaf kept in full precision.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> state = stax.stored_trace(0.95).init({"w": jnp.zeros((64, 128)), "b": jnp.zeros(64)})
    >>> type(state.trace["w"]).__name__, state.trace["w"].codes.shape, state.trace["b"].dtype
    ('BlockSignedState', (64, 128), dtype('float32'))
    >>> int(state.count), state.key.shape
    (0, (2,))
  """
  count: jax.Array
  key: jax.Array
  trace: Any


def stored_trace(decay: Any, nesterov: bool = False, *, bits: int = 8,
                 block_size: Optional[int] = None, min_compress_elements: int = 4096,
                 accumulator_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
  r""":func:`saturating_trace` with the trace of each large leaf stored in ``bits`` bits.

  .. math::
    t_t = \mathrm{sat}(\mathrm{sat}(g_t) + \mu\,\hat t_{t-1}),\qquad
    \hat t_t = Q(t_t),\qquad \text{output } t_t \ (\text{Nesterov: } \mathrm{sat}(g_t + \mu t_t))

  with :math:`Q` the blockwise signed codec (stochastic rounding, :math:`E[Q(x)] = x`).

  Args:
    decay: the momentum μ in [0, 1) (default of Muon: 0.95).
    nesterov: Nesterov output ``g + μ t`` (default False).
    bits: bits per stored element, one of (2, 3, 4, 6, 8) (default 8).
    block_size: elements per bfloat16 scale along the leaf's row view (default ``None``: 128 at
      6 or 8 bits, 32 below, i.e. 8.125 / 4.5 bits per element); >= 1.
    min_compress_elements: leaves with fewer elements (and scalars) keep a full-precision trace,
      >= 0 (default 4096, as :func:`stax.turbo_adam`).
    accumulator_dtype: dtype of a full-precision trace (default: the parameter's).
    seed: seed of the rounding key kept in the state, an int in [0, 2**32) (default 0).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`StoredTraceState`.

  Example:
    >>> import jax.numpy as jnp, stax
    >>> tx = stax.stored_trace(0.95, bits=8)
    >>> params = {"w": jnp.zeros((512, 512))}
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": jnp.ones((512, 512))}, state)
    >>> float(u["w"][0, 0])
    1.0
    >>> round(stax.state_bits_per_param(state, params, exclude_scalars=True), 3)  # + the key
    8.125
  """
  V.check_decay("decay", decay)
  V.check_bool("nesterov", nesterov)
  V.check_int("bits", bits)
  V.check_choice("bits", bits, TRACE_BITS)
  if block_size is None:
    block_size = 128 if bits >= 6 else 32
  V.check_int("block_size", block_size, low=1)
  if (block_size * bits) % 8:
    raise ValueError(f"`block_size`·`bits` must be a multiple of 8 (block_size={block_size}, "
                     f"bits={bits}).")
  V.check_int("min_compress_elements", min_compress_elements, low=0)
  V.check_dtype("accumulator_dtype", accumulator_dtype)
  V.check_int("seed", seed, low=0, high=2 ** 32 - 1)
  codec = BlockSignedCodec(bits, block_size)

  def stored(x) -> bool:
    return jnp.ndim(x) >= 1 and jnp.size(x) >= max(min_compress_elements, 1)

  def init_fn(params):
    def leaf(p):
      if p is None:
        return None
      if stored(p):
        return codec.init(to_row_view(p, block_size))
      return jnp.zeros_like(p, dtype=accumulator_dtype or jnp.result_type(p))
    none = lambda x: x is None
    trace = unflatten_state(params, [leaf(p) for p in jax.tree.leaves(params, is_leaf=none)],
                            is_leaf=none)
    return StoredTraceState(jnp.zeros([], jnp.int32),
                            jax.random.key_data(jax.random.PRNGKey(seed)), trace)

  def update_fn(updates, state, params=None):
    del params
    g_leaves, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    enc = flatten_state(treedef, state.trace)
    # every leaf's key at once (the state key hashed with the step and the leaf's index,
    # stax.codecs.rng.leaf_keys: no threefry loop), each picked
    keys = (rng.leaf_keys(state.key, state.count, len(g_leaves))
            if any(g is not None and stored(g) for g in g_leaves) else None)
    outs, new_enc = [], []
    for i, (g, e) in enumerate(zip(g_leaves, enc)):
      if g is None:
        outs.append(None)
        new_enc.append(e)
        continue
      if stored(g):
        view = to_row_view(g, block_size)
        prev = from_row_view(codec.decode(e, view), g)
        t = _saturated_sum(g, prev, decay)
        code = codec.encode(to_row_view(t, block_size), _leafwise.pick(keys, i))
        new_enc.append(_follow(code, view))        # the codes on the leaf's sharding
      else:
        t = _saturated_sum(g, e, decay)
        new_enc.append(t.astype(e.dtype))
      out = _saturated_sum(g, t, decay) if nesterov else t
      outs.append(out.astype(g.dtype))
    new_state = StoredTraceState(optax.safe_increment(state.count), state.key,
                                 unflatten_state(updates, new_enc, is_leaf=lambda x: x is None))
    return jax.tree.unflatten(treedef, outs), new_state

  return optax.GradientTransformation(init_fn, update_fn)
