"""Oscillation tracking, iterative freezing and the dampening loss (trquant._src.oscillations)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import trquant
from trquant._src import codes_tree
from trquant._src.oscillations import fixed_point_ema
from trquant.nnx import QuantLinear

BITS = 3
SCALES = {"dense": 0.5, "head": 0.25}


def _params(dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {
      "dense": {"kernel": jax.random.normal(keys[0], (32, 16), dtype), "bias": jnp.zeros(16, dtype)},
      "head": {"kernel": jax.random.normal(keys[1], (16, 4), dtype) * 0.5, "bias": jnp.zeros(4, dtype)},
  }


def _codes_fn(params):
  return {name: {"kernel": trquant.quantize(layer["kernel"], SCALES[name], bits=BITS), "bias": None}
          for name, layer in params.items()}


def _scale_fn(params):
  return {name: {"kernel": SCALES[name], "bias": None} for name in params}


def _grads(params, seed=1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _targets(params, seed=7):
  """Optima of the latent kernels that lie between grid points (so STE training oscillates)."""
  out = {}
  for index, (name, layer) in enumerate(sorted(params.items())):
    key = jax.random.key(seed + index)
    grid = jnp.round(layer["kernel"].astype(jnp.float32) / SCALES[name])
    offset = jax.random.uniform(key, grid.shape, minval=0.2, maxval=0.8)
    out[name] = jnp.clip(grid + offset, -4, 2.8) * SCALES[name]
  return out


def _ste_grads(params, targets):
  """Gradient of 0.5 * (w_q - w*)^2 with the straight-through estimator; biases get none."""
  codes = _codes_fn(params)
  return {name: {"kernel": (codes[name]["kernel"].astype(jnp.float32) * SCALES[name]
                            - targets[name]).astype(layer["kernel"].dtype),
                 "bias": jnp.zeros_like(layer["bias"])}
          for name, layer in params.items()}


def _per_weight_bytes(state, params):
  weights = sum(params[name]["kernel"].size for name in params)
  per_weight = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim >= 2]
  return sum(leaf.nbytes for leaf in per_weight) / weights


# ---------------------------------------------------------------------------------------
# Tracking
# ---------------------------------------------------------------------------------------


def test_track_state_layout_is_param_shaped_and_3_bytes_per_weight():
  params = _params()
  state = trquant.track_oscillations(codes_fn=_codes_fn).init(params)
  for field, dtype in (("oscillation_frequency", jnp.uint16), ("last_direction", jnp.int8)):
    tree = optax.tree.get(state, field)
    for name in params:
      assert tree[name]["kernel"].shape == params[name]["kernel"].shape
      assert tree[name]["kernel"].dtype == dtype
      assert tree[name]["bias"] is None
  assert optax.tree.get(state, "osc_step").dtype == jnp.int32
  assert optax.tree.get(state, "oscillation_count").shape == (2,)
  assert optax.tree.get(state, "oscillating_fraction").shape == (2,)
  assert _per_weight_bytes(state, params) == 3.0


def test_track_leaves_updates_unchanged():
  params = _params()
  tx = trquant.track_oscillations(codes_fn=_codes_fn)
  grads = _grads(params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  assert int(state.osc_step) == 1


def test_track_oscillation_definition():
  """Hand-made code sequences; decay 0 makes f the indicator of the last step's oscillation."""
  params = {"w": jnp.zeros(5)}
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], 1.0, bits=4)}
  tx = trquant.track_oscillations(codes_fn=codes_fn, decay=0.0, threshold=0.5)
  state = tx.init(params)
  update = jax.jit(tx.update)
  # Codes: w0 0,1,0,1; w1 0,1,2,1; w2 0,1,1,0; w3 0,-1,-2,-2; w4 constant 0.
  steps = [[1, 1, 1, -1, 0], [-1, 1, 0, -1, 0], [1, -1, -1, 0, 0]]
  counts = []
  for step in steps:
    updates = {"w": jnp.asarray(step, jnp.float32)}
    out, state = update(updates, state, params)
    np.testing.assert_array_equal(out["w"], updates["w"])
    params = optax.apply_updates(params, updates)
    counts.append(int(state.oscillation_count[0]))
  assert counts == [0, 1, 3]
  np.testing.assert_array_equal(state.last_direction["w"], [1, -1, -1, -1, 0])
  np.testing.assert_array_equal(state.oscillation_frequency["w"], [65535, 65535, 65535, 0, 0])
  np.testing.assert_allclose(state.oscillating_fraction, [0.6])
  assert int(state.osc_step) == 3


def _reference_track(code_history, momentum):
  """float64 numpy re-implementation of the definition, from a (steps + 1, n) code history."""
  n = code_history.shape[1]
  frequency, direction = np.zeros(n), np.zeros(n)
  counts = []
  for before, after in zip(code_history[:-1], code_history[1:]):
    step_direction = np.sign(after - before)
    oscillated = (step_direction != 0) & (step_direction * direction == -1)
    frequency = momentum * oscillated + (1 - momentum) * frequency
    direction = np.where(step_direction != 0, step_direction, direction)
    counts.append(int(oscillated.sum()))
  return frequency, direction, counts


