"""The examples run end to end (short settings) and write their outputs; train_qat's
command line and checkpoints, and the validation of its TrainConfig."""

import dataclasses
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
from flax import nnx

from trquant.nnx import QuantLinear
from trquant_examples import checkpoints
from trquant_examples import models
from trquant_examples.config import TrainConfig, run_name

pytestmark = pytest.mark.integration  # `python -m pytest -m integration`

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_train_digits_quick(tmp_path):
  train_digits = _load("train_digits")
  summary = train_digits.main([
      "--epochs", "4", "--fp-epochs", "3", "--seeds", "1", "--no-progress", "--out", str(tmp_path)
  ])
  assert (tmp_path / "digits_qat.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "digits_qat.json").read_text())
  assert saved["summary"] == summary
  assert summary["fp"]["final_mean"] > 0.9
  for run in ("lr", "tr"):
    assert summary[run]["final_mean"] > 0.8, run
    assert 0.0 <= summary[run]["tr_last_epoch"] < 0.1, run
  history = saved["per_seed"][0]["history"]["tr"]
  assert len(history["test_accuracy"]) == 4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_train_qat_checkpoint_round_trip(tmp_path):
  train_qat = _load("train_qat")
  common = ["--model", "cnn", "--dataset", "digits", "--epochs", "1", "--batch-size", "64",
            "--max-steps-per-epoch", "5", "--no-progress", "--out", str(tmp_path)]
  fp = train_qat.main(common + ["--weight-bits", "fp", "--act-bits", "fp",
                                "--save", str(tmp_path / "fp.npz")])
  assert (tmp_path / "fp.npz").exists() and fp["final_test_accuracy"] > 0.1
  qat = train_qat.main(common + ["--weight-bits", "2", "--act-bits", "2", "--schedule", "tr",
                                 "--init-from", str(tmp_path / "fp.npz")])
  transitions = qat["transitions"]
  assert len(transitions["talr_multiplier"]) == 5
  assert len(list(tmp_path.glob("cnn-digits-W2A2-adam-tr-*.png"))) == 1
  auto = train_qat.main(common + ["--weight-bits", "2", "--act-bits", "2", "--schedule", "tr",
                                  "--target-tr", "auto", "--bn-divergence", "2",
                                  "--init-from", str(tmp_path / "fp.npz")])
  assert auto["args"]["target_tr"] == "auto" and len(auto["history"]["bn_divergence"]) == 1
  assert set(auto["history"]["bn_divergence"][0]) >= {"conv2/bn", "conv3/bn"}
  with pytest.raises(SystemExit):
    train_qat.parse_args(["--target-tr", "-1"])
  other_model = models.build_model(
      "resnet20", num_classes=10, in_channels=1, weight_bits=None, act_bits=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="which the model lacks"):
    checkpoints.load_checkpoint(other_model, tmp_path / "fp.npz")


def test_train_qat_flags_are_the_train_config_fields():
  train_qat = _load("train_qat")
  assert train_qat.parse_args([]) == TrainConfig()
  assert train_qat.parse_args(["--target-tr", "auto"]).target_tr == "auto"
  assert train_qat.parse_args(["--target-tr", "2e-3"]).target_tr == 2e-3
  for bad in ("-1", "0", "fast"):
    with pytest.raises(SystemExit):
      train_qat.parse_args(["--target-tr", bad])
  config = train_qat.parse_args(["--weight-bits", "4", "--schedule", "tr", "--freeze",
                                 "--lr", "0.01", "--seed", "3"])
  assert config == TrainConfig(weight_bits=4, schedule="tr", freeze=True, lr=0.01, seed=3)
  assert run_name(config) == "cnn-digits-W4A2-adam-tr-R0.005-freeze-s3"
  assert run_name(dataclasses.replace(config, tag="mine")) == "mine"
  with pytest.raises(SystemExit):  # TrainConfig's own checks reach the command line
    train_qat.parse_args(["--weight-bits", "fp", "--schedule", "tr"])
  # Full precision is "fp" (None), on both bit-width flags; 0 is no bit width.
  fp = train_qat.parse_args(["--weight-bits", "fp", "--act-bits", "fp"])
  assert fp.weight_bits is None and fp.act_bits is None and not fp.quantized
  assert run_name(fp) == "cnn-digits-W32A32-adam-lr-s0"
  for flag in ("--weight-bits", "--act-bits"):
    for bad in ("0", "-1", "two"):
      with pytest.raises(SystemExit):
        train_qat.parse_args([flag, bad])
  # The flags follow the field names; the decays are the library's (decay, not 1 - decay).
  config = train_qat.parse_args(["--tr-decay", "0.9", "--osc-decay", "0.95",
                                 "--osc-warmup-fraction", "0.3", "--freeze-threshold-init", "0.2",
                                 "--freeze-threshold-end", "0.02"])
  assert config == TrainConfig(tr_decay=0.9, osc_decay=0.95, osc_warmup_fraction=0.3,
                               freeze_threshold_init=0.2, freeze_threshold_end=0.02)
  # The first/last-layer policy, as the AdaRound drivers take it: "fp", "same" or bits.
  assert train_qat.parse_args(["--first-last", "8"]).first_last == 8
  assert train_qat.parse_args(["--first-last", "same"]).first_last == "same"
  for bad in ("8bit", "0", "half"):
    with pytest.raises(SystemExit):
      train_qat.parse_args(["--first-last", bad])


@pytest.mark.parametrize("fields, message", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(epochs="2"), "epochs must be an integer"),
    (dict(model="vgg"), "model must be one of"),
    (dict(lr=-1e-3), "lr must be a number in"),
    (dict(momentum=1.0), "momentum must be a number in"),
    (dict(target_tr=0.0), "target_tr must be a positive number"),
    (dict(osc_warmup_fraction=1.0), "osc_warmup_fraction must be a number in"),
    (dict(osc_decay=1.0), "osc_decay must be a number in"),
    (dict(tr_decay=1.0), "tr_decay must be a number in"),
    (dict(weight_bits=0), r"weight_bits must be an integer >= 1 \(None = full precision\)"),
    (dict(act_bits=0), r"act_bits must be an integer >= 1 \(None = full precision\)"),
    (dict(per_channel=1), "per_channel must be True or False"),
    (dict(first_last="8bit"), 'first_last must be "fp", "same" or a bit width'),
    (dict(weight_bits=None, schedule="tr"), r"set weight_bits \(None is full precision\)"),
    (dict(weight_bits=None, freeze=True), "freeze acts on quantized weights"),
])
def test_train_config_rejects_bad_values_naming_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**fields)


