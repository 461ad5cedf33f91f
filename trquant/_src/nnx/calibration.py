"""Setting a quantized model's weights, scales and BatchNorm statistics from data.

* :func:`load_float_weights` loads full-precision weights into a quantized model;
* :func:`init_weight_scales` and :func:`calibrate_activations` initialise weight and
  activation scales;
* :func:`reestimate_batchnorm` re-estimates BatchNorm running statistics with the
  quantized weights (against oscillation-corrupted statistics), and
  :func:`batchnorm_divergence` measures how far the running statistics are from them;
  :func:`check_batchnorm` does both after QAT: it measures, and re-estimates or warns
  (:class:`BatchNormDivergenceWarning`).
"""

from __future__ import annotations

import functools
import itertools
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trquant._src import checks
from trquant._src.nnx import traversal


def load_float_weights(model: nnx.Module,
                       source: Union[nnx.Module, nnx.State, Mapping[str, Any]]) -> list[tuple]:
  """Copies parameter and BatchNorm values from ``source`` into ``model``, keeping its metadata.

  QAT starts from a full-precision checkpoint. ``nnx.update(quant_model, fp_state)``
  would replace the quantized model's variables with the FP ones, metadata
  included (a :class:`QuantWeight` with ``bits=None``), silently turning
  quantization off; this copies values only. Entries the source lacks (scales)
  are left as they are: re-initialise weight scales afterwards with
  :func:`init_weight_scales`.

  Args:
    model: the (quantized) NNX model to load into.
    source: an NNX model, an ``nnx.State`` with the same parameter paths, or a
      mapping from ``"/"``-joined paths to arrays (e.g. an opened ``.npz``).

  Returns:
    The paths loaded.

  Raises:
    ValueError: if the source has a path the model lacks, or a shape differs.
  """
  if isinstance(source, nnx.Module):
    source = nnx.state(source, nnx.Any(nnx.Param, nnx.BatchStat))
  if isinstance(source, nnx.State):
    entries = [(tuple(path), value) for path, value in nnx.to_flat_state(source)]
  else:
    entries = [(tuple(key.split("/")), value) for key, value in source.items()]
  # Keys as strings, so "layers/0/kernel" from a file matches the path ("layers", 0, "kernel").
  targets = {traversal.path_name(path): variable for path, variable in nnx.to_flat_state(nnx.state(model))}
  missing = [traversal.path_name(path) for path, _ in entries if traversal.path_name(path) not in targets]
  if missing:
    raise ValueError(f"the source has {missing[:5]} ({len(missing)} in all), which the model"
                     " lacks; was it saved from the same architecture?")
  loaded = []
  for path, value in entries:
    target = targets[traversal.path_name(path)]
    value = value.get_value() if isinstance(value, nnx.Variable) else value
    if np.shape(value) != np.shape(target.get_value()):
      raise ValueError(f"{traversal.path_name(path)}: source shape {np.shape(value)}, model shape"
                       f" {np.shape(target.get_value())}.")
    target.set_value(jnp.asarray(value, dtype=target.get_value().dtype))
    loaded.append(path)
  return loaded


def init_weight_scales(model: nnx.Module, *, method: Optional[str] = None) -> None:
  """Re-initialises every quantized layer's weight scale from its current kernel.

  Call after loading full-precision weights into a quantized model (QAT starts
  from an FP checkpoint). ``method`` defaults to each layer's ``scale_method``.
  Layers with full-precision weights (``weight_bits=None``) are left as they are.

  Raises:
    ValueError: if the model has no trquant layer: there would be no scale to set.
  """
  for _, layer in traversal.require_quant_layers(model, "init_weight_scales"):
    if layer.kernel.bits is not None:
      layer.weight_scale.set_value(layer.initial_weight_scale(
          layer.kernel.get_value(), method or layer.scale_method))


