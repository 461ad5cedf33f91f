"""Small trquant NNX models shared by the tests of trquant.nnx (not a test module)."""

from flax import nnx

from trquant.nnx import QuantConv, QuantLinear


def small_mlp(weight_quantizer="fixed", act_bits=4, seed=0):
  """16 -> 32 -> 8, both layers 2-bit weights, the second with quantized inputs."""
  rngs = nnx.Rngs(seed)
  return nnx.Sequential(
      QuantLinear(16, 32, weight_bits=2, rngs=rngs, weight_quantizer=weight_quantizer),
      nnx.relu,
      QuantLinear(32, 8, weight_bits=2, act_bits=act_bits, rngs=rngs,
                  weight_quantizer=weight_quantizer),
  )


class ConvNet(nnx.Module):
  """Conv + BatchNorm, a per-channel depth-wise conv with quantized inputs, an FP head."""

  def __init__(self, rngs, weight_bits=3):
    self.conv = QuantConv(1, 8, 3, weight_bits=weight_bits, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.depthwise = QuantConv(8, 8, 3, feature_group_count=8, weight_bits=weight_bits,
                               act_bits=weight_bits, per_channel=True, rngs=rngs)
    self.head = QuantLinear(8, 10, weight_bits=None, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.depthwise(x))
    return self.head(x.mean(axis=(1, 2)))
