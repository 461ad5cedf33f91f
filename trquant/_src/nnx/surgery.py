"""Model surgery: quantize an existing Flax NNX model by rules matched against its layers.

:func:`quantize_model` returns a copy of a plain NNX model in which the layers that a
:class:`QuantRule` matches are replaced by their trquant counterparts, with the same
weights, biases, dtypes and Variable metadata (sharding annotations included):

==================== ===================================================
NNX layer            replaced by
==================== ===================================================
``nnx.Linear``       :class:`trquant.nnx.QuantLinear`
``nnx.LinearGeneral`` :class:`trquant.nnx.QuantLinearGeneral` (so the
                     query/key/value/out projections of
                     ``nnx.MultiHeadAttention``)
``nnx.Conv`` (2-D)   :class:`trquant.nnx.QuantConv` (depth-wise included)
``nnx.Einsum``       :class:`trquant.nnx.QuantEinsum`
==================== ===================================================

    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(16, 16, rngs=nnx.Rngs(1)), nnx.relu,
    ...                        nnx.Linear(16, 4, rngs=nnx.Rngs(2)))
    >>> q = trquant.nnx.quantize_model(model, [
    ...     trquant.nnx.first_last_rule(model, jnp.ones((1, 8))),  # first and last layer in FP
    ...     trquant.nnx.QuantRule(weight_bits=2, act_bits=4)])     # the rest at W2A4
    >>> [(type(q.layers[i]).__name__, q.layers[i].weight_bits) for i in (0, 2, 4)]
    [('QuantLinear', None), ('QuantLinear', 2), ('QuantLinear', None)]
    >>> type(model.layers[2]).__name__                             # the input model is untouched
    'Linear'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from trquant._src import checks
from trquant._src import quantizers
from trquant._src.nnx import graph
from trquant._src.nnx.capturing import capture_layers
from trquant._src.nnx.traversal import path_name
from trquant._src.nnx.layers import QUANT_LAYERS
from trquant._src.nnx.layers import ACT_QUANTIZERS
from trquant._src.nnx.layers import WEIGHT_QUANTIZERS
from trquant._src.nnx.layers import QuantConv
from trquant._src.nnx.layers import QuantEinsum
from trquant._src.nnx.layers import QuantLinear
from trquant._src.nnx.layers import QuantLinearGeneral
from trquant._src.nnx.layers import QuantWeight

# NNX layer type -> its trquant counterpart (exact types: a subclass has its own forward pass).
SUPPORTED_LAYERS = {
    nnx.Linear: QuantLinear,
    nnx.LinearGeneral: QuantLinearGeneral,
    nnx.Conv: QuantConv,
    nnx.Einsum: QuantEinsum,
}

_KEEP_FP = "leave it in full precision"

# Layers with weights that trquant cannot quantize, and why.
UNSUPPORTED_LAYERS = {
    nnx.ConvTranspose: "trquant has no transposed-convolution layer",
    nnx.Embed: ("an embedding is a table lookup, not a product of an input with a kernel:"
                " trquant's layers quantize a kernel and the input it multiplies"),
    nnx.LoRA: ("a low-rank adapter is trained on top of frozen weights; trquant has no"
               " quantized LoRA layer"),
}


def _unsupported_reason(module) -> Optional[str]:
  """Why a module with weights cannot be quantized (None if it can, or has no weights)."""
  for layer_type, reason in UNSUPPORTED_LAYERS.items():
    if isinstance(module, layer_type):
      return reason
  if type(module) not in SUPPORTED_LAYERS:
    for layer_type in SUPPORTED_LAYERS:
      if isinstance(module, layer_type):
        return (f"it is a subclass of nnx.{layer_type.__name__} with its own forward pass;"
                f" a trquant.nnx.{SUPPORTED_LAYERS[layer_type].__name__} would drop what the"
                " subclass adds")
  return None


def _is_weight_layer(module) -> bool:
  return isinstance(module, tuple(SUPPORTED_LAYERS) + tuple(UNSUPPORTED_LAYERS) + QUANT_LAYERS)


def _type_name(layer_type) -> str:
  module = getattr(layer_type, "__module__", "")
  prefix = "nnx." if module.startswith("flax.nnx") else ""
  return prefix + getattr(layer_type, "__name__", repr(layer_type))


@dataclasses.dataclass(frozen=True, repr=False)
class QuantRule:
  """Which layers :func:`quantize_model` replaces, and how they quantize.

  A rule matches a layer when ``path`` matches the layer's whole ``"/"``-joined path
  in the model (``re.fullmatch``, e.g. ``"blocks/0/attn/query"``; the path of its
  parameters in ``nnx.state(model)``) and, if ``layer_types`` is given, the layer is an
  instance of one of them. Only layers with weights are matched (``nnx.Linear``,
  ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum``, and the unsupported
  ``nnx.ConvTranspose``, ``nnx.Embed``, ``nnx.LoRA``, which raise) and trquant layers
  (whose quantization the rule sets anew from their kernels: one rule list works on a
  model built from trquant layers too), never containers such as
  ``nnx.MultiHeadAttention`` or a block: ``"blocks/.*/attn/.*"`` matches the four
  projections of the attention modules under ``blocks``.

  Args:
    path: a regular expression for the layer's path (default ``".*"``: every layer).
    layer_types: None, or a layer type or tuple of types (``nnx.Linear``,
      ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum``).
    weight_bits: weight bit width (1 = binary); None keeps full-precision weights.
    act_bits: input bit width (LSQ); None keeps full-precision inputs.
    per_channel: one weight scale per output channel / feature.
    group_size: per-group (sub-channel) weight scales: one per group of ``group_size``
      consecutive weights along each matched layer's last input axis, per output channel
      (LM stacks use 32-128); it must divide that axis of every matched layer.
    act_quantizer: ``"lsq"`` (learned per-tensor input scale) or ``"dynamic"``
      (per-token absmax, :func:`trquant.fake_quant_dynamic`).
    weight_quantizer: ``"fixed"`` (frozen scale from the weights, as TR scheduling
      needs) or ``"lsq"`` (learned).
    signed_act: signed input grid (inputs that are not post-ReLU: LayerNorm outputs,
      attention outputs, GELU outputs), or ``"auto"``: each matched layer's grid is
      decided by :func:`trquant.nnx.calibrate_activations`, signed where that layer's
      calibration input has a negative value.
    scale_method: weight scale initialiser (:func:`trquant.init_scale`).
    skip: leave the matched layers as they are (plain NNX layers); since the first
      matching rule wins, later rules do not touch them.
    allow_unmatched: do not raise when the rule matches no layer.

  A rule with ``weight_bits=None`` and ``act_bits=None`` (and ``skip=False``) makes
  the layer a trquant layer in full precision: it computes what the NNX layer
  computed, and the post-training drivers (:func:`trquant.adaround.reconstruct_model`,
  ``round_to_nearest``) leave it so. The same rules drive QAT and PTQ: the drivers read
  each layer's bits, scale granularity and input quantization from the model
  :func:`quantize_model` returns.
  """

  path: str = ".*"
  _: dataclasses.KW_ONLY
  layer_types: Any = None
  weight_bits: Optional[int] = None
  act_bits: Optional[int] = None
  per_channel: bool = False
  group_size: Optional[int] = None
  act_quantizer: str = "lsq"
  weight_quantizer: str = "fixed"
  signed_act: Union[bool, str] = False
  scale_method: str = "mse"
  skip: bool = False
  allow_unmatched: bool = False

  def __post_init__(self):
    if not isinstance(self.path, str):
      raise ValueError(f"QuantRule: `path` must be a regular expression (str), got {self.path!r}.")
    try:
      re.compile(self.path)
    except re.error as error:
      raise ValueError(f"QuantRule: `path` {self.path!r} is not a valid regular expression:"
                       f" {error}.") from None
    types = self.layer_types
    if types is not None:
      types = tuple(types) if isinstance(types, (tuple, list)) else (types,)
      for layer_type in types:
        _check_layer_type(layer_type)
      object.__setattr__(self, "layer_types", types)
    if self.weight_bits is not None:
      quantizers.quant_range(self.weight_bits, signed=True)  # validates
    try:
      object.__setattr__(self, "signed_act", checks.check_signed_act(self.signed_act))
    except ValueError as error:
      raise ValueError(f"QuantRule: {error}") from None
    if self.act_bits is not None:
      checks.check_bits(self.act_bits, "act_bits")
    if self.group_size is not None:
      try:
        checks.check_group_size(self.group_size)
      except ValueError as error:
        raise ValueError(f"QuantRule: {error}") from None
    if self.act_quantizer not in ACT_QUANTIZERS:
      raise ValueError(f"QuantRule: `act_quantizer` must be one of {ACT_QUANTIZERS}, got"
                       f" {self.act_quantizer!r}.")
    if self.weight_quantizer not in WEIGHT_QUANTIZERS:
      raise ValueError(f"QuantRule: `weight_quantizer` must be one of {WEIGHT_QUANTIZERS}, got"
                       f" {self.weight_quantizer!r}.")
    if self.skip and (self.weight_bits is not None or self.act_bits is not None):
      raise ValueError("QuantRule: skip=True leaves the matched layers as they are; it takes no"
                       " weight_bits / act_bits.")

  def __repr__(self) -> str:
    parts = [repr(self.path)]
    for field in dataclasses.fields(self):
      if field.name in ("path", "_"):
        continue
      value = getattr(self, field.name)
      if value != field.default:
        if field.name == "layer_types":
          value = "(" + ", ".join(_type_name(t) for t in value) + ")"
          parts.append(f"layer_types={value}")
        else:
          parts.append(f"{field.name}={value!r}")
    return f"QuantRule({', '.join(parts)})"

  def matches(self, path: str, module) -> bool:
    """Whether the rule matches a layer at ``path`` ("/"-joined)."""
    if not _is_weight_layer(module) or re.fullmatch(self.path, path) is None:
      return False
    return self.layer_types is None or isinstance(module, self.layer_types)

  def layer_kwargs(self) -> dict:
    """The quantization arguments of the trquant layer constructors."""
    return dict(weight_bits=self.weight_bits, act_bits=self.act_bits,
                per_channel=self.per_channel, group_size=self.group_size,
                act_quantizer=self.act_quantizer,
                weight_quantizer=self.weight_quantizer, signed_act=self.signed_act,
                scale_method=self.scale_method)


def _check_layer_type(layer_type) -> None:
  if not isinstance(layer_type, type):
    raise ValueError(f"QuantRule: `layer_types` must hold layer classes, got {layer_type!r}.")
  supported = ", ".join(_type_name(t) for t in SUPPORTED_LAYERS)
  if issubclass(layer_type, QUANT_LAYERS):
    return  # a rule re-sets the quantization of trquant layers too
  for unsupported, reason in UNSUPPORTED_LAYERS.items():
    if issubclass(layer_type, unsupported):
      raise ValueError(f"QuantRule: {_type_name(layer_type)} layers cannot be quantized: {reason}."
                       f" trquant.nnx.quantize_model replaces {supported}.")
  if not issubclass(layer_type, tuple(SUPPORTED_LAYERS)):
    raise ValueError(f"QuantRule: {_type_name(layer_type)} is not a layer trquant quantizes;"
                     f" `layer_types` may name {supported} or a trquant layer class.")


# ---------------------------------------------------------------------------------------
# Walking and editing the model graph
# ---------------------------------------------------------------------------------------


def _references(root):
  """Every place a module is referenced from (shared modules have several), and the
  number of references to each Variable."""
  modules: dict[int, list[tuple]] = {}
  variables: dict[int, int] = {}
  expanded: set[int] = set()

  def walk(node, path):
    if isinstance(node, nnx.Variable):
      variables[id(node)] = variables.get(id(node), 0) + 1
      return
    if isinstance(node, nnx.Pytree):
      if isinstance(node, nnx.Module):
        modules.setdefault(id(node), []).append(path)
      if id(node) in expanded:
        return
      expanded.add(id(node))
    elif not isinstance(node, (list, tuple, dict)):
      return
    for key, child in graph.children(node):
      walk(child, path + (key,))

  walk(root, ())
  return modules, variables


# ---------------------------------------------------------------------------------------
# Building the quantized layers
# ---------------------------------------------------------------------------------------


def _default(module, name, expected) -> Optional[str]:
  value = getattr(module, name, expected)
  if value is expected or (expected is None and value is None):
    return None
  return f"it has a custom `{name}` ({value!r}), which the trquant layer does not call"


def _conversion_problem(module) -> Optional[str]:
  """Why this layer cannot be replaced (None if it can)."""
  if isinstance(module, QUANT_LAYERS):
    return None
  reason = _unsupported_reason(module)
  if reason is not None:
    return reason
  checks = [_default(module, "promote_dtype", nnx_dtypes.promote_dtype)]
  if type(module) is nnx.Linear:
    checks.append(_default(module, "dot_general", jax.lax.dot_general))
  elif type(module) is nnx.LinearGeneral:
    checks += [_default(module, "dot_general", None), _default(module, "dot_general_cls", None)]
  elif type(module) is nnx.Einsum:
    checks.append(_default(module, "einsum_op", jnp.einsum))
  elif type(module) is nnx.Conv:
    checks.append(_default(module, "conv_general_dilated", jax.lax.conv_general_dilated))
    if len(module.kernel_size) != 2:
      checks.append(f"it is a {len(module.kernel_size)}-D convolution; trquant.nnx.QuantConv is"
                    " 2-D (NHWC)")
    for name in ("input_dilation", "kernel_dilation"):
      value = getattr(module, name)
      if value is not None and any(d != 1 for d in _per_axis(value, len(module.kernel_size))):
        checks.append(f"it has {name}={value!r}; trquant.nnx.QuantConv has no dilation")
    if module.mask is not None:
      checks.append("it has a kernel mask; trquant.nnx.QuantConv has none")
    if isinstance(module.padding, str) and module.padding.upper() not in ("SAME", "VALID"):
      checks.append(f"it has padding={module.padding!r}; trquant.nnx.QuantConv takes 'SAME',"
                    " 'VALID', an int or (low, high) pairs")
  problems = [check for check in checks if check]
  return "; ".join(problems) if problems else None


def _per_axis(value, n) -> tuple:
  return (value,) * n if isinstance(value, int) else tuple(value)


def _conv_padding(padding, n):
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return padding
  pairs = []
  for item in padding:
    pairs.append((item, item) if isinstance(item, int) else tuple(item))
  if len(pairs) != n:
    raise ValueError(f"padding {padding!r} does not have one entry per spatial axis ({n}).")
  return tuple(pairs)


def _kernel_metadata(kernel_variable, rule: QuantRule) -> dict:
  """The kernel Variable's metadata (sharding annotations) with `rule`'s bit width."""
  return dict(kernel_variable.get_metadata(), bits=rule.weight_bits, signed=True, narrow=False)


def _requantized(module, rule: QuantRule):
  """A copy of the trquant layer `module` with `rule`'s quantization, from its kernel."""
  layer = nnx.clone(module)
  kernel_variable = module.kernel
  layer._init_quantization(kernel_variable.get_value(), **rule.layer_kwargs())
  layer.kernel = QuantWeight.from_metadata(kernel_variable.get_raw_value(),
                                           _kernel_metadata(kernel_variable, rule))
  return layer


