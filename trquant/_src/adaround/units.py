"""The units of reconstruction in an NNX model and how each is set up and run.

* :func:`float_copy` / :func:`quantization_plan`: the full-precision reference and the
  working copy whose trquant layers get frozen step sizes for the bits the model's rules
  gave them, in call order;
* :func:`quantize_activations`: the LSQ input step sizes of the working layers, by MSE
  search on the full-precision inputs;
* :func:`find_units`: the units (``granularity`` ``"layer"`` or ``"block"``, automatic
  or named ``blocks``);
* :func:`layer_apply_fn` and :func:`unit_apply_fn`: a layer as ``(w, x) -> output`` and a
  unit as ``(weights, act_scales, x, key) -> output`` (QDrop through
  :func:`qdrop_hook`), the pure functions :mod:`trquant._src.adaround.reconstruction` learns.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from trquant._src.nnx import capturing
from trquant._src.nnx import layers as nnx_layers
from trquant._src import quantizers
from trquant._src.adaround import data
from trquant._src.adaround import loop as loops
from trquant._src.adaround import rounding
from trquant._src.nnx import graph
from trquant._src.nnx import traversal as nnx_traversal

__all__ = [
    "GRANULARITIES", "PlannedLayer", "find_units", "float_copy", "layer_apply_fn",
    "needs_act_scales", "put_like", "qdrop_hook", "quantization_plan", "quantize_activations",
    "scan_on_cpu", "unit_apply_fn", "unit_holds", "unit_name",
]

GRANULARITIES = ("block", "layer")

# Containers that their parent iterates (never called themselves): opened up into their items.
_CONTAINERS = (nnx.List,)


class PlannedLayer(NamedTuple):
  """One trquant layer of :func:`quantization_plan`, in call order."""

  name: str  # its "/"-joined path
  fp_layer: Any  # the layer in the full-precision copy
  work_layer: Any  # the layer in the working copy (quantized weights)
  weight_bits: Any  # int, or None for a layer the model keeps in full precision
  scale: Any  # its weight step size as the layer stores it (per-group: one per group, not
  # repeated over the kernel: a whole-model copy otherwise); None in full precision


def unit_name(path) -> str:
  """A module path ``"/"``-joined, ``"<root>"`` for the model itself."""
  return "/".join(map(str, path)) or "<root>"


def unit_holds(unit, layer: str) -> bool:
  """Whether the unit at module path ``unit`` holds the layer named ``layer`` (a
  :class:`PlannedLayer` name); the model itself (the empty path) holds every layer."""
  name = unit_name(unit)
  return not unit or layer == name or layer.startswith(name + "/")


def check_model(model) -> list:
  """The model's trquant layers, or a ValueError saying how to get some."""
  if not isinstance(model, nnx.Module):
    raise ValueError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  layers = nnx_traversal.quant_layers(model)
  if not layers:
    raise ValueError("the model has no trquant.nnx layer (QuantLinear, QuantConv,"
                     " QuantLinearGeneral, QuantEinsum) to quantize. To quantize a plain NNX"
                     " model, make its layers trquant layers in full precision first:"
                     " trquant.nnx.quantize_model(model, trquant.nnx.QuantRule()).")
  return layers


def float_copy(model):
  """A clone of ``model`` in evaluation mode whose trquant layers compute in full precision
  (kernels and inputs unquantized)."""
  fp = nnx.clone(model)
  for _, layer in nnx_traversal.quant_layers(fp):
    layer.kernel.set_metadata(bits=None)
    layer.act_bits = None
  fp.eval()
  return fp


def _set_quantized(layer, scale) -> None:
  """Makes `layer` quantize its kernel (float weights) with the frozen step size `scale`."""
  layer.kernel.set_metadata(signed=True, narrow=False)
  layer.weight_scale = nnx.data(nnx_layers.WeightScale(jnp.asarray(scale, jnp.float32)))


def put_like(value, reference):
  """`value` on `reference`'s sharding: a reconstructed kernel goes back where the model
  keeps its kernel (reconstruction may hold it replicated)."""
  if isinstance(reference, jax.Array) and isinstance(value, jax.Array):
    return jax.device_put(value, reference.sharding)
  return value


