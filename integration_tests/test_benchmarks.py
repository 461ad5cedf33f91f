"""The benchmarks' --quick modes run end to end and report what they measured; their own
logic that needs no training run; the TrainConfig of a benchmark run."""

import argparse
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from trquant_examples.config import TrainConfig, run_name

pytestmark = pytest.mark.integration  # `python -m pytest -m integration`

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(relative, name):
  spec = importlib.util.spec_from_file_location(name, ROOT / relative)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_benchmark_runs_share_settings_and_keep_the_defaults_they_do_not_set():
  runs = _load("benchmarks/_runs.py", "trquant_bench_runs")
  args = argparse.Namespace(model="cnn", dataset="digits", data_dir="", epochs=2, batch_size=64,
                            max_steps_per_epoch=0, bn_reestimate=None)
  config = runs.train_config(args, "out", weight_bits=3, act_bits=3, schedule="tr",
                             target_tr=2e-3, osc_decay=None, freeze=False, lr=0.01)
  assert config == TrainConfig(model="cnn", dataset="digits", epochs=2, batch_size=64, out="out",
                               weight_bits=3, act_bits=3, schedule="tr", target_tr=2e-3,
                               lr=0.01, no_progress=True, no_plot=True)
  assert run_name(config) == "cnn-digits-W3A3-adam-tr-R0.002-s0"
  # None bit widths are full precision, not "the default" (the FP checkpoint's run).
  fp = runs.train_config(args, "out", weight_bits=None, act_bits=None)
  assert fp.weight_bits is None and fp.act_bits is None and not fp.quantized


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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tr_vs_lr_quick(tmp_path):
  tr_vs_lr = _load("benchmarks/tr_vs_lr.py", "trquant_bench_tr_vs_lr")
  table, sweep = tr_vs_lr.main(["--quick", "--out", str(tmp_path)])
  assert set(table) == {(2, "adam", "lr"), (2, "adam", "tr"), (2, "sgd", "lr"), (2, "sgd", "tr")}
  for row in table.values():
    mean, std = row["accuracy"]
    assert 0.1 < mean <= 1.0 and std == 0.0  # one seed
  assert sorted(sweep) == [2e-3, 1e-2]
  summary = (tmp_path / "summary.md").read_text()
  assert "| W2A2 | adam |" in summary and "Sweep of R_0" in summary
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["fp_accuracy"] > 0.5
  assert (tmp_path / "fp_cnn_digits.npz").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_oscillations_quick(tmp_path):
  oscillations = _load("benchmarks/oscillations.py", "trquant_bench_oscillations")
  table, per_layer = oscillations.main(["--quick", "--out", str(tmp_path)])
  methods = ("lsq", "damp", "freeze", "tr", "tr+freeze")
  assert set(table) == {(4, method) for method in methods}
  for (bits, method), row in table.items():
    assert 0.1 < row["accuracy"][0] <= 1.0 and row["accuracy"][1] == 0.0  # one seed
    assert 0.1 < row["bn_reestimated"][0] <= 1.0
    assert 0.0 <= row["oscillating"][0] <= 1.0
    assert (row["frozen"][0] > 0.0) == method.endswith("freeze"), method
    layers = per_layer[(bits, method)]
    assert len(layers["layers"]) == len(layers["oscillating_fraction"]) == 2  # cnn: conv2, conv3
  summary = (tmp_path / "summary.md").read_text()
  assert "| W4A4 | tr+freeze |" in summary and "conv2/conv/kernel" in summary
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert set(saved["table"]) == {f"W4A4-{method}" for method in methods}
  assert saved["fp_accuracy"] > 0.5
  # The small CNN has no depth-wise conv: its quantized convs and their BatchNorms are "point-wise".
  assert saved["layer_kinds"] == {"conv2/conv/kernel": "point-wise", "conv2/bn": "point-wise",
                                  "conv3/conv/kernel": "point-wise", "conv3/bn": "point-wise"}
  curves = saved["curves"]["W4A4-freeze"]
  assert len(curves["accuracy"]) == len(curves["bn_kl/point-wise"]) == 2  # 2 epochs
  assert all(value >= 0.0 for value in curves["bn_kl/point-wise"])
  assert curves["frozen_fraction/point-wise"][-1] > 0.0
  assert not any(key.endswith("/depth-wise") for key in curves)  # no depth-wise layer, no curve
  assert (tmp_path / "curves.png").exists()
  # A second call with --resume reads every run back instead of training it again.
  again, _ = oscillations.main(["--quick", "--resume", "--reuse-fp", "--out", str(tmp_path)])
  assert again[(4, "tr")]["runs"] == table[(4, "tr")]["runs"]


