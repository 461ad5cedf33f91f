"""Probe of the TALR run-away under Adam seen in `tr_long.py` (R_0 = 5e-3, W1A1 and W2A2).

Trains the first 4000 of the 80K-step schedule (3 seeds side by side, same FP checkpoint
as `tr_long.py`), Adam + `tr_schedule` with the default `max_scale=1e3` and with 10, and
prints the transition rate, the TALR multiplier and the fraction of latent weights beyond
the grid (zero straight-through gradient) over steps 3000-4000.

    python benchmarks/tr_long_windup.py --data-dir ../shared/data
"""

import argparse

import numpy as np
import optax
from flax import nnx

import tr_long  # benchmarks/tr_long.py, next to this script

import trquant  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--checkpoint", default="benchmarks/results/tr_long_mlp/fp_mlp64.npz")
  args = parser.parse_args(argv)
  data, num_classes = tr_long.load_data(tr_long.parse_args(["--data-dir", args.data_dir or ""]))
  total = 80_000
  for bits in (2, 1):
    for max_scale in (1e3, 10.0):
      model = tr_long.BNMLP(data[0].shape[1], 64, num_classes, bits=bits, rngs=nnx.Rngs(0))
      trquant.nnx.load_float_weights(model, dict(np.load(args.checkpoint)))
      trquant.nnx.init_weight_scales(model)
      model.eval()
      trquant.nnx.calibrate_activations(model, data[0][:512])
      model.train()
      quant = optax.chain(optax.adam(1e-3), trquant.tr_schedule(
          optax.cosine_decay_schedule(5e-3, total), codes_fn=trquant.nnx.codes_fn(model),
          max_scale=max_scale))
      tx = optax.partition({"quant": quant, "float": optax.adam(optax.cosine_decay_schedule(1e-3, total))},
                           trquant.nnx.param_labels(model))
      tx = optax.chain(tx, trquant.track_oscillations(trquant.nnx.codes_fn(model)))
      _, records, evals = tr_long.train(model, tx, data, steps=4000, eval_every=2000, batch_size=128,
                                        seeds=[0, 1, 2])
      window = slice(3000, 4000)
      print(f"W{bits}A{bits} adam R0=5e-3 max_scale={max_scale:g}: test accuracy at 4K"
            f" {np.round(evals[-1][1], 4).tolist()}, transition rate"
            f" {records['transition_rate'][window].mean():.2e}, u"
            f" {records['talr_multiplier'][window].mean():.1f}, beyond the grid"
            f" {records['beyond_range'][window].mean():.3f}", flush=True)


if __name__ == "__main__":
  main()
