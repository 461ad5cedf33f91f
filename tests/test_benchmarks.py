"""The benchmarks' own logic that needs no training run (their --quick runs are in
integration_tests/)."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(relative, name):
  spec = importlib.util.spec_from_file_location(name, ROOT / relative)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_ptq_plans_no_qdrop_for_weight_only_settings():
  ptq = _load("benchmarks/ptq.py", "trquant_bench_ptq")
  args = ptq.parse_args(["--settings", "W4A4,W2", "--seeds", "2"])
  runs = [(setting[0], method, seed) for setting, method, seed in ptq.planned_runs(args)]
  assert [run for run in runs if run[1] == "qdrop"] == [("W4A4", "qdrop", 0), ("W4A4", "qdrop", 1)]
  assert {run[0] for run in runs if run[1] == "brecq"} == {"W4A4", "W2"}
  assert len(runs) == 2 * 4 + 2 * 3
  for bad in ("X4", "W4A", "W0", "WA4"):
    with pytest.raises(SystemExit):
      ptq.parse_args(["--settings", bad])
