"""The settings of one quantization-aware training run, validated, and the run's name.

:class:`TrainConfig` has one field per flag of ``examples/train_qat.py`` (the flag
``--weight-bits`` is the field ``weight_bits``) with the same defaults; the results of
:func:`trquant_examples.training.train` store it as their ``"args"``.

    from trquant_examples.config import TrainConfig
    config = TrainConfig(model="cnn", dataset="fashion-mnist", weight_bits=2, act_bits=2,
                         schedule="tr", target_tr=5e-3)
    TrainConfig(epochs=0)  # ValueError: TrainConfig.epochs must be an integer >= 1 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
from typing import Optional, Union

from trquant_examples import datasets
from trquant_examples import models
from trquant_examples.optimizers import DEFAULT_LR, OPTIMIZER_NAMES

SCHEDULES = ("lr", "tr")
CONTROLLERS = ("log", "additive", "momentum")

# Fields by kind, for validation and for the numeric types the results JSON stores.
_CHOICES = {
    "model": models.MODEL_NAMES, "dataset": datasets.DATASET_NAMES,
    "optimizer": OPTIMIZER_NAMES,
    "schedule": SCHEDULES, "controller": CONTROLLERS,
}
# field -> (smallest allowed value, what the value means), for integer fields.
_INTEGERS = {
    "weight_bits": (1, "None = full precision"), "act_bits": (1, "None = full precision"),
    "epochs": (1, "train at least one epoch"), "batch_size": (1, "at least one example"),
    "max_steps_per_epoch": (1, "None for full epochs"), "seed": (0, "numpy seeds are >= 0"),
    "bn_reestimate": (0, "0 = no BatchNorm re-estimation"),
    "bn_divergence": (0, "0 = not measured"),
}
# field -> (low, high, whether low is allowed, whether high is allowed), for float fields.
_FLOATS = {
    "lr": (0.0, None, False, False), "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, None, True, False), "eta": (0.0, None, False, False),
    "tr_decay": (0.0, 1.0, True, False), "dampening": (0.0, None, True, False),
    "freeze_threshold_init": (0.0, None, False, False),
    "freeze_threshold_end": (0.0, None, False, False),
    "osc_warmup_fraction": (0.0, 1.0, True, False), "osc_decay": (0.0, 1.0, True, False),
    "osc_threshold": (0.0, None, False, False),
}
_OPTIONAL = {"weight_bits", "act_bits", "max_steps_per_epoch", "lr", "eta", "osc_decay"}
_PATHS = {"data_dir": True, "init_from": True, "save": True, "tag": True, "out": False}
_SWITCHES = ("per_channel", "freeze", "track_oscillations", "no_progress", "no_plot")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run: model and data, quantization, optimizer and schedule, outputs.

  Every field has the default of the matching ``examples/train_qat.py`` flag. Numbers
  are checked on construction (ints stay ints, floats become floats); change a field
  with ``dataclasses.replace(config, field=value)``, which checks again.

  Raises:
    ValueError: naming the field and what it accepts, for a value out of range, of the
      wrong type, or not among a field's choices, and for ``schedule="tr"``,
      ``dampening``, ``freeze`` or ``track_oscillations`` without quantized weights.
  """

  model: str = "cnn"
  dataset: str = "digits"
  data_dir: Optional[str] = None  # the dataset's folder; None: $TRQUANT_DATA_DIR
  weight_bits: Optional[int] = 2  # None = full precision
  act_bits: Optional[int] = 2  # None = full precision
  first_last: Union[str, int] = "fp"  # the first and last layers: "fp", "same" or bits (8)
  per_channel: bool = False  # per-output-channel weight scales
  optimizer: str = "adam"
  lr: Optional[float] = None  # the initial LR (U_0); None: DEFAULT_LR[optimizer]
  momentum: float = 0.9  # SGD momentum
  weight_decay: float = 1e-4
  schedule: str = "lr"  # "lr": cosine LR; "tr": cosine target transition rate
  target_tr: Union[float, str] = 5e-3  # R_0, or "auto": trquant.measured_target
  controller: str = "log"  # the TR controller
  eta: Optional[float] = None  # the controller gain; None: the controller's own
  tr_decay: float = 0.99  # decay of the running TR (tr_schedule(decay=))
  epochs: int = 5
  batch_size: int = 128
  max_steps_per_epoch: Optional[int] = None  # truncate epochs (quick runs)
  seed: int = 0
  init_from: Optional[str] = None  # an FP checkpoint (.npz) to start QAT from
  save: Optional[str] = None  # write the trained model's weights here (.npz)
  dampening: float = 0.0  # final weight of the oscillation-dampening loss (0: off)
  freeze: bool = False  # iterative freezing of oscillating weights
  freeze_threshold_init: float = 0.1  # freezing threshold at the start (init_value)
  freeze_threshold_end: float = 0.01  # freezing threshold at the end, cosine annealed (end_value)
  osc_warmup_fraction: float = 0.25  # fraction of the steps before dampening / freezing starts
  osc_decay: Optional[float] = None  # the EMAs' decay; None: optimizers.oscillation_decay
  osc_threshold: float = 0.005  # frequency above which a weight counts as oscillating
  track_oscillations: bool = False  # report the fraction of oscillating weights per layer
  bn_reestimate: int = 50  # batches for BatchNorm re-estimation at the end (0: off)
  bn_divergence: int = 0  # batches for the BatchNorm KL divergence at epoch ends (0: off)
  out: str = "outputs"  # the command line's folder for results JSON and plots
  tag: Optional[str] = None  # the run's name; None: derived (run_name)
  no_progress: bool = False  # no progress bar
  no_plot: bool = False  # the command line writes no plot

  def __post_init__(self):
    if not _valid_first_last(self.first_last):
      _fail("first_last", self.first_last, '"fp", "same" or a bit width such as 8')
    for name, choices in _CHOICES.items():
      if getattr(self, name) not in choices:
        _fail(name, getattr(self, name), f"one of {choices}")
    for name, (low, meaning) in _INTEGERS.items():
      value = getattr(self, name)
      if value is None and name in _OPTIONAL:
        continue
      if not _is_integer(value) or value < low:
        _fail(name, value, f"an integer >= {low} ({meaning})")
      object.__setattr__(self, name, int(value))
    for name, bounds in _FLOATS.items():
      self._check_float(name, bounds)
    self._check_target_tr()
    for name, optional in _PATHS.items():
      value = getattr(self, name)
      if value is None and optional:
        continue
      if not isinstance(value, (str, os.PathLike)):
        _fail(name, value, "a path or name (str)" + (" or None" if optional else ""))
      object.__setattr__(self, name, os.fspath(value))
    for name in _SWITCHES:
      if not isinstance(getattr(self, name), bool):
        _fail(name, getattr(self, name), "True or False")
    self._check_combinations()

  def _check_float(self, name, bounds):
    low, high, low_ok, high_ok = bounds
    value = getattr(self, name)
    if value is None and name in _OPTIONAL:
      return
    upper = f"{high:g}" if high is not None else "inf"
    interval = ("[" if low_ok else "(") + f"{low:g}, {upper}" + ("]" if high_ok else ")")
    requirement = f"a number in {interval}" + (" or None" if name in _OPTIONAL else "")
    if not _is_real(value):
      _fail(name, value, requirement)
    value = float(value)
    if value < low or (value == low and not low_ok) or (
        high is not None and (value > high or (value == high and not high_ok))):
      _fail(name, value, requirement)
    object.__setattr__(self, name, value)

  def _check_target_tr(self):
    if self.target_tr == "auto":
      return
    if not _is_real(self.target_tr) or not self.target_tr > 0:
      _fail("target_tr", self.target_tr, "a positive number R_0 or 'auto' (measured over a"
            " warm-up at the optimizer's own LR)")
    object.__setattr__(self, "target_tr", float(self.target_tr))

  def _check_combinations(self):
    if self.schedule == "tr" and self.weight_bits is None:
      raise ValueError("TrainConfig.schedule='tr' schedules quantized weights: set weight_bits"
                       " (None is full precision), or use schedule='lr' for a full-precision"
                       " run.")
    for name in ("dampening", "freeze", "track_oscillations"):
      if getattr(self, name) and self.weight_bits is None:
        raise ValueError(f"TrainConfig.{name} acts on quantized weights: set weight_bits (None is"
                         f" full precision), or turn {name} off for a full-precision run.")

  @property
  def quantized(self) -> bool:
    """Whether weights or activations are quantized."""
    return self.weight_bits is not None or self.act_bits is not None

  @property
  def learning_rate(self) -> float:
    """``lr``, or the optimizer's default (DEFAULT_LR) when it is None."""
    return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


