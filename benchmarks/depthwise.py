"""Depth-wise convolution on CPU: XLA's grouped convolution vs trquant's shifted windows.

Times, side by side in one process, the forward and backward pass of one
depth-wise QuantConv layer (``depthwise_impl="conv"`` vs ``"shift"``) and a whole
MobileNetV2 training step (SGD, W4A4, 28x28 inputs), interleaved over rounds;
reports medians and the speed-up, and checks that both paths give the same
outputs and gradients.

    python benchmarks/depthwise.py --out benchmarks/results/depthwise
    python benchmarks/depthwise.py --quick
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
from flax import nnx

import trquant
from trquant_examples import models

IMPLS = ("conv", "shift")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--channels", type=int, default=96)
  parser.add_argument("--size", type=int, default=14, help="feature map height = width")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default="benchmarks/results/depthwise")
  parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds")
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_size, args.channels, args.size, args.rounds = 8, 16, 8, 2
  return args


def _layer_step(impl, args, strides):
  layer = trquant.nnx.QuantConv(args.channels, args.channels, 3, strides=strides, padding=1,
                                feature_group_count=args.channels, weight_bits=4,
                                per_channel=True, use_bias=False, depthwise_impl=impl,
                                rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (args.batch_size, args.size, args.size, args.channels))

  @nnx.jit
  def forward_backward(layer, x):
    return nnx.grad(lambda layer, x: jnp.sum(jnp.sin(layer(x))), argnums=(0, 1))(layer, x)

  return lambda: forward_backward(layer, x)


def _model_step(impl, args):
  model = models.build_model("mobilenetv2", num_classes=10, in_channels=1, weight_bits=4,
                             act_bits=4, rngs=nnx.Rngs(0))
  for _, module in nnx.iter_modules(model):
    if isinstance(module, trquant.nnx.QuantConv):
      module.depthwise_impl = impl
  model.train()
  optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (args.batch_size, 28, 28, 1))
  y = jax.random.randint(jax.random.key(2), (args.batch_size,), 0, 10)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return lambda: step(model, optimizer)


def _time(functions, rounds, calls_per_round=3):
  for fn in functions.values():  # compile
    jax.block_until_ready(fn())
  times = {name: [] for name in functions}
  rng = np.random.default_rng(0)
  for _ in range(rounds):
    for name in rng.permutation(list(functions)):
      start = time.perf_counter()
      for _ in range(calls_per_round):
        result = functions[name]()
      jax.block_until_ready(result)
      times[name].append((time.perf_counter() - start) / calls_per_round)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
  rows = []
  for strides in (1, 2):
    steps = {impl: _layer_step(impl, args, strides) for impl in IMPLS}
    grads = {impl: steps[impl]() for impl in IMPLS}
    for a, b in zip(jax.tree.leaves(grads["conv"]), jax.tree.leaves(grads["shift"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3)
    medians = _time(steps, args.rounds)
    rows.append({"what": f"one depth-wise layer, fwd+bwd, stride {strides} "
                         f"({args.batch_size}x{args.size}x{args.size}x{args.channels})",
                 **{f"{impl}_ms": 1e3 * medians[impl] for impl in IMPLS}})
  medians = _time({impl: _model_step(impl, args) for impl in IMPLS}, args.rounds)
  rows.append({"what": f"MobileNetV2 W4A4 training step (batch {args.batch_size}, 28x28)",
               **{f"{impl}_ms": 1e3 * medians[impl] for impl in IMPLS}})
  lines = [f"Device: {device}; medians of {args.rounds} interleaved rounds.", "",
           "| what | lax.conv (`\"conv\"`) | shifted windows (`\"shift\"`) | speed-up |",
           "|---|---|---|---|"]
  for row in rows:
    row["speedup"] = row["conv_ms"] / row["shift_ms"]
    lines.append(f"| {row['what']} | {row['conv_ms']:.1f} ms | {row['shift_ms']:.1f} ms |"
                 f" {row['speedup']:.2f}x |")
  summary = "\n".join(lines) + "\n"
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=2)
  print(summary)
  return rows


if __name__ == "__main__":
  main()
