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

* :func:`round_to_nearest` and :func:`reconstruct_model` (AdaRound layer by layer,
  BRECQ blocks, QDrop) quantize an NNX model: they read what to quantize from the model
  ``trquant.nnx.quantize_model(model, rules)`` returns (the rules of QAT), each returning a
  :class:`ModelResult` ``(model, reports)``, one :class:`UnitReport` per unit;
  :class:`AdaRoundConfig` holds the optimisation hyper-parameters with the paper's
  defaults.
* :func:`reconstruct_layer` (a layer ``apply_fn(w, x)``) and :func:`reconstruct_block`
  (``apply_fn(weights, act_scales, x, key)``) solve one reconstruction problem on arrays,
  returning a :class:`ReconstructionResult`; :func:`reconstruction_error` and
  :func:`block_error` measure the output error of given weights.
* The pieces: :func:`rectified_sigmoid`, :func:`init_alpha`, :func:`rounding_regularizer`,
  :func:`beta_schedule`, :func:`soft_weight`, :func:`hard_codes`; :func:`has_convolution`
  is the test ``loop="auto"`` uses.

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

from trquant._src.adaround.config import AdaRoundConfig
from trquant._src.adaround.drivers import ModelResult
from trquant._src.adaround.drivers import UnitReport
from trquant._src.adaround.drivers import reconstruct_model
from trquant._src.adaround.drivers import round_to_nearest
from trquant._src.adaround.reconstruction import ReconstructionResult
from trquant._src.adaround.reconstruction import block_error
from trquant._src.adaround.reconstruction import reconstruct_block
from trquant._src.adaround.reconstruction import reconstruct_layer
from trquant._src.adaround.reconstruction import reconstruction_error
from trquant._src.adaround.rounding import beta_schedule
from trquant._src.adaround.rounding import hard_codes
from trquant._src.adaround.rounding import init_alpha
from trquant._src.adaround.rounding import rectified_sigmoid
from trquant._src.adaround.rounding import rounding_regularizer
from trquant._src.adaround.rounding import soft_weight
from trquant._src.adaround.loop import has_convolution

__all__ = [
    "AdaRoundConfig",
    "ModelResult",
    "ReconstructionResult",
    "UnitReport",
    "beta_schedule",
    "block_error",
    "hard_codes",
    "has_convolution",
    "init_alpha",
    "reconstruct_block",
    "reconstruct_layer",
    "reconstruct_model",
    "reconstruction_error",
    "rectified_sigmoid",
    "round_to_nearest",
    "rounding_regularizer",
    "soft_weight",
]
