"""W4A8 matmuls on the CPU: float (dequantized) vs int8 x int8 -> int32 ``dot_general``.

A W4A8 layer (4-bit weight codes with per-group scales, activations quantized per token
to 8 bits by their absmax) can be computed two ways:

* **float**, as trquant's layers and packed models compute it: the weight codes times their
  scales as a float kernel, the activations fake-quantized in float, one float matmul;
* **int8**: the activation codes and the weight codes as int8, one int8 x int8 -> int32
  ``lax.dot_general`` per group of ``group_size`` input features (a batch dimension over
  the groups), each group's int32 sum times its weight scale, summed over the groups,
  times the token's scale. The integer sums are exact; only the scaling rounds.

Each form starts from the same packed weights (``trquant.export.to_integer``: two 4-bit
codes a byte) and is timed with its unpacking inside the jitted call, and also with the
kernel already resident in its compute form (float32 kernel; int8 codes), for the shapes
of the 12.8M-parameter serving LM (``lm_serving.py``: width 512, MLP 1536) at batch-1
decode (1 token) and prefill (256 tokens). Calls alternate between the forms, round by
round, in one process; the table gives each form's median time per call and the ratio to
the float form with the same kernel storage.

    python benchmarks/a8_matmul.py               # about a minute on 2 cores
    python benchmarks/a8_matmul.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import trquant
from _runs import cpu_model, git_state

A_BITS, W_BITS = 8, 4
A_HI = 2 ** (A_BITS - 1) - 1


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="512x1536,1536x512",
                      help="kernel shapes, in x out, comma-separated")
  parser.add_argument("--tokens", default="1,256", help="tokens per call, comma-separated")
  parser.add_argument("--group-sizes", default="32,0",
                      help="weight group sizes; 0: one scale per output channel")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--calls-per-round", type=int, default=20)
  parser.add_argument("--out", default="benchmarks/results/a8_matmul")
  parser.add_argument("--quick", action="store_true", help="one small shape, 2 rounds")
  args = parser.parse_args(argv)
  if args.quick:
    args.shapes, args.tokens, args.rounds, args.calls_per_round = "64x96", "1,8", 2, 2
  return args


def packed_weight(n_in, n_out, group_size, seed=0):
  """A 4-bit IntegerTensor of a random kernel, MSE scales per group (or per channel)."""
  w = jax.random.normal(jax.random.key(seed), (n_in, n_out)) * 0.05
  if group_size:
    scale = trquant.init_scale(w, bits=W_BITS, method="mse", group_size=group_size)
    return trquant.export.to_integer(w, scale, bits=W_BITS, group_size=group_size)
  scale = trquant.init_scale(w, bits=W_BITS, method="mse", axis=-1)
  return trquant.export.to_integer(w, scale, bits=W_BITS)


def activation_codes(x):
  """int8 codes and float scales of ``x``, per token (row) by its absmax (the scale
  ``trquant.fake_quant_dynamic`` uses)."""
  scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True) / A_HI,
                      jnp.finfo(jnp.float32).tiny)
  return trquant.quantize(x, scale, bits=A_BITS).astype(jnp.int8), scale


def float_matmul(x, kernel):
  """The layers' computation: fake-quantized activations times the float kernel."""
  return trquant.fake_quant_dynamic(x, bits=A_BITS) @ kernel


