"""Image classifiers built from trquant.nnx layers: a small CNN, ResNet-20 and a small MobileNetV2.

Every convolution and linear layer is a :class:`trquant.nnx.QuantConv` /
:class:`trquant.nnx.QuantLinear`, so one constructor builds both the
full-precision model (``weight_bits=None, act_bits=None``) and its quantized
counterpart with the same module tree, so an FP checkpoint loads into a quantized
model: ``trquant.nnx.load_float_weights(quant_model, fp_model)``, then
``trquant.nnx.init_weight_scales(quant_model)``. The quantized model only adds
activation (and, with ``weight_quantizer="lsq"``, weight) step sizes. Load values
only: ``nnx.update`` with an ``nnx.State`` of Variables also copies their
metadata, which sets every quantized kernel's ``bits`` to the FP model's None and
so silently turns the quantized model into an FP one.

Activation quantization applies to each layer's *input*. Inputs that follow a
ReLU / ReLU6 use the unsigned grid; the normalized input image, MobileNetV2's
linear-bottleneck outputs and residual sums that are not followed by a ReLU use
the signed grid.

    from flax import nnx
    from trquant_examples import models
    model = models.build_model("resnet20", num_classes=10, in_channels=3, weight_bits=2,
                               act_bits=2, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 32, 32, 3)))  # shape (1, 10)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

import trquant.nnx
from trquant.nnx import QuantConv, QuantLinear

MODEL_NAMES = ("cnn", "resnet20", "mobilenetv2", "mobilenetv2_tiny")
# The first/last-layer policy: "fp", "same", or an int bit width for their weights and inputs;
# build_model turns it into a trquant.nnx.first_last_rule.
FIRST_LAST_MODES = ("fp", "same", 8)  # 8: any bit width in [1, 16]

# PyTorch's BatchNorm defaults (running-average weight 0.1 on each new batch).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# He initialisation suits convolutions followed by ReLU.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

__all__ = ["MODEL_NAMES", "SmallCNN", "ResNet20", "MobileNetV2", "MobileNetV2Tiny", "build_model",
           "count_params"]


def check_first_last(value):
  """``value`` if it is a first/last policy ("fp", "same", an int bit width in [1, 16])."""
  if value in ("fp", "same") or (isinstance(value, int) and not isinstance(value, bool)
                                 and 1 <= value <= 16):
    return value
  raise ValueError(f'`first_last` must be "fp", "same" or a bit width in [1, 16] (e.g. 8),'
                   f" got {value!r}.")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """Quantization settings of one layer (None bits = full precision)."""

  weight_bits: Optional[int] = None
  act_bits: Optional[int] = None
  weight_quantizer: str = "fixed"
  per_channel: bool = False
  scale_method: str = "mse"

  def kwargs(self, *, signed_act: bool) -> dict:
    """Keyword arguments for QuantConv / QuantLinear; `signed_act` describes the layer's input."""
    return dict(weight_bits=self.weight_bits, act_bits=self.act_bits,
                weight_quantizer=self.weight_quantizer, per_channel=self.per_channel,
                scale_method=self.scale_method, signed_act=signed_act)


