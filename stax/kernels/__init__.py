"""GPU kernels, one package per op (``reference.py`` the ``jnp`` reference, ``pallas.py`` the
Pallas kernel), each registered in :mod:`stax.kernels._registry` behind ``implementation=``.

* :mod:`stax.kernels.newton_schulz`: Newton–Schulz orthogonalisation of a batch of matrices;
* :mod:`stax.kernels.turbo_step`: the fused step of the TurboAdam storage's update.

Example:
  >>> import jax.numpy as jnp
  >>> from stax.kernels.newton_schulz import newton_schulz
  >>> x = 3.0 * jnp.eye(4)[None]   # a batch of one 4×4 matrix
  >>> y = newton_schulz(x, ((1.5, -0.5, 0.0),) * 8, implementation="xla")
  >>> y.shape, bool(jnp.allclose(y, jnp.eye(4), atol=1e-3))
  ((1, 4, 4), True)
"""
