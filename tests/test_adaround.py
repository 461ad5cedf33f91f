"""trquant.adaround: the rounding relaxation, layer reconstruction and NNX-model PTQ."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import trquant
from trquant import adaround
from trquant._src.adaround import config as adaround_config
from trquant._src.adaround import reconstruction as reconstruction_lib
from trquant._src.adaround import units
from trquant.nnx import QuantConv, QuantLinear, QuantRule, WeightScale

from nnx_fixture_models import SmallCNN


def _linear(w, x):
  return x @ w


def _correlated_problem(bits=3, n=512, d_in=32, d_out=8, seed=0):
  """A linear layer whose inputs are correlated: there, nearest rounding is not optimal."""
  keys = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(keys[0], (d_in, d_out))
  mixing = jax.random.normal(keys[1], (d_in, d_in)) / math.sqrt(d_in) + jnp.eye(d_in)
  x = jax.random.normal(keys[2], (n, d_in)) @ mixing / 2.0
  return w, x, x @ w


# ---------------------------------------------------------------------------------------
# The relaxation
# ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=20))
def test_rectified_sigmoid_is_a_monotone_map_into_unit_interval(values):
  V = jnp.sort(jnp.asarray(values, jnp.float32))
  h = np.asarray(adaround.rectified_sigmoid(V))
  assert np.all((h >= 0) & (h <= 1))
  assert np.all(np.diff(h) >= 0)


def test_rectified_sigmoid_reaches_zero_and_one_at_finite_values():
  h = adaround.rectified_sigmoid(jnp.array([-4.0, 0.0, 4.0]))
  np.testing.assert_allclose(h, [0.0, 0.5, 1.0], atol=1e-6)
  # The plain sigmoid (no stretch) would not reach them.
  assert 0 < float(adaround.rectified_sigmoid(4.0, zeta=1.0, gamma=0.0)) < 1


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 2.0), st.booleans())
def test_init_alpha_makes_the_soft_weight_equal_w(seed, scale_value, per_channel):
  w = jax.random.normal(jax.random.key(seed), (6, 5)) * scale_value * 4
  scale = (jnp.full((1, 5), scale_value) * jnp.linspace(0.8, 1.2, 5) if per_channel
           else jnp.float32(scale_value))
  V = adaround.init_alpha(w, scale)
  assert bool(jnp.all(jnp.isfinite(V)))
  soft = adaround.soft_weight(w, scale, V, weight_bits=8)  # 8 bits: no weight is clipped
  np.testing.assert_allclose(soft, w, rtol=1e-5, atol=1e-5 * scale_value)


def test_init_alpha_is_finite_for_fractional_parts_at_zero_and_one():
  w = jnp.array([-2.0, 0.0, 1.0, 3.0, 0.5])  # multiples of the scale: fractional part 0
  for zeta, gamma in ((adaround_config.ZETA, adaround_config.GAMMA), (1.0, 0.0)):
    V = adaround.init_alpha(w, 1.0, zeta=zeta, gamma=gamma)
    assert bool(jnp.all(jnp.isfinite(V)))
    np.testing.assert_allclose(adaround.soft_weight(w, 1.0, V, weight_bits=4, zeta=zeta, gamma=gamma),
                               w, atol=1e-5)
  # A value just below an integer (fractional part ~1) as well.
  w = jnp.array([1.0 - 1e-7, -1e-7])
  V = adaround.init_alpha(w, 1.0, zeta=1.0, gamma=0.0)
  assert bool(jnp.all(jnp.isfinite(V)))


def test_rounding_regularizer_properties():
  V = jnp.linspace(-3.0, 3.0, 31)
  assert float(adaround.rounding_regularizer(jnp.zeros(7), 2.0)) == pytest.approx(7.0)
  assert float(adaround.rounding_regularizer(jnp.array([-10.0, 10.0]), 2.0)) == 0.0
  per_weight = jax.vmap(lambda v: adaround.rounding_regularizer(v, 2.0))(V)
  assert bool(jnp.all(per_weight >= 0)) and bool(jnp.all(per_weight <= 1))
  # Largest at h = 0.5, decreasing towards both ends.
  assert int(jnp.argmax(per_weight)) == 15
  assert bool(jnp.all(jnp.diff(per_weight[15:]) <= 0)) and bool(jnp.all(jnp.diff(per_weight[:16]) >= 0))
  # A larger beta flattens it: larger everywhere except at h in {0, 0.5, 1}.
  assert float(adaround.rounding_regularizer(V, 20.0)) > float(adaround.rounding_regularizer(V, 2.0))
  grad = jax.grad(adaround.rounding_regularizer)(jnp.array([0.5, -0.5]), 2.0)
  assert float(grad[0]) < 0 < float(grad[1])  # pushes V away from 0 (h away from 0.5)
  with pytest.raises(ValueError, match="beta"):
    adaround.rounding_regularizer(V, 0.0)


@pytest.mark.parametrize("mode", adaround_config.BETA_MODES)
def test_beta_schedule_endpoints(mode):
  schedule = adaround.beta_schedule(1000, start=20.0, end=2.0, warmup_steps=200, mode=mode)
  values = [float(schedule(step)) for step in (0, 199, 200, 600, 1000, 5000)]
  assert values[:3] == [20.0, 20.0, 20.0]
  assert values[4] == pytest.approx(2.0) and values[5] == pytest.approx(2.0)
  assert values[3] == pytest.approx(11.0)  # halfway, for both modes
  steps = jnp.arange(0, 1001)
  assert bool(jnp.all(jnp.diff(jax.vmap(schedule)(steps)) <= 1e-5))
  quarter = float(schedule(400))
  assert quarter == pytest.approx(15.5 if mode == "linear" else 2 + 9 * (1 + math.cos(math.pi / 4)))


def test_beta_schedule_bad_arguments():
  for kwargs in (dict(iters=0), dict(iters=10, warmup_steps=10), dict(iters=10, mode="exp"),
                 dict(iters=10, start=0.0), dict(iters=10, end=-1.0)):
    with pytest.raises(ValueError):
      adaround.beta_schedule(**kwargs)


# ---------------------------------------------------------------------------------------
# reconstruct_layer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,per_channel", [(2, False), (3, True)])
def test_adaround_beats_round_to_nearest_on_a_linear_layer(bits, per_channel):
  w, x, y = _correlated_problem(bits)
  scale = trquant.init_scale(w, bits=bits, method="mse", axis=-1 if per_channel else None)
  config = adaround.AdaRoundConfig(iters=600, lr=1e-2, lam=0.1, batch_size=64)
  result = adaround.reconstruct_layer(_linear, w, scale, x, y, weight_bits=bits, config=config,
                                      key=jax.random.key(0))
  nearest = trquant.fake_quant(w, scale, bits=bits)
  nearest_error = adaround.reconstruction_error(_linear, nearest, x, y)
  adaround_error = adaround.reconstruction_error(_linear, result.weights, x, y)
  assert adaround_error < 0.8 * nearest_error
  # It reaches that by rounding some weights the other way: not all codes are nearest.
  assert bool(jnp.any(result.codes != trquant.quantize(w, scale, bits=bits)))
  # The regulariser pushes h to 0 or 1: at the start every h is strictly inside (0, 1).
  soft = lambda V: float(jnp.mean((adaround.rectified_sigmoid(V) > 0)
                                  & (adaround.rectified_sigmoid(V) < 1)))
  assert soft(adaround.init_alpha(w, scale)) == 1.0 and soft(result.V) < 0.6
  assert float(result.regularization_loss[-1]) < 0.6 * float(result.regularization_loss[120])
  assert result.reconstruction_loss.shape == result.regularization_loss.shape == (600,)


def test_codes_in_range_and_hard_rounding_follows_the_sign_of_V():
  w, x, y = _correlated_problem(seed=1)
  w = w * 3.0  # some weights beyond the clipping range
  scale = jnp.float32(0.5)
  lo, hi = trquant.quant_range(2)
  result = adaround.reconstruct_layer(_linear, w, scale, x, 3.0 * y, weight_bits=2,
                                      config=adaround.AdaRoundConfig(iters=50),
                                      key=jax.random.key(3))
  codes = np.asarray(result.codes)
  assert codes.min() >= lo and codes.max() <= hi and np.all(codes == np.round(codes))
  expected = np.clip(np.floor(np.asarray(w) / 0.5) + (np.asarray(result.V) >= 0), lo, hi)
  np.testing.assert_array_equal(codes, expected)
  np.testing.assert_array_equal(result.codes, adaround.hard_codes(w, scale, result.V, weight_bits=2))
  np.testing.assert_array_equal(result.weights, 0.5 * codes)
  # Inside the range every weight is rounded down or up, never further.
  inside = (np.asarray(w) / 0.5 > lo) & (np.asarray(w) / 0.5 < hi)
  delta = codes - np.floor(np.asarray(w) / 0.5)
  assert set(np.unique(delta[inside])) <= {0.0, 1.0}


def test_reconstruct_layer_is_deterministic_for_a_key():
  w, x, y = _correlated_problem(n=128, d_in=16, d_out=4, seed=2)
  scale = trquant.init_scale(w, bits=3, method="mse")
  kwargs = dict(weight_bits=3, config=adaround.AdaRoundConfig(iters=120, lr=1e-2, batch_size=16))
  first = adaround.reconstruct_layer(_linear, w, scale, x, y, key=jax.random.key(5), **kwargs)
  second = adaround.reconstruct_layer(_linear, w, scale, x, y, key=jax.random.key(5), **kwargs)
  other = adaround.reconstruct_layer(_linear, w, scale, x, y, key=jax.random.key(6), **kwargs)
  np.testing.assert_array_equal(first.V, second.V)
  np.testing.assert_array_equal(first.reconstruction_loss, second.reconstruction_loss)
  assert not np.array_equal(first.reconstruction_loss, other.reconstruction_loss)


def test_fused_loop_matches_a_python_loop_of_steps():
  w, x, y = _correlated_problem(n=64, d_in=8, d_out=4, seed=3)
  scale = trquant.init_scale(w, bits=3, method="mse")
  key = jax.random.key(1)
  config = adaround.AdaRoundConfig(iters=30, lr=1e-2, batch_size=8, warmup_steps=3)
  result = adaround.reconstruct_layer(_linear, w, scale, x, y, weight_bits=3, config=config,
                                      key=key)
  problem, arrays = reconstruction_lib.reconstruction_problem(
      reconstruction_lib.LayerAsBlock(_linear), w, scale, x, y, weight_bits=3, config=config, key=key)
  step = jax.jit(problem.step)
  carry = problem.init(arrays)
  losses = []
  for t in range(30):
    carry, (reconstruction, _) = step(carry, jnp.int32(t), arrays)
    losses.append(float(reconstruction))
  # Same batches and updates; the compiled programs differ in float rounding only, which
  # Adam's normalisation amplifies for near-zero gradients.
  np.testing.assert_allclose(losses, result.reconstruction_loss, rtol=1e-2)
  (Vs, _), _ = carry
  np.testing.assert_allclose(Vs[0], result.V, atol=0.1)


def test_activation_enters_the_loss():
  w, x, y = _correlated_problem(n=64, d_in=8, d_out=4, seed=4)
  scale = trquant.init_scale(w, bits=3, method="mse")
  common = dict(weight_bits=3, config=adaround.AdaRoundConfig(iters=5), key=jax.random.key(0))
  plain = adaround.reconstruct_layer(_linear, w, scale, x, y, **common)
  relu = adaround.reconstruct_layer(_linear, w, scale, x, y, activation=jax.nn.relu, **common)
  assert float(relu.reconstruction_loss[0]) < float(plain.reconstruction_loss[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(iters=0), r"AdaRoundConfig: `iters` must be an int >= 1, got 0"),
    (dict(iters=2.5), "iters"),
    (dict(iters=True), "iters"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=0.0), "`lr` must be positive"),
    (dict(act_lr=-1.0), "act_lr"),
    (dict(lam=-1.0), "`lam` must be non-negative"),
    (dict(lam=float("nan")), "lam"),
    (dict(warmup_steps=10_000), r"`warmup_steps` \(10000\) must be below `iters`"),
    (dict(beta=(20.0,)), "beta"),
    (dict(beta=(20.0, 0.0)), r"beta\[1\]"),
    (dict(beta_mode="exp"), "beta_mode"),
    (dict(zeta=0.9), "zeta"),
    (dict(gamma=0.1), "gamma"),
    (dict(drop_prob=1.0), r"`drop_prob` must be a number in \[0, 1\)"),
    (dict(loop="python"), "`loop` must be one of"),
])
def test_config_names_the_bad_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adaround.AdaRoundConfig(**kwargs)


def test_config_defaults_are_the_papers_and_replace_validates():
  config = adaround.AdaRoundConfig()
  assert (config.iters, config.batch_size, config.lam, config.lr, config.start_step) == (
      10_000, 32, 0.01, 1e-3, 2000)
  assert config.warmup_steps is None and config.replace(iters=50).start_step == 10
  assert (config.beta, config.beta_mode, config.zeta, config.gamma) == (
      (20.0, 2.0), "cosine", adaround_config.ZETA, adaround_config.GAMMA)
  assert (config.act_lr, config.drop_prob, config.loop) == (4e-5, 0.0, "auto")
  other = config.replace(iters=np.int64(5), beta=[10, 1])
  assert other.iters == 5 and type(other.iters) is int and other.beta == (10.0, 1.0)
  assert hash(other) == hash(adaround.AdaRoundConfig(iters=5, beta=(10.0, 1.0)))
  with pytest.raises(ValueError, match="iters"):
    config.replace(iters=0)


def test_reconstruct_layer_bad_inputs():
  w, x, y = _correlated_problem(n=16, d_in=8, d_out=4)
  key = jax.random.key(0)
  good = dict(weight_bits=3, config=adaround.AdaRoundConfig(iters=2), key=key)
  cases = [
      (dict(good, weight_bits=1), "binary"),
      (dict(good, weight_bits=17), "weight_bits"),
      (dict(good, weight_bits=2.5), "weight_bits"),
      (dict(good, key=0), "key"),
      (dict(good, config=dict(iters=2)), "AdaRoundConfig"),
      (dict(good, config=adaround.AdaRoundConfig(drop_prob=0.5)), "x_fp"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      adaround.reconstruct_layer(_linear, w, 0.1, x, y, **kwargs)
  with pytest.raises(ValueError, match="scale"):
    adaround.reconstruct_layer(_linear, w, 0.0, x, y, **good)
  with pytest.raises(ValueError, match="scale"):
    adaround.reconstruct_layer(_linear, w, -jnp.ones((1, 4)), x, y, **good)
  with pytest.raises(ValueError, match="broadcast"):
    adaround.reconstruct_layer(_linear, w, jnp.ones((1, 5)), x, y, **good)
  with pytest.raises(ValueError, match="empty"):
    adaround.reconstruct_layer(_linear, w, 0.1, x[:0], y[:0], **good)
  with pytest.raises(ValueError, match="same number"):
    adaround.reconstruct_layer(_linear, w, 0.1, x, y[:8], **good)
  with pytest.raises(ValueError, match="shape"):
    adaround.reconstruct_layer(_linear, w, 0.1, x, y[:, :3], **good)
  with pytest.raises(ValueError, match="fails"):
    adaround.reconstruct_layer(_linear, w, 0.1, x[:, :5], y, **good)
  with pytest.raises(ValueError, match="apply_fn"):
    adaround.reconstruct_layer(None, w, 0.1, x, y, **good)


# ---------------------------------------------------------------------------------------
# NNX models
# ---------------------------------------------------------------------------------------


class _CallOrderNet(nnx.Module):
  """Attribute (alphabetical) order differs from call order: z_first runs first, a_last last."""

  def __init__(self, rngs):
    self.z_first = QuantConv(1, 8, 3, weight_bits=None, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.m_mid = QuantConv(8, 16, 3, strides=2, padding=1, use_bias=False, weight_bits=None,
                           rngs=rngs)
    self.a_last = QuantLinear(16 * 4 * 4, 10, weight_bits=None, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.z_first(x)))
    x = nnx.relu(self.m_mid(x))
    return self.a_last(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def digits_cnn():
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images[..., None] / 16.0 - 0.3).astype(np.float32)
  model = SmallCNN(num_classes=10, in_channels=1, image_size=8,
                   rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  model.eval()
  return model, images[:256], images[256:512]


def _kernels(model):
  return {path: (layer.kernel.get_value(), layer.weight_bits)
          for path, layer in trquant.nnx.quant_layers(model)}


def _ruled(model, *rules):
  return trquant.nnx.quantize_model(model, list(rules))


@pytest.mark.integration
def test_layer_reconstruction_returns_a_new_model_and_beats_nearest(digits_cnn):
  fp, calibration, held_out = digits_cnn
  before = _kernels(fp)
  model = _ruled(fp, QuantRule(weight_bits=2))
  batches = [calibration[:128], calibration[128:]]
  q, reports = adaround.reconstruct_model(
      model, batches, granularity="layer", fallback_to_nearest=False,
      config=adaround.AdaRoundConfig(iters=150, lr=1e-2, lam=0.1), key=jax.random.key(0),
      progress=False)
  nearest = adaround.round_to_nearest(model).model
  # The FP model is untouched: same kernels, still unquantized, same classes.
  after = _kernels(fp)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(before[path][0], after[path][0])
    assert after[path][1] is None
  assert all(type(layer) in (QuantConv, QuantLinear) for _, layer in trquant.nnx.quant_layers(fp))
  assert all(layer.capture_hook is None for _, layer in trquant.nnx.quant_layers(fp))
  assert q is not fp
  # The new model's layers hold hard-rounded kernels on their grids with frozen scales.
  lo, hi = trquant.quant_range(2)
  for path, layer in trquant.nnx.quant_layers(q):
    assert layer.weight_bits == 2 and type(layer.weight_scale) is WeightScale
    assert type(layer) in (QuantConv, QuantLinear)
    codes = np.asarray(layer.kernel.get_value() / layer.weight_scale.get_value())
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() >= lo - 1e-4 and codes.max() <= hi + 1e-4
    np.testing.assert_array_equal(layer.quantized_kernel(), layer.kernel.get_value())
  # Same MSE scales as the nearest baseline.
  for (_, a), (_, b) in zip(trquant.nnx.quant_layers(q), trquant.nnx.quant_layers(nearest)):
    np.testing.assert_array_equal(a.weight_scale.get_value(), b.weight_scale.get_value())
  assert [r.name for r in reports] == ["conv1/conv", "conv2/conv", "conv3/conv", "head"]
  assert nearest_reports_are_empty(adaround.round_to_nearest(model))
  for report in reports:
    assert report.reconstructed_error <= report.nearest_error * 1.001
    assert 0 <= report.flipped_fraction <= 1 and report.seconds > 0
  # Logit error against the FP model on held-out images.
  q.eval()
  nearest.eval()
  target = fp(held_out)
  error = lambda model: float(jnp.mean(jnp.sum((model(held_out) - target) ** 2, -1)))
  assert error(q) < error(nearest)
  agreement = lambda model: float(jnp.mean(model(held_out).argmax(-1) == target.argmax(-1)))
  assert agreement(q) >= agreement(nearest)


def nearest_reports_are_empty(result) -> bool:
  return isinstance(result, adaround.ModelResult) and list(result.reports) == []


@pytest.mark.integration
def test_first_last_rule_bits_follow_the_call_order_and_per_channel_scales():
  model = _CallOrderNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (64, 8, 8, 1))
  ruled = _ruled(model, trquant.nnx.first_last_rule(model, x[:1], weight_bits=8, per_channel=True),
                 QuantRule(weight_bits=3, per_channel=True))
  q = adaround.reconstruct_model(ruled, x, granularity="layer",
                                 config=adaround.AdaRoundConfig(iters=20), key=jax.random.key(0),
                                 progress=False).model
  assert (q.z_first.weight_bits, q.m_mid.weight_bits, q.a_last.weight_bits) == (8, 3, 8)
  assert q.m_mid.weight_scale.get_value().shape == (1, 1, 1, 16)
  assert q.a_last.weight_scale.get_value().shape == (1, 10)
  nearest = adaround.round_to_nearest(ruled).model
  assert (nearest.z_first.weight_bits, nearest.m_mid.weight_bits, nearest.a_last.weight_bits) == (8, 3, 8)
  assert model.z_first.weight_bits is None and model.m_mid.weight_scale is None


@pytest.mark.integration
def test_layers_the_rules_keep_in_full_precision_are_left_so():
  model = _CallOrderNet(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  config = adaround.AdaRoundConfig(iters=3)
  bits = lambda q: (q.z_first.weight_bits, q.m_mid.weight_bits, q.a_last.weight_bits)
  edges_fp = trquant.nnx.first_last_rule(model, x[:1])
  nearest = adaround.round_to_nearest(_ruled(model, edges_fp, QuantRule(weight_bits=3)))
  assert bits(nearest.model) == (None, 3, None) and nearest.reports == []
  q, reports = adaround.reconstruct_model(_ruled(model, edges_fp, QuantRule(weight_bits=3)), x,
                                          granularity="layer", config=config,
                                          key=jax.random.key(0), progress=False)
  assert bits(q) == (None, 3, None) and [r.name for r in reports] == ["m_mid"]
  # The edges compute exactly what the full-precision model computes.
  np.testing.assert_array_equal(q.z_first.kernel.get_value(), model.z_first.kernel.get_value())
  ruled = _ruled(model, edges_fp, QuantRule(weight_bits=3, act_bits=4))
  q, reports = adaround.reconstruct_model(ruled, x, granularity="layer", config=config,
                                          key=jax.random.key(0), progress=False)
  assert bits(q) == (None, 3, None) and [r.name for r in reports] == ["m_mid"]
  assert (q.z_first.act_bits, q.m_mid.act_bits, q.a_last.act_bits) == (None, 4, None)
  # A unit holding a full-precision and a quantized layer cannot be both: the error says
  # what to do.
  with pytest.raises(ValueError, match="granularity='layer'"):
    adaround.reconstruct_model(ruled, x, blocks=["<root>"], config=config,
                               key=jax.random.key(0), progress=False)


def test_group_size_rules_give_per_group_grids():
  """Per-group scales from the rules: round-to-nearest codes per group, and AdaRound on
  the same per-group grid (its codes within one step of nearest, on the grid)."""
  model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (128, 64))
  ruled = _ruled(model, QuantRule(weight_bits=3, group_size=16))
  nearest = adaround.round_to_nearest(ruled).model
  kernel = model.layers[0].kernel.get_value()
  scale = trquant.init_scale(kernel, bits=3, method="mse", axis=(1,), group_size=16,
                             group_axis=0)
  assert nearest.layers[0].weight_scale.get_value().shape == scale.shape == (4, 32)
  np.testing.assert_array_equal(nearest.layers[0].weight_scale.get_value(), scale)
  np.testing.assert_array_equal(nearest.layers[0].weight_codes(),
                                trquant.quantize(kernel, scale, bits=3, group_size=16, group_axis=0))
  q, reports = adaround.reconstruct_model(ruled, x, granularity="layer",
                                          config=adaround.AdaRoundConfig(iters=20),
                                          key=jax.random.key(0), progress=False)
  layer = q.layers[0]
  assert layer.group_size == 16 and layer.weight_scale.get_value().shape == (4, 32)
  codes = np.asarray(layer.weight_codes())
  lo, hi = trquant.quant_range(3)
  assert codes.min() >= lo and codes.max() <= hi
  np.testing.assert_allclose(layer.quantized_kernel(), layer.kernel.get_value(), atol=1e-6)
  assert np.abs(codes - np.asarray(nearest.layers[0].weight_codes())).max() <= 1
  assert all(r.reconstructed_error <= r.nearest_error * 1.001 for r in reports)


def test_the_plan_keeps_per_group_scales_as_the_layer_stores_them():
  """One step size per group in the plan, not one per weight (a model-sized copy held for
  the whole reconstruction); the unit's reconstruction repeats it over its own kernel."""
  model = nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
  ruled = _ruled(model, QuantRule(weight_bits=3, group_size=16))
  x = jnp.ones((4, 64))
  _, work, plan = units.quantization_plan(ruled, [x], forward=lambda m, b: m(b))
  (planned,) = plan
  assert planned.scale.shape == (4, 32)
  np.testing.assert_array_equal(planned.scale, work.layers[0].weight_scale.get_value())
  assert planned.work_layer.broadcast_weight_scale(planned.scale).shape == (64, 32)


