"""TR scheduling vs LR scheduling at the paper's training length, on a BN MLP or a BN CNN.

``--model mlp``: a 784-W-W-W-10 MLP (BatchNorm after every linear layer, clipped
activations ``clip(x, -1, 1)``; the first and last linear layers in full precision, the
inner two :class:`trquant.nnx.QuantLinear` with quantized weights and signed quantized
inputs). ``--model cnn``: four 3x3 convolutions W (stride 2) - W - 2W (stride 2) - 2W,
each followed by BatchNorm and ``clip(x, -1, 1)``, global average pooling and a linear
head; the first conv and the head in full precision, the inner three
:class:`trquant.nnx.QuantConv`. The model is trained in full precision once, then
fine-tuned from that checkpoint with quantization for ``--steps`` steps by each method,
for each seed. A seed fixes the data order, shared by every method. MLP steps run in
jitted ``lax.scan`` chunks (one chunk between two evaluations), the seeds side by side;
CNN steps run one jitted step per Python iteration, seed after seed (XLA:CPU runs
convolutions inside a scan, or vmapped over seeds, several times slower).

Methods (``--methods``, comma-separated):

* ``lr``: the optimizer with a cosine LR on every parameter, frozen MSE weight scales.
* ``lr-lsq``: the same with learned (LSQ) weight scales, the paper's baseline.
* ``tr``: ``optimizer(U_0) -> trquant.tr_schedule`` on the quantized kernels, cosine
  target from ``--target-tr`` (the paper's R_0 = 5e-3); cosine LR on the rest.
* ``tr-l<lambda>``: the same with R_0 = lambda * sqrt(bits) (e.g. ``tr-l2e-3``).
* ``tr-additive``, ``tr-momentum``: ``tr`` with the paper's / the public code's controller.
* ``tr-auto``: ``tr`` with the target measured from the optimizer's own rate
  (:func:`trquant.measured_target`), no R_0.
* ``tr-auto-sqrt``: ``tr-auto`` decaying as the square root of a cosine,
  ``R_0 * cos(pi p / 2)``: the rate a cosine LR gives where the rate goes as sqrt(LR), as
  it does under Adam (a check of why ``tr-auto`` anneals the LR faster than a cosine).

Every step records, per quantized layer: the transition rate k_t (codes before vs
after the update, with the scales in force), the TALR multiplier u and running TR
K_t (TR runs), the mean latent step |dw| / s, the fraction of latent weights within
5% of a step of a transition point, and the fraction oscillating
(:func:`trquant.track_oscillations`). Curves are averaged over windows and
subsampled into each run's JSON.

    python benchmarks/tr_long.py --data-dir ../shared/data --width 64 --bits 1,2 \
        --optimizers sgd,adam --methods lr,lr-lsq,tr,tr-l2e-3,tr-l5e-3 --steps 80000 --seeds 5 \
        --out benchmarks/results/tr_long_mlp
    python benchmarks/tr_long.py --model cnn --width 16 --bits 1,2 --optimizers sgd,adam \
        --methods lr,tr-auto,tr,tr-l2e-3 --steps 10000 --fp-steps 15000 --eval-every 500 \
        --batch-size 32 --seeds 0,1,2 --out benchmarks/results/tr_long_cnn
    python benchmarks/tr_long.py --summary-only --out benchmarks/results/tr_long_mlp
    python benchmarks/tr_long.py --quick     # synthetic-free smoke run on digits, seconds
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import pathlib
import platform
import subprocess
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

import trquant
from trquant_examples import datasets
from trquant_examples.models import build_model

DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
NEAR_TRANSITION = 0.05  # "near a transition point": within 5% of a step
CURVE_POINTS = 400


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


class BNMLP(nnx.Module):
  """784-W-W-W-10 with BatchNorm and clip(x, -1, 1); inner two layers quantized."""

  def __init__(self, in_features: int, width: int, num_classes: int, *, bits, weight_quantizer="fixed",
               scale_method="mse", rngs: nnx.Rngs):
    quant = dict(weight_bits=bits, act_bits=bits, signed_act=True, weight_quantizer=weight_quantizer,
                 scale_method=scale_method)
    fp = dict(weight_bits=None, act_bits=None)
    self.fc1 = trquant.nnx.QuantLinear(in_features, width, **fp, rngs=rngs)
    self.fc2 = trquant.nnx.QuantLinear(width, width, **quant, rngs=rngs)
    self.fc3 = trquant.nnx.QuantLinear(width, width, **quant, rngs=rngs)
    self.fc4 = trquant.nnx.QuantLinear(width, num_classes, **fp, rngs=rngs)
    self.bn1, self.bn2, self.bn3 = (nnx.BatchNorm(width, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                                  rngs=rngs) for _ in range(3))

  quantized_names = ("fc2", "fc3")

  def quantized_layers(self):
    return [getattr(self, name) for name in self.quantized_names]

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for fc, bn in ((self.fc1, self.bn1), (self.fc2, self.bn2), (self.fc3, self.bn3)):
      x = jnp.clip(bn(fc(x)), -1.0, 1.0)
    return self.fc4(x)


class BNCNN(nnx.Module):
  """A small BN CNN: 3x3 convs W (stride 2, FP) -> W -> 2W (stride 2) -> 2W, clip(x, -1, 1)
  after each BatchNorm, global average pool, FP linear head; the inner three convs quantized."""

  quantized_names = ("conv2", "conv3", "conv4")

  def __init__(self, in_features: int, width: int, num_classes: int, *, bits, weight_quantizer="fixed",
               scale_method="mse", rngs: nnx.Rngs):
    self.side = math.isqrt(in_features)
    if self.side ** 2 != in_features:
      raise ValueError(f"BNCNN needs square single-channel images, got {in_features} features")
    quant = dict(weight_bits=bits, act_bits=bits, signed_act=True, weight_quantizer=weight_quantizer,
                 scale_method=scale_method)
    fp = dict(weight_bits=None, act_bits=None)
    conv = lambda i, o, stride, q: trquant.nnx.QuantConv(i, o, 3, strides=stride, use_bias=False,
                                                         **q, rngs=rngs)
    self.conv1 = conv(1, width, 2, fp)
    self.conv2 = conv(width, width, 1, quant)
    self.conv3 = conv(width, 2 * width, 2, quant)
    self.conv4 = conv(2 * width, 2 * width, 1, quant)
    self.head = trquant.nnx.QuantLinear(2 * width, num_classes, **fp, rngs=rngs)
    self.bn1, self.bn2, self.bn3, self.bn4 = (
        nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        for c in (width, width, 2 * width, 2 * width))

  def quantized_layers(self):
    return [getattr(self, name) for name in self.quantized_names]

  def __call__(self, x):
    x = x.reshape(x.shape[0], self.side, self.side, 1)
    for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3),
                     (self.conv4, self.bn4)):
      x = jnp.clip(bn(conv(x)), -1.0, 1.0)
    return self.head(jnp.mean(x, axis=(1, 2)))


class MobileNetV2TinyQAT(nnx.Module):
  """``trquant_examples.models.MobileNetV2Tiny`` (5 inverted residuals with depth-wise 3x3 convs,
  BatchNorm, ReLU6, unsigned quantized inputs) on flat single-channel images; the stem and
  the head in full precision, every other conv quantized."""

  def __init__(self, in_features: int, width: int, num_classes: int, *, bits, weight_quantizer="fixed",
               scale_method="mse", rngs: nnx.Rngs):
    del width  # the architecture is fixed
    self.side = math.isqrt(in_features)
    self.net = build_model(
        "mobilenetv2_tiny", num_classes=num_classes, in_channels=1, weight_bits=bits, act_bits=bits,
        first_last="fp", weight_quantizer=weight_quantizer, scale_method=scale_method,
        image_size=self.side, rngs=rngs)

  def quantized_layers(self):
    return [layer for _, layer in trquant.nnx.quant_layers(self.net) if layer.kernel.bits is not None]

  def __call__(self, x):
    return self.net(x.reshape(x.shape[0], self.side, self.side, 1))


MODELS = {"mlp": BNMLP, "cnn": BNCNN, "mbv2tiny": MobileNetV2TinyQAT}


# ---------------------------------------------------------------------------------------
# Methods and optimizers
# ---------------------------------------------------------------------------------------


def method_config(method: str, bits: int, target_tr: float) -> dict:
  """Schedule, scale handling, controller and R_0 of a method name."""
  if method == "lr":
    return dict(schedule="lr", weight_quantizer="fixed")
  if method == "lr-lsq":
    return dict(schedule="lr", weight_quantizer="lsq")
  if method in ("tr", "tr-additive", "tr-momentum"):
    controller = "log" if method == "tr" else method.split("-")[1]
    return dict(schedule="tr", weight_quantizer="fixed", controller=controller, r0=target_tr)
  if method == "tr-auto":
    return dict(schedule="tr", weight_quantizer="fixed", controller="log", r0="auto")
  if method == "tr-auto-sqrt":
    return dict(schedule="tr", weight_quantizer="fixed", controller="log", r0="auto",
                auto_shape="sqrt-cosine")
  if method.startswith("tr-l"):
    lam = float(method[len("tr-l"):])
    return dict(schedule="tr", weight_quantizer="fixed", controller="log", r0=lam * math.sqrt(bits))
  raise ValueError(f"unknown method {method!r}")


RECIPES = {
    # This benchmark's earlier recipe: MSE weight scales, weight decay for SGD only, on every
    # parameter, momentum on every parameter.
    "default": dict(scale_init="mse", adam_weight_decay=0.0, reference_groups=False),
    # The TR paper's public CIFAR code: weight steps frozen at 3*std (binary: a +-3 sigma
    # straight-through window), coupled L2 on the gradient of every kernel for SGD and Adam
    # alike (scaled by the TALR under TR), no decay and no momentum on scales, BN and biases.
    "reference": dict(scale_init="std3", adam_weight_decay=1e-4, reference_groups=True),
}


def base_optimizer(name, learning_rate, weight_decay, momentum=True):
  """SGD (momentum 0.9) or Adam, each with coupled L2: the decay is added to the gradient
  before the optimizer's moments (``weight_decay=0`` for none)."""
  decay = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  if name == "sgd":
    return optax.chain(*decay, optax.sgd(learning_rate, momentum=0.9 if momentum else None))
  if name == "adam":
    return optax.chain(*decay, optax.adam(learning_rate))
  raise ValueError(f"unknown optimizer {name!r}")


