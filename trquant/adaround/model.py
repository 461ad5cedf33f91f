"""AdaRound over an NNX model: the driver of :mod:`trquant.adaround.rounding`.

:func:`adaround_model` and :func:`round_to_nearest` quantize the weights of every
trquant layer (:class:`trquant.nnx.QuantLinear`, ``QuantConv``,
``QuantLinearGeneral``, ``QuantEinsum``) of a copy of a model, e.g. a
full-precision model with ``weight_bits=None``, built so or made from a plain NNX
model by ``trquant.nnx.quantize(model, trquant.nnx.QuantRule())`` (transformers
included). Each layer's inputs and outputs come from :func:`trquant.nnx.capture`;
:func:`layer_apply_fn` gives the pure ``(w, x) -> layer(x)`` that
:func:`trquant.adaround.reconstruct_layer` optimises.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trquant import nnx as tq_nnx
from trquant import quantizers
from trquant.adaround import block as block_lib
from trquant.adaround import loop as loops
from trquant.adaround import rounding
from trquant.nnx import traversal as nnx_traversal

__all__ = [
    "BlockReport", "GRANULARITIES", "LayerReport", "adaround_model", "float_copy",
    "layer_apply_fn", "layer_data", "reconstruct_model", "round_to_nearest", "unit_data",
]


class LayerReport(NamedTuple):
  """Per-layer record of :func:`adaround_model` / :func:`round_to_nearest` (``return_info=True``)."""

  name: str  # the layer's path in the model, "/"-joined
  bits: int  # weight bit width used for this layer
  capture_seconds: float  # wall time to collect the layer's inputs and FP outputs
  seconds: float  # wall time of the reconstruction (compilation included); 0 for nearest
  nearest_error: float  # reconstruction_error of round-to-nearest on the calibration set
  adaround_error: float  # the same for AdaRound's weights (= nearest_error for nearest)
  flipped_fraction: float  # fraction of codes that differ from round-to-nearest


# ---------------------------------------------------------------------------------------
# NNX models
# ---------------------------------------------------------------------------------------
#
# A layer's inputs and outputs are collected with trquant.nnx.capture, which sets the
# layer's capture_hook for the duration of one forward pass per calibration batch and,
# with stop=True, ends the (eager) pass as soon as the layer has run: collecting the
# inputs of layer k costs a forward pass through layers 1..k only.


_EAGER_ONLY = (
    "adaround captures each layer's inputs and outputs during eager forward passes, so the"
    " model's __call__ (and the code it calls) must run eagerly: remove the nnx.jit /"
    " jax.jit decorator from the model's __call__ and jit the code that calls the model"
    " instead (a train step, an evaluation function)."
)


def _forward(apply_fn) -> Callable:
  """``apply_fn`` checked, or ``model(batch)`` when it is None."""
  if apply_fn is None:
    return lambda model, batch: model(batch)
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be a callable (model, batch) -> output, e.g."
                     f" lambda m, x: m(x, rngs=None), got {apply_fn!r}.")
  return apply_fn


def layer_data(model, layer, batches, *, output: bool, name: str = "the layer",
               apply_fn: Optional[Callable] = None):
  """The inputs (or, with ``output=True``, outputs) of ``layer`` over ``batches``.

  Each batch runs ``apply_fn(model, batch)`` (default ``model(batch)``) eagerly up to
  the layer (:func:`trquant.nnx.capture` with ``stop=True``); the inputs are the
  layer's before its own input quantization.

  Returns:
    The values concatenated over the batches, ``(N, ...)``.

  Raises:
    ValueError: when the forward pass does not call the layer eagerly (e.g. a jitted
      ``__call__``), or the batches give values of different shapes.
  """
  forward = _forward(apply_fn)
  chunks = []
  for batch in batches:
    with tq_nnx.capture(model, [layer], stop=True) as captured:
      forward(model, batch)
    if captured.calls:
      call = captured.calls[0]
      equation = call.kwargs.get("einsum_str")
      if equation is not None and equation.replace(" ", "") != getattr(layer, "einsum_str", None):
        raise ValueError(f"{name} is called with the equation {equation!r}, not its own"
                         f" {layer.einsum_str!r}; adaround reconstructs layer(x) with the"
                         " layer's own equation. Give the QuantEinsum its equation at"
                         " construction.")
      chunks.append(call.output if output else call.input)
      continue
    if captured.missed:
      raise ValueError(f"{name} ran inside a transform of the model's forward pass (e.g. an"
                       " nnx.jit-decorated __call__), on traced values or a copy of the model"
                       f" that adaround cannot observe. {_EAGER_ONLY}")
    raise ValueError(f"{name} was not called eagerly by the model's forward pass,"
                     " model(batch). If the model's __call__ (or the part that calls the"
                     f" layer) is wrapped in nnx.jit / jax.jit: {_EAGER_ONLY} Otherwise the"
                     " forward pass does not call this layer.")
  shapes = {tuple(chunk.shape[1:]) for chunk in chunks}
  if len(shapes) > 1:
    what = "outputs" if output else "inputs"
    raise ValueError(f"the {what} of {name} have different shapes across the calibration"
                     f" batches ({', '.join(str(shape) for shape in sorted(shapes))} per"
                     " example): give calibration batches of one shape.")
  return jnp.concatenate(chunks, axis=0)


def _call_order(model, layers, example, forward):
  """The layers that one forward pass calls, in call order (first call of each)."""
  with tq_nnx.capture(model, layers) as captured:
    forward(model, example)
  by_name = {nnx_traversal.path_name(path): layer for path, layer in tq_nnx.quant_layers(model)}
  return [by_name[name] for name in captured.order]


def _calibration_list(calibration_batches) -> list:
  if calibration_batches is None:
    raise ValueError("`calibration_batches` is empty (None).")
  if isinstance(calibration_batches, (np.ndarray, jax.Array)):
    calibration_batches = [calibration_batches]
  batches = []
  for batch in calibration_batches:
    batch = batch[0] if isinstance(batch, (tuple, list)) else batch
    batch = jnp.asarray(batch)
    if batch.ndim == 0:
      raise ValueError("`calibration_batches` must yield arrays (N, ...) of model inputs.")
    if batch.shape[0]:
      batches.append(batch)
  if not batches:
    raise ValueError("`calibration_batches` is empty: AdaRound needs calibration inputs.")
  shapes = [tuple(batch.shape[1:]) for batch in batches]
  for index, shape in enumerate(shapes):
    if shape != shapes[0]:
      raise ValueError(
          f"the calibration batches must have one shape apart from their size: batch 0 has"
          f" examples of shape {shapes[0]}, batch {index} of shape {shape} (batch shapes"
          f" {tuple(batches[0].shape)} and {tuple(batches[index].shape)}). Layer inputs are"
          " concatenated over the batches, so resize or split them to one example shape.")
  return batches


def _check_model(model) -> list:
  if not isinstance(model, nnx.Module):
    raise ValueError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  layers = tq_nnx.quant_layers(model)
  if not layers:
    raise ValueError("the model has no trquant.nnx layer (QuantLinear, QuantConv,"
                     " QuantLinearGeneral, QuantEinsum) to quantize. To quantize a plain NNX"
                     " model, make its layers trquant layers in full precision first:"
                     " trquant.nnx.quantize(model, trquant.nnx.QuantRule()).")
  return layers


def _path_name(path) -> str:
  return "/".join(map(str, path)) or "<root>"


def float_copy(model):
  """A clone of ``model`` in evaluation mode whose trquant layers use their kernels unquantized."""
  fp = nnx.clone(model)
  for _, layer in tq_nnx.quant_layers(fp):
    layer.kernel.set_metadata(bits=None)
  fp.eval()
  return fp


def _set_quantized(layer, *, bits: int, scale, per_channel: bool, kernel=None) -> None:
  """Makes `layer` quantize its kernel to `bits` with the frozen step size `scale`."""
  if kernel is not None:
    layer.kernel.set_value(jnp.asarray(kernel, layer.kernel.get_value().dtype))
  layer.kernel.set_metadata(bits=bits, signed=True, narrow=False)
  layer.weight_quantizer = "fixed"
  layer.per_channel = bool(per_channel)
  layer.weight_scale = nnx.data(tq_nnx.WeightScale(jnp.asarray(scale, jnp.float32)))


def _plan(model, batches, *, bits, per_channel, first_last_bits, forward):
  """Validates; returns (fp copy, working copy, [(name, fp layer, work layer, bits, scale)])."""
  _check_model(model)
  rounding.weight_grid(bits, True)
  if first_last_bits is not None:
    rounding.weight_grid(first_last_bits, True, "first_last_bits")
  if not isinstance(per_channel, (bool, np.bool_)):
    raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}.")
  fp, work = float_copy(model), nnx.clone(model)
  work.eval()
  fp_layers = tq_nnx.quant_layers(fp)
  work_layers = dict(tq_nnx.quant_layers(work))
  names = {id(layer): path for path, layer in fp_layers}
  if batches is not None:
    order = _call_order(fp, [layer for _, layer in fp_layers], batches[0][:1], forward)
    called = {id(layer) for layer in order}
    # Layers the forward pass never calls keep their tree order, after the called ones.
    order += [layer for _, layer in fp_layers if id(layer) not in called]
  else:
    order = [layer for _, layer in fp_layers]
  plan = []
  for index, fp_layer in enumerate(order):
    path = names[id(fp_layer)]
    edge = index == 0 or index == len(order) - 1
    layer_bits = first_last_bits if (edge and first_last_bits is not None) else bits
    kernel = fp_layer.kernel.get_value()
    # Per-channel: one step size per output channel (per output feature of a LinearGeneral
    # or an Einsum: the layer's channel_axes).
    scale = quantizers.init_scale(kernel, bits=layer_bits, method="mse",
                                  axis=fp_layer.channel_axes if per_channel else None)
    work_layer = work_layers[path]
    _set_quantized(work_layer, bits=layer_bits, scale=scale, per_channel=per_channel,
                   kernel=kernel)
    plan.append((_path_name(path), fp_layer, work_layer, layer_bits, scale))
  return fp, work, plan


def _patches(module) -> None:
  """Convolutions of ``module`` as patches @ kernel: on CPU, XLA runs a conv's kernel
  gradient inside ``lax.scan`` ~30x slower than outside one (a matmul's it does not)."""
  for _, layer in tq_nnx.quant_layers(module):
    if isinstance(layer, tq_nnx.QuantConv):
      layer.patches_conv = True


def _scan_on_cpu(loop: str) -> bool:
  """Whether a reconstruction runs as a ``lax.scan`` on CPU (then convs go as patches)."""
  return loops.check_loop(loop) == "scan" and jax.default_backend() == "cpu"


def layer_apply_fn(fp_layer, *, patches: bool = False):
  """``(w, x) -> fp_layer(x)`` with the kernel replaced by ``w`` (pure, differentiable).

  With ``patches``, a :class:`trquant.nnx.QuantConv` computes as patches @ kernel (a
  copy of the layer with ``patches_conv`` set): the same result up to float summation
  order, and on CPU a fast kernel gradient inside a ``lax.scan`` (the model drivers use
  it for ``loop="scan"`` on CPU).
  """
  if patches and isinstance(fp_layer, tq_nnx.QuantConv):
    fp_layer = nnx.clone(fp_layer)
    _patches(fp_layer)
  graphdef, kernel_state, rest = nnx.split(fp_layer, tq_nnx.QuantWeight, ...)

  def apply_fn(w, x):
    return nnx.merge(graphdef, jax.tree.map(lambda _: w, kernel_state), rest)(x)

  return apply_fn


def _progress_bar(total: int, desc: str):
  """A tqdm bar over the layers or units, or None where tqdm (optional) is missing."""
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, leave=False)


