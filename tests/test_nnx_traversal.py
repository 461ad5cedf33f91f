"""trquant.nnx.traversal: listing a model's trquant layers, and the error when it has none."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant.nnx import QuantConv, QuantLinear


def test_helpers_refuse_a_model_without_trquant_layers():
  plain = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  x = jnp.ones((2, 16))
  helpers = {
      "init_weight_scales": lambda: trquant.nnx.init_weight_scales(plain),
      "calibrate_activations": lambda: trquant.nnx.calibrate_activations(plain, x),
      "model_dampening_loss": lambda: trquant.nnx.model_dampening_loss(plain),
      "TR scheduling": lambda: trquant.nnx.codes_fn(plain),
      "freezing": lambda: trquant.nnx.scale_fn(plain),
  }
  for name, call in helpers.items():
    with pytest.raises(ValueError, match=f"{name}: the model has no trquant.nnx layer.*"
                                         "QuantLinear in place of nnx.Linear"):
      call()
  # Full-precision trquant layers: no dampening loss to compute (it would be a constant 0).
  fp = nnx.Sequential(QuantLinear(16, 8, weight_bits=None, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no quantized weights"):
    trquant.nnx.model_dampening_loss(fp)
  trquant.nnx.init_weight_scales(fp)  # nothing to set, but the model is built right
  trquant.nnx.calibrate_activations(fp, x)


class _Nested(nnx.Module):
  def __init__(self):
    self.stem = QuantConv(1, 4, 3, weight_bits=2, rngs=nnx.Rngs(0))
    self.plain = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
    self.blocks = nnx.List([QuantLinear(4, 4, weight_bits=None, rngs=nnx.Rngs(2)),
                            QuantLinear(4, 2, weight_bits=3, rngs=nnx.Rngs(3))])


def test_quant_layers_lists_paths_and_layers_of_trquant_layers_only():
  model = _Nested()
  listed = trquant.nnx.quant_layers(model)
  assert [path for path, _ in listed] == [("blocks", 0), ("blocks", 1), ("stem",)]
  assert [layer for _, layer in listed] == [model.blocks[0], model.blocks[1], model.stem]
  # The paths are those of nnx.state, where each layer's kernel lives.
  kernels = {tuple(path[:-1]) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if path[-1] == "kernel"}
  assert {path for path, _ in listed} <= kernels


def test_values_strips_variables_and_keeps_snapshots():
  layer = QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0))
  state = nnx.state(layer, nnx.Param)
  snapshot = trquant.nnx.values(state)
  assert not any(isinstance(leaf, nnx.Variable)
                 for leaf in jax.tree.leaves(snapshot, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  np.testing.assert_array_equal(snapshot["kernel"], layer.kernel.get_value())
  layer.kernel.set_value(layer.kernel.get_value() + 1.0)
  assert not np.array_equal(snapshot["kernel"], layer.kernel.get_value())
  assert trquant.nnx.values({"a": 1, "b": jnp.ones(2)})["a"] == 1  # other leaves pass through
