"""trquant.nnx: quantized NNX layers, codes_fn / param_labels, calibration and BN re-estimation."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import trquant
from trquant.nnx import (ActScale, LearnedWeightScale, QuantConv, QuantLinear, QuantWeight,
                         WeightScale)


def _mlp(weight_quantizer="fixed", act_bits=4, seed=0):
  rngs = nnx.Rngs(seed)
  return nnx.Sequential(
      QuantLinear(16, 32, weight_bits=2, rngs=rngs, weight_quantizer=weight_quantizer),
      nnx.relu,
      QuantLinear(32, 8, weight_bits=2, act_bits=act_bits, rngs=rngs,
                  weight_quantizer=weight_quantizer),
  )


class _ConvNet(nnx.Module):
  def __init__(self, rngs, weight_bits=3):
    self.conv = QuantConv(1, 8, 3, weight_bits=weight_bits, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.depthwise = QuantConv(8, 8, 3, feature_group_count=8, weight_bits=weight_bits,
                               act_bits=weight_bits, per_channel=True, rngs=rngs)
    self.head = QuantLinear(8, 10, weight_bits=None, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.depthwise(x))
    return self.head(x.mean(axis=(1, 2)))


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", 1, [(0, 2), (1, 0)]])
def test_shifted_depthwise_conv_matches_xla_conv_and_its_gradients(strides, padding):
  def build(impl):
    return QuantConv(6, 6, 3, strides=strides, padding=padding, feature_group_count=6,
                     weight_bits=3, act_bits=4, signed_act=True, per_channel=True,
                     depthwise_impl=impl, rngs=nnx.Rngs(0))

  shift, conv = build("shift"), build("conv")
  assert shift._use_shift_depthwise() and not conv._use_shift_depthwise()
  x = jax.random.normal(jax.random.key(1), (2, 9, 8, 6))

  def loss(layer, x):
    return jnp.sum(jnp.sin(layer(x)))

  out_shift, out_conv = shift(x), conv(x)
  assert out_shift.shape == out_conv.shape
  np.testing.assert_allclose(out_shift, out_conv, rtol=1e-5, atol=1e-5)
  grads_shift = nnx.grad(loss, argnums=(0, 1))(shift, x)
  grads_conv = nnx.grad(loss, argnums=(0, 1))(conv, x)
  for a, b in zip(jax.tree.leaves(grads_shift), jax.tree.leaves(grads_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, [(0, 2), (1, 0)])])
def test_chunked_depthwise_kernel_gradient_matches_xla_conv(monkeypatch, strides, padding):
  # Large inputs take a custom VJP whose kernel gradient scans over batch chunks; force it
  # here on a small input, with a batch (5) that the chunk (3) does not divide.
  from trquant.nnx import layers as layers_module
  monkeypatch.setattr(layers_module, "_CHUNKED_KERNEL_GRAD_MIN_SIZE", 0)
  monkeypatch.setattr(layers_module, "_KERNEL_GRAD_CHUNK", 3)
  def build(impl):
    return QuantConv(6, 6, 3, strides=strides, padding=padding, feature_group_count=6,
                     weight_bits=3, act_bits=4, signed_act=True, depthwise_impl=impl,
                     rngs=nnx.Rngs(0))

  shift, conv = build("shift"), build("conv")
  x = jax.random.normal(jax.random.key(1), (5, 9, 8, 6))
  loss = lambda layer, x: jnp.sum(jnp.sin(layer(x)))
  grads_shift = jax.jit(nnx.grad(loss, argnums=(0, 1)))(shift, x)
  grads_conv = nnx.grad(loss, argnums=(0, 1))(conv, x)
  for a, b in zip(jax.tree.leaves(grads_shift), jax.tree.leaves(grads_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # bf16 inputs: gradients come back in the inputs' dtypes.
  half = QuantConv(6, 6, 3, feature_group_count=6, dtype=jnp.bfloat16, depthwise_impl="shift",
                   rngs=nnx.Rngs(0))
  grad_x = jax.grad(lambda x: jnp.sum(half(x).astype(jnp.float32)))(x.astype(jnp.bfloat16))
  assert grad_x.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad_x, np.float32)).all()


def test_depthwise_impl_auto_and_validation():
  grouped = QuantConv(8, 16, 3, feature_group_count=8, rngs=nnx.Rngs(0))  # multiplier 2
  assert not grouped._use_shift_depthwise()
  depthwise = QuantConv(8, 8, 3, feature_group_count=8, rngs=nnx.Rngs(0))
  assert depthwise._use_shift_depthwise() == (jax.default_backend() == "cpu")
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
  model = _mlp(weight_quantizer="lsq")
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


# ---------------------------------------------------------------------------------------
# codes_fn and param_labels with nnx.Optimizer
# ---------------------------------------------------------------------------------------


def test_param_labels():
  model = _ConvNet(nnx.Rngs(0))
  labels = nnx.to_flat_state(trquant.nnx.param_labels(model))
  flat = {tuple(path): label for path, label in labels}
  assert flat[("conv", "kernel")] == "quant"
  assert flat[("depthwise", "kernel")] == "quant"
  assert flat[("head", "kernel")] == "float"  # full-precision layer
  assert flat[("depthwise", "act_scale")] == "float"
  assert flat[("bn", "scale")] == "float"
  assert sum(label == "quant" for label in flat.values()) == 2


def test_partition_accepts_labels_held_in_variables():
  model = _mlp()
  # Labels made from the state by jax.tree.map keep an nnx.Variable around each label.
  held = jax.tree.map(lambda _: "sgd", nnx.state(model, nnx.Param))
  assert isinstance(held["layers"][0]["kernel"], nnx.Variable)
  grads = nnx.grad(lambda m: m(jnp.ones((2, 16))).sum())(model)
  broken = nnx.Optimizer(model, optax.partition({"sgd": optax.sgd(0.1)}, held), wrt=nnx.Param)
  with pytest.raises(ValueError, match="structure"):
    broken.update(model, grads)  # optax.partition itself cannot use them

  reference = nnx.clone(model)
  nnx.Optimizer(reference, optax.sgd(0.1), wrt=nnx.Param).update(reference, grads)
  optimizer = nnx.Optimizer(model, trquant.nnx.partition({"sgd": optax.sgd(0.1)}, held),
                            wrt=nnx.Param)
  optimizer.update(model, grads)
  np.testing.assert_array_equal(model.layers[2].kernel.get_value(),
                                reference.layers[2].kernel.get_value())
  # A model is labelled with param_labels; every label needs a transform.
  trquant.nnx.partition({"quant": optax.sgd(0.1), "float": optax.adam(1e-3)}, _mlp())
  with pytest.raises(ValueError, match=r"\['float'\] have no transform"):
    trquant.nnx.partition({"quant": optax.sgd(0.1)}, _mlp())


def _train(model, tx, steps=5, seed=0):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(seed), (16, 16))
  y = jax.random.normal(jax.random.key(seed + 1), (16, 8))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return optimizer, losses


def test_codes_fn_with_optimizer_counts_applied_transitions():
  model = _mlp()
  codes = trquant.nnx.codes_fn(model)
  tx = optax.partition({
      "quant": optax.chain(optax.adam(5e-2), trquant.tr_schedule(1e-2, codes_fn=codes)),
      "float": optax.adam(1e-3)}, trquant.nnx.param_labels(model))
  before = [np.asarray(model.layers[i].weight_codes()) for i in (0, 2)]
  scales_before = [np.asarray(model.layers[i].weight_scale.get_value()) for i in (0, 2)]
  optimizer, losses = _train(model, tx, steps=1)
  after = [np.asarray(model.layers[i].weight_codes()) for i in (0, 2)]
  expected = [np.mean(a != b) for a, b in zip(before, after)]
  measured = np.asarray(optax.tree.get(optimizer.opt_state, "measured_transition_rate"))
  assert measured.shape == (2,) and max(expected) > 0
  np.testing.assert_allclose(measured, expected, rtol=1e-6)
  # The frozen scales did not move.
  for i, scale in zip((0, 2), scales_before):
    np.testing.assert_array_equal(model.layers[i].weight_scale.get_value(), scale)


def test_training_with_tr_schedule_reduces_loss():
  model = _mlp()
  tx = optax.partition({
      "quant": optax.chain(optax.adam(1e-2), trquant.tr_schedule(
          optax.cosine_decay_schedule(1e-2, 40), codes_fn=trquant.nnx.codes_fn(model))),
      "float": optax.adam(1e-2)}, trquant.nnx.param_labels(model))
  optimizer, losses = _train(model, tx, steps=40)
  assert losses[-1] < losses[0]
  assert int(optax.tree.get(optimizer.opt_state, "tr_step")) == 40


def test_codes_fn_rejects_learned_weight_scales():
  with pytest.raises(ValueError, match="weight_quantizer='fixed'"):
    trquant.nnx.codes_fn(_mlp(weight_quantizer="lsq"))


def test_codes_fn_needs_a_quantized_layer():
  model = nnx.Sequential(QuantLinear(4, 4, weight_bits=None, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no quantized"):
    trquant.nnx.codes_fn(model)


def test_codes_fn_and_scales_fn_read_the_current_scales():
  model = _mlp()
  codes_fn, scales_fn = trquant.nnx.codes_fn(model), trquant.nnx.scales_fn(model)
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  layer = model.layers[2]
  layer.weight_scale.set_value(layer.weight_scale.get_value() * 3.0)  # e.g. a restore
  np.testing.assert_array_equal(codes_fn(params)["layers"][2]["kernel"], layer.weight_codes())
  np.testing.assert_array_equal(scales_fn(params)["layers"][2]["kernel"],
                                layer.weight_scale.get_value())


def test_transition_stats_are_snapshots_inside_jit():
  model = _mlp()
  tx = optax.partition({
      "quant": optax.chain(optax.adam(5e-2), trquant.tr_schedule(
          optax.linear_schedule(1e-2, 0.0, 10), codes_fn=trquant.nnx.codes_fn(model))),
      "float": optax.adam(1e-3)}, trquant.nnx.param_labels(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (16, 16))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    before = trquant.nnx.values(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    return before, trquant.nnx.transition_stats(optimizer)

  records = [step(model, optimizer) for _ in range(3)]
  steps = [int(stats["tr_step"]) for _, stats in records]
  targets = [float(stats["target_transition_rate"]) for _, stats in records]
  assert steps == [1, 2, 3]  # each record kept its own step, not the final state
  assert targets == pytest.approx([1e-2, 9e-3, 8e-3])
  kernels = [np.asarray(before["layers"][0]["kernel"]) for before, _ in records]
  assert not np.array_equal(kernels[0], kernels[1])
  assert set(records[0][1]) == set(trquant.nnx.TRANSITION_FIELDS)


def test_transition_stats_needs_tr_schedule():
  model = _mlp()
  with pytest.raises(ValueError, match="no trquant.tr_schedule"):
    trquant.nnx.transition_stats(nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param))


def test_load_float_weights_keeps_quantization():
  fp_model = nnx.Sequential(QuantLinear(16, 32, weight_bits=None, rngs=nnx.Rngs(5)), nnx.relu,
                            QuantLinear(32, 8, weight_bits=None, rngs=nnx.Rngs(6)))
  model = _mlp()
  loaded = trquant.nnx.load_float_weights(model, fp_model)
  assert ("layers", 0, "kernel") in loaded
  np.testing.assert_array_equal(model.layers[0].kernel.get_value(), fp_model.layers[0].kernel.get_value())
  assert model.layers[0].kernel.bits == 2  # nnx.update would have replaced it with bits=None
  wrong = nnx.Sequential(QuantLinear(16, 33, weight_bits=None, rngs=nnx.Rngs(5)))
  with pytest.raises(ValueError, match="shape"):
    trquant.nnx.load_float_weights(model, wrong)


def test_load_float_weights_from_flat_arrays():
  # The layout of an .npz checkpoint: "/"-joined paths (integer keys as digits) to arrays.
  fp_model = nnx.Sequential(QuantLinear(16, 32, weight_bits=None, rngs=nnx.Rngs(5)), nnx.relu,
                            QuantLinear(32, 8, weight_bits=None, rngs=nnx.Rngs(6)))
  arrays = {"/".join(map(str, path)): np.asarray(value) for path, value in
            nnx.to_flat_state(nnx.state(fp_model, nnx.Param))}
  model = _mlp()
  trquant.nnx.load_float_weights(model, arrays)
  np.testing.assert_array_equal(model.layers[2].kernel.get_value(), arrays["layers/2/kernel"])
  assert model.layers[2].kernel.bits == 2
  with pytest.raises(ValueError, match="layers/9/kernel.*lacks"):
    trquant.nnx.load_float_weights(model, {"layers/9/kernel": arrays["layers/2/kernel"]})


# ---------------------------------------------------------------------------------------
# Scales from data, BatchNorm re-estimation
# ---------------------------------------------------------------------------------------


def test_calibrate_activations_sets_lsq_init():
  layer = QuantLinear(16, 8, weight_bits=2, act_bits=4, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (64, 16)) * 3.0
  trquant.nnx.calibrate_activations(layer, x)
  np.testing.assert_allclose(layer.act_scale.get_value(), 2 * np.mean(np.abs(x)) / np.sqrt(15), rtol=1e-5)
  assert not layer.calibrating


def test_init_weight_scales_follows_loaded_weights():
  layer = QuantLinear(16, 8, weight_bits=2, rngs=nnx.Rngs(0))
  old = float(layer.weight_scale.get_value())
  layer.kernel.set_value(layer.kernel.get_value() * 10.0)
  trquant.nnx.init_weight_scales(layer)
  np.testing.assert_allclose(float(layer.weight_scale.get_value()), 10.0 * old, rtol=1e-4)


def test_helpers_refuse_a_model_without_trquant_layers():
  plain = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  x = jnp.ones((2, 16))
  helpers = {
      "init_weight_scales": lambda: trquant.nnx.init_weight_scales(plain),
      "calibrate_activations": lambda: trquant.nnx.calibrate_activations(plain, x),
      "dampening_loss": lambda: trquant.nnx.dampening_loss(plain),
      "TR scheduling": lambda: trquant.nnx.codes_fn(plain),
      "freezing": lambda: trquant.nnx.scales_fn(plain),
  }
  for name, call in helpers.items():
    with pytest.raises(ValueError, match=f"{name}: the model has no trquant.nnx layer.*"
                                         "QuantLinear in place of nnx.Linear"):
      call()
  # Full-precision trquant layers: no dampening loss to compute (it would be a constant 0).
  fp = nnx.Sequential(QuantLinear(16, 8, weight_bits=None, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no quantized weights"):
    trquant.nnx.dampening_loss(fp)
  trquant.nnx.init_weight_scales(fp)  # nothing to set, but the model is built right
  trquant.nnx.calibrate_activations(fp, x)


def test_reestimate_batchnorm_is_plain_average_of_batch_statistics():
  model = _ConvNet(nnx.Rngs(0))
  batches = [jax.random.normal(jax.random.key(i), (8, 6, 6, 1)) * (1 + i) for i in range(5)]
  means, variances = [], []
  for batch in batches:
    features = model.conv(batch)
    means.append(features.mean(axis=(0, 1, 2)))
    variances.append(features.var(axis=(0, 1, 2)))
  momentum = model.bn.momentum
  used = trquant.nnx.reestimate_batchnorm(model, ((b, None) for b in batches), num_batches=4)
  assert used == 4
  np.testing.assert_allclose(model.bn.mean.get_value(), np.mean(means[:4], axis=0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model.bn.var.get_value(), np.mean(variances[:4], axis=0), rtol=1e-4, atol=1e-6)
  assert model.bn.momentum == momentum and model.bn.use_running_average


def test_batchnorm_divergence_is_gaussian_kl_to_the_reestimated_statistics():
  model = _ConvNet(nnx.Rngs(0))
  batches = [jax.random.normal(jax.random.key(i), (8, 6, 6, 1)) * 3 + 1 for i in range(3)]
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  divergence = trquant.nnx.batchnorm_divergence(model, batches, num_batches=3)
  assert list(divergence) == ["bn"]
  # The model's own statistics are untouched; the reference re-estimates them on it.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)
  mu_run, var_run = model.bn.mean.get_value(), model.bn.var.get_value() + model.bn.epsilon
  trquant.nnx.reestimate_batchnorm(model, batches, num_batches=3)
  mu_pop, var_pop = model.bn.mean.get_value(), model.bn.var.get_value() + model.bn.epsilon
  # KL(N(mu_pop, var_pop) || N(mu_run, var_run)), written out per channel in float64.
  mu_run, var_run, mu_pop, var_pop = (np.asarray(a, np.float64) for a in (mu_run, var_run, mu_pop, var_pop))
  expected = np.mean(np.log(np.sqrt(var_run / var_pop))
                     + (var_pop + (mu_pop - mu_run) ** 2) / (2 * var_run) - 0.5)
  assert expected > 0.1  # fresh statistics (0, 1) are far from these inputs'
  np.testing.assert_allclose(divergence["bn"], expected, rtol=1e-4)
  # Once re-estimated on the same batches, running and population statistics agree.
  again = trquant.nnx.batchnorm_divergence(model, batches, num_batches=3)
  assert abs(again["bn"]) < 1e-5
  with pytest.raises(ValueError, match="no nnx.BatchNorm"):
    trquant.nnx.batchnorm_divergence(_mlp(), batches)


def test_reestimate_batchnorm_bad_input():
  with pytest.raises(ValueError, match="BatchNorm"):
    trquant.nnx.reestimate_batchnorm(_mlp(), [jnp.ones((2, 16))])
  with pytest.raises(ValueError, match="num_batches"):
    trquant.nnx.reestimate_batchnorm(_ConvNet(nnx.Rngs(0)), [], num_batches=0)
  with pytest.raises(ValueError, match="no batch"):
    trquant.nnx.reestimate_batchnorm(_ConvNet(nnx.Rngs(0)), [])


# ---------------------------------------------------------------------------------------
# Sharded over an 8-device CPU mesh (in a subprocess: the device count is fixed at start-up)
# ---------------------------------------------------------------------------------------

_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    import trquant
    from trquant.nnx import QuantLinear
    assert jax.device_count() == 8, jax.devices()

    class Model(nnx.Module):
      def __init__(self, rngs, sharded):
        init = nnx.initializers.lecun_normal()
        shard = (lambda spec: nnx.with_partitioning(init, spec)) if sharded else (lambda spec: init)
        self.hidden = QuantLinear(16, 64, weight_bits=2, kernel_init=shard((None, "model")), rngs=rngs)
        self.out = QuantLinear(64, 8, weight_bits=2, act_bits=4, kernel_init=shard(("model", None)), rngs=rngs)
      def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))

    def run(sharded):
      model = Model(nnx.Rngs(0), sharded)
      labels = trquant.nnx.param_labels(model)
      tx = optax.partition({
          "quant": optax.chain(optax.adam(3e-2), trquant.tr_schedule(1e-2, codes_fn=trquant.nnx.codes_fn(model))),
          "float": optax.adam(1e-3)}, labels)
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      x = jax.random.normal(jax.random.key(1), (32, 16))
      y = jax.random.normal(jax.random.key(2), (32, 8))

      @nnx.jit
      def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

      for _ in range(5):
        step(model, optimizer)
      return model, optimizer

    plain_model, plain_opt = run(False)
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
      model, opt = run(True)
      spec = model.hidden.kernel.get_value().sharding.spec
      assert tuple(spec) == (None, "model"), spec
      assert len(model.hidden.kernel.get_value().sharding.device_set) == 8
      for field in ("running_transition_rate", "talr_multiplier", "measured_transition_rate"):
        np.testing.assert_allclose(optax.tree.get(opt.opt_state, field),
                                   optax.tree.get(plain_opt.opt_state, field), rtol=1e-5, atol=1e-7)
      for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(plain_model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      print("SHARDED OK", optax.tree.get(opt.opt_state, "measured_transition_rate"))
""")


