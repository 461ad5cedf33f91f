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

import numbers
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trquant._src import checks
from trquant._src import codes_tree
from trquant._src.tr_scheduling import controllers
from trquant._src.tr_scheduling import targets
from trquant._src.tr_scheduling import windup_guard as windup_guard_rules

__all__ = ["TransitionRateState", "tr_schedule"]


NO_PARAMS_MESSAGE = (
    "tr_schedule needs the current parameters to count transitions: call"
    " `tx.update(updates, state, params)`. optax.chain, optax.partition and"
    " nnx.Optimizer pass them for you."
)


class TransitionRateState(NamedTuple):
  """State of :func:`tr_schedule`.

  Per-group vectors have one entry per quantized leaf of ``codes_fn(params)``
  in tree-flatten order (``per_layer=True``), or a single entry for all
  quantized weights together (``per_layer=False``). No copy of the weights or
  of their codes is kept. The warm-up of a :class:`~trquant.MeasuredTarget` and the
  windup guard keep their fields in the nested ``warmup`` and ``guard``; every field
  has a distinct name, so ``optax.tree.get(state, name)`` finds nested ones too.
  """

  tr_step: jax.Array  # shape=(), int32: number of updates seen
  target_transition_rate: jax.Array  # shape=(), float32: target R used at the last step
  measured_transition_rate: jax.Array  # shape=(groups,), float32: k of the last applied update
  running_transition_rate: jax.Array  # shape=(groups,), float32: running TR K (EMA of k)
  talr_multiplier: jax.Array  # shape=(groups,), float32: TALR multiplier u applied at the last step
  # shape=(), float32: R_0 of the target. With a MeasuredTarget: 0 until its measuring window,
  # then the mean transition rate measured so far, fixed from the end of the warm-up.
  initial_target_rate: jax.Array
  # The warm-up of a MeasuredTarget: warmup_end_step (shape=(), int32), warmup_window
  # (shape=(2,), float32), warmup_previous_rate (shape=(), float32).
  warmup: targets.WarmupState
  # The windup guard, every field shape=(groups,): multiplier_ceiling, guard_start_multiplier,
  # guard_start_tracking, stalled_fraction, guard_start_stalled, beyond_grid_fraction
  # (float32) and windup_events (int32).
  guard: windup_guard_rules.GuardState


