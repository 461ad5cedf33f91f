"""Weight oscillations in QAT: tracking, iterative freezing and the dampening loss.

With a straight-through estimator, a latent weight whose optimum lies between
two grid points oscillates around the rounding boundary between them. This
module measures such oscillations per weight (:func:`track_oscillations`),
freezes weights that oscillate too often (:func:`freeze_oscillations`), and
provides the regulariser that dampens them (:func:`dampening_loss`), with the
schedules the paper uses for both.

An oscillation at step ``t``: the integer code of a weight changes and the
direction of the change is opposite to that of its last non-zero change. Its
frequency is the EMA ``f = m * osc + (1 - m) * f``.

References:
  Nagel, Fournarakis, Bondarenko, Blankevoort, `Overcoming Oscillations in
  Quantization-Aware Training <https://arxiv.org/abs/2203.11086>`_, ICML 2022.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trquant import checks
from trquant import quantizers
from trquant import codes_tree

CodesFn = Callable[[Any], Any]
ScaleFn = Callable[[Any], Any]

# Frequencies are uint16 fixed point: f = q / FREQUENCY_ONE, so f = 1 is representable.
FREQUENCY_ONE = 65535
# The EMA of a weight's integer code is int16 fixed point in units of 1 / CODE_EMA_ONE,
# which holds codes in [-128, 127] (signed grids up to 8 bits).
CODE_EMA_ONE = 256
CODE_EMA_RANGE = (-128, 127)  # codes the int16 EMA holds: signed grids up to 8 bits
DEFAULT_OSCILLATING_THRESHOLD = 0.005
# Stochastic rounding draws from fixed keys folded with the step: runs are reproducible
# and a restored state continues bit-identically.
_FREQUENCY_SEED = 0x05C1
_CODE_EMA_SEED = 0xF2EE

_NO_PARAMS_MSG = (
    "{name} needs the current parameters to read the integer codes: call"
    " `tx.update(updates, state, params)`. optax.chain, optax.partition and"
    " nnx.Optimizer pass them for you."
)


class OscillationState(NamedTuple):
  """State of :func:`track_oscillations`.

  Per-weight fields are trees with the structure of ``codes_fn(params)``: an
  array of the parameter's shape for each quantized leaf, None elsewhere. Per-layer
  vectors have one entry per quantized leaf, in tree-flatten order.
  """

  osc_step: jax.Array  # shape=(), int32: number of updates seen
  oscillation_frequency: Any  # param-shaped, uint16: f = value / 65535, EMA of oscillations
  last_direction: Any  # param-shaped, int8 in {-1, 0, 1}: sign of the last non-zero code change
  oscillation_count: jax.Array  # shape=(layers,), int32: oscillations caused by the last update
  oscillating_fraction: jax.Array  # shape=(layers,), float32: fraction with f > threshold


class FreezeOscillationsState(NamedTuple):
  """State of :func:`freeze_oscillations`: a tracker plus the freezing state.

  ``optax.tree.get`` reaches the tracker's fields (e.g. ``"oscillating_fraction"``)
  through it.
  """

  tracker: OscillationState  # the oscillation tracker of the same weights
  code_ema: Any  # param-shaped, int16: EMA of the integer code, value / 256
  frozen: Any  # param-shaped, bool: weights frozen for good
  freeze_threshold: jax.Array  # shape=(), float32: threshold used at the last step (inf: none)
  frozen_fraction: jax.Array  # shape=(layers,), float32: fraction of weights frozen


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def _is_number(value) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, (bool, np.bool_))


def _check_momentum(momentum):
  if isinstance(momentum, (bool, np.bool_)):
    raise ValueError(f"`momentum` must be a number in (0, 1], got {momentum!r}.")
  if _is_number(momentum) and not 0.0 < float(momentum) <= 1.0:
    raise ValueError(f"`momentum` must be in (0, 1] (the paper uses 1e-3), got {momentum!r}.")


def _check_fraction(name: str, value):
  if isinstance(value, jax.Array):
    return  # a traced value (e.g. under optax.inject_hyperparams) cannot be checked here
  if not _is_number(value):
    raise ValueError(f"`{name}` must be a number, got {value!r}.")
  if not 0.0 < float(value) <= 1.0:
    raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")


def _check_total_steps(total_steps) -> int:
  if isinstance(total_steps, (bool, np.bool_)) or not isinstance(total_steps, numbers.Integral):
    raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}.")
  if total_steps <= 0:
    raise ValueError(f"`total_steps` must be a positive int, got {total_steps!r}.")
  return int(total_steps)


def _check_start_fraction(start_fraction):
  if not _is_number(start_fraction) or not 0.0 <= float(start_fraction) < 1.0:
    raise ValueError(f"`start_fraction` must be in [0, 1), got {start_fraction!r}.")


def _check_codes_fn(codes_fn, name: str = "codes_fn"):
  if not callable(codes_fn):
    raise ValueError(f"`{name}` must be a callable params -> tree, got {codes_fn!r}.")


# ---------------------------------------------------------------------------------------
# Fixed-point EMAs with stochastic rounding
# ---------------------------------------------------------------------------------------


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
  """Threefry-2x32 (20 rounds), unrolled: the hash behind jax.random's default keys.

  jax lowers it on CPU as a rolled loop of 5 iterations, each a pass over two uint32
  arrays of the weights' size, which made the random draws most of the oscillation
  transforms' cost; unrolled, the hash fuses into the EMA update's single pass.
  """
  def rotate_left(x, d):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))

  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ rotate_left(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _uniform(key, shape):
  """``jax.random.uniform(key, shape, jnp.float32)``, bit for bit, as fusible elementwise ops.

  Computed here for jax's default threefry keys with partitionable bits (counter = the
  flat index); any other key implementation or configuration uses jax.random itself.
  """
  size = math.prod(shape)
  if (str(jax.random.key_impl(key)) != "threefry2x32" or not jax.config.jax_threefry_partitionable
      or size == 0 or size >= 2**32):
    return jax.random.uniform(key, shape, jnp.float32)
  k1, k2 = jax.random.key_data(key)
  strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
  counts = sum(jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
               for axis, stride in enumerate(strides)) if shape else jnp.zeros((), jnp.uint32)
  bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), counts)
  # jax.random.uniform's mapping: 23 random mantissa bits with exponent 0, minus 1.
  mantissa = ((bits1 ^ bits2) >> np.uint32(9)) | np.uint32(0x3F800000)
  return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)


def _stochastic_ema(stored, target, momentum, key, lo: int, hi: int):
  """``stored + momentum * (target - stored)`` rounded stochastically to an integer.

  ``stored`` is an integer array, ``target`` a float32 array in the same units. The
  increment is rounded down or up with probabilities that make the result exact in
  expectation, so small decrements (``m * f`` is far below one unit) are not lost
  the way a low-precision float EMA loses them.
  """
  delta = jnp.asarray(momentum, jnp.float32) * (target - stored.astype(jnp.float32))
  whole = jnp.floor(delta)
  round_up = _uniform(key, delta.shape) < delta - whole
  new = stored.astype(jnp.int32) + whole.astype(jnp.int32) + round_up.astype(jnp.int32)
  return jnp.clip(new, lo, hi).astype(stored.dtype)


def _leaf_key(seed: int, step, slot: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), slot)


class _Tracked(NamedTuple):
  frequency: jax.Array
  direction: jax.Array
  oscillated: jax.Array


def _track_leaf(before, after, frequency, direction, momentum, key) -> _Tracked:
  """One tracking step on one quantized leaf, from its codes before and after the update."""
  before = before.astype(jnp.float32)
  after = after.astype(jnp.float32)
  # A non-finite code (NaN weight) counts as no change, so it cannot poison the state.
  delta = jnp.where(jnp.isfinite(before) & jnp.isfinite(after), after - before, 0.0)
  step_direction = jnp.sign(delta).astype(jnp.int8)
  changed = step_direction != 0
  oscillated = changed & (step_direction * direction == -1)
  target = jnp.where(oscillated, float(FREQUENCY_ONE), 0.0)
  frequency = _stochastic_ema(frequency, target, momentum, key, 0, FREQUENCY_ONE)
  direction = jnp.where(changed, step_direction, direction)
  return _Tracked(frequency, direction, oscillated)


def _oscillating_fraction(frequency, threshold, frozen=None) -> jax.Array:
  limit = jnp.asarray(threshold, jnp.float32) * FREQUENCY_ONE
  oscillating = frequency.astype(jnp.float32) > limit
  if frozen is not None:  # a frozen weight no longer moves, whatever its decaying f says
    oscillating = oscillating & ~frozen
  return _mean(oscillating)


def _mean(mask) -> jax.Array:
  """``jnp.mean(mask, dtype=jnp.float32)`` of a boolean array, with codes_tree's count."""
  return codes_tree.count_true(mask).astype(jnp.float32) / np.float32(mask.size)


