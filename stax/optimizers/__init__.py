"""One module per seed optimizer: short factories that compose :mod:`stax.transforms`.

Example:
  >>> import jax.numpy as jnp
  >>> from stax.optimizers.adamw import adamw
  >>> tx, params = adamw(1e-3), {"w": jnp.ones(3)}
  >>> updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  >>> updates["w"].shape, updates["w"].dtype
  ((3,), dtype('float32'))
"""
