"""AdaRound: post-training rounding of weights learned by layer-wise output reconstruction.

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

* :func:`rectified_sigmoid`, :func:`init_alpha`, :func:`rounding_regularizer`,
  :func:`beta_schedule`, :func:`soft_weight`, :func:`hard_codes`: the pieces.
* :func:`reconstruct_layer`: AdaRound of one layer, given a function
  ``apply_fn(w, x)`` and calibration inputs / targets. The whole optimisation
  runs inside one jitted ``lax.scan``.
* :func:`adaround_model` and :func:`round_to_nearest`: post-training weight
  quantization of an NNX model built from :class:`trquant.nnx.QuantLinear` /
  :class:`trquant.nnx.QuantConv` layers (e.g. a full-precision model with
  ``weight_bits=None``), returning a new quantized model.

References:
  Nagel, Amjad, van Baalen, Louizos, Blankevoort, `Up or Down? Adaptive Rounding
  for Post-Training Quantization <https://arxiv.org/abs/2004.10568>`_, ICML 2020.
  Li et al., `BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction <https://arxiv.org/abs/2102.05426>`_, ICLR 2021 (linear beta decay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from trquant import nnx as tq_nnx
from trquant import quantizers

__all__ = [
    "AdaRoundResult",
    "BETA_MODES",
    "GAMMA",
    "LayerReport",
    "ZETA",
    "adaround_model",
    "beta_schedule",
    "hard_codes",
    "init_alpha",
    "reconstruct_layer",
    "reconstruction_error",
    "rectified_sigmoid",
    "round_to_nearest",
    "rounding_regularizer",
    "soft_weight",
]

ZETA = 1.1
GAMMA = -0.1
BETA_MODES = ("cosine", "linear")
# V is initialised from a probability clipped into [_EPS, 1 - _EPS], so that fractional parts
# of exactly 0 (or h's end points for zeta = 1, gamma = 0) give a finite V.
_EPS = 1e-6


class AdaRoundResult(NamedTuple):
  """Output of :func:`reconstruct_layer`."""

  codes: jax.Array  # w's shape and dtype: integer codes clip(floor(w / s) + [V >= 0], lo, hi)
  weight: jax.Array  # w's shape: the hard-rounded weight scale * codes
  V: jax.Array  # w's shape, float32: the learned rounding variables
  reconstruction_loss: jax.Array  # (iters,) float32: the output error of each mini-batch
  regularization_loss: jax.Array  # (iters,) float32: sum(1 - |2h - 1|^beta), unweighted


class LayerReport(NamedTuple):
  """Per-layer record of :func:`adaround_model` / :func:`round_to_nearest` (``return_info=True``)."""

  name: str  # the layer's path in the model, "/"-joined
  bits: int  # weight bit width used for this layer
  capture_seconds: float  # wall time to collect the layer's inputs and FP outputs
  seconds: float  # wall time of the reconstruction (compilation included); 0 for nearest
  nearest_error: float  # reconstruction_error of round-to-nearest on the calibration set
  adaround_error: float  # the same for AdaRound's weights (= nearest_error for nearest)
  flipped_fraction: float  # fraction of codes that differ from round-to-nearest


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def _is_number(value) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, (bool, np.bool_))


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
  return int(value)


def _check_positive(name: str, value, *, allow_zero: bool = False) -> float:
  if not _is_number(value) or not math.isfinite(float(value)):
    raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
  if float(value) < 0 or (float(value) == 0 and not allow_zero):
    kind = "non-negative" if allow_zero else "positive"
    raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
  return float(value)


def _check_warmup(warmup) -> float:
  if not _is_number(warmup) or not 0.0 <= float(warmup) < 1.0:
    raise ValueError(f"`warmup` must be in [0, 1), got {warmup!r}.")
  return float(warmup)


def _check_stretch(zeta, gamma) -> tuple[float, float]:
  if not _is_number(zeta) or not _is_number(gamma) or not (float(gamma) <= 0.0 < 1.0 <= float(zeta)):
    raise ValueError(f"need `gamma` <= 0 and `zeta` >= 1 so that h(V) reaches 0 and 1; got"
                     f" zeta={zeta!r}, gamma={gamma!r}.")
  return float(zeta), float(gamma)


def _check_bits(bits, signed: bool, name: str = "bits") -> tuple[int, int]:
  """The grid (lo, hi) of a bit width AdaRound can round to."""
  quantizers._check_bits(bits, name)
  if signed and bits == 1:
    raise ValueError(f"`{name}`=1 (signed) is binary quantization, sign(w): it has no rounding"
                     " choice for AdaRound to learn; use bits >= 2.")
  return quantizers.quant_range(bits, signed=bool(signed))


def _check_scale(w, scale) -> np.ndarray:
  """Validates a concrete scale (positive, finite, broadcasting to w); returns it as numpy."""
  quantizers._check_scale(w, scale)
  if isinstance(scale, jax.core.Tracer):
    raise ValueError("`scale` must be a concrete array, not a traced value.")
  scale = np.asarray(scale, np.float32)
  if scale.size == 0 or not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
    raise ValueError(f"`scale` must be positive and finite everywhere; got {scale!r}.")
  return scale


# ---------------------------------------------------------------------------------------
# The rounding relaxation
# ---------------------------------------------------------------------------------------


def rectified_sigmoid(V, zeta: float = ZETA, gamma: float = GAMMA):
  """AdaRound's relaxed rounding ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``.

  Stretching the sigmoid beyond ``[0, 1]`` and clipping lets ``h`` reach exactly
  0 and 1 at finite ``V`` (where its gradient vanishes).

  Args:
    V: array of rounding variables.
    zeta: upper stretch, ``>= 1`` (default 1.1).
    gamma: lower stretch, ``<= 0`` (default -0.1).

  Returns:
    ``h(V)`` in ``[0, 1]``, V's shape (float32 for integer input).

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.adaround.rectified_sigmoid(jnp.array([-10.0, 0.0, 10.0]))
    Array([0. , 0.5, 1. ], dtype=float32)
  """
  zeta, gamma = _check_stretch(zeta, gamma)
  V = jnp.asarray(V)
  if not jnp.issubdtype(V.dtype, jnp.floating):
    V = V.astype(jnp.float32)
  return jnp.clip(jax.nn.sigmoid(V) * (zeta - gamma) + gamma, 0.0, 1.0)


def init_alpha(w, scale, *, zeta: float = ZETA, gamma: float = GAMMA):
  """Initial rounding variables: ``V`` with ``h(V) = w / scale - floor(w / scale)``.

  The soft weight :func:`soft_weight` then starts at ``w`` (for weights inside
  the clipping range). A fractional part that ``h`` only reaches at infinite
  ``V`` (e.g. 0 with ``zeta=1, gamma=0``) is clipped to give a finite ``V``
  (``|V| <= 13.9``).

  Args:
    w: float weights.
    scale: positive step size, a scalar or a keep-dims array broadcasting to ``w``.
    zeta, gamma: the stretch of :func:`rectified_sigmoid`.

  Returns:
    float32 ``V`` with ``w``'s shape.

  Raises:
    ValueError: for a non-positive scale or one that does not broadcast to ``w``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> V = trquant.adaround.init_alpha(jnp.array([0.25, 1.0, -0.5]), 1.0)
    >>> trquant.adaround.rectified_sigmoid(V).round(4)
    Array([0.25, 0.  , 0.5 ], dtype=float32)
  """
  zeta, gamma = _check_stretch(zeta, gamma)
  quantizers._check_scale(w, scale)
  v = jnp.asarray(w, jnp.float32) / jnp.asarray(scale, jnp.float32)
  rest = v - jnp.floor(v)
  probability = jnp.clip((rest - gamma) / (zeta - gamma), _EPS, 1.0 - _EPS)
  return jnp.log(probability) - jnp.log1p(-probability)


def soft_weight(w, scale, V, *, bits: int, signed: bool = True, zeta: float = ZETA,
                gamma: float = GAMMA):
  """The relaxed quantized weight ``scale * clip(floor(w / scale) + h(V), lo, hi)``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> w = jnp.array([0.3, -0.7])
    >>> trquant.adaround.soft_weight(w, 0.5, trquant.adaround.init_alpha(w, 0.5), bits=4)
    Array([ 0.3, -0.7], dtype=float32)
  """
  lo, hi = _check_bits(bits, signed)
  quantizers._check_scale(w, scale)
  scale = jnp.asarray(scale, jnp.float32)
  floor = jnp.floor(jnp.asarray(w, jnp.float32) / scale)
  return scale * jnp.clip(floor + rectified_sigmoid(V, zeta, gamma), lo, hi)


def hard_codes(w, scale, V, *, bits: int, signed: bool = True):
  """AdaRound's final codes ``clip(floor(w / scale) + [V >= 0], lo, hi)`` (float32).

  ``V >= 0`` is ``h(V) >= 0.5`` for the default stretch (``zeta + gamma = 1``).

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.adaround.hard_codes(jnp.array([0.3, 0.3, 9.0]), 0.5, jnp.array([-1.0, 2.0, 5.0]),
    ...                             bits=2)
    Array([0., 1., 1.], dtype=float32)
  """
  lo, hi = _check_bits(bits, signed)
  quantizers._check_scale(w, scale)
  floor = jnp.floor(jnp.asarray(w, jnp.float32) / jnp.asarray(scale, jnp.float32))
  return jnp.clip(floor + (jnp.asarray(V) >= 0), lo, hi)


def rounding_regularizer(V, beta, *, zeta: float = ZETA, gamma: float = GAMMA):
  """AdaRound's regulariser ``sum(1 - |2 h(V) - 1|^beta)``.

  It is ``V.size`` at ``h = 0.5`` for every weight and 0 once every ``h`` is 0 or 1;
  a large ``beta`` leaves it flat except near 0 and 1 (only ``h`` close to a
  grid point is pulled there), ``beta = 2`` pulls every ``h``.

  Args:
    V: rounding variables.
    beta: exponent, positive (a number or a traced scalar, e.g. from
      :func:`beta_schedule`).
    zeta, gamma: the stretch of :func:`rectified_sigmoid`.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.adaround.rounding_regularizer(jnp.array([0.0, 20.0, -20.0]), 2.0)
    Array(1., dtype=float32)
  """
  if _is_number(beta) and not float(beta) > 0:
    raise ValueError(f"`beta` must be positive, got {beta!r}.")
  return _regularizer(rectified_sigmoid(V, zeta, gamma), beta)


def _regularizer(h, beta):
  return jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta).astype(jnp.float32)


def beta_schedule(iters: int, *, start: float = 20.0, end: float = 2.0, warmup: float = 0.2,
                  mode: str = "cosine") -> optax.Schedule:
  """The annealing of the regulariser's exponent ``beta`` over ``iters`` iterations.

  Args:
    iters: number of iterations (positive).
    start: ``beta`` when the regulariser switches on (positive; 20 in the paper).
    end: ``beta`` at step ``iters`` (positive; 2 in the paper).
    warmup: fraction of the iterations without regulariser, in ``[0, 1)``: the
      annealing starts at step ``ceil(warmup * iters)``.
    mode: ``"cosine"`` (AIMET) or ``"linear"`` (BRECQ, QDrop).

  Returns:
    A schedule ``step -> beta`` (float32): ``start`` up to the end of the
    warm-up, then cosine or linear to ``end`` at step ``iters``, constant after.

  Raises:
    ValueError: for a bad ``iters``, ``start``, ``end``, ``warmup`` or ``mode``.

  Example:
    >>> import trquant
    >>> schedule = trquant.adaround.beta_schedule(1000)
    >>> [round(float(schedule(s)), 2) for s in (0, 200, 600, 1000)]
    [20.0, 20.0, 11.0, 2.0]
  """
  iters = _check_int("iters", iters, 1)
  start = _check_positive("start", start)
  end = _check_positive("end", end)
  warmup = _check_warmup(warmup)
  if mode not in BETA_MODES:
    raise ValueError(f"`mode` must be one of {BETA_MODES}, got {mode!r}.")
  start_step = math.ceil(warmup * iters)
  span = max(iters - start_step, 1)

  def schedule(step):
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / span, 0.0, 1.0)
    if mode == "cosine":
      value = end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      value = start + (end - start) * progress
    return value.astype(jnp.float32)

  return schedule


# ---------------------------------------------------------------------------------------
# Layer reconstruction
# ---------------------------------------------------------------------------------------


def _output_error(out, target, activation):
  if activation is not None:
    out, target = activation(out), activation(target)
  return jnp.mean(jnp.sum(jnp.square(out - target), axis=-1))


@dataclasses.dataclass(frozen=True)
class _Reconstruction:
  """One AdaRound problem: pure ``init`` / ``step`` functions over explicit arrays.

  :func:`reconstruct_layer` scans ``step`` inside one ``jax.jit``; the
  ``adaround`` benchmark also runs it eagerly (a Python loop over a jitted
  ``step``) to measure what the fused loop saves.
  """

  apply_fn: Callable
  lo: int
  hi: int
  iters: int
  batch_size: int
  lam: float
  lr: float
  warmup: float
  beta: tuple[float, float]
  beta_mode: str
  activation: Optional[Callable]
  zeta: float
  gamma: float

  @property
  def optimizer(self):
    return optax.adam(self.lr)

  @property
  def start_step(self) -> int:
    return math.ceil(self.warmup * self.iters)

  @property
  def beta_fn(self):
    return beta_schedule(self.iters, start=self.beta[0], end=self.beta[1], warmup=self.warmup,
                         mode=self.beta_mode)

  def init(self, w, scale):
    V = init_alpha(w, scale, zeta=self.zeta, gamma=self.gamma)
    return V, self.optimizer.init(V)

  def loss(self, V, step, w, scale, xb, yb):
    h = jnp.clip(jax.nn.sigmoid(V) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)
    w_soft = scale * jnp.clip(jnp.floor(w / scale) + h, self.lo, self.hi)
    reconstruction = _output_error(self.apply_fn(w_soft.astype(w.dtype), xb), yb, self.activation)
    regularization = _regularizer(h, self.beta_fn(step))
    lam = jnp.where(step >= self.start_step, self.lam, 0.0)
    return reconstruction + lam * regularization, (reconstruction, regularization)

  def step(self, carry, step, arrays):
    """One Adam step on V with the mini-batch drawn from ``fold_in(key, step)``."""
    V, opt_state = carry
    w, scale, x, y, key = arrays
    index = jax.random.randint(jax.random.fold_in(key, step), (self.batch_size,), 0, x.shape[0])
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (_, losses), grads = grad_fn(V, step, w, scale, jnp.take(x, index, axis=0),
                                 jnp.take(y, index, axis=0))
    updates, opt_state = self.optimizer.update(grads, opt_state, V)
    return (optax.apply_updates(V, updates), opt_state), losses

  def run(self, w, scale, x, y, key):
    """The whole optimisation: ``lax.scan`` of :meth:`step` over ``iters`` steps."""
    carry = self.init(w, scale)
    (V, _), (reconstruction, regularization) = jax.lax.scan(
        lambda carry, step: self.step(carry, step, (w, scale, x, y, key)), carry,
        jnp.arange(self.iters, dtype=jnp.int32))
    return V, reconstruction, regularization

  def finish(self, w, scale, V):
    codes = jnp.clip(jnp.floor(w / scale) + (V >= 0), self.lo, self.hi)
    return codes.astype(w.dtype), (scale * codes).astype(w.dtype)


def _check_loop_args(*, iters, batch_size, lam, lr, warmup, beta, beta_mode):
  """Validates the optimisation loop's hyper-parameters; returns them normalised."""
  iters = _check_int("iters", iters, 1)
  batch_size = _check_int("batch_size", batch_size, 1)
  lam = _check_positive("lam", lam, allow_zero=True)
  lr = _check_positive("lr", lr)
  warmup = _check_warmup(warmup)
  if not isinstance(beta, (tuple, list)) or len(beta) != 2:
    raise ValueError(f"`beta` must be a pair (start, end), got {beta!r}.")
  beta = (_check_positive("beta[0]", beta[0]), _check_positive("beta[1]", beta[1]))
  beta_schedule(iters, start=beta[0], end=beta[1], warmup=warmup, mode=beta_mode)
  return iters, batch_size, lam, lr, warmup, beta


