"""trquant.nnx.capturing: the quantized layers' inputs and outputs, without touching the
layers' classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
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
