"""Cost of trquant's transforms: train-step time, optimizer-state memory, scaling, loops.

1. Step time of one jitted training step (forward, backward, optimizer, BatchNorm
   statistics) with
     (a) Adam + cosine LR,
     (a') Adam + cosine LR + a bare transition count (``jnp.sum(codes(p) != codes(p + u))``
          per layer, nothing else: the floor of any transform that counts transitions),
     (b') chain(Adam, tr_schedule(..., windup_guard=False)),
     (b) chain(Adam, tr_schedule) (the windup guard on, as by default),
     (c) chain(Adam, tr_schedule, track_oscillations),
     (d) chain(Adam, tr_schedule, freeze_oscillations),
   on weight-heavy models (a 3-layer 1024-wide MLP, batch 256, and a small ViT: patch
   embedding, 4 blocks, width 256, quantized by ``trquant.nnx.quantize_model``; 2-bit weights,
   full-precision activations), the example LM (``--models lm``: 12.8M parameters, W4 in
   groups of 32, batch 8 x 256 tokens) and on the small CNN and ResNet-20 (W2A2). Random data:
   throughput only. Variants are timed interleaved, in a new random order in every
   round, and each round's time per step is kept; the table gives the median, the
   spread (interquartile range) and the ratio of medians to (a). The optimizer update
   alone (fixed gradients) is timed the same way: its excess over (a)'s update, as a
   share of (a)'s whole step, is the transforms' overhead without the step-to-step
   noise of the forward and backward passes.
2. Optimizer-state bytes per quantized weight of each variant beyond Adam's,
   counted from the state pytree.
3. The transform alone (tr_schedule after plain SGD) on a synthetic tree of
   quantized weights of growing size, against a read-modify-write copy of the same
   arrays: time per step, and the bandwidth it reaches counting the 12 bytes per weight
   it must move at least (read params and update, write the scaled update).
4. Training loops: steps/s of the examples' loop pattern (``nnx.jit`` on the model
   and ``nnx.Optimizer``), of the same step through ``nnx.cached_partial``, and of a
   plain ``jax.jit`` step on ``nnx.split`` state with donated buffers, on the models of
   examples/train_digits.py (MLP 64-256-256-10, batch 32) and examples/train_qat.py
   (small CNN, batch 128, Fashion-MNIST-sized 28x28x1 inputs), both with tr_schedule.

    python benchmarks/overhead.py --out benchmarks/results/overhead
    python benchmarks/overhead.py --quick      # small MLP and CNN, small sizes: a minute
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

import trquant
from _runs import cpu_model, git_state
from trquant_examples import models
from trquant_examples.lm import LM
from trquant_examples.vit import ViT

VARIANTS = ("adam_cosine", "adam_count", "adam_tr_noguard", "adam_tr", "adam_tr_track",
            "adam_tr_freeze")
LABELS = {"adam_cosine": "(a) Adam + cosine LR", "adam_count": "(a') (a) + bare transition count",
          "adam_tr_noguard": "(b') + tr_schedule, windup_guard=False",
          "adam_tr": "(b) + tr_schedule", "adam_tr_track": "(c) + track_oscillations",
          "adam_tr_freeze": "(d) + freeze_oscillations"}
# Models whose step is dominated by weight-sized work: 2-bit weights, FP activations; the LM:
# 4-bit weights in groups of 32, the head 8-bit, the embedding float.
WEIGHT_HEAVY = ("mlp", "vit", "lm")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp,vit,cnn,resnet20")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="batch of every model (default: MLP 256, ViT 32, CNNs 128)")
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
  parser.add_argument("--steps-per-round", type=int, default=10)
  parser.add_argument("--sizes", default="1e5,1e6,1e7,1e8",
                      help="quantized weights of the transform-alone scaling test")
  parser.add_argument("--out", default="benchmarks/results/overhead")
  parser.add_argument("--loop-steps", type=int, default=200,
                      help="steps per timing of the training-loop patterns (0: skip part 4)")
  parser.add_argument("--quick", action="store_true",
                      help="small MLP and CNN, 3 rounds, sizes to 1e6, short loops")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.batch_size, args.rounds, args.steps_per_round = "mlp_small,cnn", 32, 3, 3
    args.sizes, args.loop_steps = "1e5,1e6", 20
  return args


DEFAULT_BATCH = {"mlp": 256, "mlp_small": 32, "vit": 32, "lm": 8}
LM_CONTEXT = 256


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class MLP(nnx.Module):
  """A stack of trquant.nnx.QuantLinear layers with ReLUs between them."""

  def __init__(self, features, *, weight_bits, act_bits=None, rngs):
    self.layers = nnx.List([
        trquant.nnx.QuantLinear(d_in, d_out, weight_bits=weight_bits,
                                act_bits=act_bits if i else None, rngs=rngs)
        for i, (d_in, d_out) in enumerate(zip(features[:-1], features[1:]))])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def build(model_name, *, bits, batch_size, rngs):
  """The model (train mode) and a random batch (inputs, integer labels)."""
  key_x, key_y = jax.random.split(jax.random.key(1))
  if model_name in ("mlp", "mlp_small"):
    width = 1024 if model_name == "mlp" else 256
    model = MLP((width, width, width, 10), weight_bits=bits, rngs=rngs)
    x = jax.random.normal(key_x, (batch_size, width))
  elif model_name == "vit":
    # The plain-NNX ViT of examples/train_vit.py (trquant_examples.vit), quantized by surgery.
    fp = ViT(image_shape=(32, 32, 3), patch=4, dim=256, depth=4, heads=4, mlp_dim=512,
             num_classes=10, rngs=rngs)
    x = jax.random.normal(key_x, (batch_size, 32, 32, 3))
    # Every linear layer gets 2-bit weights, the patch embedding and the head included.
    model = trquant.nnx.quantize_model(fp, [trquant.nnx.QuantRule(weight_bits=bits)])
  elif model_name == "lm":
    # The example LM (trquant_examples.lm) at the serving benchmark's size (12.8M
    # parameters), quantized by rules as lm_serving.py quantizes it; next-byte labels.
    fp = LM(dim=512, layers=4, heads=8, kv_heads=4, hidden=1536, rngs=rngs)
    model = trquant.nnx.quantize_model(fp, [
        trquant.nnx.QuantRule("embed", skip=True),
        trquant.nnx.QuantRule("lm_head", weight_bits=8, per_channel=True),
        trquant.nnx.QuantRule(weight_bits=4, group_size=32)])
    tokens = jax.random.randint(key_x, (batch_size, LM_CONTEXT + 1), 0, 256)
    model.train()
    return model, (tokens[:, :-1], tokens[:, 1:])
  else:
    model = models.build_model(model_name, num_classes=10, in_channels=3, weight_bits=bits,
                               act_bits=bits, image_size=32, rngs=rngs)
    x = jax.random.normal(key_x, (batch_size, 32, 32, 3))
  model.train()
  return model, (x, jax.random.randint(key_y, (batch_size,), 0, 10))


def bare_count(model):
  """A transform that only counts the transitions the update causes (its state: one float)."""
  codes_fn = trquant.nnx.codes_fn(model)

  def update_fn(updates, state, params=None):
    del state
    before = jax.tree.leaves(codes_fn(params))
    after = jax.tree.leaves(codes_fn(optax.apply_updates(params, updates)))
    return updates, sum(jnp.sum(b != a, dtype=jnp.float32) for b, a in zip(before, after))

  return optax.GradientTransformationExtraArgs(lambda params: jnp.zeros([], jnp.float32),
                                               update_fn)


# ---------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------


def make_transform(variant, model, total_steps):
  if variant == "adam_cosine":
    return optax.adam(optax.cosine_decay_schedule(1e-3, total_steps))
  if variant == "adam_count":
    return optax.chain(optax.adam(optax.cosine_decay_schedule(1e-3, total_steps)), bare_count(model))
  codes_fn = trquant.nnx.codes_fn(model)
  chain = [optax.adam(1e-3),
           trquant.tr_schedule(optax.cosine_decay_schedule(5e-3, total_steps), codes_fn=codes_fn,
                               windup_guard=variant != "adam_tr_noguard")]
  if variant == "adam_tr_track":
    chain.append(trquant.track_oscillations(codes_fn=codes_fn))
  elif variant == "adam_tr_freeze":
    chain.append(trquant.freeze_oscillations(codes_fn=codes_fn,
                                             scale_fn=trquant.nnx.scale_fn(model),
                                             total_steps=total_steps))
  return optax.chain(*chain)


def build_step(model_name, variant, batch_size, bits, total_steps=10_000):
  """A jitted pure train step, its carried arguments, its batch and the quantized count."""
  model, (x, y) = build(model_name, bits=bits, batch_size=batch_size, rngs=nnx.Rngs(0))
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  tx = make_transform(variant, model, total_steps)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, opt_state, batch_stats, rest, x, y):
    net = nnx.merge(graphdef, params, batch_stats, rest)
    grads = nnx.grad(
        lambda net: optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean())(net)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nnx.state(net, nnx.BatchStat), rest

  # The optimizer update alone (same gradients every call): its cost is what the
  # transforms add, measured without the forward/backward pass's noise around it.
  @functools.partial(jax.jit, donate_argnums=(1,))
  def optimizer_update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return grads, opt_state, params, updates

  quantized = sum(leaf.size for leaf in jax.tree.leaves(
      jax.eval_shape(trquant.nnx.codes_fn(model), params)))
  # Own copies: `step` donates (deletes) the arrays it is given.
  update_params = jax.tree.map(jnp.copy, params)
  grads = jax.tree.map(lambda p: jnp.sin(7.0 * p) * 1e-2, update_params)
  update_carry = [grads, tx.init(update_params), update_params]
  return step, [params, opt_state, batch_stats, rest], (x, y), quantized, optimizer_update, update_carry


def state_bytes(opt_state) -> int:
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(opt_state))


def time_steps(model_name, args, rng):
  steps, carries, batches, base_bytes = {}, {}, {}, None
  updates, update_carries, memory = {}, {}, {}
  for variant in VARIANTS:
    batch_size = args.batch_size or DEFAULT_BATCH.get(model_name, 128)
    step, carry, batch, quantized, update, update_carry = build_step(
        model_name, variant, batch_size, args.bits)
    carry = list(step(*carry, *batch))  # compile and warm up
    update_carry = list(update(*update_carry))[:3]
    jax.block_until_ready((carry, update_carry))
    steps[variant], carries[variant], batches[variant] = step, carry, batch
    updates[variant], update_carries[variant] = update, update_carry
    memory[variant] = state_bytes(carry[1])
  base_bytes = memory["adam_cosine"]
  per_round = {variant: [] for variant in VARIANTS}
  update_per_round = {variant: [] for variant in VARIANTS}
  for _ in range(args.rounds):
    for variant in rng.permutation(VARIANTS):
      step, carry, batch = steps[variant], carries[variant], batches[variant]
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        carry = list(step(*carry, *batch))
      jax.block_until_ready(carry)
      per_round[variant].append((time.perf_counter() - start) / args.steps_per_round)
      carries[variant] = carry
    for variant in rng.permutation(VARIANTS):
      update, update_carry = updates[variant], update_carries[variant]
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        update_carry = list(update(*update_carry))[:3]
      jax.block_until_ready(update_carry)
      update_per_round[variant].append((time.perf_counter() - start) / args.steps_per_round)
      update_carries[variant] = update_carry
  rows = {}
  base = float(np.median(per_round["adam_cosine"]))
  base_update = float(np.median(update_per_round["adam_cosine"]))
  for variant in VARIANTS:
    times = np.asarray(per_round[variant])
    q25, median, q75 = np.percentile(times, [25, 50, 75])
    update_median = float(np.median(update_per_round[variant]))
    rows[variant] = {"median_ms": 1e3 * median, "iqr_ms": 1e3 * (q75 - q25),
                     "ratio": median / base,
                     "update_ms": 1e3 * update_median,
                     # What the transforms add to the optimizer, as a share of (a)'s step.
                     "update_overhead": (update_median - base_update) / base,
                     "extra_state_bytes_per_weight": (memory[variant] - base_bytes) / quantized,
                     "state_bytes": memory[variant], "quantized_weights": quantized}
  return rows


# ---------------------------------------------------------------------------------------
# The transform alone, against memory bandwidth
# ---------------------------------------------------------------------------------------


def _synthetic(num_weights: int, layers: int = 4):
  sizes = [num_weights // layers] * layers
  keys = jax.random.split(jax.random.key(0), layers)
  return {f"layer{i}": jax.random.normal(k, (n,)) * 0.1 for i, (k, n) in enumerate(zip(keys, sizes))}


def _median_time(fn, carry, rest, repeats):
  """Median seconds of ``carry = fn(*carry, *rest)[:len(carry)]``, the first call excluded."""
  times = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    out = fn(*carry, *rest)
    jax.block_until_ready(out)
    if i:
      times.append(time.perf_counter() - start)
    carry = out[:len(carry)]
    del out
  return float(np.median(times))


def scaling(sizes, repeats):
  codes_fn = lambda p: jax.tree.map(lambda w: trquant.quantize(w, 0.05, bits=2), p)
  tx = optax.chain(optax.sgd(1e-3), trquant.tr_schedule(5e-3, codes_fn=codes_fn))
  rows = []
  for size in sizes:
    params = _synthetic(size)
    grads = jax.tree.map(lambda w: jnp.sin(w * 7.0), params)
    opt_state = tx.init(params)

    # As in a train step, the incoming update is not an argument the step may overwrite:
    # the state is donated, the scaled update is a new array.
    @functools.partial(jax.jit, donate_argnums=(0,))
    def transform(opt_state, updates, params):
      updates, opt_state = tx.update(updates, opt_state, params)
      return opt_state, updates

    # The reference: read one array, write it back in place (a copy with one flop per
    # element; the factor must not be 1 in float32, or XLA drops the multiply and the copy).
    @functools.partial(jax.jit, donate_argnums=(0,))
    def copy(tree):
      return (jax.tree.map(lambda w: w * 1.5, tree),)

    # The same copy into a new array, as the transform writes its scaled update.
    @jax.jit
    def copy_new(tree):
      return (jax.tree.map(lambda w: w * 1.5, tree),)

    seconds = _median_time(transform, (opt_state,), (grads, params), repeats)
    copy_seconds = _median_time(copy, (jax.tree.map(jnp.copy, params),), (), repeats)
    new_seconds = _median_time(copy_new, (), (params,), repeats)
    num = sum(w.size for w in jax.tree.leaves(params))
    rows.append({"weights": num, "transform_ms": 1e3 * seconds,
                 "transform_gbps": 12 * num / seconds / 1e9,
                 "copy_ms": 1e3 * copy_seconds, "copy_gbps": 8 * num / copy_seconds / 1e9,
                 "copy_new_ms": 1e3 * new_seconds,
                 "ratio_to_copy": seconds / copy_seconds, "ratio_to_copy_new": seconds / new_seconds,
                 "ns_per_weight": 1e9 * seconds / num})
    print(f"  {num:.0e} weights: tr_schedule {1e3 * seconds:.2f} ms "
          f"({rows[-1]['transform_gbps']:.1f} GB/s), copy in place {1e3 * copy_seconds:.2f} ms "
          f"({rows[-1]['copy_gbps']:.1f} GB/s), copy to a new array {1e3 * new_seconds:.2f} ms",
          flush=True)
    del params, grads, opt_state
  return rows


# ---------------------------------------------------------------------------------------
# Training loops: NNX per-step overhead
# ---------------------------------------------------------------------------------------


def _loop_model(name):
  """The model, transform and a batch of an example script's training loop."""
  rngs = nnx.Rngs(0)
  if name == "digits_mlp":  # examples/train_digits.py: 64-256-256-10, W2A2, batch 32
    model = MLP((64, 256, 256, 10), weight_bits=2, act_bits=2, rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (32, 64))
  else:  # examples/train_qat.py's defaults: the small CNN at W2A2 on digits (8x8x1), batch 128
    model = models.build_model("cnn", num_classes=10, in_channels=1, weight_bits=2, act_bits=2,
                               image_size=8, rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (128, 8, 8, 1))
  y = jax.random.randint(jax.random.key(2), (x.shape[0],), 0, 10)
  tx = optax.chain(optax.adam(1e-3), trquant.tr_schedule(
      optax.cosine_decay_schedule(5e-3, 10_000), codes_fn=trquant.nnx.codes_fn(model)))
  model.train()
  return model, tx, x, y


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _train_body(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads)
  return loss


