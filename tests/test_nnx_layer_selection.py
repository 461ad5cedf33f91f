"""trquant.nnx.quant_layers names and the max_bits selection of codes_fn / scale_fn / param_labels."""

import re

import jax
import optax
import pytest
from flax import nnx

import trquant
from trquant.nnx import QuantRule


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Linear(6, 16, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = nnx.relu(block(x))
    return self.head(x)


def _w2_with_8bit_edges():
  model = _Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (32, 6))
  q = trquant.nnx.quantize_model(model, [
      trquant.nnx.first_last_rule(model, x[:1], weight_bits=8, act_bits=8),
      QuantRule(weight_bits=2, act_bits=4, signed_act=True)])
  return q, x


def test_joined_names_are_the_names_rules_match():
  q, _ = _w2_with_8bit_edges()
  tuples = trquant.nnx.quant_layers(q)
  names = trquant.nnx.quant_layers(q, joined=True)
  assert [name for name, _ in names] == ["blocks/0", "blocks/1", "head", "stem"]
  assert [name for name, _ in names] == ["/".join(map(str, path)) for path, _ in tuples]
  assert [layer for _, layer in names] == [layer for _, layer in tuples]
  plain = _Net(nnx.Rngs(0))
  for name, _ in names:  # each name, as a rule path, matches exactly that layer
    one = trquant.nnx.quantize_model(plain, [QuantRule(re.escape(name))])
    assert [n for n, layer in trquant.nnx.quant_layers(one, joined=True)] == [name]
  with pytest.raises(ValueError, match="joined"):
    trquant.nnx.quant_layers(q, joined="yes")


def test_max_bits_leaves_8_bit_layers_out_of_tr_scheduling():
  q, _ = _w2_with_8bit_edges()
  params = trquant.nnx.values(nnx.state(q, nnx.Param))
  codes = trquant.nnx.codes_fn(q, max_bits=4)(params)
  scales = trquant.nnx.scale_fn(q, max_bits=4)(params)
  assert codes["stem"]["kernel"] is None and codes["head"]["kernel"] is None
  assert codes["blocks"][0]["kernel"] is not None and scales["blocks"][1]["kernel"] is not None
  assert scales["stem"]["kernel"] is None
  assert trquant.nnx.codes_fn(q)(params)["stem"]["kernel"] is not None  # default: all
  labels = trquant.nnx.param_labels(q, max_bits=4)
  assert labels["stem"]["kernel"] == labels["head"]["kernel"] == "float"
  assert labels["blocks"][0]["kernel"] == "quant"
  assert trquant.nnx.param_labels(q)["stem"]["kernel"] == "quant"
  # The 8-bit layers take the float partition's schedule; TR state covers the 2-bit layers.
  tx = optax.partition({
      "quant": optax.chain(optax.adam(1e-3), trquant.tr_schedule(
          1e-2, codes_fn=trquant.nnx.codes_fn(q, max_bits=4))),
      "float": optax.adam(1e-3)}, labels)
  state = jax.eval_shape(tx.init, params)
  assert optax.tree.get(state, "talr_multiplier").shape == (2,)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="max_bits"):
      trquant.nnx.codes_fn(q, max_bits=bad)
  with pytest.raises(ValueError, match="max_bits"):
    trquant.nnx.param_labels(q, max_bits=0)
  with pytest.raises(ValueError, match="max_bits=1"):  # nothing left to schedule
    trquant.nnx.codes_fn(q, max_bits=1)
