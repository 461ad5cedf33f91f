"""Post-training quantization: nearest vs layer-wise AdaRound vs block reconstruction (BRECQ) vs QDrop.

For each model (ResNet-20 and the small CNN by default) an FP checkpoint is trained (or
reused) as in `benchmarks/adaround.py`; then, for each setting (W4A4, W2A4, W4, W2 by
default; per-channel weight scales; first and last layer 8-bit), each method and seed:

  nearest    round-to-nearest weights, MSE step sizes; activations (if any) LSQ-quantized
             with MSE step sizes from the first calibration batch
  adaround   the same start, then each layer reconstructed on its own (rounding and its
             input's step size learned): trquant.adaround.reconstruct_model(granularity="layer")
  brecq      each block (ResNet-20: stem, 9 residual blocks, head) reconstructed jointly:
             reconstruct_model(granularity="block")
  qdrop      brecq with drop_prob=0.5 (full-precision activations at random while learning)

from ``--calibration`` training images (a new draw and key per seed). Every run's result
goes to its own JSON in ``--out`` (existing ones are skipped, so an interrupted run
resumes); summary.md and summary.json are rebuilt from all of them.

    python benchmarks/ptq.py --data-dir DIR --out benchmarks/results/ptq
    python benchmarks/ptq.py --quick     # digits, the small CNN, a few iterations (tested)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time

import jax
import numpy as np

import _runs  # benchmarks/_runs.py, next to this script
import adaround as adaround_bench  # benchmarks/adaround.py: FP checkpoints, calibration
from trquant import adaround
from trquant_examples.config import parse_first_last
from trquant_examples import datasets

METHODS = ("nearest", "adaround", "brecq", "qdrop")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet20,cnn")
  parser.add_argument("--dataset", default="fashion-mnist")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $TRQUANT_DATA_DIR)")
  parser.add_argument("--fp-epochs", default="2,3", help="FP training epochs, one per model")
  parser.add_argument("--max-steps-per-epoch", type=int, default=150)
  parser.add_argument("--batch-size", type=int, default=128, help="FP training batch size")
  parser.add_argument("--settings", default="W4A4,W2A4,W4,W2",
                      help="weight (and activation) bits, e.g. W4A4 or W2 (weights only)")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales")
  parser.add_argument("--first-last", type=parse_first_last, default=8,
                      help='first and last layer: a bit width, "same" or "fp"')
  parser.add_argument("--calibration", type=int, default=1024)
  parser.add_argument("--iters", type=int, default=500, help="iterations per unit")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--drop-prob", type=float, default=0.5, help="QDrop's probability")
  parser.add_argument("--lam", type=float, default=0.01)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--act-lr", type=float, default=4e-5)
  parser.add_argument("--out", default="benchmarks/results/ptq")
  parser.add_argument("--summary-only", action="store_true", help="rebuild the summary only")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.dataset, args.fp_epochs, args.max_steps_per_epoch = "cnn", "digits", "2", 10
    args.batch_size, args.settings, args.calibration, args.iters = 64, "W3A4", 256, 20
    args.seeds = 1
  args.models = [m for m in args.models.split(",") if m]
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods must be a subset of {', '.join(METHODS)}; got {unknown}")
  args.settings = [_setting(s, parser) for s in args.settings.split(",") if s]
  return args


def parse_setting(text):
  """``"W4A4"`` -> ``("W4A4", 4, 4)``, ``"W2"`` -> ``("W2", 2, None)``.

  Raises:
    ValueError: for text that is not ``W<bits>`` or ``W<bits>A<bits>`` with bits >= 1.
  """
  text = text.strip().upper()
  match = re.fullmatch(r"W(\d+)(?:A(\d+))?", text)
  bits = match and (int(match[1]), None if match[2] is None else int(match[2]))
  if not bits or min(b for b in bits if b is not None) < 1:
    raise ValueError(f"a setting is W<bits> or W<bits>A<bits> (bits >= 1), e.g. W4A4 or W2;"
                     f" got {text!r}")
  return (text,) + bits


def _setting(text, parser):
  try:
    return parse_setting(text)
  except ValueError as error:
    parser.error(str(error))


def planned_runs(args):
  """``(setting, method, seed)`` of every run of one model, in the order they run.

  QDrop drops activation quantization at random, so weight-only settings have no QDrop run.
  """
  return [(setting, method, seed) for setting in args.settings for method in args.methods
          if not (method == "qdrop" and setting[2] is None) for seed in range(args.seeds)]


def run_one(args, model, dataset, name, setting, method, seed):
  tag, bits, act_bits = setting
  batches = adaround_bench.calibration_batches(dataset, args.calibration, seed)
  ruled = adaround_bench.ptq_model(model, batches[0][:1], weight_bits=bits, act_bits=act_bits,
                                   per_channel=not args.per_tensor, first_last=args.first_last)
  start = time.perf_counter()
  reports = []
  if method == "nearest":
    quantized = adaround.round_to_nearest(ruled, batches[0]).model
  else:
    quantized, reports = adaround.reconstruct_model(
        ruled, batches, granularity="layer" if method == "adaround" else "block",
        config=adaround.AdaRoundConfig(
            iters=args.iters, lam=args.lam, lr=args.lr, act_lr=args.act_lr,
            drop_prob=args.drop_prob if method == "qdrop" else 0.0),
        key=jax.random.key(seed), progress=not args.quick)
  seconds = time.perf_counter() - start
  accuracy = adaround_bench.accuracy(quantized, dataset)
  return {"model": name, "setting": tag, "bits": bits, "act_bits": act_bits, "method": method,
          "seed": seed, "accuracy": accuracy, "seconds": seconds, "iters": args.iters,
          "units": [{"name": r.name, "layers": list(r.layers), "seconds": r.seconds,
                     "capture_seconds": r.capture_seconds, "nearest_error": r.nearest_error,
                     "reconstructed_error": r.reconstructed_error,
                     "flipped_fraction": r.flipped_fraction,
                     "kept_nearest": r.kept_nearest} for r in reports]}


def summarize(args):
  runs = []
  for file in sorted(os.listdir(args.out)):
    if file.endswith(".json") and file.startswith("run-"):
      with open(os.path.join(args.out, file)) as f:
        runs.append(json.load(f))
  fp = {}
  for file in sorted(os.listdir(args.out)):
    if file.startswith("fp-") and file.endswith(".json"):
      with open(os.path.join(args.out, file)) as f:
        fp[file[3:-5]] = json.load(f)
  table = {}
  for run in runs:
    entry = table.setdefault((run["model"], run["setting"], run["method"]),
                             {"accuracies": [], "seeds": [], "seconds": [], "units": []})
    entry["accuracies"].append(run["accuracy"])
    entry["seeds"].append(run["seed"])
    entry["seconds"].append(run["seconds"])
    entry["units"].append(run["units"])
  lines = [
      "Post-training quantization on Fashion-MNIST: round-to-nearest, layer-wise AdaRound,"
      " block reconstruction (BRECQ) and BRECQ + QDrop (p = 0.5), from 1024 calibration images"
      f" (a new draw and key per seed), {args.iters} iterations per unit, batch 32, lambda"
      f" {args.lam:g}, Adam lr {args.lr:g} (rounding) and {args.act_lr:g} (activation step"
      " sizes), beta 20 -> 2 cosine after a 20% warm-up; per-channel MSE weight step sizes;"
      " activations (A4) LSQ with MSE-initialised step sizes, signed where the FP input is;"
      " first and last layer 8-bit (weights and inputs); no BatchNorm re-estimation."
      f" Machine: {platform.machine()} CPU, 2 cores, no GPU.", "",
      "| model | setting | FP | method | accuracy (mean ± std) | per seed | wall time per run (s) |",
      "|---|---|---|---|---|---|---|"]
  summary = {}
  for (model, setting, method), entry in sorted(
      table.items(), key=lambda item: (item[0][0], item[0][1], METHODS.index(item[0][2]))):
    mean, std = _runs.mean_std(entry["accuracies"])
    fp_accuracy = fp.get(model, {}).get("final_test_accuracy", float("nan"))
    per_seed = ", ".join(f"{100 * a:.2f}" for a in entry["accuracies"])
    lines.append(f"| {model} | {setting} | {100 * fp_accuracy:.2f} | {method} |"
                 f" {100 * mean:.2f} ± {100 * std:.2f} | {per_seed} |"
                 f" {np.mean(entry['seconds']):.0f} |")
    units = {}
    for run_units in entry["units"]:
      for unit in run_units:
        units.setdefault(unit["name"], []).append(unit)
    summary.setdefault(model, {}).setdefault(setting, {})[method] = {
        "mean": mean, "std": std, "accuracies": entry["accuracies"], "seeds": entry["seeds"],
        "seconds": entry["seconds"], "fp_accuracy": fp_accuracy,
        "units": {name: {"error_ratio": float(np.mean([u["reconstructed_error"]
                                                        / max(u["nearest_error"], 1e-12)
                                                        for u in us])),
                         "seconds": float(np.mean([u["seconds"] for u in us])),
                         "iters_per_second": args.iters / max(float(np.mean(
                             [u["seconds"] for u in us])), 1e-9),
                         "layers": us[0]["layers"]}
                  for name, us in units.items()}}
  # Reconstruction speed per unit (compilation included), layer-wise vs block-wise.
  lines += ["", "Reconstruction speed (iterations per second per unit, compilation included;"
                " mean over runs), and the unit's output error after / before (nearest):", "",
            "| model | setting | method | unit | layers | it/s | error after / before |",
            "|---|---|---|---|---|---|---|"]
  for model, settings in summary.items():
    for setting, methods in settings.items():
      for method, entry in methods.items():
        for name, unit in entry["units"].items():
          lines.append(f"| {model} | {setting} | {method} | {name} | {len(unit['layers'])} |"
                       f" {unit['iters_per_second']:.0f} | {unit['error_ratio']:.3f} |")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"iters": args.iters, "models": summary}, f, indent=1)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(summary, args.iters, os.path.join(args.out, "summary.png"))
  return summary


def plot(summary, iters, path):
  """Per model: accuracy per setting and method (mean, std bars, seeds as dots), and each
  unit's output error after / before reconstruction in the setting with the fewest bits."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colours = dict(zip(METHODS, ("C7", "C0", "C3", "C2")))
  fig, axes = plt.subplots(len(summary), 2, figsize=(12, 3.5 * len(summary)), squeeze=False)
  for row, (model, settings) in enumerate(sorted(summary.items())):
    ax = axes[row, 0]
    width = 0.8 / len(METHODS)
    for s_index, (setting, methods) in enumerate(sorted(settings.items())):
      for m_index, method in enumerate(METHODS):
        if method not in methods:
          continue
        entry, x = methods[method], s_index + (m_index - (len(METHODS) - 1) / 2) * width
        ax.bar(x, 100 * entry["mean"], width, yerr=100 * entry["std"], color=colours[method],
               label=method if s_index == 0 else None)
        ax.plot([x] * len(entry["accuracies"]), [100 * a for a in entry["accuracies"]], "k.",
                ms=3)
      fp_accuracy = next(iter(methods.values()))["fp_accuracy"]
      ax.hlines(100 * fp_accuracy, s_index - 0.4, s_index + 0.4, colors="k", linestyles="--",
                lw=1)
    ax.set_xticks(range(len(settings)), sorted(settings))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}: accuracy ({iters} it/unit; dashed: FP)", fontsize=9)
    ax.legend(fontsize=7)
    # Fewest weight bits; with activations quantized before weight-only.
    lowest = min(settings, key=lambda s: (parse_setting(s)[1], parse_setting(s)[2] is None))
    ax = axes[row, 1]
    for method, entry in settings[lowest].items():
      if entry["units"]:  # layer-wise: one unit per layer; block-wise: one per block
        ratios = [unit["error_ratio"] for unit in entry["units"].values()]
        ax.plot(range(len(ratios)), ratios, "o-", color=colours[method], label=method, ms=3)
    ax.set_xlabel("unit, in call order (stem first, head last)")
    ax.set_ylabel("unit output error / nearest's")
    ax.set_title(f"{model} {lowest}: error ratio per unit", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if not args.summary_only:
    dataset = datasets.normalize(datasets.load_dataset(args.dataset, args.data_dir))
    epochs = [int(e) for e in args.fp_epochs.split(",")]
    fp_epochs = dict(zip(args.models, epochs if len(epochs) > 1 else epochs * len(args.models)))
    for name in args.models:
      bench_args = argparse.Namespace(
          out=args.out, dataset=args.dataset, retrain=False, batch_size=args.batch_size,
          data_dir=args.data_dir, max_steps_per_epoch=args.max_steps_per_epoch)
      model = adaround_bench.fp_model(bench_args, name, dataset, fp_epochs[name])
      for setting, method, seed in planned_runs(args):
        path = os.path.join(args.out, f"run-{name}-{setting[0]}-{method}-s{seed}.json")
        if os.path.exists(path):
          continue
        result = run_one(args, model, dataset, name, setting, method, seed)
        jax.clear_caches()  # each run compiles its own loops: do not keep them all
        with open(path, "w") as f:
          json.dump(result, f)
        print(f"{name} {setting[0]} {method} seed {seed}: {100 * result['accuracy']:.2f}%"
              f" ({result['seconds']:.0f} s)", flush=True)
  summary = summarize(args)
  with open(os.path.join(args.out, "summary.md")) as f:
    print(f.read())
  return summary


if __name__ == "__main__":
  main()