def test_drivers_name_the_rules_route_for_the_arguments_they_took_before():
  model = _ruled(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), QuantRule(weight_bits=4))
  x = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match=r"takes no \['first_last', 'weight_bits'\].*quantize_model"):
    adaround.round_to_nearest(model, weight_bits=4, first_last=8)
  with pytest.raises(ValueError, match=r"takes no \['act_bits'\].*QuantRule"):
    adaround.reconstruct_model(model, x, act_bits=4, key=jax.random.key(0), progress=False)
  with pytest.raises(TypeError, match="unexpected keyword arguments \\['iters'\\]"):
    adaround.reconstruct_model(model, x, iters=4, key=jax.random.key(0), progress=False)
  # A model whose rules quantize no weight says how to quantize it.
  with pytest.raises(ValueError, match="weight_bits is None.*quantize_model"):
    adaround.round_to_nearest(_ruled(model, QuantRule()))
  # Learned input scales need calibration data.
  with pytest.raises(ValueError, match="calibration_batches"):
    adaround.round_to_nearest(_ruled(model, QuantRule(weight_bits=4, act_bits=8)))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, strides=2, padding=1),
                                    dict(kernel_size=3, padding="SAME", feature_group_count=4),
                                    dict(kernel_size=(1, 3), padding="VALID", use_bias=False)])