class _Layout(NamedTuple):
  """How codes_fn(params) sees params: the codes treedef and which of its leaves are quantized."""

  codes_def: Any
  quantized: list
  shapes: list


def _layout(codes, params, name: str) -> _Layout:
  codes_def, quantized = codes_tree.match_codes(codes, params)
  if not any(quantized):
    raise ValueError(
        f"codes_fn(params) marks no leaf as quantized (all None): {name} has nothing to"
        " track. Return codes for the quantized weights."
    )
  shapes = [tuple(leaf.shape) if q else None
            for leaf, q in zip(codes_def.flatten_up_to(codes), quantized)]
  return _Layout(codes_def, quantized, shapes)


def _per_weight_tree(layout: _Layout, arrays) -> Any:
  """The codes tree with `arrays` (one per quantized leaf, in order) and None elsewhere."""
  arrays = iter(arrays)
  return layout.codes_def.unflatten([next(arrays) if q else None for q in layout.quantized])


def _quantized_slots(layout: _Layout, tree, name: str) -> list:
  """The quantized entries of a per-weight state tree, checked against the layout."""
  slots = codes_tree.flatten_like(layout.codes_def, tree, name)
  out = []
  for slot, (value, q) in enumerate(zip(slots, layout.quantized)):
    if not q:
      continue
    if value is None or tuple(np.shape(value)) != layout.shapes[slot]:
      raise ValueError(
          f"the {name} state does not match codes_fn(params) (a quantized leaf has shape"
          f" {layout.shapes[slot]}, the state {None if value is None else np.shape(value)}):"
          " the quantized leaves changed since init."
      )
    out.append(value)
  return out


