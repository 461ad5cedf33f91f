"""Post-training quantization of an NNX model: round to nearest, AdaRound, BRECQ / QDrop.

:func:`round_to_nearest`, :func:`adaround_model` and :func:`reconstruct_model` quantize the
weights (and, with ``act_bits``, the inputs) of every trquant layer
(:class:`trquant.nnx.QuantLinear`, ``QuantConv``, ``QuantLinearGeneral``, ``QuantEinsum``)
of a copy of a model, e.g. a full-precision model with ``weight_bits=None``, built so or
made from a plain NNX model by ``trquant.nnx.quantize_model(model, trquant.nnx.QuantRule())``
(transformers included). Each returns a :class:`ModelResult` ``(model, reports)``: the new
model and one report per layer (:class:`LayerReport`) or per unit (:class:`BlockReport`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from trquant import checks
from trquant import quantizers
from trquant.adaround import data
from trquant.adaround import reconstruction
from trquant.adaround import rounding
from trquant.adaround import units as unit_lib
from trquant.adaround.config import AdaRoundConfig
from trquant.adaround.config import check_config
from trquant.nnx import graph

__all__ = ["BlockReport", "LayerReport", "ModelResult", "adaround_model", "reconstruct_model",
           "round_to_nearest"]


class LayerReport(NamedTuple):
  """Per-layer record of :func:`adaround_model` / :func:`round_to_nearest`."""

  name: str  # the layer's path in the model, "/"-joined
  weight_bits: int  # weight bit width used for this layer
  capture_seconds: float  # wall time to collect the layer's inputs and FP outputs
  seconds: float  # wall time of the reconstruction (compilation included); 0 for nearest
  nearest_error: float  # reconstruction_error of round-to-nearest on the calibration set
  adaround_error: float  # the same for AdaRound's weights (= nearest_error for nearest)
  flipped_fraction: float  # fraction of codes that differ from round-to-nearest


class BlockReport(NamedTuple):
  """Per-unit record of :func:`reconstruct_model`."""

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
  """What the model drivers return: the quantized model and one report per layer or unit.

  A NamedTuple: ``q, reports = trquant.adaround.adaround_model(...)`` unpacks it, or take
  ``.model`` alone.
  """

  model: object  # the new quantized NNX model (the input model is not modified)
  reports: list  # LayerReport per layer (round_to_nearest, adaround_model), BlockReport per unit


def _progress_bar(total: int, desc: str):
  """A tqdm bar over the layers or units, or None where tqdm (optional) is missing."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, leave=False)


def _without_float_units(units, plan) -> list:
  """The units minus those holding only layers kept in full precision (``first_last="fp"``);
  a ValueError for a unit that holds one of those and quantized layers too."""
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
          f"first_last='fp': unit {unit_lib.unit_name(unit)!r} holds {floats} (kept in full"
          f" precision) and the quantized {quantized[:3]}; give `blocks` that put the first"
          " and last layer in units of their own, or granularity='layer'.")
    if not floats:
      kept.append(unit)
  return kept


def _check_act_bits(act_bits) -> None:
  if act_bits is not None:
    rounding.weight_grid(act_bits, False, "act_bits")