def _prepare(apply_fn, w, scale, x_q, y_fp, *, bits, signed, iters, batch_size, lam, lr, warmup,
             beta, beta_mode, activation, zeta, gamma, key):
  """Validates reconstruct_layer's arguments; returns the problem and its arrays."""
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be a callable (w, x) -> output, got {apply_fn!r}.")
  lo, hi = _check_bits(bits, signed)
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating) or w.size == 0:
    raise ValueError(f"`w` must be a non-empty floating array, got {w.dtype} of shape {w.shape}.")
  scale = jnp.asarray(_check_scale(w, scale))
  x_q, y_fp = jnp.asarray(x_q), jnp.asarray(y_fp)
  if x_q.ndim < 1 or y_fp.ndim < 2:
    raise ValueError(f"`x_q` must be (N, ...) and `y_fp` (N, ..., channels); got shapes"
                     f" {x_q.shape} and {y_fp.shape}.")
  if x_q.shape[0] == 0:
    raise ValueError("the calibration data is empty: `x_q` has no example.")
  if x_q.shape[0] != y_fp.shape[0]:
    raise ValueError(f"`x_q` and `y_fp` must hold the same number of examples; got"
                     f" {x_q.shape[0]} and {y_fp.shape[0]}.")
  iters, batch_size, lam, lr, warmup, beta = _check_loop_args(
      iters=iters, batch_size=batch_size, lam=lam, lr=lr, warmup=warmup, beta=beta,
      beta_mode=beta_mode)
  if activation is not None and not callable(activation):
    raise ValueError(f"`activation` must be None or a callable, got {activation!r}.")
  zeta, gamma = _check_stretch(zeta, gamma)
  if not isinstance(key, jax.Array) or not (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32):
    raise ValueError(f"`key` must be a jax PRNG key (jax.random.key(seed)), got {key!r}.")
  expected = (1,) + tuple(y_fp.shape[1:])
  try:
    out = jax.eval_shape(apply_fn, w, x_q[:1])
  except Exception as error:  # the shapes of w and x_q do not fit apply_fn
    raise ValueError(f"`apply_fn(w, x_q)` fails for w of shape {w.shape} and x_q of shape"
                     f" {x_q.shape}: {error}") from error
  if tuple(out.shape) != expected:
    raise ValueError(f"`apply_fn(w, x_q)` gives outputs of shape {tuple(out.shape)[1:]} per"
                     f" example but `y_fp` has {tuple(y_fp.shape[1:])}.")
  problem = _Reconstruction(apply_fn, lo, hi, iters, batch_size, lam, lr, warmup, beta,
                            beta_mode, activation, zeta, gamma)
  return problem, (w, scale, x_q.astype(w.dtype), y_fp.astype(w.dtype), key)


