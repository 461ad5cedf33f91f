"""Size of an integer export (trquant.export) vs the float32 checkpoint, for ResNet-20.

    python benchmarks/export_size.py

Counts every array of the exported tree (packed codes, scales, float biases,
BatchNorm parameters and statistics) against the same model's float32
``nnx.Param`` + ``nnx.BatchStat`` state.
"""


import jax
import numpy as np
from flax import nnx

import trquant
from trquant_examples import models


def main():
  print("| weights | first conv / last linear | float32 KiB | exported KiB | ratio |")
  print("|---|---|---|---|---|")
  for bits in (8, 4, 2, 1):
    for first_last in ("fp", 8):
      model = models.build_model("resnet20", num_classes=10, in_channels=3, weight_bits=bits,
                                 act_bits=None, first_last=first_last, scale_method="lsq",
                                 rngs=nnx.Rngs(0))
      state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
      float_bytes = sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(state))
      exported_bytes = trquant.export.nbytes(trquant.export.to_integer(model))
      print(f"| W{bits} | {first_last} | {float_bytes / 1024:.1f} | {exported_bytes / 1024:.1f} |"
            f" {float_bytes / exported_bytes:.2f}x |")


if __name__ == "__main__":
  main()
