r"""Pallas kernel of the fused TurboAdam update (the ``"pallas"`` implementation).

The grid is ``(rows / R, n / block_size)`` over the leaf's row view: each program takes a tile
of ``R`` rows (the largest power of two up to :data:`MAX_ROWS_PER_PROGRAM` dividing the rows)
by one block, reads g and the packed state once, decodes v and the UState m, runs the Adam
core's step (:class:`stax.transforms.adam.LeafStep`: its array operands come in as inputs),
re-encodes both with the random stream generated in the kernel from (seed, flat index), and
writes the tile's Adam direction, packed codes, fp16 endpoints, bf16 means and each block's
:math:`\sum r^2`; one tiny reduction outside gives UState's next encode step, as the seed's
finalize kernel does. Bytes per parameter with float32 g and update, 4-bit v and 2-bit m: read
4 + 0.81, written 4 + 0.81 (the AdamW update of p that follows in the chain is one more
elementwise pass). Off GPU/TPU it runs with ``interpret=True``.

**Written for Pallas's Triton lowering.** A block is seen as :data:`PHASES` = 4 *phases*:
element ``4j + k`` is column ``j`` of phase ``k``, loaded from g by a strided ref load
(``pl.ds(k, bs/4, stride=4)``) and stored back the same way. UState's 2-bit codes hold four
elements per byte, so every phase's codes are a shift of the same bytes; 4-bit v codes are the
low or high nibble of every other byte (a stride-2 load), 2-bit ones a shift of every byte,
8-bit ones every fourth byte; a block's endpoints and means come in as one-column ref loads.
The block's extremes are the phases' extremes, and a mean block's sum (UState's re-centring
and its new means) is the phases' masked row sums added phase by phase: another order than
XLA's, which lands on the same bf16 means and codes in the tests. So the body has no value
slice, reshape or ``nextafter`` (:func:`stax.numerics.next_float` rounds the endpoints outward
on their bits), the three things the Triton lowering lacks (``benchmarks/pallas_probe.py``; on
an NVIDIA H200, jax 0.11.2, the earlier kernel stopped at ``lax.slice``). The elementwise math
is the codecs' own (:func:`~stax.codecs.log_quant.decode_levels`,
:func:`~stax.codecs.log_quant.level_codes`, :func:`~stax.codecs.ustate.unit_codes`, the
storage's :meth:`~stax.codecs.turbo.TurboAdam02Storage.m_from_u` and ``u_from_m``), shared with
the XLA path.

Checked on this CPU: the step lowers for CUDA into one Triton call per compressed leaf
(``tests/test_kernels_registry.py``, ``lowering_platforms=("cuda",)``, no GPU needed), and in
interpret mode its codes, endpoints and means equal the XLA path's bit for bit (UState's
``encode_step``/``decode_step`` scalars to 1 ulp: Σr² is summed per block here, over the tensor
there) over steps with
the gradient scale changing ×10⁴ and a non-finite step, for 2-, 4- and 8-bit v and tiles of 1,
2 and 16 rows (``tests/test_turbo_adam.py``), the parameters within 4e-7; and the Triton IR it
lowers to compiles with the ``triton`` package to an sm_90a cubin, 148 registers per thread and
no spills on a 4096 × 4096 leaf (``benchmarks/triton_aot.py``, jax 0.11.2). On a GPU the body is
traced under :func:`stax.numerics.ptx_ieee_arithmetic`, so the codec's divisions and square
roots are PTX's IEEE-rounded ``div.rn.f32`` / ``sqrt.rn.f32`` (Triton's own are ``div.full`` and
``sqrt.approx``), as XLA's are: only the Adam core's update direction keeps Triton's rounding. **Not yet run on
a GPU** (no device was lent since it was written): ``implementation=None`` keeps running the
XLA reference there, and ``benchmarks/gpu.py``'s ``turbo_step`` section compares the two and
times them when one is.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from stax import numerics
from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs.rng import counter_uniform
from stax.codecs.turbo import StepScalars
from stax.kernels._registry import use_interpret

__all__ = ["turbo_update_pallas", "rows_per_program", "PHASES", "MAX_ROWS_PER_PROGRAM"]

#: Element ``PHASES·j + k`` of a block is column ``j`` of phase ``k`` (UState's 2-bit codes hold
#: four elements per byte, so each phase's codes are a shift of the same bytes).
PHASES = 4
#: Rows of the row view per program, at most (a power of two dividing the rows).
MAX_ROWS_PER_PROGRAM = 16
_V_BITS = (2, 4, 8)


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def rows_per_program(rows: int, most: int = MAX_ROWS_PER_PROGRAM) -> int:
  """The largest power of two that divides ``rows`` and is at most ``most``."""
  r = 1
  while r * 2 <= most and rows % (r * 2) == 0:
    r *= 2
  return r


def turbo_update_pallas(storage: Any, g: jax.Array, step: Any, ctx: Any
                        ) -> tuple[jax.Array, Any, Any]:
  """The fused update as one Pallas kernel (same arguments and result as the reference).

  Raises:
    NotImplementedError: for a storage other than TurboAdam 0.2.0's (the ``"stax"`` codec has
      no Pallas kernel), a row length that is not a multiple of ``storage.block_size``, a block
      or mean block that is not a power of two of at least :data:`PHASES` elements (the mean
      block dividing the block), or ``v_bits`` other than 2, 4 or 8 (3- and 6-bit codes
      straddle bytes).
  """
  if not hasattr(storage, "decode_block"):
    raise NotImplementedError("the Pallas kernel is TurboAdam 0.2.0's storage's "
                              "(codec='turboadam-0.2')")
  shape = g.shape
  n, bs, mb, bits = shape[-1], storage.block_size, storage.m_block_size, storage.bits
  if n % bs:
    raise NotImplementedError(
        f"a row of the codec's row view (the leaf's trailing axes merged, "
        f"stax.codecs.row_view: {n} elements for this leaf) must be a multiple of "
        f"block_size ({bs})")
  if not (_pow2(bs) and _pow2(mb) and mb >= PHASES and bs % mb == 0):
    raise NotImplementedError(f"the kernel needs power-of-two blocks with m_block_size >= "
                              f"{PHASES} dividing block_size, got {bs} and {mb}")
  if bits not in _V_BITS:
    raise NotImplementedError(f"the kernel reads v_bits in {_V_BITS}, got {bits}")
  rows, nb = math.prod(shape[:-1]), n // bs
  per = rows_per_program(rows)
  mu_enc, nu_enc = ctx.mu_enc, ctx.nu_enc
  scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                       (*storage.scalars(ctx.count), mu_enc.decode_step, mu_enc.encode_step)])
  seeds = jnp.stack(storage.seeds(ctx))
  operands = [jnp.reshape(jnp.asarray(o), (1,)) for o in step.operands]
  q = bs // PHASES
  phase = jax.ShapeDtypeStruct((per, q), jnp.float32)
  u_dtype = jax.eval_shape(lambda g_, m, v: step(g_, m, v).update,
                           jax.ShapeDtypeStruct((per, q), g.dtype), phase, phase).dtype
  vbytes, mbytes, nmb = bs * bits // 8, bs // 4, bs // mb
  kernel = functools.partial(_kernel, storage=storage, fn=step.fn, n_ops=len(operands), n=n)
  params, arithmetic = {}, contextlib.nullcontext()
  if not use_interpret():
    from jax.experimental.pallas import triton as pltriton
    params["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=1)
    # the codec's divisions and square roots IEEE-rounded, as XLA's are (Triton's are not)
    arithmetic = numerics.ptx_ieee_arithmetic()
  full = lambda k: pl.BlockSpec((k,), lambda r, b: (0,))
  tile = lambda w: pl.BlockSpec((per, w), lambda r, b: (r, b))
  with arithmetic:     # the kernel body is traced inside the call
    outs = pl.pallas_call(
        kernel, grid=(rows // per, nb),
        in_specs=[full(scalars.shape[0]), full(2), *(full(1) for _ in operands), tile(bs),
                  tile(vbytes), tile(2), tile(mbytes), tile(nmb)],
        out_specs=(tile(bs), tile(vbytes), tile(2), tile(mbytes), tile(nmb), tile(1)),
        out_shape=(jax.ShapeDtypeStruct((rows, n), u_dtype),
                   jax.ShapeDtypeStruct((rows, nb * vbytes), jnp.uint8),
                   jax.ShapeDtypeStruct((rows, nb * 2), jnp.float16),
                   jax.ShapeDtypeStruct((rows, nb * mbytes), jnp.uint8),
                   jax.ShapeDtypeStruct((rows, nb * nmb), jnp.bfloat16),
                   jax.ShapeDtypeStruct((rows, nb), jnp.float32)),
        interpret=use_interpret(), **params,
    )(scalars, seeds, *operands, g.reshape(rows, n), nu_enc.codes.reshape(rows, -1),
      nu_enc.scales.reshape(rows, nb * 2), mu_enc.codes.reshape(rows, -1),
      mu_enc.means.reshape(rows, -1))
  u, vc, vs, mc, mm, ssq = outs
  lead = shape[:-1]
  new_nu = LQ.LogQuantState(vc.reshape(lead + (-1,)), vs.reshape(lead + (nb, 2)))
  new_mu = storage.finish_m(mu_enc, mc.reshape(lead + (-1,)), mm.reshape(lead + (-1,)),
                            jnp.sum(ssq), rows * n)
  return u.reshape(shape), new_mu, new_nu


def _pack(codes, shifts) -> jax.Array:
  """uint8 bytes: the codes (integers, float or int) shifted into their bit fields and or-ed."""
  return functools.reduce(operator.or_, [c.astype(jnp.uint32) << jnp.uint32(sh)
                                         for c, sh in zip(codes, shifts)]).astype(jnp.uint8)


def _kernel(sc_ref, seeds_ref, *refs, storage, fn, n_ops, n):
  """One program: a tile of ``(rows, block_size)``, seen as four phases of ``(rows, bs/4)``."""
  op_refs, (g_ref, vc_ref, vs_ref, mc_ref, mm_ref), outs = (refs[:n_ops], refs[n_ops:n_ops + 5],
                                                             refs[n_ops + 5:])
  u_out, vc_out, vs_out, mc_out, mm_out, ssq_out = outs
  bs, mb, bits = storage.block_size, storage.m_block_size, storage.bits
  per, q = g_ref.shape[0], bs // PHASES
  per_byte = 8 // bits                       # v codes per byte: 4, 2 or 1
  stride = PHASES // per_byte                # bytes between a phase's codes
  width, nmb = mb // PHASES, bs // mb        # a mean block's columns in each phase; per tile
  ks = range(PHASES)

  sc = StepScalars(*(sc_ref[i] for i in range(4)))
  dec_step, enc_step = sc_ref[4], sc_ref[5]
  seed_m, seed_v = seeds_ref[0], seeds_ref[1]
  ops = [o[0] for o in op_refs]
  col = jax.lax.broadcasted_iota(jnp.int32, (per, q), 1)
  row = jax.lax.broadcasted_iota(jnp.int32, (per, q), 0)
  r, b = pl.program_id(0), pl.program_id(1)
  # the flat index of each phase-0 element in the leaf's row view (the counter-hash stream)
  index = ((r * per + row).astype(jnp.uint32) * jnp.uint32(n) + (b * bs).astype(jnp.uint32)
           + PHASES * col.astype(jnp.uint32))

  def spread(vals):
    """Per-mean-block ``(per, 1)`` values → ``(per, q)``, each column its block's."""
    out = vals[-1]
    for i in range(nmb - 2, -1, -1):
      out = jnp.where(col < (i + 1) * width, vals[i], out)
    return out

  def block_sums(xs):
    """Each mean block's sum over the four phases (``(per, 1)`` each), phase by phase."""
    sums = []
    for i in range(nmb):
      inside = (col >= i * width) & (col < (i + 1) * width)
      sums.append(functools.reduce(operator.add, [
          jnp.sum(jnp.where(inside, x, 0.0), axis=-1, keepdims=True) for x in xs]))
    return sums

  # decode: v from its log codes, u from UState's 2-bit codes, m from both
  min_h, max_h = vs_ref[:, pl.ds(0, 1)], vs_ref[:, pl.ds(1, 1)]
  v = []
  for k in ks:
    byte = vc_ref[:, pl.ds(k // per_byte, q, stride=stride)].astype(jnp.uint32)
    code = (byte >> jnp.uint32(bits * (k % per_byte))) & jnp.uint32((1 << bits) - 1)
    v.append(LQ.decode_levels(LQ.level_coords(code.astype(jnp.float32), bits), min_h, max_h))
  mbyte = mc_ref[...].astype(jnp.uint32)
  raw = [US.decode_raw((mbyte >> jnp.uint32(2 * k)) & jnp.uint32(3), dec_step) for k in ks]
  raw_sum = spread(block_sums(raw))
  means = spread([mm_ref[:, pl.ds(i, 1)].astype(jnp.float32) for i in range(nmb)])
  m = [storage.m_from_u(US.recentre(x, raw_sum, float(mb), means), vk, sc)
       for x, vk in zip(raw, v)]

  # the core's step on each phase
  out = [fn(g_ref[:, pl.ds(k, q, stride=PHASES)], m[k], v[k], *ops) for k in ks]

  # encode v: the tile's blocks' endpoints, stochastic codes, and the persisted v
  x = [LQ.clamp_positive(o.nu) for o in out]
  lo, hi = x[0].min(axis=-1, keepdims=True), x[0].max(axis=-1, keepdims=True)
  for xk in x[1:]:
    lo = jnp.minimum(lo, xk.min(axis=-1, keepdims=True))
    hi = jnp.maximum(hi, xk.max(axis=-1, keepdims=True))
  new_min, new_max = LQ.block_endpoints(lo, hi)
  v_codes = [LQ.level_codes(x[k], new_min, new_max, bits,
                            counter_uniform(index + jnp.uint32(k), seed_v)) for k in ks]
  v_p = [LQ.decode_levels(LQ.level_coords(c, bits), new_min, new_max) for c in v_codes]

  # encode u = (m/c1)/(√v_p/c2 + eps): bf16 block means, 2-bit codes of the residuals
  u = [storage.u_from_m(o.mu, vp, sc) for o, vp in zip(out, v_p)]
  new_means = [US.block_means(s, float(mb)) for s in block_sums(u)]
  centre = spread([mn.astype(jnp.float32) for mn in new_means])
  res = [uk - centre for uk in u]
  m_codes = [US.unit_codes(rk, counter_uniform(index + jnp.uint32(k), seed_m), enc_step)
             for k, rk in zip(ks, res)]
  ssq = functools.reduce(operator.add, [jnp.sum(rk * rk, axis=-1, keepdims=True) for rk in res])

  # write: the direction phase by phase, the codes packed back into their bytes
  for k in ks:
    u_out[:, pl.ds(k, q, stride=PHASES)] = out[k].update.astype(u_out.dtype)
  for o in range(stride):
    ps = range(o * per_byte, (o + 1) * per_byte)
    vc_out[:, pl.ds(o, q, stride=stride)] = _pack([v_codes[k] for k in ps],
                                                   [bits * (k % per_byte) for k in ps])
  vs_out[:, pl.ds(0, 1)] = new_min
  vs_out[:, pl.ds(1, 1)] = new_max
  mc_out[...] = _pack(m_codes, [2 * k for k in ks])
  for i in range(nmb):
    mm_out[:, pl.ds(i, 1)] = new_means[i]
  ssq_out[...] = ssq