def reconstruct_layer(apply_fn: Callable, w, scale, x_q, y_fp, *, bits: int, signed: bool = True,
                      iters: int = 10_000, batch_size: int = 32, lam: float = 0.01,
                      lr: float = 1e-3, warmup: float = 0.2,
                      beta: tuple[float, float] = (20.0, 2.0), beta_mode: str = "cosine",
                      activation: Optional[Callable] = None, zeta: float = ZETA,
                      gamma: float = GAMMA, key) -> AdaRoundResult:
  """AdaRound of one layer: learns to round ``w`` up or down to reconstruct its output.

  Minimises, with Adam on the rounding variables ``V`` only (initialised by
  :func:`init_alpha`), ``||f_a(apply_fn(W_soft, x)) - f_a(y)||^2`` (summed over
  the last axis, averaged over the others) on mini-batches ``(x, y)`` drawn
  with replacement from ``(x_q, y_fp)``, plus ``lam`` times
  :func:`rounding_regularizer` from step ``ceil(warmup * iters)`` on, with
  ``beta`` annealed by :func:`beta_schedule`. The whole loop is one jitted
  ``lax.scan``: no Python runs per iteration. Mini-batch ``t`` is drawn from
  ``fold_in(key, t)``, so a key gives the same result on every call.

  Args:
    apply_fn: ``(w, x) -> output`` of the layer (e.g. its pre-activation), pure
      and differentiable in ``w``.
    w: full-precision weights (e.g. a Flax kernel, output channels last).
    scale: the step size, a positive scalar or a keep-dims array (per-channel,
      e.g. shape ``(1, out)`` for an ``(in, out)`` kernel).
    x_q: calibration inputs of the layer, ``(N, ...)``; for asymmetric
      reconstruction, the inputs produced by the already-quantized earlier layers.
    y_fp: target outputs, ``(N, ..., channels)``: the full-precision layer's outputs.
    bits: weight bit width in ``[2, 16]`` (unsigned: ``[1, 16]``).
    signed: signed (weights) or unsigned grid.
    iters: number of Adam steps (the paper: 10k).
    batch_size: examples per step.
    lam: weight of the rounding regulariser (0.01; BRECQ uses 0.1 for MobileNetV2).
    lr: Adam learning rate.
    warmup: fraction of ``iters`` without regulariser.
    beta: ``(start, end)`` of the annealed exponent.
    beta_mode: ``"cosine"`` or ``"linear"``, see :func:`beta_schedule`.
    activation: ``f_a`` applied to both outputs before the error (e.g.
      ``jax.nn.relu``), or None.
    zeta, gamma: the stretch of :func:`rectified_sigmoid`.
    key: a jax PRNG key for the mini-batches.

  Returns:
    An :class:`AdaRoundResult`: ``codes = clip(floor(w / scale) + [V >= 0], lo, hi)``,
    ``weight = scale * codes``, ``V`` and the per-step losses.

  Raises:
    ValueError: for bad bits, a non-positive or non-broadcasting scale, empty or
      mismatched calibration arrays, ``apply_fn`` outputs that do not match
      ``y_fp``, ``iters < 1`` or other bad hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> w = jax.random.normal(jax.random.key(0), (16, 4))
    >>> x = jax.random.normal(jax.random.key(1), (256, 16))
    >>> s = trquant.init_scale(w, bits=3, method="mse")
    >>> result = trquant.adaround.reconstruct_layer(
    ...     lambda w, x: x @ w, w, s, x, x @ w, bits=3, iters=200, lr=1e-2, key=jax.random.key(2))
    >>> result.codes.shape, bool(jnp.all(result.weight == s * result.codes))
    ((16, 4), True)
  """
  problem, arrays = _prepare(apply_fn, w, scale, x_q, y_fp, bits=bits, signed=signed, iters=iters,
                             batch_size=batch_size, lam=lam, lr=lr, warmup=warmup, beta=beta,
                             beta_mode=beta_mode, activation=activation, zeta=zeta, gamma=gamma,
                             key=key)
  V, reconstruction, regularization = _run(problem, *arrays)
  codes, weight = problem.finish(arrays[0], arrays[1], V)
  return AdaRoundResult(codes, weight, V, reconstruction, regularization)


