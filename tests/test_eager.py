"""``tx.update`` called eagerly (outside ``jax.jit``: a debugging loop, an un-jitted
``nnx.Optimizer``) compiles nothing once every path of the step has run (``stax._eager``).

Before stop 53 every eager step compiled 1-6 XLA programs: each ``lax.cond`` with new closures
(the non-finite check's materialised flag, SCAO's warm-up and refresh conditionals) was a new
``jit(cond)``, and ``b ** count`` with a concrete count took ``jnp.power``'s ``integer_pow``
path with a new exponent (sweep O: ``stax.adamw`` 15 ms an eager step against ``optax.adamw``'s
0.8 ms, SCAO 0.9 s). The eager steps equal the jitted ones.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stax

MAKERS = {
    "adamw": lambda: stax.adamw(1e-2),
    "stac": lambda: stax.stac(1e-2),
    "stam": lambda: stax.stam(1e-2),
    "stam_lite": lambda: stax.stam_lite(1e-2),
    "stable_adamw": lambda: stax.stable_adamw(1e-2),
    "oadamw": lambda: stax.oadamw(1e-2),
    "oadamw_gap": lambda: stax.oadamw(1e-2, muon="gradient", update_proj_gap=2),
    "turbo_adam": lambda: stax.turbo_adam(1e-2, min_compress_elements=64, block_size=32),
    "scao": lambda: stax.scao(1e-2, warmup_steps=2, precond_freq=2, blend_steps=2, k_min=2,
                              k_max=4),
    "scao_faithful": lambda: stax.scao(1e-2, warmup_steps=2, precond_freq=2, blend_steps=2,
                                       k_min=2, k_max=4, mode="scao-0.2.4"),
}


class _Compiles(logging.Handler):

  def __init__(self):
    super().__init__()
    self.count = 0

  def emit(self, record):
    if record.getMessage().startswith("Compiling"):
      self.count += 1


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_eager_steps_compile_nothing_and_equal_the_jitted_ones(name):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
            "b": jnp.zeros((12,), jnp.float32)}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(12)]
  grads[5] = dict(grads[5], b=grads[5]["b"].at[0].set(jnp.nan))   # a skipped step
  tx = MAKERS[name]()
  update = jax.jit(tx.update)
  p_jit = p_eager = params
  s_jit, s_eager = tx.init(params), tx.init(params)
  handler = _Compiles()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  counts = []
  try:
    with jax.log_compiles():
      for g in grads:
        before = handler.count
        u, s_eager = tx.update(g, s_eager, p_eager)
        p_eager = optax.apply_updates(p_eager, u)
        jax.block_until_ready(p_eager)
        counts.append(handler.count - before)
  finally:
    logger.removeHandler(handler)
  for g in grads:
    u, s_jit = update(g, s_jit, p_jit)
    p_jit = optax.apply_updates(p_jit, u)
  assert counts[8:] == [0] * 4, counts
  for a, b in zip(jax.tree.leaves(p_eager), jax.tree.leaves(p_jit)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
  kinds = lambda s: [(x.dtype, x.shape, getattr(x, "weak_type", False))
                     for x in jax.tree.leaves(s)]
  assert kinds(s_eager) == kinds(s_jit)
  assert np.all(np.isfinite(np.asarray(p_eager["b"])))
