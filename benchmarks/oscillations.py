"""Weight oscillations in low-bit QAT: dampening and freezing vs the LSQ baseline and TR scheduling.

For each bit setting (W3A3 and W4A4 by default) and each method, fine-tunes the same
full-precision checkpoint of a MobileNetV2-style net (depth-wise convolutions; by default
the 5-block `mobilenetv2_tiny`) with several seeds, SGD with momentum and a cosine LR (the
paper's recipe, scaled down):

  lsq        the baseline: LSQ activation quantizers, MSE-initialised weight scales (frozen,
             as TR scheduling needs, so that all methods share one quantizer)
  damp       + the oscillation-dampening loss, weight 0 for the first 25% of the steps,
             then a cosine ramp to --dampening (0.1)
  freeze     + iterative weight freezing, threshold cosine-annealed from 0.1 to 0.01 (W4) /
             0.011 (W3) after the first 25% of the steps
  tr         TR scheduling of the quantized kernels (cosine target from the rate SGD
             makes at the LR over a warm-up, trquant.measured_target; U_0 = the LR)
  tr+freeze  TR scheduling followed by freezing

Every run tracks oscillations (trquant.track_oscillations, or the freezer's own tracker),
records at every epoch end the oscillating and frozen fractions per layer and the KL
divergence of each BatchNorm's running statistics from the current weights' population
statistics (trquant.nnx.batchnorm_divergence), and is evaluated with and without BatchNorm
re-estimation (50 batches). Writes every run's JSON, summary.md (accuracy per seed,
oscillating and frozen fractions, depth-wise vs point-wise layers, per layer), summary.json
and curves.png (the per-epoch curves, depth-wise and point-wise layers apart) to --out.

    python benchmarks/oscillations.py --data-dir DIR --seeds 3 --epochs 22 --out benchmarks/results/osc_long
    python benchmarks/oscillations.py --quick   # digits, the small CNN, a few steps (tested)

The data directory is --data-dir or $TRQUANT_DATA_DIR (Fashion-MNIST IDX files).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from flax import nnx

import _runs  # benchmarks/_runs.py, next to this script
import trquant
from trquant_examples import models

METHODS = ("lsq", "damp", "freeze", "tr", "tr+freeze")


def _target_rate(text):
  """--target-tr: "auto" or a number (TrainConfig checks that it is positive)."""
  return text if text == "auto" else float(text)


def _per_bits(text, cast=float):
  """'3:0.01,4:0.0033' -> {3: 0.01, 4: 0.0033}."""
  out = {}
  for item in text.split(","):
    bits, value = item.split(":")
    out[int(bits)] = cast(value)
  return out


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="mobilenetv2_tiny")
  parser.add_argument("--dataset", default="fashion-mnist")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $TRQUANT_DATA_DIR)")
  parser.add_argument("--fp-epochs", type=int, default=4)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--bits", default="3,4", help="comma-separated W=A bit widths")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--lr", default="3:0.01,4:0.0033", help="SGD LR per bit width (bits:lr,...)")
  parser.add_argument("--weight-decay", type=float, default=5e-5)
  parser.add_argument("--dampening", type=float, default=0.1, help="final dampening-loss weight")
  parser.add_argument("--freeze-threshold-end", default="3:0.011,4:0.01",
                      help="final freezing threshold per bit width (bits:threshold,...)")
  parser.add_argument("--target-tr", default="auto", type=_target_rate,
                      help="TR scheduling's R_0, or 'auto' (measured over a warm-up)")
  parser.add_argument("--osc-decay", type=float, default=None,
                      help="decay of the oscillation EMAs (default: TrainConfig's, 0.999 or less for"
                           " short runs)")
  parser.add_argument("--max-steps-per-epoch", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--bn-reestimate", type=int, default=50)
  parser.add_argument("--bn-divergence", type=int, default=20,
                      help="batches for the BatchNorm KL divergence at every epoch end")
  parser.add_argument("--resume", action="store_true",
                      help="read back runs whose JSON is already in --out instead of training them")
  parser.add_argument("--reuse-fp", action="store_true",
                      help="use the FP checkpoint already in --out instead of training it again")
  parser.add_argument("--out", default="benchmarks/results/oscillations")
  parser.add_argument("--quick", action="store_true",
                      help="digits, the small CNN, W4A4, 1 seed, a few steps: checks the pipeline")
  args = parser.parse_args(argv)
  if args.quick:
    # MobileNetV2's eager initialisation and calibration alone take ~30 s per run on 2 cores.
    args.dataset, args.model, args.fp_epochs, args.epochs, args.seeds = "digits", "cnn", 2, 2, 1
    args.bits, args.max_steps_per_epoch, args.batch_size, args.bn_reestimate = "4", 10, 64, 5
    args.bn_divergence = 2
  unknown = set(args.methods.split(",")) - set(METHODS)
  if unknown:
    parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
  return args


def method_overrides(args, method, bits):
  """TrainConfig fields of one method at one bit width."""
  flags = dict(weight_bits=bits, act_bits=bits, optimizer="sgd", lr=_per_bits(args.lr)[bits],
               weight_decay=args.weight_decay, track_oscillations=True,
               osc_decay=args.osc_decay, schedule="tr" if method.startswith("tr") else "lr",
               target_tr=args.target_tr, bn_divergence=args.bn_divergence)
  if method == "damp":
    flags["dampening"] = args.dampening
  if method.endswith("freeze"):
    flags.update(freeze=True, freeze_threshold_init=0.1,
                 freeze_threshold_end=_per_bits(args.freeze_threshold_end)[bits])
  return flags


def layer_kinds(args, num_classes=10, in_channels=1):
  """{kernel or BatchNorm path: "depth-wise" | "point-wise"} for the quantized convs of
  args.model (a conv with one group per channel is depth-wise; the others here are 1x1 or
  full convs) and the BatchNorm that follows each (ConvBN's `bn` next to its `conv`)."""
  model = models.build_model(
      args.model, num_classes=num_classes, in_channels=in_channels, weight_bits=4, act_bits=4,
      rngs=nnx.Rngs(0))
  kinds = {}
  for path, layer in trquant.nnx.quant_layers(model):
    if layer.weight_bits is None:
      continue
    kind = "depth-wise" if getattr(layer, "feature_group_count", 1) > 1 else "point-wise"
    kinds["/".join(map(str, path)) + "/kernel"] = kind
    kinds["/".join(map(str, path[:-1])) + "/bn"] = kind
  return kinds


def _kind_mean(values, names, kinds, kind, weights=None):
  """Per-epoch mean of per-layer `values` (epochs x layers) over the layers of one kind
  (weighted by `weights`)."""
  index = [i for i, name in enumerate(names) if kinds.get(name) == kind]
  values = np.asarray(values, float)[:, index]
  w = None if weights is None else np.asarray(weights, float)[index]
  return np.average(values, axis=-1, weights=w).tolist()


def _decay(oscillations):
  """The oscillation EMAs' decay of a run; run JSONs written before it was stored as a decay
  hold the momentum 1 - decay (read back with --resume)."""
  return oscillations["decay"] if "decay" in oscillations else 1.0 - oscillations["momentum"]


def run_curves(result, kinds):
  """Per-epoch curves of one run: accuracy, and oscillating / frozen fraction and BN KL for
  each kind of layer the model has."""
  osc = result["oscillations"]
  history = result["history"]
  divergence = history.get("bn_divergence")
  per_layer = {key: (osc.get(f"{key}_per_layer_epoch"), osc["layers"], osc["weights"])
               for key in ("oscillating_fraction", "frozen_fraction")}
  if divergence:
    names = list(divergence[0])
    per_layer["bn_kl"] = ([[epoch[name] for name in names] for epoch in divergence], names, None)
  curves = {"accuracy": history["test_accuracy"]}
  for key, (values, names, weights) in per_layer.items():
    for kind in ("depth-wise", "point-wise"):
      if not any(kinds.get(name) == kind for name in names):
        continue  # the model has no layer of this kind
      curves[f"{key}/{kind}"] = ([0.0] * len(history["epoch"]) if values is None  # no freezing
                                 else _kind_mean(values, names, kinds, kind, weights))
  return curves


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  checkpoint, fp_accuracy = _runs.fp_checkpoint(args)
  kinds = layer_kinds(args)

  bits_list = [int(b) for b in args.bits.split(",")]
  methods = args.methods.split(",")
  table, per_layer, curves = {}, {}, {}
  results = {}
  # Seeds outermost: a stopped benchmark has every method for its first seeds.
  for seed in range(args.seeds):
    for bits in bits_list:
      for method in methods:
        result = _runs.train(args, args.out, resume=args.resume, seed=seed,
                             init_from=checkpoint, **method_overrides(args, method, bits))
        results[(bits, method, seed)] = result
        osc = result["oscillations"]
        print(f"W{bits}A{bits} {method:9s} seed {seed}: acc {result['final_test_accuracy']:.4f}"
              f" (BN re-est. {result.get('final_test_accuracy_bn_reestimated', np.nan):.4f}),"
              f" oscillating {osc['oscillating_fraction_mean']:.3%}"
              f", frozen {osc.get('frozen_fraction_mean', 0.0):.3%}"
              f", {result['train_seconds']:.0f} s", flush=True)
  for bits in bits_list:
    for method in methods:
      runs = [results[(bits, method, seed)] for seed in range(args.seeds)]
      oscillation = [r["oscillations"] for r in runs]
      run_curve = [run_curves(r, kinds) for r in runs]
      curves[(bits, method)] = {key: np.mean([c[key] for c in run_curve], axis=0).tolist()
                                for key in run_curve[0]}
      final = {key: _runs.mean_std([c[key][-1] for c in run_curve]) for key in run_curve[0]}
      table[(bits, method)] = {
          "accuracy": _runs.mean_std([r["final_test_accuracy"] for r in runs]),
          "bn_reestimated": _runs.mean_std([r.get("final_test_accuracy_bn_reestimated", np.nan) for r in runs]),
          "oscillating": _runs.mean_std([o["oscillating_fraction_mean"] for o in oscillation]),
          "frozen": _runs.mean_std([o.get("frozen_fraction_mean", 0.0) for o in oscillation]),
          "oscillations_per_weight_last_epoch": _runs.mean_std(
              [o["oscillations_per_weight_last_epoch"] for o in oscillation]),
          "final_by_kind": final,
          "decay": _decay(oscillation[0]),
          "runs": [r["final_test_accuracy"] for r in runs],
          "runs_bn_reestimated": [r.get("final_test_accuracy_bn_reestimated", np.nan) for r in runs],
          "seconds": float(np.mean([r["train_seconds"] for r in runs])),
          "steps": runs[0]["total_steps"],
      }
      per_layer[(bits, method)] = {
          "layers": oscillation[0]["layers"], "weights": oscillation[0]["weights"],
          "oscillating_fraction": np.mean([o["oscillating_fraction"] for o in oscillation],
                                          axis=0).tolist()}
  elapsed = time.perf_counter() - start

  summary = _markdown(args, fp_accuracy, table, per_layer, kinds, bits_list, methods, elapsed)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"fp_accuracy": fp_accuracy, "seconds": elapsed,
               "table": {f"W{b}A{b}-{m}": v for (b, m), v in table.items()},
               "per_layer": {f"W{b}A{b}-{m}": v for (b, m), v in per_layer.items()},
               "curves": {f"W{b}A{b}-{m}": v for (b, m), v in curves.items()},
               "layer_kinds": kinds, "args": vars(args)}, f, indent=2)
  plot_curves(curves, bits_list, methods, os.path.join(args.out, "curves.png"))
  print("\n" + summary)
  return table, per_layer