@functools.partial(jax.jit, static_argnums=0)
def _run(problem: _Reconstruction, w, scale, x, y, key):
  """The fused loop, compiled once per problem (equal problems share the compilation)."""
  return problem.run(w, scale, x, y, key)


def reconstruction_error(apply_fn: Callable, w, x, y, *, activation: Optional[Callable] = None,
                         batch_size: int = 256) -> float:
  """The loss term of :func:`reconstruct_layer` over a whole data set (no regulariser).

  Args:
    apply_fn: ``(w, x) -> output``.
    w: the weights to evaluate (e.g. ``AdaRoundResult.weight``).
    x: inputs ``(N, ...)``.
    y: targets ``(N, ..., channels)``.
    activation: ``f_a`` applied to both outputs, or None.
    batch_size: examples per evaluation chunk.

  Returns:
    ``mean(sum(|f_a(apply_fn(w, x)) - f_a(y)|^2, axis=-1))`` as a Python float.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> x = jnp.eye(3)
    >>> trquant.adaround.reconstruction_error(lambda w, x: x @ w, jnp.eye(3), x, x + 1.0)
    3.0
  """
  return _errors(apply_fn, [w], x, y, activation=activation, batch_size=batch_size)[0]


def _errors(apply_fn, weights, x, y, *, activation=None, batch_size=256) -> list[float]:
  """:func:`reconstruction_error` of several weights, compiling the evaluation once."""
  batch_size = _check_int("batch_size", batch_size, 1)
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim < 1 or y.ndim < 2 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
    raise ValueError(f"`x` and `y` must hold the same positive number of examples; got shapes"
                     f" {x.shape} and {y.shape}.")

  @jax.jit
  def chunk_error(w, xb, yb):
    out = apply_fn(w, xb)
    if activation is not None:
      out, yb = activation(out), activation(yb)
    return jnp.sum(jnp.square(out - yb)) / np.prod(yb.shape[1:-1], dtype=int)

  return [sum(float(chunk_error(w, x[i:i + batch_size], y[i:i + batch_size]))
              for i in range(0, x.shape[0], batch_size)) / x.shape[0] for w in weights]


