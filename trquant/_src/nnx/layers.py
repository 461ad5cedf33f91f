"""Quantized NNX layers: the counterparts of ``nnx.Linear``, ``nnx.Conv``, ``nnx.LinearGeneral``
and ``nnx.Einsum`` with fake-quantized weights and (optionally) LSQ-quantized inputs.

With ``weight_bits=None`` and ``act_bits=None`` each layer computes exactly what its NNX
counterpart computes (same dtype promotion, same ``lax`` call), and it initialises its
kernel and bias from an ``nnx.Rngs`` as the NNX layer does, so a model built from these
layers with a seed has the weights of the NNX model built with that seed.

Every layer has a ``capture_hook`` attribute (None by default): a callable
``hook(layer, inputs, output, kwargs)`` called after each forward pass of the layer with
its input as given (before the layer's own input quantization), its output and the
call's extra arguments that change the result (``{"einsum_str": ...}`` for a
:class:`QuantEinsum` called with an equation). :func:`trquant.nnx.capture_layers` sets and
clears it; it is a static attribute, so a transform of the model (``nnx.jit``) copies
it and calls it with traced values.

Every layer also has an ``input_quant_hook`` attribute (None by default): a callable
``hook(layer, x, x_quantized) -> x_used`` that decides what the layer uses when it
quantizes its input; QDrop's reconstruction (:func:`trquant.adaround.reconstruct_model`)
sets it to mix full-precision and quantized values at random.
"""

from __future__ import annotations

import functools

from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.frozen_dict import FrozenDict
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.typing import Dtype, Initializer, PrecisionLike

from trquant._src import checks
from trquant._src import quantizers

WEIGHT_QUANTIZERS = ("fixed", "lsq")
ACT_QUANTIZERS = ("lsq", "dynamic")
DEPTHWISE_IMPLS = ("auto", "conv", "shift")


class QuantWeight(nnx.Param):
  """A quantized kernel. Metadata: ``bits`` (None = full precision), ``signed``, ``narrow``."""


class PackedWeight(nnx.Variable):
  """A quantized kernel kept as packed integer codes, for inference: its value is a
  :class:`trquant.export.IntegerTensor` (codes packed several per byte, and their step
  sizes), which the forward pass dequantizes. Made by :func:`trquant.export.packed_model`.
  Metadata: ``bits``, ``signed``, ``narrow``."""


class WeightScale(nnx.Variable):
  """Frozen weight step size (not an ``nnx.Param``: optimizers over ``nnx.Param`` skip it)."""


class LearnedWeightScale(nnx.Param):
  """Weight step size learned with LSQ."""


class ActScale(nnx.Param):
  """Activation (input) step size learned with LSQ."""


def _normalize_axes(axes, ndim) -> tuple[int, ...]:
  return tuple(sorted(axis if axis >= 0 else ndim + axis for axis in axes))