def test_train_config_stores_numbers_as_the_command_line_does():
  config = TrainConfig(lr=1, target_tr=1, data_dir=pathlib.Path("data"))
  assert type(config.lr) is float and type(config.target_tr) is float
  assert config.data_dir == "data"
  assert config.learning_rate == 1.0 and TrainConfig(optimizer="sgd").learning_rate == 0.1
  assert not TrainConfig(weight_bits=None, act_bits=None).quantized
  assert TrainConfig(weight_bits=None, act_bits=8).quantized


def test_checkpoint_loads_into_a_quantized_model_of_the_same_architecture(tmp_path):
  def mlp(bits, seed, hidden=16):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(QuantLinear(8, hidden, weight_bits=bits, rngs=rngs), nnx.relu,
                          QuantLinear(hidden, 4, weight_bits=bits, act_bits=bits, rngs=rngs))

  fp = mlp(None, 0)
  checkpoints.save_checkpoint(fp, tmp_path / "fp.npz")
  qat = mlp(2, 1)
  loaded = checkpoints.load_checkpoint(qat, tmp_path / "fp.npz")
  assert "layers/2/kernel" in {"/".join(map(str, path)) for path in loaded}
  np.testing.assert_array_equal(qat.layers[2].kernel.get_value(), fp.layers[2].kernel.get_value())
  assert qat.layers[2].kernel.bits == 2  # the quantized model keeps its quantization
  with pytest.raises(ValueError, match="shape"):
    checkpoints.load_checkpoint(mlp(2, 1, hidden=12), tmp_path / "fp.npz")
  with pytest.raises(ValueError, match="which the model lacks"):
    checkpoints.load_checkpoint(
        nnx.Sequential(QuantLinear(8, 16, weight_bits=2, rngs=nnx.Rngs(0))), tmp_path / "fp.npz")


def test_train_vit_quick(tmp_path):
  """The ViT pipeline: plain NNX ViT, FP training, quantize, AdamW vs AdamW + TR, AdaRound, export."""
  train_vit = _load("train_vit")
  results = train_vit.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  assert (tmp_path / "vit_qat.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "vit_qat.json").read_text())
  assert saved["summary"] == results["summary"]
  assert results["fp"]["test_accuracy"] > 0.75
  for method in ("adamw", "adamw-tr"):
    assert results["summary"]["W4A4"][method]["mean"] > 0.6, method
  tr_run = [run for run in saved["runs"] if run["method"] == "adamw-tr"][0]
  assert tr_run["history"]["tr"][-1]["initial_target_rate"] > 0  # R_0 was measured
  assert len(tr_run["history"]["tr"][-1]["running_transition_rate"]) == 6  # 4 projections + MLP
  adaround = results["adaround"]
  assert adaround["export"]["reloaded_identical"]
  assert adaround["export"]["file_bytes"] < adaround["export"]["float32_bytes"]
  assert [layer["name"] for layer in adaround["layers"]][:2] == ["patch_embed", "blocks/0/attn/query"]
  assert adaround["accuracy"]["adaround"] > 0.6


def test_train_lm_quick(tmp_path):
  """The LM pipeline: plain NNX GQA/RoPE/SwiGLU LM on stdlib bytes, FP training, quantize by
  rules, AdamW vs AdamW + TR with oscillation tracking, PTQ (nearest, AdaRound, BRECQ), export."""
  train_lm = _load("train_lm")
  results = train_lm.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  assert (tmp_path / "lm.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "lm.json").read_text())
  rows = {row["name"]: row for row in results["rows"]}
  assert [row["name"] for row in saved["rows"]] == list(rows)
  assert set(rows) == {"FP", "FP +40 steps", "W4A8 adamw s0", "W4A8 adamw-tr s0", "PTQ W4 nearest",
                       "PTQ W4 AdaRound", "PTQ W4 BRECQ"}
  assert rows["FP"]["held_loss"] < 3.5  # below uniform bytes (ln 256 = 5.55 nats)
  for name, row in rows.items():
    assert row["held_loss"] < rows["FP"]["held_loss"] + 0.3, name
    assert row["eval_tokens_per_s"] > 0, name
    if name.startswith(("W", "PTQ")):
      assert row["export"]["reloaded_identical"], name
      assert row["export"]["file_bytes"] < results["float32_bytes"], name
  tr = rows["W4A8 adamw-tr s0"]["history"]["stats"][-1]
  assert len(tr["running_transition_rate"]) == 7  # q, k, v, o, gate, up, down; the 8-bit head not
  assert len(tr["oscillating_fraction"]) == 7
