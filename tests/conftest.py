"""Test session set-up: 8 virtual CPU devices (for the sharding and pmap contracts), float32."""

import os

# Must be set before JAX initialises its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# Compilation is most of the suite's time on CPU (SCAO's update: 1.6 s at XLA's default backend
# optimisation, 0.9 s at level 0); the tests compare programs compiled the same way or to a
# tolerance, so they run at level 0 unless XLA_FLAGS sets a level.
if "xla_backend_optimization_level" not in _flags:
  _flags = (_flags + " --xla_backend_optimization_level=0").strip()
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch and XLA in one process on CPU: spinning OpenMP threads fight for the cores otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Property tests draw the same examples on every run (reproducible CI); explore with
# `--hypothesis-seed=N` locally.
try:
  from hypothesis import settings as _hsettings

  _hsettings.register_profile("stax", derandomize=True, deadline=None)
  _hsettings.load_profile("stax")
except ImportError:  # pragma: no cover
  pass


def pytest_configure(config):
  """One persistent XLA compilation cache per test session, shared by the xdist workers.

  Many tests compile the same step (the same optimizer on the same contract problem) in
  different test functions; the cache compiles it once per session. A fresh directory each
  session (nothing carries over between runs), removed at the end; ``STAX_TEST_JAX_CACHE``
  names one to keep instead.
  """
  import tempfile
  if "STAX_TEST_JAX_CACHE" not in os.environ:
    os.environ["STAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="stax-jax-cache-")
    config._stax_cache_owner = True
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["STAX_TEST_JAX_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if getattr(config, "_stax_cache_owner", False):
    import shutil
    shutil.rmtree(os.environ.pop("STAX_TEST_JAX_CACHE"), ignore_errors=True)
