"""Target transition rates for :func:`tr_schedule`: decay shapes and the measured target.

A target is a float, an optax schedule ``step -> rate``, or a :class:`MeasuredTarget`,
whose R_0 is measured from the optimizer's own rate over a warm-up. The functions below
the factory are the warm-up's arithmetic, run by the transform inside its update.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from trquant._src import checks

__all__ = ["MeasuredTarget", "SCHEDULES", "WarmupState", "advance_warmup", "initial_warmup_end",
           "measured_target", "schedule_factor", "target_after_warmup"]

SCHEDULES = ("cosine", "linear", "constant")


def schedule_factor(schedule, progress):
  """Factor in [0, 1] of the decay shape ``schedule`` at ``progress`` in [0, 1]."""
  if callable(schedule):
    return jnp.asarray(schedule(progress), jnp.float32)
  if schedule == "cosine":
    return optax.cosine_decay_schedule(1.0, 1)(progress)
  if schedule == "linear":
    return 1.0 - progress
  return jnp.ones_like(progress)


class MeasuredTarget(NamedTuple):
  """A target transition rate whose R_0 is measured from the optimizer itself.

  Build it with :func:`measured_target` and pass it as ``target_tr`` of
  :func:`tr_schedule`.
  """

  total_steps: int
  warmup_steps: Optional[int]  # None: the warm-up ends when the rate has settled
  schedule: Union[str, Callable[[jax.Array], jax.Array]]  # shape of the decay to 0
  fraction: float
  window_steps: int  # measuring window of a settling warm-up
  max_warmup_steps: int  # the latest a settling warm-up ends
  settle_tolerance: float  # settled: two successive windows within this relative change


class WarmupState(NamedTuple):
  """The warm-up's part of the :class:`~trquant.TransitionRateState` (its ``warmup``).

  Used by a :class:`MeasuredTarget`; without one it keeps its initial values.
  """

  # shape=(), int32: the step at which the warm-up of a MeasuredTarget ends (0 without one).
  # While the warm-up waits for the rate to settle it holds the latest step it may end at.
  warmup_end_step: jax.Array
  # shape=(2,), float32: sum and count of the count-weighted rate in the current measuring
  # window of a settling warm-up.
  warmup_window: jax.Array
  # shape=(), float32: mean rate of the previous measuring window (0 before the first).
  warmup_previous_rate: jax.Array


def measured_target(
    total_steps: int,
    *,
    warmup_steps: Optional[int] = None,
    schedule: Union[str, Callable[[jax.Array], jax.Array]] = "cosine",
    fraction: float = 1.0,
    window_steps: Optional[int] = None,
    max_warmup_steps: Optional[int] = None,
    settle_tolerance: float = 0.1,
) -> MeasuredTarget:
  r"""A target transition rate with no R_0 to tune: measured, then decayed to 0.

  Passed as ``target_tr`` of :func:`tr_schedule`. During a warm-up the transform
  applies the optimizer's own step (the multiplier stays at ``init_multiplier``) and
  measures the transition rate it causes, count-weighted over the quantized
  layers. Right after an FP checkpoint is quantized the first steps flip many
  weights at once, and the rate then falls for a few hundred steps before it
  settles (2-5x on a small BN CNN), so by default the warm-up waits for it:

  * ``warmup_steps=None`` (default, settling warm-up): the rate is averaged over
    windows of ``window_steps`` updates; the warm-up ends after the first window
    whose mean is within ``settle_tolerance`` (relative) of the previous
    window's, or after ``max_warmup_steps``, and R_0 is ``fraction`` times that
    last window's mean.
  * ``warmup_steps=n``: a fixed warm-up of ``n`` updates; R_0 is ``fraction``
    times the mean rate of its second half.

  From the end of the warm-up ``e`` on, the target is ``R_0 * schedule(p)`` with
  ``p = (t - e) / (total_steps - e)`` clipped to ``[0, 1]``, and the controller
  makes the running rate follow it. The count comes from the transform's own pass
  over the codes: nothing extra is computed. The state's ``initial_target_rate``
  holds the R_0 measured, ``warmup_end_step`` the step the warm-up ended at.

  Args:
    total_steps: the number of updates of the run.
    warmup_steps: a fixed warm-up (>= 2, < total_steps), or None to wait until the
      rate has settled.
    schedule: ``"cosine"`` (default), ``"linear"``, ``"constant"``, or a jit-traceable
      callable ``progress -> factor`` on ``[0, 1]`` with ``factor(0) = 1``.
    fraction: R_0 as a multiple of the measured rate (positive).
    window_steps: measuring window of a settling warm-up; None for 0.5% of
      ``total_steps``, at least 10 (at least 1 and at most an eighth of the run in
      runs shorter than 80 steps).
    max_warmup_steps: the latest a settling warm-up ends; None for 10% of
      ``total_steps`` (at least two windows).
    settle_tolerance: relative change between two successive window means below
      which the rate counts as settled (positive).

  Returns:
    A :class:`MeasuredTarget`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, trquant
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 8))}
    >>> scale = trquant.init_scale(params["w"], bits=2)
    >>> codes_fn = lambda p: {"w": trquant.quantize(p["w"], scale, bits=2)}
    >>> tx = optax.chain(optax.sgd(0.05), trquant.tr_schedule(
    ...     trquant.measured_target(100, warmup_steps=10), codes_fn=codes_fn))
    >>> state = tx.init(params)
    >>> for step in range(10):
    ...   grads = jax.random.normal(jax.random.key(step), (64, 8))
    ...   updates, state = tx.update({"w": grads}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(optax.tree.get(state, "initial_target_rate") > 0)
    True
  """
  total_steps = checks.check_int("total_steps", total_steps)
  if warmup_steps is not None:
    warmup_steps = checks.check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps < 2:
      raise ValueError(f"`warmup_steps` must be >= 2 (the rate is measured over its second"
                       f" half), got {warmup_steps}.")
    if total_steps <= warmup_steps:
      raise ValueError(f"`total_steps` ({total_steps}) must exceed `warmup_steps`"
                       f" ({warmup_steps}): the target decays over the steps after the warm-up.")
  if window_steps is None:
    # 0.5% of the run, at least 10 steps, but short runs keep room for two windows.
    window_steps = max(total_steps // 200, min(10, total_steps // 8), 1)
  window_steps = checks.check_int("window_steps", window_steps)
  if max_warmup_steps is None:
    max_warmup_steps = max(total_steps // 10, 2 * window_steps)
  max_warmup_steps = checks.check_int("max_warmup_steps", max_warmup_steps, 0)
  if warmup_steps is None:
    if max_warmup_steps < 2 * window_steps:
      raise ValueError(f"`max_warmup_steps` ({max_warmup_steps}) must cover at least two"
                       f" measuring windows of `window_steps` ({window_steps}): settling is"
                       " judged by comparing two of them.")
    if total_steps <= max_warmup_steps:
      raise ValueError(
          f"`total_steps` ({total_steps}) is too short for a settling warm-up: it must exceed"
          f" `max_warmup_steps` ({max_warmup_steps}, two windows of {window_steps} steps at"
          " least). Pass a longer run, a smaller `window_steps`, or a fixed `warmup_steps`.")
  if not callable(schedule) and schedule not in SCHEDULES:
    raise ValueError(f"`schedule` must be one of {SCHEDULES} or a callable, got {schedule!r}.")
  checks.check_positive("fraction", fraction)
  checks.check_positive("settle_tolerance", settle_tolerance)
  return MeasuredTarget(total_steps, warmup_steps, schedule, float(fraction), window_steps,
                        max_warmup_steps, float(settle_tolerance))


def initial_warmup_end(target: MeasuredTarget) -> int:
  """The warm-up's end as the state starts it: a fixed warm-up's length, or the latest a
  settling warm-up may end (lowered when the rate settles)."""
  return target.max_warmup_steps if target.warmup_steps is None else target.warmup_steps


def target_after_warmup(target: MeasuredTarget, step, initial_rate, warmup_end):
  """The target at `step`: ``R_0 * fraction * schedule(p)`` after the warm-up; during
  it, the rate measured so far (reported only)."""
  span = jnp.maximum(target.total_steps - warmup_end, 1).astype(jnp.float32)
  progress = jnp.clip((step - warmup_end) / span, 0.0, 1.0).astype(jnp.float32)
  decayed = initial_rate * schedule_factor(target.schedule, progress)
  return jnp.where(step < warmup_end, initial_rate, target.fraction * decayed)


def advance_warmup(target: MeasuredTarget, step, overall, in_warmup, initial_rate,
                   warmup: WarmupState):
  """One step of the warm-up given this step's count-weighted rate ``overall``.

  Returns ``(initial_rate, warmup)``: R_0 (during a settling warm-up, the last window's
  mean) and the new :class:`WarmupState` (the step the warm-up ends at, the current
  window's (sum, count) and the previous window's mean).
  """
  warmup_end, window, previous = warmup
  finite = jnp.isfinite(overall)
  if target.warmup_steps is not None:
    # R_0: the running mean of the rate over the second half of the fixed warm-up.
    start = target.warmup_steps // 2
    seen = (step - start).astype(jnp.float32)
    collecting = (step >= start) & in_warmup & finite
    initial_rate = jnp.where(collecting, initial_rate + (overall - initial_rate) / (seen + 1.0),
                             initial_rate)
    return initial_rate, warmup
  window = window + jnp.where(in_warmup & finite, jnp.stack([overall, 1.0]), 0.0)
  window_done = in_warmup & ((step + 1) % target.window_steps == 0)
  mean = window[0] / jnp.maximum(window[1], 1.0)
  change = jnp.abs(mean - previous) / jnp.where(previous > 0, previous, 1.0)
  settled = (previous > 0) & (change <= target.settle_tolerance)
  ends = window_done & (settled | (step + 1 >= target.max_warmup_steps))
  # Reported during the warm-up: the last window's mean; at its end, R_0.
  initial_rate = jnp.where(window_done, mean, initial_rate)
  warmup_end = jnp.where(ends, step + 1, warmup_end)
  previous = jnp.where(window_done, mean, previous)
  window = jnp.where(window_done, jnp.zeros_like(window), window)
  return initial_rate, WarmupState(warmup_end, window, previous)