def _build(module, rule: QuantRule):
  """The trquant layer replacing `module`: its weights, bias and metadata, `rule`'s quantization."""
  if isinstance(module, QUANT_LAYERS):
    return _requantized(module, rule)
  kernel_variable = module.kernel
  kernel = kernel_variable.get_value()
  common = dict(
      dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
      preferred_element_type=getattr(module, "preferred_element_type", None),
      kernel_init=lambda key, shape, dtype: jnp.reshape(kernel, shape),
      bias_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0), **rule.layer_kwargs())
  use_bias = module.bias is not None
  layer: nnx.Module
  if type(module) is nnx.Linear:
    layer = QuantLinear(module.in_features, module.out_features, use_bias=use_bias, **common)
  elif type(module) is nnx.LinearGeneral:
    layer = QuantLinearGeneral(module.in_features, module.out_features, axis=module.axis,
                               batch_axis=module.batch_axis, use_bias=use_bias, **common)
  elif type(module) is nnx.Conv:
    n = len(module.kernel_size)
    layer = QuantConv(module.in_features, module.out_features, tuple(module.kernel_size),
                      strides=_per_axis(module.strides if module.strides is not None else 1, n),
                      padding=_conv_padding(module.padding, n),
                      feature_group_count=module.feature_group_count, use_bias=use_bias,
                      **common)
  else:
    layer = QuantEinsum(module.einsum_str, module.kernel_shape, module.bias_shape, **common)
  # The original Variables' values and metadata (sharding annotations) carry over; from_metadata
  # keeps the (already placed) value as it is.
  layer.kernel = QuantWeight.from_metadata(kernel_variable.get_raw_value(),
                                           _kernel_metadata(kernel_variable, rule))
  if use_bias:
    layer.bias = module.bias
  return layer