def test_track_matches_float64_reference():
  n, steps, momentum = 2000, 300, 0.05
  params = {"w": jnp.zeros(n)}
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], 1.0, bits=4)}
  tx = trquant.track_oscillations(codes_fn=codes_fn, decay=1 - momentum)
  updates = 0.7 * jax.random.normal(jax.random.key(3), (steps, n))

  def step(carry, update):
    p, s = carry
    _, s = tx.update({"w": update}, s, p)
    p = optax.apply_updates(p, {"w": update})
    return (p, s), (p["w"], s.oscillation_count[0])

  (_, state), (history, counts) = jax.lax.scan(step, (params, tx.init(params)), updates)
  codes = np.concatenate([np.zeros((1, n)), np.asarray(codes_fn({"w": history})["w"])])
  frequency, direction, expected_counts = _reference_track(codes.astype(np.float64), momentum)
  assert sum(expected_counts) > 10 * steps  # the walk does oscillate
  np.testing.assert_array_equal(np.asarray(counts), expected_counts)
  np.testing.assert_array_equal(state.last_direction["w"], direction)
  f = np.asarray(state.oscillation_frequency["w"], np.float64) / 65535
  # Stochastic rounding: unbiased, with a per-weight error far below the frequencies.
  assert abs(np.mean(f - frequency)) < 2e-5
  assert np.max(np.abs(f - frequency)) < 2e-3


def test_frequency_is_unbiased_at_small_momentum_where_half_precision_fails():
  """Weights flip between codes 0 and 1 at random (every flip after the first oscillates);
  with momentum 1e-3 the uint16 frequency stays unbiased, where a bfloat16 EMA never decays."""
  n, steps, momentum, rate = 1024, 3000, 1e-3, 0.02
  params = {"w": jnp.zeros(n)}
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], 1.0, bits=4)}
  tx = trquant.track_oscillations(codes_fn=codes_fn, decay=1 - momentum)
  flips = jax.random.uniform(jax.random.key(0), (steps, n)) < rate

  def step(carry, flip):
    p, s = carry
    update = {"w": jnp.where(flip, 1.0 - 2.0 * p["w"], 0.0)}  # 0 -> 1 or 1 -> 0
    _, s = tx.update(update, s, p)
    return (optax.apply_updates(p, update), s), None

  (_, state), _ = jax.lax.scan(step, (params, tx.init(params)), flips)
  codes = np.concatenate([np.zeros((1, n)), np.cumsum(np.asarray(flips), axis=0) % 2])
  frequency, _, _ = _reference_track(codes, momentum)
  f = np.asarray(state.oscillation_frequency["w"], np.float64) / 65535
  assert frequency.mean() > 0.015  # about rate * (1 - (1 - momentum) ** steps)
  assert abs(f.mean() - frequency.mean()) < 2e-4

  # The same EMA in bfloat16: 1 - momentum rounds to 1, so it only ever grows.
  previous = np.concatenate([np.zeros((1, n)), np.cumsum(np.asarray(flips), axis=0)[:-1]])
  oscillated = np.asarray(flips) & (previous > 0)  # a flip after the first

  def bf16_step(ema, hit):
    return jnp.bfloat16(momentum) * hit.astype(jnp.bfloat16) + jnp.bfloat16(1 - momentum) * ema, None

  bf16, _ = jax.lax.scan(bf16_step, jnp.zeros((n,), jnp.bfloat16), jnp.asarray(oscillated))
  assert float(jnp.mean(bf16.astype(jnp.float32))) > 2 * frequency.mean()


def _freeze(**kwargs):
  kwargs.setdefault("total_steps", 100)
  kwargs.setdefault("warmup_steps", 0)
  return trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=_scale_fn, **kwargs)


def test_freeze_state_layout_is_param_shaped_and_6_bytes_per_weight():
  params = _params()
  state = _freeze().init(params)
  for field, dtype in (("oscillation_frequency", jnp.uint16), ("last_direction", jnp.int8),
                       ("code_ema", jnp.int16), ("frozen", jnp.bool_)):
    tree = optax.tree.get(state, field)
    for name in params:
      assert tree[name]["kernel"].shape == params[name]["kernel"].shape, field
      assert tree[name]["kernel"].dtype == dtype, field
      assert tree[name]["bias"] is None
  # The code EMA starts at the codes themselves.
  np.testing.assert_array_equal(state.code_ema["dense"]["kernel"],
                                _codes_fn(params)["dense"]["kernel"] * 256)
  assert optax.tree.get(state, "frozen_fraction").shape == (2,)
  assert optax.tree.get(state, "oscillating_fraction").shape == (2,)
  assert _per_weight_bytes(state, params) == 6.0


