"""trquant.nnx.layers: the quantized NNX layers, their Variables and numerics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant.nnx import (ActScale, LearnedWeightScale, QuantConv, QuantLinear, QuantWeight,
                         WeightScale)

from nnx_fixture_models import small_mlp


def test_quant_linear_forward_matches_functional():
  layer = QuantLinear(16, 8, weight_bits=3, act_bits=4, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (4, 16))
  kernel = trquant.fake_quant(layer.kernel.get_value(), layer.weight_scale.get_value(), bits=3)
  x_q = trquant.fake_quant(x, layer.act_scale.get_value(), bits=4, signed=False)
  np.testing.assert_allclose(layer(x), x_q @ kernel + layer.bias.get_value(), rtol=1e-6)


def test_full_precision_mode_is_plain_linear():
  layer = QuantLinear(16, 8, weight_bits=None, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  np.testing.assert_allclose(layer(x), x @ layer.kernel.get_value() + layer.bias.get_value(), rtol=1e-6)
  assert layer.weight_scale is None


def test_quant_conv_matches_lax_conv_and_supports_depthwise():
  conv = QuantConv(8, 8, (3, 3), strides=2, feature_group_count=8, weight_bits=4,
                   per_channel=True, rngs=nnx.Rngs(0))
  assert conv.kernel.get_value().shape == (3, 3, 1, 8)
  assert conv.weight_scale.get_value().shape == (1, 1, 1, 8)
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 8))
  kernel = trquant.fake_quant(conv.kernel.get_value(), conv.weight_scale.get_value(), bits=4)
  expected = jax.lax.conv_general_dilated(
      x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=8) + conv.bias.get_value()
  out = conv(x)
  assert out.shape == (2, 5, 5, 8)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _jaxpr_text(fn, *args):
  """The jaxpr of ``fn(*args)`` as text, nested jaxprs included."""
  return str(jax.make_jaxpr(fn)(*args))


def _uses_xla_conv(layer, x):
  return "conv_general_dilated" in _jaxpr_text(layer, x)


# Two combinations in the default run, all eight in the integration run (each compiles).
@pytest.mark.parametrize("strides, padding", [
    (1, "SAME"), (2, [(0, 2), (1, 0)])] + [
    pytest.param(strides, padding, marks=pytest.mark.integration)
    for strides, padding in [(2, "SAME"), (1, "VALID"), (2, "VALID"), (1, 1), (2, 1),
                             (1, [(0, 2), (1, 0)])]])
def test_shifted_depthwise_conv_matches_xla_conv_and_its_gradients(strides, padding):
  def build(impl):
    return QuantConv(6, 6, 3, strides=strides, padding=padding, feature_group_count=6,
                     weight_bits=3, act_bits=4, signed_act=True, per_channel=True,
                     depthwise_impl=impl, rngs=nnx.Rngs(0))

  shift, conv = build("shift"), build("conv")
  x = jax.random.normal(jax.random.key(1), (2, 9, 8, 6))
  assert not _uses_xla_conv(shift, x) and _uses_xla_conv(conv, x)

  def loss(layer, x):
    return jnp.sum(jnp.sin(layer(x)))

  forward = nnx.jit(lambda layer, x: layer(x))  # one program each (eager: one per op)
  out_shift, out_conv = forward(shift, x), forward(conv, x)
  assert out_shift.shape == out_conv.shape
  np.testing.assert_allclose(out_shift, out_conv, rtol=1e-5, atol=1e-5)
  grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
  grads_shift, grads_conv = grad(shift, x), grad(conv, x)
  for a, b in zip(jax.tree.leaves(grads_shift), jax.tree.leaves(grads_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides,padding,size", [(1, "SAME", 52), (2, [(0, 2), (1, 0)], 104)])
def test_chunked_depthwise_kernel_gradient_matches_xla_conv(strides, padding, size):
  # Inputs with at least 2^19 output elements take a custom VJP whose kernel gradient scans
  # over batch chunks of 16; a batch of 33 leaves a partial chunk.
  def build(impl, dtype=None):
    return QuantConv(6, 6, 3, strides=strides, padding=padding, feature_group_count=6,
                     weight_bits=3, act_bits=4, signed_act=True, depthwise_impl=impl,
                     dtype=dtype, rngs=nnx.Rngs(0))

  shift, conv = build("shift"), build("conv")
  x = jax.random.normal(jax.random.key(1), (33, size, size, 6))
  loss = lambda layer, x: jnp.sum(jnp.sin(layer(x)))
  grad_fn = nnx.grad(loss, argnums=(0, 1))
  assert " scan[" in _jaxpr_text(jax.grad(lambda x: loss(shift, x)), x)
  grads_shift = nnx.jit(grad_fn)(shift, x)
  grads_conv = nnx.jit(grad_fn)(conv, x)
  for a, b in zip(jax.tree.leaves(grads_shift), jax.tree.leaves(grads_conv)):
    # float32 sums over 33 x 52 x 52 positions, in another order: 1e-4 of the largest entry.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
  # bf16 inputs: gradients come back in the inputs' dtypes.
  half = build("shift", dtype=jnp.bfloat16)
  grad_x = jax.jit(jax.grad(lambda x: jnp.sum(half(x).astype(jnp.float32))))(
      x.astype(jnp.bfloat16))
  assert grad_x.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad_x, np.float32)).all()


def test_depthwise_impl_auto_and_validation():
  x = jnp.ones((1, 5, 5, 8))
  grouped = QuantConv(8, 16, 3, feature_group_count=8, rngs=nnx.Rngs(0))  # multiplier 2
  assert _uses_xla_conv(grouped, x)
  depthwise = QuantConv(8, 8, 3, feature_group_count=8, rngs=nnx.Rngs(0))
  assert depthwise.depthwise_impl == "auto"
  assert _uses_xla_conv(depthwise, x) == (jax.default_backend() != "cpu")  # shifts on CPU
  with pytest.raises(ValueError, match="depthwise_impl"):
    QuantConv(8, 8, 3, feature_group_count=8, depthwise_impl="fft", rngs=nnx.Rngs(0))


def test_variable_types_and_metadata():
  fixed = QuantLinear(16, 8, weight_bits=2, act_bits=4, rngs=nnx.Rngs(0))
  assert isinstance(fixed.kernel, QuantWeight) and fixed.kernel.bits == 2
  assert isinstance(fixed.weight_scale, WeightScale) and not isinstance(fixed.weight_scale, nnx.Param)
  assert isinstance(fixed.act_scale, ActScale) and isinstance(fixed.act_scale, nnx.Param)
  learned = QuantLinear(16, 8, weight_bits=2, weight_quantizer="lsq", rngs=nnx.Rngs(0))
  assert isinstance(learned.weight_scale, LearnedWeightScale)
  # Frozen scales are outside the optimizer's view; learned ones inside.
  assert len(jax.tree.leaves(nnx.state(fixed, WeightScale))) == 1
  assert len(jax.tree.leaves(nnx.state(fixed, nnx.Param))) == 3  # kernel, bias, act scale
  assert len(jax.tree.leaves(nnx.state(learned, nnx.Param))) == 3  # kernel, bias, weight scale


def test_scales_receive_gradients():
  model = small_mlp(weight_quantizer="lsq")
  x = jax.random.uniform(jax.random.key(1), (32, 16))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  assert float(jnp.abs(grads.layers[0].weight_scale.get_value())) > 0
  assert float(jnp.abs(grads.layers[2].weight_scale.get_value())) > 0
  assert float(jnp.abs(grads.layers[2].act_scale.get_value())) > 0


def test_binary_mode():
  layer = QuantLinear(16, 8, weight_bits=1, act_bits=1, signed_act=True, rngs=nnx.Rngs(0))
  scale = float(layer.weight_scale.get_value())
  np.testing.assert_allclose(scale, np.mean(np.abs(layer.kernel.get_value())), rtol=1e-6)
  kernel = layer.quantized_kernel()
  np.testing.assert_allclose(np.abs(kernel), scale, rtol=1e-6)
  x = jax.random.normal(jax.random.key(1), (4, 16))
  codes = layer.quantize_input(x) / layer.act_scale.get_value()
  assert set(np.unique(np.asarray(codes)).tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"weight_bits": 0}, "bits"), ({"weight_bits": 2.5}, "bits"), ({"act_bits": 17}, "bits"),
     ({"weight_quantizer": "pact"}, "weight_quantizer")],
)
def test_bad_layer_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantLinear(4, 4, rngs=nnx.Rngs(0), **kwargs)


def test_bad_group_count():
  with pytest.raises(ValueError, match="feature_group_count"):
    QuantConv(6, 8, 3, feature_group_count=4, rngs=nnx.Rngs(0))


_GENERAL_CASES = [  # (LinearGeneral arguments, input shape)
    (dict(in_features=8, out_features=(2, 4)), (3, 5, 8)),                     # a query projection
    (dict(in_features=(2, 4), out_features=8, axis=(-2, -1)), (3, 5, 2, 4)),   # an out projection
    (dict(in_features=(3, 4), out_features=(2, 5), axis=(1, -1), use_bias=False), (2, 3, 7, 4)),
    (dict(in_features=4, out_features=6, batch_axis={0: 3}, axis=-1), (3, 5, 4)),
]


@pytest.mark.parametrize("kwargs, shape", _GENERAL_CASES)
def test_quant_linear_general_full_precision_is_nnx_linear_general(kwargs, shape):
  reference = nnx.LinearGeneral(**kwargs, bias_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
  layer = trquant.nnx.QuantLinearGeneral(**kwargs, weight_bits=None, rngs=nnx.Rngs(0),
                                         bias_init=nnx.initializers.normal())
  np.testing.assert_array_equal(layer.kernel.get_value(), reference.kernel.get_value())
  x = jax.random.normal(jax.random.key(1), shape)
  np.testing.assert_array_equal(layer(x), reference(x))


def test_quant_linear_general_quantizes_kernel_and_input_per_output_feature():
  layer = trquant.nnx.QuantLinearGeneral(8, (2, 4), weight_bits=3, act_bits=4, signed_act=True,
                                         per_channel=True, rngs=nnx.Rngs(0))
  assert layer.channel_axes == (1, 2)
  assert layer.weight_scale.get_value().shape == (1, 2, 4)
  out = trquant.nnx.QuantLinearGeneral(
      (2, 4), 8, axis=(-2, -1), weight_bits=3, per_channel=True, rngs=nnx.Rngs(0))
  assert out.weight_scale.get_value().shape == (1, 1, 8)
  x = jax.random.normal(jax.random.key(1), (3, 5, 8))
  kernel = trquant.fake_quant(layer.kernel.get_value(), layer.weight_scale.get_value(), bits=3)
  x_q = trquant.fake_quant(x, layer.act_scale.get_value(), bits=4, signed=True)
  expected = jnp.einsum("bti,ihd->bthd", x_q, kernel) + layer.bias.get_value()
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("equation, kernel_shape, bias_shape, x_shape", [
    ("nta,hab->nthb", (3, 4, 5), (3, 5), (2, 6, 4)),
    ("...a,ab->...b", (4, 5), (5,), (2, 3, 4)),
    ("btd,dk->btk", (4, 6), None, (2, 3, 4)),
])
def test_quant_einsum_full_precision_is_nnx_einsum(equation, kernel_shape, bias_shape, x_shape):
  reference = nnx.Einsum(equation, kernel_shape, bias_shape, bias_init=nnx.initializers.normal(),
                         rngs=nnx.Rngs(0))
  layer = trquant.nnx.QuantEinsum(equation, kernel_shape, bias_shape, weight_bits=None,
                                  bias_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), x_shape)
  np.testing.assert_array_equal(layer(x), reference(x))


def test_quant_einsum_per_channel_axes_follow_the_output():
  layer = trquant.nnx.QuantEinsum("nta,hab->nthb", (3, 4, 5), (3, 5), weight_bits=2,
                                  per_channel=True, rngs=nnx.Rngs(0))
  assert layer.channel_axes == (0, 2)
  assert layer.weight_scale.get_value().shape == (3, 1, 5)
  x = jax.random.normal(jax.random.key(1), (2, 6, 4))
  kernel = trquant.fake_quant(layer.kernel.get_value(), layer.weight_scale.get_value(), bits=2)
  expected = jnp.einsum("nta,hab->nthb", x, kernel) + layer.bias.get_value()[None, None]
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="->"):
    trquant.nnx.QuantEinsum("ab,bc", (2, 2), rngs=nnx.Rngs(0))


def test_quant_linear_and_conv_full_precision_are_the_nnx_layers():
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  reference = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  layer = QuantLinear(16, 8, weight_bits=None, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer(x), reference(x))
  images = jax.random.normal(jax.random.key(2), (2, 3, 9, 9, 4))  # two batch axes
  conv = nnx.Conv(4, 6, (3, 3), strides=2, padding=1, rngs=nnx.Rngs(0))
  qconv = QuantConv(4, 6, 3, strides=2, padding=1, weight_bits=None, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(qconv(images), conv(images))
  np.testing.assert_array_equal(qconv(images[0, 0]), conv(images[0, 0]))  # no batch axis


@pytest.mark.parametrize("make, group_axis", [
    (lambda g: QuantLinear(32, 6, weight_bits=4, group_size=g, rngs=nnx.Rngs(0)), 0),
    (lambda g: trquant.nnx.QuantConv(16, 6, (3, 3), weight_bits=4, group_size=g,
                                     rngs=nnx.Rngs(0)), 2),
    (lambda g: trquant.nnx.QuantEinsum("btd,dhk->bthk", (32, 2, 3), weight_bits=4,
                                       group_size=g, rngs=nnx.Rngs(0)), 0),
])
def test_group_size_layers_quantize_per_group(make, group_axis):
  layer = make(8)
  kernel, scale = layer.kernel.get_value(), layer.weight_scale.get_value()
  assert layer.weight_group == {"group_size": 8, "group_axis": group_axis}
  assert scale.shape[group_axis] == kernel.shape[group_axis] // 8
  expected = trquant.fake_quant(kernel, trquant.expand_group_scale(scale, 8, group_axis=group_axis),
                                bits=4)
  np.testing.assert_array_equal(layer.quantized_kernel(), expected)
  # One group per axis: the per-channel layer.
  whole = make(kernel.shape[group_axis])
  np.testing.assert_array_equal(whole.weight_scale.get_value(),
                                trquant.init_scale(kernel, bits=4, method="mse",
                                                   axis=whole.channel_axes))


def test_group_size_that_does_not_divide_the_inputs_is_named():
  with pytest.raises(ValueError, match="does not divide axis 0 of length 30"):
    QuantLinear(30, 4, weight_bits=4, group_size=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="positive int"):
    QuantLinear(32, 4, weight_bits=4, group_size=0, rngs=nnx.Rngs(0))


def test_dynamic_input_quantizer_has_no_scale_and_quantizes_per_token():
  layer = QuantLinear(8, 4, weight_bits=4, act_bits=8, act_quantizer="dynamic", signed_act=True,
                      rngs=nnx.Rngs(0))
  assert layer.act_scale is None
  x = jax.random.normal(jax.random.key(1), (2, 5, 8)) * 3.0
  kernel = layer.quantized_kernel()
  np.testing.assert_allclose(layer(x), trquant.fake_quant_dynamic(x, bits=8) @ kernel + layer.bias.get_value(),
                             rtol=1e-5, atol=1e-5)
  trquant.nnx.calibrate_activations(nnx.Sequential(layer), x)  # nothing to set, no error
  with pytest.raises(ValueError, match="act_quantizer"):
    QuantLinear(8, 4, act_bits=8, act_quantizer="minmax", rngs=nnx.Rngs(0))