def _canonicalize_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class _QuantMixin:
  """Weight and input quantization shared by the quantized layers."""

  def _init_quantization(self, kernel, *, weight_bits, act_bits, per_channel, weight_quantizer,
                         signed_act, scale_method, group_size=None, act_quantizer="lsq"):
    if weight_bits is not None:
      quantizers.quant_range(weight_bits, signed=True)  # validates the bit width
    signed_act = checks.check_signed_act(signed_act)
    if act_bits is not None:
      checks.check_bits(act_bits, "act_bits")
    if weight_quantizer not in WEIGHT_QUANTIZERS:
      raise ValueError(
          f"`weight_quantizer` must be one of {WEIGHT_QUANTIZERS}, got {weight_quantizer!r}."
      )
    self.weight_quantizer = weight_quantizer
    self.per_channel = bool(per_channel)
    self.scale_method = scale_method
    metadata = {}
    if isinstance(kernel, nnx.VariableMetadata):  # e.g. from nnx.with_partitioning
      metadata, kernel = dict(kernel.metadata), kernel.raw_value
    self.group_size = None
    if group_size is not None:
      # Validates the size against the kernel's contraction axis (a clear error if it does
      # not divide it); groups imply one scale per output channel as well.
      quantizers.group_scale_shape(np.shape(kernel), group_size,
                                   group_axis=self._group_axis(np.ndim(kernel)),
                                   channel_axis=None)
      self.group_size = int(group_size)
    self.kernel = QuantWeight(kernel, bits=weight_bits, signed=True, narrow=False, **metadata)
    scale_type = LearnedWeightScale if weight_quantizer == "lsq" else WeightScale
    # nnx.data: a layer re-quantized by a rule may have held None (a static attribute) here.
    self.weight_scale = (nnx.data(scale_type(self.initial_weight_scale(kernel, scale_method)))
                         if weight_bits is not None else None)
    self.act_bits = act_bits
    # True, False, or "auto" until the calibration pass picks the grid from the data.
    self.signed_act = signed_act
    if act_quantizer not in ACT_QUANTIZERS:
      raise ValueError(f"`act_quantizer` must be one of {ACT_QUANTIZERS}, got {act_quantizer!r}.")
    if act_quantizer == "dynamic" and act_bits == 1 and signed_act is not False:
      raise ValueError("`act_quantizer='dynamic'` needs act_bits >= 2 (binary inputs take no"
                       " scale).")
    self.act_quantizer = act_quantizer
    # A dynamic (per-token absmax) input quantizer has no scale to learn.
    self.act_scale = (nnx.data(ActScale(jnp.ones((), jnp.float32)))
                      if act_bits is not None and act_quantizer == "lsq" else None)
    self.calibrating = False
    self.capture_hook = None
    self.input_quant_hook = None

  @property
  def weight_bits(self) -> Optional[int]:
    return self.kernel.bits

  @property
  def channel_axes(self) -> tuple[int, ...]:
    """The kernel axes that keep one weight scale each when ``per_channel`` (output channels)."""
    return (np.ndim(self.kernel.get_value()) - 1,)

  def _group_axis(self, ndim: int) -> int:
    """The kernel axis that ``group_size`` splits: the last contraction (non-channel) axis
    (the input features of a Linear or Conv kernel, the last summed axis of an Einsum)."""
    channels = set(self._channel_axes_of(ndim))
    contraction = [axis for axis in range(ndim) if axis not in channels]
    if not contraction:
      raise ValueError("`group_size` needs a kernel axis that is summed over (an input axis);"
                       " this layer's kernel has none.")
    return contraction[-1]

  def _channel_axes_of(self, ndim: int) -> tuple[int, ...]:
    return (ndim - 1,)

  @property
  def weight_group(self) -> dict:
    """The keyword arguments of the quantizers for this layer's weight scales:
    ``{"group_size": ..., "group_axis": ...}`` with per-group scales, else ``{}``."""
    if getattr(self, "group_size", None) is None:
      return {}
    return {"group_size": self.group_size,
            "group_axis": self._group_axis(np.ndim(self.kernel.get_value()))}

  def broadcast_weight_scale(self, scale=None):
    """The weight scale (or `scale`) as an array that broadcasts to the kernel: per-group
    scales repeated over their groups, other scales as they are."""
    scale = self.weight_scale.get_value() if scale is None else scale
    group = self.weight_group
    if not group:
      return scale
    return quantizers.expand_group_scale(scale, group["group_size"],
                                         group_axis=group["group_axis"])

  def initial_weight_scale(self, kernel, method):
    """The weight scale that ``method`` gives for ``kernel`` on this layer's grid."""
    if self.weight_quantizer == "lsq" and method == "mse":
      method = "lsq"  # LSQ's own initialisation when the scale is learned
    group = self.weight_group
    if group:
      return quantizers.init_scale(kernel, bits=self.kernel.bits, method=method,
                                   axis=self.channel_axes, **group)
    return quantizers.init_scale(kernel, bits=self.kernel.bits, method=method,
                                 axis=self.channel_axes if self.per_channel else None)

  def quantized_kernel(self):
    """The fake-quantized kernel used in the forward pass."""
    if isinstance(self.kernel, PackedWeight):  # the same values, from the stored codes
      return self.kernel.get_value().dequantize()
    kernel = self.kernel.get_value()
    bits = self.kernel.bits
    if bits is None:
      return kernel
    scale = self.weight_scale.get_value()
    if self.weight_quantizer == "lsq":
      return quantizers.lsq(kernel, scale, bits=bits, **self.weight_group)
    return quantizers.fake_quant(kernel, jax.lax.stop_gradient(scale), bits=bits,
                                 **self.weight_group)

  def weight_codes(self, kernel=None):
    """Integer codes of the kernel (or of `kernel`, e.g. a params leaf)."""
    if self.kernel.bits is None:
      raise ValueError("this layer's weights are not quantized (weight_bits=None).")
    kernel = self.kernel.get_value() if kernel is None else kernel
    return quantizers.quantize(kernel, self.weight_scale.get_value(), bits=self.kernel.bits,
                               **self.weight_group)

  def quantize_input(self, x):
    if self.act_bits is None:
      return x
    signed = self._input_signed(x)
    if getattr(self, "act_quantizer", "lsq") == "dynamic":
      quantized = quantizers.fake_quant_dynamic(x, bits=self.act_bits, signed=signed)
      hook = getattr(self, "input_quant_hook", None)
      return quantized if hook is None else hook(self, x, quantized)
    if self.calibrating:
      self.act_scale.set_value(quantizers.init_scale(
          x, bits=self.act_bits, method="lsq", signed=signed))
    _, hi = quantizers.quant_range(self.act_bits, signed=signed)
    features = int(np.prod(x.shape[1:])) if x.ndim > 1 else int(x.shape[0])
    quantized = quantizers.lsq(x, self.act_scale.get_value(), bits=self.act_bits,
                               signed=signed, grad_scale=1.0 / np.sqrt(features * hi))
    hook = getattr(self, "input_quant_hook", None)
    return quantized if hook is None else hook(self, x, quantized)

  def _input_signed(self, x) -> bool:
    """The input grid's signedness; ``signed_act="auto"`` is decided here, on the first
    input of the calibration pass: signed if it has a negative value."""
    if self.signed_act != "auto":
      return self.signed_act
    if not self.calibrating:
      raise ValueError(
          "this layer quantizes its inputs with signed_act=\"auto\", which the calibration"
          " pass decides: run trquant.nnx.calibrate_activations(model, batch) once before"
          " using the model, or build the layer with signed_act=True / False.")
    if isinstance(x, jax.core.Tracer):
      raise ValueError(
          "signed_act=\"auto\" is decided from concrete inputs, but this layer ran inside a"
          " transform (e.g. an nnx.jit-decorated __call__) during calibration: call the model"
          " eagerly in trquant.nnx.calibrate_activations, or set signed_act=True / False.")
    self.signed_act = bool(jnp.min(x) < 0)
    return self.signed_act

  def _bias(self):
    return self.bias.get_value() if self.bias is not None else None

  def _report(self, inputs, output, kwargs=None):
    """Hands the call to ``capture_hook`` (if set) and returns ``output``."""
    hook = getattr(self, "capture_hook", None)
    if hook is not None:
      hook(self, inputs, output, dict(kwargs or {}))
    return output


