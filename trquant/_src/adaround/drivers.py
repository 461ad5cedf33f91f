"""Post-training quantization of an NNX model: round to nearest, AdaRound, BRECQ / QDrop.

:func:`round_to_nearest` and :func:`reconstruct_model` quantize a copy of a model as its
trquant layers say (:class:`trquant.nnx.QuantLinear`, ``QuantConv``,
``QuantLinearGeneral``, ``QuantEinsum``): the bits, scale granularity and input
quantization that the rules of ``trquant.nnx.quantize_model(model, rules)`` gave them, the
same rules QAT uses (transformers included). ``reconstruct_model`` is AdaRound with
``granularity="layer"``, BRECQ with ``"block"``, QDrop with ``config.drop_prob``. Each
returns a :class:`ModelResult` ``(model, reports)``: the new model and one
:class:`UnitReport` per reconstructed unit.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from trquant._src import checks
from trquant._src import quantizers
from trquant._src.adaround import data
from trquant._src.adaround import reconstruction
from trquant._src.adaround import units as unit_lib
from trquant._src.adaround.config import AdaRoundConfig
from trquant._src.adaround.config import check_config
from trquant._src.nnx import graph

__all__ = ["ModelResult", "UnitReport", "reconstruct_model", "round_to_nearest"]


class UnitReport(NamedTuple):
  """What :func:`reconstruct_model` did to one unit (a layer, or a block of layers)."""

  name: str  # the unit's path in the model, "/"-joined ("<root>" for the model itself)
  layers: tuple  # paths of the unit's trquant layers
  weight_bits: tuple  # weight bit width of each of those layers
  capture_seconds: float  # wall time to collect the unit's inputs and outputs
  seconds: float  # wall time of the reconstruction (compilation included)
  nearest_error: float  # output error of the unit with nearest rounding and initial scales
  reconstructed_error: float  # the same after reconstruction (kept or not)
  flipped_fraction: float  # fraction of the unit's codes that differ from round-to-nearest
  kept_nearest: bool = False  # reconstruction ended worse than nearest: nearest was kept


class ModelResult(NamedTuple):
  """What the model drivers return: the quantized model and one report per unit.

  A NamedTuple: ``q, reports = trquant.adaround.reconstruct_model(...)`` unpacks it, or
  take ``.model`` alone.
  """

  model: object  # the new quantized NNX model (the input model is not modified)
  reports: list  # a UnitReport per unit, in call order (empty for round_to_nearest)


# Model inputs (N, ...), or an iterable of batches or of (inputs, labels) tuples.
CalibrationBatches = Union[ArrayLike, Iterable[Any]]

# The arguments the drivers took before the model's rules said what is quantized.
_RULE_ARGUMENTS = ("weight_bits", "per_channel", "first_last", "act_bits", "example_input")


def _check_no_rule_arguments(driver: str, arguments: dict) -> None:
  """A ValueError naming the rules route for quantization arguments given to a driver."""
  if not arguments:
    return
  names = sorted(arguments)
  if "apply_fn" in names:
    raise TypeError(f"{driver}() takes forward_fn=(model, batch) -> output, not apply_fn (the"
                    " name trquant keeps for pure functions of arrays, as in reconstruct_layer).")
  ruled = [name for name in names if name in _RULE_ARGUMENTS]
  if not ruled:
    raise TypeError(f"{driver}() got unexpected keyword arguments {names}.")
  raise ValueError(
      f"{driver}() takes no {ruled}: what is quantized, and how, is the model's, as the rules"
      " of trquant.nnx.quantize_model set it (the same rules as for QAT). Quantize the float"
      f" model first, e.g. q = trquant.nnx.quantize_model(model, [trquant.nnx.first_last_rule("
      "model, x[:1], weight_bits=8, act_bits=8, signed_act=True),"
      " trquant.nnx.QuantRule(weight_bits=4, per_channel=True)]), then"
      f" trquant.adaround.{driver}(q, ...)"
      + ("; calibration data is the second argument." if "example_input" in ruled else "."))


def _progress_bar(total: int, desc: str):
  """A tqdm bar over the layers or units, or None where tqdm (optional) is missing."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, leave=False)


