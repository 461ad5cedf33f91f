"""trquant.nnx.quantize_model: rules-based surgery of plain NNX models, and everything downstream of it."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import trquant
from trquant.nnx import QuantConv, QuantLinear, QuantLinearGeneral, QuantRule

# ---------------------------------------------------------------------------------------
# Plain NNX models
# ---------------------------------------------------------------------------------------


def _mlp(seed=0):
  rngs = nnx.Rngs(seed)
  return nnx.Sequential(nnx.Linear(16, 32, rngs=rngs), nnx.relu, nnx.Linear(32, 32, rngs=rngs),
                        nnx.relu, nnx.Linear(32, 8, rngs=rngs))


class _CNN(nnx.Module):
  def __init__(self, rngs, layer=nnx.Conv, linear=nnx.Linear, **quant):
    self.conv = layer(1, 8, (3, 3), use_bias=False, rngs=rngs, **quant)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.depthwise = layer(8, 8, (3, 3), feature_group_count=8, strides=2, padding=1, rngs=rngs,
                           **quant)
    self.head = linear(8, 10, rngs=rngs, **quant)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.depthwise(x))
    return self.head(x.mean(axis=(1, 2)))


class _Block(nnx.Module):
  def __init__(self, dim, heads, rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class _ViT(nnx.Module):
  """8x8 images, 4x4 patches (4 tokens), a cls token, two blocks."""

  def __init__(self, rngs, dim=16, depth=2):
    self.patch_embed = nnx.Linear(16, dim, rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 5, dim)))
    self.blocks = nnx.List([_Block(dim, 2, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, 10, rngs=rngs)

  def __call__(self, images):
    b = images.shape[0]
    patches = images.reshape(b, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(b, 4, 16)
    x = self.patch_embed(patches)
    x = jnp.concatenate([jnp.broadcast_to(self.cls.get_value(), (b, 1, x.shape[-1])), x], 1)
    x = x + self.pos.get_value()
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


def _images(seed=0, n=8):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8))


def _types(model):
  return {"/".join(map(str, path)): type(module).__name__ for path, module in nnx.iter_modules(model)}


def _values(model):
  return {path: np.asarray(value) for path, value in
          nnx.to_flat_state(trquant.nnx.values(nnx.state(model)))}


# ---------------------------------------------------------------------------------------
# The surgery itself
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", pytest.param("vit", marks=pytest.mark.integration)])
def test_full_precision_rules_keep_the_model_and_its_outputs(name):
  model = {"mlp": lambda: _mlp(), "cnn": lambda: _CNN(nnx.Rngs(0)), "vit": lambda: _ViT(nnx.Rngs(0))}[name]()
  x = {"mlp": jnp.ones((4, 16)), "cnn": jax.random.normal(jax.random.key(1), (4, 8, 8, 1)),
       "vit": _images()}[name]
  model.eval()
  before = _values(model)
  q = trquant.nnx.quantize_model(model, QuantRule())
  kinds = set(_types(q).values())
  assert not kinds & {"Linear", "LinearGeneral", "Conv"}, kinds
  if name == "vit":
    assert _types(q)["blocks/1/attn/query"] == "QuantLinearGeneral"
    assert _types(q)["blocks/1/attn"] == "MultiHeadAttention"
  # Same parameters at the same paths, same outputs (the depth-wise conv runs as shifted
  # windows on CPU: equal up to float summation order).
  after = _values(q)
  for path, value in before.items():
    np.testing.assert_array_equal(after[path], value)
  if name == "cnn":
    np.testing.assert_allclose(q(x), model(x), rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(q(x), model(x))
  # The input model is untouched.
  assert not set(_types(model).values()) & {"QuantLinear", "QuantConv", "QuantLinearGeneral"}


def test_quantized_surgery_model_equals_the_hand_built_model():
  x = jnp.abs(jax.random.normal(jax.random.key(1), (16, 8, 8, 1)))  # unsigned grids: x >= 0
  plain = _CNN(nnx.Rngs(0))
  hand = _CNN(nnx.Rngs(5), layer=QuantConv, linear=QuantLinear, weight_bits=4, act_bits=4,
              per_channel=True)
  trquant.nnx.load_float_weights(hand, plain)
  trquant.nnx.init_weight_scales(hand)
  q = trquant.nnx.quantize_model(plain, QuantRule(weight_bits=4, act_bits=4, per_channel=True))
  for model in (hand, q):
    model.eval()
    trquant.nnx.calibrate_activations(model, x)
  for name in ("conv", "depthwise", "head"):
    np.testing.assert_array_equal(getattr(q, name).weight_scale.get_value(),
                                  getattr(hand, name).weight_scale.get_value())
  np.testing.assert_array_equal(q(x), hand(x))
  assert q.depthwise.weight_scale.get_value().shape == (1, 1, 1, 8)


def test_quantized_attention_is_attention_with_fake_quantized_projections():
  model = _ViT(nnx.Rngs(0))
  q = trquant.nnx.quantize_model(model, [QuantRule("blocks/.*/attn/.*", weight_bits=3, per_channel=True),
                                   QuantRule(weight_bits=4)])
  x = _images()
  reference = nnx.clone(model)
  for path, layer in trquant.nnx.quant_layers(q):
    target = reference
    for key in path:
      target = target[key] if isinstance(key, int) else getattr(target, key)
    target.kernel.set_value(layer.quantized_kernel())
  np.testing.assert_array_equal(q(x), reference(x))
  assert q.blocks[0].attn.out.weight_bits == 3 and q.blocks[0].fc1.weight_bits == 4
  assert q.blocks[0].attn.query.weight_scale.get_value().shape == (1, 2, 8)  # per (head, feature)


def test_first_matching_rule_wins_and_unmatched_layers_stay_as_they_are():
  model = _ViT(nnx.Rngs(0))
  q = trquant.nnx.quantize_model(model, [
      QuantRule("blocks/0/.*", weight_bits=2, act_bits=2, signed_act=True),
      QuantRule("blocks/.*", layer_types=nnx.LinearGeneral, weight_bits=4),
      QuantRule("blocks/.*", weight_bits=3, weight_quantizer="lsq"),
      QuantRule("head", layer_types=(nnx.Linear,), weight_bits=8)])
  assert type(q.patch_embed) is nnx.Linear  # no rule: full precision, untouched
  assert q.blocks[0].attn.key.weight_bits == 2 and q.blocks[0].fc2.act_bits == 2
  assert q.blocks[1].attn.key.weight_bits == 4 and isinstance(q.blocks[1].attn.key, QuantLinearGeneral)
  assert q.blocks[1].fc1.weight_bits == 3 and q.blocks[1].fc1.weight_quantizer == "lsq"
  assert q.head.weight_bits == 8
  skipped = trquant.nnx.quantize_model(model, [QuantRule("blocks/1/fc1", skip=True),
                                         QuantRule(weight_bits=4)])
  assert type(skipped.blocks[1].fc1) is nnx.Linear and skipped.blocks[0].fc1.weight_bits == 4


def test_a_rule_that_matches_nothing_raises():
  model = _ViT(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"rule 1, QuantRule\('blocks/.*/mlp/.*'.*matches no layer"
                                       r".*blocks/0/attn/key \(LinearGeneral\)"):
    trquant.nnx.quantize_model(model, [QuantRule("head"), QuantRule("blocks/.*/mlp/.*", weight_bits=4)])
  with pytest.raises(ValueError, match="blocks/0/attn is a MultiHeadAttention.*blocks/0/attn/"):
    trquant.nnx.quantize_model(model, QuantRule("blocks/0/attn", weight_bits=4))
  with pytest.raises(ValueError, match=r"rule 1.*first matching rule wins.*head \(rule 0\)"):
    trquant.nnx.quantize_model(model, [QuantRule(weight_bits=4), QuantRule("head", weight_bits=8)])
  q = trquant.nnx.quantize_model(model, [QuantRule("blocks/.*/mlp/.*", allow_unmatched=True),
                                   QuantRule("head", weight_bits=8)])
  assert q.head.weight_bits == 8
  with pytest.raises(ValueError, match="empty"):
    trquant.nnx.quantize_model(model, [])


class _WithEmbedding(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.up = nnx.ConvTranspose(8, 8, (3,), rngs=rngs)
    self.out = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, tokens):
    return self.out(self.up(self.embed(tokens)))


def test_layers_that_cannot_be_quantized_raise_naming_them():
  model = _WithEmbedding(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"matches embed \(nnx.Embed\).*table lookup.*"
                                       r"QuantRule\('embed', skip=True\)"):
    trquant.nnx.quantize_model(model, QuantRule("embed", weight_bits=4))
  with pytest.raises(ValueError, match=r"up \(nnx.ConvTranspose\).*no transposed"):
    trquant.nnx.quantize_model(model, QuantRule("up|out", weight_bits=4))
  with pytest.raises(ValueError, match="nnx.Embed layers cannot be quantized"):
    QuantRule(layer_types=nnx.Embed)
  q = trquant.nnx.quantize_model(model, [QuantRule("embed|up", skip=True), QuantRule(weight_bits=4)])
  assert type(q.out) is QuantLinear and type(q.embed) is nnx.Embed
  tokens = jnp.arange(6).reshape(2, 3)
  assert q(tokens).shape == (2, 3, 4)
  # Supported types in configurations the trquant layers do not have.
  for layer, match in [(nnx.Conv(2, 4, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0)), "kernel_dilation"),
                       (nnx.Conv(2, 4, (3,), rngs=nnx.Rngs(0)), "1-D convolution"),
                       (nnx.Conv(2, 4, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0)), "CIRCULAR"),
                       (nnx.LoRALinear(4, 4, lora_rank=2, rngs=nnx.Rngs(0)), "subclass of nnx.Linear"),
                       (nnx.Linear(4, 4, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k),
                                   rngs=nnx.Rngs(0)), "custom `dot_general`")]:
    with pytest.raises(ValueError, match=match):
      trquant.nnx.quantize_model(nnx.Sequential(layer), QuantRule("layers/0", weight_bits=4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_bits=0), "bits"), (dict(act_bits=17), "bits"), (dict(path="("), "regular"),
    (dict(weight_quantizer="pact"), "weight_quantizer"), (dict(skip=True, weight_bits=4), "skip"),
    (dict(layer_types=nnx.BatchNorm), "not a layer trquant quantizes")])
def test_bad_rules(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantRule(**kwargs)


class _CallOrder(nnx.Module):
  """Tree order a, b, c; call order c, a, b."""

  def __init__(self, rngs):
    self.a = nnx.Linear(8, 8, rngs=rngs)
    self.b = nnx.Linear(8, 4, rngs=rngs)
    self.c = nnx.Linear(6, 8, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(self.c(x))))


def test_first_last_rule_follows_the_forward_pass():
  model = _CallOrder(nnx.Rngs(0))
  x = jnp.ones((1, 6))
  rule = trquant.nnx.first_last_rule(model, x)
  assert rule.path == "c|b" and rule.weight_bits is None
  q = trquant.nnx.quantize_model(model, [rule, QuantRule(weight_bits=2, act_bits=2)])
  assert (q.c.weight_bits, q.a.weight_bits, q.b.weight_bits) == (None, 2, None)
  eight = trquant.nnx.quantize_model(model, [trquant.nnx.first_last_rule(model, x, weight_bits=8, act_bits=8),
                                       QuantRule(weight_bits=2)])
  # QuantRule's defaults: an unsigned input grid unless asked for.
  assert (eight.c.weight_bits, eight.c.act_bits, eight.c.signed_act) == (8, 8, False)
  signed = trquant.nnx.quantize_model(model, [trquant.nnx.first_last_rule(
      model, x, weight_bits=8, act_bits=8, signed_act=True), QuantRule(weight_bits=2)])
  assert signed.c.signed_act and signed.b.signed_act
  kept = trquant.nnx.quantize_model(model, [trquant.nnx.first_last_rule(model, x, skip=True),
                                      QuantRule(weight_bits=2)])
  assert type(kept.c) is nnx.Linear and type(kept.b) is nnx.Linear
  vit = _ViT(nnx.Rngs(0))
  assert trquant.nnx.first_last_rule(vit, _images(n=1)).path == "patch_embed|head"


class _Containers(nnx.Module):
  def __init__(self, rngs):
    shared = nnx.Linear(4, 4, rngs=rngs)
    self.items = nnx.data([shared, nnx.Linear(4, 4, rngs=rngs)])
    self.pair = nnx.data((nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)))
    self.table = nnx.data({"x": nnx.Linear(4, 4, rngs=rngs)})
    self.again = shared  # the same layer, referenced twice

  def __call__(self, x):
    for layer in (*self.items, *self.pair, self.table["x"], self.again):
      x = layer(x)
    return x


def test_layers_in_lists_tuples_dicts_and_shared_layers_are_replaced_everywhere():
  model = _Containers(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (3, 4))
  q = trquant.nnx.quantize_model(model, QuantRule(weight_bits=4))
  assert all(type(layer) is QuantLinear for layer in (*q.items, *q.pair, q.table["x"], q.again))
  assert q.again is q.items[0]  # still one layer
  assert isinstance(q.pair, tuple)
  fp = trquant.nnx.quantize_model(model, QuantRule())
  np.testing.assert_array_equal(fp(x), model(x))
  single = trquant.nnx.quantize_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), QuantRule(weight_bits=4))
  assert type(single) is QuantLinear and single.weight_bits == 4


# ---------------------------------------------------------------------------------------
# Everything downstream works on a surgery-made model
# ---------------------------------------------------------------------------------------


def _quantized_vit(seed=0, bits=2):
  model = _ViT(nnx.Rngs(seed), depth=1)
  q = trquant.nnx.quantize_model(model, [trquant.nnx.first_last_rule(model, _images(n=1)),
                                   QuantRule(weight_bits=bits, act_bits=bits, signed_act=True)])
  trquant.nnx.calibrate_activations(q, _images(seed=7, n=32))
  return q


@pytest.mark.integration
def test_tr_schedule_training_on_a_quantized_vit():
  q = _quantized_vit()
  labels = trquant.nnx.param_labels(q)
  flat = {"/".join(map(str, path)): label for path, label in nnx.to_flat_state(labels)}
  assert flat["blocks/0/attn/query/kernel"] == "quant" and flat["blocks/0/fc2/kernel"] == "quant"
  assert flat["patch_embed/kernel"] == "float" and flat["pos"] == "float"
  assert flat["blocks/0/attn/query/act_scale"] == "float"
  assert sum(label == "quant" for label in flat.values()) == 6  # 4 projections, 2 MLP layers
  tx = optax.partition({
      "quant": optax.chain(optax.adamw(3e-3), trquant.tr_schedule(
          optax.cosine_decay_schedule(5e-3, 30), codes_fn=trquant.nnx.codes_fn(q))),
      "float": optax.adamw(optax.cosine_decay_schedule(3e-3, 30))}, labels)
  optimizer = nnx.Optimizer(q, tx, wrt=nnx.Param)
  x, y = _images(seed=3, n=64), jax.random.randint(jax.random.key(4), (64,), 0, 10)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
    optimizer.update(model, grads)
    return loss, trquant.nnx.transition_stats(optimizer)

  codes = lambda: [np.asarray(layer.weight_codes()) for _, layer in trquant.nnx.quant_layers(q)
                   if layer.weight_bits is not None]
  before = codes()
  loss0, stats = step(q, optimizer)
  expected = [np.mean(a != b) for a, b in zip(before, codes())]
  np.testing.assert_allclose(stats["measured_transition_rate"], expected, rtol=1e-6)
  assert stats["measured_transition_rate"].shape == (6,) and max(expected) > 0
  losses = [float(step(q, optimizer)[0]) for _ in range(25)]
  assert losses[-1] < float(loss0)


@pytest.mark.integration
def test_oscillation_helpers_and_batchnorm_reestimation_on_a_quantized_cnn():
  q = trquant.nnx.quantize_model(_CNN(nnx.Rngs(0)), QuantRule(weight_bits=3, act_bits=4))
  x = jnp.abs(jax.random.normal(jax.random.key(1), (32, 8, 8, 1)))  # unsigned grids: x >= 0
  y = jax.random.randint(jax.random.key(2), (32,), 0, 10)
  trquant.nnx.calibrate_activations(q, x)
  tx = optax.chain(optax.sgd(0.05, momentum=0.9), trquant.freeze_oscillations(
      codes_fn=trquant.nnx.codes_fn(q), scale_fn=trquant.nnx.scale_fn(q), total_steps=8, decay=0.7,
      warmup_steps=2, threshold=0.05))
  optimizer = nnx.Optimizer(q, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      task = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return task + 0.1 * trquant.nnx.model_dampening_loss(m)
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  for _ in range(8):
    step(q, optimizer)
  stats = trquant.nnx.oscillation_stats(optimizer)
  assert stats["oscillating_fraction"].shape == (3,) and "frozen_fraction" in stats
  assert trquant.nnx.reestimate_batchnorm(q, [x[:16], x[16:]]) == 2


@pytest.mark.integration
def test_integer_export_round_trip_of_a_quantized_vit(tmp_path):
  q = _quantized_vit(bits=4)
  q.eval()
  x = _images(seed=3)
  exported = trquant.export.to_integer(q)
  assert exported["blocks"][0]["attn"]["out"]["kernel"].bits == 4
  assert not isinstance(exported["patch_embed"]["kernel"], trquant.export.IntegerTensor)
  trquant.export.save_integer(tmp_path / "vit.npz", exported)
  fresh = _quantized_vit(seed=1, bits=4)  # other weights and scales, same layers
  fresh.eval()
  trquant.export.load_integer(fresh, tmp_path / "vit.npz")
  np.testing.assert_array_equal(fresh(x), q(x))


@pytest.mark.integration
def test_orbax_round_trip_of_a_quantized_model_and_its_optimizer(tmp_path):
  q = _quantized_vit()
  tx = optax.chain(optax.adam(1e-3), trquant.tr_schedule(1e-2, codes_fn=trquant.nnx.codes_fn(q)))
  optimizer = nnx.Optimizer(q, optax.partition({"quant": tx, "float": optax.adam(1e-3)},
                                                      trquant.nnx.param_labels(q)),
                            wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(_images()) ** 2))(q)
  optimizer.update(q, grads)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state((q, optimizer))))
  checkpointer.wait_until_finished()
  fresh = _quantized_vit(seed=1)
  fresh_optimizer = nnx.Optimizer(fresh, optax.partition(
      {"quant": optax.chain(optax.adam(1e-3), trquant.tr_schedule(
          1e-2, codes_fn=trquant.nnx.codes_fn(fresh))), "float": optax.adam(1e-3)},
      trquant.nnx.param_labels(fresh)),
      wrt=nnx.Param)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          nnx.to_pure_dict(nnx.state((fresh, fresh_optimizer))))
  nnx.update((fresh, fresh_optimizer), checkpointer.restore(tmp_path / "ckpt", abstract))
  for a, b in zip(jax.tree.leaves(nnx.state((fresh, fresh_optimizer))),
                  jax.tree.leaves(nnx.state((q, optimizer)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(fresh(_images(seed=5)), q(_images(seed=5)))
  assert fresh.blocks[0].fc1.weight_bits == 2  # metadata is the fresh model's own


class _EinsumNet(nnx.Module):
  def __init__(self, rngs):
    self.mix = nnx.Einsum("btd,dhk->bthk", (8, 2, 6), (2, 6), rngs=rngs)
    self.out = nnx.Linear(12, 4, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.mix(x))
    return self.out(h.reshape(*h.shape[:2], -1))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["vit", "einsum"])
def test_adaround_on_a_surgery_made_model(name):
  model = _ViT(nnx.Rngs(0), depth=1) if name == "vit" else _EinsumNet(nnx.Rngs(0))
  x = _images(seed=2, n=128) if name == "vit" else jax.random.normal(jax.random.key(2), (128, 5, 8))
  ruled = trquant.nnx.quantize_model(model, QuantRule(weight_bits=3, per_channel=True))
  config = trquant.adaround.AdaRoundConfig(iters=120, lr=1e-2)
  q, reports = trquant.adaround.reconstruct_model(ruled, x, granularity="layer",
                                                  fallback_to_nearest=False, config=config,
                                                  key=jax.random.key(0), progress=False)
  expected = 2 + 6 if name == "vit" else 2
  assert len(reports) == expected
  if name == "vit":
    assert [r.name for r in reports[:3]] == ["patch_embed", "blocks/0/attn/query", "blocks/0/attn/key"]
    assert q.blocks[0].attn.value.weight_scale.get_value().shape == (1, 2, 8)
  for report in reports:
    assert report.reconstructed_error <= report.nearest_error * 1.001, report
  assert sum(r.reconstructed_error for r in reports) < sum(r.nearest_error for r in reports)
  nearest = trquant.adaround.round_to_nearest(ruled).model
  held_out = _images(seed=9, n=64) if name == "vit" else jax.random.normal(jax.random.key(9), (64, 5, 8))
  target = model(held_out)
  error = lambda m: float(jnp.mean((m(held_out) - target) ** 2))
  assert error(q) < error(nearest)
  exported = trquant.export.to_integer(q)
  np.testing.assert_array_equal(
      trquant.export.from_integer(exported)["out" if name == "einsum" else "head"]["kernel"],
      (q.out if name == "einsum" else q.head).kernel.get_value())


# ---------------------------------------------------------------------------------------
# Sharded: a model built with nnx.with_partitioning on an 8-device CPU mesh
# ---------------------------------------------------------------------------------------

_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    import trquant
    from trquant.nnx import QuantRule
    assert jax.device_count() == 8, jax.devices()

    class Model(nnx.Module):
      def __init__(self, rngs, sharded):
        init = nnx.initializers.lecun_normal()
        shard = (lambda spec: nnx.with_partitioning(init, spec)) if sharded else (lambda spec: init)
        self.embed = nnx.Linear(16, 32, kernel_init=shard((None, "model")), rngs=rngs)
        # No attention biases: the key bias has a zero gradient in exact arithmetic (softmax is
        # shift-invariant), so Adam would move it by rounding noise, which sharding changes.
        self.attn = nnx.MultiHeadAttention(num_heads=8, in_features=32, decode=False, use_bias=False,
                                           kernel_init=shard((None, "model", None)),
                                           out_kernel_init=shard(("model", None, None)), rngs=rngs)
        self.out = nnx.Linear(32, 8, kernel_init=shard(("model", None)), rngs=rngs)
      def __call__(self, x):
        return self.out(nnx.relu(self.attn(self.embed(x))))

    def run(model):
      # Weights only: with quantized inputs, the sharded run's other summation order moves
      # some inputs across rounding boundaries, and the runs part ways within a few steps.
      q = trquant.nnx.quantize_model(model, QuantRule(weight_bits=2))
      x = jax.random.normal(jax.random.key(1), (16, 3, 16))
      y = jax.random.normal(jax.random.key(2), (16, 3, 8))
      tx = optax.partition({
          "quant": optax.chain(optax.adam(3e-2), trquant.tr_schedule(1e-2, codes_fn=trquant.nnx.codes_fn(q))),
          "float": optax.adam(1e-3)}, trquant.nnx.param_labels(q))
      optimizer = nnx.Optimizer(q, tx, wrt=nnx.Param)

      @nnx.jit
      def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

      for _ in range(4):
        step(q, optimizer)
      return q, optimizer

    plain_model, plain_opt = run(Model(nnx.Rngs(0), False))
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
      sharded = Model(nnx.Rngs(0), True)
    # The surgery runs outside the mesh context: the placed arrays and annotations carry over.
    probe = trquant.nnx.quantize_model(sharded, QuantRule(weight_bits=2))
    assert probe.attn.query.kernel.get_metadata()["out_sharding"] == (None, "model", None)
    assert tuple(probe.attn.out.kernel.get_value().sharding.spec) == ("model", None, None)
    specs = nnx.get_partition_spec(nnx.state(probe, nnx.Param))
    assert tuple(specs["embed"]["kernel"].get_value()) == (None, "model")
    with jax.set_mesh(mesh):
      model, opt = run(sharded)
      sharding = model.attn.query.kernel.get_value().sharding
      expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model", None))
      assert sharding.is_equivalent_to(expected, 3), sharding
      assert len(model.attn.query.kernel.get_value().sharding.device_set) == 8
      for field in ("running_transition_rate", "talr_multiplier", "measured_transition_rate"):
        np.testing.assert_allclose(optax.tree.get(opt.opt_state, field),
                                   optax.tree.get(plain_opt.opt_state, field), rtol=1e-5, atol=1e-7)
      for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                      jax.tree.leaves(nnx.state(plain_model, nnx.Param))):
        # Adam divides by sqrt(v): summation-order differences of ~1e-7 in a small gradient
        # come out ~1e-5 in a parameter.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
      assert float(np.max(optax.tree.get(plain_opt.opt_state, "measured_transition_rate"))) > 0
      print("SHARDED SURGERY OK")
""")


