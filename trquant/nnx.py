"""Flax NNX quantized layers and the glue between NNX models and trquant's transforms.

* :class:`QuantLinear` and :class:`QuantConv`: ``nnx.Linear`` / ``nnx.Conv`` with
  fake-quantized weights (frozen or LSQ scales, per-tensor or per-channel, binary)
  and optionally LSQ-quantized inputs.
* Variables: the kernel is a :class:`QuantWeight` (an ``nnx.Param`` carrying ``bits``
  metadata); weight scales are :class:`WeightScale` (frozen, not an ``nnx.Param``, so
  ``nnx.Optimizer(..., wrt=nnx.Param)`` never moves it) or :class:`LearnedWeightScale`
  (an ``nnx.Param``); activation scales are :class:`ActScale` (an ``nnx.Param``).
* :func:`codes_fn` and :func:`param_labels` turn a model into the ``codes_fn`` of
  :func:`trquant.tr_schedule` and the label tree of ``optax.partition`` (or
  :func:`partition`, which also takes labels held in ``nnx.Variable`` objects);
  :func:`scales_fn` gives the ``scale_fn`` of :func:`trquant.freeze_oscillations`
  and :func:`dampening_loss` the model's oscillation-dampening loss.
* :func:`calibrate_activations`, :func:`init_weight_scales` and
  :func:`reestimate_batchnorm` set scales and BatchNorm statistics from data.

Example:
  >>> import jax, jax.numpy as jnp, optax, trquant
  >>> from flax import nnx
  >>> model = nnx.Sequential(
  ...     trquant.nnx.QuantLinear(64, 32, weight_bits=2, rngs=nnx.Rngs(0)), nnx.relu,
  ...     trquant.nnx.QuantLinear(32, 10, weight_bits=2, act_bits=4, rngs=nnx.Rngs(1)))
  >>> tx = optax.partition({
  ...     "quant": optax.chain(optax.adam(1e-3),
  ...                          trquant.tr_schedule(3e-3, codes_fn=trquant.nnx.codes_fn(model))),
  ...     "float": optax.adam(1e-3)}, trquant.nnx.param_labels(model))
  >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  >>> grads = nnx.grad(lambda m: m(jnp.ones((8, 64))).sum())(model)
  >>> _ = optimizer.update(model, grads)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trquant import oscillations
from trquant import quantizers

__all__ = [
    "ActScale",
    "LearnedWeightScale",
    "QuantConv",
    "QuantLinear",
    "QuantWeight",
    "WeightScale",
    "calibrate_activations",
    "codes_fn",
    "dampening_loss",
    "init_weight_scales",
    "load_float_weights",
    "oscillation_stats",
    "param_labels",
    "partition",
    "reestimate_batchnorm",
    "scales_fn",
    "transition_stats",
    "values",
]

WEIGHT_QUANTIZERS = ("fixed", "lsq")
DEPTHWISE_IMPLS = ("auto", "conv", "shift")


class QuantWeight(nnx.Param):
  """A quantized kernel. Metadata: ``bits`` (None = full precision), ``signed``, ``narrow``."""


class WeightScale(nnx.Variable):
  """Frozen weight step size (not an ``nnx.Param``: optimizers over ``nnx.Param`` skip it)."""


class LearnedWeightScale(nnx.Param):
  """Weight step size learned with LSQ."""


class ActScale(nnx.Param):
  """Activation (input) step size learned with LSQ."""


class _QuantMixin:
  """Weight and input quantization shared by QuantLinear and QuantConv."""

  def _init_quantization(self, kernel, *, weight_bits, act_bits, per_channel, weight_quantizer,
                         signed_act, scale_method):
    if weight_bits is not None:
      quantizers.quant_range(weight_bits, signed=True)  # validates the bit width
    if act_bits is not None:
      quantizers.quant_range(act_bits, signed=signed_act)
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
    self.kernel = QuantWeight(kernel, bits=weight_bits, signed=True, narrow=False, **metadata)
    scale_type = LearnedWeightScale if weight_quantizer == "lsq" else WeightScale
    self.weight_scale = (scale_type(self._initial_weight_scale(kernel, scale_method))
                         if weight_bits is not None else None)
    self.act_bits = act_bits
    self.signed_act = bool(signed_act)
    self.act_scale = ActScale(jnp.ones((), jnp.float32)) if act_bits is not None else None
    self.calibrating = False

  @property
  def weight_bits(self) -> Optional[int]:
    return self.kernel.bits

  def _initial_weight_scale(self, kernel, method):
    if self.weight_quantizer == "lsq" and method == "mse":
      method = "lsq"  # LSQ's own initialisation when the scale is learned
    return quantizers.init_scale(kernel, bits=self.kernel.bits, method=method,
                                 axis=-1 if self.per_channel else None)

  def quantized_kernel(self):
    """The fake-quantized kernel used in the forward pass."""
    kernel = self.kernel.get_value()
    bits = self.kernel.bits
    if bits is None:
      return kernel
    scale = self.weight_scale.get_value()
    if self.weight_quantizer == "lsq":
      return quantizers.lsq(kernel, scale, bits=bits)
    return quantizers.fake_quant(kernel, jax.lax.stop_gradient(scale), bits=bits)

  def weight_codes(self, kernel=None):
    """Integer codes of the kernel (or of `kernel`, e.g. a params leaf)."""
    if self.kernel.bits is None:
      raise ValueError("this layer's weights are not quantized (weight_bits=None).")
    kernel = self.kernel.get_value() if kernel is None else kernel
    return quantizers.quantize(kernel, self.weight_scale.get_value(), bits=self.kernel.bits)

  def quantize_input(self, x):
    if self.act_bits is None:
      return x
    if self.calibrating:
      self.act_scale.set_value(quantizers.init_scale(
          x, bits=self.act_bits, method="lsq", signed=self.signed_act))
    _, hi = quantizers.quant_range(self.act_bits, signed=self.signed_act)
    features = int(np.prod(x.shape[1:])) if x.ndim > 1 else int(x.shape[0])
    return quantizers.lsq(x, self.act_scale.get_value(), bits=self.act_bits, signed=self.signed_act,
                          grad_scale=1.0 / np.sqrt(features * hi))


class QuantLinear(_QuantMixin, nnx.Module):
  """``nnx.Linear`` with quantized weights and (optionally) quantized inputs.

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, kernel_init,
      bias_init, rngs: as ``nnx.Linear``.
    weight_bits: weight bit width (1 = binary ``scale * sign(w)``); None keeps
      full-precision weights (an FP model of the same structure).
    act_bits: input bit width, LSQ-quantized; None keeps full-precision inputs.
    per_channel: one weight scale per output channel (last kernel axis).
    weight_quantizer: ``"fixed"`` (frozen scale initialised from the weights, as
      TR scheduling requires) or ``"lsq"`` (learned scale).
    signed_act: signed input grid (e.g. for inputs that are not post-ReLU, or
      binary ``sign`` activations with ``act_bits=1``).
    scale_method: weight scale initialiser, see :func:`trquant.init_scale`.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               weight_bits: Optional[int] = 4, act_bits: Optional[int] = None,
               per_channel: bool = False, weight_quantizer: str = "fixed",
               signed_act: bool = False, scale_method: str = "mse", dtype=None,
               param_dtype=jnp.float32, kernel_init=nnx.initializers.lecun_normal(),
               bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    self._init_quantization(kernel, weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=per_channel, weight_quantizer=weight_quantizer,
                            signed_act=signed_act, scale_method=scale_method)
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

  def __call__(self, x):
    x = self.quantize_input(x)
    kernel = self.quantized_kernel()
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    return y


