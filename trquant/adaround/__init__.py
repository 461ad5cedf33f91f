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

The package's modules (their public names are all importable from here):

* :mod:`trquant.adaround.config`: :class:`AdaRoundConfig`, the optimisation
  hyper-parameters (iterations, batch, ``lam``, learning rates, warm-up, ``beta``
  annealing, the stretch ``zeta`` / ``gamma``, QDrop's ``drop_prob``, ``loop``) with the
  paper's defaults, validated once; every function takes it as ``config=``.
* :mod:`trquant.adaround.rounding`: the pieces, :func:`rectified_sigmoid`,
  :func:`init_alpha`, :func:`rounding_regularizer`, :func:`beta_schedule`,
  :func:`soft_weight`, :func:`hard_codes`, :func:`weight_grid`.
* :mod:`trquant.adaround.reconstruction`: one reconstruction problem,
  :class:`Reconstruction` (made by :func:`reconstruction_problem`): the rounding of N
  weights (and activation step sizes) of ``apply_fn(weights, act_scales, x, key)``
  against full-precision targets. :func:`reconstruct_block` solves it;
  :func:`reconstruct_layer` is the one-weight case for a layer ``apply_fn(w, x)``.
* :mod:`trquant.adaround.loop`: how the loops run (a fused ``lax.scan``, or on CPU, for
  convolutions, one jitted step per iteration).
* :mod:`trquant.adaround.data`: calibration data of a layer (:func:`layer_data`) or a
  sub-module (:func:`unit_data`) of an NNX model.
* :mod:`trquant.adaround.units`: the units of reconstruction and their pure functions
  (:func:`layer_apply_fn`, :func:`float_copy`).
* :mod:`trquant.adaround.drivers`: the NNX model drivers :func:`round_to_nearest` and
  :func:`reconstruct_model` (AdaRound layer by layer, BRECQ blocks, QDrop), which read what
  to quantize from the model (``trquant.nnx.quantize_model(model, rules)``, the rules of
  QAT), each returning a :class:`ModelResult` ``(model, reports)``.

Example:
  >>> import jax, trquant
  >>> from flax import nnx
  >>> fp = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
  ...                     nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  >>> x = jax.random.normal(jax.random.key(0), (64, 8))
  >>> model = trquant.nnx.quantize_model(fp, trquant.nnx.QuantRule(weight_bits=3))
  >>> config = trquant.adaround.AdaRoundConfig(iters=50, lr=1e-2)
  >>> q, reports = trquant.adaround.reconstruct_model(model, x, granularity="layer",
  ...                                                 config=config, key=jax.random.key(1),
  ...                                                 progress=False)
  >>> q.layers[0].weight_bits, len(reports)
  (3, 2)

References:
  Nagel, Amjad, van Baalen, Louizos, Blankevoort, `Up or Down? Adaptive Rounding
  for Post-Training Quantization <https://arxiv.org/abs/2004.10568>`_, ICML 2020.
  Li et al., `BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction <https://arxiv.org/abs/2102.05426>`_, ICLR 2021 (linear beta decay).
  Wei et al., `QDrop: Randomly Dropping Quantization for Extremely Low-bit
  Post-Training Quantization <https://arxiv.org/abs/2203.05740>`_, ICLR 2022.
"""

from trquant.adaround.config import AdaRoundConfig
from trquant.adaround.config import BETA_MODES
from trquant.adaround.config import GAMMA
from trquant.adaround.config import ZETA
from trquant.adaround.data import UnitData
from trquant.adaround.data import layer_data
from trquant.adaround.data import unit_data
from trquant.adaround.drivers import ModelResult
from trquant.adaround.drivers import UnitReport
from trquant.adaround.drivers import reconstruct_model
from trquant.adaround.drivers import round_to_nearest
from trquant.adaround.loop import LOOPS
from trquant.adaround.loop import has_convolution
from trquant.adaround.reconstruction import AdaRoundResult
from trquant.adaround.reconstruction import BlockResult
from trquant.adaround.reconstruction import LayerAsBlock
from trquant.adaround.reconstruction import Reconstruction
from trquant.adaround.reconstruction import ReconstructionArrays
from trquant.adaround.reconstruction import block_error
from trquant.adaround.reconstruction import block_errors
from trquant.adaround.reconstruction import reconstruct_block
from trquant.adaround.reconstruction import reconstruct_layer
from trquant.adaround.reconstruction import reconstruction_error
from trquant.adaround.reconstruction import reconstruction_errors
from trquant.adaround.reconstruction import reconstruction_problem
from trquant.adaround.rounding import beta_schedule
from trquant.adaround.rounding import hard_codes
from trquant.adaround.rounding import init_alpha
from trquant.adaround.rounding import rectified_sigmoid
from trquant.adaround.rounding import rounding_regularizer
from trquant.adaround.rounding import soft_weight
from trquant.adaround.rounding import weight_grid
from trquant.adaround.units import GRANULARITIES
from trquant.adaround.units import float_copy
from trquant.adaround.units import layer_apply_fn

__all__ = [
    "AdaRoundConfig",
    "AdaRoundResult",
    "BETA_MODES",
    "BlockResult",
    "GAMMA",
    "GRANULARITIES",
    "LOOPS",
    "LayerAsBlock",
    "ModelResult",
    "Reconstruction",
    "ReconstructionArrays",
    "UnitData",
    "UnitReport",
    "ZETA",
    "beta_schedule",
    "block_error",
    "block_errors",
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