@pytest.mark.integration
def test_surgery_keeps_sharding_and_trains_as_unsharded(run_on_cpu_mesh):
  assert "SHARDED SURGERY OK" in run_on_cpu_mesh(_SHARDED_SCRIPT)


def test_rule_group_size_reaches_the_layers_and_names_a_bad_layer():
  model = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  quantized = trquant.nnx.quantize_model(model, trquant.nnx.QuantRule(weight_bits=4, group_size=8))
  assert [layer.weight_group["group_size"] for _, layer in trquant.nnx.quant_layers(quantized)] == [8, 8]
  with pytest.raises(ValueError, match=r"layers/1 .*does not divide axis 0 of length 16"):
    trquant.nnx.quantize_model(model, trquant.nnx.QuantRule(weight_bits=4, group_size=32))
  with pytest.raises(ValueError, match="QuantRule: `group_size` must be a positive int"):
    trquant.nnx.QuantRule(weight_bits=4, group_size=3.5)


def test_rules_reset_the_quantization_of_trquant_layers():
  """One rule list on a model built from trquant layers: the matched layers get the rule's
  quantization, scales from their kernels; kernels, biases and the input model unchanged."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  with jax.set_mesh(mesh):
    first = QuantLinear(16, 8, weight_bits=None, rngs=nnx.Rngs(0),
                        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                          (None, "model")))
  model = nnx.Sequential(first, nnx.relu, QuantLinear(8, 4, weight_bits=2, act_bits=4,
                                                      rngs=nnx.Rngs(1)))
  q = trquant.nnx.quantize_model(model, [
      QuantRule("layers/0", weight_bits=4, group_size=8),
      QuantRule("layers/2", layer_types=QuantLinear)])  # back to full precision
  layer, last = q.layers[0], q.layers[2]
  assert (layer.weight_bits, layer.group_size, layer.act_bits) == (4, 8, None)
  np.testing.assert_array_equal(layer.kernel.get_value(), first.kernel.get_value())
  assert layer.kernel.get_metadata()["out_sharding"] == (None, "model")
  kernel = first.kernel.get_value()
  np.testing.assert_array_equal(
      layer.weight_scale.get_value(),
      trquant.init_scale(kernel, bits=4, method="mse", axis=(1,), group_size=8, group_axis=0))
  assert (last.weight_bits, last.act_bits, last.weight_scale, last.act_scale) == (None, None,
                                                                                  None, None)
  x = jax.random.normal(jax.random.key(0), (3, 16))
  np.testing.assert_allclose(last(x[:, :8]), x[:, :8] @ model.layers[2].kernel.get_value()
                             + model.layers[2].bias.get_value(), rtol=1e-6)
  assert model.layers[0].weight_bits is None and model.layers[2].weight_bits == 2
  # first_last_rule sees trquant layers too.
  rule = trquant.nnx.first_last_rule(model, x)
  assert rule.path == "layers/0|layers/2"
