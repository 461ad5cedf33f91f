"""Shared fixtures."""

import os
import subprocess
import sys

import pytest

NUM_DEVICES = 8


@pytest.fixture
def run_on_cpu_mesh():
  """Runs a Python script in a subprocess that sees 8 CPU devices; returns its stdout.

  The host platform's device count is fixed when jax starts, so multi-device
  tests run their script in a fresh interpreter with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
  """

  def run(script: str, timeout: int = 300) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout

  return run