def _run_oscillating(tx, params, steps, lr=0.05):
  """SGD on the STE loss 0.5 * (w_q - w*)^2; returns per-step (params, updates, state) records."""
  targets = _targets(params)
  chain = optax.chain(optax.sgd(lr), tx)

  @jax.jit
  def step(params, state):
    updates, state = chain.update(_ste_grads(params, targets), state, params)
    params = optax.apply_updates(params, updates)
    return params, updates, state, _codes_fn(params)

  state = chain.init(params)
  records = [(params, None, state, _codes_fn(params))]
  for _ in range(steps):
    records.append(step(params, state))
    params, _, state, _ = records[-1]
  return jax.device_get(records)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_frozen_weights_land_on_their_grid_point_and_stay(dtype):
  params = _params(dtype)
  records = _run_oscillating(_freeze(threshold=0.15, decay=0.9), params, 30)
  final_state = records[-1][2][1]
  assert np.all(np.asarray(final_state.frozen_fraction) > 0.3)
  for name in params:
    scale = SCALES[name]
    for (_, _, before, _), (new_params, updates, after, _) in zip(records[:-1], records[1:]):
      frozen_before = np.asarray(before[1].frozen[name]["kernel"])
      frozen_after = np.asarray(after[1].frozen[name]["kernel"])
      assert np.all(frozen_after >= frozen_before)  # permanent
      newly = frozen_after & ~frozen_before
      kernel = np.asarray(new_params[name]["kernel"].astype(jnp.float32))
      update = np.asarray(updates[name]["kernel"].astype(jnp.float32))
      assert updates[name]["kernel"].dtype == jnp.dtype(dtype)
      # Newly frozen: exactly on round(EMA of the code) * scale, in the parameter dtype (at
      # once here: with power-of-two scales the difference is always exact).
      ema_code = np.round(np.asarray(before[1].code_ema[name]["kernel"], np.float64) / 256)
      expected = np.asarray(jnp.asarray(ema_code * scale, jnp.float32).astype(dtype).astype(jnp.float32))
      np.testing.assert_array_equal(kernel[newly], expected[newly])
      # Frozen earlier: no movement at all.
      assert np.all(update[frozen_before] == 0.0)
    # Codes of frozen weights never change after freezing.
    frozen = np.asarray(final_state.frozen[name]["kernel"])
    first = next(i for i, r in enumerate(records) if np.any(np.asarray(r[2][1].frozen[name]["kernel"])))
    codes = [np.asarray(r[3][name]["kernel"], np.float32) for r in records[first:]]
    late = [c[frozen & np.asarray(records[first][2][1].frozen[name]["kernel"])] for c in codes]
    assert all(np.array_equal(late[0], c) for c in late)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_frozen_weights_land_on_any_scale_grid(dtype):
  """Per-weight scales that are not powers of two: the freezing update lands (nearly) every
  weight on code * scale at once; the rest are within a rounding, on the same code, and land
  exactly on the next step, when they are re-pinned."""
  rng = np.random.default_rng(0)
  n = 100_000
  scale = jnp.asarray(np.exp(rng.uniform(-6, 0, n)).astype(np.float32))
  codes = rng.integers(-7, 7, n).astype(np.float32)  # code + 1 stays on the 4-bit grid
  params = {"w": jnp.asarray((codes + rng.uniform(-0.45, 0.45, n)) * scale).astype(dtype)}
  tx = trquant.freeze_oscillations(
      codes_fn=lambda p: {"w": trquant.quantize(p["w"], scale, bits=4)},
      scale_fn=lambda p: {"w": scale},
      total_steps=10, threshold=0.5, decay=0.0, warmup_steps=0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  # One code up and back down: every weight oscillates once and freezes on the next update.
  for update in (scale, -scale):
    updates, state = step({"w": update.astype(dtype)}, state, params)
    params = optax.apply_updates(params, updates)
  assert float(optax.tree.get(state, "frozen_fraction")[0]) == 0.0
  target = jnp.asarray(codes * scale).astype(dtype)
  zero = {"w": jnp.zeros(n, dtype)}
  updates, state = step(zero, state, params)
  landed = optax.apply_updates(params, updates)["w"]
  assert float(optax.tree.get(state, "frozen_fraction")[0]) == 1.0
  assert landed.dtype == jnp.dtype(dtype)
  assert float(jnp.mean(landed == target)) > 0.98
  np.testing.assert_array_equal(jnp.round(landed.astype(jnp.float32) / scale), codes)
  updates, state = step(zero, state, {"w": landed})
  np.testing.assert_array_equal(optax.apply_updates({"w": landed}, updates)["w"], target)


def test_no_freezing_before_start():
  params = _params()
  records = _run_oscillating(_freeze(threshold=0.05, decay=0.9, total_steps=40,
                                     warmup_steps=20), params, 40)
  for step, (_, _, state, _) in enumerate(records[1:]):
    fraction = np.asarray(optax.tree.get(state, "frozen_fraction"))
    threshold = float(optax.tree.get(state, "freeze_threshold"))
    if step < 20:
      assert np.all(fraction == 0) and threshold == np.inf, step
    else:
      assert threshold == pytest.approx(0.05)
  assert np.all(fraction > 0.3)


def test_threshold_schedule_is_used():
  params = _params()
  schedule = lambda step: jnp.where(step < 30, 1.0, 0.05)  # 1.0: f never exceeds it
  records = _run_oscillating(_freeze(threshold=schedule, decay=0.9), params, 40)
  assert np.all(np.asarray(records[30][2][1].frozen_fraction) == 0)
  assert np.all(np.asarray(records[40][2][1].frozen_fraction) > 0.3)


def test_schedules():
  threshold = trquant.freeze_threshold_schedule(1000)
  assert float(threshold(0)) == np.inf and float(threshold(249)) == np.inf
  np.testing.assert_allclose([threshold(250), threshold(625), threshold(1000), threshold(5000)],
                             [0.1, 0.055, 0.01, 0.01], rtol=1e-5)
  custom = trquant.freeze_threshold_schedule(100, init_value=0.2, end_value=0.011, warmup_steps=0)
  np.testing.assert_allclose([custom(0), custom(100)], [0.2, 0.011], rtol=1e-5)
  lam = trquant.dampening_weight_schedule(1000)
  np.testing.assert_allclose([lam(0), lam(250), lam(625), lam(1000)], [0, 0, 0.05, 0.1], atol=1e-7)
  values = jax.jit(jax.vmap(lam))(jnp.arange(1000))  # traced steps
  assert np.all(np.diff(np.asarray(values)) >= 0)
  assert float(trquant.dampening_weight_schedule(10, end_value=1.0, warmup_steps=0)(10)) == 1.0


def test_chain_after_adam_and_tr_schedule():
  params = _params()
  targets = _targets(params)
  tx = optax.chain(optax.adam(0.05), trquant.tr_schedule(2e-2, codes_fn=_codes_fn),
                   _freeze(threshold=0.1, decay=0.9))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(_ste_grads(p, targets), s, p))
  for _ in range(40):
    updates, new_state = step(params, state)
    frozen = optax.tree.get(state, "frozen")
    for name in params:
      assert np.all(np.asarray(updates[name]["kernel"])[np.asarray(frozen[name]["kernel"])] == 0)
    params, state = optax.apply_updates(params, updates), new_state
  assert np.all(np.asarray(optax.tree.get(state, "frozen_fraction")) > 0.1)
  assert np.all(np.isfinite(optax.tree.get(state, "talr_multiplier")))
  assert int(optax.tree.get(state, "tr_step")) == int(optax.tree.get(state, "osc_step")) == 40


