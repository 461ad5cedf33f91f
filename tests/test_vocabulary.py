"""Retired names stay retired: none appears in the package, the examples, the benchmark
scripts, the README, the docs or the commands of benchmarks/RESULTS.md (a log of past runs,
which may quote the names listed in QUOTED_AS_HISTORY)."""

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
    "nnx.scales_fn": "trquant.nnx.scale_fn (it makes the scale_fn of freeze_oscillations)",
    "trquant.tr_scheduling": "the names exported by trquant",
    "trquant.oscillations": "the names exported by trquant",
    "trquant.checks": "trquant._src.checks (private)",
    # The examples' TrainConfig fields, flags and helpers, in the library's vocabulary.
    "tr_momentum": "tr_decay (TrainConfig; tr_schedule's decay)",
    "osc_momentum": "osc_decay (TrainConfig): the decay itself, 1 - the old momentum",
    "osc_start": "osc_warmup_fraction (TrainConfig)",
    "freeze_threshold_final": "freeze_threshold_end (TrainConfig; freeze_threshold_schedule's"
                              " end_value)",
    "oscillation_momentum": "trquant_examples.optimizers.oscillation_decay (returns the decay)",
    "--tr-momentum": "--tr-decay",
    "--osc-momentum": "--osc-decay (the decay itself, 1 - the old momentum)",
    "--osc-start": "--osc-warmup-fraction",
    "--freeze-threshold": "--freeze-threshold-init",
    "--freeze-threshold-final": "--freeze-threshold-end",
    "--freeze-final": "--freeze-threshold-end (benchmarks/oscillations.py)",
    "--weight-bits 0": "--weight-bits fp (full precision; TrainConfig's weight_bits=None)",
    "--act-bits 0": "--act-bits fp (full precision; TrainConfig's act_bits=None)",
}

# file -> retired names it may quote as history
QUOTED_AS_HISTORY = {
    "benchmarks/RESULTS.md": {"adaround_model"},
}


def _sources():
  patterns = ["README.md", "docs/**/*.md", "trquant/**/*.py", "examples/**/*.py",
              "benchmarks/*.py", "benchmarks/RESULTS.md", "integration_tests/*.py"]
  files = sorted({path for pattern in patterns for path in ROOT.glob(pattern)})
  return [path for path in files if path.is_file()]


def test_the_scan_covers_the_package_and_the_docs():
  names = {path.relative_to(ROOT).as_posix() for path in _sources()}
  assert "README.md" in names and "trquant/_src/adaround/drivers.py" in names
  assert any(name.startswith("examples/") for name in names)
  assert "benchmarks/RESULTS.md" in names and set(QUOTED_AS_HISTORY) <= names


def _pattern(name):
  """The name as a whole word; a flag (``--name``) as a whole flag, so that ``--x`` does not
  match ``--x-end`` or ``--y--x``."""
  if name.startswith("-"):
    return re.compile(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])")
  return re.compile(r"\b" + re.escape(name) + (r"\b" if name[-1].isalnum() else ""))


def test_a_retired_flag_is_matched_as_a_whole_flag():
  pattern = _pattern("--freeze-threshold")
  assert pattern.search("train_qat.py --freeze-threshold 0.2 --freeze")
  assert pattern.search('["--freeze-threshold", "0.2"]')
  assert not pattern.search("--freeze-threshold-init 0.2 --freeze-threshold-end 0.02")
  assert not _pattern("--tr-momentum").search("--methods tr-auto,tr-momentum")
  assert _pattern("--weight-bits 0").search("--weight-bits 0 --act-bits 0")
  assert not _pattern("--weight-bits 0").search("--weight-bits 04")


@pytest.mark.parametrize("name", sorted(RETIRED))
def test_retired_name_is_gone(name):
  pattern = _pattern(name)
  hits = []
  for path in _sources():
    if name in QUOTED_AS_HISTORY.get(path.relative_to(ROOT).as_posix(), ()):
      continue
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if pattern.search(line):
        hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not hits, f"{name!r} is retired (use {RETIRED[name]}):\n" + "\n".join(hits[:20])
