"""trquant: low-bit quantization for JAX and Optax.

Quantizers with straight-through gradients, transition-rate (TR) scheduling of
quantized weights as an optax transform, tools against weight oscillations
(tracking, iterative freezing, the dampening loss), AdaRound post-training
quantization (:mod:`trquant.adaround`), Flax NNX layers and model surgery
(:mod:`trquant.nnx`) and integer export (:mod:`trquant.export`).
"""

from trquant import adaround
from trquant import export
from trquant import nnx
from trquant.oscillations import FreezeOscillationsState
from trquant.oscillations import OscillationState
from trquant.oscillations import dampening_loss
from trquant.oscillations import dampening_weight_schedule
from trquant.oscillations import freeze_oscillations
from trquant.oscillations import freeze_threshold_schedule
from trquant.oscillations import track_oscillations
from trquant.quantizers import binarize
from trquant.quantizers import dequantize
from trquant.quantizers import fake_quant
from trquant.quantizers import expand_group_scale
from trquant.quantizers import fake_quant_dynamic
from trquant.quantizers import fake_quant_unscaled
from trquant.quantizers import group_scale_shape
from trquant.quantizers import init_scale
from trquant.quantizers import lsq
from trquant.quantizers import quant_range
from trquant.quantizers import quantize
from trquant.quantizers import round_ste
from trquant.quantizers import transition_rate
from trquant.tr_scheduling import MeasuredTarget
from trquant.tr_scheduling import TransitionRateState
from trquant.tr_scheduling import measured_target
from trquant.tr_scheduling import tr_schedule

__version__ = "0.1.0"

__all__ = [
    "FreezeOscillationsState",
    "MeasuredTarget",
    "OscillationState",
    "TransitionRateState",
    "adaround",
    "binarize",
    "dampening_loss",
    "dampening_weight_schedule",
    "dequantize",
    "expand_group_scale",
    "export",
    "fake_quant",
    "fake_quant_dynamic",
    "fake_quant_unscaled",
    "freeze_oscillations",
    "freeze_threshold_schedule",
    "group_scale_shape",
    "init_scale",
    "lsq",
    "measured_target",
    "nnx",
    "quant_range",
    "quantize",
    "round_ste",
    "tr_schedule",
    "track_oscillations",
    "transition_rate",
]
