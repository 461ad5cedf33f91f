"""Quantization-aware training of NNX models with LR scheduling or TR scheduling.

Examples:

    # full-precision checkpoint, then W2A2 QAT from it with TR scheduling
    python examples/train_qat.py --model cnn --dataset fashion-mnist --data-dir DIR \
        --weight-bits 0 --act-bits 0 --epochs 5 --save fp_cnn.npz
    python examples/train_qat.py --model cnn --dataset fashion-mnist --data-dir DIR \
        --init-from fp_cnn.npz --weight-bits 2 --act-bits 2 --optimizer adam \
        --schedule tr --target-tr 5e-3 --epochs 5

``--schedule lr`` is the baseline: the optimizer with a cosine learning rate for
every parameter. ``--schedule tr`` gives the quantized kernels ``optimizer ->
trquant.tr_schedule`` with a cosine target transition rate (the optimizer's LR is
the TALR's U_0) and everything else (biases, BatchNorm, activation scales,
full-precision layers) the cosine LR. Weight scales are frozen in both modes
(``weight_quantizer="fixed"``), so the two schedules are compared on equal terms.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data as datasets  # noqa: E402  (examples/data.py)
import models  # noqa: E402  (examples/models.py)

import trquant  # noqa: E402

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 3e-4}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="cnn", choices=models.MODEL_NAMES)
  parser.add_argument("--dataset", default="digits", choices=datasets.DATASET_NAMES)
  parser.add_argument("--data-dir", default=None, help="dataset folder (default: $TRQUANT_DATA_DIR)")
  parser.add_argument("--weight-bits", type=int, default=2, help="0 = full precision")
  parser.add_argument("--act-bits", type=int, default=2, help="0 = full precision")
  parser.add_argument("--first-last", default="fp", choices=["fp", "8bit", "same"])
  parser.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
  parser.add_argument("--optimizer", default="adam", choices=sorted(DEFAULT_LR))
  parser.add_argument("--lr", type=float, default=None, help="initial LR (U_0); default per optimizer")
  parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
  parser.add_argument("--weight-decay", type=float, default=1e-4)
  parser.add_argument("--schedule", default="lr", choices=["lr", "tr"])
  parser.add_argument("--target-tr", type=float, default=5e-3, help="initial target transition rate R_0")
  parser.add_argument("--controller", default="log", choices=["log", "additive", "momentum"])
  parser.add_argument("--eta", type=float, default=None, help="controller gain (default: its own)")
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="truncate epochs (quick runs)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--init-from", default=None, help="FP checkpoint (.npz) to start QAT from")
  parser.add_argument("--save", default=None, help="write the trained model's weights here (.npz)")
  parser.add_argument("--bn-reestimate", type=int, default=50,
                      help="batches for BatchNorm re-estimation before the final evaluation (0: off)")
  parser.add_argument("--out", default="outputs", help="directory for results JSON and plots")
  parser.add_argument("--tag", default=None, help="name of this run's files (default: derived)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--no-plot", action="store_true")
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Checkpoints: weights and BatchNorm statistics as a flat .npz keyed by state path
# ---------------------------------------------------------------------------------------


def _flat_variables(model):
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {"/".join(map(str, path)): variable for path, variable in nnx.to_flat_state(state)}


def save_checkpoint(model, path):
  arrays = {key: np.asarray(variable.get_value()) for key, variable in _flat_variables(model).items()}
  np.savez(path, **arrays)


def load_checkpoint(model, path):
  """Loads matching entries; a quantized model keeps its own scales. Returns the keys loaded."""
  with np.load(path) as saved:
    return trquant.nnx.load_float_weights(model, dict(saved))


# ---------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------


def make_optimizer(name, learning_rate, *, momentum, weight_decay):
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def make_transform(args, model, total_steps):
  lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
  cosine_lr = optax.cosine_decay_schedule(lr, total_steps)
  opt = lambda rate: make_optimizer(args.optimizer, rate, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
  if args.schedule == "lr":
    return opt(cosine_lr)
  target = optax.cosine_decay_schedule(args.target_tr, total_steps)
  quant = optax.chain(opt(lr), trquant.tr_schedule(
      target, codes_fn=trquant.nnx.codes_fn(model), controller=args.controller, eta=args.eta))
  return optax.partition({"quant": quant, "float": opt(cosine_lr)}, trquant.nnx.param_labels(model))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def evaluate(model, images, labels, batch_size=1000):
  model.eval()

  @nnx.jit
  def correct(model, x, y):
    return jnp.sum(jnp.argmax(model(x), -1) == y)

  total = 0
  for start in range(0, len(images), batch_size):
    total += int(correct(model, jnp.asarray(images[start:start + batch_size]),
                         jnp.asarray(labels[start:start + batch_size])))
  return total / len(images)


def run(args):
  """Trains one model as configured; returns the results dictionary."""
  quantized = bool(args.weight_bits or args.act_bits)
  dataset = datasets.normalize(datasets.load_dataset(args.dataset, args.data_dir))
  model = models.build_model(
      args.model, num_classes=dataset.num_classes, in_channels=dataset.image_shape[-1],
      weight_bits=args.weight_bits or None, act_bits=args.act_bits or None,
      first_last=args.first_last, per_channel=args.per_channel,
      image_size=dataset.image_shape[0], rngs=nnx.Rngs(args.seed))
  rng = np.random.default_rng(args.seed)
  if args.init_from:
    load_checkpoint(model, args.init_from)
  if quantized:
    trquant.nnx.init_weight_scales(model)  # from the (loaded) FP weights
    model.eval()  # calibrate with the checkpoint's BatchNorm statistics, leaving them as they are
    trquant.nnx.calibrate_activations(model, jnp.asarray(dataset.train_images[:256]))

  steps_per_epoch = len(dataset.train_images) // args.batch_size
  if args.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
  total_steps = args.epochs * steps_per_epoch
  if args.schedule == "tr" and not args.weight_bits:
    raise SystemExit("--schedule tr needs quantized weights (--weight-bits > 0)")
  tx = make_transform(args, model, total_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tracks_tr = args.schedule == "tr"

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    if not tracks_tr:
      return loss, {}
    return loss, trquant.nnx.transition_stats(optimizer)

  history = {"epoch": [], "train_loss": [], "test_accuracy": [], "seconds": []}
  steps = []
  start = time.perf_counter()
  bar = tqdm(total=total_steps, disable=args.no_progress, desc=run_name(args), leave=False)
  for epoch in range(args.epochs):
    model.train()
    losses = []
    batches = datasets.batches(dataset.train_images, dataset.train_labels, args.batch_size, rng=rng)
    for _, (x, y) in zip(range(steps_per_epoch), batches):
      loss, record = train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
      losses.append(loss)
      steps.append(record)
      bar.update()
    accuracy = evaluate(model, dataset.test_images, dataset.test_labels)
    history["epoch"].append(epoch + 1)
    history["train_loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_accuracy"].append(accuracy)
    history["seconds"].append(time.perf_counter() - start)
    line = (f"{run_name(args)} epoch {epoch + 1}/{args.epochs}  loss {history['train_loss'][-1]:.4f}"
            f"  test acc {accuracy:.4f}")
    if tracks_tr:
      last = jax.device_get(steps[-1])
      line += (f"  target {float(last['target_transition_rate']):.2e}"
               f"  running TR {np.mean(last['running_transition_rate']):.2e}"
               f"  TALR {np.mean(last['talr_multiplier']):.3f}")
    tqdm.write(line)
  bar.close()

  results = {"args": vars(args), "history": history, "final_test_accuracy": history["test_accuracy"][-1],
             "train_seconds": time.perf_counter() - start}
  if args.bn_reestimate and quantized:
    batches = datasets.batches(dataset.train_images, dataset.train_labels, args.batch_size, rng=rng)
    trquant.nnx.reestimate_batchnorm(model, batches, num_batches=args.bn_reestimate)
    results["final_test_accuracy_bn_reestimated"] = evaluate(
        model, dataset.test_images, dataset.test_labels)
  if tracks_tr:
    records = jax.device_get(steps)
    results["transitions"] = {key: np.stack([r[key] for r in records]).tolist()
                              for key in records[0]}
  if args.save:
    save_checkpoint(model, args.save)
  return results


def run_name(args):
  if args.tag:
    return args.tag
  bits = f"W{args.weight_bits or 32}A{args.act_bits or 32}"
  sched = f"{args.schedule}" + (f"-R{args.target_tr:g}" if args.schedule == "tr" else "")
  return f"{args.model}-{args.dataset}-{bits}-{args.optimizer}-{sched}-s{args.seed}"


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  transitions = results.get("transitions")
  panels = 3 if transitions else 1
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
  axes = axes[0]
  history = results["history"]
  axes[-1].plot(history["epoch"], history["test_accuracy"], marker="o")
  axes[-1].set(xlabel="epoch", ylabel="test accuracy", title="Accuracy")
  if transitions:
    running = np.asarray(transitions["running_transition_rate"])
    multiplier = np.asarray(transitions["talr_multiplier"])
    axes[0].plot(transitions["target_transition_rate"], "k--", label="target R")
    for layer in range(running.shape[1]):
      axes[0].plot(running[:, layer], lw=0.8, label=f"layer {layer}")
      axes[1].plot(multiplier[:, layer], lw=0.8, label=f"layer {layer}")
    axes[0].set(xlabel="step", ylabel="running transition rate", title="Transition rate")
    axes[1].set(xlabel="step", ylabel="u (x U_0)", title="TALR multiplier", yscale="log")
    if running.shape[1] <= 12:
      axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  results = run(args)
  os.makedirs(args.out, exist_ok=True)
  name = run_name(args)
  with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(results, f)
  if not args.no_plot:
    plot(results, os.path.join(args.out, f"{name}.png"))
  summary = f"{name}: final test accuracy {results['final_test_accuracy']:.4f}"
  if "final_test_accuracy_bn_reestimated" in results:
    summary += f" (BN re-estimated: {results['final_test_accuracy_bn_reestimated']:.4f})"
  print(summary + f", {results['train_seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
