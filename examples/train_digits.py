"""Quantization-aware training of a 2-bit MLP on scikit-learn's digits: TR scheduling vs LR scheduling.

Trains a full-precision MLP, then fine-tunes it twice from the same checkpoint
with 2-bit weights (frozen per-tensor scales) and LSQ-quantized activations:

* ``lr``: Adam with a cosine learning-rate schedule (the usual recipe);
* ``tr``: Adam followed by ``trquant.tr_schedule``, whose cosine schedule sets the
  target fraction of quantized weights that change level per step.

Biases and activation scales get Adam with the cosine LR in both runs (through
``optax.partition``). Prints per-epoch accuracy and a results table, and writes
a plot (target vs running transition rate, TALR multiplier per layer, accuracy)
and a JSON file.

    python examples/train_digits.py --epochs 60 --seeds 3 --out outputs
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import trquant


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=60, help="QAT epochs per run")
  parser.add_argument("--fp-epochs", type=int, default=20, help="full-precision pre-training epochs")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
  parser.add_argument("--weight-bits", type=int, default=2)
  parser.add_argument("--act-bits", type=int, default=4, help="0 keeps activations in full precision")
  parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (initial)")
  parser.add_argument("--target-tr", type=float, default=3e-3, help="initial target transition rate")
  parser.add_argument("--controller", default="log", choices=["log", "additive", "momentum"])
  parser.add_argument("--eta", type=float, default=None, help="controller gain (None: its default)")
  parser.add_argument("--noise", type=float, default=0.3, help="std of Gaussian input noise (augmentation)")
  parser.add_argument("--label-smoothing", type=float, default=0.1)
  parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...); plots use seed 0")
  parser.add_argument("--out", default="outputs", help="directory for the plot and results JSON")
  parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------


def load_data(seed):
  images, labels = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(images))
  images = (images[order] / 16.0).astype(np.float32)
  labels = labels[order].astype(np.int32)
  split = 1400
  return (images[:split], labels[:split]), (images[split:], labels[split:])


def init_mlp(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
        "kernel": jax.random.normal(keys[i], (n_in, n_out)) * np.sqrt(2.0 / n_in),
        "bias": jnp.zeros(n_out),
    }
    if i > 0:  # input of a hidden or output layer: a post-ReLU activation
      params[f"layer{i}"]["act_scale"] = jnp.ones(())
  return params


class Quantization:
  """Frozen weight scales (as TR scheduling requires) and the quantized forward pass."""

  def __init__(self, params, weight_bits, act_bits):
    self.weight_bits = weight_bits
    self.act_bits = act_bits
    self.weight_scales = {
        name: trquant.init_scale(layer["kernel"], bits=weight_bits, method="mse")
        for name, layer in params.items()
    }

  def codes_fn(self, params):
    """Integer codes of the quantized kernels; None for everything else."""
    return {
        name: {
            key: trquant.quantize(value, self.weight_scales[name], bits=self.weight_bits)
            if key == "kernel" else None
            for key, value in layer.items()
        }
        for name, layer in params.items()
    }

  def apply(self, params, x):
    for i, name in enumerate(sorted(params)):
      layer = params[name]
      if self.act_bits and "act_scale" in layer:
        x = trquant.lsq(x, layer["act_scale"], bits=self.act_bits, signed=False,
                        grad_scale=1.0 / np.sqrt(x.shape[-1] * (2**self.act_bits - 1)))
      kernel = trquant.fake_quant(layer["kernel"], self.weight_scales[name], bits=self.weight_bits)
      x = x @ kernel + layer["bias"]
      if i < len(params) - 1:
        x = jax.nn.relu(x)
    return x


def fp_apply(params, x):
  for i, name in enumerate(sorted(params)):
    x = x @ params[name]["kernel"] + params[name]["bias"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def accuracy(apply_fn, params, data):
  images, labels = data
  return float(jnp.mean(jnp.argmax(apply_fn(params, jnp.asarray(images)), -1) == labels))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def make_loss(apply_fn, noise, label_smoothing):
  def loss_fn(params, images, labels, key):
    images = images + noise * jax.random.normal(key, images.shape)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), label_smoothing)
    return optax.softmax_cross_entropy(apply_fn(params, images), targets).mean()

  return loss_fn


def train(params, tx, loss_fn, train_data, test_data, *, epochs, batch_size, seed, eval_fn,
          desc, progress, record=None):
  """Minibatch training; returns params and per-epoch history (plus per-step records)."""
  images, labels = (jnp.asarray(a) for a in train_data)
  steps_per_epoch = len(images) // batch_size

  @jax.jit
  def step(params, opt_state, indices, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, images[indices], labels[indices], key)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    extra = record(params, new_params, opt_state) if record is not None else {}
    return new_params, opt_state, loss, extra

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  history = {"epoch": [], "loss": [], "test_accuracy": []}
  steps = []
  bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
  for epoch in bar:
    order = rng.permutation(len(images))
    losses = []
    for i in range(steps_per_epoch):
      key, step_key = jax.random.split(key)
      indices = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state, loss, extra = step(params, opt_state, indices, step_key)
      losses.append(loss)
      steps.append(extra)
    test_accuracy = eval_fn(params, test_data)
    history["epoch"].append(epoch + 1)
    history["loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_accuracy"].append(test_accuracy)
    bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{test_accuracy:.4f}")
  steps = jax.device_get(steps)
  records = {k: np.stack([s[k] for s in steps]) for k in (steps[0] if steps else {})}
  return params, history, records


def param_labels(params):
  return {name: {key: "quant" if key == "kernel" else "float" for key in layer}
          for name, layer in params.items()}


def running_average(values, initial, momentum=0.99):
  out, current = np.empty_like(values), initial
  for t, value in enumerate(values):
    current = momentum * current + (1 - momentum) * value
    out[t] = current
  return out


def run_seed(args, seed, progress):
  """FP pre-training, then the LR-scheduled and the TR-scheduled QAT runs from it."""
  train_data, test_data = load_data(seed)
  sizes = (64, args.hidden, args.hidden, 10)
  steps_per_epoch = len(train_data[0]) // args.batch_size
  total_steps = args.epochs * steps_per_epoch

  # Full-precision checkpoint that both QAT runs start from.
  params = init_mlp(jax.random.key(seed), sizes)
  fp_loss = make_loss(fp_apply, args.noise, args.label_smoothing)
  params, _, _ = train(
      params, optax.adam(args.lr), fp_loss, train_data, test_data, epochs=args.fp_epochs,
      batch_size=args.batch_size, seed=seed, eval_fn=lambda p, d: accuracy(fp_apply, p, d),
      desc="fp", progress=progress)
  fp_accuracy = accuracy(fp_apply, params, test_data)

  quant = Quantization(params, args.weight_bits, args.act_bits)
  qat_loss = make_loss(quant.apply, args.noise, args.label_smoothing)
  eval_q = lambda p, d: accuracy(quant.apply, p, d)
  labels = param_labels(params)
  cosine_lr = optax.cosine_decay_schedule(args.lr, total_steps)
  float_group = optax.adam(cosine_lr)
  target = optax.cosine_decay_schedule(args.target_tr, total_steps)

  def measure_transitions(old_params, new_params, opt_state):
    """Per-layer transition rate of this step, and the TR transform's state if any."""
    rates = trquant.transition_rate(quant.codes_fn(old_params), quant.codes_fn(new_params))
    record = {"measured_tr": jnp.stack([rates[name]["kernel"] for name in sorted(rates)])}
    for field in ("talr_multiplier", "running_transition_rate", "target_transition_rate"):
      value = optax.tree.get(opt_state, field)
      if value is not None:
        record[field] = value
    return record

  runs = {
      "lr": optax.partition({"quant": optax.adam(cosine_lr), "float": float_group}, labels),
      "tr": optax.partition({
          "quant": optax.chain(optax.adam(args.lr), trquant.tr_schedule(
              target, codes_fn=quant.codes_fn, controller=args.controller, eta=args.eta)),
          "float": float_group}, labels),
  }
  results, histories, records = {"fp": {"final_test_accuracy": fp_accuracy}}, {}, {}
  for name, tx in runs.items():
    _, history, record = train(
        params, tx, qat_loss, train_data, test_data, epochs=args.epochs,
        batch_size=args.batch_size, seed=seed + 1, eval_fn=eval_q,
        desc=f"qat-{name}", progress=progress, record=measure_transitions)
    histories[name], records[name] = history, record
    results[name] = {
        "final_test_accuracy": history["test_accuracy"][-1],
        "best_test_accuracy": max(history["test_accuracy"]),
        "mean_tr_last_epoch": float(record["measured_tr"][-steps_per_epoch:].mean()),
    }
  print_epochs(seed, histories, records["tr"], steps_per_epoch)
  return results, histories, records


