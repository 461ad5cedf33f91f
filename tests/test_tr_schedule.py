"""Semantics, optax conformance and bad input of trquant.tr_schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import trquant

BITS = 2


def _params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 2)
  return {
      "dense": {"kernel": jax.random.normal(keys[0], (32, 16), dtype), "bias": jnp.zeros(16, dtype)},
      "head": {"kernel": jax.random.normal(keys[1], (16, 4), dtype), "bias": jnp.zeros(4, dtype)},
  }


SCALES = {"dense": 0.5, "head": 0.5}


def _codes_fn(params):
  return {
      name: {"kernel": trquant.quantize(layer["kernel"], SCALES[name], bits=BITS), "bias": None}
      for name, layer in params.items()
  }


def _grads(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  )


def _tx(lr=0.1, **kwargs):
  kwargs.setdefault("codes_fn", _codes_fn)
  return optax.chain(optax.sgd(lr), trquant.tr_schedule(kwargs.pop("target_tr", 1e-2), **kwargs))


# ---------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------


def test_state_fields_and_shapes():
  params = _params()
  state = _tx().init(params)
  assert optax.tree.get(state, "tr_step").dtype == jnp.int32
  for field in ("measured_transition_rate", "running_transition_rate", "talr_multiplier"):
    value = optax.tree.get(state, field)
    assert value.shape == (2,) and value.dtype == jnp.float32, field
  np.testing.assert_allclose(optax.tree.get(state, "running_transition_rate"), 1e-2)
  np.testing.assert_allclose(optax.tree.get(state, "talr_multiplier"), 1.0)
  assert optax.tree.get(state, "target_transition_rate").shape == ()
  global_state = _tx(per_layer=False).init(params)
  assert optax.tree.get(global_state, "talr_multiplier").shape == (1,)


def test_state_nests_the_warmup_and_guard_fields():
  state = _tx(target_tr=trquant.measured_target(100, warmup_steps=10)).init(_params())
  tr_state = state[1]
  assert isinstance(tr_state, trquant.TransitionRateState)
  assert tr_state.warmup._fields == ("warmup_end_step", "warmup_window", "warmup_previous_rate")
  assert "windup_events" in tr_state.guard._fields
  assert "stalled_fraction" in tr_state.guard._fields
  for nested in (tr_state.warmup, tr_state.guard):
    assert isinstance(nested, tuple) and hasattr(nested, "_fields")  # NamedTuples
  # optax.tree.get finds nested fields by name, through the chain's state too.
  assert int(optax.tree.get(state, "warmup_end_step")) == 10
  np.testing.assert_array_equal(optax.tree.get(state, "windup_events"),
                                tr_state.guard.windup_events)
  np.testing.assert_array_equal(optax.tree.get(state, "windup_events"), [0, 0])


def test_state_holds_no_copy_of_weights():
  state = _tx().init(_params())
  tr_state = state[1]
  # Scalars: step, target, R_0, warm-up end, previous window rate; the (sum, count) of the
  # warm-up window; 10 vectors of one entry per quantized layer (2 here): rates, multiplier
  # and the windup guard's ceiling, stalled and beyond-grid fractions, window references and
  # event count. Nothing weight-sized.
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(tr_state)) == 5 + 2 + 10 * 2


def test_first_step_scales_quantized_leaves_and_passes_others():
  params = _params()
  grads = _grads(params)
  tx = optax.chain(optax.sgd(0.1), trquant.tr_schedule(1e-2, codes_fn=_codes_fn, init_multiplier=0.5))
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in params:
    np.testing.assert_allclose(updates[name]["kernel"], -0.05 * grads[name]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates[name]["bias"], -0.1 * grads[name]["bias"])


def test_measured_rate_is_that_of_the_applied_update():
  params = _params()
  tx = _tx(lr=0.3)
  state = tx.init(params)
  updates, state = tx.update(_grads(params), state, params)
  before, after = _codes_fn(params), _codes_fn(optax.apply_updates(params, updates))
  expected = [float(trquant.transition_rate(before[n]["kernel"], after[n]["kernel"])) for n in sorted(params)]
  assert min(expected) > 0
  np.testing.assert_allclose(optax.tree.get(state, "measured_transition_rate"), expected)
  np.testing.assert_allclose(
      optax.tree.get(state, "running_transition_rate"), 0.99 * 1e-2 + 0.01 * np.array(expected), rtol=1e-6
  )


def test_global_rate_is_count_weighted():
  params = _params()
  tx = _tx(lr=0.3, per_layer=False)
  updates, state = tx.update(_grads(params), tx.init(params), params)
  before, after = _codes_fn(params), _codes_fn(optax.apply_updates(params, updates))
  changed = sum(int(jnp.sum(before[n]["kernel"] != after[n]["kernel"])) for n in params)
  total = sum(params[n]["kernel"].size for n in params)
  np.testing.assert_allclose(optax.tree.get(state, "measured_transition_rate"), [changed / total], rtol=1e-6)


def test_controller_sees_target_of_this_step_and_previous_running_rate():
  """u_t = controller(u_{t-1}, R_t, K_{t-1}, eta, R_{t-1}): recorded through a custom rule."""
  params = _params()
  schedule = lambda step: 1e-2 * (step + 1)

  def record(u, target, running, eta, previous_target):
    # Encodes its inputs in u so that the state exposes them.
    del u, eta
    return jnp.stack([target, previous_target]) * 0 + running * 1000 + target

  tx = optax.chain(optax.sgd(0.3), trquant.tr_schedule(schedule, codes_fn=_codes_fn, controller=record, eta=1.0))
  state = tx.init(params)
  _, state = tx.update(_grads(params), state, params)
  # Step 0: R_0 = 0.01 and K_{-1} = R_0.
  np.testing.assert_allclose(optax.tree.get(state, "talr_multiplier"), 0.01 * 1000 + 0.01, rtol=1e-6)
  running_0 = np.asarray(optax.tree.get(state, "running_transition_rate"))
  _, state = tx.update(_grads(params, 2), state, params)
  np.testing.assert_allclose(optax.tree.get(state, "talr_multiplier"), running_0 * 1000 + 0.02, rtol=1e-5)
  assert float(optax.tree.get(state, "target_transition_rate")) == pytest.approx(0.02)
  assert int(optax.tree.get(state, "tr_step")) == 2


@pytest.mark.parametrize("controller", ["log", "additive", "momentum"])
def test_controllers_move_towards_target(controller):
  # Running rate above the target lowers u; below it raises u.
  params = _params()
  for target, direction in [(1e-6, -1), (0.9, 1)]:
    tx = _tx(lr=0.3, target_tr=target, controller=controller, decay=0.0)
    state = tx.init(params)
    for seed in range(3):
      _, state = tx.update(_grads(params, seed), state, params)
    u = np.asarray(optax.tree.get(state, "talr_multiplier"))
    assert np.all(np.sign(u - 1.0) == direction), (controller, target, u)


def test_log_feed_forward_follows_target_ratio():
  # With K equal to the target the feedback term is zero: u moves with R_t / R_{t-1}.
  params = _params()
  schedule = optax.piecewise_constant_schedule(1e-2, {1: 0.5})
  tx = trquant.tr_schedule(schedule, codes_fn=_codes_fn, decay=0.0)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  _, state = tx.update(zeros, state, params)
  state = state._replace(running_transition_rate=jnp.full((2,), 5e-3))
  _, state = tx.update(zeros, state, params)
  np.testing.assert_allclose(optax.tree.get(state, "talr_multiplier"), 0.5, rtol=1e-6)


def test_zero_target_freezes():
  params = _params()
  tx = _tx(lr=0.3, target_tr=0.0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for seed in range(200):
    _, state = update(_grads(params, seed), state, params)
  assert np.all(np.asarray(optax.tree.get(state, "talr_multiplier")) < 0.5)


def test_max_multiplier_bounds_multiplier():
  params = _params()
  tx = _tx(lr=1e-6, target_tr=0.5, controller="momentum", max_multiplier=3.0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for seed in range(50):
    _, state = update(_grads(params, seed), state, params)
  u = np.asarray(optax.tree.get(state, "talr_multiplier"))
  assert np.all(u <= 3.0) and np.all(np.isfinite(u))


def test_prefix_codes_tree():
  params = _params()
  codes_fn = lambda p: {"dense": {"kernel": trquant.quantize(p["dense"]["kernel"], 0.5, bits=BITS), "bias": None}, "head": None}
  tx = optax.chain(optax.sgd(0.1), trquant.tr_schedule(1e-2, codes_fn=codes_fn, init_multiplier=2.0))
  grads = _grads(params)
  updates, state = tx.update(grads, tx.init(params), params)
  assert optax.tree.get(state, "talr_multiplier").shape == (1,)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.2 * grads["dense"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * grads["head"]["kernel"], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Non-finite updates
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_update_keeps_state_finite(bad):
  params = _params()
  tx = _tx(lr=0.3, target_tr=0.2)
  state = tx.init(params)
  _, state = tx.update(_grads(params), state, params)
  grads = _grads(params, 2)
  grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(bad)
  updates, new_state = tx.update(grads, state, params)
  assert not np.all(np.isfinite(updates["dense"]["kernel"]))  # documented: passed through
  for field in ("measured_transition_rate", "running_transition_rate", "talr_multiplier"):
    old, new = np.asarray(optax.tree.get(state, field)), np.asarray(optax.tree.get(new_state, field))
    assert np.all(np.isfinite(new)), field
    assert new[0] == old[0], field  # the non-finite layer ("dense", first in tree order) is skipped
    assert new[1] != old[1], field  # the finite layer is updated


def test_apply_if_finite_skips_whole_step():
  params = _params()
  tx = optax.apply_if_finite(_tx(lr=0.3), max_consecutive_errors=5)
  state = tx.init(params)
  grads = _grads(params)
  grads["head"]["bias"] = grads["head"]["bias"].at[0].set(np.nan)
  updates, new_state = tx.update(grads, state, params)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
  assert int(optax.tree.get(new_state, "tr_step")) == 0


@pytest.mark.integration
def test_long_run_multiplier_stays_finite_and_non_negative():
  # 50k steps: the cosine target reaches 0 at 20k and stays there, where the log rule
  # drives u down and the additive one sits on its max(0, .) floor.
  params = _params()
  for controller in ("log", "additive", "momentum"):
    tx = _tx(lr=0.05, target_tr=optax.cosine_decay_schedule(0.05, 20_000), controller=controller)

    def step(carry, key):
      p, s = carry
      updates, s = tx.update(_grads_like(p, key), s, p)
      return (optax.apply_updates(p, updates), s), optax.tree.get(s, "talr_multiplier")

    _, history = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(3), 50_000))
    history = np.asarray(history)
    assert np.all(np.isfinite(history)) and np.all(history >= 0), controller


def _grads_like(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# ---------------------------------------------------------------------------------------
# Composition with jax and optax
# ---------------------------------------------------------------------------------------


def test_jit_does_not_retrace():
  params = _params()
  tx = _tx()
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(None)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for seed in range(3):
    params, state = step(params, state, _grads(params, seed))
  assert len(traces) == 1


def test_init_on_shape_dtype_structs():
  params = _params()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract_state = jax.eval_shape(_tx().init, abstract)
  concrete_state = _tx().init(params)
  assert jax.tree.structure(abstract_state) == jax.tree.structure(concrete_state)
  for a, c in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(concrete_state)):
    assert a.shape == c.shape and a.dtype == c.dtype
  # init itself also accepts shape structs (it only traces codes_fn).
  state = trquant.tr_schedule(1e-2, codes_fn=_codes_fn).init(abstract)
  assert state.talr_multiplier.shape == (2,)


def test_unknown_extra_args_ignored():
  params = _params()
  tx = trquant.tr_schedule(1e-2, codes_fn=_codes_fn)
  updates, _ = tx.update(_grads(params), tx.init(params), params, value=jnp.ones(()), foo="bar")
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_preserved(dtype):
  params = _params(dtype)
  tx = optax.chain(optax.adam(1e-2), trquant.tr_schedule(1e-2, codes_fn=_codes_fn))
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(_grads(params), state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.dtype == b.dtype and a.shape == b.shape


def test_inject_hyperparams():
  params = _params()
  make = optax.inject_hyperparams(trquant.tr_schedule, static_args=("codes_fn", "controller"))
  tx = optax.chain(optax.sgd(0.3), make(target_tr=1e-2, codes_fn=_codes_fn, eta=0.005))
  state = tx.init(params)
  step = jax.jit(tx.update)
  _, state = step(_grads(params), state, params)
  inject_state = state[1]
  assert set(inject_state.hyperparams) >= {"target_tr", "eta", "decay"}
  # A larger injected gain moves u further for the same error.
  small = inject_state
  large = inject_state._replace(hyperparams={**inject_state.hyperparams, "eta": jnp.asarray(0.5)})
  moves = []
  for s in (small, large):
    _, new = step(_grads(params, 2), (state[0], s), params)
    moves.append(np.abs(np.log(np.asarray(optax.tree.get(new, "talr_multiplier")))))
  assert np.all(moves[1] > moves[0])


def test_inject_hyperparams_schedule_target():
  params = _params()
  make = optax.inject_hyperparams(trquant.tr_schedule, static_args=("codes_fn",))
  schedule = optax.linear_schedule(1e-2, 0.0, 10)
  tx = make(target_tr=schedule, codes_fn=_codes_fn)
  state = tx.init(params)
  for seed in range(4):
    _, state = tx.update(_grads(params, seed), state, params)
  assert float(optax.tree.get(state.inner_state, "target_transition_rate")) == pytest.approx(schedule(3))


def test_multi_steps():
  params = _params()
  tx = optax.MultiSteps(_tx(), every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for seed in range(4):
    updates, state = step(_grads(params, seed), state, params)
    params = optax.apply_updates(params, updates)
  assert int(optax.tree.get(state.inner_opt_state, "tr_step")) == 2


def test_partition_with_float_group():
  params = _params()
  labels = {name: {"kernel": "quant", "bias": "float"} for name in params}
  codes_fn = lambda p: {n: {"kernel": trquant.quantize(l["kernel"], SCALES[n], bits=BITS), "bias": None} for n, l in p.items()}
  tx = optax.partition(
      {
          "quant": optax.chain(optax.adam(1e-2), trquant.tr_schedule(1e-2, codes_fn=codes_fn, init_multiplier=2.0)),
          "float": optax.adam(optax.cosine_decay_schedule(1e-2, 100)),
      },
      labels,
  )
  state = tx.init(params)
  grads = _grads(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  reference = optax.adam(1e-2)
  ref_updates, _ = reference.update(grads, reference.init(params), params)
  for name in params:
    np.testing.assert_allclose(updates[name]["kernel"], 2.0 * ref_updates[name]["kernel"], rtol=1e-5)
    np.testing.assert_allclose(updates[name]["bias"], ref_updates[name]["bias"], rtol=1e-5)
  assert optax.tree.get(state, "talr_multiplier").shape == (2,)


def test_masked():
  # optax.masked hands the inner transform params with MaskedNode in place of masked leaves.
  params = _params()
  mask = {name: {"kernel": True, "bias": False} for name in params}
  codes_fn = lambda p: {n: {"kernel": trquant.quantize(l["kernel"], SCALES[n], bits=BITS), "bias": None} for n, l in p.items()}
  tx = optax.chain(optax.sgd(0.1), optax.masked(trquant.tr_schedule(1e-2, codes_fn=codes_fn, init_multiplier=3.0), mask))
  grads = _grads(params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for name in params:
    np.testing.assert_allclose(updates[name]["kernel"], -0.3 * grads[name]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(updates[name]["bias"], -0.1 * grads[name]["bias"], rtol=1e-6)
  assert optax.tree.get(state, "talr_multiplier").shape == (2,)


def test_x64_mode_keeps_state_dtypes():
  params = _params()
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    tx = _tx()
    state = tx.init(params64)
    updates, new_state = jax.jit(tx.update)(_grads(params64), state, params64)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
      assert a.dtype == b.dtype and a.shape == b.shape


def test_nnx_optimizer():
  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1)))

  def codes_fn(params):
    # params is the nnx.State of nnx.Param variables (plain arrays at update).
    return jax.tree_util.tree_map_with_path(
        lambda path, x: trquant.quantize(x, 0.1, bits=BITS) if "kernel" in jax.tree_util.keystr(path) else None,
        params,
    )

  optimizer = nnx.Optimizer(
      model, optax.chain(optax.adam(1e-2), trquant.tr_schedule(1e-2, codes_fn=codes_fn)), wrt=nnx.Param
  )

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  x = jax.random.normal(jax.random.key(0), (32, 8))
  y = jax.random.normal(jax.random.key(1), (32, 4))
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
  assert losses[-1] < losses[0]
  state = optimizer.opt_state
  assert optax.tree.get(state, "talr_multiplier").shape == (2,)
  assert int(optax.tree.get(state, "tr_step")) == 20


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_params_required():
  params = _params()
  tx = trquant.tr_schedule(1e-2, codes_fn=_codes_fn)
  with pytest.raises(ValueError, match="params"):
    tx.init(None)
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(params), tx.init(params), None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"controller": "pid"}, "controller"),
        ({"controller": 3}, "controller"),
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"decay": 1.0}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"target_tr": -1e-3}, "target_tr"),
        ({"target_tr": 2.0}, "target_tr"),
        ({"target_tr": float("nan")}, "target_tr"),
        ({"init_multiplier": -1.0}, "init_multiplier"),
        ({"max_multiplier": 0.0}, "max_multiplier"),
        ({"per_layer": "yes"}, "per_layer"),
        ({"codes_fn": "kernel"}, "codes_fn"),
        ({"controller": lambda u, r, k, e, p: u}, "eta"),
    ],
)
def test_invalid_arguments(kwargs, match):
  kwargs = {"target_tr": 1e-2, "codes_fn": _codes_fn, **kwargs}
  target = kwargs.pop("target_tr")
  with pytest.raises(ValueError, match=match):
    trquant.tr_schedule(target, **kwargs)


def test_codes_tree_mismatch_names_path():
  params = _params()
  bad_key = lambda p: {"dense": {"kernel": None, "bias": None}, "headd": {"kernel": jnp.zeros((16, 4))}}
  with pytest.raises(ValueError, match=r"\['headd'\]\['kernel'\]"):
    trquant.tr_schedule(1e-2, codes_fn=bad_key).init(params)
  bad_shape = lambda p: {"dense": {"kernel": jnp.zeros((32,)), "bias": None}, "head": None}
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*shape"):
    trquant.tr_schedule(1e-2, codes_fn=bad_shape).init(params)


def test_no_quantized_leaf():
  with pytest.raises(ValueError, match="no leaf as quantized"):
    trquant.tr_schedule(1e-2, codes_fn=lambda p: jax.tree.map(lambda _: None, p)).init(_params())


def test_empty_params_tree():
  with pytest.raises(ValueError, match="no leaf as quantized"):
    trquant.tr_schedule(1e-2, codes_fn=lambda p: p).init({})


def test_integer_params_rejected():
  params = {"w": jnp.arange(6, dtype=jnp.int32)}
  codes_fn = lambda p: {"w": trquant.quantize(p["w"].astype(jnp.float32), 0.5, bits=2)}
  with pytest.raises(ValueError, match=r"\['w'\].*int32.*floating"):
    trquant.tr_schedule(1e-2, codes_fn=codes_fn).init(params)


def test_schedule_target_out_of_range_is_rejected_at_init_and_clipped_in_update():
  params = _params()
  for bad in (lambda step: 3.0, lambda step: jnp.float32(-1e-3), lambda step: jnp.nan):
    with pytest.raises(ValueError, match=r"`target_tr` at step 0 .*\[0, 1\]"):
      _tx(target_tr=bad).init(params)
  # Later values cannot raise inside the update: they are clipped to a rate.
  tx = _tx(target_tr=lambda step: jnp.where(step < 1, 1e-2, 3.0))
  state = tx.init(params)
  for seed in range(3):
    _, state = tx.update(_grads(params, seed), state, params)
  assert float(optax.tree.get(state, "target_transition_rate")) == 1.0
  assert float(jnp.max(optax.tree.get(state, "running_transition_rate"))) <= 1.0
  # A traced init cannot evaluate a schedule of the step: it is not an error there.
  jax.jit(_tx(target_tr=lambda step: 3.0 + 0.0 * step).init)(params)


def test_codes_fn_returning_weights_is_rejected_at_init():
  def weights_fn(params):  # the fake-quantized weights, not their integer codes
    return {name: {"kernel": trquant.fake_quant(layer["kernel"], 0.3, bits=BITS), "bias": None}
            for name, layer in params.items()}

  with pytest.raises(ValueError, match=r"non-integer values at \['dense'\]\['kernel'\].*"
                                       "trquant.quantize"):
    _tx(codes_fn=weights_fn).init(_params())
  # Integer codes of any dtype are fine; a traced init cannot check the values.
  _tx(codes_fn=lambda p: jax.tree.map(lambda c: None if c is None else c.astype(jnp.int8),
                                      _codes_fn(p), is_leaf=lambda c: c is None)).init(_params())
  jax.eval_shape(_tx(codes_fn=weights_fn).init, _params())


def test_state_is_stable_through_lax_cond():
  # Both branches of a cond must give the state the same shapes and dtypes (e.g. to skip
  # the optimizer on some steps inside a jitted loop).
  params = _params()
  tx = _tx()
  state = tx.init(params)

  @jax.jit
  def maybe_update(skip, state):
    return jax.lax.cond(skip, lambda s: s, lambda s: tx.update(_grads(params), s, params)[1],
                        state)

  skipped = maybe_update(True, state)
  updated = maybe_update(False, state)
  assert int(optax.tree.get(skipped, "tr_step")) == 0
  assert int(optax.tree.get(updated, "tr_step")) == 1
  for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(updated)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_updates_structure_mismatch():
  params = _params()
  tx = trquant.tr_schedule(1e-2, codes_fn=_codes_fn)
  with pytest.raises(ValueError, match="updates"):
    tx.update({"dense": _grads(params)["dense"]}, tx.init(params), params)


# ---------------------------------------------------------------------------------------
# Measured target (no R_0 to tune)
# ---------------------------------------------------------------------------------------


def _measured_tx(warmup=4, total=20, **kwargs):
  target = trquant.measured_target(total, warmup_steps=warmup, **kwargs)
  return optax.chain(optax.sgd(0.3), trquant.tr_schedule(target, codes_fn=_codes_fn))


def _run(tx, params, steps, grads_fn=_grads, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  states = []
  for seed in range(steps):
    updates, state = update(grads_fn(params, seed), state, params)
    params = optax.apply_updates(params, updates)
    states.append(state)
  return states


def test_measured_target_starts_unknown_and_keeps_multiplier_in_warmup():
  params = _params()
  states = _run(_measured_tx(warmup=4), params, 6)
  assert float(optax.tree.get(_measured_tx().init(params), "initial_target_rate")) == 0.0
  for state in states[:4]:
    np.testing.assert_array_equal(optax.tree.get(state, "talr_multiplier"), 1.0)
  measured = [np.asarray(optax.tree.get(s, "measured_transition_rate")) for s in states]
  # Both layers have 32*16 and 16*4 weights: the rate is count-weighted.
  weights = np.array([512.0, 64.0])
  expected = np.mean([m @ weights / weights.sum() for m in measured[2:4]])
  assert float(optax.tree.get(states[3], "initial_target_rate")) == pytest.approx(expected, rel=1e-5)
  # After the warm-up the controller acts; R_0 is fixed.
  assert float(optax.tree.get(states[5], "initial_target_rate")) == pytest.approx(expected, rel=1e-5)
  assert float(optax.tree.get(states[4], "target_transition_rate")) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("schedule, factor", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0),
                                              (lambda p: (1.0 - p) ** 2, 0.25)])
def test_measured_target_schedule_shapes(schedule, factor):
  params = _params()
  states = _run(_measured_tx(warmup=4, total=14, schedule=schedule, fraction=0.5), params, 10)
  r0 = float(optax.tree.get(states[-1], "initial_target_rate"))
  # Step 9 is halfway through the 10 steps after the warm-up.
  assert float(optax.tree.get(states[9], "target_transition_rate")) == pytest.approx(
      0.5 * r0 * factor, rel=1e-5)


def test_measured_target_non_finite_in_warmup_keeps_state_finite():
  params = _params()

  def grads_fn(p, seed):
    grads = _grads(p, seed)
    if seed == 3:
      grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.nan)
    return grads

  # Without jit the NaN step is applied: use a params-free step for it.
  tx = _measured_tx(warmup=6)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for seed in range(8):
    updates, state = update(grads_fn(params, seed), state, params)
    if seed != 3:
      params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  assert float(optax.tree.get(state, "initial_target_rate")) > 0


def test_measured_target_jit_does_not_retrace():
  params = _params()
  tx = _measured_tx()
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(None)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for seed in range(8):
    params, state = step(params, state, _grads(params, seed))
  assert len(traces) == 1


def test_measured_target_under_inject_hyperparams():
  params = _params()
  make = optax.inject_hyperparams(trquant.tr_schedule, static_args=("codes_fn", "target_tr"))
  tx = optax.chain(optax.sgd(0.3), make(target_tr=trquant.measured_target(20, warmup_steps=4),
                                        codes_fn=_codes_fn, eta=0.005))
  states = _run(tx, params, 6)
  assert "eta" in states[-1][1].hyperparams
  assert float(optax.tree.get(states[-1], "initial_target_rate")) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=10, warmup_steps=10), "must exceed"),
    (dict(total_steps=10, warmup_steps=1), ">= 2"),
    (dict(total_steps=10.0), "must be an int"),
    (dict(total_steps=100, schedule="exp"), "schedule"),
    (dict(total_steps=100, fraction=0.0), "fraction"),
    (dict(total_steps=True), "`total_steps` must be an int"),
    (dict(total_steps=100, window_steps=0), "`window_steps` must be an int >= 1"),
    (dict(total_steps=100, window_steps=2.0), "`window_steps` must be an int"),
    (dict(total_steps=100, max_warmup_steps="10"), "`max_warmup_steps` must be an int"),
])
def test_measured_target_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    trquant.measured_target(**kwargs)


@pytest.mark.parametrize("measured", [False, True])
def test_state_can_be_donated(measured):
  # Every state leaf is its own buffer: a jitted step that donates the state must work.
  params = _params()
  tx = _measured_tx() if measured else _tx()
  step = jax.jit(lambda s, g, p: tx.update(g, s, p)[1], donate_argnums=0)
  state = tx.init(params)
  for seed in range(2):
    state = step(state, _grads(params, seed), params)
  assert int(optax.tree.get(state, "tr_step")) == 2


def test_counts_match_a_reference_count_over_steps():
  """The rate tr_schedule measures is ``sum(codes before != codes after) / size`` per layer,
  step after step, under jit, for layer sizes that are not multiples of the packed group."""
  params = {"a": jax.random.normal(jax.random.key(0), (37, 13)),
            "b": jax.random.normal(jax.random.key(1), (5,)),
            "c": jax.random.normal(jax.random.key(2), (3, 3, 8, 16))}
  codes_fn = lambda p: jax.tree.map(lambda w: trquant.quantize(w, 0.3, bits=2), p)
  tx = optax.chain(optax.adam(0.05), trquant.tr_schedule(5e-2, codes_fn=codes_fn))
  step = jax.jit(tx.update)
  state = tx.init(params)
  for seed in range(5):
    updates, state = step(_grads(params, seed), state, params)
    after = optax.apply_updates(params, updates)
    before_codes, after_codes = codes_fn(params), codes_fn(after)
    expected = [float(np.sum(np.asarray(before_codes[k]) != np.asarray(after_codes[k])))
                / params[k].size for k in sorted(params)]
    np.testing.assert_array_equal(optax.tree.get(state, "measured_transition_rate"),
                                  np.asarray(expected, np.float32))
    params = after


# ---------------------------------------------------------------------------------------
# Settling warm-up of a measured target
# ---------------------------------------------------------------------------------------


def test_settling_warmup_ends_where_the_rate_settles():
  """R_0 is the mean rate of the first window within the tolerance of the one before it,
  after a transient (large steps at first, as right after quantizing an FP checkpoint)."""
  params = _params()
  window, tolerance = 10, 0.1
  target = trquant.measured_target(400, window_steps=window, max_warmup_steps=200,
                                   settle_tolerance=tolerance)
  tx = optax.chain(optax.sgd(0.05), trquant.tr_schedule(target, codes_fn=_codes_fn))

  def grads_fn(p, seed):  # a step 6x larger at first, decaying to 1x by step ~60
    return jax.tree.map(lambda g: g * (1.0 + 5.0 * np.exp(-seed / 15.0)), _grads(p, seed))

  states = _run(tx, params, 120, grads_fn=grads_fn)
  rates = np.array([np.asarray(optax.tree.get(s, "measured_transition_rate")) for s in states])
  sizes = np.array([512.0, 64.0])
  overall = rates @ sizes / sizes.sum()
  means = overall[:120].reshape(-1, window).mean(axis=1)
  settled = next(j for j in range(1, len(means))
                 if means[j - 1] > 0 and abs(means[j] - means[j - 1]) <= tolerance * means[j - 1])
  assert settled >= 2  # the transient is seen, and skipped
  end = (settled + 1) * window
  assert int(optax.tree.get(states[-1], "warmup_end_step")) == end
  r0 = float(optax.tree.get(states[-1], "initial_target_rate"))
  assert r0 == pytest.approx(means[settled], rel=1e-4)
  assert r0 < 0.7 * means[0]  # the transient's rate would have been far higher
  multipliers = np.array([np.asarray(optax.tree.get(s, "talr_multiplier")) for s in states])
  np.testing.assert_array_equal(multipliers[:end], 1.0)  # the optimizer's own step meanwhile
  # From the end of the warm-up, a cosine from R_0 over the remaining steps.
  assert float(optax.tree.get(states[end + 1], "target_transition_rate")) == pytest.approx(
      r0 * 0.5 * (1 + np.cos(np.pi / (400 - end))), rel=1e-5)


def test_settling_warmup_stops_at_its_longest():
  params = _params()
  # A tolerance no two windows meet: the warm-up ends at max_warmup_steps.
  target = trquant.measured_target(100, window_steps=5, max_warmup_steps=20,
                                   settle_tolerance=1e-9)
  states = _run(optax.chain(optax.sgd(0.3), trquant.tr_schedule(target, codes_fn=_codes_fn)),
                params, 25)
  assert int(optax.tree.get(states[-1], "warmup_end_step")) == 20
  assert float(optax.tree.get(states[-1], "initial_target_rate")) > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(total_steps=2), "too short for a settling warm-up"),
    (dict(total_steps=100, window_steps=0), "window_steps"),
    (dict(total_steps=100, window_steps=10, max_warmup_steps=15), "two"),
    (dict(total_steps=100, settle_tolerance=0.0), "settle_tolerance"),
])
def test_settling_warmup_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    trquant.measured_target(**kwargs)


# ---------------------------------------------------------------------------------------
# Windup guard: a target the optimizer cannot reach must not run the TALR away
# ---------------------------------------------------------------------------------------


def _runaway_problem(target, *, guard, steps=2000):
  """Binary weights (scale mean|w|: ~40% start outside the straight-through window),
  Adam without weight decay, a target far above the optimizer's own rate. Returns per-step
  (rate, multiplier, fraction beyond the grid) and the final transform state."""
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (512, 32))
  y = x @ jnp.sign(jax.random.normal(kt, (32, 8)))
  params = {"w": jax.random.normal(kw, (32, 8))}
  scale = trquant.init_scale(params["w"], bits=1)
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], scale, bits=1)}
  tx = optax.chain(optax.adam(1e-2), trquant.tr_schedule(
      target, codes_fn=codes_fn, decay=0.9, windup_guard=guard, guard_window=50))

  def loss(p, idx):
    return jnp.mean((x[idx] @ trquant.fake_quant(p["w"], scale, bits=1) - y[idx]) ** 2)

  def step(carry, key):
    p, s = carry
    updates, s = tx.update(jax.grad(loss)(p, jax.random.randint(key, (64,), 0, 512)), s, p)
    p = optax.apply_updates(p, updates)
    return (p, s), (s[1].measured_transition_rate[0], s[1].talr_multiplier[0],
                    jnp.mean(jnp.abs(p["w"]) > scale))

  keys = jax.random.split(jax.random.key(1), steps)
  (_, state), records = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))
  return [np.asarray(r) for r in records], state[1]


def test_without_the_guard_the_talr_runs_away():
  (rate, multiplier, beyond), state = _runaway_problem(0.05, guard=False)
  last = slice(1500, None)
  np.testing.assert_array_equal(multiplier[last], 1e3)  # max_multiplier
  np.testing.assert_array_equal(rate[last], 0.0)  # no transition for good
  assert beyond[-1] == 1.0  # every latent weight beyond the grid
  assert int(state.guard.windup_events[0]) == 0


def test_the_guard_stops_the_run_away():
  (rate, multiplier, beyond), state = _runaway_problem(0.05, guard=True)
  last = slice(1500, None)
  assert int(state.guard.windup_events[0]) > 0  # reported in the state
  assert multiplier.max() < 2.0 and multiplier[-1] == pytest.approx(1.0)  # never below init
  assert float(state.guard.multiplier_ceiling[0]) == pytest.approx(1.0)
  assert rate[last].mean() > 1e-3  # weights still transit
  assert beyond[-1] < 0.95


@pytest.mark.parametrize("target", [2e-3, 5e-3])
def test_the_guard_leaves_a_reachable_target_alone(target):
  guarded, state = _runaway_problem(target, guard=True)
  unguarded, _ = _runaway_problem(target, guard=False)
  assert int(state.guard.windup_events[0]) == 0
  for a, b in zip(guarded, unguarded):
    np.testing.assert_array_equal(a, b)


def test_guard_window_is_validated():
  with pytest.raises(ValueError, match="guard_window"):
    _tx(guard_window=1)
  with pytest.raises(ValueError, match="windup_guard"):
    _tx(windup_guard="yes")


def _beyond_grid_run(saturation_fn, steps=600):
  """Binary weights, 94% beyond the +-s window (no straight-through gradient there) and a
  coupled weight decay that keeps them moving, so they never count as stalled: only the
  few weights inside the window can meet the target."""
  scale = 0.1
  w0 = jax.random.normal(jax.random.key(0), (2000,))
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], scale, bits=1)}
  tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(1e-3), trquant.tr_schedule(
      3e-3, codes_fn=codes_fn, decay=0.9, guard_window=100, saturation_fn=saturation_fn))
  params = {"w": w0}
  state = tx.init(params)

  def step(carry, t):
    params, state = carry
    inside = jnp.abs(params["w"]) <= scale
    grads = {"w": jnp.where(inside, jax.random.normal(jax.random.key(t + 1), w0.shape), 0.0)}
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), optax.tree.get(state, "talr_multiplier")[0]

  run = jax.jit(lambda carry: jax.lax.scan(step, carry, jnp.arange(steps)))
  (_, state), multipliers = run((params, state))
  return np.asarray(multipliers), state


def test_guard_reads_beyond_grid_weights_from_saturation_fn():
  saturation_fn = lambda p: {"w": jnp.abs(p["w"]) > 0.1}
  blind, blind_state = _beyond_grid_run(None)
  seeing, seeing_state = _beyond_grid_run(saturation_fn)
  assert float(optax.tree.get(blind_state, "stalled_fraction")[0]) < 0.5  # decay moves them
  assert float(optax.tree.get(blind_state, "beyond_grid_fraction")[0]) == 0.0
  assert float(optax.tree.get(seeing_state, "beyond_grid_fraction")[0]) > 0.9
  # Without the mask u climbs until the rate stops answering; with it, the first window
  # that raised u while most weights were beyond the grid sets the ceiling.
  assert blind.max() > 3.0
  assert seeing.max() < 2.0
  assert int(optax.tree.get(seeing_state, "windup_events")[0]) >= 1


def test_nnx_codes_fn_carries_its_saturation_fn():
  model = nnx.Sequential(trquant.nnx.QuantLinear(8, 4, weight_bits=1, rngs=nnx.Rngs(0)))
  model.layers[0].weight_scale.set_value(jnp.float32(1e-3))  # every weight beyond the grid
  codes_fn = trquant.nnx.codes_fn(model)
  assert callable(codes_fn.saturation_fn)
  tx = optax.chain(optax.sgd(1e-2), trquant.tr_schedule(1e-2, codes_fn=codes_fn, decay=0.0))
  params = trquant.nnx.values(nnx.state(model, nnx.Param))
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  np.testing.assert_allclose(optax.tree.get(state, "beyond_grid_fraction"), [1.0])


def test_inject_hyperparams_init_under_jit_and_eval_shape():
  # The README's inject_hyperparams example: init traced (jit, eval_shape) must work with
  # every numeric hyper-parameter, max_multiplier included, injected.
  params = _params()
  make = optax.inject_hyperparams(trquant.tr_schedule, static_args=("codes_fn",))
  tx = make(target_tr=3e-3, codes_fn=_codes_fn, eta=0.005, max_multiplier=50.0)
  abstract = jax.eval_shape(tx.init, params)
  state = jax.jit(tx.init)(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert a.shape == b.shape and a.dtype == b.dtype
  plain = trquant.tr_schedule(3e-3, codes_fn=_codes_fn, eta=0.005, max_multiplier=50.0)
  np.testing.assert_array_equal(optax.tree.get(state.inner_state, "multiplier_ceiling"),
                                optax.tree.get(plain.init(params), "multiplier_ceiling"))


def test_injected_decay_sets_the_guard_window_as_the_plain_transform_does():
  # decay 0.8: the guard's window is 5 / (1 - 0.8) = 25 updates, injected or not.
  params = _params()
  make = optax.inject_hyperparams(trquant.tr_schedule, static_args=("codes_fn",))
  injected = optax.chain(optax.sgd(0.3), make(target_tr=1e-2, codes_fn=_codes_fn, decay=0.8))
  plain = optax.chain(optax.sgd(0.3), trquant.tr_schedule(1e-2, codes_fn=_codes_fn, decay=0.8))
  states = [injected.init(params), plain.init(params)]
  steps = [jax.jit(injected.update), jax.jit(plain.update)]
  for seed in range(30):
    for i in range(2):
      _, states[i] = steps[i](_grads(params, seed), states[i], params)
  for field in ("guard_start_multiplier", "guard_start_tracking", "guard_start_stalled",
                "talr_multiplier", "running_transition_rate"):
    np.testing.assert_allclose(optax.tree.get(states[0], field), optax.tree.get(states[1], field),
                               rtol=1e-6, err_msg=field)
  # Not vacuous: the window closed at step 25, so the references left their initial values.
  assert float(optax.tree.get(states[1], "guard_start_stalled")[0]) != 1.0
