"""Serving a low-bit LM: resident bytes and tokens/s of packed vs fake-quantized vs float.

The byte LM of examples/train_lm.py (``trquant_examples.lm``, plain Flax NNX) in three
forms:
  float   the plain model;
  fq      quantized by ``trquant.nnx.quantize_model``: every projection W4 with per-group
          scales (groups of 32 along the input features), the head W8 per channel, the
          embedding float (``nnx.Embed`` is not quantized); float latent weights + scales,
          fake-quantized in each forward pass (what QAT trains);
  packed  ``trquant.export.packed_model(fq)``: the same layers holding packed codes (two
          4-bit codes per byte, one 8-bit code per byte) and their scales, dequantized
          inside the jitted forward.
It checks that packed and fq give the same logits (bit for bit) and the same greedy
generation, measures each form's peak process memory when served as a server would (a
fresh process restores the form's Orbax checkpoint into its abstract structure, never
building the float model, and runs a prefill and a decode step), then times, interleaved
round by round (compilation excluded), a jitted forward of batch 1 over ``--context``
tokens (prefill) and a jitted decode step of batch 1 (one token attending over a KV cache
of ``--context`` positions: the weight-bound matrix-vector products of generation). Random weights: bytes and throughput do not
depend on training.

    python benchmarks/lm_serving.py            # ~2 min on this 2-core CPU
    python benchmarks/lm_serving.py --quick    # a tiny LM, 2 rounds
    python benchmarks/lm_serving.py --memory-only   # bytes and peak memory, no timing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import _runs  # benchmarks/_runs.py, next to this script
import trquant
from trquant.nnx import QuantRule
from trquant_examples.lm import LM, generate

VARIANTS = ("float", "fq", "packed")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  _runs.add_serving_lm_arguments(parser)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--calls-per-round", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/lm_serving")
  parser.add_argument("--quick", action="store_true", help="a tiny LM, 2 rounds")
  parser.add_argument("--memory-only", action="store_true",
                      help="bytes and peak memory, no timing (can run beside other jobs)")
  # Internal: the fresh process that serves one form from its checkpoint (peak memory).
  parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.dim, args.layers, args.heads, args.kv_heads, args.hidden = 64, 1, 4, 2, 128
    args.context, args.rounds, args.calls_per_round, args.group_size = 16, 2, 1, 16
  return args


def rules(group_size):
  """W4 per-group projections, W8 per-channel head, float embedding."""
  return [QuantRule("embed", skip=True), QuantRule("lm_head", weight_bits=8, per_channel=True),
          QuantRule(".*", weight_bits=4, group_size=group_size)]


def build(args):
  model = LM(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
             hidden=args.hidden, rngs=nnx.Rngs(0))
  fq = trquant.nnx.quantize_model(model, rules(args.group_size))
  return {"float": model, "fq": fq, "packed": trquant.export.packed_model(fq)}


def serve_from_checkpoint(args):
  """The child process: restore one form into its abstract structure, prefill, decode."""
  import orbax.checkpoint as ocp

  graph, state = nnx.split(nnx.eval_shape(lambda: build(args)[args.serve]))
  prompt = jax.random.randint(jax.random.key(1), (1, args.context), 0, 256)
  _runs.reset_peak_rss()
  before = _runs.rss_mib("VmRSS")  # jax, the program and its abstract model: no weights yet
  restored = ocp.StandardCheckpointer().restore(args.checkpoint, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, restored)
  model = nnx.merge(graph, state)
  cache = model.init_cache(1, args.context + 1)
  logits, cache = nnx.jit(lambda m, t, c: m.decode(t, c, 0))(model, prompt, cache)
  step, _ = nnx.jit(lambda m, t, c: m.decode(t, c, args.context))(model, prompt[:, -1:], cache)
  jax.block_until_ready((logits, step))
  print(json.dumps({"before_restore_mib": before, "peak_mib": _runs.rss_mib("VmHWM"),
                    "logits_checksum": float(jnp.sum(logits[0, -1]))}))


def peak_memory(args, forms):
  """Each form's peak RSS in a fresh process serving it from an Orbax checkpoint."""
  import orbax.checkpoint as ocp

  rows = {}
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = ocp.StandardCheckpointer()
    for name, model in forms.items():
      checkpointer.save(os.path.join(directory, name), nnx.to_pure_dict(nnx.state(model)))
    checkpointer.wait_until_finished()
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("dim", "layers", "heads", "kv_heads", "hidden", "context", "group_size")]
    for name in forms:
      child = subprocess.run(
          [sys.executable, os.path.abspath(__file__), *flags, f"--serve={name}",
           f"--checkpoint={os.path.join(directory, name)}"],
          capture_output=True, text=True, check=False)
      if child.returncode:
        raise RuntimeError(f"serving {name} from its checkpoint failed:\n{child.stderr[-3000:]}")
      rows[name] = json.loads(child.stdout.strip().splitlines()[-1])
  return rows


def memory_lines(memory, state_bytes):
  lines = ["Peak process memory (RSS) serving each form from its Orbax checkpoint in a fresh"
           " process (restore, one prefill and one decode step, compilation included):", "",
           "| form | resident state (KiB) | RSS before restore (MiB) | peak (MiB) |"
           " peak - before (MiB) |", "|---|---|---|---|---|"]
  for name in VARIANTS:
    m = memory[name]
    lines.append(f"| {name} | {state_bytes[name] / 1024:.0f} | {m['before_restore_mib']:.0f} |"
                 f" {m['peak_mib']:.0f} | {m['peak_mib'] - m['before_restore_mib']:.0f} |")
  return lines


