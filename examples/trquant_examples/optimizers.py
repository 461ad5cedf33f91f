"""The optax transform of one training run: optimizer, LR or TR schedule, oscillation tools.

``schedule="lr"`` is the baseline: the optimizer with a cosine learning rate for every
parameter. ``schedule="tr"`` gives the quantized kernels ``optimizer ->
trquant.tr_schedule`` with a cosine target transition rate (the optimizer's LR is the
TALR's U_0) and everything else (biases, BatchNorm, activation scales, full-precision
layers) the cosine LR. Against weight oscillations, ``trquant.freeze_oscillations`` or
``trquant.track_oscillations`` comes last in the chain.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import optax
from flax import nnx

import trquant

if TYPE_CHECKING:
  from trquant_examples.config import TrainConfig

# The initial learning rate (U_0 under TR scheduling) of each optimizer when none is given.
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 3e-4}
OPTIMIZER_NAMES = tuple(sorted(DEFAULT_LR))


def make_optimizer(name: str, learning_rate, *, momentum: float,
                   weight_decay: float) -> optax.GradientTransformation:
  """One of OPTIMIZER_NAMES with weight decay.

  Args:
    name: "sgd" (with momentum), "adam" (L2 weight decay added to the gradient) or
      "adamw" (decoupled weight decay).
    learning_rate: a float or an optax schedule.
    momentum: SGD's momentum (ignored by the others).
    weight_decay: the weight-decay factor.

  Returns:
    The optax transform.

  Raises:
    ValueError: for an unknown ``name``.
  """
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZER_NAMES}.")


def make_transform(config: TrainConfig, model: nnx.Module,
                   total_steps: int) -> optax.GradientTransformation:
  """The run's full transform: optimizer and schedule, then the oscillation transform.

  Args:
    config: the run's settings.
    model: the model to train (its quantized kernels are found by trquant.nnx).
    total_steps: the length of the cosine schedules.

  Returns:
    The optax transform for ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
  """
  learning_rate = config.learning_rate
  cosine_lr = optax.cosine_decay_schedule(learning_rate, total_steps)
  optimizer = lambda rate: make_optimizer(config.optimizer, rate, momentum=config.momentum,
                                          weight_decay=config.weight_decay)
  if config.schedule == "lr":
    tx = optimizer(cosine_lr)
  else:
    target = (trquant.measured_target(total_steps) if config.target_tr == "auto"
              else optax.cosine_decay_schedule(config.target_tr, total_steps))
    quant = optax.chain(optimizer(learning_rate), trquant.tr_schedule(
        target, codes_fn=trquant.nnx.codes_fn(model), controller=config.controller,
        eta=config.eta, decay=config.tr_decay))
    tx = optax.partition({"quant": quant, "float": optimizer(cosine_lr)},
                         trquant.nnx.param_labels(model))
  oscillations = oscillation_transform(config, model, total_steps)
  # Last in the chain: it must see (and, when freezing, override) the update actually applied.
  return tx if oscillations is None else optax.chain(tx, oscillations)


def oscillation_decay(config: TrainConfig, total_steps: int) -> float:
  """The decay of the oscillation frequency and code EMAs (optax's: the weight of the old value).

  Args:
    config: the run's settings; its ``osc_decay`` wins when given.
    total_steps: the run's length.

  Returns:
    ``config.osc_decay``, or ``1 - m``: the paper's decay 0.999 (``m = 1e-3``) lowered so
    that the warm-up (the first ``osc_warmup_fraction`` of the steps) spans at least 5 EMA
    time constants ``1 / m``, down to 0.95.
  """
  if config.osc_decay is not None:
    return config.osc_decay
  warmup = max(config.osc_warmup_fraction * total_steps, 1.0)
  return 1.0 - min(max(1e-3, 5.0 / warmup), 0.05)


def oscillation_warmup_steps(config: TrainConfig, total_steps: int) -> int:
  """The steps before freezing and dampening start: the ``osc_warmup_fraction`` of the run."""
  return min(math.ceil(config.osc_warmup_fraction * total_steps), total_steps - 1)


def oscillation_transform(config: TrainConfig, model: nnx.Module,
                          total_steps: int) -> Optional[optax.GradientTransformation]:
  """``trquant.freeze_oscillations`` or ``trquant.track_oscillations`` as configured.

  Args:
    config: the run's settings (``freeze``, ``track_oscillations`` and the ``osc_*`` and
      ``freeze_threshold_*`` fields).
    model: the model to train.
    total_steps: the run's length.

  Returns:
    The transform, or None when the config neither freezes nor tracks oscillations.
  """
  decay = oscillation_decay(config, total_steps)
  warmup_steps = oscillation_warmup_steps(config, total_steps)
  if config.freeze:
    threshold = trquant.freeze_threshold_schedule(
        total_steps, init_value=config.freeze_threshold_init,
        end_value=config.freeze_threshold_end, warmup_steps=warmup_steps)
    return trquant.freeze_oscillations(
        codes_fn=trquant.nnx.codes_fn(model), scale_fn=trquant.nnx.scale_fn(model),
        total_steps=total_steps, threshold=threshold, decay=decay, warmup_steps=warmup_steps,
        report_threshold=config.osc_threshold)
  if config.track_oscillations:
    return trquant.track_oscillations(codes_fn=trquant.nnx.codes_fn(model), decay=decay,
                                      threshold=config.osc_threshold)
  return None