def _init_tracker(layout: _Layout, params) -> OscillationState:
  param_slots = layout.codes_def.flatten_up_to(params)
  quantized_params = [p for p, q in zip(param_slots, layout.quantized) if q]
  layers = len(quantized_params)
  # zeros_like keeps a concrete parameter's sharding: the state is laid out like the weights.
  return OscillationState(
      osc_step=jnp.zeros([], jnp.int32),
      oscillation_frequency=_per_weight_tree(
          layout, [jnp.zeros_like(p, dtype=jnp.uint16) for p in quantized_params]),
      last_direction=_per_weight_tree(
          layout, [jnp.zeros_like(p, dtype=jnp.int8) for p in quantized_params]),
      oscillation_count=jnp.zeros([layers], jnp.int32),
      oscillating_fraction=jnp.zeros([layers], jnp.float32),
  )


def _update_tracker(state: OscillationState, layout: _Layout, codes_before, codes_after,
                    updates, momentum, threshold, name: str, frozen=None):
  """Advances the tracker given the codes before/after the applied update, per quantized leaf.

  `codes_before`, `codes_after`, the incoming `updates` (and `frozen` masks, not counted
  as oscillating) are lists over the quantized leaves; a layer whose incoming update was
  not finite keeps its state and counts nothing. Returns the new state and, per layer,
  whether its update was finite.
  """
  frozen = frozen if frozen is not None else [None] * len(codes_before)
  frequencies = _quantized_slots(layout, state.oscillation_frequency, name)
  directions = _quantized_slots(layout, state.last_direction, name)
  new_frequencies, new_directions, counts, fractions, finite = [], [], [], [], []
  for layer, (before, after, frequency, direction, update, mask) in enumerate(
      zip(codes_before, codes_after, frequencies, directions, updates, frozen)):
    tracked = _track_leaf(before, after, frequency, direction, momentum,
                          _leaf_key(_FREQUENCY_SEED, state.osc_step, layer))
    # One pass counts the oscillations and checks the update.
    count, ok = codes_tree.count_finite(tracked.oscillated, update)
    new_frequencies.append(jnp.where(ok, tracked.frequency, frequency))
    new_directions.append(jnp.where(ok, tracked.direction, direction))
    counts.append(jnp.where(ok, count, 0))
    fractions.append(_oscillating_fraction(new_frequencies[-1], threshold, mask))
    finite.append(ok)
  return OscillationState(
      osc_step=optax.safe_increment(state.osc_step),
      oscillation_frequency=_per_weight_tree(layout, new_frequencies),
      last_direction=_per_weight_tree(layout, new_directions),
      oscillation_count=jnp.stack(counts),
      oscillating_fraction=jnp.stack(fractions),
  ), finite