def test_conv_apply_fn_matches_the_layer(kwargs):
  layer = QuantConv(8, 16, weight_bits=None, rngs=nnx.Rngs(0), **kwargs)
  layer.bias is None or layer.bias.set_value(jnp.arange(16.0) / 16)
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
  np.testing.assert_allclose(units.layer_apply_fn(layer)(layer.kernel.get_value(), x), layer(x),
                             atol=1e-5)
  patches = nnx.clone(layer)
  patches.patches_conv = True  # what the model drivers use for loop="scan" on CPU
  np.testing.assert_allclose(patches(x), layer(x), atol=1e-5)
  np.testing.assert_allclose(
      units.layer_apply_fn(layer, patches=True)(layer.kernel.get_value(), x), layer(x), atol=1e-5)
  assert not layer.patches_conv


def test_reconstruct_model_bad_inputs(digits_cnn):
  fp, calibration, _ = digits_cnn
  model = _ruled(fp, QuantRule(weight_bits=4))
  common = dict(granularity="layer", config=adaround.AdaRoundConfig(iters=2),
                key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="no trquant"):
    adaround.reconstruct_model(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))),
                               np.ones((4, 2)), **common)
  with pytest.raises(ValueError, match="empty"):
    adaround.reconstruct_model(model, [], **common)
  with pytest.raises(ValueError, match="empty"):
    adaround.reconstruct_model(model, calibration[:0], **common)
  with pytest.raises(ValueError, match="AdaRoundConfig: `iters` must be an int >= 1"):
    adaround.reconstruct_model(model, calibration,
                               **dict(common, config=adaround.AdaRoundConfig(iters=0)))
  with pytest.raises(ValueError, match="AdaRoundConfig"):
    adaround.reconstruct_model(model, calibration, **dict(common, config=dict(iters=2)))
  with pytest.raises(ValueError, match="drop_prob.*act_bits"):
    adaround.reconstruct_model(model, calibration,
                               **dict(common, config=adaround.AdaRoundConfig(drop_prob=0.5)))
  with pytest.raises(ValueError, match="granularity"):
    adaround.reconstruct_model(model, calibration, **dict(common, granularity="tensor"))
  with pytest.raises(ValueError, match="model"):
    adaround.reconstruct_model(lambda x: x, calibration, **common)
  with pytest.raises(ValueError, match="no trquant"):
    adaround.round_to_nearest(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))))


