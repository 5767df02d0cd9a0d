r"""Newton–Schulz orthogonalisation of a batch of matrices, behind the kernel registry.

For a batch ``x`` of shape ``(B, m, n)`` every matrix is (1) transposed when ``m > n`` so the
Gram matrix is formed on the smaller side, (2) normalised by its Frobenius norm,
:math:`X_0 = X/(s\,\|X\|_F + \epsilon)`, and (3) iterated ``len(coeffs)`` times with the odd
quintic polynomial

.. math::
  A_k = X_k X_k^\top,\qquad B_k = b_k A_k + c_k A_k^2,\qquad X_{k+1} = a_k X_k + B_k X_k ,

which maps every singular value :math:`\sigma` of :math:`X_k` to
:math:`p_k(\sigma) = a_k\sigma + b_k\sigma^3 + c_k\sigma^5` and keeps the singular vectors.
The XLA implementations form it as one product, :math:`X_{k+1} = (a_k I + B_k)\,X_k`.

Implementations (op ``"newton_schulz"`` in :mod:`stax.kernels._registry`):

* ``"xla"``: :func:`newton_schulz_reference` (:mod:`.reference`), plain ``jnp``, sharding-aware
  under an explicit mesh; the only one that returns the left multiplier (``return_left``).
* ``"pallas"``: :func:`newton_schulz_pallas` (:mod:`.pallas`), three tiled kernels per
  iteration; under an explicit mesh it runs in ``jax.shard_map`` on whole matrices.
* ``"gram"``: :func:`newton_schulz_gram` (:mod:`.gram`), the same iteration on the small Gram
  matrix with one restart; matrices with aspect ratio below 2 (and explicitly sharded ones)
  run ``"xla"``. Also returns the left multiplier.

``implementation=None`` runs ``"gram"`` on every platform (which is ``"xla"`` for matrices with
aspect ratio below 2): measured on this project's 2-core CPU, 5 steps, one restart, 4:1 shapes
(384×1536, 1536×384, 768×3072) took 0.69–0.78× the standard iteration's time (in its
one-product form; 0.59–0.79× against the earlier ``a·X + B·X``) with about the same distance to a
float64 standard iteration (4–7e-6 against 3–5e-6, relative); a square 1024² took 1.18×. The Pallas kernel
is verified in interpret mode only, so it is opt-in with ``implementation="pallas"``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from stax.kernels.newton_schulz import newton_schulz
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  >>> y = newton_schulz(x, ((3.4445, -4.7750, 2.0315),) * 5)
  >>> y.shape
  (2, 8, 16)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from stax.kernels._registry import Op
from stax.kernels.newton_schulz.gram import newton_schulz_gram
from stax.kernels.newton_schulz.pallas import newton_schulz_pallas, newton_schulz_pallas_sharded
from stax.kernels.newton_schulz.reference import Coeffs, newton_schulz_reference

__all__ = ["newton_schulz", "newton_schulz_reference", "newton_schulz_pallas",
           "newton_schulz_gram", "Coeffs", "OP"]

#: The registry entry of this op.
OP = Op("newton_schulz", default_order={"cpu": ("gram", "xla"), "gpu": ("gram", "xla"),
                                        "other": ("gram", "xla")})


@OP.register("xla")
def _xla(x, coeffs, *, block: int, block_k: int, **kw):
  del block, block_k  # Pallas tiling only
  return newton_schulz_reference(x, coeffs, **kw)


OP.register("pallas", newton_schulz_pallas_sharded)


@OP.register("gram")
def _gram(x, coeffs, *, block: int, block_k: int, **kw):
  del block, block_k  # Pallas tiling only
  return newton_schulz_gram(x, coeffs, **kw)


def newton_schulz(x: jax.Array, coeffs: Coeffs, *, eps: float = 1e-7, norm_scale: float = 1.0,
                  compute_dtype=jnp.float32, return_left: bool = False,
                  implementation: Optional[str] = None, block: int = 64, block_k: int = 32):
  """Newton–Schulz on a batch ``(B, m, n)`` through the registry (see the module docstring).

  Args:
    x: batch of matrices ``(B, m, n)``, any sharding.
    coeffs: one ``(a, b, c)`` per iteration.
    eps: added to the (scaled) Frobenius norm.
    norm_scale: the norm is multiplied by this before dividing.
    compute_dtype: dtype of the iteration (default float32).
    return_left: also return the left multiplier ``L`` (see :func:`newton_schulz_reference`);
      only ``"xla"`` supports it, so ``None`` then runs ``"xla"``.
    implementation: ``"xla"``, ``"pallas"`` or ``None`` (best available; see the module
      docstring). Any other name raises ``ValueError`` listing the implementations.
    block, block_k: Pallas tile and contraction-step sizes.

  Returns:
    The orthogonalised batch in ``x``'s dtype, shape and sharding (and ``L`` if requested).
  """
  return OP(x, coeffs, eps=eps, norm_scale=norm_scale, compute_dtype=compute_dtype,
            return_left=return_left, block=block, block_k=block_k,
            implementation=implementation)