# ---------------------------------------------------------------------------------------
# NNX models
# ---------------------------------------------------------------------------------------
#
# Capturing a layer's inputs and outputs: for the duration of a capture, the layer
# instance's class is swapped for a subclass whose __call__ calls the original and hands
# (input, output) to a hook registered for that instance. The hook records and may raise
# _StopForward, which ends the (eager) forward pass as soon as the layer has run, so
# collecting the inputs of layer k costs a forward pass through layers 1..k only. The
# swap uses object.__setattr__, so the module's NNX attribute bookkeeping is untouched,
# and it is undone in a finally clause.


class _StopForward(Exception):
  """Raised by a capture hook to end a forward pass early."""


_HOOKS: dict[int, Callable] = {}
# Calls of a copy of a hooked layer: a transform such as nnx.jit runs a copy of the model,
# whose layers keep the recording class but not the instance the hook is registered for.
_COPY_CALLS: list[str] = []


@functools.cache
def _recording_class(cls):
  def __call__(self, x, *args, **kwargs):
    out = cls.__call__(self, x, *args, **kwargs)
    hook = _HOOKS.get(id(self))
    if hook is not None:
      hook(x, out)
    else:
      _COPY_CALLS.append(cls.__name__)
    return out

  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                     "__qualname__": cls.__qualname__})


@contextlib.contextmanager
def _intercept(hooks: dict):
  """Within the context, every layer in ``hooks`` (layer -> hook(x, out)) reports its calls."""
  swapped = []
  try:
    for layer, hook in hooks.items():
      _HOOKS[id(layer)] = hook
      cls = type(layer)
      object.__setattr__(layer, "__class__", _recording_class(cls))
      swapped.append((layer, cls))
    yield
  finally:
    for layer, cls in swapped:
      object.__setattr__(layer, "__class__", cls)
      _HOOKS.pop(id(layer), None)


