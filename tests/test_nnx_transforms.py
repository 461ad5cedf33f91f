"""trquant.nnx.transforms: codes_fn, scale_fn, param_labels, partition and transition_stats
with nnx.Optimizer."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import trquant
from trquant._src.nnx import transforms as nnx_transforms
from trquant.nnx import QuantLinear
from nnx_fixture_models import ConvNet, small_mlp


def test_param_labels():
  model = ConvNet(nnx.Rngs(0))
  labels = nnx.to_flat_state(trquant.nnx.param_labels(model))
  flat = {tuple(path): label for path, label in labels}
  assert flat[("conv", "kernel")] == "quant"
  assert flat[("depthwise", "kernel")] == "quant"
  assert flat[("head", "kernel")] == "float"  # full-precision layer
  assert flat[("depthwise", "act_scale")] == "float"
  assert flat[("bn", "scale")] == "float"
  assert sum(label == "quant" for label in flat.values()) == 2


def test_values_unwraps_labels_held_in_variables_for_optax_partition():
  model = small_mlp()
  # Labels made from the state by jax.tree.map keep an nnx.Variable around each label.
  held = jax.tree.map(lambda _: "sgd", nnx.state(model, nnx.Param))
  assert isinstance(held["layers"][0]["kernel"], nnx.Variable)
  grads = nnx.grad(lambda m: m(jnp.ones((2, 16))).sum())(model)
  broken = nnx.Optimizer(model, optax.partition({"sgd": optax.sgd(0.1)}, held), wrt=nnx.Param)
  with pytest.raises(ValueError, match="structure"):
    broken.update(model, grads)  # optax.partition itself cannot use them

  reference = nnx.clone(model)
  nnx.Optimizer(reference, optax.sgd(0.1), wrt=nnx.Param).update(reference, grads)
  optimizer = nnx.Optimizer(
      model, optax.partition({"sgd": optax.sgd(0.1)}, trquant.nnx.values(held)), wrt=nnx.Param)
  optimizer.update(model, grads)
  np.testing.assert_array_equal(model.layers[2].kernel.get_value(),
                                reference.layers[2].kernel.get_value())


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
  model = small_mlp()
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
  model = small_mlp()
  tx = optax.partition({
      "quant": optax.chain(optax.adam(1e-2), trquant.tr_schedule(
          optax.cosine_decay_schedule(1e-2, 40), codes_fn=trquant.nnx.codes_fn(model))),
      "float": optax.adam(1e-2)}, trquant.nnx.param_labels(model))
  optimizer, losses = _train(model, tx, steps=40)
  assert losses[-1] < losses[0]
  assert int(optax.tree.get(optimizer.opt_state, "tr_step")) == 40


def test_codes_fn_rejects_learned_weight_scales():
  with pytest.raises(ValueError, match="weight_quantizer='fixed'"):
    trquant.nnx.codes_fn(small_mlp(weight_quantizer="lsq"))


def test_codes_fn_needs_a_quantized_layer():
  model = nnx.Sequential(QuantLinear(4, 4, weight_bits=None, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no quantized"):
    trquant.nnx.codes_fn(model)


def test_codes_fn_and_scales_fn_read_the_current_scales():
  model = small_mlp()
  codes_fn, scale_fn = trquant.nnx.codes_fn(model), trquant.nnx.scale_fn(model)
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  layer = model.layers[2]
  layer.weight_scale.set_value(layer.weight_scale.get_value() * 3.0)  # e.g. a restore
  np.testing.assert_array_equal(codes_fn(params)["layers"][2]["kernel"], layer.weight_codes())
  np.testing.assert_array_equal(scale_fn(params)["layers"][2]["kernel"],
                                layer.weight_scale.get_value())


def test_transition_stats_are_snapshots_inside_jit():
  model = small_mlp()
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
  assert set(records[0][1]) == set(nnx_transforms.TRANSITION_FIELDS)


def test_transition_stats_needs_tr_schedule():
  model = small_mlp()
  with pytest.raises(ValueError, match="no trquant.tr_schedule"):
    trquant.nnx.transition_stats(nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param))


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


@pytest.mark.integration
def test_sharded_model_matches_unsharded(run_on_cpu_mesh):
  assert "SHARDED OK" in run_on_cpu_mesh(_SHARDED_SCRIPT)


def test_stats_keyed_by_layer_name():
  model = small_mlp()
  names = trquant.nnx.layer_names(model)
  codes = trquant.nnx.codes_fn(model)(trquant.nnx.values(nnx.state(model, nnx.Param)))
  assert len(names) == sum(leaf is not None for leaf in jax.tree.leaves(
      codes, is_leaf=lambda x: x is None))
  assert names == ["layers/0", "layers/2"]
  chain = optax.chain(optax.adam(1e-2), trquant.tr_schedule(1e-2, codes_fn=trquant.nnx.codes_fn(model)),
                      trquant.track_oscillations(codes_fn=trquant.nnx.codes_fn(model)))
  optimizer = nnx.Optimizer(model, chain, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 16))) ** 2))(model))

  step(model, optimizer)
  plain = trquant.nnx.transition_stats(optimizer)
  keyed = trquant.nnx.transition_stats(optimizer, model=model)
  assert list(keyed["talr_multiplier"]) == names
  for i, name in enumerate(names):
    assert keyed["talr_multiplier"][name] == plain["talr_multiplier"][i]
  assert keyed["tr_step"] == plain["tr_step"]  # scalars stay as they are
  oscillations = trquant.nnx.oscillation_stats(optimizer, model=model)
  assert list(oscillations["oscillating_fraction"]) == names
  with pytest.raises(ValueError, match="max_bits"):
    trquant.nnx.transition_stats(optimizer, model=nnx.Sequential(
        QuantLinear(4, 2, weight_bits=2, rngs=nnx.Rngs(0))))


def _scaled_step_model():
  model = nnx.Sequential(QuantLinear(8, 4, weight_bits=2, rngs=nnx.Rngs(0)))
  codes_fn = trquant.nnx.codes_fn(model)
  scale_fn = trquant.nnx.scale_fn(model)
  tx = optax.partition(
      {"quant": optax.chain(optax.sgd(0.5), trquant.tr_schedule(1e-2, codes_fn=codes_fn),
                            trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn,
                                                        total_steps=10)),
       "float": optax.sgd(1e-2)}, trquant.nnx.param_labels(model))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def test_weight_scales_argument_counts_on_the_current_grid_without_retracing():
  # Passed as an argument of the jitted step, the scales are values of the step: a scale
  # set after the first call is used by the next call, with no new trace.
  model, optimizer = _scaled_step_model()
  traces = []

  @nnx.jit
  def step(model, optimizer, x):
    traces.append(1)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads, weight_scales=trquant.nnx.weight_scales(model))

  x = jnp.ones((2, 8))
  layer = model.layers[0]
  scale = layer.weight_scale.get_value()
  # First traced with a scale so large that every weight rounds to 0 and none transits,
  # then the model's own scale again (e.g. restored): the next step counts on it.
  layer.weight_scale.set_value(jnp.full((), 1e6, jnp.float32))
  step(model, optimizer, x)
  assert float(trquant.nnx.transition_stats(optimizer)["measured_transition_rate"][0]) == 0.0
  layer.weight_scale.set_value(scale)
  step(model, optimizer, x)
  assert len(traces) == 1
  rate = trquant.nnx.transition_stats(optimizer)["measured_transition_rate"]
  assert float(rate[0]) > 0.0, rate


def test_weight_scales_entries_and_a_missing_layer():
  model, _ = _scaled_step_model()
  scales = trquant.nnx.weight_scales(model)
  assert list(scales) == ["layers/0"]
  assert scales["layers/0"] is model.layers[0].weight_scale.get_value()
  codes_fn = trquant.nnx.codes_fn(model)
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(codes_fn(params, weight_scales=scales)["layers"][0]["kernel"],
                                codes_fn(params)["layers"][0]["kernel"])
  with pytest.raises(ValueError, match="no scale for layer layers/0"):
    codes_fn(params, weight_scales={"other": jnp.ones(())})


def test_unknown_extra_arguments_leave_plain_codes_fns_alone():
  # A plain codes_fn takes params only: weight_scales is not passed to it.
  codes_fn = lambda params: {"w": trquant.quantize(params["w"], 0.1, bits=2)}
  tx = trquant.tr_schedule(1e-2, codes_fn=codes_fn)
  params = {"w": jnp.linspace(-0.3, 0.3, 8)}
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, weight_scales={"w": 1.0}, other=3))
  updates, _ = update({"w": jnp.ones(8)}, state, params)
  assert updates["w"].shape == (8,)


def test_group_scales_with_tr_schedule_and_freezing():
  model = nnx.Sequential(QuantLinear(16, 4, weight_bits=2, group_size=4, rngs=nnx.Rngs(0)))
  layer = model.layers[0]
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  codes = trquant.nnx.codes_fn(model)(params)["layers"][0]["kernel"]
  np.testing.assert_array_equal(codes, layer.weight_codes())
  # The freezing scale broadcasts to the kernel: code * scale is the bin centre.
  scale = trquant.nnx.scale_fn(model)(params)["layers"][0]["kernel"]
  assert scale.shape == (16, 4)
  np.testing.assert_array_equal(codes * scale, layer.quantized_kernel())
  codes_fn, scale_fn = trquant.nnx.codes_fn(model), trquant.nnx.scale_fn(model)
  tx = optax.chain(optax.sgd(0.5), trquant.tr_schedule(1e-2, codes_fn=codes_fn),
                   trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn,
                                               total_steps=4, warmup_steps=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((2, 16))

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2) + trquant.nnx.model_dampening_loss(m))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    train_step(model, optimizer)
  assert float(trquant.nnx.transition_stats(optimizer)["tr_step"]) == 3