class QuantConv(_QuantMixin, nnx.Module):
  """``nnx.Conv`` (NHWC) with quantized weights and (optionally) quantized inputs.

  Args:
    in_features, out_features, kernel_size, strides, padding,
      feature_group_count (``= in_features`` for depth-wise), use_bias, dtype,
      param_dtype, kernel_init, bias_init, rngs: as ``nnx.Conv``.
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
               weight_bits: Optional[int] = 4, act_bits: Optional[int] = None,
               per_channel: bool = False, weight_quantizer: str = "fixed",
               signed_act: bool = False, scale_method: str = "mse",
               depthwise_impl: str = "auto", dtype=None,
               param_dtype=jnp.float32, kernel_init=nnx.initializers.lecun_normal(),
               bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    if depthwise_impl not in DEPTHWISE_IMPLS:
      raise ValueError(
          f"`depthwise_impl` must be one of {DEPTHWISE_IMPLS}, got {depthwise_impl!r}.")
    if isinstance(kernel_size, int):
      kernel_size = (kernel_size, kernel_size)
    if isinstance(strides, int):
      strides = (strides,) * len(kernel_size)
    if in_features % feature_group_count or out_features % feature_group_count:
      raise ValueError(
          f"in_features ({in_features}) and out_features ({out_features}) must be divisible by"
          f" feature_group_count ({feature_group_count})."
      )
    self.in_features, self.out_features = in_features, out_features
    self.kernel_size, self.strides = tuple(kernel_size), tuple(strides)
    self.padding, self.feature_group_count, self.dtype = padding, feature_group_count, dtype
    self.depthwise_impl = depthwise_impl
    shape = (*self.kernel_size, in_features // feature_group_count, out_features)
    kernel = kernel_init(rngs.params(), shape, param_dtype)
    self._init_quantization(kernel, weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=per_channel, weight_quantizer=weight_quantizer,
                            signed_act=signed_act, scale_method=scale_method)
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

  def __call__(self, x):
    x = self.quantize_input(x)
    kernel = self.quantized_kernel()
    dtype = self.dtype or jnp.result_type(x, kernel)
    padding = self._explicit_padding()
    if self._use_shift_depthwise():
      y = _shifted_depthwise_conv(x.astype(dtype), kernel.astype(dtype), self.strides, padding)
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(dtype), kernel.astype(dtype), window_strides=self.strides, padding=padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.feature_group_count)
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dtype)
    return y

  def _explicit_padding(self):
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


def _shifted_depthwise_conv(x, kernel, strides, padding):
  """Depth-wise NHWC convolution as a sum of shifted, per-channel-scaled input windows.

  ``kernel`` has shape ``(kh, kw, 1, C)``; ``padding`` is a padding string or
  ``(low, high)`` pairs, as for ``lax.conv_general_dilated``.
  """
  kh, kw = kernel.shape[:2]
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  (top, bottom), (left, right) = padding
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  batch, height, width, channels = x.shape
  out_h = (height - kh) // strides[0] + 1
  out_w = (width - kw) // strides[1] + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      window = jax.lax.slice(
          x, (0, i, j, 0),
          (batch, i + strides[0] * (out_h - 1) + 1, j + strides[1] * (out_w - 1) + 1, channels),
          (1, strides[0], strides[1], 1))
      term = window * kernel[i, j, 0]
      y = term if y is None else y + term
  return y


QUANT_LAYERS = (QuantLinear, QuantConv)


# ---------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------


def _quant_layers(model) -> list[tuple[tuple, _QuantMixin]]:
  return [(tuple(path), module) for path, module in nnx.iter_modules(model)
          if isinstance(module, QUANT_LAYERS)]


def _key_value(entry):
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return entry


def _state_path(path) -> tuple:
  """A jax key path inside an nnx.State as a tuple of keys, without a trailing `.value`."""
  keys = tuple(_key_value(entry) for entry in path)
  if keys and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    keys = keys[:-1]
  return keys


_BUILD_WITH_TRQUANT_LAYERS = (
    "Build the model from trquant.nnx layers: trquant.nnx.QuantLinear in place of nnx.Linear"
    " and trquant.nnx.QuantConv in place of nnx.Conv (same constructor plus weight_bits and"
    " act_bits)."
)


def _require_quant_layers(model, purpose: str, *, quantized_weights: bool = False) -> list:
  """The model's trquant layers (with quantized weights if asked); a ValueError saying
  what to do when there are none, so that `purpose` does not silently do nothing."""
  layers = _quant_layers(model)
  if not layers:
    raise ValueError(f"{purpose}: the model has no trquant.nnx layer (QuantLinear /"
                     f" QuantConv), so there is nothing to work on. {_BUILD_WITH_TRQUANT_LAYERS}")
  if quantized_weights:
    layers = [(path, layer) for path, layer in layers if layer.kernel.bits is not None]
    if not layers:
      raise ValueError(f"{purpose}: the model has no quantized weights (every trquant.nnx"
                       " layer has weight_bits=None), so there is nothing to work on. Build the"
                       " layers with weight_bits set (e.g. weight_bits=4).")
  return layers


def _frozen_scale_kernels(model, purpose: str) -> dict:
  """{kernel path in the params tree: layer} of every quantized layer; they must have
  frozen weight scales (``weight_quantizer="fixed"``), which `purpose` needs."""
  kernels = {}
  for path, layer in _require_quant_layers(model, purpose, quantized_weights=True):
    _check_frozen_scale(path, layer, purpose)
    kernels[path + ("kernel",)] = layer
  return kernels


def _check_frozen_scale(path, layer, purpose: str) -> None:
  name = _path_name(path) or "<root>"
  if layer.kernel.bits is None:
    raise ValueError(f"layer {name} no longer quantizes its weights (weight_bits=None);"
                     f" {purpose} needs quantized weights with frozen scales. Make the"
                     " codes_fn / scales_fn again after changing the model's layers.")
  if layer.weight_quantizer != "fixed":
    raise ValueError(
        f"layer {name} learns its weight scale (weight_quantizer='lsq'); {purpose} needs"
        " frozen weight scales. Build the model with weight_quantizer='fixed'."
    )


class _ModelScales:
  """The frozen weight scales of a model's quantized layers, read when they are needed.

  The layers are held, not their scales' values: whatever sets a scale later (an orbax
  restore with ``nnx.update``, :func:`init_weight_scales`,
  :func:`trquant.export.load_integer`) is seen by the next call.
  """

  def __init__(self, model, purpose: str):
    self.purpose = purpose
    self.layers = _frozen_scale_kernels(model, purpose)

  def layer(self, params_path):
    return self.layers.get(_state_path(params_path))

  def scale(self, kernel_path, layer):
    _check_frozen_scale(kernel_path[:-1], layer, self.purpose)
    return layer.weight_scale.get_value()


def codes_fn(model) -> Callable[[Any], Any]:
  """Returns ``codes_fn`` for :func:`trquant.tr_schedule` from an NNX model of trquant layers.

  The function maps the params that ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
  passes to the transform (an ``nnx.State``; also under ``optax.partition``) to a
  tree of the same structure: the integer codes of every quantized kernel, None
  elsewhere.

  The frozen weight scales are read from the model's layers each time the function
  is called, not when it is made: an optimizer built before the scales are set (an
  orbax restore with ``nnx.update``, :func:`init_weight_scales`,
  :func:`trquant.export.load_integer`) uses the new ones. Inside ``nnx.jit`` /
  ``jax.jit`` they are read when the step is traced and then stay fixed in that
  trace, as any value a jitted function reads from outside its arguments: change the
  scales before the first call of a jitted train step, or, if a step already ran
  (an in-process restore), trace it again (call ``jax.clear_caches()``, or wrap the
  step function in a new ``nnx.jit``).

  Raises:
    ValueError: if the model has no trquant layer with quantized weights (build it
      from :class:`QuantLinear` / :class:`QuantConv`), or a quantized layer learns its
      weight scale (``weight_quantizer="lsq"``): TR scheduling needs frozen weight
      scales, since a moving scale changes codes without any weight update. Use
      ``weight_quantizer="fixed"``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(trquant.nnx.QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0)))
    >>> codes_fn = trquant.nnx.codes_fn(model)
    >>> params = trquant.nnx.values(nnx.state(model, nnx.Param))
    >>> model.layers[0].weight_scale.set_value(jnp.float32(1e3))  # e.g. restored later
    >>> codes_fn(params)["layers"][0]["kernel"].max()  # every weight rounds to 0 now
    Array(0., dtype=float32)
  """
  scales = _ModelScales(model, "TR scheduling")

  def model_codes_fn(params):
    def leaf_codes(path, leaf):
      layer = scales.layer(path)
      if layer is None:
        return None
      return quantizers.quantize(leaf, scales.scale(_state_path(path), layer),
                                 bits=layer.kernel.bits)

    return jax.tree_util.tree_map_with_path(leaf_codes, params)

  return model_codes_fn


def scales_fn(model) -> Callable[[Any], Any]:
  """Returns ``scale_fn`` for :func:`trquant.freeze_oscillations` from an NNX model.

  The companion of :func:`codes_fn`: the same tree (the structure of the params
  that ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` passes, also under
  ``optax.partition``) with every quantized kernel's frozen step size (a scalar,
  or a keep-dims array for per-channel scales) and None elsewhere, so that the
  bin centre of code ``c`` is ``c * scale``. As for :func:`codes_fn`, the scales
  are read from the model's layers each time the function is called (inside a
  jitted step: when it is traced).

  Raises:
    ValueError: if the model has no trquant layer with quantized weights, or a
      quantized layer learns its weight scale (``weight_quantizer="lsq"``): a moving
      scale would move frozen weights off their grid points.
  """
  scales = _ModelScales(model, "freezing")

  def model_scales_fn(params):
    def leaf_scale(path, _):
      layer = scales.layer(path)
      return None if layer is None else scales.scale(_state_path(path), layer)

    return jax.tree_util.tree_map_with_path(leaf_scale, params)

  return model_scales_fn


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def values(tree):
  """The tree with every ``nnx.Variable`` replaced by its current array.

  Inside ``nnx.jit``, ``nnx.state(model)`` and ``optimizer.opt_state`` hold live
  Variables that a later ``optimizer.update`` mutates: take ``values(...)`` to keep
  a snapshot (e.g. the params before an update).
  """
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable)


TRANSITION_FIELDS = ("tr_step", "target_transition_rate", "measured_transition_rate",
                     "running_transition_rate", "talr_multiplier")


def transition_stats(optimizer) -> dict:
  """Arrays of the :func:`trquant.tr_schedule` state held by an ``nnx.Optimizer``.

  Returns:
    ``{field: array}`` for the fields of :class:`trquant.TransitionRateState`
    (snapshots, safe to return from ``nnx.jit`` and to keep per step).

  Raises:
    ValueError: if the optimizer has no (or several) ``tr_schedule`` in its chain.
  """
  state = values(optimizer.opt_state)
  stats = {}
  for field in TRANSITION_FIELDS:
    try:
      value = optax.tree.get(state, field)
    except KeyError as error:
      raise ValueError("the optimizer has several tr_schedule transforms; read them with"
                       " optax.tree.get on trquant.nnx.values(optimizer.opt_state).") from error
    if value is None:
      raise ValueError("the optimizer's transform has no trquant.tr_schedule.")
    stats[field] = value
  return stats


OSCILLATION_FIELDS = ("osc_step", "oscillation_count", "oscillating_fraction")
FREEZE_FIELDS = ("freeze_threshold", "frozen_fraction")


def oscillation_stats(optimizer) -> dict:
  """Per-layer arrays of the oscillation tracker (or freezer) held by an ``nnx.Optimizer``.

  Returns:
    ``{field: array}`` (snapshots) for ``osc_step``, ``oscillation_count`` and
    ``oscillating_fraction`` of :func:`trquant.track_oscillations` or
    :func:`trquant.freeze_oscillations`, plus ``freeze_threshold`` and
    ``frozen_fraction`` for the latter. Per-layer vectors follow the tree order of
    the quantized kernels.

  Raises:
    ValueError: if the optimizer has no (or several) oscillation transforms in its chain.
  """
  state = values(optimizer.opt_state)
  stats = {}
  for field in OSCILLATION_FIELDS + FREEZE_FIELDS:
    try:
      value = optax.tree.get(state, field)
    except KeyError as error:
      raise ValueError("the optimizer has several oscillation transforms; read them with"
                       " optax.tree.get on trquant.nnx.values(optimizer.opt_state).") from error
    if value is None:
      if field in FREEZE_FIELDS:
        continue
      raise ValueError("the optimizer's transform has no trquant.track_oscillations or"
                       " trquant.freeze_oscillations.")
    stats[field] = value
  return stats


def dampening_loss(model, *, aggregation: str = "kernel_mean"):
  """The oscillation-dampening loss summed over every quantized layer of an NNX model.

  For each :class:`QuantLinear` / :class:`QuantConv` with ``weight_bits`` set:
  :func:`trquant.dampening_loss` of its kernel with its current weight scale and
  grid. Call it inside the loss function differentiated by ``nnx.grad``, weighted
  by :func:`trquant.dampening_weight_schedule`::

    loss = task_loss + lam(step) * trquant.nnx.dampening_loss(model)

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if the model has no trquant layer with quantized weights (the loss
      would be a constant 0): build it from :class:`QuantLinear` / :class:`QuantConv`
      with ``weight_bits`` set.
  """
  total = jnp.zeros([], jnp.float32)
  for _, layer in _require_quant_layers(model, "dampening_loss", quantized_weights=True):
    kernel = layer.kernel
    total = total + oscillations.dampening_loss(
        kernel.get_value(), layer.weight_scale.get_value(), bits=kernel.bits,
        signed=kernel.signed, narrow=kernel.narrow, aggregation=aggregation)
  return total


def param_labels(model, *, wrt=nnx.Param, quant_label: str = "quant",
                 float_label: str = "float"):
  """Label tree for ``optax.partition``: quantized kernels vs every other parameter.

  Args:
    model: an NNX model.
    wrt: the filter passed to ``nnx.Optimizer`` (default ``nnx.Param``).
    quant_label, float_label: the labels.

  Returns:
    An ``nnx.State`` with the structure of ``nnx.state(model, wrt)`` holding
    ``quant_label`` for :class:`QuantWeight` variables with ``bits`` set and
    ``float_label`` for the rest (biases, BatchNorm, learned scales, FP layers).
    Its leaves are the labels themselves, as ``optax.partition`` needs them: a
    label tree made from ``nnx.state(model, ...)`` by ``jax.tree.map`` keeps the
    ``nnx.Variable`` around each label and fails inside the optimizer's update with
    a pytree-structure error (``Param`` against an array or a tracer). Make other
    labels from this tree (``jax.tree.map(f, param_labels(model))``), or pass such a
    tree to :func:`partition`, which unwraps the Variables.
  """
  state = nnx.state(model, wrt)

  def label(variable):
    if isinstance(variable, QuantWeight) and variable.bits is not None:
      return quant_label
    return float_label

  return jax.tree.map(label, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def partition(transforms, labels, *, wrt=nnx.Param) -> optax.GradientTransformationExtraArgs:
  """``optax.partition`` for an NNX model's parameters; labels may be held in Variables.

  ``optax.partition`` needs a label tree whose leaves are the labels. A tree made
  from ``nnx.state(model, nnx.Param)`` (e.g. by ``jax.tree.map``) keeps an
  ``nnx.Variable`` around each label, and ``optax.partition`` then fails inside the
  update with a pytree-structure error (``Param`` against an array or a tracer).
  This unwraps such Variables, and labels a model with :func:`param_labels`.

  Args:
    transforms: ``{label: transform}``, as for ``optax.partition``.
    labels: an NNX model (labelled by :func:`param_labels` with ``wrt``), a label
      tree with the structure of ``nnx.state(model, wrt)`` whose leaves are labels or
      ``nnx.Variable`` objects holding labels, or a callable ``params -> such a tree``.
    wrt: the filter passed to ``nnx.Optimizer``, used when ``labels`` is a model.

  Returns:
    ``optax.partition(transforms, plain_labels)``.

  Raises:
    ValueError: if a label has no transform in ``transforms``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(trquant.nnx.QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0)))
    >>> labels = jax.tree.map(lambda _: "sgd", nnx.state(model, nnx.Param))  # Variables
    >>> optimizer = nnx.Optimizer(model, trquant.nnx.partition({"sgd": optax.sgd(0.1)}, labels),
    ...                           wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 4))).sum())(model)
    >>> _ = optimizer.update(model, grads)
  """
  if not isinstance(transforms, Mapping) or not transforms:
    raise ValueError(f"`transforms` must be a non-empty dict {{label: transform}}, got"
                     f" {transforms!r}.")
  if isinstance(labels, nnx.Module):
    labels = param_labels(labels, wrt=wrt)
  if callable(labels) and not isinstance(labels, nnx.State):
    label_fn = labels
    return optax.partition(transforms, lambda params: values(label_fn(params)))
  labels = values(labels)
  missing = sorted({str(label) for label in jax.tree.leaves(labels)} - set(map(str, transforms)))
  if missing:
    raise ValueError(f"the labels {missing} have no transform; `transforms` has"
                     f" {sorted(map(str, transforms))}. Give each label a transform (labels"
                     " made by trquant.nnx.param_labels are 'quant' and 'float').")
  return optax.partition(transforms, labels)


def load_float_weights(model, source) -> list[tuple]:
  """Copies parameter and BatchNorm values from ``source`` into ``model``, keeping its metadata.

  QAT starts from a full-precision checkpoint. ``nnx.update(quant_model, fp_state)``
  would replace the quantized model's variables with the FP ones, metadata
  included (a :class:`QuantWeight` with ``bits=None``), silently turning
  quantization off; this copies values only. Entries the source lacks (scales)
  are left as they are: re-initialise weight scales afterwards with
  :func:`init_weight_scales`.

  Args:
    model: the (quantized) NNX model to load into.
    source: an NNX model, an ``nnx.State`` with the same parameter paths, or a
      mapping from ``"/"``-joined paths to arrays (e.g. an opened ``.npz``).

  Returns:
    The paths loaded.

  Raises:
    ValueError: if the source has a path the model lacks, or a shape differs.
  """
  if isinstance(source, nnx.Module):
    source = nnx.state(source, nnx.Any(nnx.Param, nnx.BatchStat))
  if isinstance(source, nnx.State):
    entries = [(tuple(path), value) for path, value in nnx.to_flat_state(source)]
  else:
    entries = [(tuple(key.split("/")), value) for key, value in source.items()]
  # Keys as strings, so "layers/0/kernel" from a file matches the path ("layers", 0, "kernel").
  targets = {_path_name(path): variable for path, variable in nnx.to_flat_state(nnx.state(model))}
  missing = [_path_name(path) for path, _ in entries if _path_name(path) not in targets]
  if missing:
    raise ValueError(f"the source has {missing[:5]} ({len(missing)} in all), which the model"
                     " lacks; was it saved from the same architecture?")
  loaded = []
  for path, value in entries:
    target = targets[_path_name(path)]
    value = value.get_value() if isinstance(value, nnx.Variable) else value
    if np.shape(value) != np.shape(target.get_value()):
      raise ValueError(f"{_path_name(path)}: source shape {np.shape(value)}, model shape"
                       f" {np.shape(target.get_value())}.")
    target.set_value(jnp.asarray(value, dtype=target.get_value().dtype))
    loaded.append(path)
  return loaded


def _path_name(path) -> str:
  return "/".join(map(str, path))


def init_weight_scales(model, *, method: Optional[str] = None) -> None:
  """Re-initialises every quantized layer's weight scale from its current kernel.

  Call after loading full-precision weights into a quantized model (QAT starts
  from an FP checkpoint). ``method`` defaults to each layer's ``scale_method``.
  Layers with full-precision weights (``weight_bits=None``) are left as they are.

  Raises:
    ValueError: if the model has no trquant layer (:class:`QuantLinear` /
      :class:`QuantConv`): there would be no scale to set.
  """
  for _, layer in _require_quant_layers(model, "init_weight_scales"):
    if layer.kernel.bits is not None:
      layer.weight_scale.set_value(layer._initial_weight_scale(
          layer.kernel.get_value(), method or layer.scale_method))


def calibrate_activations(model, *args, **kwargs):
  """Sets each quantized input's LSQ scale to ``2 * mean(|x|) / sqrt(hi)`` on a batch.

  Runs ``model(*args, **kwargs)`` eagerly once with calibration on, and returns its output.
  Layers with full-precision inputs (``act_bits=None``) are left as they are.

  Raises:
    ValueError: if the model has no trquant layer (:class:`QuantLinear` /
      :class:`QuantConv`): there would be no activation scale to set.
  """
  layers = [layer for _, layer in _require_quant_layers(model, "calibrate_activations")]
  for layer in layers:
    layer.calibrating = True
  try:
    return model(*args, **kwargs)
  finally:
    for layer in layers:
      layer.calibrating = False


def reestimate_batchnorm(model, batches: Iterable, num_batches: int = 50,
                         apply_fn: Optional[Callable] = None) -> int:
  """Replaces BatchNorm running statistics by the plain average of per-batch statistics.

  Runs the model in training mode on up to ``num_batches`` batches (each either
  an input array or a tuple whose first element is the input) and sets every
  ``nnx.BatchNorm``'s ``mean`` and ``var`` to the average over batches of that
  batch's statistics, as in the oscillation paper's BN re-estimation. Other
  state (weights, scales) is untouched; the model is left in evaluation mode.

  Args:
    model: an NNX model containing ``nnx.BatchNorm`` layers.
    batches: iterable of batches.
    num_batches: maximum number of batches to use (positive).
    apply_fn: ``(model, inputs) -> outputs``; default ``model(inputs)``.

  Returns:
    The number of batches used.
  """
  if not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"`num_batches` must be a positive int, got {num_batches!r}.")
  norms = _batchnorms(model)
  if not norms:
    raise ValueError("the model has no nnx.BatchNorm layer to re-estimate.")
  apply_fn = apply_fn or (lambda m, x: m(x))
  saved_momentum = [norm.momentum for norm in norms]
  # With momentum 0 each forward pass leaves exactly that batch's statistics.
  for norm in norms:
    norm.momentum = 0.0
  model.train()

  @nnx.jit
  def batch_statistics(model, inputs):
    apply_fn(model, inputs)
    return [(norm.mean.get_value(), norm.var.get_value()) for norm in _batchnorms(model)]

  sums, used = None, 0
  try:
    for batch in batches:
      if used >= num_batches:
        break
      inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
      stats = batch_statistics(model, jnp.asarray(inputs))
      sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
      used += 1
  finally:
    for norm, momentum in zip(norms, saved_momentum):
      norm.momentum = momentum
    model.eval()
  if used == 0:
    raise ValueError("`batches` yielded no batch.")
  for norm, (mean_sum, var_sum) in zip(norms, sums):
    norm.mean.set_value(mean_sum / used)
    norm.var.set_value(var_sum / used)
  return used


def _batchnorms(model):
  return [module for _, module in nnx.iter_modules(model) if isinstance(module, nnx.BatchNorm)]
