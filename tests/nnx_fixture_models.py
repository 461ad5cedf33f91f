"""Small trquant NNX models shared by the tests of trquant.nnx and trquant.adaround (not a
test module)."""

import math

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


# PyTorch's BatchNorm defaults (running-average weight 0.1 on each new batch) and He
# initialisation, as in the CNNs the library is used on.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class ConvBN(nnx.Module):
  """A full-precision QuantConv (no bias, symmetric padding) followed by BatchNorm."""

  def __init__(self, in_channels, out_channels, kernel_size, *, strides=1, signed_input, rngs):
    self.conv = QuantConv(in_channels, out_channels, kernel_size, strides=strides,
                          padding=kernel_size // 2, use_bias=False, kernel_init=CONV_INIT,
                          weight_bits=None, act_bits=None, signed_act=signed_input, rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
  """A ResNet basic block of ConvBNs: two 3x3 with a ReLU between, an identity or 1x1
  projection shortcut, ReLU after the sum (post-ReLU, so unsigned, inputs)."""

  def __init__(self, in_channels, out_channels, *, strides, rngs):
    self.conv1 = ConvBN(in_channels, out_channels, 3, strides=strides, signed_input=False,
                        rngs=rngs)
    self.conv2 = ConvBN(out_channels, out_channels, 3, signed_input=False, rngs=rngs)
    if strides != 1 or in_channels != out_channels:
      self.shortcut = ConvBN(in_channels, out_channels, 1, strides=strides, signed_input=False,
                             rngs=rngs)
    else:
      self.shortcut = None

  def __call__(self, x):
    residual = x if self.shortcut is None else self.shortcut(x)
    y = nnx.relu(self.conv1(x))
    return nnx.relu(self.conv2(y) + residual)


class SmallCNN(nnx.Module):
  """Full precision: conv3x3(32)-BN-ReLU, conv3x3(64, /2)-BN-ReLU, conv3x3(128, /2)-BN-ReLU,
  flatten, linear; NHWC images of ``image_size`` x ``image_size`` pixels in, logits out."""

  def __init__(self, *, num_classes, in_channels, image_size, rngs):
    self.conv1 = ConvBN(in_channels, 32, 3, signed_input=True, rngs=rngs)
    self.conv2 = ConvBN(32, 64, 3, strides=2, signed_input=False, rngs=rngs)
    self.conv3 = ConvBN(64, 128, 3, strides=2, signed_input=False, rngs=rngs)
    features = math.ceil(math.ceil(image_size / 2) / 2)  # after two stride-2 convs
    self.head = QuantLinear(features * features * 128, num_classes, weight_bits=None,
                            act_bits=None, signed_act=False, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))
