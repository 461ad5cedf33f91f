"""Test-session settings shared by tests/, integration_tests/ and the doctests in trquant/.

The suite compiles thousands of small XLA programs (every jitted function and every eager
op of a new shape), each run a few times, so its time is mostly XLA:CPU's compiler. Two
settings make compiling cheaper without changing the operations a program runs:

* ``--xla_backend_optimization_level=0``: LLVM's optimisation passes cost more than they
  save at these sizes (about 30% of the default run's wall time, measured on 2 cores);
* ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU's older fused-loop code generator, which
  compiles these small programs about twice as fast as the newer MLIR emitters (default
  run 313 s -> 214 s on 2 cores, same tests passing). Set only where the installed
  jaxlib knows the flag (an unknown XLA flag aborts the process).

Float results may differ in the last bits where a reduction's order changes, as they do
between machines. A run whose own ``XLA_FLAGS`` sets either flag keeps its setting.
"""

import os
import shutil
import subprocess
import sys
import tempfile


def _xla_accepts(flag):
  """Whether a fresh process's XLA:CPU starts with ``flag`` added to its XLA_FLAGS."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
  probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                        timeout=120).returncode == 0


# pytest-xdist's workers inherit the controlling process's environment: the probe runs once.
for _flag, _value, _probe in (("--xla_backend_optimization_level", "0", False),
                              ("--xla_cpu_use_fusion_emitters", "false", True)):
  if _flag in os.environ.get("XLA_FLAGS", ""):
    continue
  if _probe and not _xla_accepts(f"{_flag}={_value}"):
    continue
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()

# One compilation cache for the session's workers (pytest-xdist): a program compiled by one
# worker is read back by the others (about 20% of the default run's wall time). A fresh
# folder per session, removed at its end, so a run measures itself; a run given its own
# JAX_COMPILATION_CACHE_DIR keeps it.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="trquant-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session):
  # The controlling process made the folder (the workers inherit it) and removes it.
  if _SESSION_CACHE is not None and not hasattr(session.config, "workerinput"):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)

# Property tests (hypothesis) draw 30 examples each unless a test says otherwise; most draw
# new shapes, and each shape compiles. `--hypothesis-profile=thorough` draws 300.
try:
  from hypothesis import settings
except ImportError:  # the test extra installs it; a bare checkout can still import this
  settings = None
if settings is not None:
  settings.register_profile("default-run", max_examples=30, deadline=None)
  settings.register_profile("thorough", max_examples=300, deadline=None)
  settings.load_profile("default-run")


def pytest_ignore_collect(collection_path, config):
  # Every module in integration_tests/ is marked `integration`: a run that deselects that
  # mark (the default run's `-m 'not integration'`) need not import them (a few seconds
  # per pytest-xdist worker: they import the examples' package and its dependencies).
  if (collection_path.parent.name == "integration_tests"
      and config.getoption("markexpr", "").strip() == "not integration"):
    return True
  return None
