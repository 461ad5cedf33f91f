"""Transition-rate (TR) scheduling: a transition-adaptive learning rate (TALR) as an optax transform.

Chained after an optimizer, :func:`tr_schedule` rescales the optimizer's final
step of each quantized weight tensor by a dimensionless multiplier ``u`` so that
the running fraction of quantized weights that change level per step (the
transition rate) follows a target schedule.

References:
  Lee, Jeon, Kim, Ham, `Scheduling Weight Transitions for Quantization-Aware
  Training <https://arxiv.org/abs/2404.19248>`_, ICCV 2025.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trquant import codes_tree

CodesFn = Callable[[Any], Any]
# (multiplier u, target R_t, running TR K_{t-1}, gain eta, previous target R_{t-1}) -> new u
Controller = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

_NO_PARAMS_MSG = (
    "tr_schedule needs the current parameters to count transitions: call"
    " `tx.update(updates, state, params)`. optax.chain, optax.partition and"
    " nnx.Optimizer pass them for you."
)


class TransitionRateState(NamedTuple):
  """State of :func:`tr_schedule`.

  Per-group vectors have one entry per quantized leaf of ``codes_fn(params)``
  in tree-flatten order (``per_layer=True``), or a single entry for all
  quantized weights together (``per_layer=False``). No copy of the weights or
  of their codes is kept.
  """

  tr_step: jax.Array  # shape=(), int32: number of updates seen
  target_transition_rate: jax.Array  # shape=(), float32: target R used at the last step
  measured_transition_rate: jax.Array  # shape=(groups,), float32: k of the last applied update
  running_transition_rate: jax.Array  # shape=(groups,), float32: running TR K (EMA of k)
  talr_multiplier: jax.Array  # shape=(groups,), float32: TALR multiplier u applied at the last step
  # shape=(), float32: R_0 of the target. With a MeasuredTarget: 0 until its measuring window,
  # then the mean transition rate measured so far, fixed from the end of the warm-up.
  initial_target_rate: jax.Array
  # shape=(), int32: the step at which the warm-up of a MeasuredTarget ends (0 without one).
  # While the warm-up waits for the rate to settle it holds the latest step it may end at.
  warmup_end_step: jax.Array
  # shape=(2,), float32: sum and count of the count-weighted rate in the current measuring
  # window of a settling warm-up.
  warmup_window: jax.Array
  # shape=(), float32: mean rate of the previous measuring window (0 before the first).
  warmup_previous_rate: jax.Array
  # shape=(groups,), float32: the highest multiplier the windup guard allows (max_scale, or
  # inf, until the guard finds the rate no longer responds to a rising multiplier).
  multiplier_ceiling: jax.Array
  # shape=(groups,), float32: multiplier at the start of the guard's current window.
  guard_start_multiplier: jax.Array
  # shape=(groups,), float32: K / R at the start of the guard's current window (0 before it).
  guard_start_tracking: jax.Array
  # shape=(groups,), float32: running fraction (EMA, momentum m) of quantized weights whose
  # incoming update is below 1% of the layer's RMS update: weights that have stopped, e.g.
  # beyond the grid, where the straight-through gradient is 0.
  stalled_fraction: jax.Array
  # shape=(groups,), float32: stalled_fraction at the start of the guard's current window.
  guard_start_stalled: jax.Array
  # shape=(groups,), int32: how often the guard lowered the ceiling. Non-zero means the target
  # was out of reach of this optimizer: the rate stopped responding to a larger multiplier.
  windup_events: jax.Array


# ---------------------------------------------------------------------------------------
# Controllers: (u, R_t, K_{t-1}, eta, R_{t-1}) -> new multiplier, on float32 vectors.
# ---------------------------------------------------------------------------------------


def _additive(u, target, running, eta, previous_target):
  del previous_target
  # TR paper Eq. 11 in units of the initial LR: U/U_0 += (eta_abs/U_0) * (R - K).
  return jnp.maximum(u + eta * (target - running), 0.0)


def _momentum(u, target, running, eta, previous_target):
  del previous_target
  # Public reference code: u = m*u + (1-m)*u*R/K with m = 1 - eta. K = 0 (nothing
  # moves) would divide by zero; the ratio is capped instead, see max_scale.
  ratio = target / jnp.maximum(running, jnp.finfo(jnp.float32).tiny)
  return u * (1.0 - eta) + eta * u * jnp.minimum(ratio, 1e6)


def _log(u, target, running, eta, previous_target):
  # Scale-free: the relative error moves log(u) by at most eta per step. With a
  # zero target every transition counts as the full error -1.
  safe_target = jnp.where(target > 0, target, 1.0)
  rel_error = jnp.where(target > 0, (target - running) / safe_target, -(running > 0).astype(jnp.float32))
  # Feed-forward: the rate scales about linearly with the step size, so a target
  # that moves by a factor moves u by the same factor (bounded per step).
  ratio = jnp.where(previous_target > 0, target / jnp.where(previous_target > 0, previous_target, 1.0), 1.0)
  return u * jnp.clip(ratio, 0.5, 2.0) * jnp.exp(eta * jnp.clip(rel_error, -1.0, 1.0))


CONTROLLERS = {"log": _log, "additive": _additive, "momentum": _momentum}
DEFAULT_ETA = {"log": 0.005, "additive": 1.0, "momentum": 0.01}


def _validate_positive(name: str, value, allow_zero: bool = False):
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a number, got {value!r}.")
  if isinstance(value, numbers.Number):
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
      bound = "non-negative" if allow_zero else "positive"
      raise ValueError(f"`{name}` must be {bound} and finite, got {value!r}.")


DECAYS = ("cosine", "linear", "constant")


def _decay_factor(decay, progress):
  """Factor in [0, 1] of the decay shape at progress in [0, 1]."""
  if callable(decay):
    return jnp.asarray(decay(progress), jnp.float32)
  if decay == "cosine":
    return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  if decay == "linear":
    return 1.0 - progress
  return jnp.ones_like(progress)


class MeasuredTarget(NamedTuple):
  """A target transition rate whose R_0 is measured from the optimizer itself.

  Build it with :func:`measured_target` and pass it as ``target_tr`` of
  :func:`tr_schedule`.
  """

  total_steps: int
  warmup_steps: Optional[int]  # None: the warm-up ends when the rate has settled
  decay: Union[str, Callable[[jax.Array], jax.Array]]
  fraction: float
  window_steps: int  # measuring window of a settling warm-up
  max_warmup_steps: int  # the latest a settling warm-up ends
  settle_tolerance: float  # settled: two successive windows within this relative change


def measured_target(
    total_steps: int,
    *,
    warmup_steps: Optional[int] = None,
    decay: Union[str, Callable[[jax.Array], jax.Array]] = "cosine",
    fraction: float = 1.0,
    window_steps: Optional[int] = None,
    max_warmup_steps: Optional[int] = None,
    settle_tolerance: float = 0.1,
) -> MeasuredTarget:
  r"""A target transition rate with no R_0 to tune: measured, then decayed to 0.

  Passed as ``target_tr`` of :func:`tr_schedule`. During a warm-up the transform
  applies the optimizer's own step (the multiplier stays at ``init_scale``) and
  measures the transition rate it causes, count-weighted over the quantized
  layers. Right after an FP checkpoint is quantized the first steps flip many
  weights at once, and the rate then falls for a few hundred steps before it
  settles (2-5x on a small BN CNN), so by default the warm-up waits for it:

  * ``warmup_steps=None`` (default, settling warm-up): the rate is averaged over
    windows of ``window_steps`` updates; the warm-up ends after the first window
    whose mean is within ``settle_tolerance`` (relative) of the previous
    window's, or after ``max_warmup_steps``, and R_0 is ``fraction`` times that
    last window's mean.
  * ``warmup_steps=n``: a fixed warm-up of ``n`` updates; R_0 is ``fraction``
    times the mean rate of its second half.

  From the end of the warm-up ``e`` on, the target is ``R_0 * decay(p)`` with
  ``p = (t - e) / (total_steps - e)`` clipped to ``[0, 1]``, and the controller
  makes the running rate follow it. The count comes from the transform's own pass
  over the codes: nothing extra is computed. The state's ``initial_target_rate``
  holds the R_0 measured, ``warmup_end_step`` the step the warm-up ended at.

  Args:
    total_steps: the number of updates of the run.
    warmup_steps: a fixed warm-up (>= 2, < total_steps), or None to wait until the
      rate has settled.
    decay: ``"cosine"`` (default), ``"linear"``, ``"constant"``, or a jit-traceable
      callable ``progress -> factor`` on ``[0, 1]`` with ``factor(0) = 1``.
    fraction: R_0 as a multiple of the measured rate (positive).
    window_steps: measuring window of a settling warm-up; None for 0.5% of
      ``total_steps``, at least 10 (at least 1 and at most an eighth of the run in
      runs shorter than 80 steps).
    max_warmup_steps: the latest a settling warm-up ends; None for 10% of
      ``total_steps`` (at least two windows).
    settle_tolerance: relative change between two successive window means below
      which the rate counts as settled (positive).

  Returns:
    A :class:`MeasuredTarget`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, trquant
    >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 8))}
    >>> scale = trquant.init_scale(params["w"], bits=2)
    >>> codes_fn = lambda p: {"w": trquant.quantize(p["w"], scale, bits=2)}
    >>> tx = optax.chain(optax.sgd(0.05), trquant.tr_schedule(
    ...     trquant.measured_target(100, warmup_steps=10), codes_fn=codes_fn))
    >>> state = tx.init(params)
    >>> for step in range(10):
    ...   grads = jax.random.normal(jax.random.key(step), (64, 8))
    ...   updates, state = tx.update({"w": grads}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(optax.tree.get(state, "initial_target_rate") > 0)
    True
  """
  if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)):
    raise ValueError(f"`total_steps` must be an int, got {total_steps!r}.")
  total_steps = int(total_steps)
  if warmup_steps is not None:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)):
      raise ValueError(f"`warmup_steps` must be an int or None, got {warmup_steps!r}.")
    warmup_steps = int(warmup_steps)
    if warmup_steps < 2:
      raise ValueError(f"`warmup_steps` must be >= 2 (the rate is measured over its second"
                       f" half), got {warmup_steps}.")
    if total_steps <= warmup_steps:
      raise ValueError(f"`total_steps` ({total_steps}) must exceed `warmup_steps`"
                       f" ({warmup_steps}): the target decays over the steps after the warm-up.")
  if window_steps is None:
    # 0.5% of the run, at least 10 steps, but short runs keep room for two windows.
    window_steps = max(total_steps // 200, min(10, total_steps // 8), 1)
  if isinstance(window_steps, bool) or not isinstance(window_steps, (int, np.integer)) \
      or window_steps < 1:
    raise ValueError(f"`window_steps` must be a positive int, got {window_steps!r}.")
  window_steps = int(window_steps)
  if max_warmup_steps is None:
    max_warmup_steps = max(total_steps // 10, 2 * window_steps)
  if isinstance(max_warmup_steps, bool) or not isinstance(max_warmup_steps, (int, np.integer)):
    raise ValueError(f"`max_warmup_steps` must be an int, got {max_warmup_steps!r}.")
  max_warmup_steps = int(max_warmup_steps)
  if warmup_steps is None:
    if max_warmup_steps < 2 * window_steps:
      raise ValueError(f"`max_warmup_steps` ({max_warmup_steps}) must cover at least two"
                       f" measuring windows of `window_steps` ({window_steps}): settling is"
                       " judged by comparing two of them.")
    if total_steps <= max_warmup_steps:
      raise ValueError(
          f"`total_steps` ({total_steps}) is too short for a settling warm-up: it must exceed"
          f" `max_warmup_steps` ({max_warmup_steps}, two windows of {window_steps} steps at"
          " least). Pass a longer run, a smaller `window_steps`, or a fixed `warmup_steps`.")
  if not callable(decay) and decay not in DECAYS:
    raise ValueError(f"`decay` must be one of {DECAYS} or a callable, got {decay!r}.")
  _validate_positive("fraction", fraction)
  _validate_positive("settle_tolerance", settle_tolerance)
  return MeasuredTarget(total_steps, warmup_steps, decay, float(fraction), window_steps,
                        max_warmup_steps, float(settle_tolerance))


def tr_schedule(
    target_tr: Union[float, optax.Schedule],
    *,
    codes_fn: CodesFn,
    controller: Union[str, Controller] = "log",
    eta: Optional[float] = None,
    momentum: float = 0.99,
    per_layer: bool = True,
    init_scale: float = 1.0,
    max_scale: Optional[float] = 1e3,
    windup_guard: bool = True,
    guard_window: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedules the transition rate of quantized weights with a transition-adaptive LR.

  Place it after an optimizer: ``optax.chain(optax.adam(1e-3), tr_schedule(...))``.
  The incoming update of each quantized leaf is the optimizer's final step
  ``-lr * direction``; it is multiplied by that layer's TALR multiplier ``u``
  (dimensionless, starting at ``init_scale``), so the effective learning rate is
  ``u * lr``. Leaves that ``codes_fn`` marks as not quantized (``None``) pass
  through unchanged; give them their own schedule with ``optax.partition``.

  At step ``t`` (``t = tr_step``, starting at 0), with target ``R_t = target_tr(t)``:

  1. ``u_t = controller(u_{t-1}, R_t, K_{t-1})`` with ``u_{-1} = init_scale``,
     ``K_{-1} = R_0`` (as in the reference code) and ``R_{-1} = R_0``, so the
     first step uses ``init_scale``;
  2. the update ``u_t * update`` is returned;
  3. ``k_t = mean(codes_fn(params + u_t * update) != codes_fn(params))`` per
     quantized leaf (the transitions this very update causes, counted with
     ``optax.apply_updates``' arithmetic), and ``K_t = m * K_{t-1} + (1 - m) * k_t``.

  So the multiplier applied at step ``t`` reacts to the target of step ``t`` and
  to every transition caused up to step ``t - 1``: the ordering of the paper's
  Eqs. 10-12, where ``K_t`` counts the transitions caused by update ``t - 1``.
  ``u_t``, ``K_t``, ``k_t`` and ``R_t`` are what the state holds after step ``t``.

  Controllers (``eta`` is the gain; None picks the default listed):

  * ``"log"`` (default, ``eta=0.005``):
    ``u <- u * clip(R_t / R_{t-1}, 1/2, 2) * exp(eta * clip((R_t - K) / R_t, -1, 1))``.
    Scale-free: one gain tracks small and large targets, for SGD and Adam. The
    feed-forward factor ``R_t / R_{t-1}`` (the transition rate scales roughly
    linearly with the step size) removes the lag an integral rule has on a
    moving target such as a cosine; the feedback term moves ``u`` by at most a
    factor ``e^eta`` per step. A zero target drives ``u`` towards 0 (frozen
    weights).
  * ``"additive"`` (paper Eq. 11, ``eta=1``): ``u <- max(0, u + eta * (R - K))``.
    Here ``u = U / U_0``, so ``eta = 1`` is the paper's ``eta = U_0``. Because
    ``R - K`` is of the order of the target (1e-3), ``u`` moves by about 1e-3 per
    step and may not reach the target within a short run.
  * ``"momentum"`` (public reference code, ``eta=0.01``): ``u <- (1 - eta) * u +
    eta * u * R / K``, i.e. momentum ``1 - eta = 0.99``.
  * a callable ``(u, R_t, K_{t-1}, eta, R_{t-1}) -> new u`` on float32 arrays
    (``u`` and ``K`` have one entry per group, ``R`` and ``eta`` are scalars).

  The result is clipped to ``[0, max_scale]`` and, with ``windup_guard``, to the
  guard's ceiling.

  Windup guard (default on): the loop is stable only while the rate rises with
  ``u``. Pushed too far, a large step carries latent weights beyond the grid,
  where the straight-through gradient is 0; they stop, the rate falls, and an
  integral controller raises ``u`` further: a run-away that ends with ``u`` at
  ``max_scale``, every weight beyond the grid and no transition for the rest of
  the run. The guard compares ``u`` and the tracking ratio ``K / R`` over windows
  of ``guard_window`` updates (per group), together with ``stalled_fraction``:
  the running fraction of quantized weights whose incoming update is below 1% of
  the layer's RMS update (weights that have stopped; with Adam or momentum SGD,
  those beyond the grid). When ``u`` rose by more than 25% over a window while
  ``K / R`` (below 1) fell by more than 10% (or is below 0.01), or when ``u`` at
  least doubled while the stalled fraction grew by more than 5 points, raising
  ``u`` no longer pays: the
  ceiling drops to the multiplier at the start of that window. When ``u`` sat at
  the ceiling for a whole window and either still happened, the ceiling halves. It never drops below ``init_scale`` (the
  optimizer's own step). Each such event is counted in ``windup_events``: a
  non-zero count says the target was above what this optimizer can reach, and a
  lower R_0 (or :func:`measured_target`) fits it better. Where the rate keeps
  up with the target the guard does nothing.

  Non-finite updates: when a quantized leaf's incoming update has a NaN or
  inf, that layer's ``u``, ``K`` and ``k`` keep their previous values for the
  step (all layers with ``per_layer=False``), so the state stays finite. The
  returned update is still ``u * update``, non-finite values included: wrap the
  whole chain in ``optax.apply_if_finite`` to skip such steps.

  Args:
    target_tr: target transition rate, a float in ``[0, 1]``, an optax schedule
      ``step -> rate`` (e.g. ``optax.cosine_decay_schedule(5e-3, total_steps)``),
      or a :func:`measured_target` (R_0 measured from the optimizer's own rate
      over a warm-up, then decayed to 0: no R_0 to tune). A schedule's value at
      step 0 is checked by ``init`` (when ``init`` is not traced); later values,
      computed inside the update, cannot raise and are clipped to ``[0, 1]``.
    codes_fn: ``params -> tree`` of the integer codes of each quantized weight
      (e.g. ``trquant.quantize(w, frozen_scale, bits=2)``), with the structure of
      ``params`` or a prefix of it, and ``None`` for leaves (or subtrees) that are
      not quantized. It must be jit-traceable. Weight scales should be frozen
      (the paper's footnote 2): a moving scale changes codes with no update.
      ``init`` checks that the codes of the initial params are integers (a
      ``codes_fn`` returning the weights themselves would count every weight as
      a transition at every step); codes that happen to be integer-valued, or a
      ``codes_fn`` that goes wrong only later, cannot be caught.
    controller: ``"log"``, ``"additive"``, ``"momentum"`` or a callable.
    eta: controller gain; None for the controller's default.
    momentum: ``m`` of the running transition rate, in ``[0, 1)``.
    per_layer: one multiplier per quantized leaf (True, as in the paper), or one
      global multiplier and running TR over all quantized weights, weighted by
      their counts (False).
    init_scale: initial multiplier ``u`` (1 = the optimizer's own LR).
    max_scale: upper bound on ``u`` (None for no bound).
    windup_guard: stop raising ``u`` where the rate no longer responds (above).
    guard_window: the guard's window in updates; None for ``5 / (1 - momentum)``
      (500 at the default momentum).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its state is a
    :class:`TransitionRateState`; read its fields with ``optax.tree.get``.

  Raises:
    ValueError: on invalid arguments, when ``params`` is not passed to
      ``update``, when ``codes_fn(params)`` does not match ``params`` or returns
      non-integer codes at ``init``, or when a schedule's target at step 0 is not
      in ``[0, 1]``.

  References:
    Lee, Jeon, Kim, Ham, `Scheduling Weight Transitions for Quantization-Aware
    Training <https://arxiv.org/abs/2404.19248>`_, ICCV 2025, Eqs. 5, 10-12.

  Example:
    >>> import jax, jax.numpy as jnp, optax, trquant
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 4)), "b": jnp.zeros(4)}
    >>> scale = trquant.init_scale(params["w"], bits=2)
    >>> codes_fn = lambda p: {"w": trquant.quantize(p["w"], scale, bits=2), "b": None}
    >>> tx = optax.chain(optax.adam(1e-2), trquant.tr_schedule(1e-2, codes_fn=codes_fn))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.tree.get(state, "talr_multiplier").shape
    (1,)
  """
  if isinstance(controller, str):
    if controller not in CONTROLLERS:
      raise ValueError(
          f"`controller` must be one of {tuple(CONTROLLERS)} or a callable, got {controller!r}."
      )
    control = CONTROLLERS[controller]
    if eta is None:
      eta = DEFAULT_ETA[controller]
  elif callable(controller):
    control = controller
    if eta is None:
      raise ValueError("`eta` must be given with a custom controller callable.")
  else:
    raise ValueError(f"`controller` must be a string or a callable, got {controller!r}.")
  if not callable(codes_fn):
    raise ValueError(f"`codes_fn` must be a callable params -> codes tree, got {codes_fn!r}.")
  measured = isinstance(target_tr, MeasuredTarget)
  if not callable(target_tr) and not measured:
    _validate_positive("target_tr", target_tr, allow_zero=True)
    if isinstance(target_tr, numbers.Number) and target_tr > 1:
      raise ValueError(f"`target_tr` is a fraction of weights per step, <= 1; got {target_tr}.")
  _validate_positive("eta", eta)
  _validate_positive("init_scale", init_scale, allow_zero=True)
  if isinstance(momentum, numbers.Number) and not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
  if max_scale is not None:
    _validate_positive("max_scale", max_scale)
  if not isinstance(per_layer, (bool, np.bool_)):
    raise ValueError(f"`per_layer` must be a bool, got {per_layer!r}.")
  if not isinstance(windup_guard, (bool, np.bool_)):
    raise ValueError(f"`windup_guard` must be a bool, got {windup_guard!r}.")
  if guard_window is None:
    guard_window = max(int(round(5.0 / (1.0 - float(momentum)))), 1) \
        if isinstance(momentum, numbers.Number) else 500
  if isinstance(guard_window, bool) or not isinstance(guard_window, (int, np.integer)) \
      or guard_window < 2:
    raise ValueError(f"`guard_window` must be an int >= 2 (updates), got {guard_window!r}.")
  guard_window = int(guard_window)
  settling = measured and target_tr.warmup_steps is None

  def target_at(step):
    value = target_tr(step) if callable(target_tr) else target_tr
    # A rate is a fraction of weights: a schedule cannot raise inside jit, so clip it.
    return jnp.clip(jnp.asarray(value, jnp.float32), 0.0, 1.0)

  def check_initial_target():
    value = target_tr(jnp.zeros([], jnp.int32)) if callable(target_tr) else target_tr
    if isinstance(value, jax.core.Tracer):
      return  # init is traced: the schedule cannot be evaluated here
    value = np.asarray(value, np.float64)
    if value.shape != () or not (np.isfinite(value) and 0.0 <= value <= 1.0):
      raise ValueError(
          f"`target_tr` at step 0 is {value.tolist()!r}: a target transition rate is the"
          " fraction of quantized weights that change level per step, a scalar in [0, 1]"
          " (typically 1e-4 to 1e-2). Check the schedule's initial value."
      )

  def measured_target_at(step, initial_rate, warmup_end):
    # The target after the warm-up; during it, the rate measured so far (reported only).
    total = target_tr.total_steps
    span = jnp.maximum(total - warmup_end, 1).astype(jnp.float32)
    progress = jnp.clip((step - warmup_end) / span, 0.0, 1.0).astype(jnp.float32)
    decayed = initial_rate * _decay_factor(target_tr.decay, progress)
    return jnp.where(step < warmup_end, initial_rate, target_tr.fraction * decayed)

  def num_groups(quantized) -> int:
    return sum(quantized) if per_layer else 1

  def init_fn(params):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    codes, concrete = codes_tree.concrete_codes(codes_fn, params)
    codes_def, quantized = codes_tree.match_codes(codes, params)
    groups = num_groups(quantized)
    if groups == 0:
      raise ValueError(
          "codes_fn(params) marks no leaf as quantized (all None): tr_schedule has nothing"
          " to schedule. Return codes for the quantized weights."
      )
    if concrete:
      codes_tree.check_integer_codes(codes_def, codes, quantized)
    if not measured:
      check_initial_target()
    # A measured target starts unknown (0); the running TR then starts from nothing too.
    target = jnp.zeros([], jnp.float32) if measured else target_at(jnp.zeros([], jnp.int32))
    if not measured:
      warmup_end = 0
    elif settling:
      warmup_end = target_tr.max_warmup_steps  # lowered when the rate settles
    else:
      warmup_end = target_tr.warmup_steps
    ceiling = np.inf if max_scale is None else float(max_scale)
    return TransitionRateState(
        tr_step=jnp.zeros([], jnp.int32),
        target_transition_rate=target,
        measured_transition_rate=jnp.zeros([groups], jnp.float32),
        running_transition_rate=jnp.full([groups], target, jnp.float32),
        talr_multiplier=jnp.full([groups], init_scale, jnp.float32),
        initial_target_rate=jnp.copy(target),  # own buffer: donated state must not alias
        warmup_end_step=jnp.full([], warmup_end, jnp.int32),
        warmup_window=jnp.zeros([2], jnp.float32),
        warmup_previous_rate=jnp.zeros([], jnp.float32),
        multiplier_ceiling=jnp.full([groups], ceiling, jnp.float32),
        guard_start_multiplier=jnp.full([groups], init_scale, jnp.float32),
        guard_start_tracking=jnp.zeros([groups], jnp.float32),
        stalled_fraction=jnp.zeros([groups], jnp.float32),
        # 1: the first window only sets the references (weights may start stalled).
        guard_start_stalled=jnp.ones([groups], jnp.float32),
        windup_events=jnp.zeros([groups], jnp.int32),
    )

  def warmup_step(state, overall, in_warmup):
    """R_0 and the warm-up's end after this step's count-weighted rate ``overall``."""
    step = state.tr_step
    initial_rate, warmup_end = state.initial_target_rate, state.warmup_end_step
    window, previous = state.warmup_window, state.warmup_previous_rate
    finite = jnp.isfinite(overall)
    if not settling:
      # R_0: the running mean of the rate over the second half of the fixed warm-up.
      start = target_tr.warmup_steps // 2
      seen = (step - start).astype(jnp.float32)
      collecting = (step >= start) & in_warmup & finite
      initial_rate = jnp.where(collecting, initial_rate + (overall - initial_rate) / (seen + 1.0),
                               initial_rate)
      return initial_rate, warmup_end, window, previous
    window = window + jnp.where(in_warmup & finite, jnp.stack([overall, 1.0]), 0.0)
    window_done = in_warmup & ((step + 1) % target_tr.window_steps == 0)
    mean = window[0] / jnp.maximum(window[1], 1.0)
    change = jnp.abs(mean - previous) / jnp.where(previous > 0, previous, 1.0)
    settled = (previous > 0) & (change <= target_tr.settle_tolerance)
    ends = window_done & (settled | (step + 1 >= target_tr.max_warmup_steps))
    # Reported during the warm-up: the last window's mean; at its end, R_0.
    initial_rate = jnp.where(window_done, mean, initial_rate)
    warmup_end = jnp.where(ends, step + 1, warmup_end)
    previous = jnp.where(window_done, mean, previous)
    window = jnp.where(window_done, jnp.zeros_like(window), window)
    return initial_rate, warmup_end, window, previous

  def guard_step(state, multiplier, running, target, stalled, finite):
    """The windup guard's ceiling, window references and event count after this step."""
    ceiling = state.multiplier_ceiling
    start_u, start_tracking = state.guard_start_multiplier, state.guard_start_tracking
    start_stalled, events = state.guard_start_stalled, state.windup_events
    tracking = jnp.where(target > 0, running / jnp.where(target > 0, target, 1.0), 1.0)
    window_done = (state.tr_step + 1) % guard_window == 0
    if measured:
      window_done &= state.tr_step >= state.warmup_end_step
    # Below target and falling, or stalled (almost no transition left at all).
    fell = (tracking < 1.0) & ((tracking < 0.9 * start_tracking) | (tracking < 0.01))
    # Weights stop faster than the window before: the larger step is pushing them out.
    stalling = stalled > start_stalled + 0.05
    rose = multiplier >= 1.25 * start_u
    # Weights also stop on their own (dead ReLU units, a fitted loss): only a multiplier
    # that at least doubled in the window is taken to be the cause.
    doubled = multiplier >= 2.0 * start_u
    held = (start_u >= 0.99 * ceiling) & (multiplier >= 0.99 * ceiling)
    lower = window_done & finite & ((fell & (rose | held)) | (stalling & (doubled | held)))
    floor = jnp.float32(init_scale)
    new_ceiling = jnp.where(rose, jnp.maximum(start_u, floor), jnp.maximum(0.5 * ceiling, floor))
    ceiling = jnp.where(lower, jnp.minimum(new_ceiling, ceiling), ceiling)
    events = events + lower.astype(jnp.int32)
    refresh = window_done & finite
    start_u = jnp.where(refresh, jnp.minimum(multiplier, ceiling), start_u)
    start_tracking = jnp.where(refresh, tracking, start_tracking)
    start_stalled = jnp.where(refresh, stalled, start_stalled)
    return ceiling, start_u, start_tracking, start_stalled, events

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    codes_before = codes_fn(params)
    codes_def, quantized = codes_tree.match_codes(codes_before, params)
    groups = num_groups(quantized)
    if state.talr_multiplier.shape != (groups,):
      raise ValueError(
          f"tr_schedule state has {state.talr_multiplier.shape[0]} groups but codes_fn(params)"
          f" now gives {groups}: the quantized leaves changed since init."
      )
    update_slots = codes_tree.flatten_like(codes_def, updates, "updates")
    group_of = np.cumsum(quantized) - 1 if per_layer else np.zeros(len(quantized), int)

    # 1. Controller: u_t from u_{t-1}, R_t and K_{t-1}.
    if measured:
      target = measured_target_at(state.tr_step, state.initial_target_rate, state.warmup_end_step)
    else:
      target = target_at(state.tr_step)
    multiplier = control(
        state.talr_multiplier,
        target,
        state.running_transition_rate,
        jnp.asarray(eta, jnp.float32),
        state.target_transition_rate,
    )
    upper = jnp.inf if max_scale is None else max_scale
    multiplier = jnp.clip(multiplier.astype(jnp.float32), 0.0, upper)
    if windup_guard:
      multiplier = jnp.minimum(multiplier, state.multiplier_ceiling)
    in_warmup = state.tr_step < state.warmup_end_step  # always False without a MeasuredTarget
    if measured:
      # The warm-up measures the optimizer's own rate: the multiplier stays where it started.
      multiplier = jnp.where(in_warmup, state.talr_multiplier, multiplier)

    # 2. Scale the quantized updates; the rest pass through untouched.
    scaled_slots = []
    for slot, (update, is_quantized) in enumerate(zip(update_slots, quantized)):
      if is_quantized:
        factor = multiplier[group_of[slot]]
        update = (factor * update).astype(jnp.result_type(update))
      scaled_slots.append(update)
    scaled_updates = codes_def.unflatten(scaled_slots)

    # 3. Count the transitions this update causes, with the arithmetic of apply_updates.
    new_params = optax.apply_updates(params, scaled_updates)
    codes_after = codes_def.flatten_up_to(codes_fn(new_params))
    changed, total, stalled_count = [], [], []
    for before, after, update, is_quantized in zip(
        codes_def.flatten_up_to(codes_before), codes_after, update_slots, quantized
    ):
      if is_quantized:
        # NaN when the layer's update has a non-finite entry: how it is recognised below.
        changed.append(codes_tree.count_transitions(before, after, update))
        total.append(float(np.size(before)))
        if windup_guard:
          magnitude = jnp.abs(update.astype(jnp.float32))
          rms = jnp.sqrt(jnp.mean(jnp.square(magnitude)))
          stalled_count.append(jnp.sum(magnitude < 0.01 * rms, dtype=jnp.float32))
    changed = jnp.stack(changed)
    total = np.asarray(total, np.float32)

    def fraction_overall(counts):  # count-weighted over every quantized weight
      return jnp.sum(counts) / max(total.sum(), 1.0)

    def fraction_per_group(counts):
      return counts / np.maximum(total, 1.0) if per_layer else fraction_overall(counts)[None]

    measured_rate = fraction_per_group(changed)
    finite = jnp.isfinite(measured_rate)
    ema = momentum
    initial_rate, warmup_end = state.initial_target_rate, state.warmup_end_step
    window, previous = state.warmup_window, state.warmup_previous_rate
    if measured:
      step = state.tr_step.astype(jnp.float32)
      # Started from nothing, the running TR is the plain mean until 1/(1-m) steps have passed.
      ema = jnp.minimum(momentum, step / (step + 1.0))
      initial_rate, warmup_end, window, previous = warmup_step(
          state, fraction_overall(changed), in_warmup)
      # Reported during the warm-up: the rate measured so far.
      target = jnp.where(in_warmup, initial_rate, target)
    running = ema * state.running_transition_rate + (1.0 - ema) * measured_rate
    running = jnp.where(finite, running, state.running_transition_rate)
    multiplier = jnp.where(finite, multiplier, state.talr_multiplier)
    ceiling, start_u, start_tracking, start_stalled, events, stalled = (
        state.multiplier_ceiling, state.guard_start_multiplier, state.guard_start_tracking,
        state.guard_start_stalled, state.windup_events, state.stalled_fraction)
    if windup_guard:
      stalled_now = fraction_per_group(jnp.stack(stalled_count))
      stalled = jnp.where(finite, momentum * stalled + (1.0 - momentum) * stalled_now, stalled)
      ceiling, start_u, start_tracking, start_stalled, events = guard_step(
          state, multiplier, running, target, stalled, finite)

    new_state = TransitionRateState(
        tr_step=optax.safe_increment(state.tr_step),
        target_transition_rate=target,
        measured_transition_rate=jnp.where(finite, measured_rate, state.measured_transition_rate),
        running_transition_rate=running,
        talr_multiplier=multiplier,
        initial_target_rate=initial_rate,
        warmup_end_step=warmup_end,
        warmup_window=window,
        warmup_previous_rate=previous,
        multiplier_ceiling=ceiling,
        guard_start_multiplier=start_u,
        guard_start_tracking=start_tracking,
        stalled_fraction=stalled,
        guard_start_stalled=start_stalled,
        windup_events=events,
    )
    return scaled_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
