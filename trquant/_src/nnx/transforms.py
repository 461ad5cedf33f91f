"""The glue between NNX models of trquant layers and trquant's optax transforms.

* :func:`codes_fn` and :func:`param_labels` turn a model into the ``codes_fn`` of
  :func:`trquant.tr_schedule` and the label tree of ``optax.partition``;
* :func:`scale_fn` gives the ``scale_fn`` of :func:`trquant.freeze_oscillations`
  and :func:`model_dampening_loss` the model's oscillation-dampening loss;
* :func:`transition_stats` and :func:`oscillation_stats` read the transforms' state
  out of an ``nnx.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import filterlib

from trquant._src import checks
from trquant._src.oscillations import dampening
from trquant._src import quantizers
from trquant._src.nnx import traversal
from trquant._src.nnx.layers import QuantWeight


def _check_max_bits(max_bits) -> None:
  if max_bits is not None:
    checks.check_int("max_bits", max_bits)  # e.g. 4: leave 8-bit layers out


def _within(layer, max_bits) -> bool:
  """Whether `layer` quantizes its weights to at most `max_bits` bits (None: any)."""
  bits = layer.kernel.bits
  return bits is not None and (max_bits is None or bits <= max_bits)


def _frozen_scale_kernels(model, purpose: str, max_bits=None) -> dict:
  """{kernel path in the params tree: layer} of every quantized layer with at most
  `max_bits` bits; they must have frozen weight scales (``weight_quantizer="fixed"``),
  which `purpose` needs."""
  _check_max_bits(max_bits)
  kernels = {}
  for path, layer in traversal.require_quant_layers(model, purpose, quantized_weights=True):
    if not _within(layer, max_bits):
      continue
    _check_frozen_scale(path, layer, purpose)
    kernels[path + ("kernel",)] = layer
  if not kernels:
    raise ValueError(f"{purpose}: no quantized layer has at most max_bits={max_bits} bits"
                     " (every layer was left out). Raise `max_bits`, or leave it None.")
  return kernels


def _check_frozen_scale(path, layer, purpose: str) -> None:
  name = traversal.path_name(path) or "<root>"
  if layer.kernel.bits is None:
    raise ValueError(f"layer {name} no longer quantizes its weights (weight_bits=None);"
                     f" {purpose} needs quantized weights with frozen scales. Make the"
                     " codes_fn / scale_fn again after changing the model's layers.")
  if layer.weight_quantizer != "fixed":
    raise ValueError(
        f"layer {name} learns its weight scale (weight_quantizer='lsq'); {purpose} needs"
        " frozen weight scales. Build the model with weight_quantizer='fixed'."
    )


def _per_kernel_fn(scales, leaf_fn) -> Callable[..., Any]:
  """``(params, weight_scales=None) -> tree``: ``leaf_fn(leaf, layer, scale)`` at each
  kernel `scales` holds, None elsewhere (the walk shared by :func:`codes_fn`,
  ``codes_fn.saturation_fn`` and :func:`scale_fn`). ``weight_scales`` (from
  :func:`weight_scales`, passed by the transforms from the update's extra arguments)
  gives the scales as arguments; without it they are read from the model."""

  def model_fn(params, weight_scales=None):
    def at_leaf(path, leaf):
      layer = scales.layer(path)
      if layer is None:
        return None
      scale = scales.scale(traversal.state_path(path), layer, weight_scales,
                           traced=isinstance(leaf, jax.core.Tracer))
      return leaf_fn(leaf, layer, scale)

    return jax.tree_util.tree_map_with_path(at_leaf, params)

  setattr(model_fn, "takes_weight_scales", True)  # see codes_tree.with_extra_args
  return model_fn


class _ModelScales:
  """The frozen weight scales of a model's quantized layers, read when they are needed.

  The layers are held, not their scales' values: whatever sets a scale later (an orbax
  restore with ``nnx.update``, :func:`init_weight_scales`,
  :func:`trquant.export.load_integer`) is seen by the next call.
  """

  def __init__(self, model, purpose: str, max_bits=None):
    self.purpose = purpose
    self.layers = _frozen_scale_kernels(model, purpose, max_bits)

  def layer(self, params_path):
    return self.layers.get(traversal.state_path(params_path))

  def scale(self, kernel_path, layer, weight_scales=None, traced=False):
    _check_frozen_scale(kernel_path[:-1], layer, self.purpose)
    name = traversal.path_name(kernel_path[:-1])
    if weight_scales is not None:
      if not isinstance(weight_scales, Mapping) or name not in weight_scales:
        raise ValueError(f"`weight_scales` has no scale for layer {name}: pass"
                         " trquant.nnx.weight_scales(model) of the optimizer's own model.")
      return weight_scales[name]
    value = layer.weight_scale.get_value()
    if traced and isinstance(value, jax.Array) and not value.is_fully_addressable:
      # A jitted function cannot hold such an array as a constant (XLA would need its
      # shards on every process); it must be an argument of the step.
      raise ValueError(
          f"{self.purpose}: layer {name}'s weight scale is sharded across processes, so it"
          " cannot be read from the model inside a jitted step. Pass the scales as an"
          " argument of the step: optimizer.update(model, grads,"
          " weight_scales=trquant.nnx.weight_scales(model)).")
    return value


def weight_scales(model: nnx.Module) -> dict:
  """The frozen weight scales of a model's quantized layers: ``{layer name: scale}``.

  Pass them to the update inside the jitted train step, where ``model`` is the step's
  argument, so that :func:`codes_fn`, ``codes_fn.saturation_fn`` and :func:`scale_fn` count
  and freeze on the model's current grid as values of the step rather than as constants
  captured when it was traced::

    optimizer.update(model, grads, weight_scales=trquant.nnx.weight_scales(model))

  ``optax.chain``, ``optax.partition``, ``optax.inject_hyperparams`` and
  ``optax.MultiSteps`` forward the keyword to trquant's transforms; other transforms
  ignore it. Without it the functions read the scales from the model they were made
  from, which a jitted step captures when it is traced: fine in one process until the
  scales change (then trace again), and impossible when the scales are sharded across
  processes (they raise and name this fix).

  Args:
    model: an NNX model of trquant layers (inside a jitted step: the step's model).

  Returns:
    ``{"/"-joined layer path: weight scale}`` for every quantized layer with a frozen
    scale (``weight_quantizer="fixed"``).

  Example:
    >>> import trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(trquant.nnx.QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0)))
    >>> sorted(trquant.nnx.weight_scales(model))
    ['layers/0']
  """
  scales = {}
  for path, layer in traversal.require_quant_layers(model, "weight_scales",
                                                     quantized_weights=True):
    if layer.weight_quantizer == "fixed":
      scales[traversal.path_name(path)] = layer.weight_scale.get_value()
  return scales


def codes_fn(model: nnx.Module, *, max_bits: Optional[int] = None) -> Callable[[Any], Any]:
  """Returns ``codes_fn`` for :func:`trquant.tr_schedule` from an NNX model of trquant layers.

  The function maps the params that ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
  passes to the transform (an ``nnx.State``; also under ``optax.partition``) to a
  tree of the same structure: the integer codes of every quantized kernel, None
  elsewhere.

  ``max_bits`` leaves out layers with more bits (None in the tree): an 8-bit first
  or last layer has a grid 64 times finer than a 2-bit layer's, so under one TR
  target its codes flip far more often than the target for many steps (its TALR
  starts where the low-bit layers' does). Give the same ``max_bits`` to
  :func:`param_labels` so that those layers get the float partition's LR schedule
  (a leaf left out of ``codes_fn`` passes through ``tr_schedule`` unscheduled).

  The frozen weight scales are read from the model's layers each time the function
  is called, not when it is made: an optimizer built before the scales are set (an
  orbax restore with ``nnx.update``, :func:`init_weight_scales`,
  :func:`trquant.export.load_integer`) uses the new ones. Inside ``nnx.jit`` /
  ``jax.jit`` they are read when the step is traced and then stay fixed in that
  trace, as any value a jitted function reads from outside its arguments: change the
  scales before the first call of a jitted train step, or, if a step already ran
  (an in-process restore), trace it again (call ``jax.clear_caches()``, or wrap the
  step function in a new ``nnx.jit``).

  Args:
    model: an NNX model of trquant layers.
    max_bits: leave out layers quantized to more bits (e.g. 4: 8-bit layers are not
      scheduled); None (default) keeps every quantized layer.

  Returns:
    ``codes_fn(params) -> tree`` of integer codes (None where not quantized).

  Raises:
    ValueError: if the model has no trquant layer with quantized weights (build it
      from trquant layers, or make it with :func:`trquant.nnx.quantize_model`), ``max_bits``
      is not a positive int or leaves every layer out, or a
      quantized layer learns its weight scale (``weight_quantizer="lsq"``): TR scheduling needs frozen weight
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
  scales = _ModelScales(model, "TR scheduling", max_bits)
  model_codes_fn = _per_kernel_fn(
      scales, lambda leaf, layer, scale: quantizers.quantize(leaf, scale, bits=layer.kernel.bits,
                                                             **layer.weight_group))
  # tr_schedule's windup guard reads which weights are beyond the grid from it.
  setattr(model_codes_fn, "saturation_fn", _per_kernel_fn(scales, _beyond_grid))
  return model_codes_fn


def _beyond_grid(leaf, layer, scale):
  """True where ``leaf / scale`` lies outside the layer's grid ``[lo, hi]``."""
  kernel = layer.kernel
  lo, hi = quantizers.quant_range(kernel.bits, signed=kernel.signed, narrow=kernel.narrow)
  scale = layer.broadcast_weight_scale(scale)  # per-group scales repeated over their groups
  ratio = leaf.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
  return (ratio < lo) | (ratio > hi)


def scale_fn(model: nnx.Module, *, max_bits: Optional[int] = None) -> Callable[[Any], Any]:
  """Returns ``scale_fn`` for :func:`trquant.freeze_oscillations` from an NNX model.

  The companion of :func:`codes_fn`: the same tree (the structure of the params
  that ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` passes, also under
  ``optax.partition``) with every quantized kernel's frozen step size (a scalar,
  or a keep-dims array for per-channel scales) and None elsewhere, so that the
  bin centre of code ``c`` is ``c * scale``. As for :func:`codes_fn`, the scales
  are read from the model's layers each time the function is called (inside a
  jitted step: when it is traced). ``max_bits`` leaves out the layers that
  :func:`codes_fn` with the same ``max_bits`` leaves out.

  Raises:
    ValueError: if the model has no trquant layer with quantized weights (with at most
      ``max_bits`` bits), or a quantized layer learns its weight scale
      (``weight_quantizer="lsq"``): a moving scale would move frozen weights off their
      grid points.
  """
  # Per-group scales come repeated over their groups: the bin centre is code * scale.
  return _per_kernel_fn(_ModelScales(model, "freezing", max_bits),
                        lambda leaf, layer, scale: layer.broadcast_weight_scale(scale))


def layer_names(model: nnx.Module, *, wrt: filterlib.Filter = nnx.Param,
                max_bits: Optional[int] = None) -> list:
  """The ``"/"``-joined paths of the layers whose kernels :func:`codes_fn` quantizes.

  In the order of the per-layer vectors of :func:`trquant.tr_schedule`,
  :func:`trquant.track_oscillations` and :func:`trquant.freeze_oscillations` (the
  tree order of the quantized kernels), with the same ``max_bits`` as the
  ``codes_fn`` they were given.

  Example:
    >>> import trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(trquant.nnx.QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0)),
    ...                        trquant.nnx.QuantLinear(2, 2, weight_bits=None, rngs=nnx.Rngs(1)))
    >>> trquant.nnx.layer_names(model)
    ['layers/0']
  """
  params = traversal.values(nnx.state(model, wrt))
  codes = jax.eval_shape(codes_fn(model, max_bits=max_bits), params)
  names = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(codes, is_leaf=lambda x: x is None)[0]:
    if leaf is not None:
      names.append(traversal.path_name(traversal.state_path(path)[:-1]))
  return names


def _by_layer(stats: dict, per_layer_fields, names) -> dict:
  """`stats` with each per-layer vector turned into ``{layer name: value}``."""
  keyed = dict(stats)
  for field in per_layer_fields:
    value = stats.get(field)
    if value is None:
      continue
    if value.shape[0] == 1 and len(names) != 1:
      keyed[field] = {"all layers": value[0]}  # one group over every layer (per_layer=False)
      continue
    if value.shape[0] != len(names):
      raise ValueError(
          f"`{field}` has {value.shape[0]} entries but the model has {len(names)} quantized"
          " layers: pass the `max_bits` the transform's codes_fn was made with.")
    keyed[field] = dict(zip(names, value))
  return keyed


TRANSITION_FIELDS = ("tr_step", "target_transition_rate", "measured_transition_rate",
                     "running_transition_rate", "talr_multiplier")
_PER_LAYER_TRANSITION_FIELDS = ("measured_transition_rate", "running_transition_rate",
                                "talr_multiplier")


def transition_stats(optimizer: nnx.Optimizer, *, model: Optional[nnx.Module] = None,
                     max_bits: Optional[int] = None) -> dict:
  """Arrays of the :func:`trquant.tr_schedule` state held by an ``nnx.Optimizer``.

  Args:
    optimizer: an ``nnx.Optimizer`` whose transform holds one ``tr_schedule``.
    model: the optimizer's model, to key the per-layer values by layer name
      (:func:`layer_names`); None leaves them as vectors in tree order.
    max_bits: the ``max_bits`` of the ``codes_fn`` given to ``tr_schedule``.

  Returns:
    ``{field: array}`` for the fields of :class:`trquant.TransitionRateState`
    (snapshots, safe to return from ``nnx.jit`` and to keep per step). With
    ``model``, ``measured_transition_rate``, ``running_transition_rate`` and
    ``talr_multiplier`` are ``{layer name: value}`` (``{"all layers": value}`` with
    ``per_layer=False``).

  Raises:
    ValueError: if the optimizer has no (or several) ``tr_schedule`` in its chain.
  """
  state = traversal.values(optimizer.opt_state)
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
  if model is not None:
    stats = _by_layer(stats, _PER_LAYER_TRANSITION_FIELDS, layer_names(model, max_bits=max_bits))
  return stats


OSCILLATION_FIELDS = ("osc_step", "oscillation_count", "oscillating_fraction")
FREEZE_FIELDS = ("freeze_threshold", "frozen_fraction")


def oscillation_stats(optimizer: nnx.Optimizer, *, model: Optional[nnx.Module] = None,
                      max_bits: Optional[int] = None) -> dict:
  """Per-layer arrays of the oscillation tracker (or freezer) held by an ``nnx.Optimizer``.

  Args:
    optimizer: an ``nnx.Optimizer`` whose transform holds one oscillation transform.
    model: the optimizer's model, to key the per-layer values by layer name
      (:func:`layer_names`); None leaves them as vectors in tree order.
    max_bits: the ``max_bits`` of the transform's ``codes_fn``.

  Returns:
    ``{field: array}`` (snapshots) for ``osc_step``, ``oscillation_count`` and
    ``oscillating_fraction`` of :func:`trquant.track_oscillations` or
    :func:`trquant.freeze_oscillations`, plus ``freeze_threshold`` and
    ``frozen_fraction`` for the latter. Per-layer vectors follow the tree order of
    the quantized kernels, or, with ``model``, are ``{layer name: value}``.

  Raises:
    ValueError: if the optimizer has no (or several) oscillation transforms in its chain.
  """
  state = traversal.values(optimizer.opt_state)
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
  if model is not None:
    stats = _by_layer(stats, ("oscillation_count", "oscillating_fraction", "frozen_fraction"),
                      layer_names(model, max_bits=max_bits))
  return stats


def model_dampening_loss(model: nnx.Module, *, aggregation: str = "kernel_mean") -> jax.Array:
  """The oscillation-dampening loss summed over every quantized layer of an NNX model.

  For each trquant layer (:class:`QuantLinear`, :class:`QuantConv`, ...) with ``weight_bits`` set:
  :func:`trquant.dampening_loss` of its kernel with its current weight scale and
  grid. Call it inside the loss function differentiated by ``nnx.grad``, weighted
  by :func:`trquant.dampening_weight_schedule`::

    loss = task_loss + lam(step) * trquant.nnx.model_dampening_loss(model)

  Returns:
    A float32 scalar.

  Raises:
    ValueError: if the model has no trquant layer with quantized weights (the loss
      would be a constant 0): build it from trquant layers with ``weight_bits`` set.
  """
  total = jnp.zeros([], jnp.float32)
  for _, layer in traversal.require_quant_layers(model, "model_dampening_loss", quantized_weights=True):
    kernel = layer.kernel
    total = total + dampening.dampening_loss(
        kernel.get_value(), layer.broadcast_weight_scale(), bits=kernel.bits,
        signed=kernel.signed, narrow=kernel.narrow, aggregation=aggregation)
  return total


def param_labels(model: nnx.Module, *, wrt: filterlib.Filter = nnx.Param,
                 quant_label: str = "quant", float_label: str = "float",
                 max_bits: Optional[int] = None) -> nnx.State:
  """Label tree for ``optax.partition``: quantized kernels vs every other parameter.

  Args:
    model: an NNX model.
    wrt: the filter passed to ``nnx.Optimizer`` (default ``nnx.Param``).
    quant_label, float_label: the labels.
    max_bits: kernels quantized to more bits get ``float_label`` (as
      :func:`codes_fn` with the same ``max_bits`` leaves them out); None: every
      quantized kernel gets ``quant_label``.

  Returns:
    An ``nnx.State`` with the structure of ``nnx.state(model, wrt)`` holding
    ``quant_label`` for :class:`QuantWeight` variables with ``bits`` set and
    ``float_label`` for the rest (biases, BatchNorm, learned scales, FP layers).
    Its leaves are the labels themselves, as ``optax.partition`` needs them: a
    label tree made from ``nnx.state(model, ...)`` by ``jax.tree.map`` keeps the
    ``nnx.Variable`` around each label and fails inside the optimizer's update with
    a pytree-structure error (``Param`` against an array or a tracer). Make other
    labels from this tree (``jax.tree.map(f, param_labels(model))``), or pass such a
    tree through :func:`values` first, which unwraps the Variables.
  """
  _check_max_bits(max_bits)
  state = nnx.state(model, wrt)

  def label(variable):
    if (isinstance(variable, QuantWeight) and variable.bits is not None
        and (max_bits is None or variable.bits <= max_bits)):
      return quant_label
    return float_label

  return jax.tree.map(label, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