# ---------------------------------------------------------------------------------------
# The paper's toy problem: 1-D regressions whose optimum lies between two grid points
# ---------------------------------------------------------------------------------------


def _toy(method, steps=2000, n=512, lr=0.01):
  """Returns (oscillations per weight per step over the last quarter, final params, w*, state)."""
  rng = np.random.default_rng(0)
  # Optima inside the grid [-4, 3], so that no latent weight starts beyond the clipping range.
  w_star = jnp.asarray(rng.integers(-3, 2, n) + rng.uniform(0.15, 0.85, n), jnp.float32)
  params = {"w": w_star + jnp.asarray(rng.normal(0, 0.3, n), jnp.float32)}
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], 1.0, bits=BITS)}
  lam = trquant.dampening_weight_schedule(steps, end_value=1.0)

  def loss_fn(p, step):
    w_q = trquant.fake_quant(p["w"], 1.0, bits=BITS)
    loss = 0.5 * jnp.sum(jnp.square(w_q - w_star))
    if method == "dampening":
      loss += lam(step) * trquant.dampening_loss(p["w"], 1.0, bits=BITS, aggregation="sum")
    return loss

  # 1 / (1 - decay) well below the 500-step warm-up, so that the code EMA has forgotten the
  # initial codes when freezing starts.
  if method == "freezing":
    osc = trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=lambda p: {"w": 1.0},
                                      total_steps=steps, decay=0.99)
  else:
    osc = trquant.track_oscillations(codes_fn=codes_fn, decay=0.99)
  tx = optax.chain(optax.sgd(lr), osc)

  def step(carry, t):
    p, s = carry
    updates, s = tx.update(jax.grad(loss_fn)(p, t), s, p)
    return (optax.apply_updates(p, updates), s), optax.tree.get(s, "oscillation_count")[0]

  (params, state), counts = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))(
      (params, tx.init(params)))
  rate = float(np.sum(np.asarray(counts)[-steps // 4:])) / (n * (steps // 4))
  return rate, params["w"], w_star, state


def test_toy_regression_oscillates_and_dampening_and_freezing_stop_it():
  baseline, w_base, w_star, state = _toy("sgd")
  # Plain STE: nearly every weight keeps crossing the boundary next to its optimum.
  assert baseline > 0.3
  assert float(optax.tree.get(state, "oscillating_fraction")[0]) > 0.95
  assert np.all(np.abs(np.asarray(w_base - jnp.floor(w_star) - 0.5)) < 0.05)
  dampened, _, _, state = _toy("dampening")
  assert dampened < 1e-3 * baseline
  frozen_rate, w_frozen, _, state = _toy("freezing")
  assert frozen_rate == 0.0
  assert float(optax.tree.get(state, "frozen_fraction")[0]) > 0.95
  # Frozen weights no longer count as oscillating, though their f decays only slowly.
  assert float(optax.tree.get(state, "oscillating_fraction")[0]) < 0.05
  frozen = np.asarray(optax.tree.get(state, "frozen")["w"])
  # Frozen at round(EMA of the code): the time-average of the oscillation, i.e. the
  # grid point nearest to the optimum (where that is clear-cut).
  clear = frozen & (np.abs(np.asarray(w_star) % 1 - 0.5) > 0.05)
  np.testing.assert_array_equal(np.asarray(w_frozen)[clear], np.round(np.asarray(w_star))[clear])


# ---------------------------------------------------------------------------------------
# Dampening loss
# ---------------------------------------------------------------------------------------


def test_dampening_loss_value_aggregations_and_gradient():
  w = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 4, 8))) * 0.3
  scale = np.abs(w).max(axis=(0, 1, 2), keepdims=True) / 10  # per channel; some weights clip
  lo, hi = trquant.quant_range(4)
  w_q = scale * np.clip(np.round(w / scale), lo, hi)
  per_weight = (w_q - np.clip(w, scale * lo, scale * hi)) ** 2
  loss = lambda w, aggregation: trquant.dampening_loss(w, scale, bits=4, aggregation=aggregation)
  values = jax.jit(lambda w: [loss(w, a) for a in ("kernel_mean", "sum", "mean")])(w)
  np.testing.assert_allclose(values, [per_weight.sum(-1).mean(), per_weight.sum(), per_weight.mean()],
                             rtol=1e-5)
  grad = jax.jit(jax.grad(lambda w: loss(w, "sum")))(w)
  inside = (w > scale * lo) & (w < scale * hi)
  assert 0 < inside.mean() < 1
  np.testing.assert_allclose(grad, np.where(inside, 2 * (w - w_q), 0.0), rtol=1e-5, atol=1e-7)
  # Weights beyond the clipping range add nothing.
  assert float(trquant.dampening_loss(jnp.array([100.0, -100.0]), 1.0, bits=4)) == 0.0
  # bfloat16 weights: computed in float32.
  assert trquant.dampening_loss(w.astype(jnp.bfloat16), scale, bits=4).dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: trquant.track_oscillations(codes_fn=_codes_fn, decay=1.0), "decay"),
    (lambda: trquant.track_oscillations(codes_fn=_codes_fn, decay=1.001), "decay"),
    (lambda: trquant.track_oscillations(codes_fn=_codes_fn, decay=-0.5), "decay"),
    (lambda: trquant.track_oscillations(codes_fn=_codes_fn, decay=True), "decay"),
    (lambda: trquant.track_oscillations(codes_fn=_codes_fn, threshold=0.0), "threshold"),
    (lambda: trquant.track_oscillations(codes_fn=_codes_fn, threshold=1.5), "threshold"),
    (lambda: trquant.track_oscillations(codes_fn="codes"), "codes_fn"),
    (lambda: _freeze(total_steps=0), "total_steps"),
    (lambda: _freeze(total_steps=-5), "total_steps"),
    (lambda: _freeze(total_steps=10.5), "total_steps"),
    (lambda: _freeze(threshold=0.0), "threshold"),
    (lambda: _freeze(threshold=2.0), "threshold"),
    (lambda: _freeze(decay=1.0), "decay"),
    (lambda: _freeze(warmup_steps=100), "warmup_steps"),
    (lambda: trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=None, total_steps=10), "scale_fn"),
    (lambda: trquant.freeze_threshold_schedule(0), "total_steps"),
    (lambda: trquant.freeze_threshold_schedule(10, end_value=0.0), "end_value"),
    (lambda: trquant.dampening_weight_schedule(-1), "total_steps"),
    (lambda: trquant.dampening_weight_schedule(10, end_value=-0.1), "end_value"),
    (lambda: trquant.dampening_loss(jnp.ones(3), 1.0, bits=3, aggregation="max"), "aggregation"),
    (lambda: trquant.dampening_loss(jnp.ones(3), 0.0, bits=3), "scale"),
    (lambda: trquant.dampening_loss(jnp.ones(3), 1.0, bits=0), "bits"),
])
def test_bad_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("make", [lambda: trquant.track_oscillations(codes_fn=_codes_fn), _freeze])
def test_params_required_and_structure_errors_name_the_path(make):
  params = _params()
  tx = make()
  with pytest.raises(ValueError, match="params"):
    tx.init(None)
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(params), state)
  bad_codes = lambda p: {**_codes_fn(p), "head": {"kernel": jnp.zeros((3,)), "bias": None}}
  bad = (trquant.track_oscillations(codes_fn=bad_codes) if "Freeze" not in type(state).__name__
         else trquant.freeze_oscillations(codes_fn=bad_codes, scale_fn=_scale_fn, total_steps=10))
  with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\]"):
    bad.init(params)
  with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\]"):
    bad.update(_grads(params), state, params)


