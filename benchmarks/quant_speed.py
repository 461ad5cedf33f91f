"""Step time of quantized models against their float models: ViT, LM and ResNet-20.

For each model one jitted training step (forward, backward, AdamW update; BatchNorm
statistics where the model has them) is timed for
  (a) the float model,
  (b) the model quantized by trquant, W4A8 (4-bit weights, 8-bit LSQ inputs),
  (c) (b) with ``trquant.tr_schedule`` chained after AdamW,
and, to attribute (b)'s cost beyond (a),
  (w) weights quantized only (W4, float inputs),
  (x) inputs quantized only (A8, float weights),
  (l) trquant layers with nothing quantized (the plain models' layer replacement alone);
and one jitted inference step (forward only, eval mode) of the float and the W4A8 model.

Models: the plain-NNX ViT of examples/train_vit.py (``trquant_examples.vit``; its default
size: 28x28x1 images, patch 7, width 64, 4 blocks, MLP 128) quantized by
``trquant.nnx.quantize_model`` (first and last layer FP by ``first_last_rule``, the rest W4A8);
the byte LM of examples/train_lm.py (``trquant_examples.lm``; its default size: 2 layers,
width 128, context 128) quantized by the example's own rules (embedding FP, head W8A8,
the rest W4A8); ``trquant_examples.models`` ResNet-20 on 32x32x3 images,
``build_model(weight_bits=4, act_bits=8)`` against ``weight_bits=None, act_bits=None``
(first and last layer FP in both). Random data: throughput only. Activation scales are
calibrated (``calibrate_activations``) before timing.

The variants are timed interleaved, in the same order in every round; each round's
time per step is kept, compilation excluded (ahead-of-time compiled, then one warm-up
call). The table gives the median over the rounds, and the ratio of medians to the
float model with the interquartile range of the per-round ratios. The optimized HLO of
each step is summarised (instructions, fusions, reductions, converts) next to it.

    python benchmarks/quant_speed.py                   # all three models: ~8 min on one core
    python benchmarks/quant_speed.py --anatomy         # one linear layer, each quantizer on/off
    python benchmarks/quant_speed.py --quick           # a tiny ViT, 2 rounds: under a minute
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import _runs  # benchmarks/_runs.py, next to this script
import trquant
from trquant.nnx import QuantRule
from trquant_examples import models
from trquant_examples.lm import LM, lm_loss
from trquant_examples.vit import ViT

TRAIN = ("float", "quant", "quant_tr", "weights_only", "acts_only", "layers_only")
INFER = ("infer_float", "infer_quant")
LABELS = {"float": "(a) float", "quant": "(b) W4A8", "quant_tr": "(c) W4A8 + tr_schedule",
          "weights_only": "(w) W4 only", "acts_only": "(x) A8 only",
          "layers_only": "(l) trquant layers, nothing quantized",
          "infer_float": "inference: float", "infer_quant": "inference: W4A8"}
DEFAULT_BATCH = {"vit": 128, "lm": 16, "resnet20": 32}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="vit,lm,resnet20",
                      help="of vit, lm, resnet20, and vit_tiny, lm_tiny (the examples' --quick sizes)")
  parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
  parser.add_argument("--steps-per-round", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=None,
                      help="batch of every model (default: ViT 128, LM 16, ResNet-20 32)")
  parser.add_argument("--no-attribution", action="store_true",
                      help="skip the (w), (x), (l) variants")
  parser.add_argument("--out", default="benchmarks/results/quant_speed")
  parser.add_argument("--anatomy", action="store_true",
                      help="instead of the models: one linear layer's forward and backward"
                      " with and without each quantizer (anatomy.json, anatomy.md)")
  parser.add_argument("--quick", action="store_true",
                      help="the tiny ViT of train_vit.py --quick, 2 rounds of 2 steps, batch 8,"
                      " no attribution")
  args = parser.parse_args(argv)
  if args.quick:
    args.models = "vit_tiny" if args.models == "vit,lm,resnet20" else args.models
    args.rounds, args.steps_per_round, args.no_attribution = 2, 2, True
    args.batch_size = args.batch_size or 8
  for name in ("rounds", "steps_per_round"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive")
  return args


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def _vit(tiny, rngs):
  if tiny:  # examples/train_vit.py --quick's size
    return ViT(image_shape=(8, 8, 1), patch=4, dim=32, depth=1, heads=2, mlp_dim=64,
               num_classes=10, rngs=rngs), (8, 8, 1)
  return ViT(image_shape=(28, 28, 1), patch=7, dim=64, depth=4, heads=4, mlp_dim=128,
             num_classes=10, rngs=rngs), (28, 28, 1)


# The LM sizes of examples/train_lm.py: its defaults, and --quick's.
LM_SIZES = dict(dim=128, layers=2, heads=4, kv_heads=2, hidden=384)
LM_CONTEXT = 128
LM_TINY_SIZES = dict(dim=32, layers=1, heads=2, kv_heads=1, hidden=96)
LM_TINY_CONTEXT = 32


def _vit_rules(model, example, variant):
  weight_bits = None if variant in ("acts_only", "layers_only") else 4
  act_bits = None if variant in ("weights_only", "layers_only") else 8
  return [trquant.nnx.first_last_rule(model, example),
          QuantRule(weight_bits=weight_bits, act_bits=act_bits, signed_act=True)]


def _lm_rules(variant):
  if variant == "layers_only":
    return [QuantRule("embed", skip=True), QuantRule()]
  weight_bits = {"acts_only": (None, None)}.get(variant, (8, 4))
  act_bits = None if variant == "weights_only" else 8
  return [QuantRule("embed", skip=True),
          QuantRule("lm_head", weight_bits=weight_bits[0], act_bits=act_bits, signed_act=True),
          QuantRule(weight_bits=weight_bits[1], act_bits=act_bits, signed_act=True)]


def build(model_name, variant, batch_size):
  """The model (train mode), its loss function and a random batch."""
  rngs = nnx.Rngs(0)
  key = jax.random.key(1)
  kind = model_name.split("_")[0]
  if kind == "vit":
    model, shape = _vit(model_name.endswith("tiny"), rngs)
    x = jax.random.normal(key, (batch_size,) + shape)
    y = jax.random.randint(jax.random.key(2), (batch_size,), 0, 10)
    if variant != "float":
      model = trquant.nnx.quantize_model(model, _vit_rules(model, x[:1], variant))
    batch = (x, y)
    loss = lambda net, x, y: optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()
  elif kind == "lm":
    tiny = model_name.endswith("tiny")
    model = LM(**(LM_TINY_SIZES if tiny else LM_SIZES), rngs=nnx.Rngs(0))
    context = LM_TINY_CONTEXT if tiny else LM_CONTEXT
    batch = (jax.random.randint(key, (batch_size, context + 1), 0, 256),)
    if variant != "float":
      model = trquant.nnx.quantize_model(model, _lm_rules(variant))
    x = batch[0][:, :-1]
    loss = lm_loss
  elif kind == "resnet20":
    weight_bits = None if variant in ("float", "acts_only", "layers_only") else 4
    act_bits = None if variant in ("float", "weights_only", "layers_only") else 8
    model = models.build_model("resnet20", num_classes=10, in_channels=3, weight_bits=weight_bits,
                               act_bits=act_bits, image_size=32, rngs=rngs)
    x = jax.random.normal(key, (batch_size, 32, 32, 3))
    batch = (x, jax.random.randint(jax.random.key(2), (batch_size,), 0, 10))
    loss = lambda net, x, y: optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()
  else:
    raise ValueError(f"unknown model {model_name!r}")
  if any(layer.act_bits for _, layer in _quant_layers(model)):
    model.eval()
    trquant.nnx.calibrate_activations(model, x[:min(len(x), 64)])
  model.train()
  return model, loss, batch


def _quant_layers(model):
  try:
    return trquant.nnx.quant_layers(model)
  except ValueError:
    return []


def _decay_mask(params):
  return jax.tree.map(lambda leaf: jnp.ndim(leaf) >= 2, params)


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


def hlo_summary(compiled):
  """Counts of the optimized HLO's instructions (all computations), by kind."""
  text = compiled.as_text()
  ops = collections.Counter(m.group(1) for m in re.finditer(r"= \S+ ([a-z][a-z0-9_-]*)\(", text))
  return {"instructions": sum(ops.values()), "fusion": ops["fusion"], "reduce": ops["reduce"],
          "convert": ops["convert"], "round-nearest-even": ops["round-nearest-even"]
          + ops["round-nearest-afz"], "dot": ops["dot"], "convolution": ops["convolution"],
          "select": ops["select"], "compare": ops["compare"], "divide": ops["divide"]}


