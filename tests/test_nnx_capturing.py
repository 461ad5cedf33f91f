"""trquant._src.nnx.capturing: the inputs and outputs of quantized layers (capture_layers,
without touching their classes) and of any sub-module (capture_module, a stand-in)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant._src.nnx import capturing
from trquant.nnx import QuantLinear


class _Unordered(nnx.Module):
  """Attribute (tree) order a, b, c; call order c, a, b."""

  def __init__(self):
    self.a = QuantLinear(8, 8, weight_bits=None, rngs=nnx.Rngs(0))
    self.b = QuantLinear(8, 4, weight_bits=None, rngs=nnx.Rngs(1))
    self.c = QuantLinear(6, 8, weight_bits=None, rngs=nnx.Rngs(2))

  def __call__(self, x):
    return self.b(nnx.relu(self.a(self.c(x))))


def test_capture_records_inputs_and_outputs_in_call_order():
  model = _Unordered()
  x = jax.random.normal(jax.random.key(0), (5, 6))
  classes = {name: type(getattr(model, name)) for name in "abc"}
  with trquant.nnx.capture_layers(model) as captured:
    y = model(x)
  assert captured.order == ["c", "a", "b"] and captured.missed == []
  np.testing.assert_array_equal(captured.inputs(model.c)[0], x)
  np.testing.assert_array_equal(captured.outputs("b")[0], y)
  np.testing.assert_array_equal(captured.inputs("a")[0], model.c(x))
  # Nothing about the layers changed: classes, and the hook is cleared.
  assert {name: type(getattr(model, name)) for name in "abc"} == classes
  assert all(getattr(model, name).capture_hook is None for name in "abc")


def test_capture_without_values_records_the_order_and_holds_no_activation():
  model = _Unordered()
  x = jax.random.normal(jax.random.key(0), (5, 6))
  with trquant.nnx.capture_layers(model, values=False) as captured:
    model(x)
  assert captured.order == ["c", "a", "b"] and captured.missed == []
  assert all(call.input is None and call.output is None for call in captured.calls)
  assert captured.inputs("a") == [None]


def test_capture_stop_ends_the_forward_pass_after_the_layer():
  model = _Unordered()
  x = jnp.ones((2, 6))
  with trquant.nnx.capture_layers(model, [model.a], stop=True) as captured:
    model(x)
    raise AssertionError("not reached: the pass stops after layer a")
  assert [call.path for call in captured.calls] == ["a"]
  with pytest.raises(ValueError, match="no trquant layer at 'd'"):
    with trquant.nnx.capture_layers(model, ["d"]):
      pass
  with pytest.raises(ValueError, match="not a trquant layer"):
    with trquant.nnx.capture_layers(model, [nnx.Linear(2, 2, rngs=nnx.Rngs(0))]):
      pass


def test_capture_reports_traced_and_copied_calls_as_missed():
  model = _Unordered()
  x = jnp.ones((2, 6))
  with trquant.nnx.capture_layers(model) as captured:
    jax.jit(lambda x: model(x))(x)  # the same layers, on tracers
  assert captured.calls == [] and len(captured.missed) == 3 and "traced" in captured.missed[0]
  with trquant.nnx.capture_layers(model) as captured:
    nnx.jit(lambda m, x: m(x))(model, x)  # nnx.jit runs a copy of the model
  assert captured.calls == [] and "copy" in captured.missed[0]
  assert model.a.capture_hook is None
  y = nnx.jit(lambda m, x: m(x))(model, x)  # and the model still jits as before
  np.testing.assert_allclose(y, model(x), rtol=1e-6)


def test_capture_hook_is_a_documented_attribute():
  layer = QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0))
  seen = []
  layer.capture_hook = lambda layer, x, y, kwargs: seen.append((x.shape, y.shape, kwargs))
  layer(jnp.ones((3, 4)))
  assert seen == [((3, 4), (3, 2), {})]
  einsum = trquant.nnx.QuantEinsum("ab,bc->ac", (4, 2), weight_bits=None, rngs=nnx.Rngs(0))
  einsum.capture_hook = lambda layer, x, y, kwargs: seen.append(kwargs)
  einsum(jnp.ones((3, 4)), "ab,bc->ac")
  assert seen[-1] == {"einsum_str": "ab,bc->ac"}


class _Block(nnx.Module):
  def __init__(self):
    self.fc = nnx.Linear(6, 6, rngs=nnx.Rngs(0))

  def __call__(self, x, scale=None, *, shift=0.0):
    y = self.fc(x) + shift
    return y if scale is None else y * scale


_AFTER_FIRST_BLOCK: list = []  # what _TwoBlocks ran after its first block


class _TwoBlocks(nnx.Module):
  def __init__(self):
    self.blocks = nnx.List([_Block(), _Block()])

  def __call__(self, x, *, extra=False):
    x = self.blocks[0](x, shift=1.0)
    _AFTER_FIRST_BLOCK.append("first block done")
    return self.blocks[1](x, 2.0) if extra else self.blocks[1](x)


def test_capture_module_records_any_sub_module_and_puts_it_back():
  model = _TwoBlocks()
  block = model.blocks[0]
  x = jax.random.normal(jax.random.key(0), (3, 6))
  with capturing.capture_module(model, ("blocks", 0)) as captured:
    y = model(x)
  assert model.blocks[0] is block and type(model.blocks[0]) is _Block
  [call] = captured.calls
  assert call.path == "blocks/0" and call.kwargs == {"shift": 1.0} and call.extra_args == ()
  np.testing.assert_array_equal(call.input, x)
  np.testing.assert_array_equal(call.output, block(x, shift=1.0))
  np.testing.assert_array_equal(y, _TwoBlocks.__call__(model, x))
  # A second positional argument is kept apart from the input.
  with capturing.capture_module(model, ("blocks", 1)) as captured:
    model(x, extra=True)
  assert captured.calls[0].extra_args == (2.0,)
  # stop=True ends the pass right after the sub-module: the code after it does not run.
  _AFTER_FIRST_BLOCK.clear()
  with capturing.capture_module(model, ("blocks", 0), stop=True) as captured:
    model(x)
  assert len(captured.calls) == 1 and _AFTER_FIRST_BLOCK == [] and model.blocks[0] is block


def test_capture_module_lists_traced_calls_as_missed():
  model = _TwoBlocks()
  with capturing.capture_module(model, ("blocks", 0)) as captured:
    jax.jit(lambda x: model(x))(jnp.ones((2, 6)))
  assert captured.calls == [] and captured.missed and "traced" in captured.missed[0]
  with pytest.raises(ValueError, match="sub-module below the model"):
    with capturing.capture_module(model, ()):
      pass