def int8_matmul(x, codes, w_scale, group_size):
  """int8 x int8 -> int32 per group, scaled by the weight and token scales in float."""
  x_codes, x_scale = activation_codes(x)
  n_in, n_out = codes.shape
  if not group_size:  # one int8 matmul; one scale per output channel
    acc = jax.lax.dot_general(x_codes, codes, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * w_scale * x_scale
  groups = n_in // group_size
  acc = jax.lax.dot_general(  # (groups, tokens, out): the groups are a batch dimension
      x_codes.reshape(-1, groups, group_size), codes.reshape(groups, group_size, n_out),
      (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)
  return jnp.einsum("gto,go->to", acc.astype(jnp.float32), w_scale) * x_scale


def forms(weight, group_size):
  """name -> (jitted fn, its arguments after x) for the four forms."""
  scale = jnp.asarray(weight.scale, jnp.float32).reshape(-1, weight.shape[1])
  return {
      "float, packed": (jax.jit(lambda x, w: float_matmul(x, w.dequantize())), (weight,)),
      "int8, packed": (jax.jit(lambda x, w, s: int8_matmul(x, w.codes.astype(jnp.int8), s,
                                                           group_size)), (weight, scale)),
      "float, resident f32": (jax.jit(float_matmul), (weight.dequantize(),)),
      "int8, resident int8": (jax.jit(lambda x, c, s: int8_matmul(x, c, s, group_size)),
                              (weight.codes.astype(jnp.int8), scale)),
  }


def time_forms(fns, x, rounds, calls):
  """Median seconds per call of each form, calls alternating form by form each round."""
  for fn, extra in fns.values():  # compile and warm up
    jax.block_until_ready(fn(x, *extra))
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (fn, extra) in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn(x, *extra)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / calls)
  return {name: float(np.median(s)) for name, s in samples.items()}


def main(argv=None):
  args = parse_args(argv)
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for shape in args.shapes.split(","):
    n_in, n_out = (int(v) for v in shape.split("x"))
    for group_size in (int(g) for g in args.group_sizes.split(",")):
      if group_size and n_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the input axis {n_in}")
      weight = packed_weight(n_in, n_out, group_size)
      fns = forms(weight, group_size)
      for tokens in (int(t) for t in args.tokens.split(",")):
        x = jax.random.normal(jax.random.key(tokens), (tokens, n_in))
        reference = fns["float, resident f32"][0](x, *fns["float, resident f32"][1])
        got = fns["int8, resident int8"][0](x, *fns["int8, resident int8"][1])
        # The two forms differ by float rounding only (the int32 sums are exact).
        error = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
        times = time_forms(fns, x, args.rounds, args.calls_per_round)
        row = dict(shape=[n_in, n_out], group_size=group_size or None, tokens=tokens,
                   seconds_per_call=times, max_relative_difference=error,
                   int8_over_float_packed=times["int8, packed"] / times["float, packed"],
                   int8_over_float_resident=(times["int8, resident int8"]
                                             / times["float, resident f32"]))
        rows.append(row)
        print(f"{n_in}x{n_out} g{group_size or '-'} {tokens:4d} tok: "
              + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in times.items())
              + f"; int8/float packed {row['int8_over_float_packed']:.2f}x,"
              f" resident {row['int8_over_float_resident']:.2f}x; max rel diff {error:.1e}")
  record = dict(rows=rows, args=vars(args), code=git_state(), cpu=cpu_model(),
                device=str(jax.devices()[0]), jax=jax.__version__)
  (out_dir / "a8_matmul.json").write_text(json.dumps(record, indent=1))
  lines = ["| kernel | group | tokens | float, packed | int8, packed | ratio | "
           "float, resident f32 | int8, resident int8 | ratio | max rel. diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    t = r["seconds_per_call"]
    lines.append(
        f"| {r['shape'][0]}x{r['shape'][1]} | {r['group_size'] or 'channel'} | {r['tokens']} | "
        f"{t['float, packed'] * 1e6:.0f} us | {t['int8, packed'] * 1e6:.0f} us | "
        f"{r['int8_over_float_packed']:.2f}x | {t['float, resident f32'] * 1e6:.0f} us | "
        f"{t['int8, resident int8'] * 1e6:.0f} us | {r['int8_over_float_resident']:.2f}x | "
        f"{r['max_relative_difference']:.1e} |")
  (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {out_dir / 'a8_matmul.json'} and {out_dir / 'summary.md'}")
  return rows


if __name__ == "__main__":
  main()
