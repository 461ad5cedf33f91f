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
  :func:`trquant.tr_schedule` and the label tree of ``optax.partition`` (or
  :func:`partition`); :func:`scales_fn`, :func:`dampening_loss`,
  :func:`oscillation_stats` and :func:`transition_stats` serve the oscillation
  transforms and TR scheduling;
* :func:`calibrate_activations`, :func:`init_weight_scales`,
  :func:`load_float_weights` and :func:`reestimate_batchnorm` set scales, weights
  and BatchNorm statistics; :func:`batchnorm_divergence` measures how far running
  BatchNorm statistics are from those of the current weights, and
  :func:`check_batchnorm` re-estimates them or warns after QAT;
* :func:`capture_layers` records the inputs and outputs of the quantized layers during a
  forward pass (AdaRound uses it).

Modules: ``layers`` (the quantized layers and their Variables), ``surgery``
(:func:`quantize_model`, :class:`QuantRule`), ``calibration`` (weights, scales, BatchNorm
statistics from data), ``transforms`` (the glue to trquant's optax transforms),
``capturing`` (:func:`capture_layers`), ``traversal`` (listing a model's trquant layers),
``graph`` (reading and editing the model graph by key, shared by surgery and AdaRound).
Every public name is also here.

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

from trquant.nnx.capturing import Call
from trquant.nnx.capturing import Capture
from trquant.nnx.capturing import capture_layers
from trquant.nnx.transforms import FREEZE_FIELDS
from trquant.nnx.transforms import OSCILLATION_FIELDS
from trquant.nnx.transforms import TRANSITION_FIELDS
from trquant.nnx.calibration import BatchNormDivergenceWarning
from trquant.nnx.calibration import batchnorm_divergence
from trquant.nnx.calibration import check_batchnorm
from trquant.nnx.calibration import calibrate_activations
from trquant.nnx.transforms import codes_fn
from trquant.nnx.transforms import dampening_loss
from trquant.nnx.calibration import init_weight_scales
from trquant.nnx.calibration import load_float_weights
from trquant.nnx.transforms import oscillation_stats
from trquant.nnx.transforms import param_labels
from trquant.nnx.transforms import partition
from trquant.nnx.transforms import layer_names
from trquant.nnx.traversal import quant_layers
from trquant.nnx.calibration import reestimate_batchnorm
from trquant.nnx.transforms import saturation_fn
from trquant.nnx.transforms import scales_fn
from trquant.nnx.transforms import weight_scales
from trquant.nnx.transforms import transition_stats
from trquant.nnx.traversal import values
from trquant.nnx.layers import DEPTHWISE_IMPLS
from trquant.nnx.layers import QUANT_LAYERS
from trquant.nnx.layers import WEIGHT_QUANTIZERS
from trquant.nnx.layers import ActScale
from trquant.nnx.layers import LearnedWeightScale
from trquant.nnx.layers import QuantConv
from trquant.nnx.layers import QuantEinsum
from trquant.nnx.layers import QuantLinear
from trquant.nnx.layers import QuantLinearGeneral
from trquant.nnx.layers import QuantWeight
from trquant.nnx.layers import WeightScale
from trquant.nnx.surgery import SUPPORTED_LAYERS
from trquant.nnx.surgery import UNSUPPORTED_LAYERS
from trquant.nnx.surgery import QuantRule
from trquant.nnx.surgery import first_last_rule
from trquant.nnx.surgery import quantize_model

__all__ = [
    "ActScale",
    "BatchNormDivergenceWarning",
    "Call",
    "Capture",
    "DEPTHWISE_IMPLS",
    "FREEZE_FIELDS",
    "LearnedWeightScale",
    "OSCILLATION_FIELDS",
    "QUANT_LAYERS",
    "QuantConv",
    "QuantEinsum",
    "QuantLinear",
    "QuantLinearGeneral",
    "QuantRule",
    "QuantWeight",
    "SUPPORTED_LAYERS",
    "TRANSITION_FIELDS",
    "UNSUPPORTED_LAYERS",
    "WEIGHT_QUANTIZERS",
    "WeightScale",
    "batchnorm_divergence",
    "calibrate_activations",
    "capture_layers",
    "check_batchnorm",
    "codes_fn",
    "dampening_loss",
    "first_last_rule",
    "init_weight_scales",
    "layer_names",
    "load_float_weights",
    "oscillation_stats",
    "param_labels",
    "partition",
    "quant_layers",
    "quantize_model",
    "reestimate_batchnorm",
    "saturation_fn",
    "scales_fn",
    "transition_stats",
    "values",
    "weight_scales",
]
