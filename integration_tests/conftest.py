"""Every test in this folder is an integration test: end-to-end runs of the examples and
benchmarks, long control loops. The default `python -m pytest` leaves them out (with the
tests marked `integration` elsewhere); `python -m pytest -m integration` runs them."""

import pathlib

import pytest

_HERE = pathlib.Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if _HERE in pathlib.Path(str(item.fspath)).resolve().parents:
      item.add_marker(pytest.mark.integration)
