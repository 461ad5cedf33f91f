"""Headline experiment: TR scheduling vs LR scheduling, from one full-precision checkpoint.

For each bit setting (W2A2, W1A1 by default), each optimizer (Adam, SGD) and each
schedule (cosine LR; TR scheduling with a cosine target), fine-tunes the same
FP checkpoint for the same number of epochs with several seeds, then sweeps the
initial target TR (W2A2, Adam). Writes every run's JSON, a markdown summary and
plots to ``--out``.

    python benchmarks/tr_vs_lr.py --dataset fashion-mnist --data-dir DIR --model cnn \
        --fp-epochs 4 --epochs 3 --seeds 3 --out benchmarks/results/tr_vs_lr_cnn
    python benchmarks/tr_vs_lr.py --quick        # digits, a couple of minutes, used by the tests
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import _runs  # benchmarks/_runs.py, next to this script


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--dataset", default="fashion-mnist")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--fp-epochs", type=int, default=4)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--bits", default="2,1", help="comma-separated W=A bit widths")
  parser.add_argument("--optimizers", default="adam,sgd")
  parser.add_argument("--target-tr", type=float, default=5e-3, help="R_0 of the main comparison")
  parser.add_argument("--sweep", default="1e-3,2e-3,5e-3,1e-2", help="R_0 values (W{first bits}, adam)")
  parser.add_argument("--sweep-seeds", type=int, default=1)
  parser.add_argument("--max-steps-per-epoch", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--reuse-fp", action="store_true",
                      help="use the FP checkpoint already in --out instead of training it again")
  parser.add_argument("--out", default="benchmarks/results/tr_vs_lr")
  parser.add_argument("--plot-only", action="store_true",
                      help="redraw the plots from the summary.json and run JSONs in --out")
  parser.add_argument("--quick", action="store_true",
                      help="digits, tiny epochs, 1 seed: checks the pipeline in a few minutes")
  args = parser.parse_args(argv)
  if args.quick:
    args.dataset, args.fp_epochs, args.epochs, args.seeds = "digits", 3, 2, 1
    args.bits, args.sweep, args.max_steps_per_epoch, args.batch_size = "2", "2e-3,1e-2", 10, 64
  return args


def plot(out):
  """Draws summary.png from summary.json and the runs' JSONs in `out`: accuracy per setting
  (mean and std over seeds, FP line), the R_0 sweep, and target vs running TR and the TALR
  multiplier per layer of the first seed's TR run at each bit width."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  table, sweep, run_args = summary["table"], summary["sweep"], summary["args"]
  settings = sorted({key.rsplit("-", 1)[0] for key in table})
  bits_list = [int(b) for b in run_args["bits"].split(",")]
  fig, axes = plt.subplots(1, 2 + len(bits_list), figsize=(5 * (2 + len(bits_list)), 4))
  x = np.arange(len(settings))
  for offset, schedule in ((-0.2, "lr"), (0.2, "tr")):
    means = [100 * table[f"{s}-{schedule}"]["accuracy"][0] for s in settings]
    stds = [100 * table[f"{s}-{schedule}"]["accuracy"][1] for s in settings]
    axes[0].bar(x + offset, means, 0.4, yerr=stds, capsize=3,
                label="cosine LR" if schedule == "lr" else "TR scheduling")
  axes[0].axhline(100 * summary["fp_accuracy"], color="k", ls="--", lw=1, label="FP")
  lowest = min(100 * row["accuracy"][0] for row in table.values())
  axes[0].set_ylim(lowest - 3, 100 * summary["fp_accuracy"] + 2)
  axes[0].set_xticks(x, settings, rotation=20)
  axes[0].set_ylabel("test accuracy (%)")
  axes[0].set_title(f"{run_args['model']} on {run_args['dataset']}, {run_args['seeds']} seeds")
  axes[0].legend(fontsize=8)
  targets = sorted(sweep, key=float)
  axes[1].plot([float(t) for t in targets], [100 * sweep[t]["accuracy"][0] for t in targets], "o-")
  axes[1].set_xscale("log")
  axes[1].set_xlabel("initial target TR R_0")
  axes[1].set_ylabel("test accuracy (%)")
  axes[1].set_title(f"R_0 sweep (W{bits_list[0]}A{bits_list[0]}, Adam)")
  for axis, bits in zip(axes[2:], bits_list):
    name = f"{run_args['model']}-{run_args['dataset']}-W{bits}A{bits}-adam-tr-R{run_args['target_tr']:g}-s0"
    with open(os.path.join(out, name + ".json")) as f:
      transitions = json.load(f)["transitions"]
    running = np.asarray(transitions["running_transition_rate"])
    axis.plot(transitions["target_transition_rate"], "k--", label="target R")
    for layer in range(running.shape[1]):
      axis.plot(running[:, layer], lw=1, label=f"running TR K, layer {layer}")
    axis.set_xlabel("step")
    axis.set_ylabel("transition rate")
    axis.set_title(f"W{bits}A{bits} Adam + TR, seed 0")
    twin = axis.twinx()
    twin.plot(np.asarray(transitions["talr_multiplier"]), ":", lw=1)
    twin.set_ylabel("TALR multiplier u (dotted)")
    axis.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "summary.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.plot_only:
    plot(args.out)
    return None, None
  start = time.perf_counter()
  checkpoint, fp_accuracy = _runs.fp_checkpoint(args)

  bits_list = [int(b) for b in args.bits.split(",")]
  optimizers = args.optimizers.split(",")
  table = {}
  for bits in bits_list:
    for optimizer in optimizers:
      for schedule in ("lr", "tr"):
        accuracies, reestimated, seconds = [], [], []
        for seed in range(args.seeds):
          result = _runs.train(args, args.out, weight_bits=bits, act_bits=bits, optimizer=optimizer,
                          schedule=schedule, target_tr=args.target_tr, seed=seed,
                          init_from=checkpoint)
          accuracies.append(result["final_test_accuracy"])
          reestimated.append(result.get("final_test_accuracy_bn_reestimated", np.nan))
          seconds.append(result["train_seconds"])
          print(f"W{bits}A{bits} {optimizer:5s} {schedule}: seed {seed} "
                f"acc {accuracies[-1]:.4f} (BN re-est. {reestimated[-1]:.4f})", flush=True)
        table[(bits, optimizer, schedule)] = {
            "accuracy": _runs.mean_std(accuracies), "bn_reestimated": _runs.mean_std(reestimated),
            "seconds": float(np.mean(seconds)), "runs": accuracies}

  sweep = {}
  sweep_bits = bits_list[0]
  for target in [float(t) for t in args.sweep.split(",")]:
    accuracies = []
    for seed in range(args.sweep_seeds):
      result = _runs.train(args, args.out, weight_bits=sweep_bits, act_bits=sweep_bits, optimizer="adam",
                      schedule="tr", target_tr=target, seed=seed, init_from=checkpoint,
                      tag=f"sweep-R{target:g}-s{seed}")
      accuracies.append(result["final_test_accuracy"])
      transitions = result["transitions"]
    running = np.asarray(transitions["running_transition_rate"])
    sweep[target] = {"accuracy": _runs.mean_std(accuracies),
                     "running_tr_mid": float(np.mean(running[len(running) // 2])),
                     "talr_mid": float(np.mean(np.asarray(transitions["talr_multiplier"])[len(running) // 2]))}
    print(f"sweep R0={target:g}: acc {sweep[target]['accuracy'][0]:.4f}", flush=True)
  elapsed = time.perf_counter() - start

  lines = [f"Model `{args.model}` on `{args.dataset}`: FP checkpoint ({args.fp_epochs} epochs, Adam)"
           f" test accuracy **{fp_accuracy:.4f}**; QAT {args.epochs} epochs from it"
           f"{f' (at most {args.max_steps_per_epoch} steps/epoch)' if args.max_steps_per_epoch else ''},"
           f" batch {args.batch_size}, {args.seeds} seed(s), target R_0 = {args.target_tr:g} (cosine),"
           f" frozen weight scales, first conv and last linear in FP. Total {elapsed / 60:.1f} min.", "",
           "| bits | optimizer | cosine LR | TR scheduling | LR, BN re-est. | TR, BN re-est. |",
           "|---|---|---|---|---|---|"]
  for bits in bits_list:
    for optimizer in optimizers:
      lr, tr = table[(bits, optimizer, "lr")], table[(bits, optimizer, "tr")]
      cell = lambda s: f"{100 * s[0]:.2f} ± {100 * s[1]:.2f}"
      lines.append(f"| W{bits}A{bits} | {optimizer} | {cell(lr['accuracy'])} | {cell(tr['accuracy'])} |"
                   f" {cell(lr['bn_reestimated'])} | {cell(tr['bn_reestimated'])} |")
  lines += ["", f"Sweep of R_0 (W{sweep_bits}A{sweep_bits}, Adam, {args.sweep_seeds} seed(s)):", "",
            "| R_0 | accuracy | running TR at mid-training | mean TALR u at mid-training |",
            "|---|---|---|---|"]
  for target, row in sweep.items():
    lines.append(f"| {target:g} | {100 * row['accuracy'][0]:.2f} ± {100 * row['accuracy'][1]:.2f} |"
                 f" {row['running_tr_mid']:.2e} | {row['talr_mid']:.3f} |")
  summary = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"fp_accuracy": fp_accuracy, "seconds": elapsed,
               "table": {f"W{b}A{b}-{o}-{s}": v for (b, o, s), v in table.items()},
               "sweep": {f"{t:g}": v for t, v in sweep.items()}, "args": vars(args)}, f, indent=2)
  plot(args.out)
  print("\n" + summary)
  return table, sweep


if __name__ == "__main__":
  main()
