"""Multi-process JAX: the same sharded training run in 1 process × 8 CPU devices and in
2 processes × 4 (``jax.distributed`` over gloo, localhost), with orbax checkpoints crossing
between them. Used by ``tests/test_multiprocess.py`` (the 1-process side and the checks) and
run as a worker process (``python -m tests.multiprocess PROCESS_ID PORT DIR ENTRIES``).

Every run is the contract's quadratic tree with the ``"mixed"`` layout of
``tests/test_contract.py`` (row- and column-sharded, long- and short-axis-sharded matrices) on an
8-device explicit mesh: :data:`STEPS` steps of ``cp.random_grads``, a checkpoint after
:data:`SAVE_AT`. Each side writes, per registry entry, its final parameters and state (gathered
to numpy; key arrays as their key data) after (a) its own uninterrupted run and (b) restoring
the *other* side's checkpoint and continuing.
"""

from __future__ import annotations

import os
import pathlib
import sys

STEPS, SAVE_AT = 4, 2
DEVICES_PER_PROCESS = 4


def _setup_worker(process_id: int, port: int) -> None:
  """Before JAX starts: 4 CPU devices, gloo collectives, the distributed client."""
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
  os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                             f"{DEVICES_PER_PROCESS}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=120)


def mesh():
  import jax
  from jax.sharding import AxisType
  return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))


def _put(tree, m, specs):
  """Global arrays (any process count) holding the numpy values of ``tree``."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(m, s), lambda idx: x[idx])
  return jax.tree.map(one, tree, specs)


def _specs(params):
  import jax
  from tests.test_contract import _spec
  return jax.tree.map(lambda x: _spec(x, "mixed"), params)


_COMPILED: dict = {}


def _jitted(entry):
  """``(init, step)`` of ``entry``, jitted once per process (every run of the entry reuses the
  compiled programs: the same mesh, shapes and shardings)."""
  import jax
  import optax
  if entry.name not in _COMPILED:
    tx = entry.make()

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    _COMPILED[entry.name] = (jax.jit(tx.init), jax.jit(step))
  return _COMPILED[entry.name]


def run(entry, m, start: int, stop: int, p=None, state=None):
  """Steps ``start..stop-1`` of ``entry`` on mesh ``m`` (from ``init`` when ``state`` is None)."""
  import jax
  from tests import contract_problems as cp
  params, _, _ = cp.quadratic()
  specs = _specs(params)
  init, fn = _jitted(entry)
  with jax.set_mesh(m):
    if p is None:
      p = _put(params, m, specs)
      state = init(p)
    for i in range(start, stop):
      p, state = fn(p, state, _put(cp.random_grads(params, i), m, specs))
  return p, state


def gather(tree):
  """Numpy copies of every leaf (key arrays as their key data, bfloat16 as float32: exact, and
  ``np.savez`` keeps it), on every process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bfloat16:
      x = x.astype(jnp.float32)
    if jax.process_count() == 1 or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return [one(x) for x in jax.tree.leaves(tree)]


def save(path, p, state) -> None:
  import orbax.checkpoint as ocp
  ck = ocp.StandardCheckpointer()
  ck.save(pathlib.Path(path).absolute(), {"params": p, "opt_state": state})
  ck.wait_until_finished()


def restore(path, entry, m):
  """``(params, state)`` of the checkpoint at ``path``, placed on mesh ``m`` as a fresh run of
  ``entry`` places them (the target: a new ``init``'s shapes, dtypes and shardings)."""
  import jax
  import orbax.checkpoint as ocp
  p0, s0 = run(entry, m, 0, 0)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        {"params": p0, "opt_state": s0})
  with jax.set_mesh(m):
    got = ocp.StandardCheckpointer().restore(pathlib.Path(path).absolute(), target)
  return got["params"], got["opt_state"]


def side(entries, out: pathlib.Path, tag: str, other: str | None) -> None:
  """One side's runs: for each entry, the uninterrupted run (checkpoint ``{name}-{tag}`` at
  :data:`SAVE_AT`, final values ``{name}-{tag}.npz``) and, when ``other`` is given, the other
  side's checkpoint restored and continued (``{name}-{tag}-from-{other}.npz``)."""
  import jax
  import numpy as np
  m = mesh()
  write = jax.process_index() == 0
  for e in entries:
    p, s = run(e, m, 0, SAVE_AT)
    save(out / f"{e.name}-{tag}", p, s)
    mid = gather((p, s))
    if write:
      np.savez(out / f"{e.name}-{tag}-mid.npz", *mid)
    p, s = run(e, m, SAVE_AT, STEPS, p, s)
    vals = gather((p, s))
    if write:
      np.savez(out / f"{e.name}-{tag}.npz", *vals)
    if other is not None:
      p, s = restore(out / f"{e.name}-{other}", e, m)
      restored = gather((p, s))
      p, s = run(e, m, SAVE_AT, STEPS, p, s)
      vals = gather((p, s))
      if write:
        np.savez(out / f"{e.name}-{tag}-from-{other}.npz", *vals)
        np.savez(out / f"{e.name}-{tag}-restored-{other}.npz", *restored)


def main(argv) -> None:
  process_id, port, out, names = int(argv[0]), int(argv[1]), pathlib.Path(argv[2]), argv[3]
  _setup_worker(process_id, port)
  import jax
  assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()
  from tests.registry import ALL
  by = {e.name: e for e in ALL}
  side([by[n] for n in names.split(",")], out, "2proc", "1proc")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
