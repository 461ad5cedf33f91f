"""Weight oscillations in low-bit QAT: dampening and freezing vs the LSQ baseline and TR scheduling.

For each bit setting (W3A3 and W4A4 by default) and each method, fine-tunes the same
full-precision checkpoint of a MobileNetV2-style net (depth-wise convolutions) with
several seeds, SGD with momentum and a cosine LR (the paper's recipe, scaled down):

  lsq        the baseline: LSQ activation quantizers, MSE-initialised weight scales (frozen,
             as TR scheduling needs, so that all methods share one quantizer)
  damp       + the oscillation-dampening loss, weight 0 for the first 25% of the steps,
             then a cosine ramp to --dampening (0.1)
  freeze     + iterative weight freezing, threshold cosine-annealed from 0.1 to 0.01 (W4) /
             0.011 (W3) after the first 25% of the steps
  tr         TR scheduling of the quantized kernels (cosine target, U_0 = the LR)
  tr+freeze  TR scheduling followed by freezing

Every run tracks oscillations (trquant.track_oscillations, or the freezer's own tracker)
and is evaluated with and without BatchNorm re-estimation (50 batches). Writes every
run's JSON, summary.md (accuracy, oscillating and frozen fractions, and the final
fraction of oscillating weights per layer) and summary.json to --out.

    python benchmarks/oscillations.py --data-dir DIR --seeds 3 --out benchmarks/results/oscillations
    python benchmarks/oscillations.py --quick   # digits, the small CNN, a few steps (tested)

The data directory is --data-dir or $TRQUANT_DATA_DIR (Fashion-MNIST IDX files).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import _runs  # benchmarks/_runs.py, next to this script

METHODS = ("lsq", "damp", "freeze", "tr", "tr+freeze")


def _per_bits(text, cast=float):
  """'3:0.01,4:0.0033' -> {3: 0.01, 4: 0.0033}."""
  out = {}
  for item in text.split(","):
    bits, value = item.split(":")
    out[int(bits)] = cast(value)
  return out


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="mobilenetv2")
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
  parser.add_argument("--freeze-final", default="3:0.011,4:0.01",
                      help="final freezing threshold per bit width (bits:threshold,...)")
  parser.add_argument("--target-tr", type=float, default=5e-3, help="TR scheduling's R_0")
  parser.add_argument("--osc-momentum", type=float, default=None,
                      help="frequency EMA momentum (default: train_qat's, 1e-3 or more for short runs)")
  parser.add_argument("--max-steps-per-epoch", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--bn-reestimate", type=int, default=50)
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
  unknown = set(args.methods.split(",")) - set(METHODS)
  if unknown:
    parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
  return args


def method_overrides(args, method, bits):
  """train_qat flags of one method at one bit width."""
  flags = dict(weight_bits=bits, act_bits=bits, optimizer="sgd", lr=_per_bits(args.lr)[bits],
               weight_decay=args.weight_decay, track_oscillations=True,
               osc_momentum=args.osc_momentum, schedule="tr" if method.startswith("tr") else "lr",
               target_tr=args.target_tr)
  if method == "damp":
    flags["dampening"] = args.dampening
  if method.endswith("freeze"):
    flags.update(freeze=True, freeze_threshold=0.1,
                 freeze_threshold_final=_per_bits(args.freeze_final)[bits])
  return flags


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  checkpoint, fp_accuracy = _runs.fp_checkpoint(args)

  bits_list = [int(b) for b in args.bits.split(",")]
  methods = args.methods.split(",")
  table, per_layer = {}, {}
  for bits in bits_list:
    for method in methods:
      runs = []
      for seed in range(args.seeds):
        result = _runs.train(args, args.out, seed=seed, init_from=checkpoint,
                        **method_overrides(args, method, bits))
        runs.append(result)
        osc = result["oscillations"]
        print(f"W{bits}A{bits} {method:9s} seed {seed}: acc {result['final_test_accuracy']:.4f}"
              f" (BN re-est. {result.get('final_test_accuracy_bn_reestimated', np.nan):.4f}),"
              f" oscillating {osc['oscillating_fraction_mean']:.3%}"
              f", frozen {osc.get('frozen_fraction_mean', 0.0):.3%}", flush=True)
      oscillation = [r["oscillations"] for r in runs]
      table[(bits, method)] = {
          "accuracy": _runs.mean_std([r["final_test_accuracy"] for r in runs]),
          "bn_reestimated": _runs.mean_std([r.get("final_test_accuracy_bn_reestimated", np.nan) for r in runs]),
          "oscillating": _runs.mean_std([o["oscillating_fraction_mean"] for o in oscillation]),
          "frozen": _runs.mean_std([o.get("frozen_fraction_mean", 0.0) for o in oscillation]),
          "oscillations_per_weight_last_epoch": _runs.mean_std(
              [o["oscillations_per_weight_last_epoch"] for o in oscillation]),
          "momentum": oscillation[0]["momentum"],
          "runs": [r["final_test_accuracy"] for r in runs],
          "seconds": float(np.mean([r["train_seconds"] for r in runs])),
      }
      per_layer[(bits, method)] = {
          "layers": oscillation[0]["layers"], "weights": oscillation[0]["weights"],
          "oscillating_fraction": np.mean([o["oscillating_fraction"] for o in oscillation],
                                          axis=0).tolist()}
  elapsed = time.perf_counter() - start

  summary = _markdown(args, fp_accuracy, table, per_layer, bits_list, methods, elapsed)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"fp_accuracy": fp_accuracy, "seconds": elapsed,
               "table": {f"W{b}A{b}-{m}": v for (b, m), v in table.items()},
               "per_layer": {f"W{b}A{b}-{m}": v for (b, m), v in per_layer.items()},
               "args": vars(args)}, f, indent=2)
  print("\n" + summary)
  return table, per_layer


def _markdown(args, fp_accuracy, table, per_layer, bits_list, methods, elapsed):
  steps = f" (at most {args.max_steps_per_epoch} steps/epoch)" if args.max_steps_per_epoch else ""
  cell = lambda s: f"{100 * s[0]:.2f} ± {100 * s[1]:.2f}"
  momentum = table[(bits_list[0], methods[0])]["momentum"]
  lines = [f"Model `{args.model}` on `{args.dataset}`: FP checkpoint ({args.fp_epochs} epochs, Adam)"
           f" test accuracy **{fp_accuracy:.4f}**; QAT {args.epochs} epochs from it{steps}, SGD"
           f" (momentum 0.9, LR {args.lr}, weight decay {args.weight_decay:g}, cosine), batch"
           f" {args.batch_size}, {args.seeds} seed(s), first conv and last linear in FP, frozen"
           f" MSE weight scales, LSQ activations. Oscillation EMA momentum {momentum:g}; a weight"
           " counts as oscillating when its frequency exceeds 0.005. Accuracies in %, mean ± std"
           f" over seeds. Total {elapsed / 60:.1f} min.", "",
           "| bits | method | accuracy | BN re-estimated | oscillating weights (%) | frozen (%) |"
           " oscillations / weight, last epoch |",
           "|---|---|---|---|---|---|---|"]
  for bits in bits_list:
    for method in methods:
      row = table[(bits, method)]
      lines.append(f"| W{bits}A{bits} | {method} | {cell(row['accuracy'])} |"
                   f" {cell(row['bn_reestimated'])} | {cell(row['oscillating'])} |"
                   f" {cell(row['frozen'])} | {row['oscillations_per_weight_last_epoch'][0]:.4f} |")
  for bits in bits_list:
    first = per_layer[(bits, methods[0])]
    lines += ["", f"Final fraction of oscillating weights per layer (%), W{bits}A{bits}, mean over"
              " seeds:", "", "| layer | weights | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for index, (name, size) in enumerate(zip(first["layers"], first["weights"])):
      values = [100 * per_layer[(bits, m)]["oscillating_fraction"][index] for m in methods]
      lines.append(f"| {name} | {size} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