def print_epochs(seed, histories, tr_record, steps_per_epoch):
  """Per-epoch table of both QAT runs, with the TR run's rates at the end of each epoch."""
  print(f"\nseed {seed}: {'epoch':>5s} {'LR loss':>8s} {'LR acc':>7s} {'TR loss':>8s} {'TR acc':>7s}"
        f" {'target R':>9s} {'running K':>9s} {'TALR u':>8s}")
  for i, epoch in enumerate(histories["tr"]["epoch"]):
    end = (i + 1) * steps_per_epoch - 1
    print(f"{'':8s}{epoch:5d} {histories['lr']['loss'][i]:8.4f} {histories['lr']['test_accuracy'][i]:7.4f}"
          f" {histories['tr']['loss'][i]:8.4f} {histories['tr']['test_accuracy'][i]:7.4f}"
          f" {tr_record['target_transition_rate'][end]:9.2e}"
          f" {tr_record['running_transition_rate'][end].mean():9.2e}"
          f" {tr_record['talr_multiplier'][end].mean():8.3f}")


def main(argv=None):
  args = parse_args(argv)
  if args.seeds < 1:
    raise SystemExit("--seeds must be at least 1")
  progress = not args.no_progress
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  per_seed = []
  for seed in range(args.seeds):
    results, histories, records = run_seed(args, seed, progress)
    per_seed.append({"seed": seed, "results": results, "history": histories})
    if seed == 0:
      first_histories, first_records = histories, records
    print(f"seed {seed} final: FP {results['fp']['final_test_accuracy']:.4f}  "
          f"LR {results['lr']['final_test_accuracy']:.4f}  TR {results['tr']['final_test_accuracy']:.4f}")
  elapsed = time.perf_counter() - start

  names = {"fp": "full precision", "lr": "Adam + cosine LR",
           "tr": f"Adam + TR ({args.controller}, R0={args.target_tr:g})"}
  steps = args.epochs * (1400 // args.batch_size)
  print(f"\nW{args.weight_bits}A{args.act_bits or 32} MLP on digits (397 test images),"
        f" {args.epochs} epochs ({steps} steps), {args.seeds} seed(s), {elapsed:.0f} s")
  print(f"{'method':34s} {'final acc (mean +- std)':>24s} {'best acc':>9s} {'TR last epoch':>14s}")
  summary = {}
  for name in names:
    finals = np.array([r["results"][name]["final_test_accuracy"] for r in per_seed])
    row = {"final_mean": float(finals.mean()), "final_std": float(finals.std())}
    line = f"{names[name]:34s} {finals.mean():15.4f} +- {finals.std():.4f}"
    if name != "fp":
      best = np.mean([r["results"][name]["best_test_accuracy"] for r in per_seed])
      rate = np.mean([r["results"][name]["mean_tr_last_epoch"] for r in per_seed])
      row.update(best_mean=float(best), tr_last_epoch=float(rate))
      line += f" {best:9.4f} {rate:14.2e}"
    summary[name] = row
    print(line)

  plot_path = os.path.join(args.out, "digits_qat.png")
  plot(first_records, first_histories, names, plot_path)
  json_path = os.path.join(args.out, "digits_qat.json")
  with open(json_path, "w") as f:
    json.dump({"args": vars(args), "summary": summary, "per_seed": per_seed, "seconds": elapsed},
              f, indent=2)
  print(f"\nwrote {plot_path} and {json_path}")
  return summary


def plot(records, histories, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  tr = records["tr"]
  steps = np.arange(len(tr["target_transition_rate"]))
  ax = axes[0]
  ax.plot(steps, tr["target_transition_rate"], "k--", label="target R")
  for layer in range(tr["running_transition_rate"].shape[1]):
    ax.plot(steps, tr["running_transition_rate"][:, layer], label=f"TR run, layer {layer}")
  lr_running = running_average(records["lr"]["measured_tr"], records["lr"]["measured_tr"][0])
  ax.plot(steps, lr_running.mean(1), color="gray", alpha=0.8, label="LR run (mean of layers)")
  ax.set(xlabel="step", ylabel="running transition rate", title="Transition rate")
  ax.legend(fontsize=8)
  ax = axes[1]
  for layer in range(tr["talr_multiplier"].shape[1]):
    ax.plot(steps, tr["talr_multiplier"][:, layer], label=f"layer {layer}")
  ax.set(xlabel="step", ylabel="u (x initial LR)", title="TALR multiplier", yscale="log")
  ax.legend(fontsize=8)
  ax = axes[2]
  for name, history in histories.items():
    ax.plot(history["epoch"], history["test_accuracy"], label=f"{names[name]} (seed 0)")
  ax.set(xlabel="epoch", ylabel="test accuracy", title="Accuracy")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
