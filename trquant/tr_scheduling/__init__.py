"""Transition-rate (TR) scheduling of quantized weights.

:func:`tr_schedule` (``transform.py``) is the optax transform; the TALR controllers
are in ``controllers.py``, the targets (decay shapes, :func:`measured_target`) in
``targets.py``, and the windup guard's rules in ``windup_guard.py``.

References:
  Lee, Jeon, Kim, Ham, `Scheduling Weight Transitions for Quantization-Aware
  Training <https://arxiv.org/abs/2404.19248>`_, ICCV 2025.
"""

from trquant.tr_scheduling.controllers import CONTROLLERS
from trquant.tr_scheduling.controllers import Controller
from trquant.tr_scheduling.targets import MeasuredTarget
from trquant.tr_scheduling.targets import SCHEDULES
from trquant.tr_scheduling.targets import measured_target
from trquant.tr_scheduling.transform import TransitionRateState
from trquant.tr_scheduling.transform import tr_schedule

__all__ = [
    "CONTROLLERS",
    "Controller",
    "MeasuredTarget",
    "SCHEDULES",
    "TransitionRateState",
    "measured_target",
    "tr_schedule",
]
