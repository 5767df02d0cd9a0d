"""GPU kernels, each beside its ``jax.numpy`` reference, behind one ``implementation=`` dispatch."""