def run_name(config: TrainConfig) -> str:
  """The name of a run's files: ``config.tag``, or one derived from its settings.

  Args:
    config: the run's settings.

  Returns:
    ``tag`` if set, else e.g. ``"cnn-digits-W2A2-adam-tr-R0.005-s0"``: model, dataset,
    bit widths (32 for full precision, None), optimizer, schedule (with R_0, dampening and
    freezing where used) and seed.
  """
  if config.tag:
    return config.tag
  bits = f"W{_bits_name(config.weight_bits)}A{_bits_name(config.act_bits)}"
  rate = config.target_tr if config.target_tr == "auto" else f"{config.target_tr:g}"
  schedule = config.schedule + (f"-R{rate}" if config.schedule == "tr" else "")
  if config.dampening:
    schedule += f"-damp{config.dampening:g}"
  if config.freeze:
    schedule += "-freeze"
  return f"{config.model}-{config.dataset}-{bits}-{config.optimizer}-{schedule}-s{config.seed}"


def _bits_name(bits: Optional[int]) -> int:
  return 32 if bits is None else bits


def _is_integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_bits(text: str) -> Optional[int]:
  """A ``--weight-bits`` / ``--act-bits`` flag's value: a bit width (``"4"`` -> 4) or
  ``"fp"`` for full precision (None)."""
  if text.strip() == "fp":
    return None
  if not text.strip().isdigit():
    raise argparse.ArgumentTypeError(f'a bit width such as 4, or "fp" for full precision, got'
                                     f" {text!r}")
  if int(text) < 1:
    raise argparse.ArgumentTypeError(f'full precision is "fp", got {text!r}; a bit width is'
                                     " at least 1")
  return int(text)


def parse_first_last(text: str):
  """A ``--first-last`` flag's value: ``"fp"``, ``"same"`` or a bit width (``"8"`` -> 8)."""
  value = int(text) if text.strip().isdigit() else text
  if not _valid_first_last(value):
    raise argparse.ArgumentTypeError(f'"fp", "same" or a bit width such as 8, got {text!r}')
  return value


def _valid_first_last(value) -> bool:
  try:
    models.check_first_last(value)
  except ValueError:
    return False
  return True


def _fail(name, value, requirement):
  raise ValueError(f"TrainConfig.{name} must be {requirement}, got {value!r}.")
