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