def parameter_groups(model, reference_groups: bool):
  """``optax.partition`` labels: "quant" (quantized kernels) and "float" (the rest), or with
  ``reference_groups`` "quant", "kernel" (FP kernels) and "other" (BN, biases, scales)."""
  def label(variable):
    if isinstance(variable, trquant.nnx.QuantWeight):
      return "quant" if variable.bits is not None else ("kernel" if reference_groups else "float")
    return "other" if reference_groups else "float"

  return jax.tree.map(label, nnx.state(model, nnx.Param),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def lsq_codes_fn(model):
  """codes_fn over the whole params tree for learned scales: reads each scale from params."""
  names = model.quantized_names
  bits = model.quantized_layers()[0].kernel.bits
  unwrap = lambda x: x.get_value() if isinstance(x, nnx.Variable) else x

  def codes(params):
    scales = {name: unwrap(params[name]["weight_scale"]) for name in names}

    def leaf(path, value):
      keys = [getattr(entry, "key", None) for entry in path]
      if len(keys) >= 2 and keys[0] in scales and keys[1] == "kernel":
        return trquant.quantize(value, scales[keys[0]], bits=bits)
      return None

    return jax.tree_util.tree_map_with_path(leaf, params)

  return codes


def make_transform(model, *, optimizer, lr, schedule, weight_quantizer, total_steps, weight_decay,
                   controller=None, r0=None, auto_warmup=None, adam_weight_decay=0.0,
                   reference_groups=False, windup_guard=True, auto_shape="cosine",
                   auto_window=None):
  cosine_lr = optax.cosine_decay_schedule(lr, total_steps)
  decay = weight_decay if optimizer == "sgd" else adam_weight_decay
  float_opt = lambda: base_optimizer(optimizer, cosine_lr, decay)
  if schedule == "lr":
    quant = float_opt()
  else:
    if r0 == "auto":
      # auto_warmup None: the settling warm-up (the default of measured_target).
      shape = (lambda p: jnp.cos(0.5 * jnp.pi * p)) if auto_shape == "sqrt-cosine" else "cosine"
      target = trquant.measured_target(total_steps, warmup_steps=auto_warmup, schedule=shape,
                                       window_steps=auto_window)
    else:
      target = optax.cosine_decay_schedule(r0, total_steps)
    quant = optax.chain(base_optimizer(optimizer, lr, decay),
                        trquant.tr_schedule(target, codes_fn=trquant.nnx.codes_fn(model),
                                            controller=controller, windup_guard=windup_guard))
  if reference_groups:
    other = base_optimizer(optimizer, cosine_lr, 0.0, momentum=False)
    tx = optax.partition({"quant": quant, "kernel": float_opt(), "other": other},
                         parameter_groups(model, True))
  elif schedule == "lr":
    tx = quant
  else:
    tx = optax.partition({"quant": quant, "float": float_opt()}, parameter_groups(model, False))
  codes = trquant.nnx.codes_fn(model) if weight_quantizer == "fixed" else lsq_codes_fn(model)
  # Last: it sees the update that is applied.
  return optax.chain(tx, trquant.track_oscillations(codes_fn=codes)), cosine_lr


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def layer_measures(layer, kernel_before, codes_before):
  """Per-layer measures of one step: transition, latent step / s, near-transition fraction."""
  scale = layer.weight_scale.get_value()
  bits = layer.kernel.bits
  kernel = layer.kernel.get_value()
  codes_after = layer.weight_codes()
  transition = jnp.mean(codes_before != codes_after, dtype=jnp.float32)
  step = jnp.mean(jnp.abs(kernel - kernel_before)) / jnp.mean(scale)
  v = kernel / scale
  if bits == 1:
    distance = jnp.abs(v)  # the one transition point is 0
  else:
    lo, hi = trquant.quant_range(bits)
    boundary = jnp.clip(jnp.floor(v) + 0.5, lo + 0.5, hi - 0.5)
    distance = jnp.abs(v - boundary)
  near = jnp.mean(distance < NEAR_TRANSITION, dtype=jnp.float32)
  # Outside the grid's range the straight-through gradient is 0: such weights only move by
  # weight decay.
  lo, hi = trquant.quant_range(bits)
  beyond = jnp.mean((v < lo) | (v > hi), dtype=jnp.float32)
  return transition, step, near, beyond


def make_chunk_fn(graphdef, *, batch_size, scan=True):
  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, indices, train_x, train_y):
    model, optimizer = nnx.merge(graphdef, carry)
    x, y = train_x[indices], train_y[indices]
    layers = model.quantized_layers()
    kernels = [layer.kernel.get_value() for layer in layers]
    codes = [layer.weight_codes() for layer in layers]
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    measures = [layer_measures(layer, k, c) for layer, k, c in zip(layers, kernels, codes)]
    record = {
        "loss": loss,
        "transition_rate": jnp.stack([m[0] for m in measures]),
        "latent_step": jnp.stack([m[1] for m in measures]),
        "near_transition": jnp.stack([m[2] for m in measures]),
        "beyond_range": jnp.stack([m[3] for m in measures]),
        "oscillating": trquant.nnx.oscillation_stats(optimizer)["oscillating_fraction"],
    }
    state = trquant.nnx.values(optimizer.opt_state)
    multiplier = optax.tree.get(state, "talr_multiplier")
    if multiplier is not None:
      record["talr_multiplier"] = multiplier
      record["running_transition_rate"] = optax.tree.get(state, "running_transition_rate")
      record["target_transition_rate"] = optax.tree.get(state, "target_transition_rate")
      record["initial_target_rate"] = optax.tree.get(state, "initial_target_rate")
      record["warmup_end_step"] = optax.tree.get(state, "warmup_end_step")
      record["windup_events"] = optax.tree.get(state, "windup_events")
      record["multiplier_ceiling"] = optax.tree.get(state, "multiplier_ceiling")
    return nnx.state((model, optimizer)), record

  # Seeds run side by side (a leading axis on the carry and the indices): one program
  # for all of them, which on a small model costs little more than one.
  seeds_step = jax.vmap(step, in_axes=(0, 0, None, None))

  return chunk_of_steps(seeds_step, scan=scan)


