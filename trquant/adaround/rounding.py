"""AdaRound's algorithm on arrays: the rounding relaxation and layer-wise reconstruction.

Pure functions of weights, scales and calibration arrays, with no model in sight;
:mod:`trquant.adaround.model` drives them over an NNX model.

* :func:`rectified_sigmoid`, :func:`init_alpha`, :func:`rounding_regularizer`,
  :func:`beta_schedule`, :func:`soft_weight`, :func:`hard_codes`: the pieces.
* :func:`reconstruct_layer`: AdaRound of one layer, given ``apply_fn(w, x)`` and
  calibration inputs / targets, in one jitted ``lax.scan``;
  :func:`reconstruction_problem` validates the same arguments and returns the
  :class:`Reconstruction` (pure ``init`` / ``step`` / ``run`` / ``finish``) and its
  arrays, for callers that drive the loop themselves.
* :func:`reconstruction_error` / :func:`reconstruction_errors`: the output error of
  given weights; :func:`weight_grid` and :func:`check_loop_args`: the argument checks
  the model driver shares.

References:
  Nagel, Amjad, van Baalen, Louizos, Blankevoort, `Up or Down? Adaptive Rounding
  for Post-Training Quantization <https://arxiv.org/abs/2004.10568>`_, ICML 2020.
  Li et al., `BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction <https://arxiv.org/abs/2102.05426>`_, ICLR 2021 (linear beta decay).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trquant import checks
from trquant import quantizers
from trquant.adaround import loop as loops

__all__ = [
    "AdaRoundResult",
    "BETA_MODES",
    "GAMMA",
    "Reconstruction",
    "ZETA",
    "beta_schedule",
    "check_loop_args",
    "hard_codes",
    "init_alpha",
    "reconstruct_layer",
    "reconstruction_error",
    "reconstruction_errors",
    "reconstruction_problem",
    "rectified_sigmoid",
    "rounding_regularizer",
    "soft_weight",
    "weight_grid",
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


def weight_grid(bits, signed: bool, name: str = "bits") -> tuple[int, int]:
  """The integer grid ``(lo, hi)`` of a bit width that AdaRound can round to.

  Raises:
    ValueError: for a bit width outside ``[1, 16]``, or 1 on a signed grid (binary
      weights, ``sign(w)``, leave no rounding choice to learn).
  """
  checks.check_bits(bits, name)
  if signed and bits == 1:
    raise ValueError(f"`{name}`=1 (signed) is binary quantization, sign(w): it has no rounding"
                     " choice for AdaRound to learn; use bits >= 2.")
  return quantizers.quant_range(bits, signed=bool(signed))


def _check_scale(w, scale) -> np.ndarray:
  """Validates a concrete scale (positive, finite, broadcasting to w); returns it as numpy."""
  checks.check_scale(w, scale)
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
  checks.check_scale(w, scale)
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
  lo, hi = weight_grid(bits, signed)
  checks.check_scale(w, scale)
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
  lo, hi = weight_grid(bits, signed)
  checks.check_scale(w, scale)
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
class Reconstruction:
  """One AdaRound problem: pure ``init`` / ``step`` functions over explicit arrays.

  Made by :func:`reconstruction_problem`. :func:`reconstruct_layer` scans ``step``
  inside one ``jax.jit``; the ``adaround`` benchmark also runs it eagerly (a Python
  loop over a jitted ``step``) to measure what the fused loop saves.
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


def check_loop_args(*, iters, batch_size, lam, lr, warmup, beta, beta_mode):
  """Validates the loop's hyper-parameters (as :func:`reconstruct_layer` takes them).

  Returns:
    ``(iters, batch_size, lam, lr, warmup, beta)`` as Python numbers.

  Raises:
    ValueError: naming the first bad argument.
  """
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