def _split(layout: _Layout, slots) -> list:
  return [value for value, q in zip(slots, layout.quantized) if q]


# ---------------------------------------------------------------------------------------
# Tracking
# ---------------------------------------------------------------------------------------


def track_oscillations(
    codes_fn: CodesFn,
    *,
    momentum: float = 1e-3,
    threshold: float = DEFAULT_OSCILLATING_THRESHOLD,
) -> optax.GradientTransformationExtraArgs:
  r"""Tracks how often each quantized weight oscillates; leaves the updates unchanged.

  Place it last in a chain (after the optimizer and any transform that rescales
  the step), so that it sees the update that is applied:
  ``optax.chain(optax.sgd(lr), trquant.track_oscillations(codes_fn))``.

  At each step, with ``c0 = codes_fn(params)`` and ``c1 =
  codes_fn(optax.apply_updates(params, updates))`` (the codes before and after
  this very update; no copy of the codes is stored):

  * an oscillation is ``c1 != c0`` with ``sign(c1 - c0)`` opposite to the stored
    direction of the weight's last non-zero change (a first change is none);
  * ``f = m * osc + (1 - m) * f`` per weight;
  * the direction is updated where the code changed.

  The frequency is a uint16 fixed-point number (``f = value / 65535``) updated
  with unbiased stochastic rounding (``jax.random.fold_in`` of a fixed key with
  the step count), so it is exact in expectation: with ``m = 1e-3`` the decrement
  ``m * f`` is far below the resolution of a half-precision float, and a bfloat16
  EMA never decays (``1 - m`` rounds to 1) while a float16 one is biased. For
  oscillations at a constant rate of 0.002 / 0.02 / 0.2 per step (4096 weights,
  20000 steps), the mean f was 0.00198 / 0.02004 / 0.19992 in float32,
  0.00218 / 0.02272 / 0.18820 in float16, 0.039 / 0.496 / 0.500 in bfloat16, and
  0.00198 / 0.02004 / 0.19992 with this uint16 scheme (per-weight deviation
  from float32: standard deviation 1.5e-4).

  Memory: 3 bytes of state per quantized weight (uint16 frequency, int8
  direction), plus per-layer vectors.

  Non-finite updates: a quantized leaf whose incoming update has a NaN or inf
  keeps its per-weight state and counts no oscillation for that step.

  Args:
    codes_fn: ``params -> tree`` of the integer codes of each quantized weight,
      with the structure of ``params`` (or a prefix of it) and ``None`` for leaves
      that are not quantized, as for :func:`trquant.tr_schedule` (e.g.
      ``trquant.nnx.codes_fn(model)``). It must be jit-traceable. ``init`` checks
      that the codes of the initial params are integers.
    momentum: ``m`` of the frequency EMA, in ``(0, 1]``.
    threshold: a weight counts as oscillating when ``f > threshold``; in ``(0, 1]``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`OscillationState`. ``optax.tree.get(state, "oscillating_fraction")``
    gives one value per quantized leaf, in tree order.

  Raises:
    ValueError: on invalid arguments, when ``params`` is not passed to
      ``update``, or when ``codes_fn(params)`` does not match ``params`` or returns
      non-integer codes at ``init``.

  References:
    Nagel et al., `Overcoming Oscillations in Quantization-Aware Training
    <https://arxiv.org/abs/2203.11086>`_, ICML 2022, Section 4.2.

  Example:
    >>> import jax, jax.numpy as jnp, optax, trquant
    >>> params = {"w": jnp.array([0.45, 1.2, -0.3]), "b": jnp.zeros(2)}
    >>> codes_fn = lambda p: {"w": trquant.quantize(p["w"], 1.0, bits=3), "b": None}
    >>> tx = optax.chain(optax.sgd(0.1), trquant.track_oscillations(codes_fn, momentum=0.5))
    >>> state = tx.init(params)
    >>> for g in (-1.0, 1.0, -1.0):  # w[0] crosses 0.5 up, down, up
    ...   grads = {"w": jnp.array([g, 0.0, 0.0]), "b": jnp.zeros(2)}
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> optax.tree.get(state, "oscillation_count")
    Array([1], dtype=int32)
  """
  _check_codes_fn(codes_fn)
  _check_momentum(momentum)
  _check_fraction("threshold", threshold)
  name = "track_oscillations"

  def init_fn(params):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG.format(name=name))
    codes, concrete = codes_tree.concrete_codes(codes_fn, params)
    layout = _layout(codes, params, name)
    if concrete:
      codes_tree.check_integer_codes(layout.codes_def, codes, layout.quantized)
    return _init_tracker(layout, params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG.format(name=name))
    codes_before = codes_fn(params)
    layout = _layout(codes_before, params, name)
    update_slots = _split(layout, codes_tree.flatten_like(layout.codes_def, updates, "updates"))
    codes_after = codes_fn(optax.apply_updates(params, updates))
    new_state, _ = _update_tracker(
        state, layout, _split(layout, layout.codes_def.flatten_up_to(codes_before)),
        _split(layout, codes_tree.flatten_like(layout.codes_def, codes_after, "codes_fn(new params)")),
        update_slots, momentum, threshold, name)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------