def round_to_nearest(model, *, bits: int, per_channel: bool = False,
                     first_last_bits: Optional[int] = None, example_input=None,
                     act_bits: Optional[int] = None, return_info: bool = False,
                     apply_fn: Optional[Callable] = None):
  """Post-training round-to-nearest weight quantization with MSE step sizes (the baseline).

  Every trquant layer (:class:`trquant.nnx.QuantLinear`, ``QuantConv``,
  ``QuantLinearGeneral``, ``QuantEinsum``) of a copy of ``model`` gets
  ``bits``-bit weights with a frozen step size from
  ``trquant.init_scale(kernel, method="mse")`` (per-tensor, or per output
  channel), the same scales :func:`adaround_model` uses. With ``act_bits`` every
  layer's input is LSQ-quantized with an MSE step size from ``example_input``, as
  :func:`reconstruct_model` initialises them; otherwise activations are left as the
  model has them. ``model`` itself is not modified.

  Args:
    model: an NNX model of trquant layers, e.g. the full-precision model
      (``weight_bits=None``); its kernels are taken as the float weights.
    bits: weight bit width in ``[2, 16]``.
    per_channel: one step size per output channel (last kernel axis).
    first_last_bits: bit width of the first and the last layer called by the
      forward pass (e.g. 8), or None for ``bits``. Needs ``example_input`` to
      find them.
    example_input: a batch of model inputs, used to find the forward order and,
      with ``act_bits``, the activation step sizes.
    act_bits: activation bit width (``first_last_bits`` at the edges), or None.
    return_info: also return per-layer :class:`LayerReport` records (errors
      are not measured here: NaN).
    apply_fn: ``(model, batch) -> output``, how the forward pass is run on
      ``example_input``; default ``model(batch)``. Give it for a model called with
      keyword arguments, e.g. ``lambda m, x: m(x, rngs=None)``.

  Returns:
    The new quantized model, or ``(model, reports)`` with ``return_info``.

  Raises:
    ValueError: for bad bits, a model without trquant layer, a non-callable
      ``apply_fn``, or ``first_last_bits`` or ``act_bits`` without ``example_input``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(trquant.nnx.QuantLinear(8, 4, weight_bits=None, rngs=nnx.Rngs(0)))
    >>> q = trquant.adaround.round_to_nearest(fp, bits=4)
    >>> q.layers[0].weight_bits, fp.layers[0].weight_bits
    (4, None)
  """
  batches = None
  forward = _forward(apply_fn)
  if first_last_bits is not None and example_input is None:
    raise ValueError("`first_last_bits` needs `example_input` to find the first and last layers"
                     " of the forward pass.")
  if act_bits is not None:
    rounding.weight_grid(act_bits, False, "act_bits")
    if example_input is None:
      raise ValueError("`act_bits` needs `example_input` to set the activation step sizes.")
  if example_input is not None:
    batches = _calibration_list(example_input)
  fp, work, plan = _plan(model, batches, bits=bits, per_channel=per_channel,
                         first_last_bits=first_last_bits, forward=forward)
  if act_bits is not None:
    _quantize_activations(fp, plan, batches[0], act_bits=act_bits,
                          first_last_bits=first_last_bits, forward=forward)
  if not return_info:
    return work
  return work, [LayerReport(name, layer_bits, 0.0, 0.0, math.nan, math.nan, 0.0)
                for name, _, _, layer_bits, _ in plan]