def _without_float_units(units, plan) -> list:
  """The units minus those holding only layers kept in full precision; a ValueError for a
  unit that holds one of those and quantized layers too."""
  float_names = [p.name for p in plan if p.weight_bits is None]
  if not float_names:
    return units
  kept = []
  for unit in units:
    floats = [layer for layer in float_names if unit_lib.unit_holds(unit, layer)]
    quantized = [p.name for p in plan
                 if p.weight_bits is not None and unit_lib.unit_holds(unit, p.name)]
    if floats and quantized:
      raise ValueError(
          f"unit {unit_lib.unit_name(unit)!r} holds {floats} (weight_bits=None: kept in full"
          f" precision) and the quantized {quantized[:3]}; reconstruction would round them"
          " all. Give `blocks` that put the full-precision layers in units of their own, or"
          " granularity='layer'.")
    if not floats:
      kept.append(unit)
  return kept


def round_to_nearest(model: nnx.Module,
                     calibration_batches: Optional[CalibrationBatches] = None, *,
                     forward_fn: Optional[Callable] = None, **retired: Any) -> ModelResult:
  """Post-training round-to-nearest quantization of a quantized NNX model (the baseline).

  What is quantized is the model's, as :func:`trquant.nnx.quantize_model` set it from the
  rules (or as its trquant layers were built): every trquant layer with ``weight_bits`` of a
  copy of ``model`` gets a frozen step size from its float kernel (the layer's
  ``scale_method``, MSE by default; per tensor, per output channel or per group as the
  layer says), the same step sizes :func:`reconstruct_model` starts from; layers with
  ``weight_bits=None`` stay in full precision. Layers that quantize their inputs with a
  learned (LSQ) step size get one by MSE search on the full-precision inputs of the first
  calibration batch (signed where those inputs have negative values), as
  :func:`reconstruct_model` initialises them. ``model`` itself is not modified.

  Args:
    model: an NNX model of trquant layers whose kernels are the float weights, e.g.
      ``trquant.nnx.quantize_model(float_model, rules)``.
    calibration_batches: model inputs ``(N, ...)`` or an iterable of batches; needed when
      a layer quantizes its inputs with a learned step size (only the first batch is used),
      otherwise optional.
    forward_fn: ``(model, batch) -> output``, how the forward pass is run on a calibration
      batch; default ``model(batch)``. E.g. ``lambda m, x: m(x, rngs=None)``.

  Returns:
    A :class:`ModelResult` ``(model, reports)``: the new quantized model and no reports
    (nothing is measured).

  Raises:
    ValueError: for a model without trquant layer or without a layer whose weights are
      quantized, bad bits, a non-callable ``forward_fn``, input quantization without
      calibration data, or the quantization arguments drivers took before the rules
      (``weight_bits``, ``first_last``...: the message says how to write it now).

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    >>> ruled = trquant.nnx.quantize_model(fp, trquant.nnx.QuantRule(weight_bits=4))
    >>> q = trquant.adaround.round_to_nearest(ruled).model
    >>> q.layers[0].weight_bits, float(jnp.abs(q.layers[0].quantized_kernel()
    ...                                         - fp.layers[0].kernel[...]).max()) > 0
    (4, True)
  """
  _check_no_rule_arguments("round_to_nearest", retired)
  forward = checks.check_forward_fn(forward_fn)
  batches = None if calibration_batches is None else data.calibration_list(calibration_batches)
  learned_inputs = unit_lib.needs_act_scales(model)
  if batches is None and learned_inputs:
    raise ValueError("the model quantizes layer inputs with learned (LSQ) step sizes:"
                     " round_to_nearest needs `calibration_batches` to set them.")
  fp, work, plan = unit_lib.quantization_plan(model, batches, forward=forward)
  if batches is not None and learned_inputs:
    unit_lib.quantize_activations(fp, plan, batches[0], forward=forward)
  return ModelResult(work, [])