class ConvBN(nnx.Module):
  """QuantConv (no bias: BatchNorm's shift replaces it) followed by BatchNorm."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, strides: int = 1,
               groups: int = 1, padding: Optional[int] = None, quant: LayerQuant,
               signed_input: bool, rngs: nnx.Rngs):
    # Symmetric padding (PyTorch style), so stride-2 outputs are ceil(size / 2) for 1x1 and 3x3.
    padding = kernel_size // 2 if padding is None else padding
    self.conv = QuantConv(in_channels, out_channels, kernel_size, strides=strides,
                          padding=padding, feature_group_count=groups, use_bias=False,
                          kernel_init=CONV_INIT, rngs=rngs, **quant.kwargs(signed_act=signed_input))
    self.bn = nnx.BatchNorm(out_channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


def _global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))


# ---------------------------------------------------------------------------------------
# Small CNN
# ---------------------------------------------------------------------------------------


class SmallCNN(nnx.Module):
  """conv3x3(32)-BN-ReLU, conv3x3(64, /2)-BN-ReLU, conv3x3(128, /2)-BN-ReLU, flatten, linear.

  The head sees the flattened feature map rather than a global average: with a
  receptive field of only 15 pixels, average pooling throws away the layout that
  tells Fashion-MNIST classes apart (one FP epoch: 80.5% pooled vs 87.5% flattened).
  """

  def __init__(self, *, num_classes: int, in_channels: int, quant: LayerQuant, rngs: nnx.Rngs,
               image_size: int = 28):
    self.conv1 = ConvBN(in_channels, 32, 3, quant=quant, signed_input=True, rngs=rngs)
    self.conv2 = ConvBN(32, 64, 3, strides=2, quant=quant, signed_input=False, rngs=rngs)
    self.conv3 = ConvBN(64, 128, 3, strides=2, quant=quant, signed_input=False, rngs=rngs)
    feature_size = math.ceil(math.ceil(image_size / 2) / 2)  # after two stride-2 convs
    self.head = QuantLinear(feature_size * feature_size * 128, num_classes, rngs=rngs,
                            **quant.kwargs(signed_act=False))

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


# ---------------------------------------------------------------------------------------
# ResNet-20
# ---------------------------------------------------------------------------------------


class BasicBlock(nnx.Module):
  """Two conv3x3-BN with a ReLU between, an identity or 1x1 conv-BN shortcut, ReLU after the sum."""

  def __init__(self, in_channels: int, out_channels: int, *, strides: int, quant: LayerQuant,
               rngs: nnx.Rngs):
    # The block input is the stem's or the previous block's output, both post-ReLU.
    self.conv1 = ConvBN(in_channels, out_channels, 3, strides=strides, quant=quant,
                        signed_input=False, rngs=rngs)
    self.conv2 = ConvBN(out_channels, out_channels, 3, quant=quant, signed_input=False, rngs=rngs)
    if strides != 1 or in_channels != out_channels:  # option B: projection shortcut
      self.shortcut = ConvBN(in_channels, out_channels, 1, strides=strides, quant=quant,
                             signed_input=False, rngs=rngs)
    else:
      self.shortcut = None

  def __call__(self, x):
    residual = x if self.shortcut is None else self.shortcut(x)
    y = nnx.relu(self.conv1(x))
    return nnx.relu(self.conv2(y) + residual)


class ResNet20(nnx.Module):
  """CIFAR ResNet-20 (He et al. 2016): stem, 3 stages x 3 basic blocks (16/32/64), pool, linear."""

  STAGE_CHANNELS = (16, 32, 64)
  BLOCKS_PER_STAGE = 3

  def __init__(self, *, num_classes: int, in_channels: int, quant: LayerQuant, rngs: nnx.Rngs):
    self.stem = ConvBN(in_channels, 16, 3, quant=quant, signed_input=True, rngs=rngs)
    blocks, channels = [], 16
    for stage, out_channels in enumerate(self.STAGE_CHANNELS):
      for index in range(self.BLOCKS_PER_STAGE):
        strides = 2 if stage > 0 and index == 0 else 1
        blocks.append(BasicBlock(channels, out_channels, strides=strides, quant=quant,
                                 rngs=rngs))
        channels = out_channels
    self.blocks = nnx.List(blocks)
    self.head = QuantLinear(channels, num_classes, rngs=rngs, **quant.kwargs(signed_act=False))

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(_global_avg_pool(x))


# ---------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depth-wise-BN-ReLU6, 1x1 project-BN (+ input).

  With expansion 1 there is no expand conv (as in the paper). The output has no
  activation (linear bottleneck), so it is signed.
  """

  def __init__(self, in_channels: int, out_channels: int, *, expansion: int, strides: int,
               signed_input: bool, quant: LayerQuant, rngs: nnx.Rngs):
    hidden = in_channels * expansion
    if expansion != 1:
      self.expand = ConvBN(in_channels, hidden, 1, quant=quant, signed_input=signed_input,
                           rngs=rngs)
    else:
      self.expand = None
    # Without an expand conv the depth-wise conv reads the block input directly.
    self.depthwise = ConvBN(hidden, hidden, 3, strides=strides, groups=hidden, quant=quant,
                            signed_input=signed_input if expansion == 1 else False, rngs=rngs)
    self.project = ConvBN(hidden, out_channels, 1, quant=quant, signed_input=False, rngs=rngs)
    self.use_residual = strides == 1 and in_channels == out_channels

  def __call__(self, x):
    y = x if self.expand is None else nnx.relu6(self.expand(x))
    y = nnx.relu6(self.depthwise(y))
    y = self.project(y)
    return x + y if self.use_residual else y


class MobileNetV2(nnx.Module):
  """A small MobileNetV2 for 28x28 inputs: stem conv3x3(16), inverted residuals, 1x1 conv(256), pool, linear."""

  # (expansion, out_channels, num_blocks, stride of the first block)
  BLOCK_CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))
  STEM_CHANNELS = 16
  STEM_KERNEL, STEM_STRIDES, STEM_PADDING = 3, 1, 1
  HEAD_CHANNELS = 256

  def __init__(self, *, num_classes: int, in_channels: int, quant: LayerQuant, rngs: nnx.Rngs,
               block_config: Optional[Sequence[tuple[int, int, int, int]]] = None):
    self.stem = ConvBN(in_channels, self.STEM_CHANNELS, self.STEM_KERNEL, strides=self.STEM_STRIDES,
                       padding=self.STEM_PADDING, quant=quant, signed_input=True, rngs=rngs)
    blocks, channels, signed = [], self.STEM_CHANNELS, False  # the stem output is post-ReLU6
    for expansion, out_channels, num_blocks, first_stride in block_config or self.BLOCK_CONFIG:
      for index in range(num_blocks):
        blocks.append(InvertedResidual(channels, out_channels, expansion=expansion,
                                       strides=first_stride if index == 0 else 1,
                                       signed_input=signed, quant=quant, rngs=rngs))
        channels, signed = out_channels, True  # a block output is a linear bottleneck
    self.blocks = nnx.List(blocks)
    self.head_conv = ConvBN(channels, self.HEAD_CHANNELS, 1, quant=quant,
                            signed_input=signed, rngs=rngs)
    self.head = QuantLinear(self.HEAD_CHANNELS, num_classes, rngs=rngs,
                            **quant.kwargs(signed_act=False))

  def __call__(self, x):
    x = nnx.relu6(self.stem(x))
    for block in self.blocks:
      x = block(x)
    x = nnx.relu6(self.head_conv(x))
    return self.head(_global_avg_pool(x))