def adaround_model(model, calibration_batches, *, bits: int, per_channel: bool = False,
                   first_last_bits: Optional[int] = None, iters: int = 10_000,
                   batch_size: int = 32, lam: float = 0.01, lr: float = 1e-3,
                   warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
                   beta_mode: str = "cosine", activation: Optional[Callable] = None,
                   key, progress: bool = True, return_info: bool = False,
                   loop: str = "auto", apply_fn: Optional[Callable] = None):
  """AdaRound post-training weight quantization of an NNX model, layer by layer.

  For every trquant layer (:class:`trquant.nnx.QuantLinear`, ``QuantConv``,
  ``QuantLinearGeneral``, ``QuantEinsum``), in the order the forward pass calls them:

  1. the step size is ``trquant.init_scale(kernel, bits=..., method="mse")``
     (per-tensor, or per output channel / feature with ``per_channel``: the
     layer's ``channel_axes``);
  2. asymmetric reconstruction data: ``x_q`` is the layer's input in the new
     model, whose earlier layers are already rounded, ``y_fp`` the layer's
     output in the full-precision model, both over all calibration batches;
  3. :func:`reconstruct_layer` learns the rounding of the kernel, and the new
     model's layer gets the hard-rounded kernel and its frozen step size.

  The target is the layer's own output: for a conv followed by BatchNorm and
  ReLU, the pre-BatchNorm conv output, with no activation in the loss unless
  ``activation`` is given (applied to every layer's output). Layers are run in
  evaluation mode (BatchNorm running statistics). Activations stay as the model
  has them (AdaRound here is weight-only). Inputs and outputs are recorded with
  :func:`trquant.nnx.capture` during eager forward passes stopped right after the
  layer: the model's ``__call__`` must run eagerly (not be wrapped in ``jax.jit`` /
  ``nnx.jit``). A ``QuantEinsum`` is reconstructed with its own equation. Plain NNX
  layers of the model (e.g. left so by :func:`trquant.nnx.quantize`) are not
  quantized, and ``first_last_bits`` applies to the first and last trquant layer.

  Args:
    model: an NNX model of trquant layers, typically the full-precision model
      (``weight_bits=None``, activations FP); its kernels are the float weights.
      It is not modified.
    calibration_batches: an array of model inputs ``(N, ...)``, or an iterable
      of such arrays (or of ``(inputs, labels)`` tuples), e.g. 1024 training
      images in batches of 256.
    bits: weight bit width in ``[2, 16]``.
    per_channel: one step size per output channel (last kernel axis).
    first_last_bits: bit width of the first and last layer called (e.g. 8), or
      None for ``bits``.
    iters, batch_size, lam, lr, warmup, beta, beta_mode, activation: as
      :func:`reconstruct_layer`.
    key: a jax PRNG key; layer ``i`` uses ``fold_in(key, i)``.
    progress: show a tqdm progress bar over the layers (if tqdm is installed).
    return_info: also return per-layer :class:`LayerReport` records.
    loop: how each layer's iterations run (``"auto"``, ``"scan"``, ``"steps"``), see
      :func:`trquant.adaround.reconstruct_layer`.
    apply_fn: ``(model, batch) -> output``, how the forward pass is run on a
      calibration batch; default ``model(batch)``. Give it for a model called with
      keyword arguments (``lambda m, x: m(x, rngs=None)``, ``lambda m, tokens:
      m(tokens, cache=None)``); it must call the model eagerly.

  Returns:
    A new model of the same structure whose quantized layers hold the AdaRound
    weights (kernel ``= scale * codes``, ``weight_bits`` and a frozen
    :class:`trquant.nnx.WeightScale` set), so its forward pass uses them; or
    ``(model, reports)`` with ``return_info``.

  Raises:
    ValueError: for bad bits, a model without trquant layer, empty calibration
      data or calibration batches of different example shapes, a model whose
      layers do not run eagerly (an ``nnx.jit``-decorated ``__call__``),
      ``iters < 1`` or other bad hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(trquant.nnx.QuantLinear(8, 16, weight_bits=None, rngs=nnx.Rngs(0)),
    ...                     nnx.relu,
    ...                     trquant.nnx.QuantLinear(16, 4, weight_bits=None, rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> q = trquant.adaround.adaround_model(fp, x, bits=3, iters=50, key=jax.random.key(1),
    ...                                     progress=False)
    >>> [layer.weight_bits for layer in (q.layers[0], q.layers[2])]
    [3, 3]
  """
  batches = _calibration_list(calibration_batches)
  forward = _forward(apply_fn)
  # Validate the hyper-parameters before any work (reconstruct_layer checks them again).
  loops.check_loop(loop)
  rounding.check_loop_args(iters=iters, batch_size=batch_size, lam=lam, lr=lr, warmup=warmup,
                           beta=beta, beta_mode=beta_mode)
  fp, work, plan = _plan(model, batches, bits=bits, per_channel=per_channel,
                         first_last_bits=first_last_bits, forward=forward)
  bar = _progress_bar(len(plan), "adaround") if progress else None
  reports = []
  try:
    for index, (name, fp_layer, work_layer, layer_bits, scale) in enumerate(plan):
      if bar is not None:
        bar.set_postfix_str(name)
      start = time.perf_counter()
      x_q = layer_data(work, work_layer, batches, output=False, name=f"layer {name}",
                       apply_fn=forward)
      y_fp = layer_data(fp, fp_layer, batches, output=True, name=f"layer {name}",
                        apply_fn=forward)
      captured = time.perf_counter()
      layer_fn = layer_apply_fn(fp_layer, patches=_scan_on_cpu(loop))
      kernel = fp_layer.kernel.get_value()
      result = rounding.reconstruct_layer(layer_fn, kernel, scale, x_q, y_fp, bits=layer_bits,
                                          iters=iters, batch_size=batch_size, lam=lam, lr=lr,
                                          warmup=warmup, beta=beta, beta_mode=beta_mode,
                                          activation=activation,
                                          key=jax.random.fold_in(key, index), loop=loop)
      jax.block_until_ready(result.weight)
      done = time.perf_counter()
      work_layer.kernel.set_value(result.weight)
      nearest_codes = quantizers.quantize(kernel, scale, bits=layer_bits)
      nearest = quantizers.dequantize(nearest_codes, scale)
      nearest_error, adaround_error = rounding.reconstruction_errors(
          layer_fn, [nearest, result.weight], x_q, y_fp, activation=activation)
      reports.append(LayerReport(name, layer_bits, captured - start, done - captured,
                                 nearest_error, adaround_error,
                                 float(jnp.mean(result.codes != nearest_codes))))
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()
  return (work, reports) if return_info else work


