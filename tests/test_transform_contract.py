"""One contract every trquant optax transform keeps, chained after an optimizer.

Run for ``tr_schedule``, ``track_oscillations`` and ``freeze_oscillations`` (a new
transform joins ``TRANSFORMS``): ``init`` on abstract inputs and under ``jax.jit``; no
retrace on a second jitted call; state structure, shapes and dtypes unchanged by
``update`` (so it runs inside ``lax.scan``); ``inject_hyperparams`` with every numeric
hyper-parameter traced gives the plain transform's updates and state; ``MultiSteps``;
``apply_if_finite`` skips a NaN step and leaves the state finite; bf16 kept; unknown
extra arguments ignored; ``params=None`` a clear ValueError; a small quantized problem
still minimises.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import trquant

SCALE = 0.1


def _codes_fn(params):
  return {"w": trquant.quantize(params["w"], SCALE, bits=3), "b": None}


def _scale_fn(params):
  return {"w": SCALE, "b": None}


# name -> (factory, static keyword arguments, numeric hyper-parameters)
TRANSFORMS = {
    "tr_schedule": (trquant.tr_schedule, {"codes_fn": _codes_fn},
                    {"target_tr": 1e-2, "eta": 0.005, "decay": 0.9, "max_multiplier": 50.0}),
    "track_oscillations": (trquant.track_oscillations, {"codes_fn": _codes_fn},
                           {"decay": 0.9, "threshold": 0.01}),
    "freeze_oscillations": (trquant.freeze_oscillations,
                            {"codes_fn": _codes_fn, "scale_fn": _scale_fn},
                            {"total_steps": 20, "decay": 0.7, "warmup_steps": 2,
                             "threshold": 0.05}),
}


def _params(dtype=jnp.float32):
  w = jax.random.normal(jax.random.key(0), (16, 4)) * 0.3
  return {"w": w.astype(dtype), "b": jnp.zeros((4,), dtype)}


def _target():
  return jax.random.normal(jax.random.key(5), (16, 4)) * 0.3


def _loss(params):
  w = trquant.fake_quant(params["w"], SCALE, bits=3)
  return jnp.mean(jnp.square(w.astype(jnp.float32) - _target())) + jnp.sum(params["b"] ** 2)


def _plain(name):
  factory, static, numeric = TRANSFORMS[name]
  return factory(**static, **numeric)


def _chain(transform):
  return optax.chain(optax.adam(1e-2), transform)


@pytest.fixture(params=sorted(TRANSFORMS))
def name(request):
  return request.param


def test_init_on_abstract_inputs_and_under_jit(name):
  tx = _chain(_plain(name))
  params = _params()
  state = tx.init(params)
  abstract = jax.eval_shape(tx.init, params)
  jitted = jax.jit(tx.init)(params)
  for tree in (abstract, jitted):
    assert jax.tree.structure(tree) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(state)):
      assert a.shape == b.shape and a.dtype == b.dtype
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert jax.tree.structure(jax.eval_shape(tx.init, shapes)) == jax.tree.structure(state)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_without_retrace_stable_state_and_dtypes(name, dtype):
  tx = _chain(_plain(name))
  params = _params(dtype)
  state = tx.init(params)
  traces = []

  def step(params, state):
    traces.append(1)
    grads = jax.grad(lambda p: _loss(p).astype(jnp.float32))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  jitted = jax.jit(step)
  before = state
  for _ in range(3):
    params, state, updates = jitted(params, state)
  assert len(traces) == 1
  assert jax.tree.structure(state) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(before)):
    assert a.shape == b.shape and a.dtype == b.dtype
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype == dtype
  # The same steps inside lax.scan (a state that changes structure could not be carried).
  def body(carry, _):
    params, state, _ = step(*carry)
    return (params, state), None
  jax.lax.scan(body, (_params(dtype), tx.init(_params(dtype))), length=2)


def test_inject_hyperparams_traced_equals_plain(name):
  factory, static, numeric = TRANSFORMS[name]
  injected = _chain(optax.inject_hyperparams(factory, static_args=tuple(static))(
      **static, **numeric))
  plain = _chain(_plain(name))
  params = [_params(), _params()]
  states = [jax.jit(injected.init)(params[0]), plain.init(params[1])]
  steps = [jax.jit(injected.update), jax.jit(plain.update)]
  for _ in range(12):
    for i in range(2):
      grads = jax.grad(_loss)(params[i])
      updates, states[i] = steps[i](grads, states[i], params[i])
      params[i] = optax.apply_updates(params[i], updates)
  for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_array_equal(a, b)
  # Integer state exactly; float state to float32 rounding (a Python-float hyper-parameter
  # is folded in double precision, a traced one computed in float32).
  inner = [states[0][1].inner_state, states[1][1]]
  for a, b in zip(jax.tree.leaves(inner[0]), jax.tree.leaves(inner[1])):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)


def test_multi_steps(name):
  tx = optax.MultiSteps(_chain(_plain(name)), every_k_schedule=2)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(4):
    updates, state = step(jax.grad(_loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert int(state.gradient_step) == 2


def test_apply_if_finite_skips_a_nan_step(name):
  tx = optax.apply_if_finite(_chain(_plain(name)), max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  grads = jax.grad(_loss)(params)
  _, state = tx.update(grads, state, params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  updates, new_state = tx.update(bad, state, params)
  assert int(new_state.notfinite_count) == 1
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  for leaf in jax.tree.leaves(new_state.inner_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(leaf) | jnp.isinf(leaf)))  # thresholds may be inf
      assert not bool(jnp.any(jnp.isnan(leaf)))


def test_unknown_extra_arguments_and_params_none(name):
  transform = _plain(name)
  params = _params()
  state = transform.init(params)
  grads = jax.grad(_loss)(params)
  updates, _ = transform.update(grads, state, params, foo="bar", value=jnp.ones(()))
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="params"):
    transform.update(grads, state, None)
  with pytest.raises(ValueError, match="params"):
    transform.init(None)


def test_a_small_quantized_problem_still_minimises(name):
  tx = _chain(_plain(name))
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(40):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses[::10]