def reconstruction_problem(apply_fn, w, scale, x_q, y_fp, *, bits, signed, iters, batch_size,
                           lam, lr, warmup, beta, beta_mode, activation, zeta, gamma, key):
  """Validates :func:`reconstruct_layer`'s arguments (all required here).

  Returns:
    ``(problem, (w, scale, x_q, y_fp, key))``: the :class:`Reconstruction` and its
    arrays, cast to ``w``'s dtype. ``problem.run(*arrays)`` is the loop that
    :func:`reconstruct_layer` jits, ``problem.step`` one iteration of it.

  Raises:
    ValueError: as :func:`reconstruct_layer`.
  """
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be a callable (w, x) -> output, got {apply_fn!r}.")
  lo, hi = weight_grid(bits, signed)
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
  iters, batch_size, lam, lr, warmup, beta = check_loop_args(
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
  problem = Reconstruction(apply_fn, lo, hi, iters, batch_size, lam, lr, warmup, beta,
                            beta_mode, activation, zeta, gamma)
  return problem, (w, scale, x_q.astype(w.dtype), y_fp.astype(w.dtype), key)


def reconstruct_layer(apply_fn: Callable, w, scale, x_q, y_fp, *, bits: int, signed: bool = True,
                      iters: int = 10_000, batch_size: int = 32, lam: float = 0.01,
                      lr: float = 1e-3, warmup: float = 0.2,
                      beta: tuple[float, float] = (20.0, 2.0), beta_mode: str = "cosine",
                      activation: Optional[Callable] = None, zeta: float = ZETA,
                      gamma: float = GAMMA, key, loop: str = "auto") -> AdaRoundResult:
  """AdaRound of one layer: learns to round ``w`` up or down to reconstruct its output.

  Minimises, with Adam on the rounding variables ``V`` only (initialised by
  :func:`init_alpha`), ``||f_a(apply_fn(W_soft, x)) - f_a(y)||^2`` (summed over
  the last axis, averaged over the others) on mini-batches ``(x, y)`` drawn
  with replacement from ``(x_q, y_fp)``, plus ``lam`` times
  :func:`rounding_regularizer` from step ``ceil(warmup * iters)`` on, with
  ``beta`` annealed by :func:`beta_schedule`. The loop is one jitted ``lax.scan``
  (no Python per iteration), or on CPU, for a layer with a convolution, a Python
  loop over one jitted step (``loop``, see :mod:`trquant.adaround.loop`). Mini-batch
  ``t`` is drawn from ``fold_in(key, t)``, so a key gives the same result on every call.

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
    loop: ``"auto"``, ``"scan"`` or ``"steps"``: how the iterations run (same
      result up to float summation order); ``"auto"`` picks the faster one.

  Returns:
    An :class:`AdaRoundResult`: ``codes = clip(floor(w / scale) + [V >= 0], lo, hi)``,
    ``weight = scale * codes``, ``V`` and the per-step losses.

  Raises:
    ValueError: for bad bits, a non-positive or non-broadcasting scale, empty or
      mismatched calibration arrays, ``apply_fn`` outputs that do not match
      ``y_fp``, ``iters < 1``, an unknown ``loop`` or other bad hyper-parameters.

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
  loops.check_loop(loop)
  problem, arrays = reconstruction_problem(
      apply_fn, w, scale, x_q, y_fp, bits=bits, signed=signed, iters=iters,
      batch_size=batch_size, lam=lam, lr=lr, warmup=warmup, beta=beta, beta_mode=beta_mode,
      activation=activation, zeta=zeta, gamma=gamma, key=key)
  if loops.resolve_loop(loop, apply_fn, arrays[0], arrays[2][:1]) == "scan":
    V, reconstruction, regularization = _run(problem, *arrays)
  else:
    (V, _), (reconstruction, regularization) = loops.run_steps(problem, arrays[:2], arrays)
  codes, weight = loops.finish(problem, arrays[0], arrays[1], V)
  return AdaRoundResult(codes, weight, V, reconstruction, regularization)


@functools.partial(jax.jit, static_argnums=0)
def _run(problem: Reconstruction, w, scale, x, y, key):
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
  return reconstruction_errors(apply_fn, [w], x, y, activation=activation, batch_size=batch_size)[0]


def reconstruction_errors(apply_fn, weights, x, y, *, activation=None,
                          batch_size=256) -> list[float]:
  """:func:`reconstruction_error` of each of several weights, compiling the evaluation once."""
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
