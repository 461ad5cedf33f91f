"""The windup guard's rules (trquant._src.tr_scheduling.windup_guard), one window end at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import trquant
from trquant._src.tr_scheduling import windup_guard


def _fields(start_u=1.0, start_tracking=0.5, start_stalled=0.2, ceiling=1e3):
  return windup_guard.GuardState(
      multiplier_ceiling=jnp.array([ceiling], jnp.float32),
      guard_start_multiplier=jnp.array([start_u], jnp.float32),
      guard_start_tracking=jnp.array([start_tracking], jnp.float32),
      stalled_fraction=jnp.array([start_stalled], jnp.float32),
      guard_start_stalled=jnp.array([start_stalled], jnp.float32),
      beyond_grid_fraction=jnp.zeros([1], jnp.float32),
      windup_events=jnp.zeros([1], jnp.int32))


def _step(fields, *, u, tracking, stalled, window_done=True, finite=True):
  return windup_guard.guard_step(
      fields, window_done=jnp.asarray(window_done), multiplier=jnp.array([u], jnp.float32),
      running=jnp.array([tracking * 1e-3], jnp.float32), target=jnp.float32(1e-3),
      stalled=jnp.array([stalled], jnp.float32), finite=jnp.array([finite]), floor=1.0)


@pytest.mark.parametrize("case, u, tracking, stalled, lowered", [
    ("tracking, weights moving", 3.0, 0.9, 0.2, False),
    ("rate rising with u", 3.0, 0.8, 0.2, False),
    ("u up, rate falling", 3.0, 0.3, 0.2, True),
    ("u doubled, weights stopping", 3.0, 0.8, 0.3, True),
    ("u up, most weights stopped", 3.0, 0.8, 0.95, True),
    ("u creeping up, most weights stopped", 1.26, 0.8, 0.95, True),
    ("u steady, most weights stopped", 1.1, 0.8, 0.95, False),
])
def test_a_window_end_lowers_the_ceiling_only_where_raising_u_no_longer_pays(
    case, u, tracking, stalled, lowered):
  fields = _fields(start_u=1.2, start_tracking=0.5, start_stalled=0.2)
  new = _step(fields, u=u, tracking=tracking, stalled=stalled)
  assert bool(new.windup_events[0] == 1) == lowered, case
  if lowered:  # back to the window's start, never below the floor
    np.testing.assert_allclose(new.multiplier_ceiling, [1.2])
  else:
    np.testing.assert_allclose(new.multiplier_ceiling, [1e3])
  # The next window starts from this step's values.
  np.testing.assert_allclose(new.guard_start_tracking, [tracking], rtol=1e-6)
  np.testing.assert_allclose(new.guard_start_stalled, [stalled])


def test_a_multiplier_held_at_the_ceiling_halves_it_down_to_the_floor():
  fields = _fields(start_u=8.0, start_stalled=0.95, ceiling=8.0)
  ceilings = []
  for _ in range(5):
    fields = _step(fields, u=float(fields.multiplier_ceiling[0]), tracking=0.8, stalled=0.95)
    ceilings.append(float(fields.multiplier_ceiling[0]))
  assert ceilings == [4.0, 2.0, 1.0, 1.0, 1.0]


def test_nothing_changes_between_window_ends_or_on_a_non_finite_step():
  fields = _fields(start_u=1.0)
  for kwargs in (dict(window_done=False), dict(finite=False)):
    new = _step(fields, u=5.0, tracking=0.1, stalled=0.99, **kwargs)
    for name in ("multiplier_ceiling", "guard_start_multiplier", "guard_start_tracking",
                 "guard_start_stalled", "beyond_grid_fraction", "windup_events"):
      np.testing.assert_array_equal(getattr(new, name), getattr(fields, name), err_msg=name)
    # The running fraction is the transform's (already finite-gated) input, stored as given.
    np.testing.assert_array_equal(new.stalled_fraction, np.float32([0.99]))


def test_default_window_is_five_time_constants():
  assert windup_guard.default_guard_window(0.99) == 500
  assert windup_guard.default_guard_window(0.9) == 50


def test_statistics_stride_keeps_fifty_measurements_per_window():
  assert [windup_guard.statistics_stride(w) for w in (2, 50, 99, 100, 500, 1000)] == [
      1, 1, 1, 2, 10, 20]
  traced = jax.jit(windup_guard.statistics_stride)(jnp.int32(500))
  assert int(traced) == 10


@pytest.mark.parametrize("guard_window", [20, 500])  # stride 1 and stride 10
def test_strided_stalled_fraction_has_the_per_update_time_constant(guard_window):
  # 95% of the weights get a tiny update every step: stalled. Measured every stride
  # updates with the decay to the power stride, the EMA after 300 updates is the
  # per-update EMA's, 0.95 * (1 - 0.99**300), and it changes only on measured updates.
  n = 2000
  params = {"w": jnp.linspace(-1.0, 1.0, n)}
  update = {"w": jnp.where(jnp.arange(n) < 0.95 * n, 1e-6, 1e-2)}
  codes_fn = lambda p: {"w": trquant.quantize(p["w"], 0.1, bits=4)}
  tx = trquant.tr_schedule(1e-3, codes_fn=codes_fn, decay=0.99, guard_window=guard_window)
  step = jax.jit(lambda s: tx.update(update, s, params)[1])
  state, history = tx.init(params), []
  for _ in range(301):
    state = step(state)
    history.append(float(optax.tree.get(state, "stalled_fraction")[0]))
  np.testing.assert_allclose(history[299], 0.95 * (1 - 0.99**300), rtol=1e-4)
  stride = windup_guard.statistics_stride(guard_window)
  changed = [t for t in range(1, 301) if history[t] != history[t - 1]]
  assert changed == [t for t in range(1, 301) if t % stride == 0]
