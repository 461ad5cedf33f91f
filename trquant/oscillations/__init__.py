"""Weight oscillations in QAT: tracking, iterative freezing and the dampening loss.

With a straight-through estimator, a latent weight whose optimum lies between
two grid points oscillates around the rounding boundary between them. This
package measures such oscillations per weight (:func:`track_oscillations`,
``tracking.py``), freezes weights that oscillate too often
(:func:`freeze_oscillations`, ``freezing.py``), and provides the regulariser that
dampens them (:func:`dampening_loss`, ``dampening.py``), with the schedules the
paper uses for both (``schedules.py``). The per-weight EMAs are fixed point with
stochastic rounding (``fixed_point_ema.py``).

References:
  Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
  Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
"""

from trquant.oscillations.dampening import AGGREGATIONS
from trquant.oscillations.dampening import dampening_loss
from trquant.oscillations.freezing import FreezeOscillationsState
from trquant.oscillations.freezing import freeze_oscillations
from trquant.oscillations.schedules import dampening_weight_schedule
from trquant.oscillations.schedules import freeze_threshold_schedule
from trquant.oscillations.tracking import DEFAULT_OSCILLATING_THRESHOLD
from trquant.oscillations.tracking import OscillationState
from trquant.oscillations.tracking import track_oscillations

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_OSCILLATING_THRESHOLD",
    "FreezeOscillationsState",
    "OscillationState",
    "dampening_loss",
    "dampening_weight_schedule",
    "freeze_oscillations",
    "freeze_threshold_schedule",
    "track_oscillations",
]
