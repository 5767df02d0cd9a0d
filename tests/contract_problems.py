"""Problems shared by the contract tests: a quadratic and Rosenbrock over a layered tree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {
    "embed": {"embedding": (8, 16)},
    "layer_0": {"kernel": (16, 16), "bias": (16,)},
    "layer_1": {"kernel": (16, 8), "bias": (8,)},
    "head": {"kernel": (8, 4)},
}


def _tree(fn, dtype=jnp.float32):
  return {m: {k: fn(m, k, s).astype(dtype) for k, s in d.items()} for m, d in SHAPES.items()}


def quadratic(dtype=jnp.float32):
  """(params, loss) with loss = 0.5·Σ c·(p − t)², optimum t, curvatures c in [0.5, 2]."""
  rng = np.random.default_rng(0)
  targets = _tree(lambda m, k, s: jnp.asarray(rng.uniform(-1, 1, s)), jnp.float32)
  curv = _tree(lambda m, k, s: jnp.asarray(rng.uniform(0.5, 2.0, s)), jnp.float32)
  params = _tree(lambda m, k, s: jnp.zeros(s), dtype)

  def loss(p):
    terms = jax.tree.map(lambda x, t, c: 0.5 * jnp.sum(c * (x.astype(jnp.float32) - t) ** 2),
                         p, targets, curv)
    return sum(jax.tree.leaves(terms))

  return params, loss, targets


ROSEN_SHAPES = {
    "embed": {"x": (4, 8), "y": (4, 8)},
    "layer_0": {"x": (8, 8), "y": (8, 8)},
    "layer_1": {"x": (8, 8), "y": (8, 8)},
    "head": {"x": (8, 4), "y": (8, 4)},
}


def rosenbrock(dtype=jnp.float32):
  """(params, loss, optimum): Σ (1 − x)² + 10·(y − x²)² per module, started at x = y = 0."""
  params = {m: {k: jnp.zeros(s, dtype) for k, s in d.items()} for m, d in ROSEN_SHAPES.items()}

  def loss(p):
    total = 0.0
    for m in p.values():
      x, y = m["x"].astype(jnp.float32), m["y"].astype(jnp.float32)
      total = total + jnp.sum((1 - x) ** 2 + 10.0 * (y - x ** 2) ** 2)
    return total

  optimum = jax.tree.map(lambda x: jnp.ones_like(x, jnp.float32), params)
  return params, loss, optimum


def random_grads(params, step: int, scale: float = 1.0):
  """Deterministic pseudo-gradients for step ``step`` (float32 unless the params are lower)."""
  key = jax.random.fold_in(jax.random.PRNGKey(42), step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
      for k, x in zip(keys, leaves)])


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rms_diff(a, b) -> float:
  """Root-mean-square difference over every coordinate of two trees of one structure."""
  sq = [np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return float(np.sqrt(np.mean(np.concatenate(sq))))
