r"""The ``jax.numpy`` reference of Newton–Schulz (the ``"xla"`` implementation and the oracle).

Under an explicit mesh every matmul gets an explicit output sharding: the matrix is kept (or put)
sharded along its *long* axis only, the small Gram matrix is all-reduced and replicated, and the
result is resharded back to the input's sharding, so row- and column-sharded matrices give the
unsharded result (``optax.contrib.muon`` raises ``ShardingTypeError`` there).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from stax import _sharding as _sh
from stax import numerics as num

__all__ = ["Coeffs", "newton_schulz_reference", "normalise", "gram_orientation"]

Coeffs = Sequence[tuple[float, float, float]]


def normalise(x: jax.Array, eps: float, norm_scale: float) -> jax.Array:
  """``x / (‖x‖_F · norm_scale + eps)`` per matrix, without overflow for any finite ``x``
  (:func:`stax.numerics.normalize`; bit-identical to the plain expression otherwise)."""
  return num.normalize(x, eps, norm_scale, axis=(-2, -1))


def gram_orientation(x: jax.Array) -> tuple[jax.Array, bool]:
  """``x`` transposed to ``(B, k, n)`` with ``k <= n`` (the Gram matrix on the smaller side), and
  whether it was transposed."""
  transposed = x.shape[-2] > x.shape[-1]
  return (jnp.swapaxes(x, -1, -2) if transposed else x), transposed


def _work_specs(x: jax.Array, spec: tuple):
  """Shardings of the iterate (long axis sharded only) and of the Gram matrix (replicated)."""
  mesh = jax.typeof(x).sharding.mesh
  sb, sm, sn = spec
  # Keep the long axis sharded (only the small Gram matrix is then all-reduced); move a
  # short-axis sharding there when it divides, else replicate the matrix axes.
  long = sn if sn is not None else sm
  if long is not None and x.shape[-1] % _sh.axis_size(mesh, long) != 0:
    long = None
  names = lambda e: set(e if isinstance(e, tuple) else (e,))
  if sb is not None and long is not None and names(sb) & names(long):
    long = None
  return _sh.named(mesh, (sb, None, long)), _sh.named(mesh, (sb, None, None))


def newton_schulz_reference(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7,
                            norm_scale: float = 1.0, compute_dtype=jnp.float32,
                            return_left: bool = False):
  """Plain ``jnp`` Newton–Schulz on ``x`` of shape ``(B, m, n)`` (see
  :mod:`stax.kernels.newton_schulz`).

  Args:
    x: batch of matrices ``(B, m, n)``.
    coeffs: one ``(a, b, c)`` per iteration (Python floats: they become literals).
    eps: added to the (scaled) Frobenius norm.
    norm_scale: the norm is multiplied by this before dividing (Polar Express uses 1.02).
    compute_dtype: dtype of the iteration (default float32, as the seed).
    return_left: also return the accumulated left multiplier ``L`` (``(B, k, k)``, ``k =
      min(m, n)``) with ``X_final = L · X_0`` in the Gram orientation (``X_0`` normalised);
      used by :func:`stax.scale_by_orthogonalization`'s ``update_proj_gap``.

  Returns:
    The orthogonalised batch in ``x``'s dtype and shape (and ``L`` if requested).

  Example:
    >>> import jax
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 6))
    >>> y, left = newton_schulz_reference(x, ((3.4445, -4.7750, 2.0315),) * 5, return_left=True)
    >>> y.shape, left.shape
    ((1, 4, 6), (1, 4, 4))
  """
  in_dtype = x.dtype
  spec = _sh.explicit_spec(x)
  x, transposed = gram_orientation(x.astype(compute_dtype))
  if transposed and spec is not None:
    spec = (spec[0], spec[2], spec[1])
  k = x.shape[-2]
  gram_spec = work_spec = mesh = None
  if spec is not None:
    mesh = jax.typeof(x).sharding.mesh
    work_spec, gram_spec = _work_specs(x, spec)
    x = jax.reshard(x, work_spec)

  def mm(a, b, out):
    # Batched (B, i, k) x (B, k, j); explicit output sharding under an explicit mesh.
    dn = (((2,), (1,)), ((0,), (0,)))
    if out is None:
      return jax.lax.dot_general(a, b, dn)
    return jax.lax.dot_general(a, b, dn, out_sharding=out)

  x = normalise(x, eps, norm_scale)
  left = None
  if return_left:
    left = jnp.broadcast_to(jnp.eye(k, dtype=compute_dtype), x.shape[:-2] + (k, k))
  # X ← (a·I + b·A + c·A²)·X: one product whose output XLA materialises. Written a·X + B·X, the
  # elementwise sum was fused into X's later uses (the next Gram product's transposed operand,
  # the next sum), each recomputing every earlier iteration's sum: a growing, distinct kernel
  # per iteration for a matrix in the transposed orientation (a 1000×512 matrix: 19 kernels in
  # 604 lines → 12 in 182; 38 → 26 ms), and an elementwise pass over X per iteration.
  eye = jnp.eye(k, dtype=compute_dtype)
  for a, b, c in coeffs:
    gram = mm(x, jnp.swapaxes(x, -1, -2), gram_spec)
    poly = a * eye + b * gram + c * mm(gram, gram, gram_spec)
    x = mm(poly, x, work_spec)
    if return_left:
      left = mm(poly, left, gram_spec)
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  if spec is not None:
    x = _sh.reshard(x, spec if not transposed else (spec[0], spec[2], spec[1]), like=mesh)
  x = x.astype(in_dtype)
  return (x, left) if return_left else x
