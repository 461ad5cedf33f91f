"""trquant: low-bit quantization for JAX and Optax.

Quantizers with straight-through gradients and transition-rate (TR) scheduling
of quantized weights as an optax transform.
"""

from trquant import nnx
from trquant.quantizers import binarize
from trquant.quantizers import dequantize
from trquant.quantizers import fake_quant
from trquant.quantizers import fake_quant_unscaled
from trquant.quantizers import init_scale
from trquant.quantizers import lsq
from trquant.quantizers import quant_range
from trquant.quantizers import quantize
from trquant.quantizers import round_ste
from trquant.quantizers import transition_rate
from trquant.tr_schedule import TransitionRateState
from trquant.tr_schedule import tr_schedule

__version__ = "0.1.0"

__all__ = [
    "TransitionRateState",
    "binarize",
    "dequantize",
    "fake_quant",
    "fake_quant_unscaled",
    "init_scale",
    "lsq",
    "nnx",
    "quant_range",
    "quantize",
    "round_ste",
    "tr_schedule",
    "transition_rate",
]
