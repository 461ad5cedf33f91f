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

Against weight oscillations (either schedule): ``--dampening LAMBDA`` adds the
dampening loss with a weight that is 0 for the first ``--osc-start`` fraction of
the steps, then ramps (cosine) to LAMBDA; ``--freeze`` appends
``trquant.freeze_oscillations`` (threshold cosine-annealed from
``--freeze-threshold`` to ``--freeze-threshold-final`` after the same warm-up);
``--track-oscillations`` appends ``trquant.track_oscillations`` to report the
fraction of oscillating weights per layer (implied by ``--freeze``).

After QAT, BatchNorm running statistics can lag the quantized weights (short runs,
2-bit weights): the script measures them against the final weights'
(``trquant.nnx.batchnorm_divergence``, ``final_bn_divergence`` in the results) and
re-estimates them before a second evaluation (``--bn-reestimate``, on by default);
with ``--bn-reestimate 0``, ``trquant.nnx.check_batchnorm`` warns when they are stale.
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
from tqdm import tqdm

from trquant import datasets
from trquant import models

import trquant  # noqa: E402

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 3e-4}


def _target_rate(text):
  """--target-tr: a positive float R_0, or "auto"."""
  if text == "auto":
    return text
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"R_0 must be positive, got {text!r}")
  return value


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
  parser.add_argument("--target-tr", type=_target_rate, default=5e-3,
                      help="initial target transition rate R_0, or 'auto': measured over a"
                      " warm-up at the optimizer's own LR (trquant.measured_target)")
  parser.add_argument("--controller", default="log", choices=["log", "additive", "momentum"])
  parser.add_argument("--eta", type=float, default=None, help="controller gain (default: its own)")
  parser.add_argument("--tr-momentum", type=float, default=0.99,
                      help="EMA momentum of the running TR (time constant 1/(1-m) steps)")
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="truncate epochs (quick runs)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--init-from", default=None, help="FP checkpoint (.npz) to start QAT from")
  parser.add_argument("--save", default=None, help="write the trained model's weights here (.npz)")
  parser.add_argument("--dampening", type=float, default=0.0,
                      help="final weight of the oscillation-dampening loss (0: off; the paper: 0.1)")
  parser.add_argument("--freeze", action="store_true", help="iterative freezing of oscillating weights")
  parser.add_argument("--freeze-threshold", type=float, default=0.1, help="freezing threshold at the start")
  parser.add_argument("--freeze-threshold-final", type=float, default=0.01,
                      help="freezing threshold at the end (cosine annealed)")
  parser.add_argument("--osc-start", type=float, default=0.25,
                      help="fraction of the steps before dampening / freezing starts")
  parser.add_argument("--osc-momentum", type=float, default=None,
                      help="EMA momentum of the oscillation frequency (default: 1e-3, raised for"
                           " short runs to 5 / warm-up steps)")
  parser.add_argument("--osc-threshold", type=float, default=0.005,
                      help="frequency above which a weight counts as oscillating (reports)")
  parser.add_argument("--track-oscillations", action="store_true",
                      help="report the fraction of oscillating weights per layer")
  parser.add_argument("--bn-reestimate", type=int, default=50,
                      help="batches for BatchNorm re-estimation before the final evaluation (0: off;"
                      " then a warning says when the running statistics lag the final weights)")
  parser.add_argument("--bn-divergence", type=int, default=0,
                      help="batches for the KL divergence of BatchNorm running statistics from the"
                      " current weights' at every epoch end (0 = off)")
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
    tx = opt(cosine_lr)
  else:
    target = (trquant.measured_target(total_steps) if args.target_tr == "auto"
              else optax.cosine_decay_schedule(args.target_tr, total_steps))
    quant = optax.chain(opt(lr), trquant.tr_schedule(
        target, codes_fn=trquant.nnx.codes_fn(model), controller=args.controller, eta=args.eta,
        momentum=args.tr_momentum))
    tx = optax.partition({"quant": quant, "float": opt(cosine_lr)}, trquant.nnx.param_labels(model))
  oscillations = oscillation_transform(args, model, total_steps)
  # Last in the chain: it must see (and, when freezing, override) the update actually applied.
  return tx if oscillations is None else optax.chain(tx, oscillations)


def oscillation_momentum(args, total_steps):
  """The paper's 1e-3, raised so that the warm-up spans at least 5 EMA time constants."""
  if args.osc_momentum is not None:
    return args.osc_momentum
  warmup = max(args.osc_start * total_steps, 1.0)
  return min(max(1e-3, 5.0 / warmup), 0.05)