class _JittedMLP(nnx.Module):
  """A model whose __call__ is nnx.jit-ted, as a user may write it for speed."""

  def __init__(self):
    self.first = QuantLinear(8, 16, weight_bits=None, rngs=nnx.Rngs(0))
    self.last = QuantLinear(16, 4, weight_bits=None, rngs=nnx.Rngs(1))

  @nnx.jit
  def __call__(self, x):
    return self.last(nnx.relu(self.first(x)))


def test_jitted_model_call_says_to_call_the_model_eagerly():
  model, x = _JittedMLP(), jax.random.normal(jax.random.key(0), (16, 8))
  model(x)  # the jitted forward pass itself works
  model = _ruled(model, QuantRule(weight_bits=3))
  common = dict(granularity="layer", config=adaround.AdaRoundConfig(iters=2),
                key=jax.random.key(0), progress=False)
  for _ in range(2):  # the second time the jitted call reuses its trace: the same message
    with pytest.raises(ValueError, match="ran on traced values.*must run eagerly: remove the nnx.jit"):
      adaround.reconstruct_model(model, x, **common)
  with pytest.raises(ValueError, match="called none of.*eagerly.*nnx.jit.*eagerly"):
    trquant.nnx.first_last_rule(_JittedMLP(), x)


def test_calibration_batches_of_different_shapes_are_named():
  # A conv net with global pooling runs on any image size, but the layers' inputs cannot
  # be concatenated over batches of different sizes.
  fp = nnx.Sequential(QuantConv(1, 4, 3, weight_bits=None, rngs=nnx.Rngs(0)),
                      lambda x: x.mean(axis=(1, 2)),
                      QuantLinear(4, 2, weight_bits=None, rngs=nnx.Rngs(1)))
  batches = [np.ones((4, 8, 8, 1), np.float32), np.ones((4, 8, 8, 1), np.float32),
             np.ones((4, 6, 6, 1), np.float32)]
  with pytest.raises(ValueError, match=r"calibration batches.*batch 0 has examples of shape"
                                       r" \(8, 8, 1\), batch 2 of shape \(6, 6, 1\)"):
    adaround.reconstruct_model(_ruled(fp, QuantRule(weight_bits=3)), batches,
                               granularity="layer", config=adaround.AdaRoundConfig(iters=2),
                               key=jax.random.key(0), progress=False)


