"""trquant.nnx.calibration: float weights, scales from data, BatchNorm re-estimation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant.nnx import QuantLinear
from nnx_fixture_models import ConvNet, small_mlp


def test_load_float_weights_keeps_quantization():
  fp_model = nnx.Sequential(QuantLinear(16, 32, weight_bits=None, rngs=nnx.Rngs(5)), nnx.relu,
                            QuantLinear(32, 8, weight_bits=None, rngs=nnx.Rngs(6)))
  model = small_mlp()
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
  model = small_mlp()
  trquant.nnx.load_float_weights(model, arrays)
  np.testing.assert_array_equal(model.layers[2].kernel.get_value(), arrays["layers/2/kernel"])
  assert model.layers[2].kernel.bits == 2
  with pytest.raises(ValueError, match="layers/9/kernel.*lacks"):
    trquant.nnx.load_float_weights(model, {"layers/9/kernel": arrays["layers/2/kernel"]})


def test_calibrate_activations_sets_lsq_init():
  layer = QuantLinear(16, 8, weight_bits=2, act_bits=4, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (64, 16)) * 3.0
  trquant.nnx.calibrate_activations(layer, x)
  np.testing.assert_allclose(layer.act_scale.get_value(), 2 * np.mean(np.abs(x)) / np.sqrt(15), rtol=1e-5)
  assert not layer.calibrating


def test_calibrate_activations_rejects_negative_inputs_on_an_unsigned_grid():
  signed_input = jax.random.normal(jax.random.key(1), (64, 16))
  model = nnx.Sequential(QuantLinear(16, 8, weight_bits=2, act_bits=4, rngs=nnx.Rngs(0)),
                         nnx.relu, QuantLinear(8, 4, weight_bits=2, act_bits=4, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match=r"1 layer\(s\).*'layers/0' \(min -.*signed_act=True"):
    trquant.nnx.calibrate_activations(model, signed_input)
  assert not model.layers[0].calibrating and model.layers[0].capture_hook is None
  # Post-ReLU inputs (layers/2) and a signed grid pass; so does any grid on non-negative data.
  model.layers[0].signed_act = True
  trquant.nnx.calibrate_activations(model, signed_input)
  trquant.nnx.calibrate_activations(QuantLinear(16, 8, act_bits=4, rngs=nnx.Rngs(0)),
                                    jnp.abs(signed_input))
  # Inputs kept in full precision are not checked.
  trquant.nnx.calibrate_activations(QuantLinear(16, 8, weight_bits=2, rngs=nnx.Rngs(0)),
                                    signed_input)


def test_signed_act_auto_is_decided_by_the_calibration_pass():
  image = jax.random.normal(jax.random.key(1), (64, 16))  # negative values: a signed grid
  model = nnx.Sequential(
      QuantLinear(16, 8, weight_bits=2, act_bits=4, signed_act="auto", rngs=nnx.Rngs(0)),
      nnx.relu,
      QuantLinear(8, 4, weight_bits=2, act_bits=4, signed_act="auto", rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match="calibrate_activations"):
    model(image)  # undecided until calibration
  trquant.nnx.calibrate_activations(model, image)
  assert model.layers[0].signed_act is True and model.layers[2].signed_act is False
  # Decided as if built so: the same scales and outputs as explicit signedness.
  explicit = nnx.Sequential(
      QuantLinear(16, 8, weight_bits=2, act_bits=4, signed_act=True, rngs=nnx.Rngs(0)),
      nnx.relu,
      QuantLinear(8, 4, weight_bits=2, act_bits=4, signed_act=False, rngs=nnx.Rngs(1)))
  trquant.nnx.calibrate_activations(explicit, image)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(model, image), explicit(image))


def test_signed_act_auto_rules_and_bad_values():
  model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  image = jax.random.normal(jax.random.key(1), (8, 16))
  rules = [trquant.nnx.first_last_rule(model, image[:1], weight_bits=8, act_bits=8,
                                       signed_act="auto")]
  q = trquant.nnx.quantize_model(model, rules)
  trquant.nnx.calibrate_activations(q, image)
  assert (q.layers[0].signed_act, q.layers[2].signed_act) == (True, False)
  with pytest.raises(ValueError, match=r"QuantRule: `signed_act` must be True, False or \"auto\""):
    trquant.nnx.QuantRule(act_bits=4, signed_act="yes")
  with pytest.raises(ValueError, match="`signed_act` must be"):
    QuantLinear(16, 8, act_bits=4, signed_act=None, rngs=nnx.Rngs(0))


def test_signed_act_auto_needs_an_eager_calibration_pass():
  class JittedCall(nnx.Module):
    def __init__(self):
      self.layer = QuantLinear(16, 8, act_bits=4, signed_act="auto", rngs=nnx.Rngs(0))

    @nnx.jit
    def __call__(self, x):
      return self.layer(x)

  with pytest.raises(ValueError, match="eagerly"):
    trquant.nnx.calibrate_activations(JittedCall(), jnp.ones((4, 16)))


def test_capture_hooks_survive_calibration():
  layer = QuantLinear(16, 8, weight_bits=2, act_bits=4, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 16))
  with trquant.nnx.capture_layers(layer) as captured:
    trquant.nnx.calibrate_activations(layer, x)
  assert len(captured.calls) == 1 and layer.capture_hook is None


def test_init_weight_scales_follows_loaded_weights():
  layer = QuantLinear(16, 8, weight_bits=2, rngs=nnx.Rngs(0))
  old = float(layer.weight_scale.get_value())
  layer.kernel.set_value(layer.kernel.get_value() * 10.0)
  trquant.nnx.init_weight_scales(layer)
  np.testing.assert_allclose(float(layer.weight_scale.get_value()), 10.0 * old, rtol=1e-4)


def test_reestimate_batchnorm_is_plain_average_of_batch_statistics():
  model = ConvNet(nnx.Rngs(0))
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
  model = ConvNet(nnx.Rngs(0))
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
    trquant.nnx.batchnorm_divergence(small_mlp(), batches)


def test_reestimate_batchnorm_bad_input():
  with pytest.raises(ValueError, match="BatchNorm"):
    trquant.nnx.reestimate_batchnorm(small_mlp(), [jnp.ones((2, 16))])
  with pytest.raises(ValueError, match="num_batches"):
    trquant.nnx.reestimate_batchnorm(ConvNet(nnx.Rngs(0)), [], num_batches=0)
  with pytest.raises(ValueError, match="no batch"):
    trquant.nnx.reestimate_batchnorm(ConvNet(nnx.Rngs(0)), [])


def test_batch_counts_are_checked_alike():
  # True is not a count: reestimate_batchnorm rejects it as check_batchnorm does.
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
  batches = [jnp.ones((8, 4))]
  with pytest.raises(ValueError, match="num_batches"):
    trquant.nnx.reestimate_batchnorm(model, batches, num_batches=True)
  with pytest.raises(ValueError, match="num_batches"):
    trquant.nnx.check_batchnorm(model, batches, num_batches=True)