def test_sharded_model_matches_unsharded(run_on_cpu_mesh):
  assert "SHARDED OK" in run_on_cpu_mesh(_SHARDED_SCRIPT)


# ---------------------------------------------------------------------------------------
# QuantLinearGeneral and QuantEinsum: the numerics of nnx.LinearGeneral / nnx.Einsum
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# capture: the quantized layers' inputs and outputs, without touching the layers' classes
# ---------------------------------------------------------------------------------------


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
  with trquant.nnx.capture(model) as captured:
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
  with trquant.nnx.capture(model, [model.a], stop=True) as captured:
    model(x)
    raise AssertionError("not reached: the pass stops after layer a")
  assert [call.path for call in captured.calls] == ["a"]
  with pytest.raises(ValueError, match="no trquant layer at 'd'"):
    with trquant.nnx.capture(model, ["d"]):
      pass
  with pytest.raises(ValueError, match="not a trquant layer"):
    with trquant.nnx.capture(model, [nnx.Linear(2, 2, rngs=nnx.Rngs(0))]):
      pass


def test_capture_reports_traced_and_copied_calls_as_missed():
  model = _Unordered()
  x = jnp.ones((2, 6))
  with trquant.nnx.capture(model) as captured:
    jax.jit(lambda x: model(x))(x)  # the same layers, on tracers
  assert captured.calls == [] and len(captured.missed) == 3 and "traced" in captured.missed[0]
  with trquant.nnx.capture(model) as captured:
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
