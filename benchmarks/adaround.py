"""AdaRound vs round-to-nearest post-training weight quantization, and the fused loop's speed.

For each model (a small CNN and ResNet-20 by default), trains a full-precision
checkpoint with trquant_examples.training (or reuses the one in ``--out``), then for
W4/W3/W2 weight-only quantization with per-tensor and per-channel MSE scales
reports the test accuracy of the FP model, of round-to-nearest and of AdaRound
(``trquant.adaround.reconstruct_model(granularity="layer")``) from ``--calibration`` training images,
over ``--seeds`` calibration draws / keys, and the wall time per layer. Finally
times one layer's reconstruction as the fused loop (one jitted ``lax.scan``, as
``reconstruct_layer`` runs it) against the same steps run eagerly (a Python
loop calling a jitted single step). Writes summary.md, summary.json and
summary.png to ``--out``.

    python benchmarks/adaround.py --dataset fashion-mnist --data-dir DIR \\
        --out benchmarks/results/adaround
    python benchmarks/adaround.py --quick      # digits, tiny, under a minute: used by the tests
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import _runs  # benchmarks/_runs.py, next to this script
import trquant
from trquant import adaround
# The per-layer timing below drives one reconstruction problem itself: private pieces.
from trquant._src.adaround import data as adaround_data
from trquant._src.adaround import reconstruction as adaround_reconstruction
from trquant._src.adaround import units as adaround_units
from trquant_examples import datasets
from trquant_examples import models
from trquant_examples.checkpoints import load_checkpoint
from trquant_examples.config import parse_first_last
from trquant_examples.training import evaluate

GRANULARITIES = ("tensor", "channel")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="cnn,resnet20")
  parser.add_argument("--dataset", default="fashion-mnist")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $TRQUANT_DATA_DIR)")
  parser.add_argument("--fp-epochs", default="3,2", help="FP training epochs, one per model")
  parser.add_argument("--max-steps-per-epoch", type=int, default=150,
                      help="truncate the FP epochs (0: full epochs)")
  parser.add_argument("--batch-size", type=int, default=128, help="FP training batch size")
  parser.add_argument("--bits", default="4,3,2")
  parser.add_argument("--granularity", default="tensor,channel")
  parser.add_argument("--first-last", type=parse_first_last, default=8,
                      help='first conv and last linear layer: a bit width, "same" (as --bits)'
                      ' or "fp"')
  parser.add_argument("--calibration", type=int, default=1024, help="calibration images")
  parser.add_argument("--iters", default="1000,500", help="AdaRound iterations per layer, per model")
  parser.add_argument("--seeds", default="3,1", help="calibration draws / keys, per model")
  parser.add_argument("--ada-batch-size", type=int, default=32)
  parser.add_argument("--lam", type=float, default=0.01)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--timing-iters", type=int, default=500,
                      help="iterations of the fused-vs-eager timing (0: skip it)")
  parser.add_argument("--out", default="benchmarks/results/adaround")
  parser.add_argument("--retrain", action="store_true", help="train the FP checkpoints even if present")
  parser.add_argument("--plot-only", action="store_true", help="redraw summary.png from summary.json")
  parser.add_argument("--quick", action="store_true",
                      help="digits, cnn, tiny iterations, 1 seed: checks the pipeline in < 1 minute")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.dataset, args.fp_epochs, args.max_steps_per_epoch = "cnn", "digits", "2", 10
    args.batch_size, args.bits, args.calibration, args.iters, args.seeds = 64, "3", 256, "60", "1"
    args.timing_iters = 40
  return args


def _per_model(value: str, names: list[str], cast=int) -> dict:
  values = [cast(v) for v in value.split(",")]
  if len(values) == 1:
    values = values * len(names)
  if len(values) < len(names):
    raise SystemExit(f"need one value per model ({names}), got {value!r}")
  return dict(zip(names, values))


def fp_model(args, name, dataset, fp_epochs):
  """Builds the FP model and loads (training it first if needed) its checkpoint."""
  checkpoint = os.path.join(args.out, f"fp_{name}_{args.dataset}.npz")
  if args.retrain or not os.path.exists(checkpoint):
    run_args = argparse.Namespace(
        model=name, dataset=args.dataset, epochs=fp_epochs, fp_epochs=fp_epochs,
        batch_size=args.batch_size, data_dir=args.data_dir, out=args.out,
        max_steps_per_epoch=args.max_steps_per_epoch or None, bn_reestimate=None)
    _runs.fp_checkpoint(run_args)
  model = models.build_model(name, num_classes=dataset.num_classes,
                             in_channels=dataset.image_shape[-1], weight_bits=None, act_bits=None,
                             image_size=dataset.image_shape[0],
                             rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  load_checkpoint(model, checkpoint)
  model.eval()
  return model


def accuracy(model, dataset):
  return evaluate(model, dataset.test_images, dataset.test_labels)


def ptq_model(model, example, *, weight_bits, act_bits=None, per_channel, first_last):
  """The FP model quantized by the rules of one setting, as the PTQ drivers take it:
  ``weight_bits`` (and ``act_bits``) everywhere, the first and last layer called at
  ``first_last`` bits (``"fp"``: in full precision; ``"same"``: as the rest)."""
  rules = []
  if first_last != "same":
    edge_bits = None if first_last == "fp" else first_last
    rules.append(trquant.nnx.first_last_rule(
        model, example, weight_bits=edge_bits, per_channel=per_channel,
        act_bits=edge_bits if act_bits is not None else None))
  rules.append(trquant.nnx.QuantRule(weight_bits=weight_bits, act_bits=act_bits,
                                     per_channel=per_channel))
  return trquant.nnx.quantize_model(model, rules)


def calibration_batches(dataset, size, seed, batch=256):
  index = np.random.default_rng(seed).choice(len(dataset.train_images), size, replace=False)
  images = dataset.train_images[np.sort(index)]
  return [images[i:i + batch] for i in range(0, size, batch)]


def _time_loops(apply_fn, w, scale, x, y, *, bits, iters, batch_size):
  """Iterations/s of the fused scan and of a Python loop over a jitted step, compile excluded."""
  config = adaround.AdaRoundConfig(iters=iters, batch_size=batch_size)  # paper defaults otherwise
  problem, arrays = adaround_reconstruction.reconstruction_problem(
      adaround_reconstruction.LayerAsBlock(apply_fn), w, scale, x, y, weight_bits=bits, config=config,
      key=jax.random.key(0))
  fused = jax.jit(problem.run).lower(arrays).compile()
  jax.block_until_ready(fused(arrays))  # warm
  start = time.perf_counter()
  ((V_fused,), _), _ = jax.block_until_ready(fused(arrays)[0])
  fused_seconds = time.perf_counter() - start
  step = jax.jit(problem.step)
  carry = problem.init(arrays)
  jax.block_until_ready(step(carry, jnp.int32(0), arrays))  # compile
  start = time.perf_counter()
  for t in range(iters):
    carry, _ = step(carry, jnp.int32(t), arrays)
  ((V_eager,), _), _ = jax.block_until_ready(carry)
  eager_seconds = time.perf_counter() - start
  same_codes = float(jnp.mean((V_fused >= 0) == (V_eager >= 0)))
  return {"iters": iters, "fused_its": iters / fused_seconds, "eager_its": iters / eager_seconds,
          "speedup": eager_seconds / fused_seconds, "same_rounding": same_codes}


def timing(args, model, dataset, bits):
  """Fused vs eager reconstruction of the model's largest conv and of its last layer."""
  fp = adaround_units.float_copy(model)
  batches = calibration_batches(dataset, args.calibration, 0)
  layers = dict(trquant.nnx.quant_layers(fp))
  convs = [(path, layer) for path, layer in layers.items() if isinstance(layer, trquant.nnx.QuantConv)]
  big_path, big = max(convs, key=lambda item: item[1].kernel.get_value().size)
  head_path = [path for path, layer in layers.items() if isinstance(layer, trquant.nnx.QuantLinear)][-1]
  rows = []
  cases = [(big_path, big, adaround_units.layer_apply_fn(big, patches=True), "conv as patches @ kernel",
            args.timing_iters),
           (head_path, layers[head_path], adaround_units.layer_apply_fn(layers[head_path]), "linear",
            args.timing_iters)]
  # The plain lax.conv form: XLA:CPU runs its kernel gradient ~30x slower inside a loop.
  graphdef, kernel_state, rest = nnx.split(big, trquant.nnx.QuantWeight, ...)
  native = lambda w, x: nnx.merge(graphdef, jax.tree.map(lambda _: w, kernel_state), rest)(x)
  cases.append((big_path, big, native, "conv via lax.conv_general_dilated",
                max(args.timing_iters // 5, 10)))
  for path, layer, apply_fn, form, iters in cases:
    x = adaround_data.layer_data(fp, layer, batches, output=False)
    y = adaround_data.layer_data(fp, layer, batches, output=True)
    w = layer.kernel.get_value()
    scale = trquant.init_scale(w, bits=bits, method="mse")
    row = _time_loops(apply_fn, w, scale, x, y, bits=bits, iters=iters,
                      batch_size=args.ada_batch_size)
    row.update(layer="/".join(map(str, path)), form=form, weights=int(w.size))
    rows.append(row)
    print(f"timing {row['layer']} ({form}): fused {row['fused_its']:.1f} it/s, eager"
          f" {row['eager_its']:.1f} it/s, ratio {row['speedup']:.2f}", flush=True)
  return rows


def run_model(args, name, dataset, *, fp_epochs, iters, seeds):
  model = fp_model(args, name, dataset, fp_epochs)
  fp_accuracy = accuracy(model, dataset)
  print(f"{name}: FP test accuracy {fp_accuracy:.4f}", flush=True)
  bits_list = [int(b) for b in args.bits.split(",")]
  granularities = args.granularity.split(",")
  first_last = args.first_last
  example = dataset.train_images[:1]
  rows, layer_times = {}, {}
  for granularity in granularities:
    per_channel = granularity == "channel"
    for bits in bits_list:
      ruled = ptq_model(model, example, weight_bits=bits, per_channel=per_channel,
                        first_last=first_last)
      nearest = adaround.round_to_nearest(ruled).model
      nearest_accuracy = accuracy(nearest, dataset)
      accuracies, errors = [], []
      for seed in range(seeds):
        start = time.perf_counter()
        quantized, reports = adaround.reconstruct_model(
            ruled, calibration_batches(dataset, args.calibration, seed), granularity="layer",
            fallback_to_nearest=False,
            config=adaround.AdaRoundConfig(iters=iters, batch_size=args.ada_batch_size,
                                           lam=args.lam, lr=args.lr),
            key=jax.random.key(seed), progress=not args.quick)
        seconds = time.perf_counter() - start
        accuracies.append(accuracy(quantized, dataset))
        errors.append([r.reconstructed_error / max(r.nearest_error, 1e-12) for r in reports])
        for report in reports:
          entry = layer_times.setdefault(report.name, {"bits": [], "seconds": [], "capture": [],
                                                       "flipped": []})
          entry["bits"].append(report.weight_bits[0])
          entry["seconds"].append(report.seconds)
          entry["capture"].append(report.capture_seconds)
          entry["flipped"].append(report.flipped_fraction)
        print(f"{name} W{bits} per-{granularity}: nearest {nearest_accuracy:.4f}, AdaRound seed"
              f" {seed} {accuracies[-1]:.4f} ({seconds:.0f} s)", flush=True)
      rows[f"W{bits}-{granularity}"] = {
          "bits": bits, "granularity": granularity, "nearest": nearest_accuracy,
          "adaround": _runs.mean_std(accuracies), "runs": accuracies,
          "error_ratio_per_layer": np.mean(errors, axis=0).tolist(),
          "seconds": seconds}
  layers = {layer: {"runs": len(v["seconds"]), "mean_seconds": float(np.mean(v["seconds"])),
                    "mean_capture_seconds": float(np.mean(v["capture"])),
                    "mean_flipped": float(np.mean(v["flipped"]))}
            for layer, v in layer_times.items()}
  return {"fp_accuracy": fp_accuracy, "iters": iters, "seeds": seeds, "fp_epochs": fp_epochs,
          "table": rows, "layers": layers, "layer_order": list(layer_times)}


def plot(out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  results = summary["models"]
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
  for axis, (name, result) in zip(axes[0], results.items()):
    for granularity, style in (("tensor", "-"), ("channel", "--")):
      rows = sorted((row for row in result["table"].values() if row["granularity"] == granularity),
                    key=lambda row: row["bits"])
      if not rows:
        continue
      bits = [row["bits"] for row in rows]
      axis.plot(bits, [100 * row["nearest"] for row in rows], "o" + style, color="C0",
                label=f"nearest, per-{granularity}")
      axis.errorbar(bits, [100 * row["adaround"][0] for row in rows],
                    yerr=[100 * row["adaround"][1] for row in rows], fmt="s" + style, color="C1",
                    capsize=3, label=f"AdaRound, per-{granularity}")
    axis.axhline(100 * result["fp_accuracy"], color="k", ls=":", label="FP")
    axis.set_xticks(sorted({row["bits"] for row in result["table"].values()}))
    axis.set_xlabel("weight bits")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"{name}: {result['iters']} iters/layer, {result['seeds']} seed(s)")
    axis.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "summary.png"), dpi=110)
  plt.close(fig)


def _summary(args, results, timings, elapsed, command):
  first_last = {"same": "same bits as the body", "fp": "in full precision"}.get(
      args.first_last, f"{args.first_last}-bit")
  lines = [
      f"AdaRound vs round-to-nearest, weight-only post-training quantization on `{args.dataset}`"
      f" ({args.calibration} calibration images drawn from the training set per seed, batch"
      f" {args.ada_batch_size}, lambda {args.lam:g}, Adam lr {args.lr:g}, warm-up 20%, beta"
      f" 20 -> 2 cosine; MSE step sizes for both methods; first conv and last linear layer"
      f" {first_last}; activations FP; no BatchNorm re-estimation). Conv layers are"
      f" reconstructed at their pre-BatchNorm output, without activation in the loss."
      f" Total {elapsed / 60:.1f} min on this machine (2 shared CPU cores).", "",
      f"Command: `{command}`", ""]
  for name, result in results.items():
    lines += [f"### {name}", "",
              f"FP checkpoint: {result['fp_epochs']} epoch(s) of Adam"
              f"{f' (at most {args.max_steps_per_epoch} steps each)' if args.max_steps_per_epoch else ''},"
              f" test accuracy **{100 * result['fp_accuracy']:.2f}%**. AdaRound:"
              f" **{result['iters']} iterations per layer** (the paper uses 10k), {result['seeds']}"
              f" seed(s).", "",
              "| weights | scales | FP | nearest | AdaRound (mean ± std) | AdaRound / nearest layer error (mean over layers) |",
              "|---|---|---|---|---|---|"]
    for row in result["table"].values():
      mean, std = row["adaround"]
      lines.append(f"| W{row['bits']} | per-{row['granularity']} | {100 * result['fp_accuracy']:.2f} |"
                   f" {100 * row['nearest']:.2f} | {100 * mean:.2f} ± {100 * std:.2f} |"
                   f" {np.mean(row['error_ratio_per_layer']):.3f} |")
    lines += ["", "Wall time per layer (mean over all runs above; reconstruction includes"
              " compilation, capture = collecting the layer's inputs and FP outputs over the"
              " calibration set):", "",
              "| layer | reconstruction (s) | capture (s) | codes flipped vs nearest |",
              "|---|---|---|---|"]
    for layer in result["layer_order"]:
      row = result["layers"][layer]
      lines.append(f"| {layer} | {row['mean_seconds']:.1f} | {row['mean_capture_seconds']:.1f} |"
                   f" {100 * row['mean_flipped']:.1f}% |")
    lines.append("")
  if timings:
    lines += ["### Fused loop vs eager loop", "",
              "One layer's reconstruction (W4, per-tensor, batch"
              f" {args.ada_batch_size}), compilation excluded: the whole loop in one jitted"
              " `lax.scan` (fused, as `reconstruct_layer` runs it) vs a Python loop calling a"
              " jitted single step (eager, same step function and batches).", "",
              "| layer | form | weights | iterations | fused (it/s) | eager (it/s) | eager time / fused time | same rounding |",
              "|---|---|---|---|---|---|---|---|"]
    for row in timings:
      lines.append(f"| {row['layer']} | {row['form']} | {row['weights']} | {row['iters']} |"
                   f" {row['fused_its']:.1f} | {row['eager_its']:.1f} | {row['speedup']:.2f} |"
                   f" {100 * row['same_rounding']:.1f}% |")
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.plot_only:
    plot(args.out)
    return None
  command = "python benchmarks/adaround.py " + " ".join(sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  dataset = datasets.normalize(datasets.load_dataset(args.dataset, args.data_dir))
  names = args.models.split(",")
  fp_epochs = _per_model(args.fp_epochs, names)
  iters = _per_model(args.iters, names)
  seeds = _per_model(args.seeds, names)
  results = {}
  for name in names:
    results[name] = run_model(args, name, dataset, fp_epochs=fp_epochs[name], iters=iters[name],
                              seeds=seeds[name])
  timings = []
  if args.timing_iters:
    timings = timing(args, fp_model(args, names[0], dataset, fp_epochs[names[0]]), dataset, bits=4)
  elapsed = time.perf_counter() - start
  summary = _summary(args, results, timings, elapsed, command)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"models": results, "timing": timings, "seconds": elapsed, "command": command,
               "args": vars(args)}, f, indent=2)
  plot(args.out)
  print("\n" + summary)
  return {"models": results, "timing": timings}


if __name__ == "__main__":
  main()