def _markdown(args, fp_accuracy, table, per_layer, kinds, bits_list, methods, elapsed):
  steps = f" (at most {args.max_steps_per_epoch} steps/epoch)" if args.max_steps_per_epoch else ""
  cell = lambda s, scale=100: f"{scale * s[0]:.2f} ± {scale * s[1]:.2f}"
  seeds = lambda values: ", ".join(f"{100 * v:.2f}" for v in values)
  first = table[(bits_list[0], methods[0])]
  lines = [f"Model `{args.model}` on `{args.dataset}`: FP checkpoint ({args.fp_epochs} epochs, Adam)"
           f" test accuracy **{fp_accuracy:.4f}**; QAT {args.epochs} epochs from it{steps}, SGD"
           f" (momentum 0.9, LR {args.lr}, weight decay {args.weight_decay:g}, cosine), batch"
           f" {args.batch_size}, {args.seeds} seed(s), first conv and last linear in FP, frozen"
           f" MSE weight scales, LSQ activations. Oscillation EMA decay {first['decay']:g}; a"
           " weight counts as oscillating when its frequency exceeds 0.005. Accuracies in %, mean ±"
           f" std over seeds. {first['steps']} steps, {first['seconds']:.0f} s per run; training"
           f" {sum(row['seconds'] * args.seeds for row in table.values()) / 60:.1f} min in all"
           f" (this invocation: {elapsed / 60:.1f} min; with --resume, runs are read back).", "",
           "| bits | method | accuracy | per seed | BN re-estimated | per seed |"
           " oscillating weights (%) | frozen (%) | oscillations / weight, last epoch |",
           "|---|---|---|---|---|---|---|---|---|"]
  for bits in bits_list:
    for method in methods:
      row = table[(bits, method)]
      lines.append(f"| W{bits}A{bits} | {method} | {cell(row['accuracy'])} | {seeds(row['runs'])} |"
                   f" {cell(row['bn_reestimated'])} | {seeds(row['runs_bn_reestimated'])} |"
                   f" {cell(row['oscillating'])} | {cell(row['frozen'])} |"
                   f" {row['oscillations_per_weight_last_epoch'][0]:.4f} |")
  lines += ["", "Depth-wise vs point-wise layers at the end of training (mean ± std over seeds):"
            " oscillating and frozen weights (%, weighted by layer size), and the KL divergence"
            " of BatchNorm running statistics from the final weights' population statistics"
            " (mean over the layers' channels, before re-estimation):", "",
            "| bits | method | oscillating, dw | oscillating, pw | frozen, dw | frozen, pw |"
            " BN KL, dw | BN KL, pw |", "|---|---|---|---|---|---|---|---|"]
  for bits in bits_list:
    for method in methods:
      final = table[(bits, method)]["final_by_kind"]
      percent = lambda key: cell(final[key]) if key in final else "—"  # no layer of that kind
      kl = lambda kind: (f"{final[f'bn_kl/{kind}'][0]:.2e} ± {final[f'bn_kl/{kind}'][1]:.1e}"
                         if f"bn_kl/{kind}" in final else "—")
      lines.append(f"| W{bits}A{bits} | {method} |"
                   f" {percent('oscillating_fraction/depth-wise')} |"
                   f" {percent('oscillating_fraction/point-wise')} |"
                   f" {percent('frozen_fraction/depth-wise')} |"
                   f" {percent('frozen_fraction/point-wise')} | {kl('depth-wise')} |"
                   f" {kl('point-wise')} |")
  for bits in bits_list:
    first = per_layer[(bits, methods[0])]
    lines += ["", f"Final fraction of oscillating weights per layer (%), W{bits}A{bits}, mean over"
              " seeds:", "", "| layer | kind | weights | " + " | ".join(methods) + " |",
              "|---|---|---|" + "---|" * len(methods)]
    for index, (name, size) in enumerate(zip(first["layers"], first["weights"])):
      values = [100 * per_layer[(bits, m)]["oscillating_fraction"][index] for m in methods]
      lines.append(f"| {name} | {kinds.get(name, '')} | {size} | "
                   + " | ".join(f"{v:.2f}" for v in values) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(curves, bits_list, methods, path):
  """Per-epoch curves, one row per bit width: accuracy, oscillating, frozen, BN KL."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("accuracy", "test accuracy"), ("oscillating_fraction", "oscillating weights"),
            ("frozen_fraction", "frozen weights"), ("bn_kl", "BN KL (running || population)")]
  fig, axes = plt.subplots(len(bits_list), len(panels), figsize=(5 * len(panels), 3.8 * len(bits_list)),
                           squeeze=False)
  colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for row, bits in enumerate(bits_list):
    for col, (key, title) in enumerate(panels):
      ax = axes[row, col]
      for method in methods:
        curve = curves[(bits, method)]
        if key == "accuracy":
          ax.plot(np.arange(1, len(curve[key]) + 1), curve[key], color=colors[method], label=method)
          continue
        for kind, style in (("depth-wise", "-"), ("point-wise", "--")):
          values = curve.get(f"{key}/{kind}")
          if values is not None:
            ax.plot(np.arange(1, len(values) + 1), values, style, color=colors[method],
                    label=f"{method}, {kind}" if col == 1 else None)
      ax.set(xlabel="epoch", title=f"W{bits}A{bits}: {title}")
      if key == "bn_kl":
        ax.set_yscale("symlog", linthresh=1e-4)
      if col in (0, 1):
        ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  main()