# ---------------------------------------------------------------------------------------
# Block reconstruction (BRECQ, QDrop) and activation quantization
# ---------------------------------------------------------------------------------------

GRANULARITIES = ("block", "layer")


class BlockReport(NamedTuple):
  """Per-unit record of :func:`reconstruct_model` (``return_info=True``)."""

  name: str  # the unit's path in the model, "/"-joined ("<root>" for the model itself)
  layers: tuple  # paths of the unit's trquant layers
  bits: tuple  # weight bit width of each of those layers
  capture_seconds: float  # wall time to collect the unit's inputs and outputs
  seconds: float  # wall time of the reconstruction (compilation included)
  nearest_error: float  # output error of the unit with nearest rounding and initial scales
  reconstructed_error: float  # the same after reconstruction (kept or not)
  flipped_fraction: float  # fraction of the unit's codes that differ from round-to-nearest
  kept_nearest: bool = False  # reconstruction ended worse than nearest: nearest was kept


class _StopForward(Exception):
  """Ends a forward pass once the recorded unit has run."""


class _UnitRecorder(nnx.Module):
  """Stands in for a unit of the model during one eager pass: runs it and records."""

  def __init__(self, unit, record):
    self.unit = unit
    self.record = record

  def __call__(self, *args, **kwargs):
    output = self.unit(*args, **kwargs)
    self.record(args, kwargs, output)
    raise _StopForward