def round_to_nearest(model, *, weight_bits: int, per_channel: bool = False,
                     first_last: Union[str, int] = "same", example_input=None,
                     act_bits: Optional[int] = None,
                     apply_fn: Optional[Callable] = None) -> ModelResult:
  """Post-training round-to-nearest weight quantization with MSE step sizes (the baseline).

  Every trquant layer (:class:`trquant.nnx.QuantLinear`, ``QuantConv``,
  ``QuantLinearGeneral``, ``QuantEinsum``) of a copy of ``model`` gets
  ``weight_bits``-bit weights with a frozen step size from
  ``trquant.init_scale(kernel, method="mse")`` (per-tensor, or per output
  channel), the same scales :func:`adaround_model` uses. With ``act_bits`` every
  layer's input is LSQ-quantized with an MSE step size from ``example_input``, as
  :func:`reconstruct_model` initialises them; otherwise activations are left as the
  model has them. ``model`` itself is not modified.

  Args:
    model: an NNX model of trquant layers, e.g. the full-precision model
      (``weight_bits=None``); its kernels are taken as the float weights.
    weight_bits: weight bit width in ``[2, 16]``.
    per_channel: one step size per output channel (last kernel axis).
    first_last: the first and the last layer called by the forward pass: ``"same"``
      (``weight_bits``, the default), an int bit width for their weights and inputs
      (e.g. 8), or ``"fp"`` (left in full precision). Other than ``"same"`` it needs
      ``example_input`` to find them.
    example_input: a batch of model inputs, used to find the forward order and,
      with ``act_bits``, the activation step sizes.
    act_bits: activation bit width (``first_last`` at the edges), or None.
    apply_fn: ``(model, batch) -> output``, how the forward pass is run on
      ``example_input``; default ``model(batch)``. Give it for a model called with
      keyword arguments, e.g. ``lambda m, x: m(x, rngs=None)``.

  Returns:
    A :class:`ModelResult`: the new quantized model and one :class:`LayerReport` per
    layer (its bit width; errors are not measured here: NaN).

  Raises:
    ValueError: for bad bits, a model without trquant layer, a non-callable
      ``apply_fn``, a bad ``first_last``, or ``first_last`` (other than ``"same"``) or
      ``act_bits`` without ``example_input``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(trquant.nnx.QuantLinear(8, 4, weight_bits=None, rngs=nnx.Rngs(0)))
    >>> q = trquant.adaround.round_to_nearest(fp, weight_bits=4).model
    >>> q.layers[0].weight_bits, fp.layers[0].weight_bits
    (4, None)
  """
  batches = None
  forward = data.forward_fn(apply_fn)
  first_last = checks.check_first_last(first_last, min_bits=2)
  if first_last != "same" and example_input is None:
    raise ValueError(f"`first_last={first_last!r}` needs `example_input` to find the first and"
                     " last layers of the forward pass.")
  _check_act_bits(act_bits)
  if act_bits is not None and example_input is None:
    raise ValueError("`act_bits` needs `example_input` to set the activation step sizes.")
  if example_input is not None:
    batches = data.calibration_list(example_input)
  fp, work, plan = unit_lib.quantization_plan(
      model, batches, weight_bits=weight_bits, per_channel=per_channel,
      first_last=first_last, forward=forward)
  if act_bits is not None:
    unit_lib.quantize_activations(fp, plan, batches[0], act_bits=act_bits,
                                  first_last=first_last, forward=forward)
  return ModelResult(work, [LayerReport(p.name, p.weight_bits, 0.0, 0.0, math.nan, math.nan, 0.0)
                            for p in plan if p.weight_bits is not None])


