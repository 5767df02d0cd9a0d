"""Reusable ``optax`` gradient transformations, each with its ``State`` NamedTuple."""
