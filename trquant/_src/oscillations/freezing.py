"""Iterative weight freezing: weights that oscillate too often are pinned to a grid point."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from trquant._src import checks
from trquant._src import codes_tree
from trquant._src.oscillations import fixed_point_ema
from trquant._src.oscillations import schedules
from trquant._src.oscillations import tracking

__all__ = ["CODE_EMA_ONE", "CODE_EMA_RANGE", "FreezeOscillationsState", "freeze_oscillations"]

ScaleFn = Callable[[Any], Any]

# The EMA of a weight's integer code is int16 fixed point in units of 1 / CODE_EMA_ONE,
# which holds codes in [-128, 127] (signed grids up to 8 bits).
CODE_EMA_ONE = 256
CODE_EMA_RANGE = (-128, 127)  # codes the int16 EMA holds: signed grids up to 8 bits
CODE_EMA_SEED = 0xF2EE


class FreezeOscillationsState(NamedTuple):
  """State of :func:`freeze_oscillations`: a tracker plus the freezing state.

  ``optax.tree.get`` reaches the tracker's fields (e.g. ``"oscillating_fraction"``)
  through it.
  """

  tracker: tracking.OscillationState  # the oscillation tracker of the same weights
  code_ema: Any  # param-shaped, int16: EMA of the integer code, value / 256
  frozen: Any  # param-shaped, bool: weights frozen for good
  freeze_threshold: jax.Array  # shape=(), float32: threshold used at the last step (inf: none)
  frozen_fraction: jax.Array  # shape=(layers,), float32: fraction of weights frozen


def _landing_update(param, target, update):
  """The update (in ``update``'s dtype) that moves ``param`` onto ``target``.

  ``param + (target - param)`` is ``target`` whenever the difference is exact (e.g.
  ``param`` within a factor 2 of ``target``). When ``|param|`` is much larger than
  ``|target|`` no floating-point update may land exactly (the sum's last bit is
  coarser than ``target``'s); the weight then ends within a rounding of ``target``,
  with the same code, and lands exactly on the next step, when it is re-pinned.
  """
  work = jnp.promote_types(param.dtype, update.dtype)
  return (target.astype(work) - param.astype(work)).astype(update.dtype)


def _code_units(codes):
  """Codes as int16 fixed point (units of 1 / CODE_EMA_ONE), the initial code EMA."""
  units = jnp.round(codes.astype(jnp.float32) * CODE_EMA_ONE)
  units = jnp.where(jnp.isfinite(units), units, 0.0)
  return jnp.clip(units, -32768, 32767).astype(jnp.int16)


def _check_code_range(layout: codes_tree.QuantizedLayout, codes) -> None:
  """Raises a ValueError naming the first quantized leaf whose (concrete) codes lie
  outside the range the int16 code EMA holds; traced codes are not checked."""
  lo, hi = CODE_EMA_RANGE
  found = codes_tree.first_bad_code(layout.codes_def, codes, layout.quantized,
                                    lambda leaf: jnp.isfinite(leaf) & ((leaf < lo) | (leaf > hi)))
  if found is not None:
    path, example = found
    raise ValueError(
        f"codes_fn(params) returned the code {example:g} at {path}, outside"
        f" [{lo}, {hi}]: freeze_oscillations keeps each weight's code EMA in int16 fixed"
        " point, which holds signed grids up to 8 bits. Quantize such layers to 8 bits"
        " or fewer (signed), or leave them out of freezing (None in codes_fn)."
    )


def freeze_oscillations(
    *,
    codes_fn: codes_tree.CodesFn,
    scale_fn: ScaleFn,
    total_steps: int,
    threshold: Union[None, float, optax.Schedule] = None,
    decay: float = 0.999,
    warmup_steps: Optional[int] = None,
    report_threshold: float = tracking.DEFAULT_OSCILLATING_THRESHOLD,
) -> optax.GradientTransformationExtraArgs:
  r"""Iterative weight freezing: weights that oscillate too often are frozen on a grid point.

  Place it last in the chain, after the optimizer (and after
  :func:`trquant.tr_schedule` if used)::

    optax.chain(optax.adam(lr), trquant.tr_schedule(...),
                trquant.freeze_oscillations(codes_fn=codes_fn, scale_fn=scale_fn,
                                            total_steps=n))

  It tracks oscillations exactly as :func:`track_oscillations` and keeps an EMA
  (same decay) of each weight's integer code. At step ``t`` (from 0), with
  ``threshold_t`` (no freezing while ``t < warmup_steps``):

  1. a weight not yet frozen whose frequency ``f`` (after step ``t - 1``) exceeds
     ``threshold_t`` is frozen, for good, at ``round(code EMA)``;
  2. a frozen weight's update is replaced by ``code * scale - w`` (``code * scale``
     rounded to the parameter's dtype), which puts its latent weight on that grid
     point; every later update of it is then exactly zero. Other weights' updates
     pass through unchanged. (A weight far from its grid point relative to the
     point's magnitude, e.g. 1.5 bins away from code 1, may land within a rounding
     of it, where no floating-point update lands exactly: about 0.4% of such
     weights in float32. It has the frozen code at once and lands exactly on the
     next step.)
  3. the tracker and the code EMA are advanced with the codes before and after
     the update actually emitted.

  Frozen weights stay frozen whatever the loss does: the incoming update
  (weight decay included) is discarded for them. The code of a frozen weight is
  read back from the parameter itself (it sits on its grid point), so no copy of
  codes is stored.

  Memory: 6 bytes of state per quantized weight: the tracker's 3 (uint16
  frequency, int8 direction), an int16 fixed-point code EMA (``value / 256``,
  stochastically rounded like the frequency, so codes must lie in ``[-128, 127]``:
  signed grids up to 8 bits), and a bool frozen flag.

  Checks: ``init`` raises if the initial codes are not integers or lie outside
  ``[-128, 127]`` (e.g. a 10-bit or an unsigned 8-bit grid), or if a concrete
  scale from ``scale_fn`` is not positive and finite; an ``update`` called with
  concrete values (not traced) checks the codes' range too. Inside ``jax.jit``
  nothing can raise: there a weight whose code is outside ``[-128, 127]`` is never
  frozen (its code EMA saturates, so freezing would pin it at the wrong code).

  Non-finite updates: a quantized leaf whose incoming update has a NaN or inf
  keeps its tracker and EMA state for the step (freezing decisions, which come
  from the previous state, still apply); frozen weights still get their (finite)
  pinning update, others get the incoming one, NaN included. Wrap the chain in
  ``optax.apply_if_finite`` to skip such steps altogether.

  Args:
    codes_fn: ``params -> tree`` of integer codes, None for non-quantized leaves
      (see :func:`track_oscillations`), e.g. ``trquant.nnx.codes_fn(model)``.
    scale_fn: ``params -> tree`` with the structure of ``codes_fn(params)``: the
      step size of each quantized leaf (a scalar or an array that broadcasts to
      the leaf, e.g. per-channel), None elsewhere; the bin centre of code ``c`` is
      ``c * scale``. It must agree with ``codes_fn`` (e.g.
      ``trquant.nnx.scale_fn(model)``). Scales should be frozen: a moving scale
      moves frozen weights with it.
    total_steps: number of training steps (positive), for the warm-up.
    threshold: freezing threshold on ``f``, a float in ``(0, 1]`` or a schedule
      ``step -> threshold`` (values above 1, e.g. inf, freeze nothing). None uses
      :func:`freeze_threshold_schedule` ``(total_steps, warmup_steps=warmup_steps)``:
      a cosine from 0.1 to 0.01 after the warm-up.
    decay: weight of the old value in the frequency and code EMAs, in ``[0, 1)``
      (as in ``optax.ema``; the paper's momentum 1e-3 is 0.999); keep ``1 - decay``
      2-3 times below the threshold.
    warmup_steps: steps without freezing, in ``[0, total_steps)``; None for the
      paper's quarter of the run, ``ceil(total_steps / 4)``.
    report_threshold: ``f`` above which a weight that is not frozen counts in
      ``oscillating_fraction`` (a frozen weight no longer moves, but its ``f`` decays
      only slowly).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`FreezeOscillationsState`; ``optax.tree.get(state, "frozen_fraction")``
    and ``optax.tree.get(state, "oscillating_fraction")`` give one value per
    quantized leaf, in tree order.

  Raises:
    ValueError: on invalid arguments, when ``params`` is not passed to
      ``update``, when ``codes_fn(params)`` or ``scale_fn(params)`` does not
      match ``params``, or on the value checks listed above.

  References:
    Nagel et al., `Overcoming Oscillations in Quantization-Aware Training
    <https://arxiv.org/abs/2203.11086>`_, ICML 2022, Section 4.2 (iterative
    weight freezing).

  Example:
    >>> import jax.numpy as jnp, optax, trquant
    >>> params = {"w": jnp.array([0.47, 2.0])}
    >>> codes_fn = lambda p: {"w": trquant.quantize(p["w"], 1.0, bits=3)}
    >>> scale_fn = lambda p: {"w": 1.0}
    >>> tx = optax.chain(optax.sgd(0.02), trquant.freeze_oscillations(
    ...     codes_fn=codes_fn, scale_fn=scale_fn, total_steps=100, threshold=0.2, decay=0.9,
    ...     warmup_steps=0))
    >>> state = tx.init(params)
    >>> for _ in range(30):  # the STE gradient of (w_q - 0.5)^2 / 2 drives w[0] across 0.5 and back
    ...   codes = codes_fn(params)["w"]
    ...   grads = {"w": jnp.array([codes[0] - 0.5, 0.0])}
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> optax.tree.get(state, "frozen_fraction"), float(params["w"][0]) in (0.0, 1.0)
    (Array([0.5], dtype=float32), True)
  """
  checks.check_callable("codes_fn", codes_fn)
  checks.check_callable("scale_fn", scale_fn)
  total_steps = checks.check_count("total_steps", total_steps)
  checks.check_decay(decay)
  start_step = checks.check_warmup_steps(warmup_steps, total_steps,
                                         default_fraction=schedules.DEFAULT_WARMUP_FRACTION)
  checks.check_fraction("report_threshold", report_threshold)
  if threshold is None:
    threshold = schedules.freeze_threshold_schedule(total_steps, warmup_steps=start_step)
  elif not callable(threshold):
    checks.check_fraction("threshold", threshold)
  name = "freeze_oscillations"

  def threshold_at(step):
    value = threshold(step) if callable(threshold) else threshold
    return jnp.where(step < start_step, jnp.inf, jnp.asarray(value, jnp.float32))

  def init_fn(params):
    if params is None:
      raise ValueError(tracking.no_params_message(name))
    initial_codes, concrete = codes_tree.concrete_codes(codes_fn, params)
    layout = codes_tree.quantized_layout(initial_codes, params, name)
    if concrete:
      codes_tree.check_integer_codes(layout.codes_def, initial_codes, layout.quantized)
      _check_code_range(layout, initial_codes)
      codes_tree.match_scales(scale_fn(params), layout)
    else:
      codes_tree.match_scales(jax.eval_shape(scale_fn, params), layout)
    codes = codes_tree.quantized_only(layout, layout.codes_def.flatten_up_to(codes_fn(params)))
    layers = len(codes)
    return FreezeOscillationsState(
        tracker=tracking.init_tracker(layout, params),
        code_ema=codes_tree.per_weight_tree(layout, [_code_units(c) for c in codes]),
        frozen=codes_tree.per_weight_tree(layout, [jnp.zeros_like(c, dtype=jnp.bool_) for c in codes]),
        freeze_threshold=jnp.asarray(threshold_at(jnp.zeros([], jnp.int32)), jnp.float32),
        frozen_fraction=jnp.zeros([layers], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(tracking.no_params_message(name))
    step_codes_fn = codes_tree.with_extra_args(codes_fn, extra_args)
    codes_now = step_codes_fn(params)
    layout = codes_tree.quantized_layout(codes_now, params, name)
    _check_code_range(layout, codes_now)  # concrete codes only (an update outside jit)
    scales = codes_tree.match_scales(
        codes_tree.with_extra_args(scale_fn, extra_args)(params), layout)
    step = state.tracker.osc_step
    threshold_now = threshold_at(step)
    limit = threshold_now * tracking.FREQUENCY_ONE

    update_slots = codes_tree.flatten_like(layout.codes_def, updates, "updates")
    param_slots = layout.codes_def.flatten_up_to(params)
    code_slots = layout.codes_def.flatten_up_to(codes_now)
    frequencies = iter(codes_tree.quantized_state_slots(
        layout, state.tracker.oscillation_frequency, name))
    emas = iter(codes_tree.quantized_state_slots(layout, state.code_ema, name))
    frozen_masks = iter(codes_tree.quantized_state_slots(layout, state.frozen, name))
    scale_iter = iter(scales)

    new_slots, frozen_now, ema_before, incoming = [], [], [], []
    for update, param, code, q in zip(update_slots, param_slots, code_slots, layout.quantized):
      if not q:
        new_slots.append(update)
        continue
      frequency, ema = next(frequencies), next(emas)
      frozen, scale = next(frozen_masks), next(scale_iter)
      # A code outside the EMA's range cannot be frozen at its own value: leave it.
      representable = (code >= CODE_EMA_RANGE[0]) & (code <= CODE_EMA_RANGE[1])
      newly = ~frozen & (frequency.astype(jnp.float32) > limit) & representable
      frozen = frozen | newly
      ema_code = jnp.round(ema.astype(jnp.float32) / CODE_EMA_ONE)
      # A weight frozen earlier sits on its grid point: its own code is the frozen one.
      frozen_code = jnp.where(newly, ema_code, code.astype(jnp.float32))
      work = jnp.promote_types(param.dtype, jnp.float32)
      target = (frozen_code.astype(work) * jnp.asarray(scale, work)).astype(param.dtype)
      new_slots.append(jnp.where(frozen, _landing_update(param, target, update), update))
      frozen_now.append(frozen)
      ema_before.append(ema)
      incoming.append(update)
    new_updates = layout.codes_def.unflatten(new_slots)

    codes_after = codes_tree.quantized_only(layout, codes_tree.flatten_like(
        layout.codes_def, step_codes_fn(optax.apply_updates(params, new_updates)),
        "codes_fn(new params)"))
    codes_before = codes_tree.quantized_only(layout, code_slots)
    tracker, finite = tracking.update_tracker(state.tracker, layout, codes_before, codes_after,
                                              incoming, decay, report_threshold, name, frozen_now)
    new_emas = []
    for layer, (ema, after, ok) in enumerate(zip(ema_before, codes_after, finite)):
      after = after.astype(jnp.float32)
      target = jnp.where(jnp.isfinite(after), after * CODE_EMA_ONE, ema.astype(jnp.float32))
      updated = fixed_point_ema.stochastic_ema(
          ema, target, decay, fixed_point_ema.step_key(CODE_EMA_SEED, step, layer), -32768, 32767)
      new_emas.append(jnp.where(ok, updated, ema))
    new_state = FreezeOscillationsState(
        tracker=tracker,
        code_ema=codes_tree.per_weight_tree(layout, new_emas),
        frozen=codes_tree.per_weight_tree(layout, frozen_now),
        freeze_threshold=jnp.asarray(threshold_now, jnp.float32),
        frozen_fraction=jnp.stack([codes_tree.fraction_true(f) for f in frozen_now]),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