def _no_weight_quantization_message(layers) -> str:
  names = ", ".join(unit_name(path) for path, _ in layers[:6])
  return ("no trquant layer of the model quantizes its weights (weight_bits is None in"
          f" {names}{' ...' if len(layers) > 6 else ''}). Post-training quantization reads the"
          " bits from the model: quantize it first, e.g. trquant.nnx.quantize_model(model,"
          " [trquant.nnx.first_last_rule(model, x[:1], weight_bits=8, act_bits=8,"
          " signed_act=True), trquant.nnx.QuantRule(weight_bits=4)]).")


def quantization_plan(model, batches, *, forward):
  """Validates; returns ``(fp copy, working copy, [PlannedLayer, ...])``.

  Each layer's quantization is the model's: its ``weight_bits`` (None: kept in full
  precision, planned with ``weight_bits=None`` and no scale), ``per_channel`` and
  ``group_size``, as :func:`trquant.nnx.quantize_model` set them from the rules. The
  working layer gets a frozen step size from its kernel (the layer's ``scale_method``,
  MSE by default); the plan holds that scale as the layer stores it (one per group for
  per-group scales; ``work_layer.broadcast_weight_scale`` repeats it over the kernel when
  its unit is reconstructed, so the plan never holds a kernel-sized scale per layer). The
  layers come in the order one forward pass on ``batches[0]`` calls them (layers it never
  calls after, in tree order; tree order when ``batches`` is None).
  """
  layers = check_model(model)
  if all(layer.weight_bits is None for _, layer in layers):
    raise ValueError(_no_weight_quantization_message(layers))
  fp, work = float_copy(model), nnx.clone(model)
  work.eval()
  fp_layers = nnx_traversal.quant_layers(fp)
  work_layers = dict(nnx_traversal.quant_layers(work))
  names = {id(layer): path for path, layer in fp_layers}
  if batches is not None:
    # The whole first batch, not one row of it: a batch sharded over a mesh axis cannot be
    # cut to one row, and a model may shard (or reshape) its batch inside.
    order = data.call_order(fp, [layer for _, layer in fp_layers], batches[0], forward)
    called = {id(layer) for layer in order}
    # Layers the forward pass never calls keep their tree order, after the called ones.
    order += [layer for _, layer in fp_layers if id(layer) not in called]
  else:
    order = [layer for _, layer in fp_layers]
  plan = []
  for fp_layer in order:
    path = names[id(fp_layer)]
    work_layer = work_layers[path]
    layer_bits = work_layer.weight_bits
    if layer_bits is None:
      plan.append(PlannedLayer(unit_name(path), fp_layer, work_layer, None, None))
      continue
    rounding.weight_grid(layer_bits, True, f"weight_bits of {unit_name(path)}")
    kernel = fp_layer.kernel.get_value()
    work_layer.weight_quantizer = "fixed"  # PTQ freezes the scale (an LSQ rule's included)
    scale = work_layer.initial_weight_scale(kernel, work_layer.scale_method)
    _set_quantized(work_layer, scale)
    plan.append(PlannedLayer(unit_name(path), fp_layer, work_layer, layer_bits, scale))
  return fp, work, plan


def _set_act_scale(layer, *, signed: bool, scale) -> None:
  """Makes `layer` quantize its inputs (LSQ) with step size `scale`."""
  layer.signed_act = bool(signed)
  layer.act_scale = nnx.data(nnx_layers.ActScale(jnp.asarray(scale, jnp.float32)))


def _learns_input_scale(layer) -> bool:
  """Whether `layer` quantizes its input with a learned (LSQ) step size (a dynamic
  per-token quantizer takes none)."""
  return layer.act_bits is not None and getattr(layer, "act_quantizer", "lsq") == "lsq"


def needs_act_scales(model) -> bool:
  """Whether a trquant layer of ``model`` quantizes its input with a learned (LSQ) scale."""
  return any(_learns_input_scale(layer) for _, layer in nnx_traversal.quant_layers(model))


