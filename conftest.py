"""Test-session settings shared by tests/, integration_tests/ and the doctests in trquant/.

The suite compiles many hundreds of small XLA programs, each run a few times: XLA:CPU's
backend optimisation (LLVM's passes) costs more time than it saves at these sizes (the
default run takes about 30% less wall time without it, measured on 2 cores). It changes how
a program is compiled, not the operations it runs (float results may differ in the last
bits where a reduction's order changes, as they do between machines). A run with its own
``XLA_FLAGS`` setting of ``--xla_backend_optimization_level`` keeps that setting.
"""

import os
import shutil
import tempfile

_OPTIMIZATION = "--xla_backend_optimization_level"
if _OPTIMIZATION not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPTIMIZATION}=0".strip()

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
