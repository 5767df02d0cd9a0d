"""Multi-process JAX (2 local processes × 4 CPU devices, ``jax.distributed`` over gloo) gives
the 1-process × 8-device result for every registry optimizer, and orbax checkpoints cross a
change of process count both ways and continue bit-exactly (tests/multiprocess.py).

One module-scoped run does all the work: this process (8 devices, tests/conftest.py) runs every
entry of ``tests.registry.MAIN`` and writes its checkpoints; two worker processes then run the
same on a 2 × 4 global mesh, writing theirs and continuing from this process's; finally this
process continues from theirs. Localhost only; the workers are bounded by a timeout.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import multiprocess as mp
from tests.localhost_ranks import run_ranks
from tests.registry import MAIN

WORKER_TIMEOUT_S = 600
IDS = [e.name for e in MAIN]
N_PARAMS = 6  # leaves of the contract quadratic's parameter tree, first in every saved list


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs both sides; returns the folder of their ``.npz`` results."""
  import jax
  pytest.importorskip("orbax.checkpoint")
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
  out = tmp_path_factory.mktemp("multiprocess")
  mp.side(MAIN, out, "1proc", None)
  run_ranks("tests.multiprocess", [out, ",".join(IDS)], timeout_s=WORKER_TIMEOUT_S,
            env={"JAX_PLATFORMS": "cpu"})
  m = mp.mesh()
  for e in MAIN:
    p, s = mp.restore(out / f"{e.name}-2proc", e, m)
    np.savez(out / f"{e.name}-1proc-restored-2proc.npz", *mp.gather((p, s)))
    p, s = mp.run(e, m, mp.SAVE_AT, mp.STEPS, p, s)
    np.savez(out / f"{e.name}-1proc-from-2proc.npz", *mp.gather((p, s)))
  return out


def _load(path):
  with np.load(path) as z:
    return [z[f"arr_{i}"] for i in range(len(z.files))]


def _assert_equal(a, b, what):
  assert len(a) == len(b), what
  for i, (x, y) in enumerate(zip(a, b)):
    assert x.shape == y.shape and x.dtype == y.dtype, (what, i)
    np.testing.assert_array_equal(x, y, err_msg=f"{what}: leaf {i}")


@pytest.mark.parametrize("entry", MAIN, ids=IDS)
def test_two_processes_equal_one(runs, entry):
  """2 processes × 4 devices give the 1 × 8 result: parameters and every state leaf."""
  one = _load(runs / f"{entry.name}-1proc.npz")
  two = _load(runs / f"{entry.name}-2proc.npz")
  assert len(one) == len(two)
  for x, y in zip(one, two):
    assert x.shape == y.shape and x.dtype == y.dtype
  for i, (x, y) in enumerate(zip(one, two)):
    if np.issubdtype(x.dtype, np.floating):
      np.testing.assert_allclose(y, x, rtol=0, atol=entry.sharding_atol, err_msg=f"leaf {i}")
    else:  # counts, keys, packed codes
      np.testing.assert_array_equal(y, x, err_msg=f"leaf {i}")


@pytest.mark.parametrize("entry", MAIN, ids=IDS)
def test_checkpoints_cross_process_counts_bit_exactly(runs, entry):
  """A checkpoint written by 2 processes restores in 1 (and back) bit for bit, and continuing
  from it continues the writer's run: bit for bit the reader's own run where the two process
  counts computed the same bits up to the checkpoint (element-wise optimizers), else within the
  contract's sharding tolerance (a cross-device reduction, e.g. Newton–Schulz's Gram matrix
  all-reduced over 8 devices, sums in another order over gloo than in one process)."""
  n = entry.name
  for reader, writer in (("1proc", "2proc"), ("2proc", "1proc")):
    writer_mid = _load(runs / f"{n}-{writer}-mid.npz")
    _assert_equal(_load(runs / f"{n}-{reader}-restored-{writer}.npz"), writer_mid,
                  f"{n}: {reader} restoring {writer}'s checkpoint")
    continued = _load(runs / f"{n}-{reader}-from-{writer}.npz")
    own = _load(runs / f"{n}-{reader}.npz")
    if all(np.array_equal(a, b) for a, b in zip(_load(runs / f"{n}-{reader}-mid.npz"),
                                                writer_mid)):
      _assert_equal(continued, own, f"{n}: {reader} continuing from {writer}'s checkpoint")
    else:  # the parameters within the tolerance; codes may round the other way
      for x, y in zip(continued[:N_PARAMS], own[:N_PARAMS]):
        np.testing.assert_allclose(x, y, rtol=0, atol=entry.sharding_atol)
      assert all(np.all(np.isfinite(x)) for x in continued
                 if np.issubdtype(x.dtype, np.floating))
