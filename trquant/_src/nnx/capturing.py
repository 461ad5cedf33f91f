"""Recording the calls of a model's layers and sub-modules during forward passes.

One recorder for all of trquant: a :class:`Capture` collects :class:`Call` records
``(path, input, output, kwargs, extra_args)`` for a ``with`` block and, with ``stop=True``,
ends the forward pass (:class:`StopForward`, swallowed by the block) once every recorded
module has run. Two ways in:

* :func:`capture_layers`, for trquant layers: every trquant layer calls its
  ``capture_hook`` attribute (when set) after computing its output; the block sets that
  attribute on the layers it records and restores it afterwards. Nothing else about the
  model changes, and a layer reached through several references is recorded on each call.
* :func:`capture_module`, for any sub-module (a residual block, a transformer block, a
  plain NNX layer) at a path of the model: for the block, a stand-in that runs the
  sub-module and records the call takes its place in its parent.

    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(trquant.nnx.QuantLinear(4, 8, weight_bits=None, rngs=nnx.Rngs(0)),
    ...                        nnx.relu,
    ...                        trquant.nnx.QuantLinear(8, 2, weight_bits=None, rngs=nnx.Rngs(1)))
    >>> with trquant.nnx.capture_layers(model) as captured:
    ...   y = model(jnp.ones((3, 4)))
    >>> [(call.path, call.input.shape, call.output.shape) for call in captured.calls]
    [('layers/0', (3, 4), (3, 8)), ('layers/2', (3, 8), (3, 2))]

Values are recorded from eager forward passes only. A layer that runs inside a jax
transform (``jax.jit``, ``nnx.jit``, ``nnx.grad``, ``vmap``...) sees traced values, and
NNX transforms run a copy of the model whose layers carry the hook along; such calls
are listed in :attr:`Capture.missed` instead of being recorded. A jitted function
that was traced before does not run Python at all, so its layers report nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

import jax
from flax import nnx

from trquant._src.nnx import graph
from trquant._src.nnx.traversal import path_name
from trquant._src.nnx.traversal import quant_layers
from trquant._src.nnx.layers import QUANT_LAYERS


class Call(NamedTuple):
  """One recorded call of a quantized layer."""

  path: str  # the layer's "/"-joined path in the captured model
  input: Any  # the input as given to the layer (before its own input quantization)
  output: Any  # the layer's output
  kwargs: dict  # extra call arguments that change the result, e.g. {"einsum_str": ...}
  extra_args: tuple = ()  # positional arguments after the first (capture_module only)


class StopForward(Exception):
  """Raised by the capture hook to end a forward pass early (``capture_layers(..., stop=True)``)."""


class Capture:
  """What :func:`capture_layers` recorded: concrete calls in call order, and the calls it missed."""

  def __init__(self, layers: dict, stop: bool, values: bool = True):
    self._layers = layers  # id(layer) -> (path string, layer)
    self._stop = stop
    self._values = values  # False: record which layers ran, not their inputs and outputs
    self.calls: list[Call] = []
    self.missed: list[str] = []  # layers that ran traced or as copies: nothing recorded

  @property
  def order(self) -> list[str]:
    """The paths of the recorded layers in the order of their first call."""
    seen = []
    for call in self.calls:
      if call.path not in seen:
        seen.append(call.path)
    return seen

  def _path_of(self, layer: Union[str, Any]) -> str:
    if isinstance(layer, str):
      return layer
    entry = self._layers.get(id(layer))
    if entry is None:
      raise ValueError(f"{type(layer).__name__} is not one of the captured layers.")
    return entry[0]

  def inputs(self, layer) -> list:
    """The recorded inputs of a layer (the layer object or its path), in call order."""
    path = self._path_of(layer)
    return [call.input for call in self.calls if call.path == path]

  def outputs(self, layer) -> list:
    """The recorded outputs of a layer (the layer object or its path), in call order."""
    path = self._path_of(layer)
    return [call.output for call in self.calls if call.path == path]

  def _record(self, path, inputs, output, kwargs, extra_args: tuple = ()) -> None:
    if any(isinstance(leaf, jax.core.Tracer)
           for leaf in jax.tree.leaves((inputs, extra_args, output))):
      self.missed.append(f"{path} (traced: it ran inside a jax transform)")
      return
    if not self._values:  # the call order alone: no activation is kept alive
      inputs, output, extra_args = None, None, ()
    self.calls.append(Call(path, inputs, output, kwargs, extra_args))
    if self._stop and {call.path for call in self.calls} >= {p for p, _ in self._layers.values()}:
      raise StopForward


# id(layer) -> (the capture recording it, path, layer). One hook function for every capture,
# so a jitted forward pass traced during one capture is reused by the next.
_ACTIVE: dict[int, tuple[Capture, str, Any]] = {}


def record_call(layer, inputs, output, kwargs) -> None:
  """The ``capture_hook`` that :func:`capture_layers` installs: routes a call to its capture."""
  entry = _ACTIVE.get(id(layer))
  if entry is None or entry[2] is not layer:
    # A copy of a captured layer (made by nnx.jit, nnx.vmap, nnx.clone ...): it has the hook
    # but is not the instance being captured.
    for capture in {id(c): c for c, _, _ in _ACTIVE.values()}.values():
      capture.missed.append(f"a copy of a {type(layer).__name__} (the model ran inside an NNX"
                            " transform such as nnx.jit, which runs a copy of the model)")
    return
  capture, path, _ = entry
  capture._record(path, inputs, output, kwargs)


@contextlib.contextmanager
def _stop_quietly(stop: bool) -> Iterator[None]:
  """Ends a ``with`` block's forward pass quietly at :class:`StopForward` when ``stop``."""
  try:
    yield
  except StopForward:
    if not stop:
      raise


