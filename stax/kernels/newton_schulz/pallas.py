r"""Pallas kernels of Newton–Schulz (the ``"pallas"`` implementation).

Three tiled kernels per iteration: the Gram matrix ``A = X Xᵀ``, the fused polynomial
``B = b·A + c·A·A`` and the fused update ``a·X + B·X``. ``A`` and ``B`` are symmetric, so the
first two kernels compute only the tiles on and above the block diagonal and the lower tiles are
mirrored (on a GPU this skips almost half of the Gram/polynomial FLOPs). Off GPU/TPU the kernels
run with ``interpret=True``. The kernel has been checked in interpret mode; the compiled GPU path
(Triton lowering, power-of-two padding) has not been timed or verified, so ``None`` does not pick
it (see :mod:`stax.kernels.newton_schulz`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from stax import _sharding as _sh
from stax.kernels._registry import use_interpret
from stax.kernels.newton_schulz.reference import Coeffs, gram_orientation, normalise

__all__ = ["newton_schulz_pallas", "newton_schulz_pallas_sharded"]


# --------------------------------------------------------------------------- kernel bodies
def _row_products(left_ref, right_ref, shape, *, bk: int, nk: int) -> jax.Array:
  """The ``shape`` tile ``L·Rᵀ`` of two row blocks, accumulated in float32 over ``nk`` steps of
  ``bk`` columns."""
  def body(t, acc):
    a = left_ref[:, pl.ds(t * bk, bk)]
    b = right_ref[:, pl.ds(t * bk, bk)]
    return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
  return jax.lax.fori_loop(0, nk, body, jnp.zeros(shape, jnp.float32))


def _upper_tiles_only(o_ref, compute) -> None:
  """Runs ``compute`` on tiles ``(i, j)`` with ``j >= i``; writes zeros below the diagonal."""
  i, j = pl.program_id(1), pl.program_id(2)
  pl.when(j >= i)(compute)
  pl.when(j < i)(lambda: o_ref.__setitem__(..., jnp.zeros(o_ref.shape, o_ref.dtype)))


def _gram_kernel(xi_ref, xj_ref, o_ref, *, bk: int, nk: int):
  """o = (X·Xᵀ)[i,j] on the upper tiles."""
  def compute():
    o_ref[...] = _row_products(xi_ref, xj_ref, o_ref.shape, bk=bk, nk=nk).astype(o_ref.dtype)
  _upper_tiles_only(o_ref, compute)


def _poly_kernel(ai_ref, aj_ref, aij_ref, o_ref, *, b: float, c: float, bk: int, nk: int):
  """o = b·A[i,j] + c·(A·A)[i,j] on the upper tiles; A is symmetric, so
  (A·A)[i,j] = Σ_t A[i,t]·A[j,t]."""
  def compute():
    acc = _row_products(ai_ref, aj_ref, o_ref.shape, bk=bk, nk=nk)
    o_ref[...] = (b * aij_ref[...].astype(jnp.float32) + c * acc).astype(o_ref.dtype)
  _upper_tiles_only(o_ref, compute)


def _update_kernel(bi_ref, xj_ref, xij_ref, o_ref, *, a: float, bk: int, nk: int):
  """o = a·X[i,j] + (B·X)[i,j]."""
  def body(t, acc):
    bb = bi_ref[:, pl.ds(t * bk, bk)]
    xx = xj_ref[pl.ds(t * bk, bk), :]
    return acc + jnp.dot(bb, xx, preferred_element_type=jnp.float32)
  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = (a * xij_ref[...].astype(jnp.float32) + acc).astype(o_ref.dtype)


def _mirror_upper(u: jax.Array, block: int) -> jax.Array:
  """Fills the (zero) tiles below the block diagonal from the computed upper tiles."""
  m = u.shape[-1]
  blk = np.arange(m) // block
  upper = jnp.asarray(blk[:, None] <= blk[None, :])
  return jnp.where(upper, u, jnp.swapaxes(u, -1, -2))


def _compiler_params(interpret: bool):
  if interpret:
    return None
  try:
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=3)
  except Exception:  # noqa: BLE001 - Triton lowering unavailable; let Pallas choose
    return None


# --------------------------------------------------------------------------- entry points
def newton_schulz_pallas(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7,
                         norm_scale: float = 1.0, compute_dtype=jnp.float32,
                         block: int = 64, block_k: int = 32, interpret: Optional[bool] = None):
  """Pallas Newton–Schulz on an unsharded batch ``(B, m, n)``.

  Tiles are ``block`` wide and the contraction steps ``block_k`` (both powers of two,
  ``block_k`` dividing ``block``). Matrices are zero-padded to tile multiples, and to powers of
  two when compiled (zero rows/columns stay zero under the iteration). ``interpret=None`` runs
  in interpret mode off GPU/TPU.
  """
  if interpret is None:
    interpret = use_interpret()
  if block % block_k:
    raise ValueError(f"`block_k` ({block_k}) must divide `block` ({block}).")
  in_dtype = x.dtype
  x, transposed = gram_orientation(x.astype(compute_dtype))
  bsz, m, n = x.shape
  mp, np_ = -(-m // block) * block, -(-n // block) * block
  if not interpret:  # Triton lowering wants power-of-two block extents
    mp, np_ = (max(block, 1 << (d - 1).bit_length()) for d in (mp, np_))
  x = normalise(x, eps, norm_scale)
  x = jnp.pad(x, ((0, 0), (0, mp - m), (0, np_ - n)))
  gm, gn = mp // block, np_ // block
  call = functools.partial(pl.pallas_call, interpret=interpret,
                           compiler_params=_compiler_params(interpret))
  row = lambda cols: pl.BlockSpec((None, block, cols), lambda b_, i, j: (b_, i, 0))
  rowj = lambda cols: pl.BlockSpec((None, block, cols), lambda b_, i, j: (b_, j, 0))
  tile = pl.BlockSpec((None, block, block), lambda b_, i, j: (b_, i, j))
  gram_shape = jax.ShapeDtypeStruct((bsz, mp, mp), jnp.float32)
  for a, b, c in coeffs:
    gram = call(functools.partial(_gram_kernel, bk=block_k, nk=np_ // block_k),
                out_shape=gram_shape, grid=(bsz, gm, gm),
                in_specs=[row(np_), rowj(np_)], out_specs=tile)(x, x)
    gram = _mirror_upper(gram, block)
    poly = call(functools.partial(_poly_kernel, b=float(b), c=float(c), bk=block_k,
                                  nk=mp // block_k),
                out_shape=gram_shape, grid=(bsz, gm, gm),
                in_specs=[row(mp), rowj(mp), tile], out_specs=tile)(gram, gram, gram)
    poly = _mirror_upper(poly, block).astype(compute_dtype)
    x = call(functools.partial(_update_kernel, a=float(a), bk=block_k, nk=mp // block_k),
             out_shape=jax.ShapeDtypeStruct(x.shape, compute_dtype), grid=(bsz, gm, gn),
             in_specs=[row(mp), pl.BlockSpec((None, mp, block), lambda b_, i, j: (b_, 0, j)),
                       tile], out_specs=tile)(poly, x, x)
  x = x[:, :m, :n]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(in_dtype)


def newton_schulz_pallas_sharded(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7,
                                 norm_scale: float = 1.0, compute_dtype=jnp.float32,
                                 return_left: bool = False, block: int = 64, block_k: int = 32):
  """The registered ``"pallas"`` implementation: :func:`newton_schulz_pallas` on any batch.

  Under an explicit mesh the kernel runs in ``jax.shard_map`` with the batch axis kept sharded
  (when it divides) and the matrix axes gathered, so each device orthogonalises whole matrices,
  and the result is resharded to ``x``'s sharding.

  Raises:
    NotImplementedError: for ``return_left=True`` (the kernel does not accumulate ``L``).
  """
  if return_left:
    raise NotImplementedError("the Pallas kernel does not return the left multiplier")
  fn = functools.partial(newton_schulz_pallas, coeffs=coeffs, eps=eps, norm_scale=norm_scale,
                         compute_dtype=compute_dtype, block=block, block_k=block_k)
  spec = _sh.explicit_spec(x)
  if spec is None:
    return fn(x)
  mesh = jax.typeof(x).sharding.mesh
  sb = spec[0]
  if sb is not None and x.shape[0] % _sh.axis_size(mesh, sb):
    sb = None
  whole = P(sb, None, None)
  y = jax.shard_map(lambda t: fn(t), mesh=mesh, in_specs=whole, out_specs=whole,
                    check_vma=False)(_sh.reshard(x, whole))
  return _sh.reshard(y, spec, like=mesh)
