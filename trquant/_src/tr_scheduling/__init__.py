"""Transition-rate (TR) scheduling of quantized weights.

:func:`tr_schedule` (``transform.py``) is the optax transform; the TALR controllers
are in ``controllers.py``, the targets (decay shapes, :func:`measured_target`) in
``targets.py``, and the windup guard's rules in ``windup_guard.py``.

References:
  Lee, Jeon, Kim, Ham, `Scheduling Weight Transitions for Quantization-Aware
  Training <https://arxiv.org/abs/2404.19248>`_, ICCV 2025.
"""