def _cosine_from(step, start_step: int, total_steps: int, init_value: float, end_value: float):
  span = max(total_steps - start_step, 1)
  progress = jnp.clip((jnp.asarray(step, jnp.float32) - start_step) / span, 0.0, 1.0)
  return end_value + 0.5 * (init_value - end_value) * (1.0 + jnp.cos(jnp.pi * progress))


def freeze_threshold_schedule(
    total_steps: int,
    *,
    init_value: float = 0.1,
    end_value: float = 0.01,
    start_fraction: float = 0.25,
) -> optax.Schedule:
  """The paper's freezing threshold: none for a warm-up, then a cosine from 0.1 to 0.01.

  Args:
    total_steps: number of training steps (positive).
    init_value: threshold when freezing starts, in ``(0, 1]``.
    end_value: threshold at ``total_steps``, in ``(0, 1]`` (0.01 for MobileNetV2
      at 4 bits, 0.011 at 3 bits in the reference code).
    start_fraction: fraction of ``total_steps`` without freezing, in ``[0, 1)``.

  Returns:
    A schedule ``step -> threshold`` (float32): ``inf`` (no weight can exceed it)
    for ``step < ceil(start_fraction * total_steps)``, then a cosine from
    ``init_value`` to ``end_value``, constant afterwards.

  Example:
    >>> import trquant
    >>> schedule = trquant.freeze_threshold_schedule(1000)
    >>> [round(float(schedule(s)), 4) for s in (0, 250, 625, 1000)]
    [inf, 0.1, 0.055, 0.01]
  """
  total_steps = _check_total_steps(total_steps)
  _check_fraction("init_value", init_value)
  _check_fraction("end_value", end_value)
  _check_start_fraction(start_fraction)
  start_step = math.ceil(start_fraction * total_steps)

  def schedule(step):
    value = _cosine_from(step, start_step, total_steps, init_value, end_value)
    return jnp.where(jnp.asarray(step) < start_step, jnp.inf, value).astype(jnp.float32)

  return schedule


def dampening_weight_schedule(
    total_steps: int,
    *,
    end_value: float = 0.1,
    start_fraction: float = 0.25,
) -> optax.Schedule:
  """The paper's weight (lambda) of the dampening loss: 0 for a warm-up, then a cosine ramp.

  Args:
    total_steps: number of training steps (positive).
    end_value: weight reached at ``total_steps`` (non-negative; the paper uses 0.1).
    start_fraction: fraction of ``total_steps`` with weight 0, in ``[0, 1)``.

  Returns:
    A schedule ``step -> lambda`` (float32): 0 until ``ceil(start_fraction *
    total_steps)``, then ``end_value * (1 - cos(pi * progress)) / 2``.

  Example:
    >>> import trquant
    >>> schedule = trquant.dampening_weight_schedule(1000)
    >>> [round(float(schedule(s)), 4) for s in (0, 250, 625, 1000)]
    [0.0, 0.0, 0.05, 0.1]
  """
  total_steps = _check_total_steps(total_steps)
  if not _is_number(end_value) or not (math.isfinite(end_value) and end_value >= 0):
    raise ValueError(f"`end_value` must be a non-negative number, got {end_value!r}.")
  _check_start_fraction(start_fraction)
  start_step = math.ceil(start_fraction * total_steps)

  def schedule(step):
    return _cosine_from(step, start_step, total_steps, 0.0, float(end_value)).astype(jnp.float32)

  return schedule