def oscillation_transform(args, model, total_steps):
  """trquant.freeze_oscillations / track_oscillations as configured, or None."""
  momentum = oscillation_momentum(args, total_steps)
  if args.freeze:
    threshold = trquant.freeze_threshold_schedule(
        total_steps, init_value=args.freeze_threshold, end_value=args.freeze_threshold_final,
        start_fraction=args.osc_start)
    return trquant.freeze_oscillations(
        trquant.nnx.codes_fn(model), trquant.nnx.scales_fn(model), total_steps=total_steps,
        threshold=threshold, momentum=momentum, start_fraction=args.osc_start,
        report_threshold=args.osc_threshold)
  if args.track_oscillations:
    return trquant.track_oscillations(trquant.nnx.codes_fn(model), momentum=momentum,
                                      threshold=args.osc_threshold)
  return None


def quantized_layers(model):
  """Names and sizes of the quantized kernels, in the order of the per-layer oscillation stats."""
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  codes = jax.eval_shape(trquant.nnx.codes_fn(model), params)
  names, sizes = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(codes, is_leaf=lambda x: x is None)[0]:
    if leaf is not None:
      keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
      names.append("/".join(str(k) for k in keys))
      sizes.append(int(np.prod(leaf.shape)))
  return names, sizes


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@nnx.jit
def _correct(model, x, y):
  return jnp.sum(jnp.argmax(model(x), -1) == y)