def test_scale_fn_errors_name_the_path():
  params = _params()
  wrong_shape = lambda p: {**_scale_fn(p), "dense": {"kernel": jnp.ones(3), "bias": None}}
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*broadcast"):
    trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=wrong_shape, total_steps=10).init(params)
  missing = lambda p: {**_scale_fn(p), "head": {"kernel": None, "bias": None}}
  with pytest.raises(ValueError, match=r"None at \['head'\]\['kernel'\]"):
    trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=missing, total_steps=10).init(params)
  with pytest.raises(ValueError, match="structure of codes_fn"):
    trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=lambda p: {"dense": 1.0},
                                total_steps=10).init(params)


def test_scale_fn_values_are_checked_where_concrete():
  params = _params()
  for bad in (jnp.float32(-0.25), jnp.zeros(()), jnp.float32(jnp.nan)):
    scale_fn = lambda p, bad=bad: {**_scale_fn(p), "head": {"kernel": bad, "bias": None}}
    with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\].*positive and finite"):
      trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=scale_fn, total_steps=10).init(params)


def test_track_and_freeze_reject_non_integer_codes():
  def weights_fn(params):  # the latent weights, not their integer codes
    return {name: {"kernel": layer["kernel"], "bias": None} for name, layer in params.items()}

  for tx in (trquant.track_oscillations(codes_fn=weights_fn),
             trquant.freeze_oscillations(codes_fn=weights_fn, scale_fn=_scale_fn, total_steps=10)):
    with pytest.raises(ValueError, match=r"non-integer values at \['dense'\]\['kernel'\]"):
      tx.init(_params())


