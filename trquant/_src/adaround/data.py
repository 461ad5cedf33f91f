"""Calibration data for reconstruction: what a layer or a unit of an NNX model sees.

* :func:`calibration_list`: the calibration batches, checked, as a list of arrays;
* :func:`layer_data`: a trquant layer's inputs or outputs over the batches, recorded with
  :func:`trquant.nnx.capture_layers` during eager passes stopped right after the layer;
* :func:`unit_data`: a sub-module's inputs, outputs and keyword arguments, recorded by
  standing in for it in its parent for one eager pass per batch;
* :func:`call_order`: the trquant layers in the order a forward pass calls them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from trquant._src import checks
from trquant._src.nnx import capturing
from trquant._src.nnx import traversal as nnx_traversal

__all__ = ["UnitData", "calibration_list", "call_order", "layer_data", "unit_data"]

_EAGER_ONLY = (
    "adaround captures each layer's inputs and outputs during eager forward passes, so the"
    " model's __call__ (and the code it calls) must run eagerly: remove the nnx.jit /"
    " jax.jit decorator from the model's __call__ and jit the code that calls the model"
    " instead (a train step, an evaluation function)."
)


class UnitData(NamedTuple):
  """What :func:`unit_data` records of a sub-module over the calibration batches."""

  inputs: jax.Array  # its single positional input, concatenated over the batches
  outputs: jax.Array  # its output, concatenated over the batches
  kwargs: dict  # the (non-array) keyword arguments it was called with


def calibration_list(calibration_batches) -> list:
  """The calibration batches as a non-empty list of ``(N, ...)`` arrays of one example shape.

  Accepts one array, or an iterable of arrays or of ``(inputs, labels)`` tuples; empty
  batches are dropped.
  """
  if calibration_batches is None:
    raise ValueError("`calibration_batches` is empty (None).")
  if isinstance(calibration_batches, (np.ndarray, jax.Array)):
    calibration_batches = [calibration_batches]
  batches = []
  for batch in calibration_batches:
    batch = batch[0] if isinstance(batch, (tuple, list)) else batch
    checks.check_global_batch(batch, "calibration_batches")
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


# ---------------------------------------------------------------------------------------
# Layers, through trquant.nnx.capture_layers
# ---------------------------------------------------------------------------------------
#
# A layer's inputs and outputs are collected with trquant.nnx.capture_layers, which sets the
# layer's capture_hook for the duration of one forward pass per calibration batch and,
# with stop=True, ends the (eager) pass as soon as the layer has run: collecting the
# inputs of layer k costs a forward pass through layers 1..k only.


def layer_data(model, layer, batches, *, output: bool, name: str = "the layer",
               forward_fn: Optional[Callable] = None):
  """The inputs (or, with ``output=True``, outputs) of ``layer`` over ``batches``.

  Each batch runs ``forward_fn(model, batch)`` (default ``model(batch)``) eagerly up to
  the layer (:func:`trquant.nnx.capture_layers` with ``stop=True``); the inputs are the
  layer's before its own input quantization.

  Returns:
    The values concatenated over the batches, ``(N, ...)``.

  Raises:
    ValueError: when the forward pass does not call the layer eagerly (e.g. a jitted
      ``__call__``), or the batches give values of different shapes.
  """
  forward = checks.check_forward_fn(forward_fn)
  chunks = []
  for batch in batches:
    with capturing.capture_layers(model, [layer], stop=True) as captured:
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


def call_order(model, layers, example, forward) -> list:
  """The ``layers`` that one forward pass ``forward(model, example)`` calls, in call order
  (first call of each)."""
  # values=False: the order alone; recording every layer's input and output of a whole
  # batch would hold the activations of the entire model at once.
  with capturing.capture_layers(model, layers, values=False) as captured:
    forward(model, example)
  by_name = {nnx_traversal.path_name(path): layer for path, layer in nnx_traversal.quant_layers(model)}
  return [by_name[name] for name in captured.order]


# ---------------------------------------------------------------------------------------
# Units, through trquant's capture_module (a stand-in for the sub-module)
# ---------------------------------------------------------------------------------------


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


def unit_data(model, path: tuple, batches, *, name: str = "the unit",
              forward_fn: Optional[Callable] = None) -> UnitData:
  """The inputs, outputs and keyword arguments of the sub-module at ``path`` over ``batches``.

  Each batch runs ``forward_fn(model, batch)`` (default ``model(batch)``) eagerly inside
  ``capture_module(model, path, stop=True)``, which stands in for the sub-module in its
  parent, records its single positional input, its keyword arguments and its output, and
  ends the pass. Works for any sub-module (a residual block, a layer, an attention projection
  that ``nnx.MultiHeadAttention`` calls with ``out_sharding=``); the model's code is
  not changed.

  Args:
    model: the NNX model.
    path: the sub-module's path, a tuple of attribute names and indices (``()``:
      the model itself, run by ``forward_fn``).
    batches: a list of model inputs.
    name: how errors name the sub-module.
    forward_fn: ``(model, batch) -> output``; default ``model(batch)``.

  Returns:
    A :class:`UnitData` ``(inputs, outputs, kwargs)``: inputs and outputs concatenated over
    the batches, and the keyword arguments the sub-module was called with.

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
    >>> from trquant._src.adaround.data import unit_data
    >>> data = unit_data(net, ("layers", 2), [jnp.ones((3, 4))])
    >>> data.inputs.shape, data.outputs.shape, data.kwargs
    ((3, 8), (3, 2), {})
  """
  forward = checks.check_forward_fn(forward_fn)
  path = tuple(path)
  if not path:
    inputs = list(batches)
    outputs = [forward(model, b) for b in inputs]
    return UnitData(jnp.concatenate(inputs, 0), jnp.concatenate(outputs, 0), {})
  inputs, outputs = [], []
  seen_kwargs: list[dict] = []
  for batch in batches:
    with capturing.capture_module(model, path, stop=True) as captured:
      forward(model, batch)
    if not captured.calls:
      if captured.missed:
        raise ValueError(f"{name} ran on traced values. {_EAGER_ONLY}")
      raise ValueError(f"{name} was not called eagerly by the model's forward pass,"
                       f" model(batch). If the model's __call__ is wrapped in nnx.jit / jax.jit:"
                       f" {_EAGER_ONLY} Otherwise the forward pass does not call this unit.")
    call = captured.calls[0]
    if call.extra_args or call.input is None:
      count = len(call.extra_args) + (call.input is not None)
      raise ValueError(f"{name} is called with {count} positional arguments; a"
                       " reconstruction unit must take one input. Name smaller units"
                       " (blocks=...) or reconstruct layer by layer (granularity='layer').")
    _check_unit_kwargs(call.kwargs, name)
    if seen_kwargs and not _same_kwargs(seen_kwargs[0], call.kwargs):
      raise ValueError(f"{name} is called with different keyword arguments across the"
                       f" calibration batches ({seen_kwargs[0]!r}, then {call.kwargs!r}); a"
                       " reconstruction unit is replayed with one set of them.")
    seen_kwargs.append(dict(call.kwargs))
    inputs.append(call.input)
    outputs.append(call.output)
  for what, values in (("inputs", inputs), ("outputs", outputs)):
    if len({tuple(v.shape[1:]) for v in values}) > 1:
      raise ValueError(f"the {what} of {name} have different shapes across the calibration"
                       " batches: give calibration batches of one shape.")
  return UnitData(jnp.concatenate(inputs, axis=0), jnp.concatenate(outputs, axis=0),
                  seen_kwargs[0])
