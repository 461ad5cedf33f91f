"""The windup guard of :func:`tr_schedule`: no run-away of the TALR multiplier.

The control loop is stable only while the transition rate rises with ``u``. Pushed too
far, a large step carries latent weights beyond the grid, where the straight-through
gradient is 0; they stop, the rate falls, and an integral controller raises ``u``
further. The guard compares ``u``, the tracking ratio ``K / R`` and the fraction of
stalled weights over windows of updates, and lowers a ceiling on ``u`` when raising it
no longer pays (see :func:`tr_schedule`'s docstring for the rules).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from trquant._src import codes_tree

__all__ = ["GuardState", "default_guard_window", "guard_step", "stalled_count",
           "statistics_stride"]

# A weight has stopped when its incoming update is below this fraction of its layer's RMS
# update.
STALLED_FRACTION_OF_RMS = 0.01
# Above this running fraction of stopped weights, the layer's transitions come from the few
# weights still inside the grid: a larger multiplier only shakes those.
MOSTLY_STALLED = 0.9


def default_guard_window(decay):
  """``5 / (1 - decay)`` updates: five time constants of the running rate (500 at 0.99).

  An int for a number or a concrete array; an int32 scalar for a traced decay (e.g.
  injected by ``optax.inject_hyperparams`` and traced by ``jax.jit``), so that an
  injected decay gives the window the plain transform has."""
  if isinstance(decay, jax.core.Tracer):
    window = jnp.round(5.0 / (1.0 - jnp.asarray(decay, jnp.float32)))
    return jnp.maximum(window, 1.0).astype(jnp.int32)
  return max(int(round(5.0 / (1.0 - float(decay)))), 1)


def statistics_stride(window):
  """Updates between two measurements of the stalled and beyond-grid fractions.

  ``window // 50`` (10 in the default 500-update window, so each window still sees 50
  measurements), at least 1; an int32 scalar for a traced window."""
  if isinstance(window, jax.core.Tracer):
    return jnp.maximum(window // 50, 1)
  return max(int(window) // 50, 1)


def stalled_count(update) -> jax.Array:
  """How many entries of a layer's `update` are below 1% of its RMS (float32)."""
  magnitude = jnp.abs(update.astype(jnp.float32))
  rms = jnp.sqrt(jnp.mean(jnp.square(magnitude)))
  # count_true: XLA:CPU sums a boolean array several times slower than a float one.
  return codes_tree.count_true(magnitude < STALLED_FRACTION_OF_RMS * rms).astype(jnp.float32)


class GuardState(NamedTuple):
  """The windup guard's part of the :class:`~trquant.TransitionRateState` (its ``guard``).

  Every field has one entry per group: per quantized leaf (``per_layer=True``) or one for
  all quantized weights together (``per_layer=False``).
  """

  # shape=(groups,), float32: the highest multiplier the windup guard allows (max_multiplier, or
  # inf, until the guard finds the rate no longer responds to a rising multiplier).
  multiplier_ceiling: jax.Array
  # shape=(groups,), float32: multiplier at the start of the guard's current window.
  guard_start_multiplier: jax.Array
  # shape=(groups,), float32: K / R at the start of the guard's current window (0 before it).
  guard_start_tracking: jax.Array
  # shape=(groups,), float32: running fraction (EMA, same decay) of quantized weights whose
  # incoming update is below 1% of the layer's RMS update: weights that have stopped, e.g.
  # beyond the grid, where the straight-through gradient is 0. Measured every
  # statistics_stride(window) updates, as is beyond_grid_fraction.
  stalled_fraction: jax.Array
  # shape=(groups,), float32: stalled_fraction at the start of the guard's current window.
  guard_start_stalled: jax.Array
  # shape=(groups,), float32: running fraction (EMA, same decay) of quantized weights beyond
  # the grid (outside the straight-through window), from ``saturation_fn``; 0 without one.
  beyond_grid_fraction: jax.Array
  # shape=(groups,), int32: how often the guard lowered the ceiling. Non-zero means the target
  # was out of reach of this optimizer: the rate stopped responding to a larger multiplier.
  windup_events: jax.Array


def guard_step(state: GuardState, *, window_done, multiplier, running, target, stalled,
               finite, floor: float, beyond=None) -> GuardState:
  """The guard's state after one step: ceiling, window references, fractions, event count.

  Args:
    state: the guard's state before the step.
    window_done: whether this step ends one of the guard's windows (bool scalar).
    multiplier: ``u`` applied at this step, per group.
    running: the running transition rate ``K`` after this step, per group.
    target: the target rate ``R`` of this step (scalar).
    stalled: the running fraction of stalled weights after this step, per group (becomes
      ``stalled_fraction``).
    beyond: the running fraction of weights beyond the grid after this step, per group
      (becomes ``beyond_grid_fraction``; None: unknown, the state's value is kept).
    finite: per group, whether this step's update was finite.
    floor: the lowest ceiling (the initial multiplier: the optimizer's own step).

  Returns:
    The new :class:`GuardState`.
  """
  ceiling, start_u = state.multiplier_ceiling, state.guard_start_multiplier
  start_tracking, start_stalled = state.guard_start_tracking, state.guard_start_stalled
  tracking = jnp.where(target > 0, running / jnp.where(target > 0, target, 1.0), 1.0)
  # Below target and falling, or stalled (almost no transition left at all).
  fell = (tracking < 1.0) & ((tracking < 0.9 * start_tracking) | (tracking < 0.01))
  # Weights stop faster than the window before: the larger step is pushing them out.
  stalling = stalled > start_stalled + 0.05
  rose = multiplier >= 1.25 * start_u
  # Weights also stop on their own (dead ReLU units, a fitted loss): only a multiplier
  # that at least doubled in the window is taken to be the cause.
  doubled = multiplier >= 2.0 * start_u
  held = (start_u >= 0.99 * ceiling) & (multiplier >= 0.99 * ceiling)
  # Most weights beyond the grid: the rate the multiplier buys comes from the rest, so any
  # rise counts. (The additive controller raises u by eta * (R - K) per step: linearly, so
  # its rise per window shrinks below 25% of u and would never count as `rose`.)
  stopped = stalled if beyond is None else jnp.maximum(stalled, beyond)
  mostly_stalled = stopped > MOSTLY_STALLED
  crept = mostly_stalled & (multiplier > start_u)
  lower = window_done & finite & ((fell & (rose | held)) | (stalling & (doubled | held))
                                  | crept | (mostly_stalled & held))
  floor = jnp.float32(floor)
  new_ceiling = jnp.where(rose | crept, jnp.maximum(start_u, floor),
                          jnp.maximum(0.5 * ceiling, floor))
  ceiling = jnp.where(lower, jnp.minimum(new_ceiling, ceiling), ceiling)
  refresh = window_done & finite
  return GuardState(
      multiplier_ceiling=ceiling,
      guard_start_multiplier=jnp.where(refresh, jnp.minimum(multiplier, ceiling), start_u),
      guard_start_tracking=jnp.where(refresh, tracking, start_tracking),
      stalled_fraction=stalled,
      guard_start_stalled=jnp.where(refresh, stalled, start_stalled),
      beyond_grid_fraction=state.beyond_grid_fraction if beyond is None else beyond,
      windup_events=state.windup_events + lower.astype(jnp.int32),
  )
