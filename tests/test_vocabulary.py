"""Retired names stay retired: none appears in the package, the examples, the benchmark
scripts, the README or the docs (benchmarks/RESULTS.md, a log of past runs, may quote them)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# retired name -> what replaced it
RETIRED = {
    "adaround_model": 'trquant.adaround.reconstruct_model(model, batches, granularity="layer")',
    "LayerReport": "trquant.adaround.UnitReport",
    "BlockReport": "trquant.adaround.UnitReport",
    "adaround_error": "UnitReport.reconstructed_error",
    "u = init_scale": "init_multiplier (tr_schedule's parameter)",
    "AdaRoundResult": "trquant.adaround.ReconstructionResult",
    "BlockResult": "trquant.adaround.ReconstructionResult",
    "nnx.partition": "optax.partition(transforms, trquant.nnx.param_labels(model))",
    "nnx.saturation_fn": "trquant.nnx.codes_fn(model).saturation_fn",
    "nnx.dampening_loss": "trquant.nnx.model_dampening_loss",
    "trquant.tr_scheduling": "the names exported by trquant",
    "trquant.oscillations": "the names exported by trquant",
    "trquant.checks": "trquant._src.checks (private)",
}


def _sources():
  patterns = ["README.md", "docs/**/*.md", "trquant/**/*.py", "examples/**/*.py",
              "benchmarks/*.py", "integration_tests/*.py"]
  files = sorted({path for pattern in patterns for path in ROOT.glob(pattern)})
  return [path for path in files if path.is_file()]


def test_the_scan_covers_the_package_and_the_docs():
  names = {path.relative_to(ROOT).as_posix() for path in _sources()}
  assert "README.md" in names and "trquant/_src/adaround/drivers.py" in names
  assert any(name.startswith("examples/") for name in names)


@pytest.mark.parametrize("name", sorted(RETIRED))
def test_retired_name_is_gone(name):
  pattern = re.compile(r"\b" + re.escape(name) + (r"\b" if name[-1].isalnum() else ""))
  hits = []
  for path in _sources():
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if pattern.search(line):
        hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not hits, f"{name!r} is retired (use {RETIRED[name]}):\n" + "\n".join(hits[:20])
