r"""Pallas kernel of the fused TurboAdam update (the ``"pallas"`` implementation).

The grid is ``(rows, n / block_size)`` over the leaf's row view: each program reads one block
of g and of the packed state once, decodes it (the storage's
:meth:`~stax.codecs.turbo.TurboAdam02Storage.decode_block`), runs the Adam core's step on it
(:class:`stax.transforms.adam.LeafStep`: its array operands come in as inputs), re-encodes
(:meth:`~stax.codecs.turbo.TurboAdam02Storage.encode_block`) with the random stream generated in
the kernel from (seed, flat index), and writes the block's Adam direction, packed codes,
endpoints, means and :math:`\sum r^2`; one tiny reduction outside gives UState's next encode
step, as the seed's finalize kernel does. Bytes per parameter with float32 g and update, 4-bit v
and 2-bit m: read 4 + 0.81, written 4 + 0.81 (the AdamW update of p that follows in the chain is
one more elementwise pass). Off GPU/TPU it runs with ``interpret=True``.

Compiled for a GPU it does not lower yet: checked on an NVIDIA H200 (jax 0.11.2, the Triton
backend) the codec's block decode uses ``lax.slice`` and reshapes that Pallas's Triton lowering
does not implement ("Unimplemented primitive in Pallas Triton lowering: slice"), and Mosaic GPU
refuses copies of fewer than 128 bytes (a block's fp16 endpoints are 4). So outside interpret mode
:func:`turbo_update_pallas` raises ``NotImplementedError`` when traced (the registry's
``implementation=None`` then runs ``"xla"``, and an explicit ``"pallas"`` is a ``ValueError``
naming this reason) instead of failing later inside XLA's compile. A GPU version needs a kernel
body written for the lowering (gathered nibble loads in place of the reshapes, a few hundred
elements per program); the interpret-mode kernel stays as the executable specification.
What such a body can use (``benchmarks/pallas_probe.py``, lowered for CUDA on a CPU with
``jax.experimental.pallas.triton.CompilerParams``; without them jax picks Mosaic GPU, which
refuses strided slices, 2-D iota layouts and 8-bit arithmetic): strided ref loads and stores
(``pl.ds(start, n, stride=2)`` reads the even and odd elements of a nibble pair), a last-axis
reshape split with a reduction (per-block absmax), uint8/uint32 bit arithmetic (the counter
hash), bf16↔uint16 bitcasts (the next bf16 up is the bits plus one), 2-D iota, ``exp``/``log``;
not ``lax.slice`` (the endpoints ``scales[..., 0:1]`` must come in by a strided load) nor a bf16
``nextafter``. Run the script on a GPU to see which of them also match XLA bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from stax.codecs import log_quant as LQ
from stax.codecs import ustate as US
from stax.codecs.rng import counter_uniform
from stax.codecs.turbo import StepScalars
from stax.kernels._registry import use_interpret

__all__ = ["turbo_update_pallas"]


def turbo_update_pallas(storage: Any, g: jax.Array, step: Any, ctx: Any
                        ) -> tuple[jax.Array, Any, Any]:
  """The fused update as one Pallas kernel (same arguments and result as the reference).

  Raises:
    NotImplementedError: outside interpret mode (the kernel does not lower for a GPU yet); for a
      storage other than TurboAdam 0.2.0's (the ``"stax"`` codec has no
      Pallas kernel yet), or when the row length is not a multiple of ``storage.block_size``.
  """
  if not use_interpret():
    raise NotImplementedError("the fused TurboAdam kernel does not lower for GPU/TPU yet (Pallas's "
                              "Triton lowering has no `slice`; see stax.kernels.turbo_step.pallas)")
  if not hasattr(storage, "decode_block"):
    raise NotImplementedError("the Pallas kernel is TurboAdam 0.2.0's storage's "
                              "(codec='turboadam-0.2')")
  shape = g.shape
  n, bs, mb, bits = shape[-1], storage.block_size, storage.m_block_size, storage.bits
  if n % bs:
    raise NotImplementedError(f"the last axis must be a multiple of block_size ({bs}), got {n}")
  rows, nb = math.prod(shape[:-1]), n // bs
  mu_enc, nu_enc = ctx.mu_enc, ctx.nu_enc
  scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                       (*storage.scalars(ctx.count), mu_enc.decode_step, mu_enc.encode_step)])
  seeds = jnp.stack(storage.seeds(ctx))
  operands = [jnp.reshape(jnp.asarray(o), (1,)) for o in step.operands]
  block = jax.ShapeDtypeStruct((1, bs), jnp.float32)
  u_dtype = jax.eval_shape(lambda g_, m, v: step(g_, m, v).update,
                           jax.ShapeDtypeStruct((1, bs), g.dtype), block, block).dtype
  vbytes, mbytes, nmb = bs * bits // 8, bs // 4, bs // mb
  full = lambda k: pl.BlockSpec((k,), lambda r, b: (0,))
  row = lambda w: pl.BlockSpec((1, w), lambda r, b: (r, b))
  kernel = functools.partial(_kernel, storage=storage, fn=step.fn, n_ops=len(operands), n=n)
  outs = pl.pallas_call(
      kernel, grid=(rows, nb),
      in_specs=[full(scalars.shape[0]), full(2), *(full(1) for _ in operands), row(bs),
                row(vbytes), row(2), row(mbytes), row(nmb)],
      out_specs=(row(bs), row(vbytes), row(2), row(mbytes), row(nmb), row(1)),
      out_shape=(jax.ShapeDtypeStruct((rows, n), u_dtype),
                 jax.ShapeDtypeStruct((rows, nb * vbytes), jnp.uint8),
                 jax.ShapeDtypeStruct((rows, nb * 2), jnp.float16),
                 jax.ShapeDtypeStruct((rows, nb * mbytes), jnp.uint8),
                 jax.ShapeDtypeStruct((rows, nb * nmb), jnp.bfloat16),
                 jax.ShapeDtypeStruct((rows, nb), jnp.float32)),
      interpret=use_interpret(),
  )(scalars, seeds, *operands, g.reshape(rows, n), nu_enc.codes.reshape(rows, -1),
    nu_enc.scales.reshape(rows, nb * 2), mu_enc.codes.reshape(rows, -1),
    mu_enc.means.reshape(rows, -1))
  u, vc, vs, mc, mm, ssq = outs
  lead = shape[:-1]
  new_nu = LQ.LogQuantState(vc.reshape(lead + (-1,)), vs.reshape(lead + (nb, 2)))
  new_mu = storage.finish_m(mu_enc, mc.reshape(lead + (-1,)), mm.reshape(lead + (-1,)),
                            jnp.sum(ssq), rows * n)
  return u.reshape(shape), new_mu, new_nu


def _kernel(sc_ref, seeds_ref, *refs, storage, fn, n_ops, n):
  """One ``(row, block)`` program: decode, the core's step and encode on a ``(1, bs)`` block."""
  op_refs, (g_ref, vc_ref, vs_ref, mc_ref, mm_ref), outs = (refs[:n_ops], refs[n_ops:n_ops + 5],
                                                             refs[n_ops + 5:])
  u_out, vc_out, vs_out, mc_out, mm_out, ssq_out = outs
  bs = storage.block_size
  r, b = pl.program_id(0), pl.program_id(1)
  sc = StepScalars(*(sc_ref[i] for i in range(4)))
  idx = (r * n + b * bs).astype(jnp.uint32) + jnp.arange(bs, dtype=jnp.uint32)[None, :]
  seeds = seeds_ref[...]
  v_enc = LQ.LogQuantState(vc_ref[...], vs_ref[...].reshape(1, 1, 2))
  m_enc = US.UStateM(mc_ref[...], mm_ref[...], sc_ref[4], sc_ref[5])
  m, v = storage.decode_block(m_enc, v_enc, bs, sc)
  out = fn(g_ref[...], m, v, *(o[0] for o in op_refs))
  nu_enc, (codes, means, sq) = storage.encode_block(
      out.mu, out.nu, m_enc, sc, counter_uniform(idx, seeds[1]), counter_uniform(idx, seeds[0]))
  u_out[...] = out.update.astype(u_out.dtype)
  vc_out[...] = nu_enc.codes
  vs_out[...] = nu_enc.scales.reshape(1, 2)
  mc_out[...] = codes
  mm_out[...] = means
  ssq_out[...] = jnp.sum(sq).reshape(1, 1)