def _get_child(parent, key):
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set_child(parent, key, module) -> None:
  if isinstance(key, int):
    parent[key] = module
  else:
    setattr(parent, key, module)


def _module_at(model, path: tuple):
  module = model
  for key in path:
    module = _get_child(module, key)
  return module


def _is_array(value) -> bool:
  return isinstance(value, (jax.Array, np.ndarray))


def _check_unit_kwargs(kwargs: dict, name: str) -> None:
  """Raises unless every keyword argument a unit is called with is a static value."""
  for keyword, value in kwargs.items():
    if any(_is_array(leaf) for leaf in jax.tree.leaves(value)):
      raise ValueError(
          f"{name} is called with the array keyword argument {keyword}=...; a"
          " reconstruction unit takes one array input (keyword arguments that are not"
          " arrays, such as out_sharding=None or deterministic=True, are kept). Name"
          " smaller units (blocks=[...]) that take one input, or use granularity='layer'.")


def _same_kwargs(a: dict, b: dict) -> bool:
  if a.keys() != b.keys():
    return False
  try:
    return all(bool(a[k] is b[k] or a[k] == b[k]) for k in a)
  except Exception:  # values without a truth-valued ==
    return False


def _record_unit(model, path: tuple, batches, *, name: str, forward):
  """``(inputs, outputs, kwargs)`` of the sub-module at ``path`` (see :func:`unit_data`)."""
  path = tuple(path)
  if not path:
    inputs = list(batches)
    outputs = [forward(model, b) for b in inputs]
    return jnp.concatenate(inputs, 0), jnp.concatenate(outputs, 0), {}
  parent, key = _module_at(model, path[:-1]), path[-1]
  unit = _get_child(parent, key)
  inputs, outputs, seen_kwargs = [], [], []

  def record(args, kwargs, output):
    if len(args) != 1:
      raise ValueError(f"{name} is called with {len(args)} positional arguments; a"
                       " reconstruction unit must take one input. Name smaller units"
                       " (blocks=...) or reconstruct layer by layer (granularity='layer').")
    if isinstance(args[0], jax.core.Tracer):
      raise ValueError(f"{name} ran on traced values. {_EAGER_ONLY}")
    _check_unit_kwargs(kwargs, name)
    if seen_kwargs and not _same_kwargs(seen_kwargs[0], kwargs):
      raise ValueError(f"{name} is called with different keyword arguments across the"
                       f" calibration batches ({seen_kwargs[0]!r}, then {kwargs!r}); a"
                       " reconstruction unit is replayed with one set of them.")
    seen_kwargs.append(dict(kwargs))
    inputs.append(args[0])
    outputs.append(output)

  for batch in batches:
    count = len(inputs)
    _set_child(parent, key, _UnitRecorder(unit, record))
    try:
      forward(model, batch)
    except _StopForward:
      pass
    finally:
      _set_child(parent, key, unit)
    if len(inputs) == count:
      raise ValueError(f"{name} was not called eagerly by the model's forward pass,"
                       f" model(batch). If the model's __call__ is wrapped in nnx.jit / jax.jit:"
                       f" {_EAGER_ONLY} Otherwise the forward pass does not call this unit.")
  for what, values in (("inputs", inputs), ("outputs", outputs)):
    if len({tuple(v.shape[1:]) for v in values}) > 1:
      raise ValueError(f"the {what} of {name} have different shapes across the calibration"
                       " batches: give calibration batches of one shape.")
  return jnp.concatenate(inputs, axis=0), jnp.concatenate(outputs, axis=0), seen_kwargs[0]