def loop_rates(name, steps, rounds):
  """Steps/s of four ways to run the same train step from a Python loop."""
  loops = {}

  model, tx, x, y = _loop_model(name)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  nnx_step = nnx.jit(_train_body)
  loops["nnx.jit(model, optimizer)"] = lambda: nnx_step(model, optimizer, x, y)

  model_c, tx_c, _, _ = _loop_model(name)
  optimizer_c = nnx.Optimizer(model_c, tx_c, wrt=nnx.Param)
  cached_step = nnx.cached_partial(nnx_step, model_c, optimizer_c)
  loops["nnx.cached_partial"] = lambda: cached_step(x, y)

  model_j, tx_j, _, _ = _loop_model(name)
  graphdef, params, batch_stats, rest = nnx.split(model_j, nnx.Param, nnx.BatchStat, ...)
  carry = [params, tx_j.init(params), batch_stats, rest]

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def jax_step(params, opt_state, batch_stats, rest, x, y):
    net = nnx.merge(graphdef, params, batch_stats, rest)
    loss, grads = nnx.value_and_grad(_loss)(net, x, y)
    updates, opt_state = tx_j.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, nnx.state(net, nnx.BatchStat), rest,
            loss)

  def run_jax():
    out = jax_step(*carry, x, y)
    carry[:] = out[:4]
    return out[4]

  loops["jax.jit, optax on split params, donated"] = run_jax

  # The examples' loop: nnx.split of (model, optimizer) once, a jax.jit step on that state.
  model_s, tx_s, _, _ = _loop_model(name)
  graphdef_s, state_s = nnx.split((model_s, nnx.Optimizer(model_s, tx_s, wrt=nnx.Param)))
  state_carry = [state_s]

  @functools.partial(jax.jit, donate_argnums=(0,))
  def split_step(state, x, y):
    model, optimizer = nnx.merge(graphdef_s, state)
    loss = _train_body(model, optimizer, x, y)
    return nnx.state((model, optimizer)), loss

  def run_split():
    state_carry[0], loss = split_step(state_carry[0], x, y)
    return loss

  loops["jax.jit on nnx.split((model, optimizer)), donated"] = run_split

  rng = np.random.default_rng(0)
  per_round = {key: [] for key in loops}
  for fn in loops.values():  # compile and warm up
    jax.block_until_ready(fn())
  for _ in range(rounds):
    for key in rng.permutation(list(loops)):
      fn = loops[key]
      start = time.perf_counter()
      for _ in range(steps):
        loss = fn()
      jax.block_until_ready(loss)
      per_round[key].append(steps / (time.perf_counter() - start))
  return {key: {"steps_per_s": float(np.median(rates)),
                "iqr": float(np.subtract(*np.percentile(rates, [75, 25])))}
          for key, rates in per_round.items()}


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(0)
  device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}, {jax.device_count()} device(s))"
  # Other processes on the machine disturb the timings: the load is recorded with them.
  results = {"device": device, "cpu_count": os.cpu_count(), "args": vars(args), "steps": {},
             "scaling": [], "loops": {}, "load_average_start": os.getloadavg(),
             "code": git_state(), "cpu": cpu_model(), "jax": jax.__version__}
  lines = [f"Device: {device}, {os.cpu_count()} CPU cores. {args.rounds} interleaved rounds of"
           f" {args.steps_per_round} steps.", ""]
  for model_name in args.models.split(","):
    print(f"timing {model_name} ...", flush=True)
    rows = time_steps(model_name, args, rng)
    results["steps"][model_name] = rows
    quantized = rows["adam_cosine"]["quantized_weights"]
    batch_size = args.batch_size or DEFAULT_BATCH.get(model_name, 128)
    acts = "FP activations" if model_name in WEIGHT_HEAVY + ("mlp_small",) else f"A{args.bits}"
    weights = "W4 in groups of 32, head W8" if model_name == "lm" else f"W{args.bits}"
    lines += [f"**{model_name}** ({quantized:,} quantized weights; {weights}, {acts},"
              f" batch {batch_size})", "",
              "| variant | step time (median) | IQR | ratio to (a) | optimizer update alone |"
              " update cost beyond (a), % of (a)'s step | extra state bytes / quantized weight |",
              "|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
      lines.append(f"| {LABELS[variant]} | {row['median_ms']:.2f} ms | {row['iqr_ms']:.2f} ms |"
                   f" {row['ratio']:.3f} | {row['update_ms']:.3f} ms |"
                   f" {100 * row['update_overhead']:+.2f}% |"
                   f" {row['extra_state_bytes_per_weight']:.3f} |")
    lines.append("")
  print("scaling of the transform alone ...", flush=True)
  sizes = [int(float(s)) for s in args.sizes.split(",")]
  results["scaling"] = scaling(sizes, repeats=max(3, args.rounds))
  lines += ["tr_schedule alone (after SGD; state donated, scaled update a new array) vs a copy"
            " of the same arrays (`w * 1.5`), in place (donated) and into a new array:", "",
            "| quantized weights | tr_schedule | GB/s (12 B/weight) | copy in place | GB/s (8 B/weight)"
            " | ratio to it | copy to a new array | ratio to it | ns / weight |",
            "|---|---|---|---|---|---|---|---|---|"]
  for row in results["scaling"]:
    lines.append(f"| {row['weights']:.0e} | {row['transform_ms']:.2f} ms | {row['transform_gbps']:.1f} |"
                 f" {row['copy_ms']:.2f} ms | {row['copy_gbps']:.1f} | {row['ratio_to_copy']:.1f} |"
                 f" {row['copy_new_ms']:.2f} ms | {row['ratio_to_copy_new']:.1f} |"
                 f" {row['ns_per_weight']:.2f} |")
  if args.loop_steps:
    lines += ["", f"Training loops (chain(adam, tr_schedule); steps/s, median of {args.rounds}"
              f" interleaved rounds of {args.loop_steps} steps):", "",
              "| model | loop | steps/s | IQR | relative to nnx.jit |", "|---|---|---|---|---|"]
    for name in ("digits_mlp", "qat_cnn"):
      print(f"training loop {name} ...", flush=True)
      rates = loop_rates(name, args.loop_steps, args.rounds)
      results["loops"][name] = rates
      base = rates["nnx.jit(model, optimizer)"]["steps_per_s"]
      for loop, row in rates.items():
        lines.append(f"| {name} | {loop} | {row['steps_per_s']:.1f} | {row['iqr']:.1f} |"
                     f" {row['steps_per_s'] / base:.2f} |")
  results["load_average_end"] = os.getloadavg()
  lines.insert(1, f"Load average (1, 5, 15 min) at the start: {results['load_average_start']};"
               f" at the end: {results['load_average_end']}.")
  summary = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + summary)
  return results


if __name__ == "__main__":
  main()
