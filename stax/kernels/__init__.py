"""GPU kernels, one package per op (``reference.py`` the ``jnp`` reference, ``pallas.py`` the
Pallas kernel), each registered in :mod:`stax.kernels._registry` behind ``implementation=``.

* :mod:`stax.kernels.newton_schulz`: Newton–Schulz orthogonalisation of a batch of matrices;
* :mod:`stax.kernels.turbo_step`: the fused step of the TurboAdam storage's update.
"""