def chunk_of_steps(step, *, scan):
  """``chunk(carry, indices, train_x, train_y) -> (carry, stacked records)`` running
  ``step(carry, indices[t], train_x, train_y)`` for every t: one jitted ``lax.scan``, or
  with ``scan=False`` one jitted step per Python iteration (XLA:CPU runs convolutions
  inside a scan body ~15x slower than in a top-level program: jax 0.10.2, the BN CNN's
  step 85 vs 5.7 ms)."""
  if scan:
    return jax.jit(lambda carry, indices, x, y: jax.lax.scan(
        lambda c, i: step(c, i, x, y), carry, indices))
  jitted_step = jax.jit(step)

  def chunk(carry, indices, x, y):
    records = []
    for step_indices in indices:
      carry, record = jitted_step(carry, step_indices, x, y)
      records.append(record)
    return carry, jax.tree.map(lambda *r: jnp.stack(r), *records)

  return chunk


def make_eval_fn(graphdef):
  @jax.jit
  @jax.vmap
  def evaluate(carry, test_x, test_y):
    model, _ = nnx.merge(graphdef, carry)
    model.eval()
    logits = model(test_x)
    return jnp.mean(jnp.argmax(logits, -1) == test_y)

  return lambda carry, test_x, test_y: evaluate(carry, *jax.tree.map(
      lambda a: jnp.broadcast_to(a, (len(jax.tree.leaves(carry)[0]),) + a.shape), (test_x, test_y)))


def data_order(seed: int, num_examples: int, batch_size: int):
  """Yields (batch_size,) index arrays, epoch after epoch, shuffled by `seed`."""
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(num_examples)
    for start in range(0, num_examples - batch_size + 1, batch_size):
      yield order[start:start + batch_size]


def seed_slice(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def train(model, tx, data, *, steps, eval_every, batch_size, seeds, log=None, stepped=False):
  """Trains copies of `model` with `tx`, one per seed (data order), side by side in scanned
  chunks; returns ([model per seed], per-step records (steps, seeds, ...), eval curves).

  With ``stepped`` the seeds run one after the other, one jitted step per Python
  iteration (conv models: vmapped and scanned convolutions are slow on XLA:CPU)."""
  if stepped and len(seeds) > 1:
    outputs = [train(model, tx, data, steps=steps, eval_every=eval_every, batch_size=batch_size,
                     seeds=[seed], log=log, stepped=True) for seed in seeds]
    models = [m for out in outputs for m in out[0]]
    records = {key: np.concatenate([out[1][key] for out in outputs], axis=1) for key in outputs[0][1]}
    evals = [(step, [a for out in outputs for a in out[2][i][1]])
             for i, (step, _) in enumerate(outputs[0][2])]
    return models, records, evals
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, carry = nnx.split((model, optimizer))
  carry = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(seeds),) + a.shape), carry)
  chunk_fn = make_chunk_fn(graphdef, batch_size=batch_size, scan=not stepped)
  evaluate = make_eval_fn(graphdef)
  train_x, train_y, test_x, test_y = data
  orders = [data_order(seed, train_x.shape[0], batch_size) for seed in seeds]
  records, evals = [], []
  done, start = 0, time.time()
  while done < steps:
    n = min(eval_every, steps - done)
    indices = np.stack([np.stack([next(order) for order in orders]) for _ in range(n)])
    carry, record = chunk_fn(carry, jnp.asarray(indices, jnp.int32), train_x, train_y)
    done += n
    records.append(jax.device_get(record))
    evals.append((done, np.asarray(evaluate(carry, test_x, test_y)).tolist()))
    if log:
      log(f"  step {done}/{steps}: test {np.round(evals[-1][1], 4).tolist()},"
          f" {(time.time() - start) / done * 1e3:.2f} ms/step")
  models = [nnx.merge(graphdef, seed_slice(carry, i))[0] for i in range(len(seeds))]
  merged = {key: np.concatenate([r[key] for r in records]) for key in records[0]}
  return models, merged, evals


