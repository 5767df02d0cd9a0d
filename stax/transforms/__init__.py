"""Reusable ``optax`` gradient transformations, each with its ``State`` NamedTuple.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from stax.transforms.adam import scale_by_adam
  >>> tx = optax.chain(scale_by_adam(), optax.scale(-1e-3))
  >>> type(tx.init({"w": jnp.ones(3)})[0]).__name__
  'ScaleByAdamState'
"""
