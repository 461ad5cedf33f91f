"""Flax NNX: quantized layers, model surgery, and the glue to trquant's transforms.

Two ways to a quantized model:

* **Quantize the model you have** (the main road): :func:`quantize_model` replaces the
  layers of a plain NNX model that :class:`QuantRule` objects match
  (``nnx.Linear``, ``nnx.LinearGeneral`` and so ``nnx.MultiHeadAttention``'s
  projections, ``nnx.Conv``, ``nnx.Einsum``) by trquant layers, keeping weights,
  dtypes and sharding; :func:`first_last_rule` keeps the first and last layer in
  full precision or 8 bits in one line.
* **Build it from trquant layers**: :class:`QuantLinear`, :class:`QuantConv`,
  :class:`QuantLinearGeneral`, :class:`QuantEinsum` take their NNX counterpart's
  constructor plus ``weight_bits``, ``act_bits``, ``per_channel``,
  ``weight_quantizer`` and ``signed_act``.

Either way the kernel is a :class:`QuantWeight` (an ``nnx.Param`` carrying ``bits``
metadata); weight scales are :class:`WeightScale` (frozen, not an ``nnx.Param``, so
``nnx.Optimizer(..., wrt=nnx.Param)`` never moves it) or :class:`LearnedWeightScale`;
activation scales are :class:`ActScale` params. Then:

* :func:`codes_fn` and :func:`param_labels` give the ``codes_fn`` of
  :func:`trquant.tr_schedule` and the label tree of ``optax.partition``;
  :func:`scale_fn`, :func:`model_dampening_loss`,
  :func:`oscillation_stats` and :func:`transition_stats` serve the oscillation
  transforms and TR scheduling;
* :func:`calibrate_activations`, :func:`init_weight_scales`,
  :func:`load_float_weights` and :func:`reestimate_batchnorm` set scales, weights
  and BatchNorm statistics; :func:`batchnorm_divergence` measures how far running
  BatchNorm statistics are from those of the current weights, and
  :func:`check_batchnorm` re-estimates them or warns after QAT;
* :func:`capture_layers` records the inputs and outputs of the quantized layers during a
  forward pass (AdaRound uses it); :func:`quant_layers`, :func:`layer_names` and
  :func:`values` list a model's trquant layers and snapshot its Variables.

Example:
  >>> import jax, jax.numpy as jnp, optax, trquant
  >>> from flax import nnx
  >>> model = nnx.Sequential(
  ...     trquant.nnx.QuantLinear(64, 32, weight_bits=2, rngs=nnx.Rngs(0)), nnx.relu,
  ...     trquant.nnx.QuantLinear(32, 10, weight_bits=2, act_bits=4, rngs=nnx.Rngs(1)))
  >>> tx = optax.partition({
  ...     "quant": optax.chain(optax.adam(1e-3),
  ...                          trquant.tr_schedule(3e-3, codes_fn=trquant.nnx.codes_fn(model))),
  ...     "float": optax.adam(1e-3)}, trquant.nnx.param_labels(model))
  >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  >>> grads = nnx.grad(lambda m: m(jnp.ones((8, 64))).sum())(model)
  >>> _ = optimizer.update(model, grads)
"""

from trquant._src.nnx.layers import ActScale
from trquant._src.nnx.layers import LearnedWeightScale
from trquant._src.nnx.layers import QuantConv
from trquant._src.nnx.layers import QuantEinsum
from trquant._src.nnx.layers import QuantLinear
from trquant._src.nnx.layers import QuantLinearGeneral
from trquant._src.nnx.layers import QuantWeight
from trquant._src.nnx.layers import WeightScale
from trquant._src.nnx.surgery import QuantRule
from trquant._src.nnx.surgery import first_last_rule
from trquant._src.nnx.surgery import quantize_model
from trquant._src.nnx.calibration import BatchNormDivergenceWarning
from trquant._src.nnx.calibration import batchnorm_divergence
from trquant._src.nnx.calibration import calibrate_activations
from trquant._src.nnx.calibration import check_batchnorm
from trquant._src.nnx.calibration import init_weight_scales
from trquant._src.nnx.calibration import load_float_weights
from trquant._src.nnx.calibration import reestimate_batchnorm
from trquant._src.nnx.transforms import codes_fn
from trquant._src.nnx.transforms import layer_names
from trquant._src.nnx.transforms import model_dampening_loss
from trquant._src.nnx.transforms import oscillation_stats
from trquant._src.nnx.transforms import param_labels
from trquant._src.nnx.transforms import scale_fn
from trquant._src.nnx.transforms import transition_stats
from trquant._src.nnx.transforms import weight_scales
from trquant._src.nnx.traversal import quant_layers
from trquant._src.nnx.traversal import values
from trquant._src.nnx.capturing import capture_layers

__all__ = [
    "ActScale",
    "BatchNormDivergenceWarning",
    "LearnedWeightScale",
    "QuantConv",
    "QuantEinsum",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantRule",
    "QuantWeight",
    "WeightScale",
    "batchnorm_divergence",
    "calibrate_activations",
    "capture_layers",
    "check_batchnorm",
    "codes_fn",
    "first_last_rule",
    "init_weight_scales",
    "layer_names",
    "load_float_weights",
    "model_dampening_loss",
    "oscillation_stats",
    "param_labels",
    "quant_layers",
    "quantize_model",
    "reestimate_batchnorm",
    "scale_fn",
    "transition_stats",
    "values",
    "weight_scales",
]