def unit_data(model, path: tuple, batches, *, name: str = "the unit",
              apply_fn: Optional[Callable] = None, return_kwargs: bool = False):
  """The inputs and outputs of the sub-module at ``path`` over ``batches``.

  Each batch runs ``apply_fn(model, batch)`` (default ``model(batch)``) eagerly, with
  the sub-module temporarily replaced in its parent by a recorder that runs it, keeps
  its single positional input, its keyword arguments and its output, and ends the
  pass. Works for any sub-module (a residual block, a layer, an attention projection
  that ``nnx.MultiHeadAttention`` calls with ``out_sharding=``); the model's code is
  not changed.

  Args:
    model: the NNX model.
    path: the sub-module's path, a tuple of attribute names and indices (``()``:
      the model itself, run by ``apply_fn``).
    batches: a list of model inputs.
    name: how errors name the sub-module.
    apply_fn: ``(model, batch) -> output``; default ``model(batch)``.
    return_kwargs: also return the keyword arguments the sub-module was called with.

  Returns:
    ``(inputs, outputs)``, each concatenated over the batches; with
    ``return_kwargs``, ``(inputs, outputs, kwargs)``.

  Raises:
    ValueError: when the forward pass does not call the sub-module eagerly, calls it
      with more than one positional input, with an array keyword argument or with
      keyword arguments that differ between batches, or the batches give values of
      different shapes.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                      nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x, y = trquant.adaround.unit_data(net, ("layers", 2), [jnp.ones((3, 4))])
    >>> x.shape, y.shape
    ((3, 8), (3, 2))
  """
  inputs, outputs, kwargs = _record_unit(model, path, batches, name=name,
                                         forward=_forward(apply_fn))
  return (inputs, outputs, kwargs) if return_kwargs else (inputs, outputs)


# Containers that their parent iterates (never called themselves): opened up into their items.
_CONTAINERS = (nnx.List,)


