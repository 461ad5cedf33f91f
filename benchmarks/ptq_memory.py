"""Peak memory of post-training quantization on the example LM, against model and data size.

The byte LM of examples/train_lm.py (``trquant_examples.lm``, plain Flax NNX; random
weights: memory does not depend on training) quantized by the rules of
``benchmarks/lm_serving.py`` (projections W4 in groups of 32 along the input features, the
head W8 per channel, the embedding float). Each method runs in a fresh process, which
builds the model and the calibration windows, then runs ``round_to_nearest`` or
``reconstruct_model`` (AdaRound: layer by layer; BRECQ: block by block) while a thread
samples the bytes of the live JAX arrays every few milliseconds; the process's peak
resident memory (VmHWM, reset after the set-up) is read at the end. Reported against

* ``model``: the bytes of the quantized model's state (float kernels, scales), which the
  caller holds before PTQ starts;
* ``calibration``: the calibration tokens;
* ``unit data``: the largest unit's captured activations (its quantized-model input, its
  full-precision input and output over the calibration windows), which reconstruction
  needs at once.

    python benchmarks/ptq_memory.py            # the 12.8M-parameter LM, ~5 min on 2 cores
    python benchmarks/ptq_memory.py --quick    # a tiny LM, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import _runs  # benchmarks/_runs.py, next to this script
import trquant
from trquant.nnx import QuantRule
from trquant_examples.lm import LM

METHODS = ("rtn", "adaround", "brecq")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  _runs.add_serving_lm_arguments(parser)
  parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
  parser.add_argument("--batch-size", type=int, default=16, help="windows per calibration batch")
  parser.add_argument("--iters", type=int, default=20, help="reconstruction iterations per unit")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--interval-ms", type=float, default=5.0, help="live-bytes sampling period")
  parser.add_argument("--out", default="benchmarks/results/ptq_memory")
  parser.add_argument("--quick", action="store_true", help="a tiny LM, 2 iterations")
  parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.dim, args.layers, args.heads, args.kv_heads, args.hidden = 64, 2, 4, 2, 128
    args.context, args.calibration, args.batch_size, args.iters = 32, 8, 4, 2
    args.group_size = 16
  return args


def rules(group_size):
  """W4 per-group projections, W8 per-channel head, float embedding (as lm_serving)."""
  return [QuantRule("embed", skip=True), QuantRule("lm_head", weight_bits=8, per_channel=True),
          QuantRule(".*", weight_bits=4, group_size=group_size)]


def live_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


class LiveBytesSampler:
  """A thread that records the peak of :func:`live_bytes` while it runs."""

  def __init__(self, interval_s):
    self.interval_s, self.peak, self.samples = interval_s, 0, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      try:
        self.peak = max(self.peak, live_bytes())
        self.samples += 1
      except RuntimeError:  # an array deleted while it was read
        pass
      time.sleep(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, live_bytes())


def run_child(args):
  """One method in this (fresh) process: its peak live bytes and peak RSS, as JSON."""
  model = trquant.nnx.quantize_model(
      LM(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
         hidden=args.hidden, rngs=nnx.Rngs(0)), rules(args.group_size))
  tokens = jax.random.randint(jax.random.key(1), (args.calibration, args.context), 0, 256)
  batches = [tokens[i:i + args.batch_size] for i in range(0, args.calibration, args.batch_size)]
  model_bytes = trquant.export.nbytes(nnx.state(model))
  gc.collect()
  before = live_bytes()
  _runs.reset_peak_rss()
  rss_before = _runs.rss_mib("VmRSS")
  start = time.perf_counter()
  with LiveBytesSampler(args.interval_ms / 1e3) as sampler:
    if args.child == "rtn":
      result = trquant.adaround.round_to_nearest(model)
    else:
      config = trquant.adaround.AdaRoundConfig(iters=args.iters)
      result = trquant.adaround.reconstruct_model(
          model, batches, config=config, key=jax.random.key(2), progress=False,
          granularity="layer" if args.child == "adaround" else "block")
    jax.block_until_ready(nnx.state(result.model))
  seconds = time.perf_counter() - start
  result_bytes = trquant.export.nbytes(nnx.state(result.model))
  print(json.dumps({
      "method": args.child, "seconds": seconds, "model_bytes": model_bytes,
      "calibration_bytes": int(tokens.nbytes), "live_before": before,
      "live_peak": sampler.peak, "live_samples": sampler.samples,
      "result_bytes": result_bytes, "units": len(result.reports),
      "rss_before_mib": rss_before, "rss_peak_mib": _runs.rss_mib("VmHWM")}))


def unit_data_bytes(args) -> int:
  """The largest unit's captured activations: x_q, x_fp, y_fp over the calibration set
  (a transformer block's input and output are (windows, context, dim) float32)."""
  return 3 * args.calibration * args.context * args.dim * 4


def table(rows, args):
  mib = 1 / 2 ** 20
  unit = unit_data_bytes(args)
  lines = ["| method | units | seconds | model (MiB) | calibration (MiB) | largest unit's data"
           " (MiB) | live bytes added by PTQ, peak (MiB) | added / model | RSS peak - before"
           " (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    added = row["live_peak"] - row["live_before"]
    lines.append(
        f"| {row['method']} | {row['units']} | {row['seconds']:.1f} |"
        f" {row['model_bytes'] * mib:.1f} | {row['calibration_bytes'] * mib:.2f} |"
        f" {unit * mib:.1f} | {added * mib:.1f} | {added / row['model_bytes']:.2f} |"
        f" {row['rss_peak_mib'] - row['rss_before_mib']:.0f} |")
  return lines


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    return run_child(args)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise SystemExit(f"--methods: unknown {unknown}; choose from {METHODS}.")
  flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
           ("dim", "layers", "heads", "kv_heads", "hidden", "context", "group_size",
            "calibration", "batch_size", "iters", "interval_ms")]
  rows = []
  for method in methods:
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *flags,
                            f"--child={method}"], capture_output=True, text=True, check=False)
    if child.returncode:
      raise RuntimeError(f"{method} failed:\n{child.stderr[-3000:]}")
    rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print("\n".join(table(rows[-1:], args)[2:]), flush=True)
  lines = table(rows, args)
  print("\n".join(lines))
  if not args.quick:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
      json.dump({"settings": vars(args), "provenance": _runs.machine_provenance(),
                 "rows": rows, "unit_data_bytes": unit_data_bytes(args)}, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return rows


if __name__ == "__main__":
  main()