class MobileNetV2Tiny(MobileNetV2):
  """MobileNetV2 cut to 5 inverted residuals (expansion 3) on a 4x4 stride-4 "patchify"
  stem (28x28 -> 7x7 features, 4x4 after the stride-2 block): the same depth-wise /
  point-wise structure at a step cost that fits 10K-step runs on a CPU."""

  BLOCK_CONFIG = ((1, 16, 1, 1), (3, 24, 1, 1), (3, 32, 2, 2), (3, 48, 1, 1))
  STEM_KERNEL, STEM_STRIDES, STEM_PADDING = 4, 4, 0
  HEAD_CHANNELS = 128


# ---------------------------------------------------------------------------------------
# Public helpers
# ---------------------------------------------------------------------------------------

_MODEL_CLASSES = {"cnn": SmallCNN, "resnet20": ResNet20, "mobilenetv2": MobileNetV2,
                  "mobilenetv2_tiny": MobileNetV2Tiny}


def build_model(name: str, *, num_classes: int, in_channels: int, weight_bits: Optional[int],
                act_bits: Optional[int], first_last: Union[str, int] = "fp",
                weight_quantizer: str = "fixed",
                per_channel: bool = False, scale_method: str = "mse", image_size: int = 28,
                rngs: nnx.Rngs) -> nnx.Module:
  """Builds one of MODEL_NAMES; NHWC float images in, logits out.

  Args:
    name: "cnn", "resnet20", "mobilenetv2" or "mobilenetv2_tiny".
    num_classes: number of logits.
    in_channels: image channels (1 for (Fashion-)MNIST, 3 for CIFAR).
    weight_bits: bit width of the weights of the hidden layers; None = full precision.
    act_bits: bit width of the inputs of the hidden layers (LSQ); None = full precision.
    first_last: the first and the last layer the forward pass calls are "fp" (full
      precision), "same" (quantized like the other layers) or an int bit width (e.g. 8:
      8-bit weights and inputs, where the body quantizes weights / inputs), set by one
      :func:`trquant.nnx.first_last_rule` whose input grids
      :func:`trquant.nnx.calibrate_activations` decides (``signed_act="auto"``).
    weight_quantizer: "fixed" (frozen weight scales, needed by TR scheduling) or "lsq".
    per_channel: one weight scale per output channel.
    scale_method: initialiser of the weight scales (see :func:`trquant.init_scale`):
      "mse" (default), "std3" (the TR paper's), "lsq", "absmax". Refit them after
      loading FP weights with :func:`trquant.nnx.init_weight_scales`.
    image_size: height (= width) of the input images; sizes the "cnn" head.
    rngs: parameter initialisation.

  Raises:
    ValueError: for an unknown `name` or a bad `first_last`.
  """
  if name not in _MODEL_CLASSES:
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}.")
  first_last = check_first_last(first_last)
  quant = LayerQuant(weight_bits, act_bits, weight_quantizer, per_channel, scale_method)
  extra = {"image_size": image_size} if name == "cnn" else {}
  model = _MODEL_CLASSES[name](num_classes=num_classes, in_channels=in_channels, quant=quant,
                               rngs=rngs, **extra)
  if first_last == "same":
    return model
  # The library's spelling of the policy: the first and last layer the forward pass calls,
  # re-quantized by one rule; the rest stay as built. Their edge bits apply only where the
  # body quantizes (the FP model stays FP), their input grids are decided by calibration.
  edge_bits = None if first_last == "fp" else first_last
  example = jnp.zeros((1, image_size, image_size, in_channels))
  edges = trquant.nnx.first_last_rule(
      model, example, weight_bits=edge_bits if weight_bits is not None else None,
      act_bits=edge_bits if act_bits is not None else None, signed_act="auto",
      per_channel=per_channel, weight_quantizer=weight_quantizer, scale_method=scale_method)
  return trquant.nnx.quantize_model(model, [edges, trquant.nnx.QuantRule(skip=True)])


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's nnx.Param variables (BatchNorm statistics excluded)."""
  return sum(int(leaf.size) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