def window_means(values, points=CURVE_POINTS):
  """Means over `points` equal windows (axis 0): curves small enough for JSON."""
  values = np.asarray(values, np.float64)
  windows = np.array_split(values, min(points, len(values)))
  # Four significant digits: the curves are for plots and ratios, and the JSONs stay small.
  return [np.vectorize(lambda v: float(f"{v:.4g}"))(np.mean(w, axis=0)).tolist() for w in windows]


def batchnorm_reestimated_accuracy(model, data, seed, batch_size):
  train_x, _, test_x, test_y = data
  order = data_order(seed + 10_000, train_x.shape[0], batch_size)
  trquant.nnx.reestimate_batchnorm(model, (train_x[next(order)] for _ in range(50)), 50)
  model.eval()
  return float(jnp.mean(jnp.argmax(model(test_x), -1) == test_y))


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------


def load_data(args):
  dataset = datasets.normalize(datasets.load_dataset(args.dataset, args.data_dir))
  flat = lambda images: jnp.asarray(images.reshape(images.shape[0], -1), jnp.float32)
  return (flat(dataset.train_images), jnp.asarray(dataset.train_labels, jnp.int32),
          flat(dataset.test_images), jnp.asarray(dataset.test_labels, jnp.int32)), dataset.num_classes


def fp_checkpoint(args, data, num_classes, log):
  path = os.path.join(args.out, f"fp_{args.model}{args.width}.npz")
  record = os.path.join(args.out, f"fp_{args.model}{args.width}.json")
  if os.path.exists(path) and os.path.exists(record):
    with open(record) as f:
      accuracy = json.load(f)["final_test_accuracy"]
    log(f"FP {args.model}-{args.width}: {accuracy:.4f} (reused {path}, sha256"
        f" {checkpoint_hash(path)[:12]})")
    return path, accuracy
  model = MODELS[args.model](data[0].shape[1], args.width, num_classes, bits=None, rngs=nnx.Rngs(1234))
  tx = optax.chain(optax.adam(optax.cosine_decay_schedule(1e-3, args.fp_steps)),
                   optax.identity())
  # The FP model has no quantized layer: train it with a plain loop of the same chunks.
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, carry = nnx.split((model, optimizer))

  def step(carry, indices, train_x, train_y):
    model, optimizer = nnx.merge(graphdef, carry)
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(train_x[indices]), train_y[indices]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  chunk = chunk_of_steps(step, scan=args.model == "mlp")
  order = data_order(9999, data[0].shape[0], args.batch_size)
  done = 0
  while done < args.fp_steps:
    n = min(args.eval_every, args.fp_steps - done)
    indices = jnp.asarray(np.stack([next(order) for _ in range(n)]), jnp.int32)
    carry, _ = chunk(carry, indices, data[0], data[1])
    done += n
  model, _ = nnx.merge(graphdef, carry)
  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model(data[2]), -1) == data[3]))
  flat = {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}
  np.savez(path, **flat)
  with open(record, "w") as f:
    json.dump({"final_test_accuracy": accuracy, "steps": args.fp_steps, "width": args.width,
               "checkpoint_sha256": checkpoint_hash(path), "provenance": provenance(None)}, f)
  log(f"FP {args.model}-{args.width}: {accuracy:.4f} ({args.fp_steps} Adam steps, sha256"
      f" {checkpoint_hash(path)[:12]})")
  return path, accuracy


def checkpoint_hash(path) -> str:
  """sha256 of a checkpoint's arrays (names, dtypes, shapes, bytes; sorted by name). The
  .npz file itself carries zip timestamps, so its bytes differ between identical saves."""
  digest = hashlib.sha256()
  with np.load(path) as arrays:
    for name in sorted(arrays.files):
      value = np.ascontiguousarray(arrays[name])
      digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
      digest.update(value.tobytes())
  return digest.hexdigest()


