"""stax.reuse_cpu_temporaries and stax.HUGE_PAGE_MALLOC: glibc keeps freed memory, or backs it
with huge pages, so a CPU step's temporaries stop page-faulting 4 KiB at a time in every call
(the lean XLA flag is tested in tests/test_turbo_adam.py)."""

import ctypes
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import stax

# A donated, jitted step whose temporary (a lax.cond's 64 MiB output, as SCAO's effective
# gradient) exceeds glibc's mmap threshold: by default each call's block is mapped anew, so
# every page of it faults in again at every call.
_CHILD = r'''
import resource, sys
import stax
applied = stax.reuse_cpu_temporaries() if sys.argv[1] == "1" else None
import jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32))
step = lambda x, p: x + jax.lax.cond(p, lambda x: x * 0.5, lambda x: x * 0.25, x)
f = jax.jit(step, donate_argnums=0).lower(x, True).compile()
temp = f.memory_analysis().temp_size_in_bytes
x = f(x, True).block_until_ready()
faults = []
for i in range(24):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  x = f(x, i % 2 == 0).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
np.savez(sys.argv[2], y=np.asarray(x), faults=np.asarray(faults), temp=temp,
         applied=np.asarray(-1 if applied is None else int(applied)),
         huge=np.asarray(stax.huge_page_malloc_active()))
'''


def _env(**extra) -> dict:
  """This process's environment for a child, without glibc tunables (the test sets its own)."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  return dict(env, JAX_PLATFORMS="cpu", **extra)


def _glibc() -> bool:
  try:
    ctypes.CDLL(None).gnu_get_libc_version  # pylint: disable=expression-not-assigned
  except (OSError, AttributeError):
    return False
  return True


def test_it_refuses_once_jax_has_started():
  """In a process whose JAX backends exist (XLA's threads already chose their arenas) the
  setting cannot take effect: a clear RuntimeError, not a silent no-op (glibc only)."""
  jnp.ones(3).block_until_ready()
  if not _glibc():
    assert stax.reuse_cpu_temporaries() is False
    return
  with pytest.raises(RuntimeError, match="before JAX's first computation"):
    stax.reuse_cpu_temporaries()


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_a_steps_temporaries_stop_page_faulting_and_results_do_not_change(tmp_path):
  """The same donated step (64 MiB of temporaries) in a fresh process without and with the
  setting: by default every call faults its temporaries' pages in again (at least one fault
  per 4 KiB); with the setting at least a quarter of the 24 calls fault in under 1 % of them
  (typically 15–23 calls fault nothing; a call whose block lands in newly grown heap faults
  it in) and all of them together under three quarters of the default's faults; the results
  are equal bit for bit."""
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  runs = []
  for reuse in ("0", "1"):
    out = tmp_path / f"run{reuse}.npz"
    run = subprocess.run([sys.executable, str(script), reuse, str(out)], capture_output=True,
                         text=True, timeout=600, env=_env())
    if run.returncode:
      raise RuntimeError(f"child (reuse={reuse}) failed: {run.stderr[-2000:]}")
    runs.append(np.load(out))
  default, reused = runs
  pages = int(default["temp"]) // 4096
  assert pages >= (32 << 20) // 4096, "the temporaries must exceed glibc's mmap threshold"
  assert int(default["applied"]) == -1 and int(reused["applied"]) == 1
  assert np.min(default["faults"]) >= pages, default["faults"]
  # With the setting most calls fault nothing; some land in newly grown heap (up to 9 of 24 in
  # ten runs), so the bounds leave room for that and still fail when nothing changed.
  assert np.mean(reused["faults"] < 0.01 * pages) >= 0.25, reused["faults"]
  assert np.sum(reused["faults"]) < 0.75 * np.sum(default["faults"]), reused["faults"]
  np.testing.assert_array_equal(default["y"], reused["y"])


def test_huge_page_malloc_env_merges_the_tunable():
  """The tunable is added to those already set, replaces another value of itself, and a bad
  environment is refused by name."""
  assert stax.huge_page_malloc_env({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = stax.huge_page_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc."
                                                     "arena_max=2", "PATH": "/bin"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                 "PATH": "/bin"}
  assert stax.huge_page_malloc_env(env) == env   # idempotent
  assert "GLIBC_TUNABLES" in stax.huge_page_malloc_env()   # this process's environment
  with pytest.raises(TypeError, match="`env`"):
    stax.huge_page_malloc_env([("GLIBC_TUNABLES", "")])
  with pytest.raises(TypeError, match="GLIBC_TUNABLES"):
    stax.huge_page_malloc_env({"GLIBC_TUNABLES": 1})


@pytest.mark.skipif(not _glibc(), reason="a glibc tunable")
def test_huge_page_malloc_faults_a_block_in_2_mib_at_a_time(tmp_path):
  """The step above in a process started with ``huge_page_malloc_env()``: where the tunable is
  in effect (glibc >= 2.35, transparent huge pages not off) its calls fault in under an eighth
  of the default's pages each (the block comes as 2 MiB pages; a call that gets no huge page
  falls back to 4 KiB ones), results equal bit for bit."""
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  runs = []
  for name, env in (("default", {}), ("huge", stax.huge_page_malloc_env({}))):
    out = tmp_path / f"{name}.npz"
    run = subprocess.run([sys.executable, str(script), "0", str(out)], capture_output=True,
                         text=True, timeout=600, env=_env(**env))
    if run.returncode:
      raise RuntimeError(f"child ({name}) failed: {run.stderr[-2000:]}")
    runs.append(np.load(out))
  default, huge = runs
  np.testing.assert_array_equal(default["y"], huge["y"])
  assert not bool(default["huge"])
  if not bool(huge["huge"]):
    pytest.skip("glibc < 2.35 or transparent huge pages off: the tunable changes nothing here")
  pages = int(default["temp"]) // 4096
  assert np.min(default["faults"]) >= pages, default["faults"]
  assert np.median(huge["faults"]) < pages / 8, huge["faults"]
  print("faults per call: default", default["faults"], "huge pages", huge["faults"])
