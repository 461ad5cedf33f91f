"""Walking an NNX model's trquant layers: the listing the other ``trquant.nnx`` modules share.

* :func:`quant_layers` lists ``(path, layer)`` of a model's trquant layers and
  :func:`require_quant_layers` does so or raises with what to do;
* :func:`path_name` and :func:`state_path` name a layer / turn an ``nnx.state`` path
  into a tuple of keys; :func:`values` strips ``nnx.Variable`` boxes from a tree.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from trquant._src import checks
from trquant._src.nnx.layers import QUANT_LAYERS


def quant_layers(model: nnx.Module, *, joined: bool = False) -> list[tuple[Any, Any]]:
  """``(path, layer)`` of every trquant layer of an NNX model, in ``nnx.iter_modules`` order.

  Args:
    model: an NNX model.
    joined: give each path as one ``"/"``-joined string (``"blocks/0/attn/query"``), the
      name :class:`trquant.nnx.QuantRule` paths match and reports use, instead of the
      tuple of keys of the layer in ``nnx.state(model)`` (``("blocks", 0, "attn",
      "query")``).

  Returns:
    A list of ``(path, layer)`` pairs.

  Example:
    >>> import trquant
    >>> from flax import nnx
    >>> model = nnx.Sequential(trquant.nnx.QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0)))
    >>> [path for path, _ in trquant.nnx.quant_layers(model)]
    [('layers', 0)]
    >>> [name for name, _ in trquant.nnx.quant_layers(model, joined=True)]
    ['layers/0']
  """
  checks.check_bool("joined", joined)
  layers = [(tuple(path), module) for path, module in nnx.iter_modules(model)
            if isinstance(module, QUANT_LAYERS)]
  if joined:
    return [(path_name(path), module) for path, module in layers]
  return layers


def path_name(path) -> str:
  """A module path as one string: its keys joined by ``"/"`` (``"blocks/0/attn/query"``)."""
  return "/".join(map(str, path))


def _key_value(entry):
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return entry


def state_path(path) -> tuple:
  """A jax key path inside an nnx.State as a tuple of keys, without a trailing `.value`."""
  keys = tuple(_key_value(entry) for entry in path)
  if keys and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    keys = keys[:-1]
  return keys


_BUILD_WITH_TRQUANT_LAYERS = (
    "Build the model from trquant.nnx layers: trquant.nnx.QuantLinear in place of nnx.Linear"
    " and trquant.nnx.QuantConv in place of nnx.Conv (same constructor plus weight_bits and"
    " act_bits), or quantize an existing NNX model with trquant.nnx.quantize_model(model, rules)."
)


def require_quant_layers(model, purpose: str, *, quantized_weights: bool = False) -> list:
  """The model's trquant layers (with quantized weights if asked); a ValueError saying
  what to do when there are none, so that `purpose` does not silently do nothing."""
  layers = quant_layers(model)
  if not layers:
    raise ValueError(f"{purpose}: the model has no trquant.nnx layer (QuantLinear, QuantConv,"
                     " QuantLinearGeneral, QuantEinsum), so there is nothing to work on."
                     f" {_BUILD_WITH_TRQUANT_LAYERS}")
  if quantized_weights:
    layers = [(path, layer) for path, layer in layers if layer.kernel.bits is not None]
    if not layers:
      raise ValueError(f"{purpose}: the model has no quantized weights (every trquant.nnx"
                       " layer has weight_bits=None), so there is nothing to work on. Build the"
                       " layers with weight_bits set (e.g. weight_bits=4).")
  return layers



def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def values(tree: Any) -> Any:
  """The tree with every ``nnx.Variable`` replaced by its current array.

  Inside ``nnx.jit``, ``nnx.state(model)`` and ``optimizer.opt_state`` hold live
  Variables that a later ``optimizer.update`` mutates: take ``values(...)`` to keep
  a snapshot (e.g. the params before an update).
  """
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable)