def _units(model, granularity: str, blocks) -> list[tuple]:
  """The paths of the reconstruction units, in tree order."""
  layer_paths = [tuple(path) for path, _ in tq_nnx.quant_layers(model)]
  if granularity == "layer":
    return layer_paths
  if blocks is not None:
    if isinstance(blocks, str) or not isinstance(blocks, (list, tuple)):
      raise ValueError(f"`blocks` must be a list of module paths (e.g. ['blocks/0']), got"
                       f" {blocks!r}.")
    modules = {_path_name(path): tuple(path) for path, _ in nnx.iter_modules(model)}
    units = []
    for block in blocks:
      if block not in modules:
        raise ValueError(f"`blocks` names {block!r}, which is not a module of the model; its"
                         f" sub-modules include {sorted(m for m in modules if m)[:12]}.")
      if isinstance(_module_at(model, modules[block]), _CONTAINERS):
        raise ValueError(f"`blocks` names {block!r}, an nnx.List that its parent iterates"
                         " rather than calls: name its items (e.g. f'{block}/0') or a module"
                         " that calls them.")
      units.append(modules[block])
    for i, a in enumerate(units):
      if not any(path[:len(a)] == a for path in layer_paths):
        raise ValueError(f"block {_path_name(a)!r} holds no trquant layer to quantize.")
      for b in units[i + 1:]:
        if a[:len(b)] == b or b[:len(a)] == a:
          raise ValueError(f"blocks {_path_name(a)!r} and {_path_name(b)!r} overlap: give"
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

  if isinstance(model, tq_nnx.QUANT_LAYERS):
    return [()]
  visit(model, ())
  # A model that only wraps another one (a module calling the model with its keyword
  # arguments): its one child would make the whole network one unit, so open it up.
  while len(units) == 1 and not isinstance(_module_at(model, units[0]), tq_nnx.QUANT_LAYERS):
    only = units.pop()
    visit(_module_at(model, only), only)
  return units


def _qdrop_hook(key, drop_prob):
  """An ``input_quant_hook``: the full-precision input with probability ``drop_prob``."""

  def hook(layer, x, quantized):
    del layer
    return jnp.where(jax.random.bernoulli(key, drop_prob, x.shape), x, quantized)

  return hook


def _unit_apply_fn(work_unit, drop_prob: float, *, patches: bool, call):
  """The unit as ``(kernels, act_scales, x, key) -> output`` and the paths of its leaves.

  A copy of the unit whose kernels are used as given (no weight quantization: the
  reconstruction passes soft or hard-rounded weights) and whose inputs are quantized
  with the given activation step sizes; with ``key`` and ``drop_prob > 0`` each
  quantized input keeps its full-precision value with probability ``drop_prob`` (QDrop).
  ``call(module, x)`` runs the unit as the model's forward pass does (its keyword
  arguments).
  """
  unit = nnx.clone(work_unit)
  for _, layer in tq_nnx.quant_layers(unit):
    layer.kernel.set_metadata(bits=None)
  if patches:
    _patches(unit)
  unit.eval()
  graphdef, kernels, acts, rest = nnx.split(unit, tq_nnx.QuantWeight, tq_nnx.ActScale, ...)
  kernel_paths, kernel_def = jax.tree_util.tree_flatten_with_path(kernels)
  act_paths, act_def = jax.tree_util.tree_flatten_with_path(acts)

  def apply_fn(weights, act_scales, x, key):
    module = nnx.merge(graphdef, jax.tree.unflatten(kernel_def, list(weights)),
                       jax.tree.unflatten(act_def, list(act_scales or ())), rest)
    if key is not None and drop_prob > 0:
      for index, (_, layer) in enumerate(tq_nnx.quant_layers(module)):
        layer.input_quant_hook = _qdrop_hook(jax.random.fold_in(key, index), drop_prob)
    return call(module, x)

  # Leaf paths as the layers' paths inside the unit (without the trailing variable name).
  kernel_layers = [nnx_traversal.state_path(path)[:-1] for path, _ in kernel_paths]
  act_layers = [nnx_traversal.state_path(path)[:-1] for path, _ in act_paths]
  return apply_fn, kernel_layers, act_layers


def _set_act_quant(layer, *, bits: int, signed: bool, scale) -> None:
  """Makes `layer` quantize its inputs to `bits` (LSQ) with step size `scale`."""
  layer.act_bits = int(bits)
  layer.signed_act = bool(signed)
  layer.act_scale = nnx.data(tq_nnx.ActScale(jnp.asarray(scale, jnp.float32)))


def _quantize_activations(fp, plan, batch, *, act_bits: int, first_last_bits, forward) -> None:
  """Sets LSQ input quantization on the plan's working layers, from the FP layers' inputs.

  Signed where the full-precision input on ``batch`` has negative values; step size by
  MSE search on it; ``first_last_bits`` (if given) for the first and last layer called.
  The FP copy's layers are left with full-precision inputs.
  """
  for _, layer in tq_nnx.quant_layers(fp):
    layer.act_bits = None  # the reference is full precision throughout
  with tq_nnx.capture(fp) as captured:
    forward(fp, batch)
  for index, (name, fp_layer, work_layer, _, _) in enumerate(plan):
    inputs = captured.inputs(fp_layer)
    if not inputs:
      continue  # never called: its input stays as it is
    x = inputs[0]
    signed = bool(jnp.min(x) < 0)
    edge = index in (0, len(plan) - 1) and first_last_bits is not None
    layer_act_bits = first_last_bits if edge else act_bits
    scale = quantizers.init_scale(x, bits=layer_act_bits, method="mse", signed=signed)
    _set_act_quant(work_layer, bits=layer_act_bits, signed=signed, scale=scale)


def reconstruct_model(model, calibration_batches, *, bits: int, act_bits: Optional[int] = None,
                      granularity: str = "block", blocks=None, drop_prob: float = 0.0,
                      per_channel: bool = False, first_last_bits: Optional[int] = None,
                      iters: int = 10_000, batch_size: int = 32, lam: float = 0.01,
                      lr: float = 1e-3, act_lr: float = 4e-5, warmup: float = 0.2,
                      beta: tuple[float, float] = (20.0, 2.0), beta_mode: str = "cosine",
                      fallback_to_nearest: bool = True, key, progress: bool = True,
                      return_info: bool = False, loop: str = "auto",
                      apply_fn: Optional[Callable] = None):
  """Post-training quantization by block reconstruction (BRECQ), QDrop, with activations.

  Like :func:`adaround_model`, on a copy of ``model`` whose trquant layers are in full
  precision, but the unit of reconstruction is a block of layers and activations can
  be quantized too:

  1. weights: every trquant layer gets ``bits`` (``first_last_bits`` for the first and
     last layer called) with MSE step sizes; with ``act_bits``, every layer's input is
     LSQ-quantized to ``act_bits`` (``first_last_bits`` at the edges), signed where the
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
     (BatchNorm in evaluation mode); ``drop_prob = 0.5`` is QDrop (on the unit's input
     and on every quantized input inside it);
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
      plain NNX model by ``trquant.nnx.quantize(model, trquant.nnx.QuantRule())``).
      It is not modified.
    calibration_batches: model inputs ``(N, ...)`` or an iterable of batches.
    bits: weight bit width in ``[2, 16]``.
    act_bits: activation bit width, or None for full-precision activations.
    granularity: ``"block"`` or ``"layer"``.
    blocks: None (automatic), or a list of module paths (e.g. ``["blocks/0"]``).
    drop_prob: QDrop's probability in ``[0, 1)``; 0 for BRECQ.
    per_channel: one weight step size per output channel.
    first_last_bits: weight (and activation) bits of the first and last layer called.
    iters, batch_size, lam, lr, warmup, beta, beta_mode: as
      :func:`trquant.adaround.reconstruct_layer` (``iters`` per unit).
    act_lr: Adam learning rate of the activation step sizes.
    fallback_to_nearest: never leave a unit worse than nearest rounding (step 4).
    key: a jax PRNG key; unit ``i`` uses ``fold_in(key, i)``.
    progress: a tqdm progress bar over the units (if tqdm is installed).
    return_info: also return per-unit :class:`BlockReport` records.
    loop: how each unit's iterations run (``"auto"``, ``"scan"``, ``"steps"``), see
      :func:`trquant.adaround.reconstruct_block`.
    apply_fn: ``(model, batch) -> output``, how the forward pass is run on a
      calibration batch; default ``model(batch)``. E.g. ``lambda m, x: m(x,
      rngs=None)``, or ``lambda m, tokens: m(tokens, cache=None, segment_ids=None)``.

  Returns:
    A new model with the reconstructed weights (kernel ``= scale * codes``, a frozen
    :class:`trquant.nnx.WeightScale`) and, with ``act_bits``, the learned activation
    step sizes; or ``(model, reports)``.

  Raises:
    ValueError: for bad bits, granularity, blocks (a path that is not a module,
      holds no trquant layer, or overlaps another), ``drop_prob``, calibration data,
      a unit not called eagerly, called with several inputs or an array keyword
      argument, a non-callable ``apply_fn``, or bad hyper-parameters.

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
    ...     Net(), x, bits=3, act_bits=4, iters=50, key=jax.random.key(1), progress=False,
    ...     return_info=True)
    >>> [r.layers for r in reports], q.head.act_bits
    ([('body/layers/0', 'body/layers/2'), ('head',)], 4)
  """
  batches = _calibration_list(calibration_batches)
  forward = _forward(apply_fn)
  if granularity not in GRANULARITIES:
    raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
  if act_bits is not None:
    rounding.weight_grid(act_bits, False, "act_bits")
  if (isinstance(drop_prob, (bool, np.bool_)) or not isinstance(drop_prob, (int, float))
      or not 0.0 <= float(drop_prob) < 1.0):
    raise ValueError(f"`drop_prob` must be a number in [0, 1), got {drop_prob!r}.")
  if drop_prob > 0 and act_bits is None:
    raise ValueError("`drop_prob` > 0 (QDrop) drops activation quantization: it needs"
                     " `act_bits`.")
  loops.check_loop(loop)
  rounding.check_loop_args(iters=iters, batch_size=batch_size, lam=lam, lr=lr, warmup=warmup,
                           beta=beta, beta_mode=beta_mode)
  fp, work, plan = _plan(model, batches, bits=bits, per_channel=per_channel,
                         first_last_bits=first_last_bits, forward=forward)
  units = _units(work, granularity, blocks)
  by_name = {name: (fp_layer, work_layer, layer_bits, scale)
             for name, fp_layer, work_layer, layer_bits, scale in plan}
  order = [name for name, *_ in plan]  # layers in call order
  if act_bits is not None:
    _quantize_activations(fp, plan, batches[0], act_bits=act_bits,
                          first_last_bits=first_last_bits, forward=forward)

  def first_call(unit):
    names = [i for i, name in enumerate(order)
             if _path_name(unit) == name or name.startswith(_path_name(unit) + "/") or not unit]
    return min(names) if names else len(order)

  units.sort(key=first_call)
  bar = _progress_bar(len(units), "reconstruct") if progress else None
  reports = []
  try:
    for index, unit in enumerate(units):
      name = _path_name(unit)
      if bar is not None:
        bar.set_postfix_str(name)
      start = time.perf_counter()
      x_q, _, _ = _record_unit(work, unit, batches, name=f"unit {name}", forward=forward)
      x_fp, y_fp, unit_kwargs = _record_unit(fp, unit, batches, name=f"unit {name}",
                                             forward=forward)
      captured_at = time.perf_counter()
      work_unit = _module_at(work, unit)
      # The model itself as a unit runs as apply_fn runs it; a sub-module as its parent
      # called it, with the keyword arguments recorded.
      call = forward if not unit else (
          lambda module, x, kwargs=unit_kwargs: module(x, **kwargs))
      unit_fn, kernel_layers, act_layers = _unit_apply_fn(
          work_unit, float(drop_prob), patches=_scan_on_cpu(loop), call=call)
      prefix = name + "/" if unit else ""
      kernel_names = [prefix + "/".join(map(str, p)) if p else name for p in kernel_layers]
      act_names = [prefix + "/".join(map(str, p)) if p else name for p in act_layers]
      entries = [by_name[n] for n in kernel_names]
      weights = [fp_layer.kernel.get_value() for fp_layer, *_ in entries]
      scales = [scale for *_, scale in entries]
      layer_bits = [b for _, _, b, _ in entries]
      act_layers_work = [by_name[n][1] for n in act_names]
      act_scales = [layer.act_scale.get_value() for layer in act_layers_work]
      nearest_codes = [quantizers.quantize(w, s, bits=b)
                       for w, s, b in zip(weights, scales, layer_bits)]
      nearest = [quantizers.dequantize(c, s).astype(w.dtype)
                 for c, s, w in zip(nearest_codes, scales, weights)]
      result = block_lib.reconstruct_block(
          unit_fn, weights, scales, x_q, y_fp, bits=layer_bits,
          act_scales=act_scales if act_scales else None,
          x_fp=x_fp if drop_prob > 0 else None, drop_prob=float(drop_prob), iters=iters,
          batch_size=batch_size, lam=lam, lr=lr, act_lr=act_lr, warmup=warmup, beta=beta,
          beta_mode=beta_mode, key=jax.random.fold_in(key, index), loop=loop)
      jax.block_until_ready(result.weights)
      done = time.perf_counter()
      learned = list(result.act_scales) if act_scales else []
      nearest_error, reconstructed_error = block_lib.block_errors(
          unit_fn, [(nearest, act_scales), (result.weights, learned)], x_q, y_fp)
      keep_nearest = bool(fallback_to_nearest) and reconstructed_error > nearest_error
      final_weights, final_acts = ((nearest, act_scales) if keep_nearest
                                   else (result.weights, learned))
      final_codes = nearest_codes if keep_nearest else result.codes
      for (_, work_layer, _, _), weight in zip(entries, final_weights):
        work_layer.kernel.set_value(weight)
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
  return (work, reports) if return_info else work