_EAGER_ONLY = (
    "adaround captures each layer's inputs and outputs during eager forward passes, so the"
    " model's __call__ (and the code it calls) must run eagerly: remove the nnx.jit /"
    " jax.jit decorator from the model's __call__ and jit the code that calls the model"
    " instead (a train step, an evaluation function)."
)


def _concrete(value, what: str):
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"the layer {what} is a traced value (the layer runs inside a jax/nnx"
                     f" transform such as jit). {_EAGER_ONLY}")
  return value


def _capture(model, layer, batches, *, output: bool, name: str = "the layer"):
  """The layer's inputs (or outputs) over the calibration batches, concatenated."""
  chunks = []

  def hook(x, out):
    chunks.append(_concrete(out if output else x, "output" if output else "input"))
    raise _StopForward

  with _intercept({layer: hook}):
    for batch in batches:
      del _COPY_CALLS[:]
      try:
        model(batch)
      except _StopForward:
        continue
      if _COPY_CALLS:
        raise ValueError(f"{name} ran inside a transform of the model's forward pass (e.g."
                         f" an nnx.jit-decorated __call__), on a copy of the model that"
                         f" adaround cannot observe. {_EAGER_ONLY}")
      raise ValueError(f"{name} was not called eagerly by the model's forward pass,"
                       " model(batch). If the model's __call__ (or the part that calls the"
                       f" layer) is wrapped in nnx.jit / jax.jit: {_EAGER_ONLY} Otherwise the"
                       " forward pass does not call this layer.")
  shapes = {tuple(chunk.shape[1:]) for chunk in chunks}
  if len(shapes) > 1:
    what = "outputs" if output else "inputs"
    raise ValueError(f"the {what} of {name} have different shapes across the calibration"
                     f" batches ({', '.join(str(shape) for shape in sorted(shapes))} per"
                     " example): give calibration batches of one shape.")
  return jnp.concatenate(chunks, axis=0)


def _call_order(model, layers, example):
  """The layers that one forward pass calls, in call order (first call of each)."""
  order = []

  def hook_for(layer):
    def hook(x, out):
      if all(layer is not seen for seen in order):
        order.append(layer)
    return hook

  with _intercept({layer: hook_for(layer) for layer in layers}):
    model(example)
  return order


def _calibration_list(calibration_batches) -> list:
  if calibration_batches is None:
    raise ValueError("`calibration_batches` is empty (None).")
  if isinstance(calibration_batches, (np.ndarray, jax.Array)):
    calibration_batches = [calibration_batches]
  batches = []
  for batch in calibration_batches:
    batch = batch[0] if isinstance(batch, (tuple, list)) else batch
    batch = jnp.asarray(batch)
    if batch.ndim == 0:
      raise ValueError("`calibration_batches` must yield arrays (N, ...) of model inputs.")
    if batch.shape[0]:
      batches.append(batch)
  if not batches:
    raise ValueError("`calibration_batches` is empty: AdaRound needs calibration inputs.")
  shapes = [tuple(batch.shape[1:]) for batch in batches]
  for index, shape in enumerate(shapes):
    if shape != shapes[0]:
      raise ValueError(
          f"the calibration batches must have one shape apart from their size: batch 0 has"
          f" examples of shape {shapes[0]}, batch {index} of shape {shape} (batch shapes"
          f" {tuple(batches[0].shape)} and {tuple(batches[index].shape)}). Layer inputs are"
          " concatenated over the batches, so resize or split them to one example shape.")
  return batches


def _check_model(model) -> list:
  if not isinstance(model, nnx.Module):
    raise ValueError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  layers = tq_nnx._quant_layers(model)
  if not layers:
    raise ValueError("the model has no trquant.nnx.QuantLinear / QuantConv layer to quantize.")
  return layers


def _path_name(path) -> str:
  return "/".join(map(str, path)) or "<root>"


def _fp_copy(model):
  """A clone in evaluation mode whose quantized layers use their kernels unquantized."""
  fp = nnx.clone(model)
  for _, layer in tq_nnx._quant_layers(fp):
    layer.kernel.set_metadata(bits=None)
  fp.eval()
  return fp


def _set_quantized(layer, *, bits: int, scale, kernel=None) -> None:
  """Makes `layer` quantize its kernel to `bits` with the frozen step size `scale`."""
  if kernel is not None:
    layer.kernel.set_value(jnp.asarray(kernel, layer.kernel.get_value().dtype))
  layer.kernel.set_metadata(bits=bits, signed=True, narrow=False)
  layer.weight_quantizer = "fixed"
  layer.per_channel = bool(np.size(scale) > 1)
  layer.weight_scale = nnx.data(tq_nnx.WeightScale(jnp.asarray(scale, jnp.float32)))