def calibrate_activations(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
  """Sets each quantized input's LSQ scale to ``2 * mean(|x|) / sqrt(hi)`` on a batch.

  Runs ``model(*args, **kwargs)`` eagerly once with calibration on, and returns its output.
  Layers with full-precision inputs (``act_bits=None``) are left as they are. It also
  checks each layer's grid against the data: an unsigned grid (``signed_act=False``, the
  default) would clip negative inputs to 0, so a layer that sees any raises. A layer built
  with ``signed_act="auto"`` takes its grid here: signed if its first input in this pass
  has a negative value (a layer this pass never calls stays undecided and raises when
  it next quantizes an input).

  Raises:
    ValueError: if the model has no trquant layer (there would be no activation scale to
      set), or if a layer with an unsigned input grid sees negative inputs.
  """
  named = traversal.require_quant_layers(model, "calibrate_activations")
  checks.check_global_batch((args, kwargs), "calibrate_activations' inputs")
  minima: dict[int, float] = {}

  def record_minimum(layer, inputs, output, call_kwargs, previous):
    if not isinstance(inputs, jax.core.Tracer):
      minimum = float(jnp.min(inputs))
      minima[id(layer)] = min(minimum, minima.get(id(layer), minimum))
    if previous is not None:
      previous(layer, inputs, output, call_kwargs)

  saved_hooks = [layer.capture_hook for _, layer in named]
  for _, layer in named:
    layer.calibrating = True
    # Only layers whose inputs may quantize on an unsigned grid need their minimum.
    if layer.act_bits is not None and layer.signed_act is not True:
      layer.capture_hook = functools.partial(record_minimum, previous=layer.capture_hook)
  try:
    output = model(*args, **kwargs)
  finally:
    for (_, layer), hook in zip(named, saved_hooks):
      layer.calibrating = False
      layer.capture_hook = hook
  # A signed_act="auto" layer decided on its first call; a later call may still go negative.
  clipped = [(traversal.path_name(path), minima[id(layer)]) for path, layer in named
             if layer.signed_act is False and minima.get(id(layer), 0.0) < 0.0]
  if clipped:
    listed = ", ".join(f"{name!r} (min {minimum:.3g})" for name, minimum in clipped[:5])
    raise ValueError(
        f"calibrate_activations: {len(clipped)} layer(s) quantize their inputs on an unsigned"
        f" grid (signed_act=False) but see negative inputs, which would clip to 0: {listed}."
        " Build them with signed_act=True or \"auto\" (the layer's argument, or"
        " QuantRule(..., signed_act=...) for trquant.nnx.quantize_model).")
  return output


def reestimate_batchnorm(model: nnx.Module, batches: Iterable, num_batches: int = 50,
                         forward_fn: Optional[Callable] = None) -> int:
  """Replaces BatchNorm running statistics by the plain average of per-batch statistics.

  Runs the model in training mode on up to ``num_batches`` batches (each either
  an input array or a tuple whose first element is the input) and sets every
  ``nnx.BatchNorm``'s ``mean`` and ``var`` to the average over batches of that
  batch's statistics, as in the oscillation paper's BN re-estimation. Other
  state (weights, scales) is untouched; the model is left in evaluation mode.

  Args:
    model: an NNX model containing ``nnx.BatchNorm`` layers.
    batches: iterable of batches.
    num_batches: maximum number of batches to use (positive).
    forward_fn: ``(model, inputs) -> outputs``; default ``model(inputs)``.

  Returns:
    The number of batches used.
  """
  num_batches = checks.check_int("num_batches", num_batches)  # True is not a count
  norms = _batchnorms(model)
  if not norms:
    raise ValueError("the model has no nnx.BatchNorm layer to re-estimate.")
  forward_fn = checks.check_forward_fn(forward_fn)
  saved_momentum = [norm.momentum for norm in norms]
  # With momentum 0 each forward pass leaves exactly that batch's statistics.
  for norm in norms:
    norm.momentum = 0.0
  model.train()

  @nnx.jit
  def batch_statistics(model, inputs):
    forward_fn(model, inputs)
    return [(norm.mean.get_value(), norm.var.get_value()) for norm in _batchnorms(model)]

  sums, used = None, 0
  try:
    for batch in batches:
      if used >= num_batches:
        break
      inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
      checks.check_global_batch(inputs, "batches")
      stats = batch_statistics(model, jnp.asarray(inputs))
      sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
      used += 1
  finally:
    for norm, momentum in zip(norms, saved_momentum):
      norm.momentum = momentum
    model.eval()
  if used == 0:
    raise ValueError("`batches` yielded no batch.")
  assert sums is not None  # used > 0
  for norm, (mean_sum, var_sum) in zip(norms, sums):
    norm.mean.set_value(mean_sum / used)
    norm.var.set_value(var_sum / used)
  return used


def batchnorm_divergence(model: nnx.Module, batches: Iterable, num_batches: int = 50,
                         forward_fn: Optional[Callable] = None) -> dict[str, float]:
  """How far each BatchNorm's running statistics are from those of the current weights.

  Oscillating quantized weights corrupt BatchNorm running statistics: the running
  averages mix the statistics of weights that flip between two levels, so at
  inference they match neither (the oscillation paper's Sec. 3). This measures it
  per layer: the population statistics of the current weights are re-estimated on a
  copy of the model (:func:`reestimate_batchnorm`, the model itself is not
  touched), and each channel's Gaussian KL divergence
  ``KL(N(mu_pop, var_pop) || N(mu_run, var_run))`` (variances plus the layer's
  epsilon, as normalisation uses them) is averaged over channels.

  Args:
    model: an NNX model containing ``nnx.BatchNorm`` layers.
    batches: iterable of batches (arrays, or tuples whose first element is the input).
    num_batches: maximum number of batches for the population statistics (positive).
    forward_fn: ``(model, inputs) -> outputs``; default ``model(inputs)``.

  Returns:
    ``{layer path ("blocks/0/bn"): mean KL divergence over its channels}``, in
    ``nnx.iter_modules`` order; 0 where the running statistics equal the population ones.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
    >>> batches = [jnp.ones((16, 4)) * i for i in range(4)]
    >>> divergence = batchnorm_divergence(model, batches)  # fresh stats: mean 0, var 1
    >>> list(divergence)
    ['layers/1']
  """
  if not _batchnorms(model):
    raise ValueError("the model has no nnx.BatchNorm layer to compare.")
  population = nnx.clone(model)
  reestimate_batchnorm(population, batches, num_batches, forward_fn)
  divergence = {}
  for (path, running), (_, reestimated) in zip(_named_batchnorms(model),
                                               _named_batchnorms(population)):
    var_run = jnp.asarray(running.var.get_value(), jnp.float32) + running.epsilon
    var_pop = jnp.asarray(reestimated.var.get_value(), jnp.float32) + running.epsilon
    mean_gap = (jnp.asarray(reestimated.mean.get_value(), jnp.float32)
                - jnp.asarray(running.mean.get_value(), jnp.float32))
    kl = 0.5 * (jnp.log(var_run / var_pop) + (var_pop + mean_gap ** 2) / var_run - 1.0)
    divergence[traversal.path_name(path)] = float(jnp.mean(kl))
  return divergence


class BatchNormDivergenceWarning(UserWarning):
  """BatchNorm running statistics far from those of the model's current weights."""


def check_batchnorm(model: nnx.Module, batches: Iterable, *, threshold: float = 0.01,
                    num_batches: int = 20, forward_fn: Optional[Callable] = None,
                    reestimate: bool = False) -> dict[str, float]:
  """After QAT: are the BatchNorm running statistics those of the quantized weights?

  Running statistics are averages over the training steps, so they lag the weights.
  After a short QAT run (low-bit weights that still move a lot, or oscillate) they can
  belong to weights the model no longer has, and the evaluation model is broken while
  the training loss looks fine. This measures :func:`batchnorm_divergence` on up to
  ``num_batches`` batches and, where a layer's mean KL exceeds ``threshold``, either
  warns (:class:`BatchNormDivergenceWarning`, naming the layers and saying to call
  :func:`reestimate_batchnorm`) or, with ``reestimate=True``, re-estimates the
  statistics on the same batches. A well-settled run stays within batch noise (a KL of
  about 1e-4 to 1e-3 from 20 batches).

  Args:
    model: an NNX model containing ``nnx.BatchNorm`` layers (left in evaluation mode).
    batches: iterable of training batches (arrays, or tuples whose first element is
      the input); the first ``num_batches`` are used.
    threshold: the mean KL per layer above which a layer counts as diverged (positive).
    num_batches: batches for the population statistics (positive).
    forward_fn: ``(model, inputs) -> outputs``; default ``model(inputs)``.
    reestimate: re-estimate the statistics when a layer diverged instead of warning.

  Returns:
    ``{layer path: mean KL}``, measured before any re-estimation.

  Raises:
    ValueError: if the model has no BatchNorm layer, ``batches`` is empty or an
      argument is invalid.

  Example:
    >>> import warnings, jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
    >>> model.eval()  # running statistics of a fresh model: mean 0, variance 1
    >>> batches = [jax.random.normal(jax.random.key(i), (32, 4)) * 3 + 1 for i in range(4)]
    >>> before = check_batchnorm(model, batches, reestimate=True)
    >>> before["layers/1"] > 0.01, check_batchnorm(model, batches)["layers/1"] < 0.01
    (True, True)
  """
  threshold = checks.check_positive("threshold", threshold)  # a mean KL
  num_batches = checks.check_int("num_batches", num_batches)
  checks.check_bool("reestimate", reestimate)
  batches = list(itertools.islice(iter(batches), num_batches))  # used twice
  if not batches:
    raise ValueError("`batches` yielded no batch.")
  divergence = batchnorm_divergence(model, batches, num_batches, forward_fn)
  diverged = {name: kl for name, kl in divergence.items() if not kl <= threshold}
  if diverged:
    if reestimate:
      reestimate_batchnorm(model, batches, num_batches, forward_fn)
    else:
      worst = sorted(diverged.items(), key=lambda item: -item[1])[:5]
      warnings.warn(
          f"{len(diverged)} of {len(divergence)} BatchNorm layers have running statistics"
          f" far from those of the current weights (mean KL above {threshold:g}:"
          f" {', '.join(f'{name} {kl:.3g}' for name, kl in worst)}); evaluated with them,"
          " the model is not the one that was trained. Call"
          " trquant.nnx.reestimate_batchnorm(model, train_batches) before evaluating or"
          " exporting (or check_batchnorm(..., reestimate=True)).",
          BatchNormDivergenceWarning, stacklevel=2)
  return divergence


def _named_batchnorms(model):
  return [(path, module) for path, module in nnx.iter_modules(model)
          if isinstance(module, nnx.BatchNorm)]


def _batchnorms(model):
  return [module for _, module in _named_batchnorms(model)]