def reconstruct_model(model: nnx.Module, calibration_batches: CalibrationBatches, *,
                      config: AdaRoundConfig = AdaRoundConfig(), granularity: str = "block",
                      blocks: Optional[Sequence[str]] = None,
                      activation: Optional[Callable] = None,
                      fallback_to_nearest: bool = True, key: jax.Array, progress: bool = True,
                      forward_fn: Optional[Callable] = None, **retired: Any) -> ModelResult:
  """Post-training quantization by reconstruction: AdaRound, BRECQ, QDrop.

  What is quantized is the model's, as :func:`trquant.nnx.quantize_model` set it from the
  rules (the same rules as for QAT; or as its trquant layers were built): each trquant
  layer's ``weight_bits`` (None: left in full precision, not reconstructed),
  ``per_channel`` / ``group_size`` (per-tensor, per-channel or per-group step sizes) and
  input quantization (``act_bits``). On a copy of ``model``:

  1. weights: every layer with ``weight_bits`` gets a frozen step size from its float
     kernel (the layer's ``scale_method``, MSE by default); every layer that quantizes its
     inputs with a learned (LSQ) step size gets one by MSE search on its full-precision
     inputs of the first calibration batch, signed where those have negative values
     (dynamic per-token input quantizers need none);
  2. units, in the order the forward pass calls them: ``granularity="layer"`` makes every
     layer a unit (AdaRound); with ``granularity="block"`` and ``blocks=None``, the
     model's children that hold trquant layers, with ``nnx.List`` containers opened up
     (ResNet-20: the stem, each residual block, the head; a ViT: each transformer block
     and the layers around them), or the sub-modules whose ``"/"``-joined paths ``blocks``
     names (layers outside them form units of their own) (BRECQ);
  3. for each unit, its input ``x_q`` in the quantized model so far, its input ``x_fp`` and
     output ``y_fp`` in the full-precision model, and
     :func:`trquant.adaround.reconstruct_block` learns the rounding of all the unit's
     kernels and its activation step sizes jointly, against the unit's output
     (BatchNorm in evaluation mode; for a conv followed by BatchNorm, a layer unit's
     target is the pre-BatchNorm output); ``config.drop_prob = 0.5`` is QDrop (on the
     unit's input and on every quantized input inside it);
  4. with ``fallback_to_nearest``, a unit whose output error on the calibration data
     ends larger than with nearest rounding and the initial activation step sizes
     keeps those instead (short budgets, 8-bit layers where nearest is already close).

  Memory: the working copy shares the float kernels of ``model`` until a unit's
  reconstructed kernels replace them, and one unit is reconstructed at a time, so beside
  the model and the calibration data the peak is the kernels reconstructed so far, one
  unit's captured activations over the calibration data (its quantized input and
  full-precision output; its full-precision input too with QDrop) and one eager forward
  pass over one calibration batch (smaller batches lower it).

  Units are recorded by replacing them in their parent for one eager pass per batch,
  so the model's ``__call__`` must run eagerly and a unit must take one array input;
  keyword arguments that are not arrays (``out_sharding=None``, as
  ``nnx.MultiHeadAttention`` calls its projections; ``deterministic=True``) are
  recorded and passed again during reconstruction. A model called with keyword
  arguments itself (``rngs=None``, ``cache=``, ``segment_ids=``) is run through
  ``forward_fn``; a model whose only child holds all the layers (a wrapper) is opened up
  into that child's units.

  Args:
    model: an NNX model of trquant layers whose kernels are the float weights, e.g.
      ``trquant.nnx.quantize_model(float_model, rules)``. It is not modified.
    calibration_batches: model inputs ``(N, ...)`` or an iterable of batches (or of
      ``(inputs, labels)`` tuples), e.g. 1024 training images in batches of 256.
    config: the optimisation hyper-parameters (``iters`` per unit; ``drop_prob`` for
      QDrop, which needs quantized inputs; ``act_lr`` for the activation step sizes), an
      :class:`trquant.adaround.AdaRoundConfig`.
    granularity: ``"layer"`` (AdaRound) or ``"block"`` (BRECQ).
    blocks: None (automatic), or a list of module paths (e.g. ``["blocks/0"]``).
    activation: ``f_a`` in the loss, applied to a unit's output and its target, or None.
    fallback_to_nearest: never leave a unit worse than nearest rounding (step 4).
    key: a jax PRNG key; unit ``i`` uses ``fold_in(key, i)``.
    progress: a tqdm progress bar over the units (if tqdm is installed).
    forward_fn: ``(model, batch) -> output``, how the forward pass is run on a
      calibration batch; default ``model(batch)``. E.g. ``lambda m, x: m(x,
      rngs=None)``, or ``lambda m, tokens: m(tokens, cache=None, segment_ids=None)``.

  Returns:
    A :class:`ModelResult` ``(model, reports)``: a new model with the reconstructed
    weights (kernel ``= scale * codes``, a frozen :class:`trquant.nnx.WeightScale`) and
    the learned input step sizes; one :class:`UnitReport` per unit in call order.

  Raises:
    ValueError: for a model without a layer whose weights are quantized, bad bits,
      granularity, blocks (a path that is not a module, holds no trquant layer, overlaps
      another, or holds full-precision and quantized layers together), ``drop_prob > 0``
      without quantized inputs, calibration data, a unit not called eagerly, called with
      several inputs or an array keyword argument, a non-callable ``forward_fn``, a
      ``config`` that is not an :class:`trquant.adaround.AdaRoundConfig`, or the
      quantization arguments drivers took before the rules (``weight_bits``,
      ``first_last``...: the message says how to write it now).

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.relu,
    ...                                nnx.Linear(16, 16, rngs=rngs), nnx.relu)
    ...     self.head = nnx.Linear(16, 4, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(self.body(x))
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> model = trquant.nnx.quantize_model(Net(nnx.Rngs(0)), [
    ...     trquant.nnx.QuantRule("head", weight_bits=8, act_bits=8),
    ...     trquant.nnx.QuantRule(weight_bits=3, act_bits=4)])
    >>> q, reports = trquant.adaround.reconstruct_model(
    ...     model, x, config=trquant.adaround.AdaRoundConfig(iters=50),
    ...     key=jax.random.key(1), progress=False)
    >>> [(r.layers, r.weight_bits) for r in reports], q.head.act_bits
    ([(('body/layers/0', 'body/layers/2'), (3, 3)), (('head',), (8,))], 8)
  """
  _check_no_rule_arguments("reconstruct_model", retired)
  config = check_config(config)
  batches = data.calibration_list(calibration_batches)
  forward = checks.check_forward_fn(forward_fn)
  if granularity not in unit_lib.GRANULARITIES:
    raise ValueError(f"`granularity` must be one of {unit_lib.GRANULARITIES}, got"
                     f" {granularity!r}.")
  learned_inputs = unit_lib.needs_act_scales(model)
  if config.drop_prob > 0 and not learned_inputs:
    raise ValueError("`config.drop_prob` > 0 (QDrop) drops input quantization at random: it"
                     " needs layers that quantize their inputs (a rule with act_bits).")
  fp, work, plan = unit_lib.quantization_plan(model, batches, forward=forward)
  units = unit_lib.find_units(work, granularity, blocks)
  by_name = {p.name: p for p in plan}
  order = [p.name for p in plan]  # layers in call order
  if learned_inputs:
    unit_lib.quantize_activations(fp, plan, batches[0], forward=forward)

  def first_call(unit):
    names = [i for i, layer in enumerate(order) if unit_lib.unit_holds(unit, layer)]
    return min(names) if names else len(order)

  units.sort(key=first_call)
  units = _without_float_units(units, plan)
  bar = _progress_bar(len(units), "reconstruct") if progress else None
  reports = []
  try:
    for index, unit in enumerate(units):
      if bar is not None:
        bar.set_postfix_str(unit_lib.unit_name(unit))
      # One unit at a time, in a function of its own: its captured activations, rounding
      # variables and candidate weights are freed before the next unit's are captured.
      reports.append(_reconstruct_unit(
          fp, work, unit, by_name, batches, config=config, activation=activation,
          fallback_to_nearest=fallback_to_nearest, key=jax.random.fold_in(key, index),
          forward=forward))
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()
  return ModelResult(work, reports)


