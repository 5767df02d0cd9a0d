r"""Gram Newton–Schulz: the same iteration, carried out on the small Gram matrix.

Every Newton–Schulz iterate is a polynomial in the Gram matrix applied to the start,
:math:`X_k = Q_k X_0` with :math:`Q_k` a ``k × k`` polynomial in :math:`G = X_0 X_0^\top`
(``k = min(m, n)``, the Gram orientation). So the iteration can run on ``k × k`` matrices only:

.. math::
  R_0 = G,\quad P_j = a_j I + b_j R_j + c_j R_j^2,\quad Q_{j+1} = P_j Q_j,\quad
  R_{j+1} = P_j R_j P_j ,

and the long ``k × n`` matrix is touched twice: to form :math:`G` and to apply :math:`Q`
at the end. Per iteration that is 4 ``k³`` multiply-adds against the standard iteration's
:math:`2k^2 n + k^3`; with the two ``k² n`` products at the ends it is cheaper from an aspect
ratio ``n/k`` of about 2 (at 4:1, 5 steps: 28 ``k³`` against 45 ``k³``).

Rounding: the Gram-space recurrence accumulates the iterate's error in :math:`R` (which it no
longer recomputes from :math:`X`), so the iteration **restarts once** (``restart``, default after
half the steps): :math:`X = Q X_0` is formed, :math:`R = X X^\top` recomputed and :math:`Q`
reset to :math:`I` — the scheme of recent Muon work ("Gram Newton–Schulz", which iterates on the
Gram matrix and restarts once). One restart costs two more ``k² n`` products (at 4:1,
5 steps: 36 ``k³``).

A tall matrix (``m > n``) is iterated in place, with :math:`G = X_0^\top X_0` and each product
from the right (:math:`X \leftarrow X Q^\top`, the transpose of the wide iteration of
:math:`X^\top`), so no transposed copy is made.

This is the op ``"newton_schulz"``'s implementation ``"gram"`` (:mod:`stax.kernels._registry`);
matrices whose aspect ratio is below ``min_aspect`` (default 2, where it would be slower) and
matrices sharded under an explicit mesh run the standard reference iteration instead (the
result agrees to float32 rounding either way).

Example:
  >>> import jax
  >>> from stax.kernels.newton_schulz.gram import newton_schulz_gram
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32))
  >>> newton_schulz_gram(x, ((3.4445, -4.7750, 2.0315),) * 5).shape
  (2, 8, 32)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from stax import _sharding as _sh
from stax.kernels.newton_schulz.reference import Coeffs, newton_schulz_reference, normalise

__all__ = ["newton_schulz_gram", "MIN_ASPECT"]

#: Aspect ratio ``max(m, n) / min(m, n)`` from which the Gram iteration is used by default.
MIN_ASPECT = 2.0


# Batched products as dot_general (jnp.einsum's contraction planning took a third of the step's
# trace): batch axis 0 of both operands, ``contract`` their contracted axes.
def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` per batch entry (``bij,bjk->bik``)."""
  return _dot(a, b, (2, 1))


def newton_schulz_gram(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7,
                       norm_scale: float = 1.0, compute_dtype=jnp.float32,
                       return_left: bool = False, restart: Optional[int] = None,
                       min_aspect: float = MIN_ASPECT):
  """Newton–Schulz on ``x`` of shape ``(B, m, n)`` in Gram space (see the module docstring).

  Args:
    x: batch of matrices ``(B, m, n)``.
    coeffs: one ``(a, b, c)`` per iteration.
    eps: added to the (scaled) Frobenius norm (default 1e-7).
    norm_scale: the norm is multiplied by this before dividing (default 1.0).
    compute_dtype: dtype of the iteration (default float32).
    return_left: also return ``L`` (``(B, k, k)``) with ``X_final = L · X_0`` in the Gram
      orientation, as :func:`~stax.kernels.newton_schulz.reference.newton_schulz_reference`.
    restart: the iteration after which ``R`` is recomputed from ``X``, in ``[0, steps]``
      (default ``None``: ``steps // 2``; 0 or ``steps``: never).
    min_aspect: below this aspect ratio (>= 1) the standard iteration runs (default 2).

  Returns:
    The orthogonalised batch in ``x``'s dtype and shape (and ``L`` if requested).
  """
  coeffs = tuple(coeffs)
  steps = len(coeffs)
  restart = steps // 2 if restart is None else int(restart)
  if not 0 <= restart <= steps:
    raise ValueError(f"`restart` must be in [0, {steps}] (the number of steps), got {restart}.")
  k, n = sorted(x.shape[-2:])
  if (_sh.explicit_spec(x) is not None or k == 0 or n < min_aspect * k):
    return newton_schulz_reference(x, coeffs, eps=eps, norm_scale=norm_scale,
                                   compute_dtype=compute_dtype, return_left=return_left)
  in_dtype = x.dtype
  x0 = normalise(x.astype(compute_dtype), eps, norm_scale)
  # A tall matrix (m > n) is iterated as it lies: its Gram matrix is XᵀX and each product
  # multiplies from the right (X ← X·Qᵀ is (Q·Xᵀ)ᵀ, the wide iteration of Xᵀ), so it is never
  # transposed in memory. (Transposed, each consumer of the normalised X (the Gram product's
  # operands, the restart's and the final product) fused its own copy of the transpose and of
  # the step before it: a single tall conv kernel of ResNet-18 compiled 11 kernels, 9 so.)
  if x0.shape[-2] > x0.shape[-1]:
    gram = lambda a: _dot(a, a, (1, 1))           # aᵀa
    apply = lambda q, a: _dot(a, q, (2, 2))       # a·qᵀ
  else:
    gram = lambda a: _dot(a, a, (2, 2))           # a·aᵀ
    apply = _mm
  eye = jnp.broadcast_to(jnp.eye(k, dtype=compute_dtype), x0.shape[:-2] + (k, k))
  segments = [s for s in ((0, restart), (restart, steps)) if s[1] > s[0]]
  left_total = None
  start = x0
  for lo, hi in segments:
    r = gram(start)
    q = None
    for j, (a, b, c) in enumerate(coeffs[lo:hi]):
      p = a * eye + b * r + c * _mm(r, r)
      q = p if q is None else _mm(p, q)
      if j < hi - lo - 1:  # the last R of a segment is never used
        r = _mm(p, _mm(r, p))
    if return_left:
      left_total = q if left_total is None else _mm(q, left_total)
    start = apply(q, start)
  x = start.astype(in_dtype)
  return (x, left_total) if return_left else x