class _KeywordMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x, *, cache=None, segment_ids):
    del cache
    return self.fc2(nnx.relu(self.fc1(x))) * segment_ids


def test_reconstruct_model_runs_a_model_called_with_keyword_arguments_through_apply_fn():
  fp = trquant.nnx.quantize_model(_KeywordMLP(nnx.Rngs(0)), trquant.nnx.QuantRule(weight_bits=8))
  x = jax.random.normal(jax.random.key(0), (32, 8))
  apply_fn = lambda model, x: model(x, cache=None, segment_ids=1.0)
  common = dict(granularity="layer", config=adaround.AdaRoundConfig(iters=2),
                key=jax.random.key(0), progress=False)
  with pytest.raises(TypeError, match="segment_ids"):
    adaround.reconstruct_model(fp, x, **common)
  q, reports = adaround.reconstruct_model(fp, x, forward_fn=apply_fn, **common)
  assert [(r.name, r.weight_bits) for r in reports] == [("fc1", (8,)), ("fc2", (8,))]
  assert q.fc1.weight_bits == 8 and np.isfinite(np.asarray(apply_fn(q, x))).all()


def test_a_single_iteration_keeps_the_default_warm_up():
  """One iteration: the default 20% warm-up rounds up to the whole run (regulariser off)."""
  config = adaround.AdaRoundConfig(iters=1)
  assert config.start_step == 1
  schedule = adaround.beta_schedule(1)
  assert float(schedule(0)) == 20.0


def test_binary_weight_grid_error_names_the_argument():
  with pytest.raises(ValueError, match="use weight_bits of layers/0 >= 2"):
    trquant.adaround.round_to_nearest(
        nnx.Sequential(QuantLinear(4, 4, weight_bits=1, rngs=nnx.Rngs(0))))