def quantize_activations(fp, plan, batch, *, forward) -> None:
  """Sets the LSQ input step sizes of the plan's working layers from the FP layers' inputs.

  Every working layer with ``act_bits`` and an LSQ input quantizer gets a step size by MSE
  search on its full-precision input on ``batch``, signed where that input has negative
  values; dynamic (per-token) input quantizers take none.
  """
  with capturing.capture_layers(fp) as captured:
    forward(fp, batch)
  for planned in plan:
    layer = planned.work_layer
    if not _learns_input_scale(layer):
      continue
    inputs = captured.inputs(planned.fp_layer)
    if not inputs:
      continue  # never called: its step size stays as it is
    x = inputs[0]
    signed = layer.signed_act is True or bool(jnp.min(x) < 0)  # False and "auto" alike
    scale = quantizers.init_scale(x, bits=layer.act_bits, method="mse", signed=signed)
    _set_act_scale(layer, signed=signed, scale=scale)


# ---------------------------------------------------------------------------------------
# Pure functions of the layers and units
# ---------------------------------------------------------------------------------------


def _patches(module) -> None:
  """Convolutions of ``module`` as patches @ kernel: on CPU, XLA runs a conv's kernel
  gradient inside ``lax.scan`` ~30x slower than outside one (a matmul's it does not)."""
  for _, layer in nnx_traversal.quant_layers(module):
    if isinstance(layer, nnx_layers.QuantConv):
      layer.patches_conv = True


def scan_on_cpu(loop: str) -> bool:
  """Whether a reconstruction runs as a ``lax.scan`` on CPU (then convs go as patches)."""
  return loops.check_loop(loop) == "scan" and jax.default_backend() == "cpu"


def layer_apply_fn(fp_layer, *, patches: bool = False):
  """``(w, x) -> fp_layer(x)`` with the kernel replaced by ``w`` (pure, differentiable).

  With ``patches``, a :class:`trquant.nnx.QuantConv` computes as patches @ kernel (a
  copy of the layer with ``patches_conv`` set): the same result up to float summation
  order, and on CPU a fast kernel gradient inside a ``lax.scan`` (the model drivers use
  it for ``loop="scan"`` on CPU).
  """
  if patches and isinstance(fp_layer, nnx_layers.QuantConv):
    fp_layer = nnx.clone(fp_layer)
    _patches(fp_layer)
  graphdef, kernel_state, rest = nnx.split(fp_layer, nnx_layers.QuantWeight, ...)  # type: ignore[misc]

  def apply_fn(w, x):
    return nnx.merge(graphdef, jax.tree.map(lambda _: w, kernel_state), rest)(x)

  return apply_fn


def qdrop_hook(key, drop_prob):
  """An ``input_quant_hook``: the full-precision input with probability ``drop_prob``."""

  def hook(layer, x, quantized):
    del layer
    return jnp.where(jax.random.bernoulli(key, drop_prob, x.shape), x, quantized)

  return hook


def unit_apply_fn(work_unit, drop_prob: float, *, patches: bool, call: Callable):
  """The unit as ``(kernels, act_scales, x, key) -> output`` and the paths of its leaves.

  A copy of the unit whose kernels are used as given (no weight quantization: the
  reconstruction passes soft or hard-rounded weights) and whose inputs are quantized
  with the given activation step sizes; with ``key`` and ``drop_prob > 0`` each
  quantized input keeps its full-precision value with probability ``drop_prob`` (QDrop).
  ``call(module, x)`` runs the unit as the model's forward pass does (its keyword
  arguments).

  Returns:
    ``(apply_fn, kernel_layers, act_layers)``: the function, and the paths inside the unit
    of the layers whose kernels / activation step sizes it takes, in its argument order.
  """
  unit = nnx.clone(work_unit)
  for _, layer in nnx_traversal.quant_layers(unit):
    layer.kernel.set_metadata(bits=None)
  if patches:
    _patches(unit)
  unit.eval()
  graphdef, kernels, acts, rest = nnx.split(  # type: ignore[misc]
      unit, nnx_layers.QuantWeight, nnx_layers.ActScale, ...)
  kernel_paths, kernel_def = jax.tree_util.tree_flatten_with_path(kernels)
  act_paths, act_def = jax.tree_util.tree_flatten_with_path(acts)

  def apply_fn(weights, act_scales, x, key):
    module = nnx.merge(graphdef, jax.tree.unflatten(kernel_def, list(weights)),
                       jax.tree.unflatten(act_def, list(act_scales or ())), rest)
    if key is not None and drop_prob > 0:
      for index, (_, layer) in enumerate(nnx_traversal.quant_layers(module)):
        layer.input_quant_hook = qdrop_hook(jax.random.fold_in(key, index), drop_prob)
    return call(module, x)

  # Leaf paths as the layers' paths inside the unit (without the trailing variable name).
  kernel_layers = [nnx_traversal.state_path(path)[:-1] for path, _ in kernel_paths]
  act_layers = [nnx_traversal.state_path(path)[:-1] for path, _ in act_paths]
  return apply_fn, kernel_layers, act_layers