def _reconstruct_unit(fp, work, unit, by_name, batches, *, config, activation,
                      fallback_to_nearest, key, forward) -> UnitReport:
  """Reconstructs one unit of ``work`` in place (its kernels and input step sizes)."""
  name = unit_lib.unit_name(unit)
  start = time.perf_counter()
  x_q = data.unit_data(work, unit, batches, name=f"unit {name}", forward_fn=forward).inputs
  fp_data = data.unit_data(fp, unit, batches, name=f"unit {name}", forward_fn=forward)
  y_fp, unit_kwargs = fp_data.outputs, fp_data.kwargs
  # Only QDrop reads the full-precision inputs: otherwise they are not kept.
  x_fp = fp_data.inputs if config.drop_prob > 0 else None
  del fp_data
  captured_at = time.perf_counter()
  work_unit = graph.module_at(work, unit)
  # The model itself as a unit runs as forward_fn runs it; a sub-module as its parent
  # called it, with the keyword arguments recorded.
  call = forward if not unit else (lambda module, x, kwargs=unit_kwargs: module(x, **kwargs))
  unit_fn, kernel_layers, act_layers = unit_lib.unit_apply_fn(
      work_unit, config.drop_prob, patches=unit_lib.scan_on_cpu(config.loop), call=call)
  prefix = name + "/" if unit else ""
  kernel_names = [prefix + "/".join(map(str, p)) if p else name for p in kernel_layers]
  act_names = [prefix + "/".join(map(str, p)) if p else name for p in act_layers]
  entries = [by_name[n] for n in kernel_names]
  weights = [p.fp_layer.kernel.get_value() for p in entries]
  scales = [p.work_layer.broadcast_weight_scale(p.scale) for p in entries]
  layer_bits = [p.weight_bits for p in entries]
  act_layers_work = [by_name[n].work_layer for n in act_names]
  act_scales = [layer.act_scale.get_value() for layer in act_layers_work]
  nearest_codes = [quantizers.quantize(w, s, bits=b)
                   for w, s, b in zip(weights, scales, layer_bits)]
  nearest = [quantizers.dequantize(c, s).astype(w.dtype)
             for c, s, w in zip(nearest_codes, scales, weights)]
  result = reconstruction.reconstruct_block(
      unit_fn, weights, scales, x_q, y_fp, weight_bits=layer_bits, config=config,
      act_scales=act_scales if act_scales else None,
      x_fp=x_fp, activation=activation, key=key)
  jax.block_until_ready(result.weights)
  done = time.perf_counter()
  learned = list(result.act_scales) if act_scales else []
  nearest_error, reconstructed_error = reconstruction.block_errors(
      unit_fn, [(nearest, act_scales), (result.weights, learned)], x_q, y_fp,
      activation=activation)
  keep_nearest = bool(fallback_to_nearest) and reconstructed_error > nearest_error
  final_weights, final_acts = ((nearest, act_scales) if keep_nearest
                               else (result.weights, learned))
  final_codes = nearest_codes if keep_nearest else result.codes
  for planned, weight in zip(entries, final_weights):
    planned.work_layer.kernel.set_value(
        unit_lib.put_like(weight, planned.work_layer.kernel.get_value()))
  for layer, scale in zip(act_layers_work, final_acts):
    layer.act_scale.set_value(scale)
  flipped = sum(float(jnp.sum(c != n)) for c, n in zip(final_codes, nearest_codes))
  total = sum(int(np.size(c)) for c in nearest_codes)
  return UnitReport(name, tuple(kernel_names), tuple(layer_bits), captured_at - start,
                    done - captured_at, nearest_error, reconstructed_error,
                    flipped / max(total, 1), keep_nearest)