def _plan(model, batches, *, bits, per_channel, first_last_bits):
  """Validates; returns (fp copy, working copy, [(name, fp layer, work layer, bits, scale)])."""
  _check_model(model)
  _check_bits(bits, True)
  if first_last_bits is not None:
    _check_bits(first_last_bits, True, "first_last_bits")
  if not isinstance(per_channel, (bool, np.bool_)):
    raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}.")
  fp, work = _fp_copy(model), nnx.clone(model)
  work.eval()
  fp_layers = tq_nnx._quant_layers(fp)
  work_layers = dict(tq_nnx._quant_layers(work))
  names = {id(layer): path for path, layer in fp_layers}
  if batches is not None:
    order = _call_order(fp, [layer for _, layer in fp_layers], batches[0][:1])
    called = {id(layer) for layer in order}
    # Layers the forward pass never calls keep their tree order, after the called ones.
    order += [layer for _, layer in fp_layers if id(layer) not in called]
  else:
    order = [layer for _, layer in fp_layers]
  plan = []
  for index, fp_layer in enumerate(order):
    path = names[id(fp_layer)]
    edge = index == 0 or index == len(order) - 1
    layer_bits = first_last_bits if (edge and first_last_bits is not None) else bits
    kernel = fp_layer.kernel.get_value()
    scale = quantizers.init_scale(kernel, bits=layer_bits, method="mse",
                                  axis=-1 if per_channel else None)
    work_layer = work_layers[path]
    _set_quantized(work_layer, bits=layer_bits, scale=scale, kernel=kernel)
    plan.append((_path_name(path), fp_layer, work_layer, layer_bits, scale))
  return fp, work, plan