def tr_schedule(
    target_tr: Union[float, optax.Schedule],
    *,
    codes_fn: codes_tree.CodesFn,
    controller: Union[str, controllers.Controller] = "log",
    eta: Optional[float] = None,
    decay: float = 0.99,
    per_layer: bool = True,
    init_multiplier: float = 1.0,
    max_multiplier: Optional[float] = 1e3,
    windup_guard: bool = True,
    guard_window: Optional[int] = None,
    saturation_fn: Optional[codes_tree.CodesFn] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Schedules the transition rate of quantized weights with a transition-adaptive LR.

  Place it after an optimizer: ``optax.chain(optax.adam(1e-3), tr_schedule(...))``.
  The incoming update of each quantized leaf is the optimizer's final step
  ``-lr * direction``; it is multiplied by that layer's TALR multiplier ``u``
  (dimensionless, starting at ``init_multiplier``), so the effective learning rate is
  ``u * lr``. Leaves that ``codes_fn`` marks as not quantized (``None``) pass
  through unchanged; give them their own schedule with ``optax.partition``.

  At step ``t`` (``t = tr_step``, starting at 0), with target ``R_t = target_tr(t)``:

  1. ``u_t = controller(u_{t-1}, R_t, K_{t-1})`` with ``u_{-1} = init_multiplier``,
     ``K_{-1} = R_0`` (as in the reference code) and ``R_{-1} = R_0``, so the
     first step uses ``init_multiplier``;
  2. the update ``u_t * update`` is returned;
  3. ``k_t = mean(codes_fn(params + u_t * update) != codes_fn(params))`` per
     quantized leaf (the transitions this very update causes, counted with
     ``optax.apply_updates``' arithmetic), and ``K_t = decay * K_{t-1} + (1 - decay) * k_t``.

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
    eta * u * R / K``, i.e. a decay of ``1 - eta = 0.99`` on ``u``.
  * a callable ``(u, R_t, K_{t-1}, eta, R_{t-1}) -> new u`` on float32 arrays
    (``u`` and ``K`` have one entry per group, ``R`` and ``eta`` are scalars).

  The result is clipped to ``[0, max_multiplier]`` and, with ``windup_guard``, to the
  guard's ceiling.

  Windup guard (default on): the loop is stable only while the rate rises with
  ``u``. Pushed too far, a large step carries latent weights beyond the grid,
  where the straight-through gradient is 0; they stop, the rate falls, and an
  integral controller raises ``u`` further: a run-away that ends with ``u`` at
  ``max_multiplier``, every weight beyond the grid and no transition for the rest of
  the run. The guard compares ``u`` and the tracking ratio ``K / R`` over windows
  of ``guard_window`` updates (per group), together with ``stalled_fraction``:
  the running fraction of quantized weights whose incoming update is below 1% of
  the layer's RMS update (weights that have stopped; with Adam or momentum SGD,
  those beyond the grid), measured every ``guard_window // 50`` updates (10 at the
  defaults; an EMA with the same time constant as ``K``). Raising ``u`` no longer
  pays when, over a window, ``u`` rose by more than 25% while ``K / R`` (below 1) fell
  by more than 10% (or is below 0.01); or ``u`` at least doubled while the stalled
  fraction grew by more than 5 points; or ``u`` rose at all while more than 90% of the
  layer's weights are stalled or beyond the grid (the rate it buys comes from the few
  weights still inside the grid, which a larger step only shakes; the additive
  controller's linear rise is caught here). Which
  weights are beyond the grid the transform learns from ``saturation_fn``;
  ``trquant.nnx.codes_fn`` carries its model's, so an NNX model needs nothing
  more. Without one, the stalled fraction stands in for it (it misses weights
  that weight decay still moves). Then the ceiling drops to the
  multiplier at the start of that window. When ``u`` sat at the ceiling for a
  whole window and any of these still held, the ceiling halves. It never drops
  below ``init_multiplier`` (the optimizer's own step). Each such event is counted
  in ``windup_events``: a non-zero count says the target was above what this
  optimizer can reach, and a lower R_0 (or :func:`measured_target`) fits it
  better. Where the rate keeps up with the target and the weights move, the guard
  does nothing.

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
    decay: weight of the old value in the running transition rate ``K`` (an EMA as in
      ``optax.ema``), in ``[0, 1)``.
    per_layer: one multiplier per quantized leaf (True, as in the paper), or one
      global multiplier and running TR over all quantized weights, weighted by
      their counts (False).
    init_multiplier: initial multiplier ``u`` (1 = the optimizer's own LR).
    max_multiplier: upper bound on ``u`` (None for no bound).
    windup_guard: stop raising ``u`` where the rate no longer responds (above).
    guard_window: the guard's window in updates; None for ``5 / (1 - decay)``
      (500 at the default decay).
    saturation_fn: ``params -> tree`` with the structure of ``codes_fn(params)``: a
      boolean mask per quantized leaf, True where the latent weight lies beyond the
      grid (outside the straight-through window, where its gradient is 0); None
      elsewhere. None uses ``codes_fn.saturation_fn`` when ``codes_fn`` has one
      (:func:`trquant.nnx.codes_fn` does), else the guard goes without.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its state is a
    :class:`TransitionRateState`: the step, target, rates and multiplier, with the
    warm-up's fields in ``state.warmup`` and the windup guard's (ceiling, window
    references, stalled and beyond-grid fractions, ``windup_events``) in
    ``state.guard``. Read any field by name with ``optax.tree.get``, nested ones included.

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
    if controller not in controllers.CONTROLLERS:
      raise ValueError(
          f"`controller` must be one of {tuple(controllers.CONTROLLERS)} or a callable, got"
          f" {controller!r}."
      )
    control = controllers.CONTROLLERS[controller]
    if eta is None:
      eta = controllers.DEFAULT_ETA[controller]
  elif callable(controller):
    control = controller
    if eta is None:
      raise ValueError("`eta` must be given with a custom controller callable.")
  else:
    raise ValueError(f"`controller` must be a string or a callable, got {controller!r}.")
  checks.check_callable("codes_fn", codes_fn, "a callable params -> codes tree")
  if saturation_fn is None:
    saturation_fn = getattr(codes_fn, "saturation_fn", None)
  if saturation_fn is not None:
    checks.check_callable("saturation_fn", saturation_fn, "a callable params -> tree of masks")
  measured = isinstance(target_tr, targets.MeasuredTarget)
  if not callable(target_tr) and not measured:
    checks.check_positive("target_tr", target_tr, allow_zero=True)
    if isinstance(target_tr, numbers.Real) and float(target_tr) > 1:
      raise ValueError(f"`target_tr` is a fraction of weights per step, <= 1; got {target_tr}.")
  checks.check_positive("eta", eta)
  checks.check_positive("init_multiplier", init_multiplier, allow_zero=True)
  checks.check_decay(decay)
  if max_multiplier is not None:
    checks.check_positive("max_multiplier", max_multiplier)
  checks.check_bool("per_layer", per_layer)
  checks.check_bool("windup_guard", windup_guard)
  if guard_window is None:
    guard_window = windup_guard_rules.default_guard_window(decay)
  else:
    guard_window = checks.check_count("guard_window", guard_window, 2)

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

  def num_groups(quantized) -> int:
    return sum(quantized) if per_layer else 1

  def init_fn(params):
    if params is None:
      raise ValueError(NO_PARAMS_MESSAGE)
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
    warmup_end = targets.initial_warmup_end(target_tr) if measured else 0
    # An array: max_multiplier may be injected (inject_hyperparams) and init traced.
    ceiling = np.inf if max_multiplier is None else jnp.asarray(max_multiplier, jnp.float32)
    return TransitionRateState(
        tr_step=jnp.zeros([], jnp.int32),
        target_transition_rate=target,
        measured_transition_rate=jnp.zeros([groups], jnp.float32),
        running_transition_rate=jnp.full([groups], target, jnp.float32),
        talr_multiplier=jnp.full([groups], init_multiplier, jnp.float32),
        initial_target_rate=jnp.copy(target),  # own buffer: donated state must not alias
        warmup=targets.WarmupState(
            warmup_end_step=jnp.full([], warmup_end, jnp.int32),
            warmup_window=jnp.zeros([2], jnp.float32),
            warmup_previous_rate=jnp.zeros([], jnp.float32),
        ),
        guard=windup_guard_rules.GuardState(
            multiplier_ceiling=jnp.full([groups], ceiling, jnp.float32),
            guard_start_multiplier=jnp.full([groups], init_multiplier, jnp.float32),
            guard_start_tracking=jnp.zeros([groups], jnp.float32),
            stalled_fraction=jnp.zeros([groups], jnp.float32),
            # 1: the first window only sets the references (weights may start stalled).
            guard_start_stalled=jnp.ones([groups], jnp.float32),
            beyond_grid_fraction=jnp.zeros([groups], jnp.float32),
            windup_events=jnp.zeros([groups], jnp.int32),
        ),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(NO_PARAMS_MESSAGE)
    step_codes_fn = codes_tree.with_extra_args(codes_fn, extra_args)
    step_saturation_fn = codes_tree.with_extra_args(saturation_fn, extra_args)
    codes_before = step_codes_fn(params)
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
      target = targets.target_after_warmup(target_tr, state.tr_step, state.initial_target_rate,
                                           state.warmup.warmup_end_step)
    else:
      target = target_at(state.tr_step)
    multiplier = control(
        state.talr_multiplier,
        target,
        state.running_transition_rate,
        jnp.asarray(eta, jnp.float32),
        state.target_transition_rate,
    )
    upper = jnp.inf if max_multiplier is None else max_multiplier
    multiplier = jnp.clip(multiplier.astype(jnp.float32), 0.0, upper)
    if windup_guard:
      multiplier = jnp.minimum(multiplier, state.guard.multiplier_ceiling)
    # Always False without a MeasuredTarget.
    in_warmup = state.tr_step < state.warmup.warmup_end_step
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
    codes_after = codes_def.flatten_up_to(step_codes_fn(new_params))
    changed, total = [], []
    for before, after, update, is_quantized in zip(
        codes_def.flatten_up_to(codes_before), codes_after, update_slots, quantized
    ):
      if is_quantized:
        # NaN when the layer's update has a non-finite entry: how it is recognised below.
        changed.append(codes_tree.count_transitions(before, after, update))
        total.append(float(np.size(before)))
    changed = jnp.stack(changed)
    total = np.asarray(total, np.float32)
    use_saturation = windup_guard and saturation_fn is not None

    def guard_counts():
      """Per quantized leaf: how many weights stalled, how many beyond the grid (float32)."""
      stalled_count = jnp.stack([windup_guard_rules.stalled_count(update)
                                 for update, q in zip(update_slots, quantized) if q])
      if not use_saturation:
        return stalled_count, jnp.zeros_like(stalled_count)
      masks = codes_tree.flatten_like(codes_def, step_saturation_fn(params),
                                      "saturation_fn(params)")
      beyond_count = jnp.stack([codes_tree.count_true(mask).astype(jnp.float32)
                                for mask, q in zip(masks, quantized) if q])
      return stalled_count, beyond_count

    def fraction_overall(counts):  # count-weighted over every quantized weight
      return jnp.sum(counts) / max(total.sum(), 1.0)

    def fraction_per_group(counts):
      return counts / np.maximum(total, 1.0) if per_layer else fraction_overall(counts)[None]

    measured_rate = fraction_per_group(changed)
    finite = jnp.isfinite(measured_rate)
    ema = decay
    initial_rate, warmup = state.initial_target_rate, state.warmup
    if measured:
      step = state.tr_step.astype(jnp.float32)
      # Started from nothing, the running TR is the plain mean until 1/(1-m) steps have passed.
      ema = jnp.minimum(decay, step / (step + 1.0))
      initial_rate, warmup = targets.advance_warmup(
          target_tr, state.tr_step, fraction_overall(changed), in_warmup, initial_rate, warmup)
      # Reported during the warm-up: the rate measured so far.
      target = jnp.where(in_warmup, initial_rate, target)
    running = ema * state.running_transition_rate + (1.0 - ema) * measured_rate
    running = jnp.where(finite, running, state.running_transition_rate)
    multiplier = jnp.where(finite, multiplier, state.talr_multiplier)
    guard = state.guard
    if windup_guard:
      # The stalled and beyond-grid fractions are measured every `stride` updates (they
      # read every quantized weight again), with the decay raised to the power `stride`:
      # the same time constant in updates, at a fraction of the cost.
      stride = windup_guard_rules.statistics_stride(guard_window)
      if isinstance(stride, int) and stride == 1:
        measure = True
        stalled_count, beyond_count = guard_counts()
      else:
        measure = state.tr_step % stride == 0
        stalled_count, beyond_count = jax.lax.cond(
            measure, guard_counts, lambda: (jnp.zeros(total.shape, jnp.float32),) * 2)
      update_stats = finite & measure
      stats_decay = decay ** stride

      def running_fraction(previous, counts):  # the EMA, advanced on measured finite updates
        now = fraction_per_group(counts)
        return jnp.where(update_stats, stats_decay * previous + (1.0 - stats_decay) * now,
                         previous)

      stalled = running_fraction(guard.stalled_fraction, stalled_count)
      beyond = guard.beyond_grid_fraction
      if use_saturation:
        beyond = running_fraction(beyond, beyond_count)
      window_done = (state.tr_step + 1) % guard_window == 0
      if measured:
        window_done &= state.tr_step >= state.warmup.warmup_end_step
      guard = windup_guard_rules.guard_step(
          guard, window_done=window_done, multiplier=multiplier, running=running, target=target,
          stalled=stalled, beyond=beyond, finite=finite, floor=init_multiplier)

    new_state = TransitionRateState(
        tr_step=optax.safe_increment(state.tr_step),
        target_transition_rate=target,
        measured_transition_rate=jnp.where(finite, measured_rate, state.measured_transition_rate),
        running_transition_rate=running,
        talr_multiplier=multiplier,
        initial_target_rate=initial_rate,
        warmup=warmup,
        guard=guard,
    )
    return scaled_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