# ---------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------


def _rule_list(rules) -> list[QuantRule]:
  if isinstance(rules, QuantRule):
    rules = [rules]
  rules = list(rules)
  if not rules:
    raise ValueError("quantize_model: `rules` is empty, so nothing would be quantized; pass e.g."
                     " [trquant.nnx.QuantRule(weight_bits=4, act_bits=4)].")
  for rule in rules:
    if not isinstance(rule, QuantRule):
      raise ValueError(f"quantize_model: `rules` must hold trquant.nnx.QuantRule objects, got {rule!r}.")
  return rules


def _layer_list(model) -> list[tuple[str, Any]]:
  return [(path_name(path), module) for path, module in nnx.iter_modules(model)
          if _is_weight_layer(module)]


def _unmatched_message(index, rule, model, layers, taken) -> str:
  head = f"quantize_model: rule {index}, {rule!r}, matches no layer"
  if taken:
    names = ", ".join(f"{name} (rule {winner})" for name, winner in taken[:6])
    return (f"{head} that an earlier rule has not taken already: the first matching rule wins,"
            f" and it matches only {names}{' ...' if len(taken) > 6 else ''}. Put it before"
            " those rules, narrow them, or drop it.")
  hints = []
  for path, module in nnx.iter_modules(model):
    name = path_name(path)
    if re.fullmatch(rule.path, name) is None or (name, module) in layers:
      continue
    if not _is_weight_layer(module):
      hints.append(f"{name} is a {type(module).__name__}, not a layer with weights (rules match"
                   f" the layers inside it, e.g. {name + '/.*' if name else '.*'})")
  for name, module in layers:
    if re.fullmatch(rule.path, name) and not rule.matches(name, module):
      hints.append(f"{name} is a {_type_name(type(module))}, not one of `layer_types`")
  listing = ", ".join(f"{name} ({type(module).__name__})" for name, module in layers[:12])
  more = f" ... ({len(layers)} in all)" if len(layers) > 12 else ""
  hint = (" " + "; ".join(hints[:4]) + ".") if hints else ""
  return (f"{head}.{hint} Paths are matched with re.fullmatch against a layer's '/'-joined"
          f" path; the model's layers are: {listing or 'none'}{more}. Pass"
          " allow_unmatched=True to a rule that may match nothing in some models.")