def _dot_kwargs(out_sharding, preferred_element_type) -> dict:
  kwargs = {"out_sharding": out_sharding}
  if preferred_element_type is not None:
    kwargs["preferred_element_type"] = preferred_element_type
  return kwargs


class QuantLinear(_QuantMixin, nnx.Module):
  """``nnx.Linear`` with quantized weights and (optionally) quantized inputs.

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, precision,
      preferred_element_type, kernel_init, bias_init, rngs: as ``nnx.Linear``.
    weight_bits: weight bit width (1 = binary ``scale * sign(w)``); None (the
      default, as in :class:`trquant.nnx.QuantRule`) keeps full-precision weights: an
      FP model of the same structure, which the AdaRound drivers quantize.
    act_bits: input bit width, LSQ-quantized; None keeps full-precision inputs.
    per_channel: one weight scale per output channel (last kernel axis).
    group_size: per-group (sub-channel) weight scales: one per group of ``group_size``
      consecutive input features of each output channel (the LM convention: 32-128);
      it must divide the input axis. None: per-channel or per-tensor.
    act_quantizer: ``"lsq"`` (a learned per-tensor input scale, calibrated by
      :func:`trquant.nnx.calibrate_activations`) or ``"dynamic"`` (per-token absmax,
      :func:`trquant.fake_quant_dynamic`: the W8A8 / 8da4w recipes; nothing to learn).
    weight_quantizer: ``"fixed"`` (frozen scale initialised from the weights, as
      TR scheduling requires) or ``"lsq"`` (learned scale).
    signed_act: signed input grid (e.g. for inputs that are not post-ReLU, or
      binary ``sign`` activations with ``act_bits=1``). Default False, everywhere in
      trquant; :func:`trquant.nnx.calibrate_activations` raises if an unsigned grid
      sees negative inputs. ``"auto"``: the calibration pass decides (signed if the
      layer's first calibration input has a negative value); until then the layer
      raises when it quantizes an input.
    scale_method: weight scale initialiser, see :func:`trquant.init_scale`.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
               per_channel: bool = False, group_size: Optional[int] = None,
               weight_quantizer: str = "fixed", act_quantizer: str = "lsq",
               signed_act: Union[bool, str] = False, scale_method: str = "mse",
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, preferred_element_type: Optional[Dtype] = None,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(), rngs: nnx.Rngs) -> None:
    self.in_features, self.out_features = in_features, out_features
    self.dtype, self.param_dtype = dtype, param_dtype
    self.precision, self.preferred_element_type = precision, preferred_element_type
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self._init_quantization(kernel, weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=per_channel, weight_quantizer=weight_quantizer,
                            signed_act=signed_act, scale_method=scale_method,
                            group_size=group_size, act_quantizer=act_quantizer)
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, inputs, out_sharding=None):
    x = self.quantize_input(inputs)
    x, kernel, bias = nnx_dtypes.promote_dtype((x, self.quantized_kernel(), self._bias()),
                                               dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision,
                            **_dot_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return self._report(inputs, y)


class QuantConv(_QuantMixin, nnx.Module):
  """``nnx.Conv`` (2-D, NHWC) with quantized weights and (optionally) quantized inputs.

  Args:
    in_features, out_features, kernel_size, strides, padding,
      feature_group_count, use_bias, dtype, param_dtype, precision,
      preferred_element_type, kernel_init, bias_init, rngs: as ``nnx.Conv``
      (``feature_group_count = in_features`` for depth-wise; ``padding``: ``"SAME"``,
      ``"VALID"``, an int or ``(low, high)`` pairs; no dilation, mask, circular or
      reflect padding).
      Inputs are ``(..., H, W, C)``: several batch axes are flattened and
      restored, an input without batch axis gets one, as ``nnx.Conv`` does.
    weight_bits, act_bits, per_channel, weight_quantizer, signed_act,
      scale_method: as :class:`QuantLinear`.
    depthwise_impl: how a depth-wise conv (``feature_group_count == in_features
      == out_features``) is computed: ``"conv"`` (``lax.conv_general_dilated``),
      ``"shift"`` (a sum of ``kh * kw`` shifted, per-channel-scaled copies of the
      input: the same result up to float summation order) or ``"auto"``
      (default: ``"shift"`` on CPU, where XLA's grouped convolution is slow:
      a MobileNetV2 training step ran 2.8x faster with ``"shift"`` in
      ``benchmarks/depthwise.py``; ``"conv"`` on GPU/TPU).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: Union[int, Sequence[int]],
               *, strides: Union[int, Sequence[int]] = 1, padding: Any = "SAME",
               feature_group_count: int = 1, use_bias: bool = True,
               weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
               per_channel: bool = False, group_size: Optional[int] = None,
               weight_quantizer: str = "fixed", act_quantizer: str = "lsq",
               signed_act: Union[bool, str] = False, scale_method: str = "mse",
               depthwise_impl: str = "auto", dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
               preferred_element_type: Optional[Dtype] = None,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(), rngs: nnx.Rngs) -> None:
    if depthwise_impl not in DEPTHWISE_IMPLS:
      raise ValueError(
          f"`depthwise_impl` must be one of {DEPTHWISE_IMPLS}, got {depthwise_impl!r}.")
    if isinstance(kernel_size, int):
      kernel_size = (kernel_size, kernel_size)
    if strides is None:
      strides = 1
    if isinstance(strides, int):
      strides = (strides,) * len(kernel_size)
    if len(kernel_size) != 2 or len(strides) != 2:
      raise ValueError(f"QuantConv is a 2-D convolution (NHWC); got kernel_size"
                       f" {tuple(kernel_size)} and strides {tuple(strides)}.")
    if in_features % feature_group_count or out_features % feature_group_count:
      raise ValueError(
          f"in_features ({in_features}) and out_features ({out_features}) must be divisible by"
          f" feature_group_count ({feature_group_count})."
      )
    self.in_features, self.out_features = in_features, out_features
    self.kernel_size, self.strides = tuple(kernel_size), tuple(strides)
    self.padding, self.feature_group_count, self.dtype = padding, feature_group_count, dtype
    self.param_dtype = param_dtype
    self.precision, self.preferred_element_type = precision, preferred_element_type
    self.depthwise_impl = depthwise_impl
    # Compute the convolution as patches @ kernel (same result up to float summation
    # order): on XLA:CPU a convolution's kernel gradient inside lax.scan runs ~30x slower
    # than outside one, a matmul's does not. AdaRound's reconstruction loops set it.
    self.patches_conv = False
    shape = (*self.kernel_size, in_features // feature_group_count, out_features)
    kernel = kernel_init(rngs.params(), shape, param_dtype)
    self._init_quantization(kernel, weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=per_channel, weight_quantizer=weight_quantizer,
                            signed_act=signed_act, scale_method=scale_method,
                            group_size=group_size, act_quantizer=act_quantizer)
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, inputs, out_sharding=None):
    x = inputs
    batch_axes = x.ndim - 3
    if batch_axes != 1:  # as nnx.Conv: flatten several batch axes, add a missing one
      batch_shape = x.shape[:batch_axes]
      x = jnp.reshape(x, (-1,) + x.shape[batch_axes:])
    x = self.quantize_input(x)
    x, kernel, bias = nnx_dtypes.promote_dtype((x, self.quantized_kernel(), self._bias()),
                                               dtype=self.dtype)
    padding = self.explicit_padding()
    plain = out_sharding is None and self.preferred_element_type is None
    if self._use_shift_depthwise() and plain:
      y = _shifted_depthwise_conv(x, kernel, self.strides, padding)
    elif getattr(self, "patches_conv", False) and plain:
      y = _patches_conv(x, kernel, self.strides, padding, self.feature_group_count)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=self.strides, padding=padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.feature_group_count, precision=self.precision,
          **_dot_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      y += bias.reshape((1,) * (y.ndim - 1) + bias.shape)
    if batch_axes != 1:
      y = jnp.reshape(y, batch_shape + y.shape[1:])
    return self._report(inputs, y)

  def explicit_padding(self):
    """``padding`` as ``lax.conv_general_dilated`` takes it (an int becomes ``(p, p)`` pairs)."""
    if isinstance(self.padding, int):
      return [(self.padding, self.padding)] * len(self.kernel_size)
    return self.padding

  def _use_shift_depthwise(self) -> bool:
    depthwise = (self.feature_group_count == self.in_features == self.out_features
                 and self.feature_group_count > 1 and len(self.kernel_size) == 2)
    if not depthwise or self.depthwise_impl == "conv":
      return False
    return self.depthwise_impl == "shift" or jax.default_backend() == "cpu"