def _conv_patches_fn(layer):
  """``(w, x) -> layer(x)`` for a QuantConv with FP weights, as patches @ kernel.

  On XLA:CPU the kernel gradient of a convolution inside a loop (``lax.scan``) runs
  about 30x slower than outside one, while a matmul does not; this form keeps the
  fused loop fast there. Channels of ``conv_general_dilated_patches`` come
  input-channel-major, ``(C, kh, kw)``.
  """
  padding = layer._explicit_padding()
  groups = layer.feature_group_count
  bias = None if layer.bias is None else layer.bias.get_value()
  graphdef, state = nnx.split(layer)

  def apply_fn(w, x):
    x = nnx.merge(graphdef, state).quantize_input(x)
    dtype = layer.dtype or jnp.result_type(x, w)
    patches = jax.lax.conv_general_dilated_patches(
        x.astype(dtype), layer.kernel_size, layer.strides, padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    *spatial, group_in, out = w.shape
    kernel = jnp.moveaxis(w.astype(dtype), -2, 0).reshape(group_in * math.prod(spatial), groups,
                                                           out // groups)
    patches = patches.reshape(*patches.shape[:-1], groups, -1)
    y = jnp.einsum("...gk,kgo->...go", patches, kernel).reshape(*patches.shape[:-2], out)
    return y if bias is None else y + bias.astype(dtype)

  return apply_fn


def _layer_apply_fn(fp_layer):
  """``(w, x) -> fp_layer(x)`` with the kernel replaced by ``w`` (pure, differentiable)."""
  if type(fp_layer) is tq_nnx.QuantConv and jax.default_backend() == "cpu":
    return _conv_patches_fn(fp_layer)
  graphdef, kernel_state, rest = nnx.split(fp_layer, tq_nnx.QuantWeight, ...)

  def apply_fn(w, x):
    return nnx.merge(graphdef, jax.tree.map(lambda _: w, kernel_state), rest)(x)

  return apply_fn


def round_to_nearest(model, *, bits: int, per_channel: bool = False,
                     first_last_bits: Optional[int] = None, example_input=None,
                     return_info: bool = False):
  """Post-training round-to-nearest weight quantization with MSE step sizes (the baseline).

  Every :class:`trquant.nnx.QuantLinear` / :class:`trquant.nnx.QuantConv` of a
  copy of ``model`` gets ``bits``-bit weights with a frozen step size from
  ``trquant.init_scale(kernel, method="mse")`` (per-tensor, or per output
  channel), the same scales :func:`adaround_model` uses. Activations are left
  as the model has them; ``model`` itself is not modified.

  Args:
    model: an NNX model of trquant layers, e.g. the full-precision model
      (``weight_bits=None``); its kernels are taken as the float weights.
    bits: weight bit width in ``[2, 16]``.
    per_channel: one step size per output channel (last kernel axis).
    first_last_bits: bit width of the first and the last layer called by the
      forward pass (e.g. 8), or None for ``bits``. Needs ``example_input`` to
      find them.
    example_input: a batch of model inputs, used (one example) to find the
      forward order.
    return_info: also return per-layer :class:`LayerReport` records (errors
      are not measured here: NaN).

  Returns:
    The new quantized model, or ``(model, reports)`` with ``return_info``.

  Raises:
    ValueError: for bad bits, a model without trquant layer, or
      ``first_last_bits`` without ``example_input``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(trquant.nnx.QuantLinear(8, 4, weight_bits=None, rngs=nnx.Rngs(0)))
    >>> q = trquant.adaround.round_to_nearest(fp, bits=4)
    >>> q.layers[0].weight_bits, fp.layers[0].weight_bits
    (4, None)
  """
  batches = None
  if first_last_bits is not None:
    if example_input is None:
      raise ValueError("`first_last_bits` needs `example_input` to find the first and last layers"
                       " of the forward pass.")
  if example_input is not None:
    batches = _calibration_list(example_input)
  _, work, plan = _plan(model, batches, bits=bits, per_channel=per_channel,
                        first_last_bits=first_last_bits)
  if not return_info:
    return work
  return work, [LayerReport(name, layer_bits, 0.0, 0.0, math.nan, math.nan, 0.0)
                for name, _, _, layer_bits, _ in plan]


def adaround_model(model, calibration_batches, *, bits: int, per_channel: bool = False,
                   first_last_bits: Optional[int] = None, iters: int = 10_000,
                   batch_size: int = 32, lam: float = 0.01, lr: float = 1e-3,
                   warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
                   beta_mode: str = "cosine", activation: Optional[Callable] = None,
                   key, progress: bool = True, return_info: bool = False):
  """AdaRound post-training weight quantization of an NNX model, layer by layer.

  For every :class:`trquant.nnx.QuantLinear` / :class:`trquant.nnx.QuantConv`,
  in the order the forward pass calls them:

  1. the step size is ``trquant.init_scale(kernel, bits=..., method="mse")``
     (per-tensor, or per output channel with ``per_channel``);
  2. asymmetric reconstruction data: ``x_q`` is the layer's input in the new
     model, whose earlier layers are already rounded, ``y_fp`` the layer's
     output in the full-precision model, both over all calibration batches;
  3. :func:`reconstruct_layer` learns the rounding of the kernel, and the new
     model's layer gets the hard-rounded kernel and its frozen step size.

  The target is the layer's own output: for a conv followed by BatchNorm and
  ReLU, the pre-BatchNorm conv output, with no activation in the loss unless
  ``activation`` is given (applied to every layer's output). Layers are run in
  evaluation mode (BatchNorm running statistics). Activations stay as the model
  has them (AdaRound here is weight-only). Inputs and outputs are captured by
  swapping, for the duration of a capture, the layer instance's class for a
  subclass that reports its calls (see the module source), during eager forward
  passes stopped right after the layer: the model's ``__call__`` must run
  eagerly (not be wrapped in ``jax.jit`` / ``nnx.jit``).

  Args:
    model: an NNX model of trquant layers, typically the full-precision model
      (``weight_bits=None``, activations FP); its kernels are the float weights.
      It is not modified.
    calibration_batches: an array of model inputs ``(N, ...)``, or an iterable
      of such arrays (or of ``(inputs, labels)`` tuples), e.g. 1024 training
      images in batches of 256.
    bits: weight bit width in ``[2, 16]``.
    per_channel: one step size per output channel (last kernel axis).
    first_last_bits: bit width of the first and last layer called (e.g. 8), or
      None for ``bits``.
    iters, batch_size, lam, lr, warmup, beta, beta_mode, activation: as
      :func:`reconstruct_layer`.
    key: a jax PRNG key; layer ``i`` uses ``fold_in(key, i)``.
    progress: show a tqdm progress bar over the layers (if tqdm is installed).
    return_info: also return per-layer :class:`LayerReport` records.

  Returns:
    A new model of the same structure whose quantized layers hold the AdaRound
    weights (kernel ``= scale * codes``, ``weight_bits`` and a frozen
    :class:`trquant.nnx.WeightScale` set), so its forward pass uses them; or
    ``(model, reports)`` with ``return_info``.

  Raises:
    ValueError: for bad bits, a model without trquant layer, empty calibration
      data or calibration batches of different example shapes, a model whose
      layers do not run eagerly (an ``nnx.jit``-decorated ``__call__``),
      ``iters < 1`` or other bad hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> from flax import nnx
    >>> fp = nnx.Sequential(trquant.nnx.QuantLinear(8, 16, weight_bits=None, rngs=nnx.Rngs(0)),
    ...                     nnx.relu,
    ...                     trquant.nnx.QuantLinear(16, 4, weight_bits=None, rngs=nnx.Rngs(1)))
    >>> x = jax.random.normal(jax.random.key(0), (64, 8))
    >>> q = trquant.adaround.adaround_model(fp, x, bits=3, iters=50, key=jax.random.key(1),
    ...                                     progress=False)
    >>> [layer.weight_bits for layer in (q.layers[0], q.layers[2])]
    [3, 3]
  """
  batches = _calibration_list(calibration_batches)
  # Validate the hyper-parameters before any work (reconstruct_layer checks them again).
  _check_loop_args(iters=iters, batch_size=batch_size, lam=lam, lr=lr, warmup=warmup, beta=beta,
                   beta_mode=beta_mode)
  fp, work, plan = _plan(model, batches, bits=bits, per_channel=per_channel,
                         first_last_bits=first_last_bits)
  bar = None
  if progress:
    try:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(plan), desc="adaround", leave=False)
    except ImportError:  # tqdm is an optional dependency
      bar = None
  reports = []
  try:
    for index, (name, fp_layer, work_layer, layer_bits, scale) in enumerate(plan):
      if bar is not None:
        bar.set_postfix_str(name)
      start = time.perf_counter()
      x_q = _capture(work, work_layer, batches, output=False, name=f"layer {name}")
      y_fp = _capture(fp, fp_layer, batches, output=True, name=f"layer {name}")
      captured = time.perf_counter()
      apply_fn = _layer_apply_fn(fp_layer)
      kernel = fp_layer.kernel.get_value()
      result = reconstruct_layer(apply_fn, kernel, scale, x_q, y_fp, bits=layer_bits,
                                 iters=iters, batch_size=batch_size, lam=lam, lr=lr,
                                 warmup=warmup, beta=beta, beta_mode=beta_mode,
                                 activation=activation, key=jax.random.fold_in(key, index))
      jax.block_until_ready(result.weight)
      done = time.perf_counter()
      work_layer.kernel.set_value(result.weight)
      nearest_codes = quantizers.quantize(kernel, scale, bits=layer_bits)
      nearest = quantizers.dequantize(nearest_codes, scale)
      nearest_error, adaround_error = _errors(apply_fn, [nearest, result.weight], x_q, y_fp,
                                              activation=activation)
      reports.append(LayerReport(name, layer_bits, captured - start, done - captured,
                                 nearest_error, adaround_error,
                                 float(jnp.mean(result.codes != nearest_codes))))
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()
  return (work, reports) if return_info else work