def test_overhead_quick(tmp_path):
  overhead = _load("benchmarks/overhead.py", "trquant_bench_overhead")
  results = overhead.main(["--quick", "--out", str(tmp_path)])
  rows = results["steps"]["cnn"]
  assert set(rows) == set(overhead.VARIANTS)
  for row in rows.values():
    assert row["median_ms"] > 0 and row["ratio"] > 0 and row["update_ms"] > 0
  assert rows["adam_cosine"]["update_overhead"] == 0.0
  # Memory is exact, not timed: TR scheduling keeps per-layer vectors only, the tracker
  # 3 bytes per quantized weight (uint16 frequency + int8 direction), freezing 6.
  assert rows["adam_tr"]["extra_state_bytes_per_weight"] < 0.01
  assert 3.0 <= rows["adam_tr_track"]["extra_state_bytes_per_weight"] < 3.01
  assert 6.0 <= rows["adam_tr_freeze"]["extra_state_bytes_per_weight"] < 6.01
  assert rows["adam_count"]["extra_state_bytes_per_weight"] < 0.01
  assert set(results["steps"]) == {"mlp_small", "cnn"}
  assert [row["weights"] for row in results["scaling"]] == [100_000, 1_000_000]
  for row in results["scaling"]:
    assert row["transform_ms"] > 0 and row["copy_ms"] > 0 and row["copy_new_ms"] > 0
  assert set(results["loops"]) == {"digits_mlp", "qat_cnn"}
  for rates in results["loops"].values():
    assert len(rates) == 4 and all(row["steps_per_s"] > 0 for row in rates.values())
  summary = (tmp_path / "summary.md").read_text()
  assert "tr_schedule alone" in summary and "Training loops" in summary


