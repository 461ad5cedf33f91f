"""The iterative-freezing threshold and the dampening weight schedules of the paper."""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import optax

from trquant._src import checks

__all__ = ["DEFAULT_WARMUP_FRACTION", "cosine_from", "dampening_weight_schedule",
           "freeze_threshold_schedule"]

# Freezing and dampening start after a quarter of the run (the paper's warm-up).
DEFAULT_WARMUP_FRACTION = 0.25


def cosine_from(step, start_step: int, total_steps: int, init_value: float, end_value: float):
  # jnp.maximum where a count is traced (injected by optax.inject_hyperparams).
  span = (max(total_steps - start_step, 1) if isinstance(total_steps - start_step, int)
          else jnp.maximum(total_steps - start_step, 1))
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / span, 0.0, 1.0)
  # optax's cosine over a unit span: the counts may be traced here, which its own
  # decay_steps check cannot take.
  return end_value + (init_value - end_value) * optax.cosine_decay_schedule(1.0, 1)(progress)


def freeze_threshold_schedule(
    total_steps: int,
    *,
    init_value: float = 0.1,
    end_value: float = 0.01,
    warmup_steps: Optional[Union[int, jax.Array]] = None,
) -> optax.Schedule:
  """The paper's freezing threshold: none for a warm-up, then a cosine from 0.1 to 0.01.

  Args:
    total_steps: number of training steps (positive).
    init_value: threshold when freezing starts, in ``(0, 1]``.
    end_value: threshold at ``total_steps``, in ``(0, 1]`` (0.01 for MobileNetV2
      at 4 bits, 0.011 at 3 bits in the reference code).
    warmup_steps: steps without freezing, in ``[0, total_steps)``; None for the
      paper's quarter of the run, ``ceil(total_steps / 4)``.

  Returns:
    A schedule ``step -> threshold`` (float32): ``inf`` (no weight can exceed it)
    for ``step < warmup_steps``, then a cosine from
    ``init_value`` to ``end_value``, constant afterwards.

  Example:
    >>> import trquant
    >>> schedule = trquant.freeze_threshold_schedule(1000)
    >>> [round(float(schedule(s)), 4) for s in (0, 250, 625, 1000)]
    [inf, 0.1, 0.055, 0.01]
  """
  total_steps = checks.check_count("total_steps", total_steps)
  checks.check_fraction("init_value", init_value)
  checks.check_fraction("end_value", end_value)
  start_step = checks.check_warmup_steps(warmup_steps, total_steps,
                                         default_fraction=DEFAULT_WARMUP_FRACTION)

  def schedule(step):
    value = cosine_from(step, start_step, total_steps, init_value, end_value)
    return jnp.where(jnp.asarray(step) < start_step, jnp.inf, value).astype(jnp.float32)

  return schedule


def dampening_weight_schedule(
    total_steps: int,
    *,
    end_value: float = 0.1,
    warmup_steps: Optional[int] = None,
) -> optax.Schedule:
  """The paper's weight (lambda) of the dampening loss: 0 for a warm-up, then a cosine ramp.

  Args:
    total_steps: number of training steps (positive).
    end_value: weight reached at ``total_steps`` (non-negative; the paper uses 0.1).
    warmup_steps: steps with weight 0, in ``[0, total_steps)``; None for the paper's
      quarter of the run, ``ceil(total_steps / 4)``.

  Returns:
    A schedule ``step -> lambda`` (float32): 0 until ``warmup_steps``, then
    ``end_value * (1 - cos(pi * progress)) / 2``.

  Example:
    >>> import trquant
    >>> schedule = trquant.dampening_weight_schedule(1000)
    >>> [round(float(schedule(s)), 4) for s in (0, 250, 625, 1000)]
    [0.0, 0.0, 0.05, 0.1]
  """
  total_steps = checks.check_int("total_steps", total_steps)
  end_value = checks.check_positive("end_value", end_value, allow_zero=True)
  start_step = checks.check_warmup_steps(warmup_steps, total_steps,
                                         default_fraction=DEFAULT_WARMUP_FRACTION)

  def schedule(step):
    return cosine_from(step, start_step, total_steps, 0.0, float(end_value)).astype(jnp.float32)

  return schedule