def evaluate(model, images, labels, batch_size=1000):
  model.eval()
  total = 0
  for start in range(0, len(images), batch_size):
    total += int(_correct(model, jnp.asarray(images[start:start + batch_size]),
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
  tracks_osc = bool(args.freeze or args.track_oscillations)
  if (args.dampening or tracks_osc) and not args.weight_bits:
    raise SystemExit("--dampening / --freeze / --track-oscillations need quantized weights")
  tx = make_transform(args, model, total_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tracks_tr = args.schedule == "tr"
  dampening = (trquant.dampening_weight_schedule(total_steps, end_value=args.dampening,
                                                 start_fraction=args.osc_start)
               if args.dampening else None)

  # A pure step on the split (model, optimizer) state, jitted by jax.jit with the state
  # donated: nnx.jit would traverse the model and optimizer graph on every call, which
  # costs more than a step of a small model (benchmarks/overhead.py, part 4). The graph
  # definition is static: it changes only with the model's train/eval mode.
  @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
  def train_step(graphdef, state, x, y, step):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      if dampening is not None:
        loss = loss + dampening(step) * trquant.nnx.dampening_loss(model)
      return loss

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    record = trquant.nnx.transition_stats(optimizer) if tracks_tr else {}
    if tracks_osc:
      stats = trquant.nnx.oscillation_stats(optimizer)
      record.update({f"osc/{key}": value for key, value in stats.items()})
    return nnx.state((model, optimizer)), loss, record

  history = {"epoch": [], "train_loss": [], "test_accuracy": [], "seconds": []}
  layer_names, layer_sizes = quantized_layers(model) if tracks_osc else ([], [])
  steps = []
  start = time.perf_counter()
  bar = tqdm(total=total_steps, disable=args.no_progress, desc=run_name(args), leave=False)
  for epoch in range(args.epochs):
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    # Own buffers: the step donates them, and the model's arrays may be shared (a checkpoint).
    state = jax.tree.map(jnp.copy, state)
    losses = []
    batches = datasets.batches(dataset.train_images, dataset.train_labels, args.batch_size, rng=rng)
    for _, (x, y) in zip(range(steps_per_epoch), batches):
      state, loss, record = train_step(graphdef, state, jnp.asarray(x), jnp.asarray(y),
                                       jnp.asarray(len(steps), jnp.int32))
      losses.append(loss)
      steps.append(record)
      bar.update()
    nnx.update((model, optimizer), state)  # the model's Variables now hold the trained arrays
    accuracy = evaluate(model, dataset.test_images, dataset.test_labels)
    history["epoch"].append(epoch + 1)
    history["train_loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_accuracy"].append(accuracy)
    history["seconds"].append(time.perf_counter() - start)
    if args.bn_divergence:
      probe = datasets.batches(dataset.train_images, dataset.train_labels, args.batch_size,
                               rng=np.random.default_rng(epoch))
      history.setdefault("bn_divergence", []).append(trquant.nnx.batchnorm_divergence(
          model, probe, num_batches=args.bn_divergence))
    line = (f"{run_name(args)} epoch {epoch + 1}/{args.epochs}  loss {history['train_loss'][-1]:.4f}"
            f"  test acc {accuracy:.4f}")
    if tracks_tr:
      last = jax.device_get(steps[-1])
      line += (f"  target {float(last['target_transition_rate']):.2e}"
               f"  running TR {np.mean(last['running_transition_rate']):.2e}"
               f"  TALR {np.mean(last['talr_multiplier']):.3f}")
    if tracks_osc:
      last = jax.device_get(steps[-1])
      line += f"  oscillating {_weighted(last['osc/oscillating_fraction'], layer_sizes):.2%}"
      if "osc/frozen_fraction" in last:
        line += f"  frozen {_weighted(last['osc/frozen_fraction'], layer_sizes):.2%}"
    tqdm.write(line)
  bar.close()

  results = {"args": vars(args), "history": history, "final_test_accuracy": history["test_accuracy"][-1],
             "train_seconds": time.perf_counter() - start, "total_steps": total_steps}
  if quantized and any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model)):
    # After QAT the running statistics can lag the quantized weights (short runs, low
    # bit widths): measure it; without re-estimation below, check_batchnorm warns.
    probe = datasets.batches(dataset.train_images, dataset.train_labels, args.batch_size,
                             rng=np.random.default_rng(args.seed + 1))
    results["final_bn_divergence"] = (
        trquant.nnx.batchnorm_divergence(model, probe, num_batches=20) if args.bn_reestimate
        else trquant.nnx.check_batchnorm(model, probe, num_batches=20))
    worst = max(results["final_bn_divergence"].values())
    stale = ("" if worst <= 0.01 else " (stale: re-estimated below)" if args.bn_reestimate
             else " (stale: evaluate after trquant.nnx.reestimate_batchnorm)")
    tqdm.write(f"BatchNorm running statistics vs the final weights': max KL {worst:.2e}{stale}")
  if args.bn_reestimate and quantized:
    batches = datasets.batches(dataset.train_images, dataset.train_labels, args.batch_size, rng=rng)
    trquant.nnx.reestimate_batchnorm(model, batches, num_batches=args.bn_reestimate)
    results["final_test_accuracy_bn_reestimated"] = evaluate(
        model, dataset.test_images, dataset.test_labels)
  if tracks_tr:
    records = jax.device_get(steps)
    results["transitions"] = {key: np.stack([r[key] for r in records]).tolist()
                              for key in records[0] if not key.startswith("osc/")}
  if tracks_osc:
    results["oscillations"] = oscillation_results(jax.device_get(steps), layer_names, layer_sizes,
                                                  steps_per_epoch)
    results["oscillations"]["momentum"] = oscillation_momentum(args, total_steps)
  if args.save:
    save_checkpoint(model, args.save)
  return results


def _weighted(per_layer, sizes):
  return float(np.average(np.asarray(per_layer), weights=sizes))


def oscillation_results(records, names, sizes, steps_per_epoch):
  """Final per-layer oscillation (and freezing) statistics, and weighted means per epoch."""
  out = {"layers": names, "weights": sizes}
  for key in ("oscillating_fraction", "frozen_fraction"):
    if f"osc/{key}" not in records[0]:
      continue
    per_step = np.stack([r[f"osc/{key}"] for r in records])
    out[key] = per_step[-1].tolist()
    out[f"{key}_mean"] = _weighted(per_step[-1], sizes)
    epoch_ends = per_step[steps_per_epoch - 1::steps_per_epoch]
    out[f"{key}_per_epoch"] = [_weighted(row, sizes) for row in epoch_ends]
    out[f"{key}_per_layer_epoch"] = epoch_ends.tolist()
  counts = np.stack([r["osc/oscillation_count"] for r in records])
  out["oscillations_per_weight_last_epoch"] = float(
      counts[-steps_per_epoch:].sum() / max(sum(sizes), 1))
  return out


def run_name(args):
  if args.tag:
    return args.tag
  bits = f"W{args.weight_bits or 32}A{args.act_bits or 32}"
  rate = args.target_tr if args.target_tr == "auto" else f"{args.target_tr:g}"
  sched = f"{args.schedule}" + (f"-R{rate}" if args.schedule == "tr" else "")
  if args.dampening:
    sched += f"-damp{args.dampening:g}"
  if args.freeze:
    sched += "-freeze"
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
  if "oscillations" in results:
    summary += f", oscillating weights {results['oscillations']['oscillating_fraction_mean']:.2%}"
    if "frozen_fraction_mean" in results["oscillations"]:
      summary += f", frozen {results['oscillations']['frozen_fraction_mean']:.2%}"
  print(summary + f", {results['train_seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