def build_step(model_name, variant, batch_size):
  """An ahead-of-time compiled step, its carried arguments and constant arguments."""
  base = {"infer_float": "float", "infer_quant": "quant", "quant_tr": "quant"}.get(variant, variant)
  model, loss, batch = build(model_name, base, batch_size)
  if variant.startswith("infer"):
    model.eval()
    graphdef, state = nnx.split(model)

    def infer(state, *batch):
      return nnx.merge(graphdef, state)(batch[0] if len(batch) == 2 else batch[0][:, :-1])

    compiled = jax.jit(infer).lower(state, *batch).compile()
    return compiled, [], (state,) + batch, lambda out: []
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  adamw = optax.adamw(1e-3, weight_decay=0.05, mask=_decay_mask)
  if variant == "quant_tr":
    tx = optax.chain(adamw, trquant.tr_schedule(
        optax.cosine_decay_schedule(5e-3, 10_000), codes_fn=trquant.nnx.codes_fn(model)))
  else:
    tx = adamw
  opt_state = tx.init(params)

  def step(params, opt_state, batch_stats, rest, *batch):
    net = nnx.merge(graphdef, params, batch_stats, rest)
    value, grads = nnx.value_and_grad(loss)(net, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, nnx.state(net, nnx.BatchStat),
            rest, value)

  carry = [params, opt_state, batch_stats, rest]
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*carry, *batch).compile()
  return compiled, carry, batch, lambda out: list(out[:4])