def test_freeze_rejects_codes_outside_its_ema_range():
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], 0.01, bits=10)}  # codes in [-512, 511]
  tx = trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=lambda p: {"w": 0.01}, total_steps=10,
                                   threshold=0.1, warmup_steps=0)
  with pytest.raises(ValueError, match=r"code -300 at \['w'\], outside \[-128, 127\]"):
    tx.init({"w": jnp.array([-3.0, 0.05, 0.4])})
  # In range at init (codes -120, 5, 40); w[0] then moves to code -300, and every weight
  # oscillates often enough to be frozen.
  state = tx.init({"w": jnp.array([-1.2, 0.05, 0.4])})
  state = state._replace(tracker=state.tracker._replace(
      oscillation_frequency={"w": jnp.full(3, 65535, jnp.uint16)}))
  moved = {"w": jnp.array([-3.0, 0.05, 0.4])}
  with pytest.raises(ValueError, match="outside"):  # an update with concrete values checks
    tx.update({"w": jnp.zeros(3)}, state, moved)
  # Inside jit nothing can raise: the weight is left unfrozen, not pinned at code -128 or
  # at its saturated code EMA.
  updates, state = jax.jit(tx.update)({"w": jnp.zeros(3)}, state, moved)
  np.testing.assert_array_equal(state.frozen["w"], [False, True, True])
  assert float(optax.apply_updates(moved, updates)["w"][0]) == -3.0


def test_freeze_rejects_a_wide_nnx_layer_at_init():
  model = nnx.Sequential(QuantLinear(16, 8, weight_bits=10, rngs=nnx.Rngs(0)))
  tx = trquant.freeze_oscillations(codes_fn=trquant.nnx.codes_fn(model), scale_fn=trquant.nnx.scale_fn(model),
                                   total_steps=10)
  with pytest.raises(ValueError, match="outside \\[-128, 127\\].*8 bits or fewer"):
    nnx.Optimizer(model, optax.chain(optax.sgd(0.1), tx), wrt=nnx.Param)


# ---------------------------------------------------------------------------------------
# Composition with jax and optax
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: trquant.track_oscillations(codes_fn=_codes_fn),
                                  lambda: _freeze(threshold=0.1, decay=0.9)])
def test_jit_does_not_retrace(make):
  params = _params()
  targets = _targets(params)
  tx = optax.chain(optax.sgd(0.05), make())
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(None)
    updates, s = tx.update(_ste_grads(p, targets), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1 and step._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_preserved(dtype):
  params = _params(dtype)
  tx = optax.chain(optax.adam(1e-2), trquant.track_oscillations(codes_fn=_codes_fn),
                   _freeze(threshold=0.1, decay=0.9))
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(_grads(params), state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_update_does_not_poison_state(bad):
  params = _params()
  tx = _freeze(threshold=0.1, decay=0.8)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for seed in range(5):
    updates = jax.tree.map(lambda g: 0.3 * g, _grads(params, seed))
    _, state = update(updates, state, params)
    params = optax.apply_updates(params, updates)
  grads = jax.tree.map(lambda g: 0.3 * g, _grads(params, 9))
  grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(bad)
  out, new_state = update(grads, state, params)
  frozen = np.asarray(new_state.frozen["dense"]["kernel"])
  assert np.all(np.isfinite(np.asarray(out["dense"]["kernel"])[frozen]))
  for field in ("oscillation_frequency", "last_direction", "code_ema"):
    old, new = optax.tree.get(state, field), optax.tree.get(new_state, field)
    np.testing.assert_array_equal(new["dense"]["kernel"], old["dense"]["kernel"])  # layer skipped
    assert not np.array_equal(new["head"]["kernel"], old["head"]["kernel"]), field  # others go on
  assert int(new_state.tracker.oscillation_count[0]) == 0
  # The NaN weight itself, once applied, is ignored by the tracker on the next step.
  params = optax.apply_updates(params, out)
  _, later = update(jax.tree.map(jnp.zeros_like, params), new_state, params)
  for leaf in jax.tree.leaves(later):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))