def _patches_conv(x, kernel, strides, padding, groups):
  """NHWC convolution as ``conv_general_dilated_patches(x) @ kernel`` (im2col).

  Patch channels come input-channel-major, ``(C, kh, kw)``, so the HWIO kernel is
  moved to ``(I, kh, kw, O)`` before flattening.
  """
  patches = jax.lax.conv_general_dilated_patches(
      x, kernel.shape[:2], strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  *spatial, group_in, out = kernel.shape
  flat = jnp.moveaxis(kernel, -2, 0).reshape(group_in * int(np.prod(spatial)), groups,
                                            out // groups)
  patches = patches.reshape(*patches.shape[:-1], groups, -1)
  return jnp.einsum("...gk,kgo->...go", patches, flat).reshape(*patches.shape[:-2], out)


def _shifted_depthwise_conv(x, kernel, strides, padding):
  """Depth-wise NHWC convolution as a sum of shifted, per-channel-scaled input windows.

  ``kernel`` has shape ``(kh, kw, 1, C)``; ``padding`` is a padding string or
  ``(low, high)`` pairs, as for ``lax.conv_general_dilated``.
  """
  kh, kw = kernel.shape[:2]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  padding = tuple((int(low), int(high)) for low, high in padding)
  strides = tuple(int(s) for s in strides)
  out_h = (x.shape[1] + sum(padding[0]) - kh) // strides[0] + 1
  out_w = (x.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
  if x.shape[0] * out_h * out_w * x.shape[3] < _CHUNKED_KERNEL_GRAD_MIN_SIZE:
    return _depthwise_forward(x, kernel, strides, padding)  # small: autodiff is as fast
  return _depthwise_sum(x, kernel, strides, padding)


def _windows(x, kh, kw, strides, padding):
  """The ``kh * kw`` strided input windows of a padded depth-wise convolution, tap by tap."""
  (top, bottom), (left, right) = padding
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  batch, height, width, channels = x.shape
  out_h = (height - kh) // strides[0] + 1
  out_w = (width - kw) // strides[1] + 1
  for i in range(kh):
    for j in range(kw):
      yield i, j, jax.lax.slice(
          x, (0, i, j, 0),
          (batch, i + strides[0] * (out_h - 1) + 1, j + strides[1] * (out_w - 1) + 1, channels),
          (1, strides[0], strides[1], 1))


def _depthwise_forward(x, kernel, strides, padding):
  y = None
  for i, j, window in _windows(x, *kernel.shape[:2], strides, padding):
    term = window * kernel[i, j, 0]
    y = term if y is None else y + term
  return y


# Examples per step of the kernel gradient's scan: small enough that a chunk's products
# stay in cache, large enough to amortise the loop. Below about 2^19 output elements
# autodiff's plain reduction is as fast (both measured on a 2-core CPU: 128x14x14x64,
# stride 1, fwd+bwd 39 -> 14 ms; 64x7x7x64 1.5 vs 1.7 ms).
_KERNEL_GRAD_CHUNK = 16
_CHUNKED_KERNEL_GRAD_MIN_SIZE = 2 ** 19


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_sum(x, kernel, strides, padding):
  return _depthwise_forward(x, kernel, strides, padding)


def _depthwise_sum_fwd(x, kernel, strides, padding):
  return _depthwise_forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_sum_bwd(strides, padding, residuals, g):
  # Autodiff's kernel gradient reduces one product of the input's size per tap over
  # (N, H, W); XLA:CPU writes each product out before reducing it, which made the
  # backward pass 20-30x the forward. Here the input gradient is autodiff's (cheap:
  # pads and adds), and the kernel gradient accumulates over small batch chunks in a
  # scan, so the products stay in cache.
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _depthwise_forward(x, kernel, strides, padding), x)
  (grad_x,) = input_vjp(g)
  kh, kw = kernel.shape[:2]
  chunk = min(_KERNEL_GRAD_CHUNK, x.shape[0])
  extra = -x.shape[0] % chunk  # zero examples add nothing to the gradient
  if extra:
    x = jnp.concatenate([x, jnp.zeros((extra, *x.shape[1:]), x.dtype)])
    g = jnp.concatenate([g, jnp.zeros((extra, *g.shape[1:]), g.dtype)])
  acc_dtype = jnp.promote_types(kernel.dtype, jnp.float32)

  def accumulate(total, chunk_inputs):
    x_chunk, g_chunk = chunk_inputs
    taps = [jnp.sum(window.astype(acc_dtype) * g_chunk.astype(acc_dtype), axis=(0, 1, 2))
            for _, _, window in _windows(x_chunk, kh, kw, strides, padding)]
    return total + jnp.stack(taps).reshape(kh, kw, 1, -1), None

  grad_kernel, _ = jax.lax.scan(
      accumulate, jnp.zeros(kernel.shape, acc_dtype),
      (x.reshape(-1, chunk, *x.shape[1:]), g.reshape(-1, chunk, *g.shape[1:])))
  return grad_x, grad_kernel.astype(kernel.dtype)


_depthwise_sum.defvjp(_depthwise_sum_fwd, _depthwise_sum_bwd)


class QuantLinearGeneral(_QuantMixin, nnx.Module):
  """``nnx.LinearGeneral`` with quantized weights and (optionally) quantized inputs.

  The projections of ``nnx.MultiHeadAttention`` are ``nnx.LinearGeneral`` layers
  (query/key/value: ``features -> (heads, head_dim)``; out: ``(heads, head_dim) ->
  features``), so :func:`trquant.nnx.quantize_model` turns them into this layer.

  Args:
    in_features, out_features, axis, batch_axis, use_bias, dtype, param_dtype,
      precision, preferred_element_type, kernel_init, bias_init, rngs: as
      ``nnx.LinearGeneral`` (the kernel is ``(*batch, *in_features,
      *out_features)``, initialised as a flat matrix and reshaped, as there).
    weight_bits, act_bits, weight_quantizer, signed_act, scale_method: as
      :class:`QuantLinear`; the input scale is one per-tensor scale.
    per_channel: one weight scale per output feature (and per kernel batch
      index): keep-dims over the kernel's batch and output axes.
  """

  def __init__(self, in_features: Union[int, Sequence[int]],
               out_features: Union[int, Sequence[int]], *,
               axis: Union[int, Sequence[int]] = -1,
               batch_axis: Mapping[int, int] = FrozenDict({}), use_bias: bool = True,
               weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
               per_channel: bool = False, group_size: Optional[int] = None,
               weight_quantizer: str = "fixed", act_quantizer: str = "lsq",
               signed_act: Union[bool, str] = False, scale_method: str = "mse",
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, preferred_element_type: Optional[Dtype] = None,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(), rngs: nnx.Rngs) -> None:
    self.in_features = _canonicalize_tuple(in_features)
    self.out_features = _canonicalize_tuple(out_features)
    self.axis = _canonicalize_tuple(axis)
    self.batch_axis: FrozenDict = FrozenDict(batch_axis)
    self.dtype, self.param_dtype = dtype, param_dtype
    self.precision, self.preferred_element_type = precision, preferred_element_type
    if len(self.in_features) != len(self.axis):
      raise ValueError(f"in_features and axis must have the same length; got {self.in_features}"
                       f" and {self.axis}.")
    if self.batch_axis and set(self.batch_axis) != set(range(max(self.batch_axis) + 1)):
      raise ValueError(f"batch_axis {tuple(self.batch_axis)} must be consecutive leading axes"
                       " starting from 0.")
    batch_shape = tuple(self.batch_axis.values())
    shape = (*batch_shape, *self.in_features, *self.out_features)
    n_batch, n_in = len(batch_shape), len(self.in_features)
    flat = (int(np.prod(shape[:n_batch + n_in])), int(np.prod(self.out_features)))
    kernel = kernel_init(rngs.params(), flat, param_dtype)  # as nnx.LinearGeneral
    if isinstance(kernel, nnx.VariableMetadata):
      kernel.raw_value = jnp.reshape(kernel.raw_value, shape)
    else:
      kernel = jnp.reshape(kernel, shape)
    self._init_quantization(kernel, weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=per_channel, weight_quantizer=weight_quantizer,
                            signed_act=signed_act, scale_method=scale_method,
                            group_size=group_size, act_quantizer=act_quantizer)
    bias = None
    if use_bias:
      bias_shape = (*batch_shape, *self.out_features)
      bias = bias_init(rngs.params(), (int(np.prod(bias_shape)),), param_dtype)
      if isinstance(bias, nnx.VariableMetadata):
        bias.raw_value = jnp.reshape(bias.raw_value, bias_shape)
      else:
        bias = jnp.reshape(bias, bias_shape)
      bias = nnx.Param(bias)
    self.bias = bias

  @property
  def channel_axes(self) -> tuple[int, ...]:
    n_batch, n_in = len(self.batch_axis), len(self.in_features)
    ndim = n_batch + n_in + len(self.out_features)
    return tuple(range(n_batch)) + tuple(range(n_batch + n_in, ndim))

  def _channel_axes_of(self, ndim: int) -> tuple[int, ...]:
    return self.channel_axes

  def __call__(self, inputs, out_sharding=None):
    x = self.quantize_input(inputs)
    ndim = x.ndim
    n_batch = len(self.batch_axis)
    axis = _normalize_axes(self.axis, ndim)
    batch_axis = _normalize_axes(tuple(self.batch_axis.keys()), ndim)
    expanded_batch_shape = tuple(x.shape[ax] if ax in batch_axis else 1
                                 for ax in range(ndim) if ax not in axis)
    x, kernel, bias = nnx_dtypes.promote_dtype((x, self.quantized_kernel(), self._bias()),
                                               dtype=self.dtype)
    batch_ind = tuple(range(n_batch))
    contract_ind = tuple(range(n_batch, len(axis) + n_batch))
    y = jax.lax.dot_general(x, kernel, ((axis, contract_ind), (batch_axis, batch_ind)),
                            precision=self.precision,
                            **_dot_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      y += jnp.reshape(bias, (*expanded_batch_shape, *self.out_features))
    return self._report(inputs, y)


def _einsum_check(einsum_str: str) -> None:
  if "->" not in einsum_str:
    raise ValueError('`einsum_str` equation must be explicit and include "->".')
  if einsum_str.count(",") != 1:
    raise ValueError("`einsum_str` equation must have exactly two operands (input, kernel),"
                     f" so exactly one comma; got {einsum_str!r}.")


class QuantEinsum(_QuantMixin, nnx.Module):
  """``nnx.Einsum`` with quantized weights and (optionally) quantized inputs.

  Args:
    einsum_str, kernel_shape, bias_shape, dtype, param_dtype, precision,
      preferred_element_type, kernel_init, bias_init, rngs: as ``nnx.Einsum``
      (``jnp.einsum`` computes it; an equation given to ``__call__`` overrides
      the constructor's).
    weight_bits, act_bits, weight_quantizer, signed_act, scale_method: as
      :class:`QuantLinear`; the input scale is one per-tensor scale.
    per_channel: one weight scale per output feature: keep-dims over the kernel
      axes whose letters appear in the output of the constructor's equation.
  """

  def __init__(self, einsum_str: str, kernel_shape: Sequence[int],
               bias_shape: Optional[Sequence[int]] = None, *,
               weight_bits: Optional[int] = None, act_bits: Optional[int] = None,
               per_channel: bool = False, group_size: Optional[int] = None,
               weight_quantizer: str = "fixed", act_quantizer: str = "lsq",
               signed_act: Union[bool, str] = False, scale_method: str = "mse",
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               precision: PrecisionLike = None, preferred_element_type: Optional[Dtype] = None,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = nnx.initializers.zeros_init(), rngs: nnx.Rngs) -> None:
    einsum_str = einsum_str.replace(" ", "")
    _einsum_check(einsum_str)
    self.einsum_str = einsum_str
    self.kernel_shape = tuple(kernel_shape)
    self.bias_shape = None if bias_shape is None else tuple(bias_shape)
    self.dtype, self.param_dtype = dtype, param_dtype
    self.precision, self.preferred_element_type = precision, preferred_element_type
    kernel = kernel_init(rngs.params(), self.kernel_shape, param_dtype)
    self._init_quantization(kernel, weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=per_channel, weight_quantizer=weight_quantizer,
                            signed_act=signed_act, scale_method=scale_method,
                            group_size=group_size, act_quantizer=act_quantizer)
    # self.bias_shape is tuple(bias_shape): not None where it is used.
    self.bias = (
        nnx.Param(bias_init(rngs.params(), self.bias_shape, param_dtype))  # type: ignore[arg-type]
        if bias_shape is not None else None)

  @property
  def channel_axes(self) -> tuple[int, ...]:
    inputs, output = self.einsum_str.split("->")
    kernel_letters = inputs.split(",")[1]
    return tuple(i for i, letter in enumerate(kernel_letters) if letter in output)

  def _channel_axes_of(self, ndim: int) -> tuple[int, ...]:
    return self.channel_axes

  def __call__(self, inputs, einsum_str: Optional[str] = None, out_sharding=None):
    given = einsum_str
    einsum_str = (einsum_str if einsum_str is not None else self.einsum_str).replace(" ", "")
    _einsum_check(einsum_str)
    x = self.quantize_input(inputs)
    x, kernel, bias = nnx_dtypes.promote_dtype((x, self.quantized_kernel(), self._bias()),
                                               dtype=self.dtype)
    y = jnp.einsum(einsum_str, x, kernel, precision=self.precision,
                   **_dot_kwargs(out_sharding, self.preferred_element_type))
    if bias is not None:
      y += jnp.reshape(bias, _broadcast_bias_shape(einsum_str, x.ndim, self.kernel_shape))
    return self._report(inputs, y, {} if given is None else {"einsum_str": given})


def _broadcast_bias_shape(einsum_str: str, input_ndim: int, kernel_shape) -> list[int]:
  """The bias shape that broadcasts against the output: kernel sizes on the output axes
  that come from the kernel, 1 elsewhere (as ``nnx.Einsum`` reshapes its bias)."""
  operands, output = einsum_str.split("->")
  lhs, rhs = operands.split(",")
  ellipsis = input_ndim - (len(lhs) - 3) if "..." in lhs else 0
  shape = []
  for part_index, part in enumerate(output.split("...")):
    if part_index:
      shape += [1] * ellipsis
    shape += [kernel_shape[rhs.index(letter)] if letter in rhs else 1 for letter in part]
  return shape


QUANT_LAYERS = (QuantLinear, QuantConv, QuantLinearGeneral, QuantEinsum)
