"""Quantization-aware training of a 2-bit MLP on scikit-learn's digits: TR scheduling vs LR scheduling.

Trains a full-precision MLP of ``trquant.nnx.QuantLinear`` layers, then fine-tunes
it twice from the same checkpoint with 2-bit weights (frozen per-tensor scales)
and LSQ-quantized activations, with ``nnx.Optimizer``:

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
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import trquant
from trquant.nnx import QuantLinear


def _bits(text):
  """--act-bits: a bit width, or "fp" for full precision (None)."""
  if text == "fp":
    return None
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(
        f'a bit width such as 4, or "fp" for full precision, got {text!r}')
  return int(text)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=60, help="QAT epochs per run")
  parser.add_argument("--fp-epochs", type=int, default=20, help="full-precision pre-training epochs")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
  parser.add_argument("--weight-bits", type=int, default=2)
  parser.add_argument("--act-bits", type=_bits, default=4,
                      help='"fp" keeps activations in full precision')
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


class MLP(nnx.Module):
  """64 -> hidden -> hidden -> 10 MLP of trquant.nnx.QuantLinear layers.

  With ``weight_bits=None, act_bits=None`` it is the full-precision model, with the
  same parameter tree, so FP weights load into the quantized model directly. The
  inputs of the second and third layers (post-ReLU) are quantized to ``act_bits``.
  """

  def __init__(self, hidden, *, weight_bits, act_bits, rngs):
    self.layers = nnx.List([
        QuantLinear(64, hidden, weight_bits=weight_bits, rngs=rngs),
        QuantLinear(hidden, hidden, weight_bits=weight_bits, act_bits=act_bits, rngs=rngs),
        QuantLinear(hidden, 10, weight_bits=weight_bits, act_bits=act_bits, rngs=rngs),
    ])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def accuracy(model, data):
  images, labels = data
  return float(jnp.mean(jnp.argmax(model(jnp.asarray(images)), -1) == labels))


def train(model, tx, train_data, test_data, *, epochs, batch_size, seed, noise, label_smoothing,
          desc, progress, record=None):
  """Minibatch training with noise augmentation; returns per-epoch history and per-step records."""
  images, labels = (jnp.asarray(a) for a in train_data)
  steps_per_epoch = len(images) // batch_size
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # The step is a pure function of the split state, jitted by jax.jit with the state
  # donated: nnx.jit would traverse the model and optimizer graph on every call, which
  # on this small model costs more than the step itself (benchmarks/overhead.py, part 4).
  graphdef, state = nnx.split((model, optimizer))
  # Own buffers: the step donates them, and the model's arrays may be shared (a checkpoint).
  state = jax.tree.map(jnp.copy, state)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, indices, key):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      x = images[indices] + noise * jax.random.normal(key, (len(indices), images.shape[1]))
      targets = optax.smooth_labels(jax.nn.one_hot(labels[indices], 10), label_smoothing)
      return optax.softmax_cross_entropy(model(x), targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    old_params = trquant.nnx.values(nnx.state(model, nnx.Param))  # snapshot, not live Variables
    optimizer.update(model, grads)
    extra = record(old_params, trquant.nnx.values(nnx.state(model, nnx.Param)), optimizer) if record else {}
    return nnx.state((model, optimizer)), loss, extra

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  history = {"epoch": [], "loss": [], "test_accuracy": []}
  steps = []
  for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
    order = rng.permutation(len(images))
    losses = []
    for i in range(steps_per_epoch):
      key, step_key = jax.random.split(key)
      state, loss, extra = step(state, order[i * batch_size:(i + 1) * batch_size], step_key)
      losses.append(loss)
      steps.append(extra)
    nnx.update((model, optimizer), state)  # the model's Variables now hold the trained arrays
    history["epoch"].append(epoch + 1)
    history["loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_accuracy"].append(accuracy(model, test_data))
  steps = jax.device_get(steps)
  records = {k: np.stack([s[k] for s in steps]) for k in (steps[0] if steps else {})}
  return history, records


def running_average(values, initial, decay=0.99):
  out, current = np.empty_like(values), initial
  for t, value in enumerate(values):
    current = decay * current + (1 - decay) * value
    out[t] = current
  return out


def run_seed(args, seed, progress):
  """FP pre-training, then the LR-scheduled and the TR-scheduled QAT runs from it."""
  train_data, test_data = load_data(seed)
  steps_per_epoch = len(train_data[0]) // args.batch_size
  total_steps = args.epochs * steps_per_epoch
  common = dict(batch_size=args.batch_size, noise=args.noise, label_smoothing=args.label_smoothing,
                progress=progress)

  # Full-precision checkpoint that both QAT runs start from.
  fp_model = MLP(args.hidden, weight_bits=None, act_bits=None, rngs=nnx.Rngs(seed))
  train(fp_model, optax.adam(args.lr), train_data, test_data, epochs=args.fp_epochs, seed=seed,
        desc="fp", **common)
  fp_accuracy = accuracy(fp_model, test_data)
  checkpoint = nnx.state(fp_model, nnx.Param)

  def quantized_model():
    model = MLP(args.hidden, weight_bits=args.weight_bits, act_bits=args.act_bits,
                rngs=nnx.Rngs(seed))
    trquant.nnx.load_float_weights(model, checkpoint)  # keeps the QuantWeight bits
    trquant.nnx.init_weight_scales(model, method="mse")  # frozen from the FP weights
    trquant.nnx.calibrate_activations(model, jnp.asarray(train_data[0][:256]))
    return model

  cosine_lr = optax.cosine_decay_schedule(args.lr, total_steps)
  target = optax.cosine_decay_schedule(args.target_tr, total_steps)
  results, histories, records = {"fp": {"final_test_accuracy": fp_accuracy}}, {}, {}
  for name in ("lr", "tr"):
    model = quantized_model()
    codes_fn = trquant.nnx.codes_fn(model)
    labels = trquant.nnx.param_labels(model)
    quant_group = optax.adam(cosine_lr) if name == "lr" else optax.chain(
        optax.adam(args.lr),
        trquant.tr_schedule(target, codes_fn=codes_fn, controller=args.controller, eta=args.eta))
    tx = optax.partition({"quant": quant_group, "float": optax.adam(cosine_lr)}, labels)

    def measure_transitions(old_params, new_params, optimizer):
      """Per-layer transition rate of this step, and the TR transform's state if any."""
      rates = jax.tree.leaves(trquant.transition_rate(codes_fn(old_params), codes_fn(new_params)))
      record = {"measured_tr": jnp.stack(rates)}
      if name == "tr":
        record.update(trquant.nnx.transition_stats(optimizer))
      return record

    history, record = train(model, tx, train_data, test_data, epochs=args.epochs, seed=seed + 1,
                            desc=f"qat-{name}", record=measure_transitions, **common)
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
  act_bits = 32 if args.act_bits is None else args.act_bits
  print(f"\nW{args.weight_bits}A{act_bits} MLP on digits (397 test images),"
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