# ---------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------


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


def freeze_oscillations(
    codes_fn: CodesFn,
    scale_fn: ScaleFn,
    *,
    total_steps: int,
    threshold: Union[None, float, optax.Schedule] = None,
    momentum: float = 1e-3,
    start_fraction: float = 0.25,
    report_threshold: float = DEFAULT_OSCILLATING_THRESHOLD,
) -> optax.GradientTransformationExtraArgs:
  r"""Iterative weight freezing: weights that oscillate too often are frozen on a grid point.

  Place it last in the chain, after the optimizer (and after
  :func:`trquant.tr_schedule` if used)::

    optax.chain(optax.adam(lr), trquant.tr_schedule(...),
                trquant.freeze_oscillations(codes_fn, scale_fn, total_steps=n))

  It tracks oscillations exactly as :func:`track_oscillations` and keeps an EMA
  (same momentum) of each weight's integer code. At step ``t`` (from 0), with
  ``threshold_t`` (no freezing while ``t < ceil(start_fraction * total_steps)``):

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
      ``trquant.nnx.scales_fn(model)``). Scales should be frozen: a moving scale
      moves frozen weights with it.
    total_steps: number of training steps (positive), for the warm-up.
    threshold: freezing threshold on ``f``, a float in ``(0, 1]`` or a schedule
      ``step -> threshold`` (values above 1, e.g. inf, freeze nothing). None uses
      :func:`freeze_threshold_schedule` ``(total_steps, start_fraction=start_fraction)``:
      a cosine from 0.1 to 0.01 after the warm-up.
    momentum: ``m`` of the frequency and code EMAs, in ``(0, 1]``; keep it 2-3
      times below the threshold.
    start_fraction: fraction of ``total_steps`` without freezing, in ``[0, 1)``.
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
    ...     codes_fn, scale_fn, total_steps=100, threshold=0.2, momentum=0.1, start_fraction=0.0))
    >>> state = tx.init(params)
    >>> for _ in range(30):  # the STE gradient of (w_q - 0.5)^2 / 2 drives w[0] across 0.5 and back
    ...   codes = codes_fn(params)["w"]
    ...   grads = {"w": jnp.array([codes[0] - 0.5, 0.0])}
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> optax.tree.get(state, "frozen_fraction"), float(params["w"][0]) in (0.0, 1.0)
    (Array([0.5], dtype=float32), True)
  """
  _check_codes_fn(codes_fn)
  _check_codes_fn(scale_fn, "scale_fn")
  total_steps = _check_total_steps(total_steps)
  _check_momentum(momentum)
  _check_start_fraction(start_fraction)
  _check_fraction("report_threshold", report_threshold)
  if threshold is None:
    threshold = freeze_threshold_schedule(total_steps, start_fraction=start_fraction)
  elif not callable(threshold):
    _check_fraction("threshold", threshold)
  start_step = math.ceil(start_fraction * total_steps)
  name = "freeze_oscillations"

  def threshold_at(step):
    value = threshold(step) if callable(threshold) else threshold
    return jnp.where(step < start_step, jnp.inf, jnp.asarray(value, jnp.float32))

  def init_fn(params):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG.format(name=name))
    initial_codes, concrete = codes_tree.concrete_codes(codes_fn, params)
    layout = _layout(initial_codes, params, name)
    if concrete:
      codes_tree.check_integer_codes(layout.codes_def, initial_codes, layout.quantized)
      _check_code_range(layout, initial_codes)
      _match_scales(scale_fn(params), layout)
    else:
      _match_scales(jax.eval_shape(scale_fn, params), layout)
    codes = _split(layout, layout.codes_def.flatten_up_to(codes_fn(params)))
    layers = len(codes)
    return FreezeOscillationsState(
        tracker=_init_tracker(layout, params),
        code_ema=_per_weight_tree(layout, [_code_units(c) for c in codes]),
        frozen=_per_weight_tree(layout, [jnp.zeros_like(c, dtype=jnp.bool_) for c in codes]),
        freeze_threshold=jnp.asarray(threshold_at(jnp.zeros([], jnp.int32)), jnp.float32),
        frozen_fraction=jnp.zeros([layers], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(_NO_PARAMS_MSG.format(name=name))
    codes_now = codes_fn(params)
    layout = _layout(codes_now, params, name)
    _check_code_range(layout, codes_now)  # concrete codes only (an update outside jit)
    scales = _match_scales(scale_fn(params), layout)
    step = state.tracker.osc_step
    threshold_now = threshold_at(step)
    limit = threshold_now * FREQUENCY_ONE

    update_slots = codes_tree.flatten_like(layout.codes_def, updates, "updates")
    param_slots = layout.codes_def.flatten_up_to(params)
    code_slots = layout.codes_def.flatten_up_to(codes_now)
    frequencies = iter(_quantized_slots(layout, state.tracker.oscillation_frequency, name))
    emas = iter(_quantized_slots(layout, state.code_ema, name))
    frozen_masks = iter(_quantized_slots(layout, state.frozen, name))
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

    codes_after = _split(layout, codes_tree.flatten_like(
        layout.codes_def, codes_fn(optax.apply_updates(params, new_updates)),
        "codes_fn(new params)"))
    codes_before = _split(layout, code_slots)
    tracker, finite = _update_tracker(state.tracker, layout, codes_before, codes_after, incoming,
                                      momentum, report_threshold, name, frozen_now)
    new_emas = []
    for layer, (ema, after, ok) in enumerate(zip(ema_before, codes_after, finite)):
      after = after.astype(jnp.float32)
      target = jnp.where(jnp.isfinite(after), after * CODE_EMA_ONE, ema.astype(jnp.float32))
      updated = _stochastic_ema(ema, target, momentum, _leaf_key(_CODE_EMA_SEED, step, layer),
                                -32768, 32767)
      new_emas.append(jnp.where(ok, updated, ema))
    new_state = FreezeOscillationsState(
        tracker=tracker,
        code_ema=_per_weight_tree(layout, new_emas),
        frozen=_per_weight_tree(layout, frozen_now),
        freeze_threshold=jnp.asarray(threshold_now, jnp.float32),
        frozen_fraction=jnp.stack([_mean(f) for f in frozen_now]),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _code_units(codes):
  """Codes as int16 fixed point (units of 1 / CODE_EMA_ONE), the initial code EMA."""
  units = jnp.round(codes.astype(jnp.float32) * CODE_EMA_ONE)
  units = jnp.where(jnp.isfinite(units), units, 0.0)
  return jnp.clip(units, -32768, 32767).astype(jnp.int16)


def _check_code_range(layout: _Layout, codes) -> None:
  """Raises a ValueError naming the first quantized leaf whose (concrete) codes lie
  outside the range the int16 code EMA holds; traced codes are not checked."""
  lo, hi = CODE_EMA_RANGE
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(
      layout.codes_def.unflatten(list(range(len(layout.quantized)))))[0]]
  for path, leaf, q in zip(paths, layout.codes_def.flatten_up_to(codes), layout.quantized):
    if not q or isinstance(leaf, jax.core.Tracer):
      continue
    leaf = jnp.asarray(leaf)
    outside = jnp.isfinite(leaf) & ((leaf < lo) | (leaf > hi))
    if bool(jnp.any(outside)):
      # On the host: a sharded array cannot be flattened on its devices without a layout.
      example = float(np.asarray(leaf)[np.asarray(outside)][0])
      raise ValueError(
          f"codes_fn(params) returned the code {example:g} at {codes_tree.path_str(path)}, outside"
          f" [{lo}, {hi}]: freeze_oscillations keeps each weight's code EMA in int16 fixed"
          " point, which holds signed grids up to 8 bits. Quantize such layers to 8 bits"
          " or fewer (signed), or leave them out of freezing (None in codes_fn)."
      )


def _match_scales(scales, layout: _Layout) -> list:
  """The scale of each quantized leaf; ValueError naming the path on a mismatch."""
  try:
    slots = layout.codes_def.flatten_up_to(scales)
  except (ValueError, TypeError) as error:
    raise ValueError(
        "scale_fn(params) must return a tree with the structure of codes_fn(params): a"
        f" scale for each quantized leaf, None elsewhere: {error}"
    ) from error
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(
      layout.codes_def.unflatten(list(range(len(layout.quantized)))))[0]]
  out = []
  for path, scale, q, shape in zip(paths, slots, layout.quantized, layout.shapes):
    if not q:
      continue
    if scale is None:
      raise ValueError(f"scale_fn(params) returned None at {codes_tree.path_str(path)}, which codes_fn"
                       " marks as quantized.")
    scale_shape = tuple(np.shape(scale))
    try:
      ok = np.broadcast_shapes(shape, scale_shape) == shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"scale_fn(params) returned a scale of shape {scale_shape} at"
                       f" {codes_tree.path_str(path)}, which does not broadcast to the parameter's"
                       f" shape {shape}.")
    try:  # values can be checked where they are concrete
      checks.check_scale_values(scale, "scale")
    except ValueError as error:
      raise ValueError(f"scale_fn(params) at {codes_tree.path_str(path)}: {error}") from None
    out.append(scale)
  return out


