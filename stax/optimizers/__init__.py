"""One module per seed optimizer: short factories that compose :mod:`stax.transforms`."""
