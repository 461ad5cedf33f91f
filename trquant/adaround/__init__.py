"""Post-training quantization by output reconstruction: AdaRound, BRECQ, QDrop.

Rounding every weight to the nearest grid point minimises the weight error, not
the error of the layer's output. AdaRound chooses, per weight, between rounding
down and rounding up: it relaxes the binary choice to a continuous variable
``h(V)`` in ``[0, 1]`` (a rectified sigmoid of a free parameter ``V``), so the
soft-quantized weight is::

  W_soft = s * clip(floor(W / s) + h(V), lo, hi)

and minimises, with Adam on ``V`` only, the reconstruction error of the layer's
output on a small unlabeled calibration set plus a regulariser that pushes every
``h(V)`` to 0 or 1::

  ||f_a(apply(W_soft, x_q)) - f_a(y_fp)||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)

(squared error summed over the output channels, averaged over the rest). The
regulariser is off for a warm-up fraction of the iterations, then ``beta``
anneals from 20 to 2. The final rounding is ``floor(W / s) + [V >= 0]``.

Block reconstruction (BRECQ) learns the rounding of all the layers of a block (a
residual block, a transformer block) jointly against the block's output, with the
step sizes of its quantized activations; QDrop also feeds full-precision values in
place of quantized ones at random while it learns.

The package has four modules: :mod:`trquant.adaround.rounding` (AdaRound on arrays),
:mod:`trquant.adaround.block` (block reconstruction on arrays),
:mod:`trquant.adaround.loop` (how the loops run: a fused ``lax.scan``, or on CPU, for
convolutions, one jitted step per iteration) and :mod:`trquant.adaround.model` (the NNX
model driver); every name below is also here.

* :func:`rectified_sigmoid`, :func:`init_alpha`, :func:`rounding_regularizer`,
  :func:`beta_schedule`, :func:`soft_weight`, :func:`hard_codes`: the pieces.
* :func:`reconstruct_layer`: AdaRound of one layer, given a function
  ``apply_fn(w, x)`` and calibration inputs / targets. The whole optimisation
  runs inside one jitted ``lax.scan`` (on CPU, a convolution's loop steps a jitted
  iteration instead: ``loop``).
* :func:`adaround_model` and :func:`round_to_nearest`: post-training weight
  quantization of an NNX model of trquant layers (:class:`trquant.nnx.QuantLinear`,
  ``QuantConv``, ``QuantLinearGeneral``, ``QuantEinsum``), e.g. a full-precision
  model with ``weight_bits=None``, built so or made from a plain NNX model by
  ``trquant.nnx.quantize(model, trquant.nnx.QuantRule())`` (transformers
  included), returning a new quantized model.
* :func:`reconstruct_block`: several weights (and activation step sizes) against one
  output, ``apply_fn(weights, act_scales, x, key)``, one jitted ``lax.scan``;
  :func:`reconstruct_model`: block-wise (or layer-wise) reconstruction of an NNX model
  with optional activation quantization (``act_bits``) and QDrop (``drop_prob``).

References:
  Nagel, Amjad, van Baalen, Louizos, Blankevoort, `Up or Down? Adaptive Rounding
  for Post-Training Quantization <https://arxiv.org/abs/2004.10568>`_, ICML 2020.
  Li et al., `BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction <https://arxiv.org/abs/2102.05426>`_, ICLR 2021 (linear beta decay).
  Wei et al., `QDrop: Randomly Dropping Quantization for Extremely Low-bit
  Post-Training Quantization <https://arxiv.org/abs/2203.05740>`_, ICLR 2022.
"""

from trquant.adaround.block import BlockResult
from trquant.adaround.block import block_error
from trquant.adaround.block import block_errors
from trquant.adaround.block import reconstruct_block
from trquant.adaround.loop import LOOPS
from trquant.adaround.loop import has_convolution
from trquant.adaround.model import GRANULARITIES
from trquant.adaround.model import BlockReport
from trquant.adaround.model import LayerReport
from trquant.adaround.model import adaround_model
from trquant.adaround.model import float_copy
from trquant.adaround.model import layer_apply_fn
from trquant.adaround.model import layer_data
from trquant.adaround.model import reconstruct_model
from trquant.adaround.model import round_to_nearest
from trquant.adaround.model import unit_data
from trquant.adaround.rounding import BETA_MODES
from trquant.adaround.rounding import GAMMA
from trquant.adaround.rounding import ZETA
from trquant.adaround.rounding import AdaRoundResult
from trquant.adaround.rounding import Reconstruction
from trquant.adaround.rounding import beta_schedule
from trquant.adaround.rounding import check_loop_args
from trquant.adaround.rounding import hard_codes
from trquant.adaround.rounding import init_alpha
from trquant.adaround.rounding import reconstruct_layer
from trquant.adaround.rounding import reconstruction_error
from trquant.adaround.rounding import reconstruction_errors
from trquant.adaround.rounding import reconstruction_problem
from trquant.adaround.rounding import rectified_sigmoid
from trquant.adaround.rounding import rounding_regularizer
from trquant.adaround.rounding import soft_weight
from trquant.adaround.rounding import weight_grid

__all__ = [
    "AdaRoundResult",
    "BETA_MODES",
    "BlockReport",
    "BlockResult",
    "GRANULARITIES",
    "GAMMA",
    "LOOPS",
    "LayerReport",
    "Reconstruction",
    "ZETA",
    "adaround_model",
    "beta_schedule",
    "block_error",
    "block_errors",
    "check_loop_args",
    "float_copy",
    "hard_codes",
    "has_convolution",
    "init_alpha",
    "layer_apply_fn",
    "layer_data",
    "reconstruct_block",
    "reconstruct_layer",
    "reconstruct_model",
    "reconstruction_error",
    "reconstruction_errors",
    "reconstruction_problem",
    "rectified_sigmoid",
    "round_to_nearest",
    "rounding_regularizer",
    "soft_weight",
    "unit_data",
    "weight_grid",
]