@contextlib.contextmanager
def capture_layers(model: nnx.Module, layers: Optional[Iterable] = None, *,
                   stop: bool = False, values: bool = True) -> Iterator[Capture]:
  """Records the inputs and outputs of a model's quantized layers in a ``with`` block.

  Within the block, each recorded layer calls :func:`record_call` after its
  forward pass (its ``capture_hook`` attribute); on exit the hooks are restored.

  Args:
    model: an NNX model with trquant layers (built from them, or made by
      :func:`trquant.nnx.quantize_model`).
    layers: the layers to record: None for every trquant layer of the model, or
      an iterable of layer objects of the model and/or their ``"/"``-joined paths.
    stop: end the forward pass (quietly, at the end of the ``with`` block) as soon
      as every recorded layer has been called once: collecting the inputs of a
      layer then costs a forward pass up to that layer only. Code after the
      model call inside the block does not run.
    values: record each call's input and output. False records which layers ran and in
      what order (``calls`` with ``input=None, output=None``; ``order``) and holds no
      activation: for a large model or batch, every layer's input and output would be
      kept alive until the capture is dropped.

  Yields:
    A :class:`Capture`: ``calls`` (:class:`Call` records ``(path, input, output,
    kwargs)`` in call order), ``order``, ``inputs(layer)``, ``outputs(layer)``, and
    ``missed`` (calls made inside a jax transform or by a copy of the model, which
    hold no values to record).

  Raises:
    ValueError: if a layer is not a trquant layer of the model, or is already
      being captured.
  """
  available = quant_layers(model)
  if not available:
    raise ValueError("capture_layers: the model has no trquant.nnx layer to record (build it from"
                     " trquant.nnx layers, or make it with trquant.nnx.quantize_model).")
  by_id = {id(layer): (path_name(path), layer) for path, layer in available}
  by_path = {name: layer for name, layer in by_id.values()}
  if layers is None:
    selected = dict(by_id)
  else:
    selected = {}
    for item in layers:
      if isinstance(item, str):
        if item not in by_path:
          raise ValueError(f"capture_layers: the model has no trquant layer at {item!r}; its trquant"
                           f" layers are {sorted(by_path)[:10]}.")
        item = by_path[item]
      if id(item) not in by_id:
        kind = ("not a trquant layer" if not isinstance(item, QUANT_LAYERS)
                else "a trquant layer of another model")
        raise ValueError(f"capture_layers: {type(item).__name__} is {kind}; pass layers of `model`.")
      selected[id(item)] = by_id[id(item)]
  busy = [name for key, (name, _) in selected.items() if key in _ACTIVE]
  if busy:
    raise ValueError(f"capture_layers: {busy} are already being captured (nested captures of one"
                     " layer are not supported).")
  recording = Capture(selected, stop, values)
  previous = {}
  try:
    for key, (name, layer) in selected.items():
      previous[key] = (layer, getattr(layer, "capture_hook", None))
      layer.capture_hook = record_call
      _ACTIVE[key] = (recording, name, layer)
    with _stop_quietly(stop):
      yield recording
  finally:
    for key, (layer, hook) in previous.items():
      _ACTIVE.pop(key, None)
      layer.capture_hook = hook


class _StandIn(nnx.Module):
  """Takes a sub-module's place during :func:`capture_module`: runs it, records the call.

  Holds the capture's key, not the capture, so that it stays a plain static attribute
  if the model is split (e.g. by an NNX transform) while the block runs.
  """

  def __init__(self, module, path: str, key: int):
    self.module = module
    self.path = path
    self.key = key

  def __call__(self, *args, **kwargs):
    output = self.module(*args, **kwargs)
    capture = _MODULE_CAPTURES.get(self.key)
    if capture is not None:
      first = args[0] if args else None
      capture._record(self.path, first, output, dict(kwargs), tuple(args[1:]))
    return output


# id(capture) -> capture, for the stand-ins of capture_module.
_MODULE_CAPTURES: dict[int, Capture] = {}


@contextlib.contextmanager
def capture_module(model: nnx.Module, path: tuple, *, stop: bool = False) -> Iterator[Capture]:
  """Records the calls of the sub-module at ``path`` (any ``nnx.Module``) in a ``with`` block.

  For the block, the sub-module's place in its parent holds a stand-in that runs it and
  records each call (its first positional argument as ``input``, the others as
  ``extra_args``, its keyword arguments and its output); on exit the sub-module is put
  back. Calls on traced values (inside a jax or NNX transform) are listed in
  ``missed``.

  Args:
    model: an NNX model.
    path: the sub-module's path below ``model``, a non-empty tuple of attribute names
      and indices.
    stop: end the forward pass (quietly, at the end of the block) after the first call.

  Yields:
    A :class:`Capture` whose calls carry the path joined by ``"/"``.
  """
  path = tuple(path)
  if not path:
    raise ValueError("capture_module: `path` must name a sub-module below the model, got ().")
  module = graph.module_at(model, path)
  recording = Capture({id(module): (path_name(path), module)}, stop)
  key = id(recording)
  _MODULE_CAPTURES[key] = recording
  graph.set_at(model, path, _StandIn(module, path_name(path), key))
  try:
    with _stop_quietly(stop):
      yield recording
  finally:
    graph.set_at(model, path, module)
    _MODULE_CAPTURES.pop(key, None)


__all__ = ["Call", "Capture", "StopForward", "capture_layers", "capture_module", "record_call"]