def adaround_model(model, calibration_batches, *, weight_bits: int,
                   config: AdaRoundConfig = AdaRoundConfig(), per_channel: bool = False,
                   first_last: Union[str, int] = "same",
                   activation: Optional[Callable] = None, key, progress: bool = True,
                   apply_fn: Optional[Callable] = None) -> ModelResult:
  """AdaRound post-training weight quantization of an NNX model, layer by layer.

  For every trquant layer (:class:`trquant.nnx.QuantLinear`, ``QuantConv``,
  ``QuantLinearGeneral``, ``QuantEinsum``), in the order the forward pass calls them:

  1. the step size is ``trquant.init_scale(kernel, bits=..., method="mse")``
     (per-tensor, or per output channel / feature with ``per_channel``: the
     layer's ``channel_axes``);
  2. asymmetric reconstruction data: ``x_q`` is the layer's input in the new
     model, whose earlier layers are already rounded, ``y_fp`` the layer's
     output in the full-precision model, both over all calibration batches;
  3. :func:`trquant.adaround.reconstruct_layer` learns the rounding of the kernel, and
     the new model's layer gets the hard-rounded kernel and its frozen step size.

  The target is the layer's own output: for a conv followed by BatchNorm and
  ReLU, the pre-BatchNorm conv output, with no activation in the loss unless
  ``activation`` is given (applied to every layer's output). Layers are run in
  evaluation mode (BatchNorm running statistics). Activations stay as the model
  has them (AdaRound here is weight-only). Inputs and outputs are recorded with
  :func:`trquant.nnx.capture_layers` during eager forward passes stopped right after the
  layer: the model's ``__call__`` must run eagerly (not be wrapped in ``jax.jit`` /
  ``nnx.jit``). A ``QuantEinsum`` is reconstructed with its own equation. Plain NNX
  layers of the model (e.g. left so by :func:`trquant.nnx.quantize_model`) are not
  quantized, and ``first_last`` applies to the first and last trquant layer.

  Args:
    model: an NNX model of trquant layers, typically the full-precision model
      (``weight_bits=None``, activations FP); its kernels are the float weights.
      It is not modified.
    calibration_batches: an array of model inputs ``(N, ...)``, or an iterable
      of such arrays (or of ``(inputs, labels)`` tuples), e.g. 1024 training
      images in batches of 256.
    weight_bits: weight bit width in ``[2, 16]``.
    config: the optimisation hyper-parameters (``iters`` per layer), an
      :class:`trquant.adaround.AdaRoundConfig`; ``drop_prob`` must be 0 (QDrop needs
      activation quantization: :func:`reconstruct_model`).
    per_channel: one step size per output channel (last kernel axis).
    first_last: the first and last layer called: ``"same"`` (``weight_bits``, the
      default), an int bit width (e.g. 8), or ``"fp"`` (left in full precision and not
      reconstructed).
    activation: ``f_a`` in the loss, as :func:`trquant.adaround.reconstruct_layer`.
    key: a jax PRNG key; layer ``i`` uses ``fold_in(key, i)``.
    progress: show a tqdm progress bar over the layers (if tqdm is installed).
    apply_fn: ``(model, batch) -> output``, how the forward pass is run on a
      calibration batch; default ``model(batch)``. Give it for a model called with
      keyword arguments (``lambda m, x: m(x, rngs=None)``, ``lambda m, tokens:
      m(tokens, cache=None)``); it must call the model eagerly.

  Returns:
    A :class:`ModelResult` ``(model, reports)``: a new model of the same structure whose
    quantized layers hold the AdaRound weights (kernel ``= scale * codes``,
    ``weight_bits`` and a frozen :class:`trquant.nnx.WeightScale` set), so its forward
    pass uses them, and one :class:`LayerReport` per layer in call order.

  Raises:
    ValueError: for bad bits, a model without trquant layer, empty calibration
      data or calibration batches of different example shapes, a model whose
      layers do not run eagerly (an ``nnx.jit``-decorated ``__call__``), or a
      ``config`` that is not an :class:`trquant.adaround.AdaRoundConfig` or has
      ``drop_prob > 0``.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(trquant.nnx.QuantLinear(8, 16, weight_bits=None, rngs=nnx.Rngs(0)),
    ...                     nnx.relu,
    ...                     trquant.nnx.QuantLinear(16, 4, weight_bits=None, rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> q, reports = trquant.adaround.adaround_model(
    ...     fp, x, weight_bits=3, config=trquant.adaround.AdaRoundConfig(iters=50),
    ...     key=jax.random.key(1), progress=False)
    >>> [layer.weight_bits for layer in (q.layers[0], q.layers[2])], [r.name for r in reports]
    ([3, 3], ['layers/0', 'layers/2'])
  """
  config = check_config(config)
  if config.drop_prob > 0:
    raise ValueError("adaround_model is weight-only: `config.drop_prob` > 0 (QDrop) drops"
                     " activation quantization; use reconstruct_model(..., act_bits=...,"
                     " granularity='layer') for QDrop.")
  batches = data.calibration_list(calibration_batches)
  forward = data.forward_fn(apply_fn)
  fp, work, plan = unit_lib.quantization_plan(
      model, batches, weight_bits=weight_bits, per_channel=per_channel,
      first_last=first_last, forward=forward)
  quantized = [(index, planned) for index, planned in enumerate(plan)
               if planned.weight_bits is not None]  # first_last="fp" leaves the edges out
  bar = _progress_bar(len(quantized), "adaround") if progress else None
  reports = []
  try:
    for index, (name, fp_layer, work_layer, layer_bits, scale) in quantized:
      if bar is not None:
        bar.set_postfix_str(name)
      start = time.perf_counter()
      x_q = data.layer_data(work, work_layer, batches, output=False, name=f"layer {name}",
                            apply_fn=forward)
      y_fp = data.layer_data(fp, fp_layer, batches, output=True, name=f"layer {name}",
                             apply_fn=forward)
      captured = time.perf_counter()
      layer_fn = unit_lib.layer_apply_fn(fp_layer, patches=unit_lib.scan_on_cpu(config.loop))
      kernel = fp_layer.kernel.get_value()
      result = reconstruction.reconstruct_layer(
          layer_fn, kernel, scale, x_q, y_fp, weight_bits=layer_bits, config=config,
          activation=activation, key=jax.random.fold_in(key, index))
      jax.block_until_ready(result.weight)
      done = time.perf_counter()
      work_layer.kernel.set_value(unit_lib.put_like(result.weight, kernel))
      nearest_codes = quantizers.quantize(kernel, scale, bits=layer_bits)
      nearest = quantizers.dequantize(nearest_codes, scale)
      nearest_error, adaround_error = reconstruction.reconstruction_errors(
          layer_fn, [nearest, result.weight], x_q, y_fp, activation=activation)
      reports.append(LayerReport(name, layer_bits, captured - start, done - captured,
                                 nearest_error, adaround_error,
                                 float(jnp.mean(result.codes != nearest_codes))))
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()
  return ModelResult(work, reports)