# ---------------------------------------------------------------------------------------
# Dampening loss
# ---------------------------------------------------------------------------------------

AGGREGATIONS = ("kernel_mean", "sum", "mean")


def dampening_loss(w, scale, *, bits: int, signed: bool = True, narrow: bool = False,
                   aggregation: str = "kernel_mean"):
  r"""Oscillation dampening: ``(stop_gradient(w_q) - clip(w, s * lo, s * hi))^2``, aggregated.

  Pulls each latent weight towards the centre of its current bin, which stops
  it from oscillating around a rounding boundary. ``w_q = s * clip(round(w / s),
  lo, hi)`` is a constant for the gradient; clipping ``w`` to the grid's range
  leaves weights outside it (already at ``lo`` / ``hi``) alone. Add
  ``lam(step) * dampening_loss(...)`` to the task loss, with ``lam`` from
  :func:`dampening_weight_schedule`.

  Args:
    w: latent weights, e.g. a Flax kernel whose last axis is the output channel.
    scale: positive step size, a scalar or a keep-dims array (per-channel).
    bits: bit width in ``[1, 16]``; ``bits=1, signed=True`` is binary.
    signed: signed or unsigned grid.
    narrow: symmetric signed grid.
    aggregation: ``"kernel_mean"`` (sum over the output channels, the last axis,
      and mean over the rest; the reference default), ``"sum"`` or ``"mean"``.

  Returns:
    A scalar, in float32 (or the inputs' wider floating dtype).

  References:
    Nagel et al., `Overcoming Oscillations in Quantization-Aware Training
    <https://arxiv.org/abs/2203.11086>`_, ICML 2022, Eq. 7.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> w = jnp.array([[0.4, -0.2], [1.3, 9.0]])
    >>> trquant.dampening_loss(w, 1.0, bits=3)  # ((.4^2 + .2^2) + (.3^2 + 0)) / 2 rows
    Array(0.145, dtype=float32)
    >>> jax.grad(lambda w: trquant.dampening_loss(w, 1.0, bits=3))(w)[0]
    Array([ 0.4, -0.2], dtype=float32)
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}.")
  lo, hi = quantizers.quant_range(bits, signed=signed, narrow=narrow)
  checks.check_scale(w, scale)
  w = jnp.asarray(w)
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"`w` must have a floating dtype, got {w.dtype}.")
  dtype = jnp.promote_types(jnp.promote_types(w.dtype, scale.dtype), jnp.float32)
  w, scale = w.astype(dtype), scale.astype(dtype)
  codes = quantizers.quantize(w, scale, bits=bits, signed=signed, narrow=narrow)
  target = jax.lax.stop_gradient(scale * codes)
  loss = jnp.square(target - jnp.clip(w, scale * lo, scale * hi))
  if aggregation == "sum":
    return jnp.sum(loss)
  if aggregation == "mean":
    return jnp.mean(loss)
  if loss.ndim == 0:
    return loss
  return jnp.mean(jnp.sum(loss, axis=-1))
