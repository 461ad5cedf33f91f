"""The optimisation hyper-parameters of AdaRound / BRECQ / QDrop, validated once.

:class:`AdaRoundConfig` holds everything that says *how* a rounding is learned (steps,
mini-batch, regulariser, learning rates, annealing, the stretch of ``h``, QDrop's
probability, how the loop runs), with the defaults of the AdaRound paper (Nagel et al.
2020) and BRECQ's activation learning rate. Every function of :mod:`trquant.adaround`
takes one as ``config=``; what is being quantized (bit widths, per-channel scales, which
units, the forward function) stays in keyword arguments.

Its fields are checked with ``trquant._src.checks``, the package's one set of argument
checks, plus :func:`check_stretch` for the stretch of ``h``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


from trquant._src import checks
from trquant._src.adaround import loop as loops

__all__ = ["AdaRoundConfig", "BETA_MODES", "GAMMA", "ZETA", "check_config", "check_stretch"]

ZETA = 1.1
GAMMA = -0.1
BETA_MODES = ("cosine", "linear")
# The regulariser is off for the first 20% of the steps (AdaRound, BRECQ, QDrop).
DEFAULT_WARMUP_FRACTION = 0.2


def check_stretch(zeta, gamma) -> tuple[float, float]:
  """The stretch ``(zeta, gamma)`` of the rectified sigmoid: ``gamma <= 0``, ``zeta >= 1``."""
  if not checks.is_number(zeta) or not checks.is_number(gamma) or not (float(gamma) <= 0.0 < 1.0 <= float(zeta)):
    raise ValueError(f"need `gamma` <= 0 and `zeta` >= 1 so that h(V) reaches 0 and 1; got"
                     f" zeta={zeta!r}, gamma={gamma!r}.")
  return float(zeta), float(gamma)


@dataclasses.dataclass(frozen=True)
class AdaRoundConfig:
  """How AdaRound (and BRECQ / QDrop) learns a rounding: the optimisation hyper-parameters.

  Frozen, hashable and validated at construction: a bad value raises a ``ValueError``
  naming the field and its allowed range. Change fields with :meth:`replace` (or
  ``dataclasses.replace``). The defaults are the AdaRound paper's (10k Adam steps of
  batch 32 at lr 1e-3 on ``V``, ``lambda = 0.01``, 20% warm-up, ``beta`` 20 -> 2 cosine,
  ``zeta = 1.1``, ``gamma = -0.1``) and BRECQ's activation step-size learning rate.

  Attributes:
    iters: Adam steps per layer / unit, ``>= 1`` (the paper: 10k; BRECQ 20k).
    batch_size: examples per step, ``>= 1``, drawn with replacement.
    lam: weight of the rounding regulariser, ``>= 0`` (0.01; BRECQ 0.1 for MobileNetV2).
    lr: Adam learning rate of the rounding variables ``V``, ``> 0``.
    act_lr: Adam learning rate of the activation step sizes in block reconstruction
      (BRECQ: 4e-5), ``> 0``; unused where no activation is quantized.
    warmup_steps: steps without regulariser, in ``[0, iters)``; None for the paper's
      20% of ``iters`` (:attr:`start_step`).
    beta: ``(start, end)`` of the regulariser's annealed exponent, both ``> 0``.
    beta_mode: ``"cosine"`` (AIMET) or ``"linear"`` (BRECQ, QDrop).
    zeta, gamma: the stretch of :func:`trquant.adaround.rectified_sigmoid`,
      ``zeta >= 1``, ``gamma <= 0``.
    drop_prob: QDrop's probability in ``[0, 1)`` of using the full-precision value in
      place of a quantized input while learning (0.5 in the paper); 0 is BRECQ /
      AdaRound. Needs full-precision inputs (``x_fp`` / ``act_bits``).
    loop: how the iterations run: ``"auto"``, ``"scan"`` or ``"steps"`` (see
      :mod:`trquant._src.adaround.loop`; same result up to float summation order).

  Example:
    >>> import trquant
    >>> config = trquant.adaround.AdaRoundConfig(iters=2000, lr=1e-2)
    >>> config.replace(beta_mode="linear").beta_mode, config.batch_size
    ('linear', 32)
    >>> config.start_step  # the default warm-up: 20% of the steps
    400
    >>> trquant.adaround.AdaRoundConfig(iters=100, warmup_steps=100)
    Traceback (most recent call last):
    ...
    ValueError: AdaRoundConfig: `warmup_steps` (100) must be below `iters` (100): the schedule starts after the warm-up.
  """

  iters: int = 10_000
  batch_size: int = 32
  lam: float = 0.01
  lr: float = 1e-3
  act_lr: float = 4e-5
  warmup_steps: Optional[int] = None
  beta: tuple[float, float] = (20.0, 2.0)
  beta_mode: str = "cosine"
  zeta: float = ZETA
  gamma: float = GAMMA
  drop_prob: float = 0.0
  loop: str = "auto"

  def __post_init__(self):
    try:
      checked = dict(
          iters=checks.check_int("iters", self.iters, 1),
          batch_size=checks.check_int("batch_size", self.batch_size, 1),
          lam=checks.check_positive("lam", self.lam, allow_zero=True),
          lr=checks.check_positive("lr", self.lr),
          act_lr=checks.check_positive("act_lr", self.act_lr),
          warmup_steps=(None if self.warmup_steps is None else checks.check_warmup_steps(
              self.warmup_steps, checks.check_int("iters", self.iters, 1),
              default_fraction=DEFAULT_WARMUP_FRACTION, total_name="iters")),
      )
      beta = self.beta
      if not isinstance(beta, (tuple, list)) or len(beta) != 2:
        raise ValueError(f"`beta` must be a pair (start, end) of positive numbers, got {beta!r}.")
      checked["beta"] = (checks.check_positive("beta[0]", beta[0]), checks.check_positive("beta[1]", beta[1]))
      if not isinstance(self.beta_mode, str) or self.beta_mode not in BETA_MODES:
        raise ValueError(f"`beta_mode` must be one of {BETA_MODES}, got {self.beta_mode!r}.")
      checked["zeta"], checked["gamma"] = check_stretch(self.zeta, self.gamma)
      drop_prob = self.drop_prob
      if not checks.is_number(drop_prob) or not 0.0 <= float(drop_prob) < 1.0:
        raise ValueError(f"`drop_prob` must be a number in [0, 1), got {drop_prob!r}.")
      checked["drop_prob"] = float(drop_prob)
      loops.check_loop(self.loop)
    except ValueError as error:
      raise ValueError(f"AdaRoundConfig: {error}") from None
    for name, value in checked.items():  # plain Python numbers: hashable, no array leaks
      object.__setattr__(self, name, value)

  @property
  def start_step(self) -> int:
    """The first step with the regulariser on: ``warmup_steps``, or 20% of ``iters``."""
    return int(checks.check_warmup_steps(self.warmup_steps, self.iters,  # concrete: an int
                                         default_fraction=DEFAULT_WARMUP_FRACTION,
                                         total_name="iters"))

  def replace(self, **changes) -> "AdaRoundConfig":
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)


def check_config(config) -> AdaRoundConfig:
  """``config`` itself when it is an :class:`AdaRoundConfig`, else a ValueError saying so."""
  if not isinstance(config, AdaRoundConfig):
    hint = (" Pass the hyper-parameters as config=trquant.adaround.AdaRoundConfig(...)"
            if isinstance(config, dict) else "")
    raise ValueError(f"`config` must be a trquant.adaround.AdaRoundConfig, got"
                     f" {type(config).__name__}.{hint}")
  return config