def quantize_model(model: nnx.Module, rules: Union[QuantRule, Sequence[QuantRule]]) -> nnx.Module:
  """A copy of an NNX model with the layers that ``rules`` match replaced by trquant layers.

  Every layer with weights (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``,
  ``nnx.Einsum``; see :class:`QuantRule`) is given to the first rule that matches
  it; layers that no rule matches stay as they are. A trquant layer that a rule matches
  gets the rule's quantization, its weight scale set anew from its kernel. A matched
  layer is replaced by its trquant counterpart (:class:`~trquant.nnx.QuantLinear`,
  :class:`~trquant.nnx.QuantLinearGeneral`, :class:`~trquant.nnx.QuantConv`,
  :class:`~trquant.nnx.QuantEinsum`) with the rule's quantization, unless the rule
  has ``skip=True``. The replacement keeps:

  * the kernel and bias values and their Variable metadata (e.g. the sharding
    annotations of ``nnx.with_partitioning``: the arrays stay where they are),
    and the bias Variable itself;
  * ``dtype``, ``param_dtype``, ``precision``, ``preferred_element_type`` and the
    layer's geometry (axes, strides, padding, groups, equation);
  * its place in the model: attribute, ``nnx.List`` / ``nnx.Sequential`` entry,
    list, tuple or dict entry, every place when the layer is shared.

  Frozen weight scales are initialised from the kernels (as
  :func:`trquant.nnx.init_weight_scales`); activation scales start at 1: call
  :func:`trquant.nnx.calibrate_activations` on a batch before training. The
  result works with everything that works on a model built from trquant layers
  (``codes_fn``, ``param_labels``, ``tr_schedule``, the oscillation helpers,
  AdaRound, ``to_integer`` / ``load_integer``, orbax, sharded meshes); its
  parameters have the paths of the input model's.

  In ``nnx.MultiHeadAttention`` the four projections are ``nnx.LinearGeneral`` layers
  and are quantized; the attention matmuls (``q @ k`` and ``attention @ v``) and the
  softmax are not layers with weights and stay in full precision.

  Args:
    model: an NNX model (not modified).
    rules: a :class:`QuantRule` or a sequence of them, in priority order.

  Returns:
    The new model (the new layer itself if ``model`` is one layer).

  Raises:
    ValueError: if a rule matches no layer (or only layers an earlier rule takes)
      and does not allow it: a typo in a rule would otherwise leave layers in full
      precision silently, with plausible results; if a rule matches a layer that
      cannot be quantized (``nnx.ConvTranspose``, ``nnx.Embed``, ``nnx.LoRA``, a
      subclass of a supported layer, a custom ``dot_general``, a 1-D/3-D or dilated
      convolution...), naming it and the reason (exclude it with a ``skip=True``
      rule first); or if a kernel is shared with another module (weight tying).
  """
  rules = _rule_list(rules)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"quantize_model: `model` must be an nnx.Module, got {type(model).__name__}.")
  work = nnx.clone(model)
  layers = _layer_list(work)
  claimed: dict[int, list[str]] = {index: [] for index in range(len(rules))}
  taken: dict[int, list[tuple[str, int]]] = {index: [] for index in range(len(rules))}
  assignment = []
  for name, module in layers:
    winner = None
    for index, rule in enumerate(rules):
      if rule.matches(name, module):
        if winner is None:
          winner = index
          claimed[index].append(name)
        else:
          taken[index].append((name, winner))
    if winner is not None:
      assignment.append((name, module, rules[winner]))
  for index, rule in enumerate(rules):
    if not claimed[index] and not rule.allow_unmatched:
      raise ValueError(_unmatched_message(index, rule, work, layers, taken[index]))
  modules, variables = _references(work)
  replacements = []
  for name, module, rule in assignment:
    if rule.skip:
      continue
    problem = _conversion_problem(module)
    label = name or "<root>"
    if problem is not None:
      raise ValueError(
          f"quantize_model: {rule!r} matches {label} ({_type_name(type(module))}), which trquant cannot"
          f" quantize: {problem}. To {_KEEP_FP}, put QuantRule({re.escape(name)!r}, skip=True)"
          " before this rule (or narrow the rule's path).")
    if variables.get(id(module.kernel), 0) > 1:
      raise ValueError(f"quantize_model: the kernel of {label} is shared with another module (weight"
                       " tying); quantizing this layer would untie them.")
    try:
      replacements.append((module, _build(module, rule)))
    except ValueError as error:  # e.g. a group size that does not divide this layer's inputs
      raise ValueError(f"quantize_model: {rule!r} at {label} ({type(module).__name__}, kernel"
                       f" {tuple(np.shape(module.kernel.get_value()))}): {error} A rule with a"
                       " narrower path before it can give this layer its own settings.") from None
  root = work
  for module, layer in replacements:
    for path in modules[id(module)]:
      if path:
        graph.set_at(work, path, layer)
      else:
        root = layer
  return root


