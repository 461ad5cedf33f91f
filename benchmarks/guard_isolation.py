"""Where the windup guard's cost on the LM goes: the optimizer update with parts removed.

``benchmarks/overhead.py`` measures ``tr_schedule``'s update on the 12.8M-parameter LM
(W4 in groups of 32) with and without the windup guard. This script takes that same jitted
update (Adam then ``tr_schedule``, fixed gradients, batch 2) and removes one part of the
guard at a time, by patching ``trquant._src.tr_scheduling.windup_guard`` (internals: this
is a diagnosis, not an API), timed interleaved round by round in one process:

* ``no guard``: ``windup_guard=False``;
* ``guard``: the default (stalled and beyond-grid fractions inside a ``lax.cond`` that
  runs every ``guard_window // 50`` = 10 updates);
* ``guard, every update``: the same statistics each update, no ``lax.cond``;
* ``guard, trivial stalled count``: the ``lax.cond`` kept, the stalled count replaced by
  a constant read from each update (the branch does almost nothing);
* ``guard, no beyond-grid mask``: ``codes_fn`` without its ``saturation_fn``;
* ``guard, trivial branch``: both of the last two: a ``lax.cond`` whose branch reads one
  entry of each update.

Each timed block is 10 updates, so the branch runs once per block.

    python benchmarks/guard_isolation.py            # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import _runs  # benchmarks/_runs.py, next to this script
import overhead  # benchmarks/overhead.py, next to this script
import trquant
from trquant._src.tr_scheduling import windup_guard

VARIANTS = {
    "no guard": dict(variant="adam_tr_noguard"),
    "guard": dict(variant="adam_tr"),
    "guard, every update": dict(variant="adam_tr", every_update=True),
    "guard, trivial stalled count": dict(variant="adam_tr", trivial_stalled=True),
    "guard, no beyond-grid mask": dict(variant="adam_tr", no_saturation=True),
    "guard, trivial branch": dict(variant="adam_tr", trivial_stalled=True, no_saturation=True),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--updates-per-round", type=int, default=10)
  parser.add_argument("--out", default="benchmarks/results/guard_isolation")
  return parser.parse_args(argv)


def compiled_update(variant, every_update=False, trivial_stalled=False, no_saturation=False):
  """The jitted optimizer update of overhead.py's LM under one patch, and its carry."""
  stride, stalled, codes_fn = (windup_guard.statistics_stride, windup_guard.stalled_count,
                               trquant.nnx.codes_fn)
  try:
    if every_update:
      windup_guard.statistics_stride = lambda window: 1
    if trivial_stalled:
      windup_guard.stalled_count = lambda update: 0.0 * update.reshape(-1)[0].astype(jnp.float32)
    if no_saturation:  # a plain function: no saturation_fn attribute for tr_schedule to find
      trquant.nnx.codes_fn = lambda model: (lambda params, fn=codes_fn(model): fn(params))
    *_, update, carry = overhead.build_step("lm", variant, 2, 4)
    return update.lower(*carry).compile(), carry
  finally:
    windup_guard.statistics_stride, windup_guard.stalled_count = stride, stalled
    trquant.nnx.codes_fn = codes_fn


def main(argv=None):
  args = parse_args(argv)
  calls = {name: compiled_update(**patch) for name, patch in VARIANTS.items()}
  times = {name: [] for name in VARIANTS}
  for _ in range(args.rounds):
    for name, (update, carry) in calls.items():
      for _ in range(2):  # warm, and the branch's phase moves on
        out = update(*carry)
        carry = list(out[:3])
      jax.block_until_ready(out)
      start = time.perf_counter()
      for _ in range(args.updates_per_round):
        out = update(*carry)
        carry = list(out[:3])
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / args.updates_per_round * 1e3)
      calls[name] = (update, carry)
  lines = ["| variant | update, median (ms) | per round (ms) |", "|---|---|---|"]
  for name, values in times.items():
    lines.append(f"| {name} | {np.median(values):.1f} |"
                 f" {', '.join(f'{v:.1f}' for v in values)} |")
  print("\n".join(lines))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"settings": vars(args), "provenance": _runs.machine_provenance(),
               "update_ms": times}, f, indent=1)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return times


if __name__ == "__main__":
  main()