def test_depthwise_quick(tmp_path):
  depthwise = _load("benchmarks/depthwise.py", "trquant_bench_depthwise")
  rows = depthwise.main(["--quick", "--out", str(tmp_path)])  # also checks equal gradients
  assert len(rows) == 3
  for row in rows:
    assert row["conv_ms"] > 0 and row["shift_ms"] > 0 and row["speedup"] > 0
  assert "MobileNetV2" in (tmp_path / "summary.md").read_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_adaround_quick(tmp_path):
  bench = _load("benchmarks/adaround.py", "trquant_bench_adaround")
  results = bench.main(["--quick", "--out", str(tmp_path)])
  cnn = results["models"]["cnn"]
  assert cnn["fp_accuracy"] > 0.5
  assert set(cnn["table"]) == {"W3-tensor", "W3-channel"}
  for row in cnn["table"].values():
    assert 0.1 < row["nearest"] <= 1.0
    mean, std = row["adaround"]
    assert 0.1 < mean <= 1.0 and std == 0.0  # one seed
    assert len(row["error_ratio_per_layer"]) == 4  # cnn: conv1, conv2, conv3, head
  assert list(cnn["layers"]) == ["conv1/conv", "conv2/conv", "conv3/conv", "head"]
  assert all(layer["mean_seconds"] > 0 for layer in cnn["layers"].values())
  assert len(results["timing"]) == 3
  for row in results["timing"]:
    assert row["fused_its"] > 0 and row["eager_its"] > 0 and row["speedup"] > 0
  summary = (tmp_path / "summary.md").read_text()
  assert "| W3 | per-tensor |" in summary and "Fused loop vs eager loop" in summary
  assert json.loads((tmp_path / "summary.json").read_text())["timing"]
  assert (tmp_path / "summary.png").exists() and (tmp_path / "fp_cnn_digits.npz").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tr_long_quick(tmp_path):
  tr_long = _load("benchmarks/tr_long.py", "trquant_bench_tr_long")
  tr_long.main(["--quick", "--out", str(tmp_path), "--optimizers", "sgd",
                "--methods", "lr,lr-lsq,tr,tr-auto"])
  runs = sorted(tmp_path.glob("mlp32-W2A2-sgd-*.json"))
  assert len(runs) == 8  # 4 methods x 2 seeds side by side
  run = json.loads((tmp_path / "mlp32-W2A2-sgd-tr-auto-lr0.1-s1.json").read_text())
  assert run["auto_r0"] > 0 and 0.1 < run["final_test_accuracy"] <= 1.0
  curves = run["curves"]
  assert len(curves["transition_rate"]) == 200 and len(curves["transition_rate"][0]) == 2
  lr_run = json.loads((tmp_path / "mlp32-W2A2-sgd-lr-lr0.1-s0.json").read_text())
  assert "talr_multiplier" not in lr_run["curves"] and lr_run["oscillating_last10pct"][0] >= 0
  tr_long.main(["--summary-only", "--out", str(tmp_path)])
  summary = (tmp_path / "summary.md").read_text()
  assert "| W2A2 sgd | tr-auto | auto" in summary and "## Mechanism" in summary
  assert (tmp_path / "summary.png").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tr_long_quick_cnn(tmp_path):
  tr_long = _load("benchmarks/tr_long.py", "trquant_bench_tr_long")
  tr_long.main(["--quick", "--model", "cnn", "--out", str(tmp_path), "--optimizers", "adam",
                "--methods", "lr,tr-auto"])
  runs = sorted(tmp_path.glob("cnn32-W2A2-adam-*.json"))
  assert len(runs) == 4  # 2 methods x 2 seeds, one after the other
  run = json.loads((tmp_path / "cnn32-W2A2-adam-tr-auto-lr0.001-s1.json").read_text())
  assert run["model"] == "cnn" and run["auto_r0"] > 0
  assert len(run["curves"]["transition_rate"][0]) == 3  # the three quantized convs
  assert [step for step, _ in run["eval_curve"]] == [100, 200]
  tr_long.main(["--summary-only", "--out", str(tmp_path)])
  assert "BN CNN" in (tmp_path / "summary.md").read_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ptq_quick(tmp_path):
  ptq = _load("benchmarks/ptq.py", "trquant_bench_ptq")
  summary = ptq.main(["--quick", "--out", str(tmp_path)])
  rows = summary["cnn"]["W3A4"]
  assert list(rows) == ["nearest", "adaround", "brecq", "qdrop"]
  for method, row in rows.items():
    assert 0.1 < row["mean"] <= 1.0 and row["std"] == 0.0 and row["seeds"] == [0]
    assert row["fp_accuracy"] > 0.5
  assert rows["nearest"]["units"] == {}
  assert list(rows["adaround"]["units"]) == ["conv1/conv", "conv2/conv", "conv3/conv", "head"]
  assert list(rows["brecq"]["units"]) == ["conv1", "conv2", "conv3", "head"]  # ConvBN blocks
  assert len(list(tmp_path.glob("run-cnn-W3A4-*-s0.json"))) == 4
  # A second call resumes: every run exists, so only the summary is rebuilt.
  again = ptq.main(["--quick", "--out", str(tmp_path)])
  assert again["cnn"]["W3A4"]["qdrop"]["accuracies"] == rows["qdrop"]["accuracies"]
  assert "| cnn | W3A4 |" in (tmp_path / "summary.md").read_text()