def first_last_rule(model: nnx.Module, example_input: Any, *, weight_bits: Optional[int] = None,
                    act_bits: Optional[int] = None, signed_act: Union[bool, str] = False,
                    per_channel: bool = False, group_size: Optional[int] = None,
                    act_quantizer: str = "lsq", weight_quantizer: str = "fixed",
                    scale_method: str = "mse", skip: bool = False,
                    forward_fn: Optional[Callable] = None) -> QuantRule:
  """The paper's usual choice in one rule: the first and last layer the forward pass calls.

  Quantization papers keep the first and the last layer in full precision or at 8
  bits. Which layers those are depends on the forward pass, not on the attribute
  order, so this runs ``model`` once (a copy, in evaluation mode, eagerly) on
  ``example_input`` and returns a :class:`QuantRule` matching exactly the first
  and the last layer called among those :func:`quantize_model` can replace. Put it
  first in the rule list::

    q = trquant.nnx.quantize_model(model, [
        trquant.nnx.first_last_rule(model, x[:1]),                          # FP
        trquant.nnx.QuantRule(weight_bits=2, act_bits=2, signed_act=True)])  # the rest
    # or 8-bit weights and inputs, each layer's input grid signed where its calibration
    # data is (the first layer's input is the image; the last one's often post-ReLU):
    #   trquant.nnx.first_last_rule(model, x[:1], weight_bits=8, act_bits=8, signed_act="auto")

  Args:
    model: the NNX model (not modified).
    example_input: a batch of inputs for ``model(example_input)`` (one example is enough).
    weight_bits, act_bits, signed_act, per_channel, group_size, act_quantizer,
      weight_quantizer, scale_method: the rule's quantization, with
      :class:`QuantRule`'s defaults: (None, None) makes the two layers trquant layers
      in full precision. With ``act_bits`` pass ``signed_act=True`` for inputs with
      negative values (a normalised image; :func:`trquant.nnx.calibrate_activations`
      raises otherwise), or ``"auto"`` to let the calibration pass decide per layer.
    skip: leave the two layers as plain NNX layers instead.
    forward_fn: ``(model, example_input) -> output`` if the model is not called as
      ``model(example_input)``.

  Returns:
    A :class:`QuantRule` whose path matches the first and the last layer.

  Raises:
    ValueError: if the forward pass calls none of the model's quantizable layers
      eagerly (a jitted ``__call__``: call it eagerly).
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"first_last_rule: `model` must be an nnx.Module, got {type(model).__name__}.")
  probe = nnx.clone(model)
  modules, _ = _references(probe)
  new_layers = []
  root = probe
  fp = QuantRule()
  for name, module in _layer_list(probe):
    if _conversion_problem(module) is not None:
      continue
    layer = _build(module, fp)
    new_layers.append(layer)
    for path in modules[id(module)]:
      if path:
        graph.set_at(probe, path, layer)
      else:
        root = layer
  if not new_layers:
    raise ValueError("first_last_rule: the model has no layer that trquant.nnx.quantize_model can"
                     " replace.")
  root.eval()
  with capture_layers(root, new_layers) as captured:
    checks.check_forward_fn(forward_fn)(root, example_input)
  order = captured.order
  if not order:
    detail = (" It ran inside a transform (e.g. an nnx.jit-decorated __call__): call the model"
              " eagerly." if captured.missed else "")
    raise ValueError("first_last_rule: the forward pass called none of the model's quantizable"
                     f" layers eagerly.{detail}")
  first, last = order[0], order[-1]
  pattern = re.escape(first) if first == last else f"{re.escape(first)}|{re.escape(last)}"
  return QuantRule(pattern, weight_bits=weight_bits, act_bits=act_bits, signed_act=signed_act,
                   per_channel=per_channel, group_size=group_size, act_quantizer=act_quantizer,
                   weight_quantizer=weight_quantizer, scale_method=scale_method, skip=skip)


__all__ = ["QuantRule", "SUPPORTED_LAYERS", "UNSUPPORTED_LAYERS", "first_last_rule", "quantize_model"]
