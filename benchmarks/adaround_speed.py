"""Speed of one layer's AdaRound loop against an eager PyTorch loop, side by side.

The same layer (a 256->128 linear layer, a 3x3 32->32 convolution on 8x8 and on 16x16
feature maps), the same calibration data (1024 post-ReLU Gaussian inputs, the FP
layer's outputs as targets), the same MSE step size and the same hyper-parameters
(iterations, batch 32, Adam 1e-3 on V, lambda 0.01, warm-up 20%, beta 20 -> 2 cosine)
in three implementations, one after the other in this process:

* ``trquant``: :func:`trquant.adaround.reconstruct_layer` with ``loop="auto"`` (on CPU a
  layer with a convolution runs as a Python loop over one jitted step);
* ``trquant scan``: the same with ``loop="scan"`` (one jitted ``lax.scan``), and for the
  convolutions, with the convolution written as ``patches @ kernel``, the form the
  model driver used inside the scan before ``loop="steps"`` existed;
* ``torch``: AdaRound written out in eager PyTorch from the paper's equations (rectified
  sigmoid, regulariser ``sum(1 - |2h - 1|^beta)``, the same loss and schedule), CPU,
  ``torch.set_num_threads(--threads)``.

Times are wall-clock for the whole call, compilation included (JAX's caches are cleared
before every call and the persistent compilation cache is off). Quality: the final hard
rounding's output error over the whole calibration set, divided by round-to-nearest's,
evaluated by the same function for all three. Needs PyTorch (``pip install torch``).

    python benchmarks/adaround_speed.py --iters 2000 --seeds 5 --out benchmarks/results/adaround_speed
    python benchmarks/adaround_speed.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # every timed call compiles

import jax
import jax.numpy as jnp
import numpy as np

import trquant
from trquant import adaround
from trquant._src.adaround import config as adaround_config  # the paper's constants
from trquant._src.adaround import loop as adaround_loop  # how the loop runs: measured here

CASES = {  # name: (kind, input shape per example, output features)
    "linear": ("linear", (256,), 128),
    "conv8": ("conv", (8, 8, 32), 32),
    "conv16": ("conv", (16, 16, 32), 32),
}
ZETA, GAMMA = adaround_config.ZETA, adaround_config.GAMMA


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default="linear,conv8,conv16")
  parser.add_argument("--bits", default="4,2")
  parser.add_argument("--iters", type=int, default=2000)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--calibration", type=int, default=1024)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
  parser.add_argument("--no-scan", action="store_true",
                      help="skip the lax.scan form (slow for convolutions on CPU)")
  parser.add_argument("--out", default="benchmarks/results/adaround_speed")
  parser.add_argument("--quick", action="store_true", help="a few iterations, one seed, one bit width")
  args = parser.parse_args(argv)
  if args.quick:
    args.iters, args.seeds, args.bits, args.calibration = 50, 1, "4", 128
  return args


def make_case(name, calibration, seed):
  kind, in_shape, out = CASES[name]
  kw, kx = jax.random.split(jax.random.key(1000 + seed))
  fan_in = in_shape[-1] * (9 if kind == "conv" else 1)
  shape = (3, 3, in_shape[-1], out) if kind == "conv" else (in_shape[-1], out)
  w = jax.random.normal(kw, shape) * np.sqrt(2.0 / fan_in)
  x = jax.nn.relu(jax.random.normal(kx, (calibration,) + in_shape))
  if kind == "conv":
    apply_fn = lambda w, x: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  else:
    apply_fn = lambda w, x: x @ w
  return kind, w, x, apply_fn


def patches_apply_fn(w, x):
  """The convolution as ``patches @ kernel`` (patch channels input-channel-major)."""
  patches = jax.lax.conv_general_dilated_patches(x, w.shape[:2], (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return patches @ jnp.moveaxis(w, 2, 0).reshape(-1, w.shape[-1])


def torch_adaround(kind, w, scale, x, y, *, bits, iters, batch_size, seed, threads):
  """AdaRound in eager PyTorch, from the paper's equations; returns (codes, seconds)."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  if kind == "conv":  # HWIO -> OIHW, NHWC -> NCHW
    weight = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1))
    scale_t = torch.tensor(float(np.asarray(scale).reshape(-1)[0]))
    inputs = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))
    targets = torch.tensor(np.asarray(y).transpose(0, 3, 1, 2))
    forward = lambda wt, xb: F.conv2d(xb, wt, padding=1)
  else:  # (in, out) -> (out, in)
    weight = torch.tensor(np.asarray(w).T)
    scale_t = torch.tensor(float(np.asarray(scale).reshape(-1)[0]))
    inputs, targets = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
    forward = F.linear
  start = time.perf_counter()
  floor = torch.floor(weight / scale_t)
  rest = weight / scale_t - floor
  probability = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
  V = torch.log(probability / (1 - probability)).requires_grad_(True)
  optimizer = torch.optim.Adam([V], lr=1e-3)
  warm = int(np.ceil(0.2 * iters))
  for t in range(iters):
    index = torch.randint(0, inputs.shape[0], (batch_size,))
    h = (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    soft = scale_t * (floor + h).clamp(lo, hi)
    out = forward(inputs[index], soft) if kind == "linear" else forward(soft, inputs[index])
    loss = (out - targets[index]).pow(2).sum(1).mean()  # summed over channels (dim 1)
    if t >= warm:
      progress = (t - warm) / max(iters - warm, 1)
      beta = 2.0 + 0.5 * (20.0 - 2.0) * (1 + np.cos(np.pi * progress))
      loss = loss + 0.01 * (1 - (2 * h - 1).abs().pow(beta)).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  codes = (floor + (V >= 0).float()).clamp(lo, hi).detach().numpy()
  seconds = time.perf_counter() - start
  codes = codes.transpose(2, 3, 1, 0) if kind == "conv" else codes.T
  return codes, seconds


def error_ratio(apply_fn, weight, nearest_error, x, y):
  return adaround.reconstruction_error(apply_fn, weight, x, y) / nearest_error


LABELS = ("trquant", "trquant_scan", "torch")


def run(args):
  import torch  # noqa: F401  (fail early, with the install hint below)
  rows = []
  for name in args.cases.split(","):
    for bits in map(int, args.bits.split(",")):
      for seed in range(args.seeds):
        kind, w, x, apply_fn = make_case(name, args.calibration, seed)
        y = apply_fn(w, x)
        scale = trquant.init_scale(w, bits=bits, method="mse")
        nearest = scale * jnp.clip(jnp.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        nearest_error = adaround.reconstruction_error(apply_fn, nearest, x, y)
        config = adaround.AdaRoundConfig(iters=args.iters, batch_size=args.batch_size)
        common = dict(weight_bits=bits, key=jax.random.key(seed))
        row = {"case": name, "bits": bits, "seed": seed, "iters": args.iters,
               "loop_auto": adaround_loop.resolve_loop("auto", apply_fn, w, x[:1])}
        forms = [("trquant", apply_fn, "auto"),
                 ("trquant_scan", patches_apply_fn if kind == "conv" else apply_fn, "scan")]
        forms = forms[:1] if args.no_scan else forms
        for label, fn, loop in forms:
          jax.clear_caches()
          start = time.perf_counter()
          result = adaround.reconstruct_layer(fn, w, scale, x, y, config=config.replace(loop=loop),
                                              **common)
          jax.block_until_ready(result.weights)
          row[f"{label}_seconds"] = time.perf_counter() - start
          row[f"{label}_ratio"] = error_ratio(apply_fn, result.weights, nearest_error, x, y)
        codes, seconds = torch_adaround(kind, w, scale, x, y, bits=bits, iters=args.iters,
                                        batch_size=args.batch_size, seed=seed,
                                        threads=args.threads)
        row["torch_seconds"] = seconds
        row["torch_ratio"] = error_ratio(apply_fn, scale * jnp.asarray(codes), nearest_error, x, y)
        rows.append(row)
        print(f"{name} W{bits} seed {seed}: " + ", ".join(
            f"{label} {args.iters / row[f'{label}_seconds']:.0f} it/s (ratio {row[f'{label}_ratio']:.3f})"
            for label in LABELS if f"{label}_seconds" in row), flush=True)
  return rows


def summarize(rows, args):
  import torch
  lines = ["# AdaRound loop speed: trquant vs eager PyTorch", "",
           f"Device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; jax {jax.__version__},"
           f" torch {torch.__version__} ({args.threads} threads). {args.iters} iterations, batch"
           f" {args.batch_size}, {args.calibration} calibration examples, {args.seeds} seeds;"
           f" XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}."
           " Iterations per second of the whole call, compilation included (mean ± std over seeds);"
           " ratio = output error of the final rounding / round-to-nearest's (mean over seeds).", "",
           "| layer | bits | trquant (loop) | trquant scan | eager PyTorch | trquant / PyTorch |"
           " ratio trquant | ratio scan | ratio PyTorch |",
           "|---|---|---|---|---|---|---|---|---|"]
  summary = []
  for name in dict.fromkeys(r["case"] for r in rows):
    for bits in dict.fromkeys(r["bits"] for r in rows):
      group = [r for r in rows if r["case"] == name and r["bits"] == bits]
      if not group:
        continue
      labels = [label for label in LABELS if f"{label}_seconds" in group[0]]
      its = {label: np.array([r["iters"] / r[f"{label}_seconds"] for r in group])
             for label in labels}
      ratios = {label: np.array([r[f"{label}_ratio"] for r in group]) for label in labels}
      speedup = its["trquant"] / its["torch"]
      fmt = lambda v: f"{v.mean():.0f} ± {v.std(ddof=1) if len(v) > 1 else 0:.0f}"
      skipped = np.full(1, np.nan)  # --no-scan: the scan columns read nan
      lines.append(f"| {name} | W{bits} | {fmt(its['trquant'])} ({group[0]['loop_auto']}) |"
                   f" {fmt(its.get('trquant_scan', skipped))} | {fmt(its['torch'])} |"
                   f" {speedup.mean():.2f}x | {ratios['trquant'].mean():.3f} |"
                   f" {ratios.get('trquant_scan', skipped).mean():.3f} |"
                   f" {ratios['torch'].mean():.3f} |")
      summary.append({"case": name, "bits": bits, "loop": group[0]["loop_auto"],
                      "its": {k: v.tolist() for k, v in its.items()},
                      "error_ratio": {k: v.tolist() for k, v in ratios.items()},
                      "speedup_vs_torch": speedup.tolist()})
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump({"rows": rows, "summary": summary, "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "torch": torch.__version__, "threads": args.threads,
               "xla_flags": os.environ.get("XLA_FLAGS", "")}, f,
              indent=1)
  print("\n".join(lines))


def main(argv=None):
  args = parse_args(argv)
  try:
    import torch  # noqa: F401
  except ImportError:
    raise SystemExit("this benchmark compares against PyTorch: `pip install torch` first")
  summarize(run(args), args)


if __name__ == "__main__":
  main()
