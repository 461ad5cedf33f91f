"""Quantization-aware training of one reference model, as a :class:`TrainConfig` says.

:func:`train` builds the model (:mod:`trquant_examples.models`) for the dataset
(:mod:`trquant_examples.datasets`), optionally loads an FP checkpoint, fits the weight
scales and calibrates the activation scales, trains with the transform of
:func:`trquant_examples.optimizers.make_transform` and returns a results dictionary
(``examples/train_qat.py`` writes it as JSON). Weight scales are frozen
(``weight_quantizer="fixed"``), so the LR and TR schedules compare on equal terms.

After QAT, BatchNorm running statistics can lag the quantized weights (short runs,
2-bit weights): they are measured against the final weights'
(``trquant.nnx.batchnorm_divergence``, ``final_bn_divergence`` in the results) and
re-estimated before a second evaluation (``bn_reestimate``, on by default); with
``bn_reestimate=0``, ``trquant.nnx.check_batchnorm`` warns when they are stale.

    from trquant_examples.config import TrainConfig
    from trquant_examples.training import train
    results = train(TrainConfig(dataset="digits", weight_bits=2, act_bits=2, schedule="tr"))
    results["final_test_accuracy"]
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import trquant
from trquant_examples import checkpoints
from trquant_examples import datasets
from trquant_examples import models
from trquant_examples.config import TrainConfig, run_name
from trquant_examples.optimizers import make_transform, oscillation_decay, oscillation_warmup_steps


@nnx.jit
def _count_correct(model, images, labels):
  return jnp.sum(jnp.argmax(model(images), -1) == labels)


def evaluate(model: nnx.Module, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> float:
  """Top-1 accuracy of ``model`` in eval mode (it is left in eval mode).

  Args:
    model: a classifier: NHWC images in, logits out.
    images: the images.
    labels: their integer labels.
    batch_size: images per forward pass.

  Returns:
    The fraction of images classified correctly.
  """
  model.eval()
  total = 0
  for start in range(0, len(images), batch_size):
    total += int(_count_correct(model, jnp.asarray(images[start:start + batch_size]),
                                jnp.asarray(labels[start:start + batch_size])))
  return total / len(images)


def quantized_layers(model: nnx.Module) -> tuple[list[str], list[int]]:
  """Names and sizes of the quantized kernels, in the order of the per-layer oscillation stats.

  Args:
    model: an NNX model of trquant.nnx layers.

  Returns:
    (names, sizes): the kernels' "/"-joined state paths and their numbers of weights.
  """
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  codes = jax.eval_shape(trquant.nnx.codes_fn(model), params)
  names, sizes = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(codes, is_leaf=lambda x: x is None)[0]:
    if leaf is not None:
      keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
      names.append("/".join(str(k) for k in keys))
      sizes.append(int(np.prod(leaf.shape)))
  return names, sizes


def oscillation_results(records: list[dict], names: list[str], sizes: list[int],
                        steps_per_epoch: int) -> dict[str, Any]:
  """Final per-layer oscillation (and freezing) statistics, and weighted means per epoch.

  Args:
    records: the per-step records of a run, with ``osc/...`` entries.
    names: the quantized kernels' names (:func:`quantized_layers`).
    sizes: their numbers of weights, the weights of the means.
    steps_per_epoch: steps per epoch, to pick the epochs' last steps.

  Returns:
    A dict with ``layers``, ``weights`` and, per fraction (oscillating, frozen), its final
    per-layer values, their weighted mean, and per-epoch means and per-layer values, and
    ``oscillations_per_weight_last_epoch``.
  """
  out = {"layers": names, "weights": sizes}
  for key in ("oscillating_fraction", "frozen_fraction"):
    if f"osc/{key}" not in records[0]:
      continue
    per_step = np.stack([r[f"osc/{key}"] for r in records])
    out[key] = per_step[-1].tolist()
    out[f"{key}_mean"] = _weighted_mean(per_step[-1], sizes)
    epoch_ends = per_step[steps_per_epoch - 1::steps_per_epoch]
    out[f"{key}_per_epoch"] = [_weighted_mean(row, sizes) for row in epoch_ends]
    out[f"{key}_per_layer_epoch"] = epoch_ends.tolist()
  counts = np.stack([r["osc/oscillation_count"] for r in records])
  out["oscillations_per_weight_last_epoch"] = float(
      counts[-steps_per_epoch:].sum() / max(sum(sizes), 1))
  return out


def build_model(config: TrainConfig, dataset: datasets.Dataset) -> nnx.Module:
  """The config's model for the dataset's images, quantized as configured (not calibrated).

  Args:
    config: the run's settings (model, bit widths, first_last, per_channel, seed).
    dataset: the data it is trained on (classes, channels, image size).

  Returns:
    A new model.
  """
  return models.build_model(
      config.model, num_classes=dataset.num_classes, in_channels=dataset.image_shape[-1],
      weight_bits=config.weight_bits, act_bits=config.act_bits,
      first_last=config.first_last, per_channel=config.per_channel,
      image_size=dataset.image_shape[0], rngs=nnx.Rngs(config.seed))


def train(config: TrainConfig) -> dict[str, Any]:
  """Trains one model as configured.

  Args:
    config: the run's settings.

  Returns:
    The results: ``args`` (the config as a dict), ``history`` (per epoch: ``epoch``,
    ``train_loss``, ``test_accuracy``, ``seconds``, and ``bn_divergence`` with
    ``config.bn_divergence``), ``final_test_accuracy``, ``train_seconds``,
    ``total_steps``; for quantized models with BatchNorm ``final_bn_divergence``; with
    BatchNorm re-estimation ``final_test_accuracy_bn_reestimated``; under TR scheduling
    ``transitions`` (per-step TR statistics); when oscillations are tracked or frozen
    ``oscillations`` (:func:`oscillation_results` and the EMAs' ``decay``). With
    ``config.save`` the trained weights are written there.
  """
  dataset = datasets.normalize(datasets.load_dataset(config.dataset, config.data_dir))
  model = build_model(config, dataset)
  rng = np.random.default_rng(config.seed)
  if config.init_from:
    checkpoints.load_checkpoint(model, config.init_from)
  if config.quantized:
    trquant.nnx.init_weight_scales(model)  # from the (loaded) FP weights
    model.eval()  # calibrate with the checkpoint's BatchNorm statistics, leaving them as they are
    trquant.nnx.calibrate_activations(model, jnp.asarray(dataset.train_images[:256]))

  steps_per_epoch = len(dataset.train_images) // config.batch_size
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  total_steps = config.epochs * steps_per_epoch
  optimizer = nnx.Optimizer(model, make_transform(config, model, total_steps), wrt=nnx.Param)
  tracks_tr = config.schedule == "tr"
  tracks_osc = bool(config.freeze or config.track_oscillations)
  train_step = _make_train_step(config, total_steps, tracks_tr=tracks_tr, tracks_osc=tracks_osc)

  name = run_name(config)
  history = {"epoch": [], "train_loss": [], "test_accuracy": [], "seconds": []}
  layer_names, layer_sizes = quantized_layers(model) if tracks_osc else ([], [])
  steps = []
  start = time.perf_counter()
  bar = tqdm(total=total_steps, disable=config.no_progress, desc=name, leave=False)
  for epoch in range(config.epochs):
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    # Own buffers: the step donates them, and the model's arrays may be shared (a checkpoint).
    state = jax.tree.map(jnp.copy, state)
    losses = []
    batches = datasets.batches(dataset.train_images, dataset.train_labels, config.batch_size,
                               rng=rng)
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
    if config.bn_divergence:
      probe = datasets.batches(dataset.train_images, dataset.train_labels, config.batch_size,
                               rng=np.random.default_rng(epoch))
      history.setdefault("bn_divergence", []).append(trquant.nnx.batchnorm_divergence(
          model, probe, num_batches=config.bn_divergence))
    tqdm.write(_epoch_line(name, epoch, config.epochs, history, steps, layer_sizes,
                           tracks_tr=tracks_tr, tracks_osc=tracks_osc))
  bar.close()

  results = {"args": dataclasses.asdict(config), "history": history,
             "final_test_accuracy": history["test_accuracy"][-1],
             "train_seconds": time.perf_counter() - start, "total_steps": total_steps}
  results.update(_final_batchnorm(config, model, dataset, rng))
  if tracks_tr:
    records = jax.device_get(steps)
    results["transitions"] = {key: np.stack([r[key] for r in records]).tolist()
                              for key in records[0] if not key.startswith("osc/")}
  if tracks_osc:
    results["oscillations"] = oscillation_results(jax.device_get(steps), layer_names, layer_sizes,
                                                  steps_per_epoch)
    results["oscillations"]["decay"] = oscillation_decay(config, total_steps)
  if config.save:
    checkpoints.save_checkpoint(model, config.save)
  return results


def _make_train_step(config, total_steps, *, tracks_tr, tracks_osc):
  """A pure step on the split (model, optimizer) state, jitted with the state donated.

  ``nnx.jit`` would traverse the model and optimizer graph on every call, which costs
  more than a step of a small model (benchmarks/overhead.py, part 4). The graph
  definition is static: it changes only with the model's train/eval mode.
  """
  dampening = (trquant.dampening_weight_schedule(
      total_steps, end_value=config.dampening,
      warmup_steps=oscillation_warmup_steps(config, total_steps))
               if config.dampening else None)

  @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
  def train_step(graphdef, state, x, y, step):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits = model(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      if dampening is not None:
        loss = loss + dampening(step) * trquant.nnx.model_dampening_loss(model)
      return loss

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    record = trquant.nnx.transition_stats(optimizer) if tracks_tr else {}
    if tracks_osc:
      stats = trquant.nnx.oscillation_stats(optimizer)
      record.update({f"osc/{key}": value for key, value in stats.items()})
    return nnx.state((model, optimizer)), loss, record

  return train_step


def _epoch_line(name, epoch, epochs, history, steps, layer_sizes, *, tracks_tr, tracks_osc):
  """The progress line printed at an epoch's end."""
  line = (f"{name} epoch {epoch + 1}/{epochs}  loss {history['train_loss'][-1]:.4f}"
          f"  test acc {history['test_accuracy'][-1]:.4f}")
  if tracks_tr:
    last = jax.device_get(steps[-1])
    line += (f"  target {float(last['target_transition_rate']):.2e}"
             f"  running TR {np.mean(last['running_transition_rate']):.2e}"
             f"  TALR {np.mean(last['talr_multiplier']):.3f}")
  if tracks_osc:
    last = jax.device_get(steps[-1])
    line += f"  oscillating {_weighted_mean(last['osc/oscillating_fraction'], layer_sizes):.2%}"
    if "osc/frozen_fraction" in last:
      line += f"  frozen {_weighted_mean(last['osc/frozen_fraction'], layer_sizes):.2%}"
  return line


def _final_batchnorm(config, model, dataset, rng):
  """The BatchNorm statistics' divergence after training and the re-estimated accuracy."""
  results = {}
  if config.quantized and any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model)):
    # After QAT the running statistics can lag the quantized weights (short runs, low
    # bit widths): measure it; without re-estimation below, check_batchnorm warns.
    probe = datasets.batches(dataset.train_images, dataset.train_labels, config.batch_size,
                             rng=np.random.default_rng(config.seed + 1))
    results["final_bn_divergence"] = (
        trquant.nnx.batchnorm_divergence(model, probe, num_batches=20) if config.bn_reestimate
        else trquant.nnx.check_batchnorm(model, probe, num_batches=20))
    worst = max(results["final_bn_divergence"].values())
    stale = ("" if worst <= 0.01 else " (stale: re-estimated below)" if config.bn_reestimate
             else " (stale: evaluate after trquant.nnx.reestimate_batchnorm)")
    tqdm.write(f"BatchNorm running statistics vs the final weights': max KL {worst:.2e}{stale}")
  if config.bn_reestimate and config.quantized:
    batches = datasets.batches(dataset.train_images, dataset.train_labels, config.batch_size,
                               rng=rng)
    trquant.nnx.reestimate_batchnorm(model, batches, num_batches=config.bn_reestimate)
    results["final_test_accuracy_bn_reestimated"] = evaluate(
        model, dataset.test_images, dataset.test_labels)
  return results


def _weighted_mean(per_layer, sizes):
  return float(np.average(np.asarray(per_layer), weights=sizes))
