"""trquant: low-bit quantization for JAX and Optax.

Quantizers with straight-through gradients, transition-rate (TR) scheduling of
quantized weights as an optax transform, tools against weight oscillations
(tracking, iterative freezing, the dampening loss), AdaRound post-training
quantization (:mod:`trquant.adaround`), Flax NNX layers and model surgery
(:mod:`trquant.nnx`) and integer export (:mod:`trquant.export`).
"""

from trquant._src.oscillations.dampening import dampening_loss
from trquant._src.oscillations.freezing import FreezeOscillationsState
from trquant._src.oscillations.freezing import freeze_oscillations
from trquant._src.oscillations.schedules import dampening_weight_schedule
from trquant._src.oscillations.schedules import freeze_threshold_schedule
from trquant._src.oscillations.tracking import OscillationState
from trquant._src.oscillations.tracking import track_oscillations
from trquant._src.quantizers import binarize
from trquant._src.quantizers import dequantize
from trquant._src.quantizers import expand_group_scale
from trquant._src.quantizers import fake_quant
from trquant._src.quantizers import fake_quant_dynamic
from trquant._src.quantizers import fake_quant_unscaled
from trquant._src.quantizers import group_scale_shape
from trquant._src.quantizers import init_scale
from trquant._src.quantizers import lsq
from trquant._src.quantizers import quant_range
from trquant._src.quantizers import quantize
from trquant._src.quantizers import round_ste
from trquant._src.quantizers import transition_rate
from trquant._src.tr_scheduling.targets import MeasuredTarget
from trquant._src.tr_scheduling.targets import measured_target
from trquant._src.tr_scheduling.transform import TransitionRateState
from trquant._src.tr_scheduling.transform import tr_schedule
from trquant import adaround
from trquant import export
from trquant import nnx

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