def time_model(model_name, args):
  batch_size = args.batch_size or DEFAULT_BATCH[model_name.split("_")[0]]
  train = ("float", "quant", "quant_tr") if args.no_attribution else TRAIN
  if model_name.startswith("resnet20"):
    train = tuple(v for v in train if v != "layers_only")  # (a) is already trquant layers in FP
  variants = train + INFER
  steps, carries, consts, nexts, hlo = {}, {}, {}, {}, {}
  for variant in variants:
    start = time.perf_counter()
    compiled, carry, const, next_carry = build_step(model_name, variant, batch_size)
    out = compiled(*carry, *const)  # warm-up
    jax.block_until_ready(out)
    steps[variant], carries[variant], consts[variant] = compiled, next_carry(out), const
    nexts[variant] = next_carry
    hlo[variant] = hlo_summary(compiled)
    print(f"  {variant}: compiled and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
  per_round = {variant: [] for variant in variants}
  for _ in range(args.rounds):
    for variant in variants:
      step, carry, const, next_carry = steps[variant], carries[variant], consts[variant], nexts[variant]
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        out = step(*carry, *const)
        carry = next_carry(out)
      jax.block_until_ready(out)
      per_round[variant].append((time.perf_counter() - start) / args.steps_per_round)
      carries[variant] = carry
  rows = {}
  for variant in variants:
    base = "infer_float" if variant.startswith("infer") else "float"
    times = np.asarray(per_round[variant])
    ratios = times / np.asarray(per_round[base])
    q25, q75 = np.percentile(ratios, [25, 75])
    rows[variant] = {"median_ms": 1e3 * float(np.median(times)),
                     "steps_per_s": float(1 / np.median(times)),
                     "ratio": float(np.median(times) / np.median(per_round[base])),
                     "ratio_iqr": [float(q25), float(q75)],
                     "round_ms": (1e3 * times).tolist(), "hlo": hlo[variant]}
  return batch_size, rows


# ---------------------------------------------------------------------------------------
# Anatomy: one linear layer, each quantizer on and off
# ---------------------------------------------------------------------------------------

# (tokens, d_in, d_out) of the models' linear layers: the LM's MLP input (16 x 128 tokens,
# 128 -> 384) and output (384 -> 128), the ViT's MLP input (128 x 17 tokens, 64 -> 128).
LAYER_SHAPES = {"lm_mlp_in": (2048, 128, 384), "lm_mlp_out": (2048, 384, 128),
                "vit_mlp_in": (2176, 64, 128)}
PIECES = ("dot", "act_lsq", "act_fq_fixed_scale", "act_fq_forward_ste", "weight_fq")
PIECE_LABELS = {
    "dot": "float: x @ w",
    "act_lsq": "A8: lsq(x, s) @ w (as QuantLinear: STE + LSQ scale gradient)",
    "act_fq_fixed_scale": "A8, fixed scale: fake_quant(x, stop_gradient(s)) @ w",
    "act_fq_forward_ste": "A8, round_ste only: (s * round_ste(x / s)) @ w, no clip",
    "weight_fq": "W4: x @ fake_quant(w, stop_gradient(s_w)) (fixed weight scale)"}


def _layer_loss(piece):
  def loss(x, s, w, sw, c):
    if piece == "act_lsq":
      hi = 127
      x = trquant.lsq(x, s, bits=8, grad_scale=1.0 / np.sqrt(x.shape[-1] * hi))
    elif piece == "act_fq_fixed_scale":
      x = trquant.fake_quant(x, jax.lax.stop_gradient(s), bits=8)
    elif piece == "act_fq_forward_ste":
      x = s * trquant.round_ste(x / s)
    elif piece == "weight_fq":
      w = trquant.fake_quant(w, jax.lax.stop_gradient(sw), bits=4)
    return jnp.sum((x @ w) * c)
  return loss


def anatomy(args):
  rows = {}
  for name, (tokens, d_in, d_out) in LAYER_SHAPES.items():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (tokens, d_in))
    w = jax.random.normal(keys[1], (d_in, d_out)) / np.sqrt(d_in)
    c = jax.random.normal(keys[2], (tokens, d_out))
    s = trquant.init_scale(x, bits=8, method="lsq")
    sw = trquant.init_scale(w, bits=4)
    fns = {}
    for piece in PIECES:
      grad = jax.jit(jax.grad(_layer_loss(piece), argnums=(0, 1, 2)))
      fns[piece] = grad.lower(x, s, w, sw, c).compile()
      fns[piece + "/fwd"] = jax.jit(_layer_loss(piece)).lower(x, s, w, sw, c).compile()
    for fn in fns.values():
      jax.block_until_ready(fn(x, s, w, sw, c))
    times = {key: [] for key in fns}
    repeats = 20
    for _ in range(args.rounds):
      for key, fn in fns.items():
        start = time.perf_counter()
        for _ in range(repeats):
          out = fn(x, s, w, sw, c)
        jax.block_until_ready(out)
        times[key].append((time.perf_counter() - start) / repeats)
    medians = {key: float(np.median(t)) for key, t in times.items()}
    rows[name] = {
        "shape": [tokens, d_in, d_out],
        "pieces": {piece: {"fwd_bwd_ms": 1e3 * medians[piece],
                           "fwd_ms": 1e3 * medians[piece + "/fwd"],
                           "fwd_bwd_ratio": medians[piece] / medians["dot"],
                           "fwd_ratio": medians[piece + "/fwd"] / medians["dot/fwd"],
                           "hlo": hlo_summary(fns[piece])} for piece in PIECES}}
    print(f"  {name}: " + ", ".join(f"{piece} {1e3 * medians[piece]:.3f} ms" for piece in PIECES),
          flush=True)
  return rows


