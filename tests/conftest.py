"""Test session set-up: 8 virtual CPU devices (for the sharding and pmap contracts), float32."""

import os

# Must be set before JAX initialises its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# torch and XLA in one process on CPU: spinning OpenMP threads fight for the cores otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
