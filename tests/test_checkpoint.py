"""Orbax checkpoints of TR-scheduled training: a resumed run is bit-identical to an uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import trquant
from trquant.nnx import QuantLinear

BITS = 2
STEPS, RESUME_AT = 40, 17


def _data(seed=0):
  x = jax.random.normal(jax.random.key(seed), (64, 12))
  y = (x[:, 0] > 0).astype(jnp.int32) + 2 * (x[:, 1] > 0).astype(jnp.int32)
  return x, y


# ---------------------------------------------------------------------------------------
# Plain pytrees: params + optax state
# ---------------------------------------------------------------------------------------

SCALE = 0.1


def _codes_fn(params):
  return {"hidden": trquant.quantize(params["hidden"], SCALE, bits=BITS),
          "out": trquant.quantize(params["out"], SCALE, bits=BITS), "bias": None}


def _loss(params, x, y):
  hidden = jax.nn.relu(x @ trquant.fake_quant(params["hidden"], SCALE, bits=BITS))
  logits = hidden @ trquant.fake_quant(params["out"], SCALE, bits=BITS) + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _tx():
  target = optax.cosine_decay_schedule(5e-2, STEPS)
  return optax.chain(optax.adam(1e-2), trquant.tr_schedule(target, codes_fn=_codes_fn))


@jax.jit
def _step(params, opt_state, x, y):
  grads = jax.grad(_loss)(params, x, y)
  updates, opt_state = _tx().update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _train(params, opt_state, steps, start=0):
  x, y = _data()
  for step in range(start, start + steps):
    batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
    params, opt_state = _step(params, opt_state, x[batch], y[batch])
  return params, opt_state


def _initial_params():
  keys = jax.random.split(jax.random.key(1), 2)
  return {"hidden": jax.random.normal(keys[0], (12, 32)) * 0.2,
          "out": jax.random.normal(keys[1], (32, 4)) * 0.2, "bias": jnp.zeros(4)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert left.dtype == right.dtype
    np.testing.assert_array_equal(left, right)


def test_orbax_resume_is_bit_identical(tmp_path):
  params = _initial_params()
  opt_state = _tx().init(params)
  reference = _train(params, opt_state, STEPS)

  params, opt_state = _train(params, opt_state, RESUME_AT)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": opt_state})
  checkpointer.wait_until_finished()
  del params, opt_state

  # Restore into the structure a fresh init gives (the NamedTuple state types come back).
  fresh = {"params": _initial_params(), "opt_state": _tx().init(_initial_params())}
  restored = checkpointer.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                  fresh))
  assert isinstance(restored["opt_state"][1], trquant.TransitionRateState)
  assert int(optax.tree.get(restored["opt_state"], "tr_step")) == RESUME_AT
  resumed = _train(restored["params"], restored["opt_state"], STEPS - RESUME_AT, start=RESUME_AT)
  _assert_trees_equal(resumed, reference)
  # The run did move codes and adapt the multiplier: the comparison is not vacuous.
  assert float(jnp.max(jnp.abs(optax.tree.get(reference[1], "talr_multiplier") - 1.0))) > 1e-3


# ---------------------------------------------------------------------------------------
# NNX: model + nnx.Optimizer state
# ---------------------------------------------------------------------------------------


def _nnx_model(group_size=None):
  model = nnx.Sequential(
      QuantLinear(12, 32, weight_bits=BITS, group_size=group_size, rngs=nnx.Rngs(0)), nnx.relu,
      QuantLinear(32, 4, weight_bits=BITS, group_size=group_size and 2 * group_size,
                  rngs=nnx.Rngs(1)))
  tx = optax.partition(
      {"quant": optax.chain(optax.adam(1e-2),
                            trquant.tr_schedule(5e-2, codes_fn=trquant.nnx.codes_fn(model))),
       "float": optax.adam(1e-2)},
      trquant.nnx.param_labels(model))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  optimizer.update(model, nnx.grad(loss_fn)(model))


def _nnx_train(model, optimizer, steps, start=0):
  x, y = _data()
  for step in range(start, start + steps):
    batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
    _nnx_step(model, optimizer, x[batch], y[batch])


@pytest.mark.parametrize("group_size", [None, pytest.param(4, marks=pytest.mark.integration)])
def test_orbax_resume_nnx_optimizer_is_bit_identical(tmp_path, group_size):
  model, optimizer = _nnx_model(group_size)
  _nnx_train(model, optimizer, STEPS)
  reference = nnx.to_pure_dict(nnx.state((model, optimizer)))

  model, optimizer = _nnx_model(group_size)
  _nnx_train(model, optimizer, RESUME_AT)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "nnx", nnx.to_pure_dict(nnx.state((model, optimizer))))
  checkpointer.wait_until_finished()

  model, optimizer = _nnx_model(group_size)  # a new process would rebuild the objects so
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          nnx.to_pure_dict(nnx.state((model, optimizer))))
  nnx.update((model, optimizer), checkpointer.restore(tmp_path / "nnx", abstract))
  assert model.layers[0].kernel.bits == BITS  # restoring values keeps the layers' metadata
  if group_size:  # per-group scales: one per 4 inputs and output (12 / 4 = 3 groups)
    assert model.layers[0].weight_scale.get_value().shape == (3, 32)
  _nnx_train(model, optimizer, STEPS - RESUME_AT, start=RESUME_AT)
  _assert_trees_equal(nnx.to_pure_dict(nnx.state((model, optimizer))), reference)


def test_orbax_round_trip_of_a_packed_model(tmp_path):
  def packed_model(seed):
    model = nnx.Sequential(
        QuantLinear(12, 32, weight_bits=4, group_size=4, rngs=nnx.Rngs(seed)), nnx.relu,
        QuantLinear(32, 4, weight_bits=2, per_channel=True, rngs=nnx.Rngs(seed + 1)))
    return trquant.export.packed_model(model)

  packed, x = packed_model(0), _data()[0]
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "packed", nnx.to_pure_dict(nnx.state(packed)))
  checkpointer.wait_until_finished()
  fresh = packed_model(9)  # the same structure, other codes
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(nnx.state(fresh)))
  nnx.update(fresh, checkpointer.restore(tmp_path / "packed", abstract))
  stored = fresh.layers[0].kernel.get_value()
  assert stored.data.dtype == np.uint8 and stored.group_size == 4  # still packed, 2 a byte
  np.testing.assert_array_equal(fresh(x), packed(x))


def test_restore_into_a_different_layout_fails_clearly(tmp_path):
  params = _initial_params()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": _tx().init(params)})
  checkpointer.wait_until_finished()
  wrong = {"params": params, "opt_state": optax.adam(1e-2).init(params)}
  with pytest.raises(ValueError, match="mismatch"):
    checkpointer.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, wrong))


# ---------------------------------------------------------------------------------------
# NNX: codes_fn / scale_fn read the scales a restore puts into the model
# ---------------------------------------------------------------------------------------


def _nnx_model_and_transforms(seed):
  model = nnx.Sequential(QuantLinear(12, 32, weight_bits=BITS, rngs=nnx.Rngs(seed)), nnx.relu,
                         QuantLinear(32, 4, weight_bits=BITS, per_channel=True,
                                     rngs=nnx.Rngs(seed + 1)))
  return model, trquant.nnx.codes_fn(model), trquant.nnx.scale_fn(model)


def _nnx_optimizer(model, codes_fn, scale_fn):
  tx = optax.partition(
      {"quant": optax.chain(optax.adam(1e-2), trquant.tr_schedule(5e-2, codes_fn=codes_fn)),
       "float": optax.adam(1e-2)},
      trquant.nnx.param_labels(model))
  freeze = trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn, total_steps=100, threshold=0.5)
  return nnx.Optimizer(model, optax.chain(tx, freeze), wrt=nnx.Param)


@pytest.mark.integration
@pytest.mark.parametrize("order", ["optimizer_first", "restore_first", "traced_before_restore"])
def test_codes_fn_and_scales_fn_follow_a_restore(tmp_path, order):
  # The checkpoint's scales differ clearly from those a fresh model starts with.
  source, codes_fn, scale_fn = _nnx_model_and_transforms(seed=0)
  for layer in (source.layers[0], source.layers[2]):
    layer.weight_scale.set_value(layer.weight_scale.get_value() * 1.7)
  source_optimizer = _nnx_optimizer(source, codes_fn, scale_fn)
  _nnx_train(source, source_optimizer, 3)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {
      "model": nnx.to_pure_dict(nnx.state(source)),
      "optimizer": nnx.to_pure_dict(nnx.state(source_optimizer))})
  checkpointer.wait_until_finished()

  def restore(model, optimizer):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {
        "model": nnx.to_pure_dict(nnx.state(model)),
        "optimizer": nnx.to_pure_dict(nnx.state(optimizer))})
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])

  model, codes_fn, scale_fn = _nnx_model_and_transforms(seed=5)
  if order == "restore_first":
    # Restore the model, then build the optimizer (the restore needs one of its structure).
    probe = _nnx_optimizer(*_nnx_model_and_transforms(seed=5))
    restore(model, probe)
    optimizer = _nnx_optimizer(model, codes_fn, scale_fn)
    nnx.update(optimizer, nnx.state(probe))
  else:
    optimizer = _nnx_optimizer(model, codes_fn, scale_fn)
    if order == "traced_before_restore":
      _nnx_train(model, optimizer, 1)  # the jitted step is traced with the old scales
    restore(model, optimizer)
    if order == "traced_before_restore":
      jax.clear_caches()  # the documented way to re-trace a step after an in-process restore

  layers = (model.layers[0], model.layers[2])
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  for index, layer in zip((0, 2), layers):
    np.testing.assert_array_equal(layer.weight_scale.get_value(),
                                  source.layers[index].weight_scale.get_value())
    np.testing.assert_array_equal(scale_fn(params)["layers"][index]["kernel"],
                                  layer.weight_scale.get_value())
    np.testing.assert_array_equal(codes_fn(params)["layers"][index]["kernel"],
                                  layer.weight_codes())
  # One jitted step: the optimizer counts the transitions on the restored grid.
  before = [np.asarray(layer.weight_codes()) for layer in layers]
  _nnx_train(model, optimizer, 1, start=3)
  after = [np.asarray(layer.weight_codes()) for layer in layers]
  expected = [np.mean(a != b) for a, b in zip(before, after)]
  assert max(expected) > 0
  np.testing.assert_allclose(
      trquant.nnx.values(optax.tree.get(optimizer.opt_state, "measured_transition_rate")),
      expected, rtol=1e-6)


_SHARDED_OPTAX_RESTORE = """
import tempfile
import jax, jax.numpy as jnp, optax, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
import trquant

mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
put = lambda tree: jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("fsdp"))), tree)
params = put({"w": jax.random.normal(jax.random.key(0), (16, 8)) * 0.1})
codes_fn = lambda p: {"w": trquant.quantize(p["w"], 0.05, bits=2)}
tx = optax.chain(optax.adam(1e-2), trquant.tr_schedule(1e-2, codes_fn=codes_fn))

@jax.jit
def step(params, opt_state):
  grads = jax.grad(lambda p: jnp.sum(trquant.fake_quant(p["w"], 0.05, bits=2) ** 2))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state

with jax.set_mesh(mesh):
  opt_state = jax.jit(tx.init)(params)
  params, opt_state = step(params, opt_state)
  path = tempfile.mkdtemp() + "/ckpt"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": opt_state})
  checkpointer.wait_until_finished()
  # The README's recipe: the restore target from a jitted init under the mesh (its
  # scalars replicated on the mesh, as the step's are).
  target = {"params": params, "opt_state": jax.jit(tx.init)(params)}
  restored = checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  resumed = step(restored["params"], restored["opt_state"])
  direct = step(params, opt_state)
for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(direct)):
  assert (jax.device_get(a) == jax.device_get(b)).all()
print("SHARDED OPTAX RESTORE OK")
"""


@pytest.mark.integration
def test_readme_optax_restore_recipe_on_sharded_params(run_on_cpu_mesh):
  """The README's optax orbax recipe on params sharded over 8 devices resumes bit-identically
  (a target from an unjitted ``tx.init`` leaves scalar state on one device, and the next
  jitted step then fails with incompatible devices)."""
  assert "SHARDED OPTAX RESTORE OK" in run_on_cpu_mesh(_SHARDED_OPTAX_RESTORE)
