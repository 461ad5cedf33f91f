"""Cost of trquant's transforms: train-step time, optimizer-state memory, and scaling.

1. Step time of one jitted training step (forward, backward, optimizer, BatchNorm
   statistics) with
     (a) Adam + cosine LR,
     (b) chain(Adam, tr_schedule),
     (c) chain(Adam, tr_schedule, track_oscillations),
     (d) chain(Adam, tr_schedule, freeze_oscillations),
   on the small CNN and ResNet-20 (W2A2, batch 128, random data: throughput only).
   Variants are timed interleaved, in a new random order in every round, and
   each round's time per step is kept; the table gives the median, the spread
   (interquartile range) and the ratio of medians to (a). The optimizer update
   alone (fixed gradients) is timed the same way: its excess over (a)'s update,
   as a share of (a)'s whole step, is the transforms' overhead without the
   step-to-step noise of the forward and backward passes.
2. Optimizer-state bytes per quantized weight of each variant beyond Adam's,
   counted from the state pytree.
3. The transform alone (tr_schedule after plain SGD) on a synthetic tree of
   quantized weights of growing size, against a copy of the same arrays: time
   per step, and the bandwidth it reaches counting the 12 bytes per weight it
   must move at least (read params and update, write the scaled update).

    python benchmarks/overhead.py --out benchmarks/results/overhead
    python benchmarks/overhead.py --quick      # small CNN, small sizes: a minute
"""

from __future__ import annotations

import argparse
import functools
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import models  # noqa: E402

import trquant  # noqa: E402

VARIANTS = ("adam_cosine", "adam_tr", "adam_tr_track", "adam_tr_freeze")
LABELS = {"adam_cosine": "(a) Adam + cosine LR", "adam_tr": "(b) + tr_schedule",
          "adam_tr_track": "(c) + track_oscillations", "adam_tr_freeze": "(d) + freeze_oscillations"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="cnn,resnet20")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
  parser.add_argument("--steps-per-round", type=int, default=10)
  parser.add_argument("--sizes", default="1e5,1e6,1e7,1e8",
                      help="quantized weights of the transform-alone scaling test")
  parser.add_argument("--out", default="benchmarks/results/overhead")
  parser.add_argument("--quick", action="store_true", help="small CNN, 3 rounds, sizes to 1e6")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.batch_size, args.rounds, args.steps_per_round = "cnn", 32, 3, 3
    args.sizes = "1e5,1e6"
  return args


# ---------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------


def make_transform(variant, model, total_steps):
  if variant == "adam_cosine":
    return optax.adam(optax.cosine_decay_schedule(1e-3, total_steps))
  codes_fn = trquant.nnx.codes_fn(model)
  chain = [optax.adam(1e-3),
           trquant.tr_schedule(optax.cosine_decay_schedule(5e-3, total_steps), codes_fn=codes_fn)]
  if variant == "adam_tr_track":
    chain.append(trquant.track_oscillations(codes_fn))
  elif variant == "adam_tr_freeze":
    chain.append(trquant.freeze_oscillations(codes_fn, trquant.nnx.scales_fn(model),
                                             total_steps=total_steps))
  return optax.chain(*chain)


def build_step(model_name, variant, batch_size, bits, total_steps=10_000):
  """A jitted pure train step, its carried arguments, its batch and the quantized count."""
  image_size = 32
  model = models.build_model(model_name, num_classes=10, in_channels=3, weight_bits=bits,
                             act_bits=bits, image_size=image_size, rngs=nnx.Rngs(0))
  model.train()
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

  x = jax.random.normal(jax.random.key(1), (batch_size, image_size, image_size, 3))
  y = jax.random.randint(jax.random.key(2), (batch_size,), 0, 10)
  quantized = sum(layer.kernel.get_value().size for _, layer in nnx.iter_modules(model)
                  if isinstance(layer, (trquant.nnx.QuantConv, trquant.nnx.QuantLinear))
                  and layer.weight_bits is not None)
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
    step, carry, batch, quantized, update, update_carry = build_step(
        model_name, variant, args.batch_size, args.bits)
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


def _median_time(fn, carry, repeats):
  times = []
  carry = fn(*carry)
  jax.block_until_ready(carry)
  for _ in range(repeats):
    start = time.perf_counter()
    carry = fn(*carry)
    jax.block_until_ready(carry)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def scaling(sizes, repeats):
  codes_fn = lambda p: jax.tree.map(lambda w: trquant.quantize(w, 0.05, bits=2), p)
  tx = optax.chain(optax.sgd(1e-3), trquant.tr_schedule(5e-3, codes_fn=codes_fn))
  rows = []
  for size in sizes:
    params = _synthetic(size)
    grads = jax.tree.map(lambda w: jnp.sin(w * 7.0), params)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def transform(updates, opt_state, params):
      updates, opt_state = tx.update(updates, opt_state, params)
      return updates, opt_state, params

    # The reference: read one array, write one (a copy with one flop per element; the
    # factor must not be 1 in float32, or XLA drops the multiply and the copy).
    @functools.partial(jax.jit, donate_argnums=(0,))
    def copy(tree):
      return (jax.tree.map(lambda w: w * 1.5, tree),)

    seconds = _median_time(transform, (grads, opt_state, params), repeats)
    copy_seconds = _median_time(copy, (jax.tree.map(jnp.copy, params),), repeats)
    num = sum(w.size for w in jax.tree.leaves(params))
    rows.append({"weights": num, "transform_ms": 1e3 * seconds,
                 "transform_gbps": 12 * num / seconds / 1e9,
                 "copy_ms": 1e3 * copy_seconds, "copy_gbps": 8 * num / copy_seconds / 1e9,
                 "ns_per_weight": 1e9 * seconds / num})
    print(f"  {num:.0e} weights: tr_schedule {1e3 * seconds:.2f} ms "
          f"({rows[-1]['transform_gbps']:.1f} GB/s), copy {1e3 * copy_seconds:.2f} ms "
          f"({rows[-1]['copy_gbps']:.1f} GB/s)", flush=True)
    del params, grads, opt_state
  return rows


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(0)
  device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}, {jax.device_count()} device(s))"
  results = {"device": device, "args": vars(args), "steps": {}, "scaling": []}
  lines = [f"Device: {device}. W{args.bits}A{args.bits}, batch {args.batch_size}, "
           f"{args.rounds} interleaved rounds of {args.steps_per_round} steps.", ""]
  for model_name in args.models.split(","):
    print(f"timing {model_name} ...", flush=True)
    rows = time_steps(model_name, args, rng)
    results["steps"][model_name] = rows
    quantized = rows["adam_cosine"]["quantized_weights"]
    lines += [f"**{model_name}** ({quantized:,} quantized weights)", "",
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
  lines += ["tr_schedule alone (after SGD) vs a copy of the same arrays:", "",
            "| quantized weights | tr_schedule | GB/s (12 B/weight) | copy | GB/s (8 B/weight) | ns / weight |",
            "|---|---|---|---|---|---|"]
  for row in results["scaling"]:
    lines.append(f"| {row['weights']:.0e} | {row['transform_ms']:.2f} ms | {row['transform_gbps']:.1f} |"
                 f" {row['copy_ms']:.2f} ms | {row['copy_gbps']:.1f} | {row['ns_per_weight']:.2f} |")
  summary = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + summary)
  return results


if __name__ == "__main__":
  main()