def cpu_model() -> str:
  """The processor's model name (/proc/cpuinfo on Linux, else the platform's word)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def provenance(fp_path) -> dict:
  """What a run's numbers depend on besides its arguments: the code, the library versions,
  the processor, the XLA flags and the FP checkpoint. Runs are paired only when these agree
  (`--summary-only` refuses otherwise unless `--allow-mixed-provenance`)."""
  return {
      "code_version": code_version(),
      "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
      "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
      "cpu": cpu_model(), "cpu_count": os.cpu_count(),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "fp_checkpoint_sha256": checkpoint_hash(fp_path) if fp_path else None,
  }


def recipe_of(args) -> dict:
  """The recipe's settings with the command line's overrides."""
  recipe = dict(RECIPES[args.recipe])
  if args.scale_init is not None:
    recipe["scale_init"] = args.scale_init
  if args.adam_weight_decay is not None:
    recipe["adam_weight_decay"] = args.adam_weight_decay
  return recipe


def run_name(model, width, bits, optimizer, method, lr, seed):
  return f"{model}{width}-W{bits}A{bits}-{optimizer}-{method}-lr{lr:g}-s{seed}"


def run_seeds(args, data, num_classes, fp_path, *, bits, optimizer, method, lr, seeds, log):
  """One method on every seed (side by side); returns one result dict per seed."""
  config = method_config(method, bits, args.target_tr)
  recipe = recipe_of(args)
  model = MODELS[args.model](data[0].shape[1], args.width, num_classes, bits=bits,
                weight_quantizer=config["weight_quantizer"], scale_method=recipe["scale_init"],
                rngs=nnx.Rngs(0))
  trquant.nnx.load_float_weights(model, dict(np.load(fp_path)))
  trquant.nnx.init_weight_scales(model)
  model.eval()
  trquant.nnx.calibrate_activations(model, data[0][:512])
  model.train()
  # The earlier fixed warm-up (1% of the run) or the settling warm-up of measured_target.
  auto_warmup = max(args.steps // 100, 50) if args.auto_warmup == "fixed" else None
  tx, _ = make_transform(model, optimizer=optimizer, lr=lr, total_steps=args.steps,
                         weight_decay=args.weight_decay, auto_warmup=auto_warmup,
                         adam_weight_decay=recipe["adam_weight_decay"],
                         reference_groups=recipe["reference_groups"],
                         windup_guard=not args.no_windup_guard, auto_window=args.auto_window,
                         **config)
  config = dict(config, recipe=args.recipe, **recipe, windup_guard=not args.no_windup_guard,
                auto_warmup=args.auto_warmup, auto_window=args.auto_window)
  start = time.time()
  models, records, evals = train(model, tx, data, steps=args.steps, eval_every=args.eval_every,
                                 batch_size=args.batch_size, seeds=seeds,
                                 log=log if args.verbose else None,
                                 stepped=args.model != "mlp")
  seconds = time.time() - start
  tail = slice(int(0.9 * args.steps), None)
  head = slice(0, int(0.9 * args.steps))
  results = []
  run_provenance = provenance(fp_path)
  version = run_provenance["code_version"]
  for i, seed in enumerate(seeds):
    curve = [(step, accuracies[i]) for step, accuracies in evals]
    last = [a for _, a in curve[-10:]]
    per_seed = {key: value[:, i] for key, value in records.items()}
    result = {
        "name": run_name(args.model, args.width, bits, optimizer, method, lr, seed),
        "model": args.model, "width": args.width, "bits": bits, "optimizer": optimizer, "method": method, "lr": lr,
        "seed": seed, "steps": args.steps, "batch_size": args.batch_size, "config": config,
        "final_test_accuracy": curve[-1][1],
        "bn_reestimated_accuracy": batchnorm_reestimated_accuracy(models[i], data, seed,
                                                                  args.batch_size),
        "last10_mean": float(np.mean(last)), "last10_std": float(np.std(last)),
        "eval_curve": curve, "seconds_all_seeds": seconds, "seeds_side_by_side": len(seeds),
        "device": jax.devices()[0].device_kind, "code_version": version,
        "provenance": run_provenance,
        "oscillating_last10pct": np.mean(per_seed["oscillating"][tail], axis=0).tolist(),
        "transition_rate_last10pct": np.mean(per_seed["transition_rate"][tail], axis=0).tolist(),
        "near_transition_last10pct": np.mean(per_seed["near_transition"][tail], axis=0).tolist(),
        "beyond_range_last10pct": np.mean(per_seed["beyond_range"][tail], axis=0).tolist(),
        "curves": {key: window_means(value) for key, value in per_seed.items()},
        "curve_points": CURVE_POINTS,
    }
    if "talr_multiplier" in per_seed:
      running, target = per_seed["running_transition_rate"], per_seed["target_transition_rate"]
      safe = np.where(target > 0, target, np.nan)[:, None]
      # Tracking error over the first 90% (the target is ~0 at the very end).
      result["tracking_rel_error"] = float(np.nanmean(
          np.abs(running[head] - target[head, None]) / safe[head]))
      result["auto_r0"] = float(per_seed["initial_target_rate"][-1]) \
          if config.get("r0") == "auto" else None
      result["warmup_end_step"] = int(per_seed["warmup_end_step"][-1]) \
          if config.get("r0") == "auto" else None
      result["windup_events"] = np.asarray(per_seed["windup_events"][-1]).tolist()
      result["multiplier_ceiling_final"] = np.asarray(per_seed["multiplier_ceiling"][-1]).tolist()
    results.append(result)
  return results


# ---------------------------------------------------------------------------------------
# Summary: tables and plots from the run JSONs
# ---------------------------------------------------------------------------------------


@functools.cache
def code_version():
  """The checkout's commit (read once, at the first call: the code a process runs is the
  code it imported), with "+changes" when the code a run executes (trquant/, the
  examples' models and data, this script) differs from it; None outside a git checkout.
  A summary must not set runs of different code side by side."""
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                            capture_output=True, text=True).stdout.strip()
    changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                              "trquant", "examples/trquant_examples", "benchmarks/tr_long.py"],
                             cwd=root, check=True,
                             capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+changes" if changes else "")


def provenance_labels(runs):
  """Groups runs by provenance: ({label: [runs]}, {label: provenance}), labels P1, P2, ...
  in order of first appearance. A run made before provenance was recorded counts by its
  code version alone (None when that is missing too)."""
  labels, provenances, keys = {}, {}, {}
  for r in runs:
    p = r.get("provenance") or ({"code_version": r["code_version"]} if "code_version" in r else {})
    key = json.dumps(p, sort_keys=True)
    if key not in keys:
      keys[key] = f"P{len(keys) + 1}"
      provenances[keys[key]] = p
      labels[keys[key]] = []
    labels[keys[key]].append(r)
  return labels, provenances


def load_runs(out):
  runs = []
  for path in sorted(pathlib.Path(out).glob("*-W*A*-*.json")):
    with open(path) as f:
      runs.append(json.load(f))
  return runs


def _fmt(values, scale=100.0, digits=2):
  values = np.asarray(values, float) * scale
  return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def _group(runs, **match):
  return sorted((r for r in runs if all(r.get(k) == v for k, v in match.items())),
                key=lambda r: r["seed"])


def _paired(runs_a, runs_b, key="final_test_accuracy"):
  """Mean and standard error of the per-seed difference a - b (same seeds, same data order),
  the number of pairs and the two-sided paired t-test's p-value."""
  b_by_seed = {r["seed"]: r[key] for r in runs_b}
  diffs = np.array([r[key] - b_by_seed[r["seed"]] for r in runs_a if r["seed"] in b_by_seed]) * 100
  if len(diffs) < 2:
    return None
  se = float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
  return float(diffs.mean()), se, len(diffs), _t_test_p(float(diffs.mean()), se, len(diffs) - 1)


def _t_test_p(mean, se, dof):
  """Two-sided p-value of a t statistic mean / se with `dof` degrees of freedom."""
  if se == 0.0:
    return 0.0 if mean != 0.0 else 1.0
  from scipy import stats
  return float(2 * stats.t.sf(abs(mean / se), dof))


def _delta_text(paired):
  if paired is None:
    return ""
  mean, se, _, p = paired
  return f"{mean:+.2f} ± {se:.2f} (p {p:.2g})"


def _mean_layers(values):
  return float(np.mean(values))


def summarize(out, allow_mixed_provenance=False):
  runs = load_runs(out)
  if not runs:
    raise SystemExit(f"no run JSONs in {out}")
  fp = runs[0]["fp_accuracy"]
  width = runs[0]["width"]
  steps = runs[0]["steps"]
  if runs[0].get("model", "mlp") == "mlp":
    model_text = f"BN MLP 784-{width}-{width}-{width}-10"
  elif runs[0]["model"] == "mbv2tiny":
    model_text = "MobileNetV2-tiny (5 inverted residuals, FP stem and head)"
  else:
    model_text = f"BN CNN (3x3 convs {width}-{width}-{2 * width}-{2 * width}, inner three quantized)"
  lines = [f"# TR vs LR scheduling at {steps // 1000}K steps: {model_text}, Fashion-MNIST",
           "", f"FP checkpoint: {fp * 100:.2f}%. Device: {runs[0]['device']}. Accuracy in %,"
           " mean ± std over seeds (per-seed values in the last column). Δ vs `lr` is the paired"
           " per-seed difference (same data order), mean ± standard error, with the two-sided"
           " paired t-test's p-value.", ""]
  versions = sorted({str(r.get("code_version")) for r in runs})
  labels, provenances = provenance_labels(runs)
  if len(provenances) > 1:
    # Runs of another code, library, processor, XLA flags or FP checkpoint are not paired
    # silently: the same configuration moves by more than most effects between them.
    differing = sorted({key for a in provenances.values() for b in provenances.values()
                        for key in set(a) | set(b) if a.get(key) != b.get(key)})
    message = (f"{out}: the runs' provenance differs in {', '.join(differing)}"
               f" ({len(provenances)} groups: "
               + "; ".join(f"{label}: {len(labels[label])} runs" for label in provenances)
               + "). Rerun the pairs together, or pass --allow-mixed-provenance to summarise"
               " anyway (the tables then name each row's provenance group).")
    if not allow_mixed_provenance:
      raise SystemExit(message)
    lines += ["**Mixed provenance** (summarised with --allow-mixed-provenance): the groups differ in "
              + ", ".join(differing) + "; the `prov.` column names each row's groups:", ""]
    lines += [f"- {label}: " + ", ".join(f"{key} {value}" for key, value in sorted(p.items())
                                        if key in differing)
              for label, p in provenances.items()] + [""]
  elif not provenances or next(iter(provenances.values())) == {}:
    lines += ["Provenance: not recorded in these runs (made before the runs recorded it).", ""]
  else:
    only = next(iter(provenances.values()))
    lines += ["Provenance (every run): " + ", ".join(f"{key} {value}" for key, value in
                                                   sorted(only.items())), ""]
  prov_of = {id(r): label for label, group in labels.items() for r in group}
  summary = {"fp_accuracy": fp, "width": width, "settings": [], "code_versions": versions,
             "provenance": provenances}
  default_lr = {o: DEFAULT_LR[o] for o in DEFAULT_LR}
  bits_list = sorted({r["bits"] for r in runs})
  optimizers = [o for o in ("sgd", "adam") if any(r["optimizer"] == o for r in runs)]
  method_order = ["lr", "lr-lsq", "tr", "tr-l2e-3", "tr-l5e-3", "tr-auto", "tr-auto-sqrt",
                  "tr-additive", "tr-momentum"]

  lines += ["## Accuracy", "",
            "| setting | method | R_0 | seeds | final | BN re-est. | last 10 evals | Δ vs lr | per seed |"
            + (" prov. |" if len(provenances) > 1 else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if len(provenances) > 1 else "")]
  for bits in bits_list:
    for optimizer in optimizers:
      lr0 = default_lr[optimizer]
      base = _group(runs, bits=bits, optimizer=optimizer, method="lr", lr=lr0)
      for method in method_order:
        group = _group(runs, bits=bits, optimizer=optimizer, method=method, lr=lr0)
        if not group:
          continue
        final = [r["final_test_accuracy"] for r in group]
        paired = _paired(group, base) if method != "lr" else None
        r0 = group[0]["config"].get("r0")
        if r0 == "auto":
          r0_text = "auto " + ", ".join(f"{r['auto_r0']:.1e}" for r in group[:1])
        else:
          r0_text = "" if r0 is None else f"{r0:.2g}"
        entry = {"bits": bits, "optimizer": optimizer, "method": method, "lr": lr0,
                 "seeds": [r["seed"] for r in group], "final": final,
                 "bn_reestimated": [r["bn_reestimated_accuracy"] for r in group],
                 "last10": [r["last10_mean"] for r in group],
                 "delta_vs_lr": paired,
                 "oscillating_last10pct": [_mean_layers(r["oscillating_last10pct"]) for r in group],
                 "transition_rate_last10pct": [_mean_layers(r["transition_rate_last10pct"])
                                               for r in group],
                 "near_transition_last10pct": [_mean_layers(r["near_transition_last10pct"])
                                               for r in group],
                 "beyond_range_last10pct": [_mean_layers(r["beyond_range_last10pct"])
                                            for r in group if "beyond_range_last10pct" in r],
                 "tracking_rel_error": [r.get("tracking_rel_error") for r in group],
                 "auto_r0": [r.get("auto_r0") for r in group]}
        summary["settings"].append(entry)
        delta = _delta_text(paired)
        lines.append(
            f"| W{bits}A{bits} {optimizer} | {method} | {r0_text} | {len(group)} | {_fmt(final)} |"
            f" {_fmt(entry['bn_reestimated'])} | {_fmt(entry['last10'])} | {delta} |"
            f" {', '.join(f'{a * 100:.2f}' for a in final)} |"
            + (f" {','.join(sorted({prov_of[id(r)] for r in group + base}))} |"
               if len(provenances) > 1 else ""))
  lines += ["", f"FP − `lr` gap: " + ", ".join(
      f"W{e['bits']}A{e['bits']} {e['optimizer']} {fp * 100 - np.mean(e['final']) * 100:.2f}"
      for e in summary["settings"] if e["method"] == "lr"), ""]

  lines += ["## Mechanism (last 10% of the steps, mean over seeds and the quantized layers)", "",
            "| setting | method | transition rate k | oscillating | near a transition point |"
            " beyond the grid | tracking error |K-R|/R (first 90%) |",
            "|---|---|---|---|---|---|---|"]
  for e in summary["settings"]:
    tracking = [t for t in e["tracking_rel_error"] if t is not None]
    beyond = e["beyond_range_last10pct"]
    lines.append(
        f"| W{e['bits']}A{e['bits']} {e['optimizer']} | {e['method']} |"
        f" {np.mean(e['transition_rate_last10pct']):.2e} | {np.mean(e['oscillating_last10pct']) * 100:.3f}% |"
        f" {np.mean(e['near_transition_last10pct']) * 100:.2f}% |"
        f" {f'{np.mean(beyond) * 100:.2f}%' if beyond else ''} |"
        f" {f'{np.mean(tracking):.3f}' if tracking else ''} |")

  lines += ["", "## Over the run (mean over seeds and the quantized layers)", "",
            "| setting | method | u at 10% / 50% / 90% | peak u | beyond the grid at 10% / 50% / end |"
            " windup events (all seeds, layers) | warm-up end (tr-auto) |",
            "|---|---|---|---|---|---|---|"]
  for e in summary["settings"]:
    group = _group(runs, bits=e["bits"], optimizer=e["optimizer"], method=e["method"], lr=e["lr"])
    curves = [r["curves"] for r in group]
    points = len(curves[0]["transition_rate"])
    at = lambda key, fraction: np.mean([np.mean(c[key][min(int(fraction * points), points - 1)])
                                        for c in curves])
    u_text = peak_text = events_text = warmup_text = ""
    if "talr_multiplier" in curves[0]:
      u_text = " / ".join(f"{at('talr_multiplier', f):.3g}" for f in (0.1, 0.5, 0.9))
      peak_text = f"{np.mean([np.max(np.mean(c['talr_multiplier'], axis=1)) for c in curves]):.3g}"
      if all("windup_events" in r for r in group):
        events_text = str(int(sum(np.sum(r["windup_events"]) for r in group)))
      ends = [r.get("warmup_end_step") for r in group if r.get("warmup_end_step") is not None]
      warmup_text = ", ".join(str(v) for v in ends)
    beyond_text = ""
    if "beyond_range" in curves[0]:
      beyond_text = " / ".join(f"{at('beyond_range', f) * 100:.0f}%" for f in (0.1, 0.5, 0.999))
    e["over_the_run"] = {"u": u_text, "peak_u": peak_text, "beyond": beyond_text,
                         "windup_events": events_text, "warmup_end": warmup_text}
    lines.append(f"| W{e['bits']}A{e['bits']} {e['optimizer']} | {e['method']} | {u_text} |"
                 f" {peak_text} | {beyond_text} | {events_text} | {warmup_text} |")

  # Base-LR sweeps: every (setting, method) run at more than one LR multiplier.
  sweeps = {}
  for r in runs:
    sweeps.setdefault((r["bits"], r["optimizer"], r["method"]), set()).add(r["lr"])
  sweeps = {key: sorted(lrs) for key, lrs in sweeps.items() if len(lrs) > 1}
  if sweeps:
    mults = sorted({round(lr / DEFAULT_LR[key[1]], 6) for key, lrs in sweeps.items() for lr in lrs})
    lines += ["", "## Base-LR sweep (test accuracy, mean ± std over the seeds run at each LR)", "",
              "| setting | method | " + " | ".join(f"LR ×{m:g}" for m in mults) + " |",
              "|---|---|" + "---|" * len(mults)]
    summary["lr_sweep"] = []
    for (bits, optimizer, method), lrs in sorted(sweeps.items()):
      cells = []
      for mult in mults:
        lr = DEFAULT_LR[optimizer] * mult
        match = [r for r in runs if r["bits"] == bits and r["optimizer"] == optimizer
                 and r["method"] == method and abs(r["lr"] - lr) < 1e-9 * max(lr, 1)]
        finals = [r["final_test_accuracy"] for r in sorted(match, key=lambda r: r["seed"])]
        cells.append(f"{_fmt(finals)} (n={len(finals)})" if finals else "")
        if finals:
          summary["lr_sweep"].append({"bits": bits, "optimizer": optimizer, "method": method,
                                      "lr_multiplier": mult, "seeds": [r["seed"] for r in match],
                                      "final": finals})
      lines.append(f"| W{bits}A{bits} {optimizer} | {method} | " + " | ".join(cells) + " |")
    lines += _robustness_lines(summary["lr_sweep"], summary)
    lines += _sweep_delta_lines(runs, mults, summary)

  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(runs, out)
  if summary.get("lr_sweep"):
    plot_lr_sweep(summary["lr_sweep"], out)
  print("\n".join(lines))


def _robustness_lines(sweep, summary):
  """Per setting and method: the best multiplier and its accuracy, and the drop from that
  best at each multiplier every method of the setting was run at (the shared ones)."""
  lines = ["", "## Robustness to the base LR (multipliers every method of a setting ran at)", "",
           "| setting | method | best ×LR | at its best | drop from its own best at each shared ×LR"
           " | mean drop |", "|---|---|---|---|---|---|"]
  summary["lr_robustness"] = []
  for bits, optimizer in sorted({(e["bits"], e["optimizer"]) for e in sweep}):
    rows = [e for e in sweep if (e["bits"], e["optimizer"]) == (bits, optimizer)]
    methods = sorted({e["method"] for e in rows})
    shared = sorted(set.intersection(*({e["lr_multiplier"] for e in rows if e["method"] == m}
                                       for m in methods)))
    for method in methods:
      mean = {e["lr_multiplier"]: float(np.mean(e["final"])) * 100 for e in rows
              if e["method"] == method and e["lr_multiplier"] in shared}
      if not mean:
        continue
      best = max(mean, key=mean.get)
      drops = {m: mean[best] - mean[m] for m in shared}
      summary["lr_robustness"].append({"bits": bits, "optimizer": optimizer, "method": method,
                                       "best_multiplier": best, "best": mean[best],
                                       "drops": drops})
      lines.append(f"| W{bits}A{bits} {optimizer} | {method} | ×{best:g} | {mean[best]:.2f} | "
                   + ", ".join(f"×{m:g} {drops[m]:.2f}" for m in shared)
                   + f" | {np.mean(list(drops.values())):.2f} |")
  return lines


def _sweep_delta_lines(runs, mults, summary):
  """Per setting, method and base-LR multiplier: the paired difference to cosine LR (`lr`)
  at the same multiplier, over the seeds both ran (mean ± SE, paired t-test p-value)."""
  lines = ["", "## Δ vs cosine LR at each base LR (paired over seeds: mean ± SE, p)", "",
           "| setting | method | " + " | ".join(f"LR ×{m:g}" for m in mults) + " |",
           "|---|---|" + "---|" * len(mults)]
  summary["lr_sweep_deltas"] = []
  settings = sorted({(r["bits"], r["optimizer"]) for r in runs})
  for bits, optimizer in settings:
    def at(method, mult):
      lr = DEFAULT_LR[optimizer] * mult
      return [r for r in runs if (r["bits"], r["optimizer"], r["method"]) == (bits, optimizer, method)
              and abs(r["lr"] - lr) < 1e-9 * max(lr, 1)]
    for method in sorted({r["method"] for r in runs} - {"lr"}):
      cells = []
      for mult in mults:
        paired = _paired(at(method, mult), at("lr", mult))
        cells.append(_delta_text(paired))
        if paired is not None:
          summary["lr_sweep_deltas"].append(
              {"bits": bits, "optimizer": optimizer, "method": method, "lr_multiplier": mult,
               "delta": paired[0], "se": paired[1], "n": paired[2], "p": paired[3]})
      if any(cells):
        lines.append(f"| W{bits}A{bits} {optimizer} | {method} | " + " | ".join(cells) + " |")
  return lines


def plot_lr_sweep(sweep, out):
  """Test accuracy against the base-LR multiplier, one line per method: lr_sweep.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  settings = sorted({(e["bits"], e["optimizer"]) for e in sweep})
  fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.5), squeeze=False)
  for ax, (bits, optimizer) in zip(axes[0], settings):
    for method in sorted({e["method"] for e in sweep}):
      rows = sorted((e for e in sweep if (e["bits"], e["optimizer"], e["method"])
                     == (bits, optimizer, method)), key=lambda e: e["lr_multiplier"])
      if not rows:
        continue
      x = [e["lr_multiplier"] for e in rows]
      mean = np.array([np.mean(e["final"]) for e in rows]) * 100
      std = np.array([np.std(e["final"], ddof=1) if len(e["final"]) > 1 else 0.0
                      for e in rows]) * 100
      low = np.array([np.min(e["final"]) for e in rows]) * 100
      high = np.array([np.max(e["final"]) for e in rows]) * 100
      line, = ax.plot(x, mean, marker="o", label=f"{method} (mean, seed range shaded)")
      ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel(f"base LR / {DEFAULT_LR[optimizer]:g}")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"W{bits}A{bits} {optimizer}", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "lr_sweep.png"), dpi=80)
  plt.close(fig)


def plot(runs, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  settings = sorted({(r["bits"], r["optimizer"]) for r in runs})
  panels = [("transition_rate", "transition rate k (log)"), ("latent_step", "mean |Δw| / s per step (log)"),
            ("effective_lr", "effective LR of the kernels (log)"),
            ("near_transition", "within 5% of a step of a transition point"),
            ("beyond_range", "beyond the grid (no STE gradient)"),
            ("oscillating", "fraction oscillating"), ("accuracy", "test accuracy (%)")]
  colours = {"lr": "C0", "lr-lsq": "C2", "tr": "C3", "tr-auto": "C1", "tr-l2e-3": "C4",
             "tr-auto-sqrt": "C5"}
  fig, axes = plt.subplots(len(settings), len(panels), figsize=(4 * len(panels), 3 * len(settings)),
                           squeeze=False)
  for row, (bits, optimizer) in enumerate(settings):
    lr0 = DEFAULT_LR[optimizer]
    for method, colour in colours.items():
      group = _group(runs, bits=bits, optimizer=optimizer, method=method, lr=lr0)
      if not group:
        continue
      steps = group[0]["steps"]
      points = len(group[0]["curves"]["transition_rate"])
      x = (np.arange(points) + 0.5) * steps / points
      for col, (key, title) in enumerate(panels):
        ax = axes[row, col]
        if key == "accuracy":
          curve = np.mean([[a for _, a in r["eval_curve"]] for r in group], axis=0) * 100
          ax.plot([s for s, _ in group[0]["eval_curve"]], curve, color=colour, label=method)
          continue
        if key == "effective_lr":
          cosine = 0.5 * (1 + np.cos(np.pi * x / steps)) * lr0
          if "talr_multiplier" in group[0]["curves"]:
            u = np.mean([np.mean(r["curves"]["talr_multiplier"], axis=1) for r in group], axis=0)
            y = lr0 * u
          else:
            y = cosine
          ax.semilogy(x, y, color=colour, label=method)
          continue
        if key not in group[0]["curves"]:
          continue
        y = np.mean([np.mean(r["curves"][key], axis=1) for r in group], axis=0)
        (ax.semilogy if key in ("transition_rate", "latent_step") else ax.plot)(
            x, y, color=colour, label=method)
        if key == "transition_rate" and "target_transition_rate" in group[0]["curves"]:
          target = np.mean([r["curves"]["target_transition_rate"] for r in group], axis=0)
          ax.semilogy(x, np.maximum(target, 1e-7), color=colour, ls=":", lw=1)
    for col, (_, title) in enumerate(panels):
      axes[row, col].set_title(f"W{bits}A{bits} {optimizer}: {title}", fontsize=8)
      axes[row, col].set_xlabel("step", fontsize=7)
    axes[row, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "summary.png"), dpi=80)
  plt.close(fig)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="fashion-mnist")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
  parser.add_argument("--width", type=int, default=64, help="MLP width / CNN channels of the first convs")
  parser.add_argument("--bits", default="1,2", help="comma-separated W=A bit widths")
  parser.add_argument("--optimizers", default="sgd,adam")
  parser.add_argument("--methods", default="lr,lr-lsq,tr,tr-l2e-3,tr-l5e-3")
  parser.add_argument("--lr-mults", default="1", help="LR (U_0) multipliers of the defaults, e.g. 0.3,1,3")
  parser.add_argument("--target-tr", type=float, default=5e-3, help="R_0 of the `tr` method")
  parser.add_argument("--steps", type=int, default=80_000)
  parser.add_argument("--fp-steps", type=int, default=9_400, help="FP training steps (Adam)")
  parser.add_argument("--eval-every", type=int, default=2_000)
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
  parser.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                      help="default: MSE scales, no Adam decay; reference: the TR paper's public code"
                           " (3*std scales, coupled L2 1e-4 for Adam too, no decay/momentum on BN"
                           " and scales)")
  parser.add_argument("--scale-init", choices=("mse", "std3"), default=None,
                      help="override the recipe's weight scale initialiser")
  parser.add_argument("--adam-weight-decay", type=float, default=None,
                      help="override the recipe's coupled L2 for Adam")
  parser.add_argument("--no-windup-guard", action="store_true",
                      help="tr_schedule without its windup guard (the earlier behaviour)")
  parser.add_argument("--auto-warmup", choices=("settle", "fixed"), default="settle",
                      help="tr-auto's warm-up: settling (default) or the earlier fixed 1%%")
  parser.add_argument("--auto-window", type=int, default=None,
                      help="tr-auto's settling window in steps (default: measured_target's, 0.5%% of"
                           " the run)")
  parser.add_argument("--out", default="benchmarks/results/tr_long_mlp")
  parser.add_argument("--verbose", action="store_true")
  parser.add_argument("--summary-only", action="store_true")
  parser.add_argument("--allow-mixed-provenance", action="store_true",
                      help="summarise runs whose provenance (code, libraries, CPU, XLA flags, FP"
                           " checkpoint) differs; the tables then name each row's group")
  parser.add_argument("--quick", action="store_true", help="digits, a few hundred steps")
  args = parser.parse_args(argv)
  if args.quick:
    args.dataset, args.steps, args.fp_steps, args.eval_every = "digits", 200, 300, 100
    args.seeds, args.bits, args.width, args.batch_size = "0,1", "2", 32, 64
  return args


def main(argv=None):
  args = parse_args(argv)
  code_version()  # now, before any later edit of the checkout
  os.makedirs(args.out, exist_ok=True)
  log = lambda message: print(message, flush=True)
  if args.summary_only:
    summarize(args.out, allow_mixed_provenance=args.allow_mixed_provenance)
    return
  if True:
    data, num_classes = load_data(args)
    fp_path, fp_accuracy = fp_checkpoint(args, data, num_classes, log)
    for bits in map(int, args.bits.split(",")):
      for optimizer in args.optimizers.split(","):
        for method in args.methods.split(","):
          for mult in map(float, args.lr_mults.split(",")):
            lr = DEFAULT_LR[optimizer] * mult
            seeds = [seed for seed in map(int, args.seeds.split(","))
                     if not os.path.exists(os.path.join(
                         args.out, run_name(args.model, args.width, bits, optimizer, method, lr, seed) + ".json"))]
            if not seeds:
              continue
            results = run_seeds(args, data, num_classes, fp_path, bits=bits, optimizer=optimizer,
                                method=method, lr=lr, seeds=seeds, log=log)
            for result in results:
              result["fp_accuracy"] = fp_accuracy
              with open(os.path.join(args.out, result["name"] + ".json"), "w") as f:
                json.dump(result, f)
              log(f"{result['name']}: {result['final_test_accuracy']:.4f} (BN re-est."
                  f" {result['bn_reestimated_accuracy']:.4f}), {result['seconds_all_seeds']:.0f} s"
                  " for all seeds")


if __name__ == "__main__":
  main()