def test_quant_speed_quick(tmp_path):
  bench = _load("benchmarks/quant_speed.py", "trquant_bench_quant_speed")
  results = bench.main(["--quick", "--out", str(tmp_path)])
  entry = results["models"]["vit_tiny"]
  rows = entry["rows"]
  assert entry["batch_size"] == 8
  assert list(rows) == ["float", "quant", "quant_tr", "infer_float", "infer_quant"]
  for row in rows.values():
    assert row["median_ms"] > 0 and row["ratio"] > 0 and len(row["round_ms"]) == 2
    assert row["hlo"]["instructions"] > 0
  assert rows["float"]["ratio"] == rows["infer_float"]["ratio"] == 1.0
  # The quantized steps compute more than the float ones: fake-quant and LSQ gradients.
  assert rows["quant"]["hlo"]["instructions"] > rows["float"]["hlo"]["instructions"]
  summary = (tmp_path / "summary.md").read_text()
  assert "| vit_tiny | 8 | (c) W4A8 + tr_schedule |" in summary
  assert json.loads((tmp_path / "summary.json").read_text())["cpu_affinity"]


def test_lm_serving_quick():
  serving = _load("benchmarks/lm_serving.py", "trquant_bench_lm_serving")
  summary = serving.main(["--quick"])
  assert summary["packed_logits_bit_identical_to_fq"]
  assert summary["packed_generation_identical_to_fq"]
  bytes_ = summary["state_bytes"]
  assert bytes_["packed"] < 0.5 * bytes_["fq"]  # the quantized layers' kernels packed
  for form in serving.VARIANTS:
    for workload in ("prefill", "decode"):
      assert summary["rows"][form][workload]["tokens_per_s"] > 0
    memory = summary["peak_memory_mib"][form]  # served from its checkpoint, fresh process
    assert 0 < memory["before_restore_mib"] <= memory["peak_mib"]


def test_ptq_memory_quick():
  bench = _load("benchmarks/ptq_memory.py", "trquant_bench_ptq_memory")
  rows = {row["method"]: row for row in bench.main(["--quick", "--methods", "rtn,brecq"])}
  assert set(rows) == {"rtn", "brecq"} and rows["brecq"]["units"] == 3  # 2 blocks + head
  for row in rows.values():
    assert row["live_samples"] > 0 and row["live_peak"] >= row["live_before"]
    assert row["rss_peak_mib"] >= row["rss_before_mib"] > 0
  # Round-to-nearest adds step sizes only: the result shares the float kernels' arrays
  # (when PTQ planned per-group scales repeated over each kernel, this was ~0.9 x model).
  assert rows["rtn"]["live_peak"] - rows["rtn"]["live_before"] < 0.2 * rows["rtn"]["model_bytes"]


def test_a8_matmul_quick(tmp_path):
  bench = _load("benchmarks/a8_matmul.py", "trquant_bench_a8_matmul")
  rows = bench.main(["--quick", "--out", str(tmp_path)])
  assert [(r["group_size"], r["tokens"]) for r in rows] == [(32, 1), (32, 8), (None, 1), (None, 8)]
  for row in rows:
    assert row["max_relative_difference"] < 1e-5  # exact int32 sums, float scaling only
    assert set(row["seconds_per_call"]) == {"float, packed", "int8, packed",
                                            "float, resident f32", "int8, resident int8"}
    assert all(t > 0 for t in row["seconds_per_call"].values())
  assert json.loads((tmp_path / "a8_matmul.json").read_text())["rows"] == rows
  assert "| 64x96 | 32 | 1 |" in (tmp_path / "summary.md").read_text()


def test_lm_qat_quick(tmp_path):
  lm_qat = _load("benchmarks/lm_qat.py", "trquant_bench_lm_qat")
  summary = lm_qat.main(["--quick", "--out", str(tmp_path)])
  methods = {row["method"] for row in summary["rows"]}
  assert {"rtn", "adaround", "brecq", "adamw", "adamw-kd", "adamw-tr"} <= methods
  for row in summary["rows"]:
    assert row["setting"] == "w4a8" and np.isfinite(row["mean"])
    if row["method"] not in lm_qat.PTQ_METHODS:
      assert row["recovery_vs_rtn"] is not None
  run = json.loads((tmp_path / "w4a8-adamw-tr-s0.json").read_text())
  assert len(run["provenance"]["fp_checkpoint_sha256"]) == 64
  assert (tmp_path / "summary.png").exists()
  # The FP checkpoint is reused: a second call with --summary-only reads the same runs.
  again = lm_qat.main(["--quick", "--out", str(tmp_path), "--summary-only"])
  assert again["rows"] == summary["rows"]