def test_orbax_restore_continues_bit_identically(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = _params()
  targets = _targets(params)
  tx = optax.chain(optax.sgd(0.05), _freeze(threshold=0.1, decay=0.9))

  @jax.jit
  def step(p, s):
    updates, s = tx.update(_ste_grads(p, targets), s, p)
    return optax.apply_updates(p, updates), s

  def run(p, s, n):
    for _ in range(n):
      p, s = step(p, s)
    return p, s

  abstract_state = jax.eval_shape(tx.init, params)  # what a restore target can be built from
  params, state = run(params, tx.init(params), 15)
  assert jax.tree.structure(abstract_state) == jax.tree.structure(state)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  expected = run(params, state, 15)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
  resumed = run(restored["params"], restored["opt_state"], 15)
  assert np.any(np.asarray(optax.tree.get(expected[1], "frozen_fraction")) > 0)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Flax NNX
# ---------------------------------------------------------------------------------------


def _nnx_model(weight_quantizer="fixed"):
  rngs = nnx.Rngs(0)
  # absmax scales: the default MSE search compiles a grid search per shape (slow eagerly).
  kwargs = dict(weight_bits=3, weight_quantizer=weight_quantizer, scale_method="absmax", rngs=rngs)
  return nnx.Sequential(QuantLinear(16, 32, **kwargs), nnx.relu,
                        QuantLinear(32, 4, act_bits=4, per_channel=True, **kwargs))


def test_nnx_optimizer_with_freezing_and_dampening():
  model = _nnx_model()
  layers = (model.layers[0], model.layers[2])
  expected = sum(trquant.dampening_loss(layer.kernel.get_value(), layer.weight_scale.get_value(),
                                        bits=3) for layer in layers)
  np.testing.assert_allclose(trquant.nnx.model_dampening_loss(model), expected, rtol=1e-6)
  steps = 40
  tx = optax.chain(optax.adam(5e-2), trquant.freeze_oscillations(
      codes_fn=trquant.nnx.codes_fn(model), scale_fn=trquant.nnx.scale_fn(model), total_steps=steps,
      threshold=0.05, decay=0.95))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  lam = trquant.dampening_weight_schedule(steps, end_value=0.01)
  x = jax.random.normal(jax.random.key(1), (64, 16))
  y = jax.random.normal(jax.random.key(2), (64, 4))

  @nnx.jit
  def step(model, optimizer, t):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2) + lam(t) * trquant.nnx.model_dampening_loss(model)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, trquant.nnx.oscillation_stats(optimizer)

  losses = []
  for t in range(steps):
    loss, stats = step(model, optimizer, t)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert set(stats) == {"osc_step", "oscillation_count", "oscillating_fraction",
                        "freeze_threshold", "frozen_fraction"}
  assert stats["frozen_fraction"].shape == (2,) and float(stats["frozen_fraction"].max()) > 0
  state = trquant.nnx.values(optimizer.opt_state)
  frozen = optax.tree.get(state, "frozen")
  for index in (0, 2):
    layer = model.layers[index]
    mask = np.asarray(frozen["layers"][index]["kernel"])
    kernel = layer.kernel.get_value()
    on_grid = trquant.dequantize(layer.weight_codes(), layer.weight_scale.get_value())
    np.testing.assert_array_equal(np.asarray(kernel)[mask], np.asarray(on_grid)[mask])
    assert frozen["layers"][index]["bias"] is None


def test_nnx_scales_fn():
  model = _nnx_model()
  params = trquant.nnx.values(nnx.state(model, nnx.Param))  # arrays, as nnx.Optimizer passes
  scales = trquant.nnx.scale_fn(model)(params)
  np.testing.assert_array_equal(scales["layers"][2]["kernel"], model.layers[2].weight_scale.get_value())
  assert scales["layers"][2]["kernel"].shape == (1, 4)  # per channel, broadcasts to the kernel
  assert scales["layers"][0]["bias"] is None
  with pytest.raises(ValueError, match="learns its weight scale"):
    trquant.nnx.scale_fn(_nnx_model("lsq"))
  with pytest.raises(ValueError, match="no quantized"):
    trquant.nnx.scale_fn(nnx.Sequential(QuantLinear(4, 4, weight_bits=None, rngs=nnx.Rngs(0))))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  with pytest.raises(ValueError, match="no trquant.track_oscillations"):
    trquant.nnx.oscillation_stats(optimizer)


