"""Probe of the TALR run-away seen in `tr_long.py`, with and without the windup guard.

Trains the first ``--steps`` of the 80K-step schedule of `tr_long.py`'s BN MLP (3 seeds
side by side, the same FP checkpoint), Adam or SGD + `tr_schedule` (cosine target from
R_0 = 5e-3), in the benchmark's default recipe (MSE scales, no weight decay for Adam:
where the loop ran away), with `windup_guard=False` (the earlier behaviour) and with the
guard (the default), and prints per window of the run: the transition rate, the TALR
multiplier, its ceiling, the fraction of latent weights beyond the grid (zero
straight-through gradient) and the guard's events.

    python benchmarks/tr_long_windup.py --data-dir ../shared/data
    python benchmarks/tr_long_windup.py --data-dir ../shared/data --steps 80000 --bits 1 --out DIR
"""

import argparse
import json
import os

import numpy as np
import optax
from flax import nnx

import tr_long  # benchmarks/tr_long.py, next to this script

import trquant  # noqa: E402


def probe(data, num_classes, fp_path, *, bits, optimizer, guard, steps, total, seeds, r0):
  model = tr_long.BNMLP(data[0].shape[1], 64, num_classes, bits=bits, rngs=nnx.Rngs(0))
  trquant.nnx.load_float_weights(model, dict(np.load(fp_path)))
  trquant.nnx.init_weight_scales(model)
  model.eval()
  trquant.nnx.calibrate_activations(model, data[0][:512])
  model.train()
  config = dict(schedule="tr", weight_quantizer="fixed", controller="log", r0=r0)
  tx, _ = tr_long.make_transform(model, optimizer=optimizer, lr=tr_long.DEFAULT_LR[optimizer],
                                 total_steps=total, weight_decay=1e-4, windup_guard=guard, **config)
  _, records, evals = tr_long.train(model, tx, data, steps=steps, eval_every=min(2000, steps),
                                    batch_size=128, seeds=seeds)
  return records, evals


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", default="benchmarks/results/tr_long_windup")
  parser.add_argument("--fp-dir", default="benchmarks/results/tr_long_mlp",
                      help="folder of tr_long.py's MLP FP checkpoint (trained there if missing)")
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--total-steps", type=int, default=80_000)
  parser.add_argument("--bits", default="1,2")
  parser.add_argument("--optimizers", default="adam")
  parser.add_argument("--target-tr", type=float, default=5e-3)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--windows", type=int, default=8)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  bench_args = tr_long.parse_args(["--data-dir", args.data_dir or "", "--out", args.fp_dir])
  data, num_classes = tr_long.load_data(bench_args)
  fp_path, fp_accuracy = tr_long.fp_checkpoint(bench_args, data, num_classes, print)
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for bits in map(int, args.bits.split(",")):
    for optimizer in args.optimizers.split(","):
      for guard in (False, True):
        records, evals = probe(data, num_classes, fp_path, bits=bits, optimizer=optimizer,
                               guard=guard, steps=args.steps, total=args.total_steps, seeds=seeds,
                               r0=args.target_tr)
        name = f"W{bits}A{bits} {optimizer} R0={args.target_tr:g} guard={'on' if guard else 'off'}"
        print(f"{name}: test accuracy {np.round(evals[-1][1], 4).tolist()} at step {args.steps}")
        windows = np.array_split(np.arange(args.steps), args.windows)
        row = {"bits": bits, "optimizer": optimizer, "guard": guard, "r0": args.target_tr,
               "steps": args.steps, "total_steps": args.total_steps, "seeds": seeds,
               "fp_accuracy": fp_accuracy, "final_test_accuracy": evals[-1][1],
               "eval_curve": evals, "windows": []}
        for w in windows:
          part = {key: records[key][w] for key in ("transition_rate", "talr_multiplier",
                                                    "multiplier_ceiling", "beyond_range")}
          entry = {"steps": [int(w[0]), int(w[-1]) + 1],
                   "transition_rate": float(part["transition_rate"].mean()),
                   "talr_multiplier": float(part["talr_multiplier"].mean()),
                   "multiplier_ceiling": float(np.median(part["multiplier_ceiling"])),
                   "beyond_grid": float(part["beyond_range"].mean()),
                   "windup_events": int(records["windup_events"][w[-1]].sum())}
          row["windows"].append(entry)
          print(f"  steps {entry['steps'][0]:>6}-{entry['steps'][1]:<6} k {entry['transition_rate']:.2e}"
                f"  u {entry['talr_multiplier']:8.2f}  ceiling {entry['multiplier_ceiling']:8.1f}"
                f"  beyond the grid {entry['beyond_grid'] * 100:5.1f}%  events {entry['windup_events']}",
                flush=True)
        rows.append(row)
        with open(os.path.join(args.out, f"W{bits}A{bits}-{optimizer}-steps{args.steps}"
                               f"-guard{'on' if guard else 'off'}.json"), "w") as f:
          json.dump(row, f)


if __name__ == "__main__":
  main()
