"""AdaRound's rounding relaxation on arrays: the pieces of the reconstruction problem.

Pure functions of weights, step sizes and rounding variables ``V``, with no model or data
in sight; :mod:`trquant._src.adaround.reconstruction` optimises them, :mod:`trquant._src.adaround.drivers`
drives that over an NNX model.

* :func:`rectified_sigmoid`, :func:`init_alpha`, :func:`rounding_regularizer`,
  :func:`beta_schedule`, :func:`soft_weight`, :func:`hard_codes`: the pieces;
* :func:`weight_grid`: the integer grid of a bit width, checked.

References:
  Nagel, Amjad, van Baalen, Louizos, Blankevoort, `Up or Down? Adaptive Rounding
  for Post-Training Quantization <https://arxiv.org/abs/2004.10568>`_, ICML 2020.
  Li et al., `BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction <https://arxiv.org/abs/2102.05426>`_, ICLR 2021 (linear beta decay).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from trquant._src import checks
from trquant._src import quantizers
from trquant._src.adaround.config import BETA_MODES
from trquant._src.adaround.config import DEFAULT_WARMUP_FRACTION
from trquant._src.adaround.config import GAMMA
from trquant._src.adaround.config import ZETA
from trquant._src.adaround.config import check_stretch

__all__ = [
    "beta_schedule",
    "hard_codes",
    "hard_codes_on_grid",
    "init_alpha",
    "regularizer_of_h",
    "rectified_sigmoid",
    "relaxed_rounding",
    "rounding_regularizer",
    "soft_weight",
    "soft_weight_from_h",
    "weight_grid",
]

# V is initialised from a probability clipped into [_EPS, 1 - _EPS], so that fractional parts
# of exactly 0 (or h's end points for zeta = 1, gamma = 0) give a finite V.
_EPS = 1e-6


def weight_grid(bits, signed: bool, name: str = "weight_bits") -> tuple[int, int]:
  """The integer grid ``(lo, hi)`` of a bit width that AdaRound can round to.

  Raises:
    ValueError: for a bit width outside ``[1, 16]``, or 1 on a signed grid (binary
      weights, ``sign(w)``, leave no rounding choice to learn).
  """
  checks.check_bits(bits, name)
  if signed and bits == 1:
    raise ValueError(f"`{name}`=1 (signed) is binary quantization, sign(w): it has no rounding"
                     f" choice for AdaRound to learn; use {name} >= 2.")
  return quantizers.quant_range(bits, signed=bool(signed))


# ---------------------------------------------------------------------------------------
# The rounding relaxation
# ---------------------------------------------------------------------------------------


def rectified_sigmoid(V: ArrayLike, zeta: float = ZETA, gamma: float = GAMMA) -> jax.Array:
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
  zeta, gamma = check_stretch(zeta, gamma)
  V = jnp.asarray(V)
  if not jnp.issubdtype(V.dtype, jnp.floating):
    V = V.astype(jnp.float32)
  return relaxed_rounding(V, zeta, gamma)


# The unchecked forms below are what the reconstruction loss and its final rounding run on
# traced values; the public functions validate, then call them.


def relaxed_rounding(V, zeta: float, gamma: float):
  """:func:`rectified_sigmoid` unchecked."""
  return jnp.clip(jax.nn.sigmoid(V) * (zeta - gamma) + gamma, 0.0, 1.0)


def soft_weight_from_h(w, scale, h, grid: tuple[int, int]):
  """``scale * clip(floor(w / scale) + h, lo, hi)``: :func:`soft_weight` of a given ``h``,
  unchecked (``scale`` float32)."""
  lo, hi = grid
  return scale * jnp.clip(jnp.floor(jnp.asarray(w, jnp.float32) / scale) + h, lo, hi)


def hard_codes_on_grid(w, scale, V, grid: tuple[int, int]):
  """:func:`hard_codes` unchecked (``scale`` float32)."""
  lo, hi = grid
  return jnp.clip(jnp.floor(jnp.asarray(w, jnp.float32) / scale) + (jnp.asarray(V) >= 0), lo, hi)


def init_alpha(w: ArrayLike, scale: ArrayLike, *, zeta: float = ZETA,
               gamma: float = GAMMA) -> jax.Array:
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
  zeta, gamma = check_stretch(zeta, gamma)
  checks.check_scale(w, scale)
  v = jnp.asarray(w, jnp.float32) / jnp.asarray(scale, jnp.float32)
  rest = v - jnp.floor(v)
  probability = jnp.clip((rest - gamma) / (zeta - gamma), _EPS, 1.0 - _EPS)
  return jnp.log(probability) - jnp.log1p(-probability)


def soft_weight(w: ArrayLike, scale: ArrayLike, V: ArrayLike, *, weight_bits: int,
                signed: bool = True, zeta: float = ZETA, gamma: float = GAMMA) -> jax.Array:
  """The relaxed quantized weight ``scale * clip(floor(w / scale) + h(V), lo, hi)``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> w = jnp.array([0.3, -0.7])
    >>> trquant.adaround.soft_weight(w, 0.5, trquant.adaround.init_alpha(w, 0.5), weight_bits=4)
    Array([ 0.3, -0.7], dtype=float32)
  """
  grid = weight_grid(weight_bits, signed)
  checks.check_scale(w, scale)
  return soft_weight_from_h(w, jnp.asarray(scale, jnp.float32),
                            rectified_sigmoid(V, zeta, gamma), grid)


def hard_codes(w: ArrayLike, scale: ArrayLike, V: ArrayLike, *, weight_bits: int,
               signed: bool = True) -> jax.Array:
  """AdaRound's final codes ``clip(floor(w / scale) + [V >= 0], lo, hi)`` (float32).

  ``V >= 0`` is ``h(V) >= 0.5`` for the default stretch (``zeta + gamma = 1``).

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.adaround.hard_codes(jnp.array([0.3, 0.3, 9.0]), 0.5, jnp.array([-1.0, 2.0, 5.0]),
    ...                             weight_bits=2)
    Array([0., 1., 1.], dtype=float32)
  """
  grid = weight_grid(weight_bits, signed)
  checks.check_scale(w, scale)
  return hard_codes_on_grid(w, jnp.asarray(scale, jnp.float32), V, grid)


def rounding_regularizer(V: ArrayLike, beta: Union[float, jax.Array], *, zeta: float = ZETA,
                         gamma: float = GAMMA) -> jax.Array:
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
  if checks.is_number(beta) and not float(beta) > 0:
    raise ValueError(f"`beta` must be positive, got {beta!r}.")
  return regularizer_of_h(rectified_sigmoid(V, zeta, gamma), beta)


def regularizer_of_h(h, beta):
  """:func:`rounding_regularizer` of ``h = rectified_sigmoid(V)`` (unchecked: used inside the loss)."""
  return jnp.sum(1.0 - jnp.abs(2.0 * h - 1.0) ** beta).astype(jnp.float32)


def beta_schedule(iters: int, *, start: float = 20.0, end: float = 2.0,
                  warmup_steps: Optional[int] = None, mode: str = "cosine") -> optax.Schedule:
  """The annealing of the regulariser's exponent ``beta`` over ``iters`` iterations.

  Args:
    iters: number of iterations (positive).
    start: ``beta`` when the regulariser switches on (positive; 20 in the paper).
    end: ``beta`` at step ``iters`` (positive; 2 in the paper).
    warmup_steps: iterations without regulariser, in ``[0, iters)``: the annealing
      starts there; None for 20% of ``iters``.
    mode: ``"cosine"`` (AIMET) or ``"linear"`` (BRECQ, QDrop).

  Returns:
    A schedule ``step -> beta`` (float32): ``start`` up to the end of the
    warm-up, then cosine or linear to ``end`` at step ``iters``, constant after.

  Raises:
    ValueError: for a bad ``iters``, ``start``, ``end``, ``warmup_steps`` or ``mode``.

  Example:
    >>> import trquant
    >>> schedule = trquant.adaround.beta_schedule(1000)
    >>> [round(float(schedule(s)), 2) for s in (0, 200, 600, 1000)]
    [20.0, 20.0, 11.0, 2.0]
  """
  iters = checks.check_int("iters", iters, 1)
  start = checks.check_positive("start", start)
  end = checks.check_positive("end", end)
  start_step = checks.check_warmup_steps(warmup_steps, iters,
                                         default_fraction=DEFAULT_WARMUP_FRACTION,
                                         total_name="iters")
  if mode not in BETA_MODES:
    raise ValueError(f"`mode` must be one of {BETA_MODES}, got {mode!r}.")
  span = max(iters - start_step, 1)
  if mode == "cosine":
    anneal = optax.cosine_decay_schedule(start, span, alpha=end / start)
  else:
    anneal = optax.linear_schedule(start, end, span)
  annealed = optax.join_schedules([optax.constant_schedule(start), anneal], [start_step])
  return lambda step: jnp.asarray(annealed(step), jnp.float32)