def main(argv=None):
  args = parse_args(argv)
  if args.serve:
    return serve_from_checkpoint(args)
  forms = build(args)
  prompt = jax.random.randint(jax.random.key(1), (1, args.context), 0, 256)
  forward = nnx.jit(lambda model, t: model(t))
  logits = {name: forward(model, prompt) for name, model in forms.items()}
  identical = bool((logits["packed"] == logits["fq"]).all())
  print(f"packed vs fake-quant logits bit-identical: {identical}"
        f" (max |diff| {float(jnp.abs(logits['packed'] - logits['fq']).max()):.3g});"
        f" fq vs float max |diff| {float(jnp.abs(logits['fq'] - logits['float']).max()):.3g}")
  same_text = bool((generate(forms["packed"], prompt[:, :16], 16)
                    == generate(forms["fq"], prompt[:, :16], 16)).all())
  print(f"packed vs fake-quant greedy generation (16 tokens) identical: {same_text}")
  state_bytes = {name: trquant.export.nbytes(nnx.state(model)) for name, model in forms.items()}
  memory = peak_memory(args, forms)
  if args.memory_only:
    summary = {"settings": vars(args), "provenance": _runs.machine_provenance(),
               "state_bytes": state_bytes, "peak_memory_mib": memory}
    print("\n".join(memory_lines(memory, state_bytes)))
    if not args.quick:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(summary, f, indent=1)
      with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write("\n".join(memory_lines(memory, state_bytes)) + "\n")
    return summary
  # Split the models once: the timed calls take the graph and state, as a server would.
  calls = {}
  for name, model in forms.items():
    graph, state = nnx.split(model)
    prefill = jax.jit(lambda state, t, graph=graph: nnx.merge(graph, state)(t))
    decode = jax.jit(lambda state, t, cache, graph=graph: nnx.merge(graph, state).decode(
        t, cache, args.context))
    cache = model.init_cache(1, args.context + 1)
    _, cache = nnx.jit(lambda m, t, c: m.decode(t, c, 0))(model, prompt, cache)  # filled
    calls[(name, "prefill")] = (prefill, (state, prompt))
    calls[(name, "decode")] = (decode, (state, prompt[:, -1:], cache))
    for step, step_args in (calls[(name, "prefill")], calls[(name, "decode")]):
      jax.block_until_ready(step(*step_args))  # compile and warm up
  per_round = {key: [] for key in calls}
  for _ in range(args.rounds):
    for key, (step, step_args) in calls.items():
      start = time.perf_counter()
      for _ in range(args.calls_per_round):
        out = step(*step_args)
      jax.block_until_ready(out)
      per_round[key].append((time.perf_counter() - start) / args.calls_per_round)
  rows = {}
  for (name, workload), times in per_round.items():
    times = np.asarray(times)
    base = np.asarray(per_round[("float", workload)])
    n_tokens = args.context if workload == "prefill" else 1
    ratios = times / base
    rows.setdefault(name, {})[workload] = {
        "median_ms": 1e3 * float(np.median(times)),
        "tokens_per_s": float(n_tokens / np.median(times)),
        "time_vs_float": float(np.median(times) / np.median(base)),
        "time_vs_float_iqr": [float(q) for q in np.percentile(ratios, [25, 75])],
        "round_ms": (1e3 * times).tolist()}
  summary = {"settings": vars(args), "provenance": _runs.machine_provenance(),
             "packed_logits_bit_identical_to_fq": identical,
             "packed_generation_identical_to_fq": same_text,
             "state_bytes": state_bytes, "peak_memory_mib": memory,
             "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(forms["float"])))),
             "rows": rows}
  lines = [f"LM: dim {args.dim}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv),"
           f" MLP {args.hidden}, {summary['params']:,} parameters; projections W4 g"
           f"{args.group_size}, head W8 per channel, embedding float. Device:"
           f" {summary['provenance']['device']} ({os.cpu_count()} cores). Medians of"
           f" {args.rounds} interleaved rounds of {args.calls_per_round} calls; time ratio to"
           f" float with the interquartile range of the per-round ratios.", "",
           "| form | resident state (KiB) | prefill (1 x {0}) tokens/s | time vs float | decode"
           " (batch 1, cache {0}) tokens/s | time vs float |".format(args.context),
           "|---|---|---|---|---|---|"]
  for name in VARIANTS:
    p, o = rows[name]["prefill"], rows[name]["decode"]
    lines.append(f"| {name} | {state_bytes[name] / 1024:.0f} | {p['tokens_per_s']:.0f} |"
                 f" {p['time_vs_float']:.2f} ({p['time_vs_float_iqr'][0]:.2f}-"
                 f"{p['time_vs_float_iqr'][1]:.2f}) | {o['tokens_per_s']:.0f} |"
                 f" {o['time_vs_float']:.2f} ({o['time_vs_float_iqr'][0]:.2f}-"
                 f"{o['time_vs_float_iqr'][1]:.2f}) |")
  lines += ["", f"packed vs fq: logits bit-identical {identical}; greedy generation (16 tokens)"
                f" identical {same_text}.", "", *memory_lines(memory, state_bytes)]
  print("\n".join(lines))
  if not args.quick:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return summary


if __name__ == "__main__":
  main()