# ---------------------------------------------------------------------------------------
# Sharded over a 4-device CPU mesh (a subprocess: the device count is fixed at start-up)
# ---------------------------------------------------------------------------------------

_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import trquant
    assert jax.device_count() == 4
    codes_fn = lambda p: {"w": trquant.quantize(p["w"], 0.1, bits=3)}
    scale_fn = lambda p: {"w": 0.1}
    tx = optax.chain(optax.sgd(0.05), trquant.freeze_oscillations(
        codes_fn=codes_fn, scale_fn=scale_fn, total_steps=30, threshold=0.1, decay=0.7, warmup_steps=0))
    w_star = jax.random.uniform(jax.random.key(1), (64, 32), minval=-0.3, maxval=0.3)

    @jax.jit
    def step(p, s):
      grads = {"w": codes_fn(p)["w"] * 0.1 - w_star}
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    def run(params):
      state = tx.init(params)
      for _ in range(12):
        params, state = step(params, state)
      return params, state

    w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.2
    plain = run({"w": w})
    mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "model"))
    sharded = run({"w": jax.device_put(w, sharding)})
    for leaf in (sharded[1][1].code_ema["w"], sharded[1][1].frozen["w"],
                 sharded[1][1].tracker.oscillation_frequency["w"]):
      assert leaf.sharding.is_equivalent_to(sharding, 2), leaf.sharding
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("SHARDED OK", np.asarray(sharded[1][1].frozen_fraction))
""")


@pytest.mark.integration
def test_sharded_state_follows_params_and_matches_unsharded():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "SHARDED OK" in result.stdout


def _reference_helpers(monkeypatch):
  """The helpers the transforms were first written with: jax.random.uniform and plain sums."""
  monkeypatch.setattr(fixed_point_ema, "uniform",
                      lambda key, shape: jax.random.uniform(key, shape, jnp.float32))
  monkeypatch.setattr(codes_tree, "count_true",
                      lambda mask: jnp.sum(mask, dtype=jnp.int32))
  monkeypatch.setattr(codes_tree, "count_finite", lambda mask, update: (
      jnp.sum(mask, dtype=jnp.int32), jnp.all(jnp.isfinite(update))))


@pytest.mark.parametrize("make", ["track", "freeze"])
def test_state_identical_to_the_reference_helpers(make, monkeypatch):
  """Fused random draws and packed counts leave every state field bit-identical."""
  params = _params()
  if make == "track":
    tx = optax.chain(optax.sgd(0.3), trquant.track_oscillations(codes_fn=_codes_fn, decay=0.95))
  else:
    tx = optax.chain(optax.sgd(0.3), trquant.freeze_oscillations(
        codes_fn=_codes_fn, scale_fn=_scale_fn, total_steps=12, threshold=0.05, decay=0.95, warmup_steps=3))

  def run():
    p, state = params, tx.init(params)
    step = jax.jit(tx.update)
    targets = _targets(params)
    oscillations_seen = 0
    for _ in range(12):
      updates, state = step(_ste_grads(p, targets), state, p)
      p = optax.apply_updates(p, updates)
      oscillations_seen += int(np.sum(optax.tree.get(state, "oscillation_count")))
    return (p, state), oscillations_seen

  fast, seen = run()
  with monkeypatch.context() as patch:
    _reference_helpers(patch)
    reference, _ = run()
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert seen > 0  # the draws and counts were exercised
  if make == "freeze":
    assert float(np.max(optax.tree.get(fast[1], "frozen_fraction"))) > 0


def test_freeze_oscillations_under_inject_hyperparams_matches_the_plain_transform():
  # Every numeric hyper-parameter injected (step counts included) and the update jitted:
  # the same updates and state as the plain transform.
  params = _params()
  kwargs = dict(total_steps=12, decay=0.7, warmup_steps=3, threshold=0.05)
  make = optax.inject_hyperparams(trquant.freeze_oscillations,
                                  static_args=("codes_fn", "scale_fn"))
  injected = make(codes_fn=_codes_fn, scale_fn=_scale_fn, **kwargs)
  plain = trquant.freeze_oscillations(codes_fn=_codes_fn, scale_fn=_scale_fn, **kwargs)
  assert set(injected.init(params).hyperparams) >= {"total_steps", "warmup_steps", "decay"}
  states = [jax.jit(injected.init)(params), plain.init(params)]
  steps = [jax.jit(injected.update), jax.jit(plain.update)]
  current = [params, params]
  for seed in range(12):
    for i in range(2):
      updates, states[i] = steps[i](_grads(current[i], seed), states[i], current[i])
      current[i] = optax.apply_updates(current[i], updates)
  for a, b in zip(jax.tree.leaves(current[0]), jax.tree.leaves(current[1])):
    np.testing.assert_array_equal(a, b)
  for field in ("frozen_fraction", "oscillation_count", "freeze_threshold"):
    np.testing.assert_array_equal(optax.tree.get(states[0], field),
                                  optax.tree.get(states[1], field), err_msg=field)