def anatomy_main(args):
  results = {"device": f"{jax.devices()[0].platform}", "cpu_count": os.cpu_count(),
             "cpu_affinity": sorted(os.sched_getaffinity(0)), "args": vars(args),
             "load_average_start": os.getloadavg()}
  results["layers"] = anatomy(args)
  results["load_average_end"] = os.getloadavg()
  lines = [f"One linear layer (loss sum(c * y)), gradient w.r.t. x, s and w, jitted; median of"
           f" {args.rounds} interleaved rounds of 20 calls. Load average at the start"
           f" {tuple(round(v, 2) for v in results['load_average_start'])}, at the end"
           f" {tuple(round(v, 2) for v in results['load_average_end'])}.", "",
           "| layer (tokens, in, out) | variant | forward | ratio | forward + backward | ratio |"
           " HLO instructions | reduce |", "|---|---|---|---|---|---|---|---|"]
  for name, row in results["layers"].items():
    for piece, r in row["pieces"].items():
      lines.append(f"| {name} {tuple(row['shape'])} | {PIECE_LABELS[piece]} | {r['fwd_ms']:.3f} ms |"
                   f" {r['fwd_ratio']:.2f} | {r['fwd_bwd_ms']:.3f} ms | {r['fwd_bwd_ratio']:.2f} |"
                   f" {r['hlo']['instructions']} | {r['hlo']['reduce']} |")
  _runs.write_summary(args.out, lines, results, stem="anatomy")
  return results


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.anatomy:
    return anatomy_main(args)
  device = jax.devices()[0]
  affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  results = {"device": f"{device.platform} ({device.device_kind})", "cpu_count": os.cpu_count(),
             "cpu_affinity": affinity, "jax": jax.__version__, "args": vars(args),
             "load_average_start": os.getloadavg(), "models": {}}
  for model_name in args.models.split(","):
    print(f"timing {model_name} ...", flush=True)
    batch_size, rows = time_model(model_name, args)
    results["models"][model_name] = {"batch_size": batch_size, "rows": rows}
  results["load_average_end"] = os.getloadavg()
  lines = [f"Device: {results['device']}, {os.cpu_count()} CPU cores, process pinned to cores"
           f" {affinity}; load average (1, 5, 15 min) at the start"
           f" {tuple(round(v, 2) for v in results['load_average_start'])}, at the end"
           f" {tuple(round(v, 2) for v in results['load_average_end'])}. {args.rounds}"
           f" interleaved rounds of {args.steps_per_round} steps; ratio: median step time over"
           f" the float model's (training steps: over (a); inference: over float inference),"
           f" IQR of the per-round ratios in brackets.", "",
           "| model | batch | variant | step time (median) | steps/s | ratio to float [IQR] |"
           " HLO instructions | fusions | reduce | convert |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for model_name, entry in results["models"].items():
    for variant, row in entry["rows"].items():
      h = row["hlo"]
      lines.append(f"| {model_name} | {entry['batch_size']} | {LABELS[variant]} |"
                   f" {row['median_ms']:.2f} ms | {row['steps_per_s']:.1f} |"
                   f" {row['ratio']:.2f} [{row['ratio_iqr'][0]:.2f}, {row['ratio_iqr'][1]:.2f}] |"
                   f" {h['instructions']} | {h['fusion']} | {h['reduce']} | {h['convert']} |")
  _runs.write_summary(args.out, lines, results, stem="summary")
  return results


if __name__ == "__main__":
  main()