# ---------------------------------------------------------------------------------------
# Finding the units
# ---------------------------------------------------------------------------------------


def find_units(model, granularity: str, blocks) -> list[tuple]:
  """The paths of the reconstruction units, in tree order.

  ``granularity="layer"``: every trquant layer. ``"block"`` with ``blocks=None``: the
  model's children holding trquant layers, ``nnx.List`` containers opened up (and a model
  that only wraps another opened up into that one's units); with ``blocks``, the modules
  those ``"/"``-joined paths name, then every layer outside them.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
  layer_paths = [tuple(path) for path, _ in nnx_traversal.quant_layers(model)]
  if granularity == "layer":
    return layer_paths
  if blocks is not None:
    if isinstance(blocks, str) or not isinstance(blocks, (list, tuple)):
      raise ValueError(f"`blocks` must be a list of module paths (e.g. ['blocks/0']), got"
                       f" {blocks!r}.")
    modules = {unit_name(path): tuple(path) for path, _ in nnx.iter_modules(model)}
    units = []
    for block in blocks:
      if block not in modules:
        raise ValueError(f"`blocks` names {block!r}, which is not a module of the model; its"
                         f" sub-modules include {sorted(m for m in modules if m)[:12]}.")
      if isinstance(graph.module_at(model, modules[block]), _CONTAINERS):
        raise ValueError(f"`blocks` names {block!r}, an nnx.List that its parent iterates"
                         " rather than calls: name its items (e.g. f'{block}/0') or a module"
                         " that calls them.")
      units.append(modules[block])
    for i, a in enumerate(units):
      if not any(path[:len(a)] == a for path in layer_paths):
        raise ValueError(f"block {unit_name(a)!r} holds no trquant layer to quantize.")
      for b in units[i + 1:]:
        if a[:len(b)] == b or b[:len(a)] == a:
          raise ValueError(f"blocks {unit_name(a)!r} and {unit_name(b)!r} overlap: give"
                           " disjoint blocks.")
    # Layers outside every named block are reconstructed on their own.
    rest = [p for p in layer_paths if not any(p[:len(u)] == u for u in units)]
    return units + rest
  # Automatic: the model's children holding trquant layers, nnx.List containers opened
  # up: ResNet-20's stem, its residual blocks and its head.
  units = []

  def visit(module, path):
    for key_path, child in list(nnx.iter_modules(module)):
      if len(key_path) != 1:
        continue
      child_path = path + tuple(key_path)
      if not any(p[:len(child_path)] == child_path for p in layer_paths):
        continue
      if isinstance(child, _CONTAINERS):
        visit(child, child_path)
      else:
        units.append(child_path)

  if isinstance(model, nnx_layers.QUANT_LAYERS):
    return [()]
  visit(model, ())
  # A model that only wraps another one (a module calling the model with its keyword
  # arguments): its one child would make the whole network one unit, so open it up.
  while len(units) == 1 and not isinstance(graph.module_at(model, units[0]), nnx_layers.QUANT_LAYERS):
    only = units.pop()
    visit(graph.module_at(model, only), only)
  return units