def reconstruct_model(model, calibration_batches, *, weight_bits: int,
                      config: AdaRoundConfig = AdaRoundConfig(),
                      act_bits: Optional[int] = None, granularity: str = "block", blocks=None,
                      per_channel: bool = False, first_last: Union[str, int] = "same",
                      fallback_to_nearest: bool = True, key, progress: bool = True,
                      apply_fn: Optional[Callable] = None) -> ModelResult:
  """Post-training quantization by block reconstruction (BRECQ), QDrop, with activations.

  Like :func:`adaround_model`, on a copy of ``model`` whose trquant layers are in full
  precision, but the unit of reconstruction is a block of layers and activations can
  be quantized too:

  1. weights: every trquant layer gets ``weight_bits`` (the first and last layer called
     follow ``first_last``) with MSE step sizes; with ``act_bits``, every layer's input is
     LSQ-quantized to ``act_bits`` (``first_last`` at the edges), signed where the
     full-precision input has negative values, step size by MSE search on the first
     calibration batch;
  2. units, in the order the forward pass calls them: with ``granularity="block"`` and
     ``blocks=None``, the model's children that hold trquant layers, with ``nnx.List``
     containers opened up (ResNet-20: the stem, each residual block, the
     head; a ViT: each transformer block and the layers around them); or the
     sub-modules whose ``"/"``-joined paths ``blocks`` names (layers outside them form
     units of their own); ``granularity="layer"`` makes every layer a unit;
  3. for each unit, its input ``x_q`` in the quantized model so far, its input ``x_fp``
     and output ``y_fp`` in the full-precision model, and
     :func:`trquant.adaround.reconstruct_block` learns the rounding of all the unit's
     kernels and its activation step sizes jointly, against the unit's output
     (BatchNorm in evaluation mode); ``config.drop_prob = 0.5`` is QDrop (on the unit's
     input and on every quantized input inside it);
  4. with ``fallback_to_nearest``, a unit whose output error on the calibration data
     ends larger than with nearest rounding and the initial activation step sizes
     keeps those instead (short budgets, 8-bit layers where nearest is already close).

  Units are recorded by replacing them in their parent for one eager pass per batch,
  so the model's ``__call__`` must run eagerly and a unit must take one array input;
  keyword arguments that are not arrays (``out_sharding=None``, as
  ``nnx.MultiHeadAttention`` calls its projections; ``deterministic=True``) are
  recorded and passed again during reconstruction. A model called with keyword
  arguments itself (``rngs=None``, ``cache=``, ``segment_ids=``) is run through
  ``apply_fn``; a model whose only child holds all the layers (a wrapper) is opened up
  into that child's units.

  Args:
    model: an NNX model of trquant layers in full precision (built so, or made from a
      plain NNX model by ``trquant.nnx.quantize_model(model, trquant.nnx.QuantRule())``).
      It is not modified.
    calibration_batches: model inputs ``(N, ...)`` or an iterable of batches.
    weight_bits: weight bit width in ``[2, 16]``.
    config: the optimisation hyper-parameters (``iters`` per unit; ``drop_prob`` for
      QDrop, which needs ``act_bits``; ``act_lr`` for the activation step sizes), an
      :class:`trquant.adaround.AdaRoundConfig`.
    act_bits: activation bit width, or None for full-precision activations.
    granularity: ``"block"`` or ``"layer"``.
    blocks: None (automatic), or a list of module paths (e.g. ``["blocks/0"]``).
    per_channel: one weight step size per output channel.
    first_last: the first and last layer called: ``"same"`` (the default), an int bit
      width of their weights and inputs (e.g. 8), or ``"fp"``: left in full precision and
      not reconstructed (a unit that holds one of them and other layers raises: give
      ``blocks`` that put it in a unit of its own, or ``granularity="layer"``).
    fallback_to_nearest: never leave a unit worse than nearest rounding (step 4).
    key: a jax PRNG key; unit ``i`` uses ``fold_in(key, i)``.
    progress: a tqdm progress bar over the units (if tqdm is installed).
    apply_fn: ``(model, batch) -> output``, how the forward pass is run on a
      calibration batch; default ``model(batch)``. E.g. ``lambda m, x: m(x,
      rngs=None)``, or ``lambda m, tokens: m(tokens, cache=None, segment_ids=None)``.

  Returns:
    A :class:`ModelResult` ``(model, reports)``: a new model with the reconstructed
    weights (kernel ``= scale * codes``, a frozen :class:`trquant.nnx.WeightScale`) and,
    with ``act_bits``, the learned activation step sizes; one :class:`BlockReport` per
    unit in call order.

  Raises:
    ValueError: for bad bits, granularity, blocks (a path that is not a module,
      holds no trquant layer, or overlaps another), ``drop_prob > 0`` without
      ``act_bits``, calibration data, a unit not called eagerly, called with several
      inputs or an array keyword argument, a non-callable ``apply_fn``, or a ``config``
      that is not an :class:`trquant.adaround.AdaRoundConfig`.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> Q = lambda i, o, seed: trquant.nnx.QuantLinear(i, o, weight_bits=None, rngs=nnx.Rngs(seed))
    >>> class Net(nnx.Module):
    ...   def __init__(self):
    ...     self.body = nnx.Sequential(Q(8, 16, 0), nnx.relu, Q(16, 16, 1), nnx.relu)
    ...     self.head = Q(16, 4, 2)
    ...   def __call__(self, x):
    ...     return self.head(self.body(x))
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> q, reports = trquant.adaround.reconstruct_model(
    ...     Net(), x, weight_bits=3, act_bits=4, config=trquant.adaround.AdaRoundConfig(iters=50),
    ...     key=jax.random.key(1), progress=False)
    >>> [r.layers for r in reports], q.head.act_bits
    ([('body/layers/0', 'body/layers/2'), ('head',)], 4)
  """
  config = check_config(config)
  batches = data.calibration_list(calibration_batches)
  forward = data.forward_fn(apply_fn)
  if granularity not in unit_lib.GRANULARITIES:
    raise ValueError(f"`granularity` must be one of {unit_lib.GRANULARITIES}, got"
                     f" {granularity!r}.")
  _check_act_bits(act_bits)
  if config.drop_prob > 0 and act_bits is None:
    raise ValueError("`config.drop_prob` > 0 (QDrop) drops activation quantization: it needs"
                     " `act_bits`.")
  fp, work, plan = unit_lib.quantization_plan(
      model, batches, weight_bits=weight_bits, per_channel=per_channel,
      first_last=first_last, forward=forward)
  units = unit_lib.find_units(work, granularity, blocks)
  by_name = {p.name: p for p in plan}
  order = [p.name for p in plan]  # layers in call order
  if act_bits is not None:
    unit_lib.quantize_activations(fp, plan, batches[0], act_bits=act_bits,
                                  first_last=first_last, forward=forward)

  def first_call(unit):
    names = [i for i, layer in enumerate(order) if unit_lib.unit_holds(unit, layer)]
    return min(names) if names else len(order)

  units.sort(key=first_call)
  units = _without_float_units(units, plan)
  bar = _progress_bar(len(units), "reconstruct") if progress else None
  reports = []
  try:
    for index, unit in enumerate(units):
      name = unit_lib.unit_name(unit)
      if bar is not None:
        bar.set_postfix_str(name)
      start = time.perf_counter()
      x_q = data.unit_data(work, unit, batches, name=f"unit {name}", apply_fn=forward).inputs
      x_fp, y_fp, unit_kwargs = data.unit_data(fp, unit, batches, name=f"unit {name}",
                                               apply_fn=forward)
      captured_at = time.perf_counter()
      work_unit = graph.module_at(work, unit)
      # The model itself as a unit runs as apply_fn runs it; a sub-module as its parent
      # called it, with the keyword arguments recorded.
      call = forward if not unit else (
          lambda module, x, kwargs=unit_kwargs: module(x, **kwargs))
      unit_fn, kernel_layers, act_layers = unit_lib.unit_apply_fn(
          work_unit, config.drop_prob, patches=unit_lib.scan_on_cpu(config.loop), call=call)
      prefix = name + "/" if unit else ""
      kernel_names = [prefix + "/".join(map(str, p)) if p else name for p in kernel_layers]
      act_names = [prefix + "/".join(map(str, p)) if p else name for p in act_layers]
      entries = [by_name[n] for n in kernel_names]
      weights = [p.fp_layer.kernel.get_value() for p in entries]
      scales = [p.scale for p in entries]
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
          x_fp=x_fp if config.drop_prob > 0 else None, key=jax.random.fold_in(key, index))
      jax.block_until_ready(result.weights)
      done = time.perf_counter()
      learned = list(result.act_scales) if act_scales else []
      nearest_error, reconstructed_error = reconstruction.block_errors(
          unit_fn, [(nearest, act_scales), (result.weights, learned)], x_q, y_fp)
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
      reports.append(BlockReport(name, tuple(kernel_names), tuple(layer_bits),
                                 captured_at - start, done - captured_at, nearest_error,
                                 reconstructed_error, flipped / max(total, 1), keep_nearest))
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()
  return ModelResult(work, reports)
