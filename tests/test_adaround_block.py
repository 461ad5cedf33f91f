"""reconstruct_block and reconstruct_model: block reconstruction (BRECQ), QDrop, activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant import adaround

from nnx_fixture_models import BasicBlock, ConvBN


def _rule(model, x, weight_bits, act_bits=None, first_last=None, forward_fn=None):
  """``model`` quantized by rules: ``weight_bits`` / ``act_bits``, and the first and last
  layer called at ``first_last`` bits (weights, and inputs where ``act_bits``)."""
  rules = []
  if first_last is not None:
    rules.append(trquant.nnx.first_last_rule(
        model, x[:1], weight_bits=first_last,
        act_bits=first_last if act_bits is not None else None, forward_fn=forward_fn))
  rules.append(trquant.nnx.QuantRule(weight_bits=weight_bits, act_bits=act_bits))
  return trquant.nnx.quantize_model(model, rules)


def _mlp_problem(seed=0, n=512):
  keys = jax.random.split(jax.random.key(seed), 4)
  w1 = jax.random.normal(keys[0], (8, 32)) / np.sqrt(8)
  w2 = jax.random.normal(keys[1], (32, 6)) / np.sqrt(32)
  # Correlated inputs: rounding choices then matter for the output.
  x = jax.random.normal(keys[2], (n, 8)) @ (jnp.eye(8) + 0.6 * jax.random.normal(keys[3], (8, 8)))
  return w1, w2, x


def _mlp(ws, act_scales, x, key):
  del key
  h = jax.nn.relu(x @ ws[0])
  if act_scales is not None:
    h = trquant.lsq(h, act_scales[0], bits=3, signed=False)
  return h @ ws[1]


def test_one_weight_block_is_exactly_reconstruct_layer():
  w1, _, x = _mlp_problem()
  scale = trquant.init_scale(w1, bits=2, method="mse")
  y = x @ w1 + 0.05
  common = dict(weight_bits=2, config=adaround.AdaRoundConfig(iters=80, lr=1e-2, batch_size=16),
                key=jax.random.key(3))
  layer = adaround.reconstruct_layer(lambda w, x: x @ w, w1, scale, x, y, **common)
  block = adaround.reconstruct_block(lambda ws, a, x, k: x @ ws[0], [w1], [scale], x, y, **common)
  np.testing.assert_array_equal(block.codes[0], layer.codes)
  np.testing.assert_allclose(block.reconstruction_loss, layer.reconstruction_loss, rtol=1e-6)


def test_joint_rounding_beats_nearest_on_a_two_layer_block():
  w1, w2, x = _mlp_problem()
  ws = (w1, w2)
  scales = [trquant.init_scale(w, bits=2, method="mse") for w in ws]
  y = _mlp(ws, None, x, None)
  result = adaround.reconstruct_block(_mlp, ws, scales, x, y, weight_bits=2,
                                      config=adaround.AdaRoundConfig(iters=400, lr=1e-2),
                                      key=jax.random.key(0))
  nearest = [trquant.dequantize(trquant.quantize(w, s, bits=2), s) for w, s in zip(ws, scales)]
  nearest_error = adaround.block_error(_mlp, nearest, None, x, y)
  block_error = adaround.block_error(_mlp, result.weights, None, x, y)
  assert block_error < 0.7 * nearest_error
  for codes, weight, s in zip(result.codes, result.weights, scales):
    assert set(np.unique(codes)) <= {-2.0, -1.0, 0.0, 1.0}
    np.testing.assert_array_equal(weight, s * codes)
  assert result.reconstruction_loss.shape == result.regularization_loss.shape == (400,)


def test_activation_scales_are_learned_and_stay_positive():
  w1, w2, x = _mlp_problem(1)
  ws = (w1, w2)
  scales = [trquant.init_scale(w, bits=4, method="mse") for w in ws]
  y = _mlp(ws, None, x, None)
  start = [jnp.asarray(0.5)]  # a poor step size for the hidden activations
  config = adaround.AdaRoundConfig(iters=300, lr=1e-2, act_lr=1e-2)
  result = adaround.reconstruct_block(_mlp, ws, scales, x, y, weight_bits=4, act_scales=start,
                                      config=config, key=jax.random.key(0))
  learned = float(result.act_scales[0])
  assert learned > 0 and learned != 0.5
  assert (adaround.block_error(_mlp, result.weights, result.act_scales, x, y)
          < adaround.block_error(_mlp, result.weights, start, x, y))


def test_qdrop_mixes_full_precision_inputs_and_is_deterministic_for_a_key():
  w1, w2, x = _mlp_problem(2)
  ws = (w1, w2)
  scales = [trquant.init_scale(w, bits=2, method="mse") for w in ws]
  x_q = trquant.fake_quant(x, trquant.init_scale(x, bits=2, method="mse"), bits=2)
  y = _mlp(ws, None, x, None)
  qdrop = adaround.AdaRoundConfig(iters=60, lr=1e-2, drop_prob=0.5)
  common = dict(weight_bits=2, x_fp=x, key=jax.random.key(4))
  first = adaround.reconstruct_block(_mlp, ws, scales, x_q, y, config=qdrop, **common)
  again = adaround.reconstruct_block(_mlp, ws, scales, x_q, y, config=qdrop, **common)
  plain = adaround.reconstruct_block(_mlp, ws, scales, x_q, y, config=qdrop.replace(drop_prob=0.0),
                                     **common)
  for a, b in zip(first.codes, again.codes):
    np.testing.assert_array_equal(a, b)
  # The full-precision inputs make the loss lower than with quantized inputs only.
  assert float(first.reconstruction_loss[:20].mean()) < float(plain.reconstruction_loss[:20].mean())


@pytest.mark.parametrize("kwargs, match", [
    (dict(scales="one"), "one step size per weight"),
    (dict(weight_bits=(2, 2, 2)), "one per weight"),
    (dict(weight_bits=1), "binary"),
    (dict(config=adaround.AdaRoundConfig(iters=5, drop_prob=0.5)), "x_fp"),
    (dict(x_fp="short"), "shape of `x_q`"),
    (dict(act_scales=[jnp.asarray(-1.0)]), "positive"),
    (dict(y="wide"), "outputs of shape"),
    (dict(weights=[]), "empty"),
    (dict(config={"iters": 5}), "AdaRoundConfig"),
])
def test_reconstruct_block_bad_inputs(kwargs, match):
  w1, w2, x = _mlp_problem()
  ws = [w1, w2]
  scales = [trquant.init_scale(w, bits=2, method="mse") for w in ws]
  y = _mlp(ws, None, x, None)
  args = dict(weights=ws, scales=scales, y=y, weight_bits=2,
              config=adaround.AdaRoundConfig(iters=5), key=jax.random.key(0))
  args.update(kwargs)
  if args["scales"] == "one":
    args["scales"] = scales[:1]
  if isinstance(args.get("x_fp"), str):
    args["x_fp"] = x if args["x_fp"] == "x" else x[:-1]
  if isinstance(args["y"], str):
    args["y"] = jnp.zeros((x.shape[0], 7))
  weights, scales_, y_ = args.pop("weights"), args.pop("scales"), args.pop("y")
  with pytest.raises(ValueError, match=match):
    adaround.reconstruct_block(_mlp, weights, scales_, x, y_, **args)


# ---------------------------------------------------------------------------------------
# reconstruct_model
# ---------------------------------------------------------------------------------------


def _layers(model):
  return {"/".join(map(str, path)): layer for path, layer in trquant.nnx.quant_layers(model)}


class TinyResNet(nnx.Module):
  """A ResNet-20 cut short: stem, an identity and a projection block, head."""

  def __init__(self, rngs):
    self.stem = ConvBN(1, 8, 3, signed_input=True, rngs=rngs)
    self.blocks = nnx.List([BasicBlock(8, 8, strides=1, rngs=rngs),
                            BasicBlock(8, 16, strides=2, rngs=rngs)])
    self.head = trquant.nnx.QuantLinear(16, 10, weight_bits=None, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem(x))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def digits_resnet():
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = (digits.images[..., None] / 16.0 - 0.3).astype(np.float32)
  model = TinyResNet(nnx.Rngs(0))
  model.eval()
  return model, images[:128]


@pytest.mark.integration
def test_reconstruct_model_units_are_the_stem_the_residual_blocks_and_the_head(digits_resnet):
  fp, images = digits_resnet
  before = jax.tree.map(np.asarray, nnx.state(fp))
  q, reports = adaround.reconstruct_model(_rule(fp, images, 4, 4, 8), images,
                                          config=adaround.AdaRoundConfig(iters=10),
                                          key=jax.random.key(0), progress=False)
  assert [r.name for r in reports] == ["stem", "blocks/0", "blocks/1", "head"]
  assert reports[1].layers == ("blocks/0/conv1/conv", "blocks/0/conv2/conv")
  assert reports[2].layers == ("blocks/1/conv1/conv", "blocks/1/conv2/conv",
                               "blocks/1/shortcut/conv")
  assert reports[0].weight_bits == (8,) and reports[-1].weight_bits == (8,)
  assert reports[1].weight_bits == (4, 4)
  layers = _layers(q)
  assert layers["stem/conv"].act_bits == 8 and layers["stem/conv"].signed_act  # the image
  assert layers["blocks/0/conv2/conv"].act_bits == 4
  assert not layers["blocks/0/conv2/conv"].signed_act  # post-ReLU
  for path, layer in layers.items():
    codes = layer.weight_codes()
    np.testing.assert_array_equal(layer.kernel.get_value(),
                                  codes * layer.weight_scale.get_value())
  # The input model is untouched.
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(fp)))
  assert all(layer.weight_bits is None for _, layer in trquant.nnx.quant_layers(fp))
  assert q(images[:4]).shape == (4, 10)


@pytest.mark.integration
def test_reconstruction_lowers_each_units_error(digits_resnet):
  fp, images = digits_resnet
  _, reports = adaround.reconstruct_model(
      _rule(fp, images, 2, 4), images, granularity="block",
      blocks=["blocks/1"], config=adaround.AdaRoundConfig(iters=150, lr=1e-2, drop_prob=0.5),
      key=jax.random.key(1), progress=False)
  names = [r.name for r in reports]
  assert names == ["stem/conv", "blocks/0/conv1/conv", "blocks/0/conv2/conv", "blocks/1", "head"]
  for report in reports:
    assert report.reconstructed_error <= report.nearest_error * 1.02, report


@pytest.mark.integration
def test_fallback_keeps_nearest_where_reconstruction_ends_worse(digits_resnet):
  fp, images = digits_resnet
  # A huge rounding-loss weight and 3 iterations at a large LR leave units worse than nearest.
  kwargs = dict(granularity="block", key=jax.random.key(0),
                config=adaround.AdaRoundConfig(iters=3, lr=1.0, lam=100.0), progress=False)
  model = _rule(fp, images, 4, 4)
  plain, plain_reports = adaround.reconstruct_model(model, images, fallback_to_nearest=False,
                                                    **kwargs)
  safe, safe_reports = adaround.reconstruct_model(model, images, **kwargs)
  assert any(r.reconstructed_error > r.nearest_error for r in plain_reports)
  assert not any(r.kept_nearest for r in plain_reports)
  # Each unit keeps nearest exactly when its reconstruction ended worse (later units differ
  # from the plain run's once an earlier one kept nearest: their inputs changed).
  assert [r.kept_nearest for r in safe_reports] == [
      r.reconstructed_error > r.nearest_error for r in safe_reports]
  assert any(r.kept_nearest for r in safe_reports)
  named = lambda model: {"/".join(map(str, path)): layer
                         for path, layer in trquant.nnx.quant_layers(model)}
  nearest = named(adaround.round_to_nearest(model, images[:2]).model)
  safe_layers, plain_layers = named(safe), named(plain)
  first_kept = next(i for i, r in enumerate(safe_reports) if r.kept_nearest)
  for index, report in enumerate(safe_reports):
    for name in report.layers:
      if report.kept_nearest:
        assert report.flipped_fraction == 0.0
        np.testing.assert_array_equal(safe_layers[name].weight_codes(),
                                      nearest[name].weight_codes())
      elif index < first_kept:  # same key, same inputs: the plain run's reconstruction
        np.testing.assert_array_equal(safe_layers[name].weight_codes(),
                                      plain_layers[name].weight_codes())


@pytest.mark.integration
def test_layer_granularity_reconstructs_each_layer(digits_resnet):
  fp, images = digits_resnet
  _, reports = adaround.reconstruct_model(_rule(fp, images, 4), images, granularity="layer",
                                          config=adaround.AdaRoundConfig(iters=5),
                                          key=jax.random.key(0), progress=False)
  assert len(reports) == len(trquant.nnx.quant_layers(fp))
  assert all(len(r.layers) == 1 for r in reports)


@pytest.mark.integration
def test_reconstruct_model_on_a_quantized_transformer_block():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(16, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False, rngs=rngs)
      self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.norm(x))
      return x + self.fc(nnx.gelu(x))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Linear(4, 16, rngs=rngs)
      self.blocks = nnx.List([Block(rngs), Block(rngs)])
      self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      x = self.embed(x)
      for block in self.blocks:
        x = block(x)
      return self.head(x.mean(axis=1))

  fp = trquant.nnx.quantize_model(Net(nnx.Rngs(0)), trquant.nnx.QuantRule())
  x = jax.random.normal(jax.random.key(0), (64, 5, 4))
  q, reports = adaround.reconstruct_model(_rule(fp, x, 4, 8), x,
                                          config=adaround.AdaRoundConfig(iters=20),
                                          key=jax.random.key(1), progress=False)
  assert [r.name for r in reports] == ["embed", "blocks/0", "blocks/1", "head"]
  assert set(reports[1].layers) == {"blocks/0/attn/query", "blocks/0/attn/key",
                                    "blocks/0/attn/value", "blocks/0/attn/out", "blocks/0/fc"}
  layers = _layers(q)
  assert layers["blocks/0/attn/query"].signed_act  # LayerNorm output
  assert np.isfinite(np.asarray(q(x))).all()


@pytest.mark.integration
def test_reconstruct_model_export_round_trip(digits_resnet, tmp_path):
  fp, images = digits_resnet
  q = adaround.reconstruct_model(_rule(fp, images, 4, 4), images,
                                 config=adaround.AdaRoundConfig(iters=5), key=jax.random.key(0),
                                 progress=False).model
  path = tmp_path / "q.npz"
  trquant.export.save_integer(path, trquant.export.to_integer(q))
  fresh = nnx.clone(q)
  for _, layer in trquant.nnx.quant_layers(fresh):  # overwritten by the file below
    layer.kernel.set_value(jnp.zeros_like(layer.kernel.get_value()))
    layer.act_scale.set_value(jnp.ones_like(layer.act_scale.get_value()))
  trquant.export.load_integer(fresh, trquant.export.read_integer(path))
  np.testing.assert_array_equal(fresh(images[:8]), q(images[:8]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="tensor"), "granularity"),
    (dict(blocks=["nope"]), "not a module of the model"),
    (dict(blocks="blocks/0"), "list of module paths"),
    (dict(blocks=["blocks"]), "nnx.List"),
    (dict(blocks=["blocks/0", "blocks/0/conv1"]), "overlap"),
    (dict(blocks=["blocks/0/conv1/bn"]), "no trquant layer"),
    (dict(config=adaround.AdaRoundConfig(iters=2, drop_prob=0.5)), "act_bits"),
    (dict(config=None), "AdaRoundConfig"),
])
def test_reconstruct_model_bad_inputs(digits_resnet, kwargs, match):
  fp, images = digits_resnet
  args = dict(config=adaround.AdaRoundConfig(iters=2), key=jax.random.key(0), progress=False)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    adaround.reconstruct_model(_rule(fp, images, 4), images, **args)


def test_reconstruct_model_calibration_errors(digits_resnet):
  fp, images = digits_resnet
  model = _rule(fp, images, 4)
  common = dict(config=adaround.AdaRoundConfig(iters=2), key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="empty"):
    adaround.reconstruct_model(model, [], **common)
  with pytest.raises(ValueError, match="one shape"):
    adaround.reconstruct_model(model, [images[:8], images[:8, :4]], **common)


def test_a_unit_with_two_inputs_is_named():
  class Pair(nnx.Module):
    def __init__(self, rngs):
      self.a = trquant.nnx.QuantLinear(4, 4, weight_bits=None, rngs=rngs)

    def __call__(self, x, y):
      return self.a(x) + y

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.pair = Pair(rngs)
      self.head = trquant.nnx.QuantLinear(4, 2, weight_bits=None, rngs=rngs)

    def __call__(self, x):
      return self.head(self.pair(x, x))

  with pytest.raises(ValueError, match="must take one input"):
    adaround.reconstruct_model(_rule(Net(nnx.Rngs(0)), jnp.ones((8, 4)), 4), jnp.ones((8, 4)),
                               config=adaround.AdaRoundConfig(iters=2),
                               key=jax.random.key(0), progress=False)


def test_input_quant_hook_decides_what_the_layer_uses():
  layer = trquant.nnx.QuantLinear(4, 3, weight_bits=None, act_bits=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (5, 4))
  seen = []

  def hook(module, x_fp, x_q):
    seen.append((x_fp.shape, x_q.shape))
    return x_fp

  plain = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  quantized = layer(x)
  layer.input_quant_hook = hook
  np.testing.assert_allclose(layer(x), plain(x), atol=1e-6)  # full-precision input used
  assert seen == [((5, 4), (5, 4))]
  assert not np.allclose(quantized, plain(x))


@pytest.mark.integration
def test_round_to_nearest_with_activations_is_reconstruct_models_start(digits_resnet):
  fp, images = digits_resnet
  model = _rule(fp, images, 4, 4, 8)
  nearest = adaround.round_to_nearest(model, images).model
  layers = _layers(nearest)
  assert layers["stem/conv"].act_bits == 8 and layers["blocks/0/conv1/conv"].act_bits == 4
  x = layers["blocks/0/conv1/conv"]
  assert float(x.act_scale.get_value()) > 0 and not x.signed_act
  # One step with tiny learning rates stays at the start: V from the fractional parts rounds
  # to nearest, and the step sizes barely move. So reconstruct_model starts from this model.
  barely = adaround.reconstruct_model(
      model, images,
      config=adaround.AdaRoundConfig(iters=1, lr=1e-12, act_lr=1e-12), key=jax.random.key(0),
      progress=False).model
  for name, layer in _layers(barely).items():
    np.testing.assert_array_equal(layer.weight_codes(), layers[name].weight_codes())
    np.testing.assert_allclose(layer.act_scale.get_value(), layers[name].act_scale.get_value(),
                               rtol=1e-6)
  with pytest.raises(ValueError, match="calibration_batches"):
    adaround.round_to_nearest(model)


# ---------------------------------------------------------------------------------------
# Units called with keyword arguments; models called with keyword arguments (forward_fn)
# ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_layer_granularity_reconstructs_multi_head_attention_projections():
  # nnx.MultiHeadAttention calls its projections with out_sharding=: the keyword is
  # recorded and passed again when each projection is reconstructed on its own.
  attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
  fp = trquant.nnx.quantize_model(attn, trquant.nnx.QuantRule())
  x = jax.random.normal(jax.random.key(0), (16, 3, 8))
  q, reports = adaround.reconstruct_model(_rule(fp, x, 4, 8), x, granularity="layer",
                                          config=adaround.AdaRoundConfig(iters=2),
                                          key=jax.random.key(1), progress=False)
  assert [r.name for r in reports] == ["query", "key", "value", "out"]
  assert all(layer.weight_bits == 4 and layer.act_bits == 8 for layer in _layers(q).values())
  assert np.isfinite(np.asarray(q(x))).all()


class _KeywordBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, *, deterministic: bool, rngs=None):
    return x + self.dropout(self.fc(self.norm(x)), deterministic=deterministic, rngs=rngs)


class _KeywordNet(nnx.Module):
  """As public NNX models are written: __call__ and its blocks take keyword arguments."""

  def __init__(self, rngs):
    self.embed = nnx.Linear(4, 8, rngs=rngs)
    self.blocks = nnx.List([_KeywordBlock(rngs)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, *, deterministic: bool, rngs=None):
    x = self.embed(x)
    for block in self.blocks:
      x = block(x, deterministic=deterministic, rngs=rngs)
    return self.head(x)


def _evaluate(model, x):
  return model(x, deterministic=True, rngs=None)


@pytest.fixture(scope="module")
def keyword_net():
  fp = trquant.nnx.quantize_model(_KeywordNet(nnx.Rngs(0)), trquant.nnx.QuantRule())
  return fp, jax.random.normal(jax.random.key(0), (32, 4))


@pytest.mark.integration
def test_forward_fn_drives_a_model_called_with_keyword_arguments(keyword_net):
  fp, x = keyword_net
  with pytest.raises(TypeError, match="deterministic"):  # model(x) is not how it is called
    fp(x)
  model = _rule(fp, x, 4, 8, 8, forward_fn=_evaluate)
  nearest = adaround.round_to_nearest(model, x, forward_fn=_evaluate).model
  layers = _layers(nearest)
  assert layers["embed"].weight_bits == layers["head"].weight_bits == 8
  assert layers["blocks/0/fc"].weight_bits == 4 and layers["blocks/0/fc"].act_bits == 8
  # The block is called with deterministic=True, rngs=None: recorded and replayed. One
  # step with tiny learning rates stays at round-to-nearest's start.
  q, reports = adaround.reconstruct_model(model, x,
                                          config=adaround.AdaRoundConfig(iters=1, lr=1e-12,
                                                                         act_lr=1e-12),
                                          key=jax.random.key(0), progress=False,
                                          forward_fn=_evaluate)
  assert [r.name for r in reports] == ["embed", "blocks/0", "head"]
  np.testing.assert_allclose(_evaluate(q, x), _evaluate(nearest, x), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="forward_fn"):
    adaround.reconstruct_model(model, x, key=jax.random.key(0), progress=False,
                               forward_fn="model(x)", config=adaround.AdaRoundConfig(iters=1))


@pytest.mark.integration
def test_a_wrapper_around_the_model_is_opened_into_the_models_units(keyword_net):
  fp, x = keyword_net

  class Wrapper(nnx.Module):
    def __init__(self, model):
      self.model = model

    def __call__(self, x):
      return self.model(x, deterministic=True)

  _, reports = adaround.reconstruct_model(_rule(Wrapper(fp), x, 4), x,
                                          config=adaround.AdaRoundConfig(iters=1),
                                          key=jax.random.key(0), progress=False)
  assert [r.name for r in reports] == ["model/embed", "model/blocks/0", "model/head"]


def test_a_unit_called_with_an_array_keyword_is_named():
  class Masked(nnx.Module):
    def __init__(self, rngs):
      self.a = trquant.nnx.QuantLinear(4, 4, weight_bits=None, rngs=rngs)

    def __call__(self, x, *, mask):
      return self.a(x) * mask

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.masked = Masked(rngs)
      self.head = trquant.nnx.QuantLinear(4, 2, weight_bits=None, rngs=rngs)

    def __call__(self, x):
      return self.head(self.masked(x, mask=jnp.ones(4)))

  with pytest.raises(ValueError, match="array keyword argument mask"):
    adaround.reconstruct_model(_rule(Net(nnx.Rngs(0)), jnp.ones((8, 4)), 4), jnp.ones((8, 4)),
                               config=adaround.AdaRoundConfig(iters=2),
                               key=jax.random.key(0), progress=False)
