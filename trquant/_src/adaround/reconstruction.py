"""The reconstruction problem: learn the rounding of a block's weights against its output.

One problem covers AdaRound, BRECQ and QDrop. Given a pure, differentiable
``apply_fn(weights, act_scales, x, key) -> output`` of a block (a residual block, a
transformer block, or one layer: the one-weight case), its full-precision weights and
their step sizes, optional activation step sizes, calibration inputs ``x_q`` and
full-precision targets ``y_fp``, it minimises with Adam::

  ||f_a(apply_fn(W_soft, a, x, k)) - f_a(y)||^2 + lambda * sum_weights sum(1 - |2 h(V) - 1|^beta)

(squared error summed over the last axis, averaged over the rest; ``f_a`` an optional
activation, ``lambda`` 0 during the warm-up, ``beta`` annealed) over every weight's
rounding variables ``V`` (at ``lr``) and the activation step sizes ``a`` (at ``act_lr``,
kept positive). With ``drop_prob > 0`` (QDrop) each element of a mini-batch's input is
the full-precision ``x_fp`` in place of ``x_q`` at random, and ``apply_fn`` gets a fresh
key ``k`` per step for dropping inside the block. The final rounding of each weight is
``clip(floor(w / s) + [V >= 0], lo, hi)``.

* :func:`reconstruction_problem` validates the arguments and returns the
  :class:`Reconstruction` (pure ``init`` / ``step`` / ``run`` / ``finish``) and its
  :class:`ReconstructionArrays`, for callers that drive the loop themselves;
* :func:`reconstruct_block` solves it (one jitted ``lax.scan``, or one jitted step per
  iteration, see :mod:`trquant._src.adaround.loop`) and returns a :class:`ReconstructionResult`;
* :func:`reconstruct_layer` is the one-weight case for a layer ``apply_fn(w, x)``
  (:class:`LayerAsBlock`), returning the same result for one weight;
* :func:`block_error` / :func:`block_errors` and :func:`reconstruction_error` /
  :func:`reconstruction_errors`: the output error of given weights over a data set.

References:
  Nagel, Amjad, van Baalen, Louizos, Blankevoort, `Up or Down? Adaptive Rounding
  for Post-Training Quantization <https://arxiv.org/abs/2004.10568>`_, ICML 2020.
  Li, Gong, Tan, Yang, Hu, Zhang, Yu, Wang, Gu, `BRECQ: Pushing the Limit of
  Post-Training Quantization by Block Reconstruction <https://arxiv.org/abs/2102.05426>`_,
  ICLR 2021.
  Wei, Gong, Li, Liu, Yu, `QDrop: Randomly Dropping Quantization for Extremely
  Low-bit Post-Training Quantization <https://arxiv.org/abs/2203.05740>`_, ICLR 2022.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from trquant._src import checks
from trquant._src import codes_tree
from trquant._src.adaround import loop as loops
from trquant._src.adaround import rounding
from trquant._src.adaround.config import AdaRoundConfig
from trquant._src.adaround.config import check_config

__all__ = [
    "LayerAsBlock",
    "Reconstruction",
    "ReconstructionArrays",
    "ReconstructionResult",
    "block_error",
    "block_errors",
    "reconstruct_block",
    "reconstruct_layer",
    "reconstruction_error",
    "reconstruction_errors",
    "reconstruction_problem",
]

PyTree = Any

# Activation step sizes are kept above this after each update (LSQ scales must stay positive).
_MIN_ACT_SCALE = 1e-8


class ReconstructionResult(NamedTuple):
  """Output of :func:`reconstruct_block` and :func:`reconstruct_layer`.

  ``codes``, ``weights`` and ``V`` have the structure of the weights given: a tuple with
  one entry per weight for :func:`reconstruct_block`, one array for
  :func:`reconstruct_layer`.
  """

  codes: Any  # per weight, its shape and dtype: clip(floor(w / s) + [V >= 0], lo, hi)
  weights: Any  # per weight, its shape and dtype: the hard-rounded weight s * codes
  V: Any  # per weight, float32: the learned rounding variables
  act_scales: Any  # the learned activation step sizes (the tree given, float32), or None
  reconstruction_loss: jax.Array  # (iters,) float32: the output error per mini-batch
  regularization_loss: jax.Array  # (iters,) float32: sum over weights of sum(1 - |2h - 1|^beta)


class ReconstructionArrays(NamedTuple):
  """The arrays of a :class:`Reconstruction`, validated and cast by :func:`reconstruction_problem`."""

  weights: tuple  # full-precision weights
  scales: tuple  # their step sizes, float32
  act_scales: Any  # tree of activation step sizes to learn (float32), or None
  x_q: jax.Array  # the block's inputs (N, ...), in the weights' dtype
  x_fp: jax.Array  # the full-precision inputs (QDrop), or one unused row
  y_fp: jax.Array  # the full-precision outputs (N, ..., channels)
  key: jax.Array  # PRNG key: step t uses fold_in(key, t)


@dataclasses.dataclass(frozen=True)
class LayerAsBlock:
  """A layer's ``apply_fn(w, x)`` as the one-weight block ``(weights, act_scales, x, key)``.

  Hashable (equal for the same ``apply_fn``), so the compiled loop of a layer is reused
  for the next call with the same function.
  """

  apply_fn: Callable

  def __call__(self, weights, act_scales, x, key):
    del act_scales, key
    return self.apply_fn(weights[0], x)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """One reconstruction problem: pure ``init`` / ``step`` / ``run`` / ``finish``.

  Made by :func:`reconstruction_problem`, with its :class:`ReconstructionArrays`.
  :func:`reconstruct_block` scans ``step`` inside one ``jax.jit`` (or steps a jitted
  ``step`` per iteration); the ``adaround`` benchmark also runs it eagerly to measure
  what the fused loop saves. Hashable: it is a static argument of the jitted loop, and
  equal problems share the compilation.

  The carry is ``((Vs, act_scales), (V optimizer state, act optimizer state))``; ``step``
  records ``(reconstruction, regularization)``, the two loss terms of its mini-batch.
  """

  apply_fn: Callable  # (weights, act_scales, x, key) -> output
  grids: tuple  # (lo, hi) per weight
  config: AdaRoundConfig
  activation: Optional[Callable] = None  # f_a applied to the output and the target

  @property
  def iters(self) -> int:
    return self.config.iters

  @property
  def start_step(self) -> int:
    """The first step with the regulariser on (:attr:`AdaRoundConfig.start_step`)."""
    return self.config.start_step

  @property
  def beta_fn(self):
    c = self.config
    return rounding.beta_schedule(c.iters, start=c.beta[0], end=c.beta[1],
                                  warmup_steps=c.warmup_steps, mode=c.beta_mode)

  def init(self, arrays: ReconstructionArrays):
    c = self.config
    Vs = tuple(rounding.init_alpha(w, s, zeta=c.zeta, gamma=c.gamma)
               for w, s in zip(arrays.weights, arrays.scales))
    return ((Vs, arrays.act_scales),
            (optax.adam(c.lr).init(Vs), optax.adam(c.act_lr).init(arrays.act_scales)))

  def loss(self, params, step, weights, scales, xb, yb, key):
    """The loss of a mini-batch and its two terms ``(reconstruction, regularization)``."""
    c = self.config
    Vs, act_scales = params
    beta = self.beta_fn(step)
    soft, regularization = [], 0
    for w, s, V, grid in zip(weights, scales, Vs, self.grids):
      h = rounding.relaxed_rounding(V, c.zeta, c.gamma)
      soft.append(rounding.soft_weight_from_h(w, s, h, grid).astype(w.dtype))
      regularization = regularization + rounding.regularizer_of_h(h, beta)
    out = self.apply_fn(tuple(soft), act_scales, xb, key)
    if self.activation is not None:
      out, yb = self.activation(out), self.activation(yb)
    reconstruction = jnp.mean(jnp.sum(jnp.square(out - yb), axis=-1))
    lam = jnp.where(step >= self.start_step, c.lam, 0.0)
    return reconstruction + lam * regularization, (reconstruction, regularization)

  def step(self, carry, step, arrays: ReconstructionArrays):
    """One Adam step on the mini-batch drawn from ``fold_in(key, step)``."""
    c = self.config
    (Vs, act_scales), (v_state, a_state) = carry
    step_key = jax.random.fold_in(arrays.key, step)
    index = jax.random.randint(step_key, (c.batch_size,), 0, arrays.x_q.shape[0])
    xb = jnp.take(arrays.x_q, index, axis=0)
    drop_key, apply_key = jax.random.split(jax.random.fold_in(step_key, 1))
    if c.drop_prob > 0:
      # QDrop on the block input: the full-precision input with probability p per element.
      keep_fp = jax.random.bernoulli(drop_key, c.drop_prob, xb.shape)
      xb = jnp.where(keep_fp, jnp.take(arrays.x_fp, index, axis=0), xb)
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (_, losses), (v_grads, a_grads) = grad_fn(
        (Vs, act_scales), step, arrays.weights, arrays.scales, xb,
        jnp.take(arrays.y_fp, index, axis=0), apply_key)
    v_updates, v_state = optax.adam(c.lr).update(v_grads, v_state, Vs)
    a_updates, a_state = optax.adam(c.act_lr).update(a_grads, a_state, act_scales)
    act_scales = jax.tree.map(lambda s, u: jnp.maximum(s + u, _MIN_ACT_SCALE), act_scales,
                              a_updates)
    return ((optax.apply_updates(Vs, v_updates), act_scales), (v_state, a_state)), losses

  def run(self, arrays: ReconstructionArrays):
    """The whole optimisation, ``lax.scan`` of :meth:`step`: ``(carry, (rec, reg))``."""
    return jax.lax.scan(lambda carry, step: self.step(carry, step, arrays), self.init(arrays),
                        jnp.arange(self.iters, dtype=jnp.int32))

  def finish(self, arrays: ReconstructionArrays, Vs):
    """``(codes, hard weights)`` per weight from the rounding variables."""
    codes, hard = [], []
    for w, s, V, grid in zip(arrays.weights, arrays.scales, Vs, self.grids):
      c = rounding.hard_codes_on_grid(w, s, V, grid)
      codes.append(c.astype(w.dtype))
      hard.append((s * c).astype(w.dtype))
    return tuple(codes), tuple(hard)

  def solve(self, arrays: ReconstructionArrays) -> ReconstructionResult:
    """Runs the loop as ``config.loop`` says and rounds: the :class:`ReconstructionResult`."""
    loop = loops.resolve_loop(self.config.loop, self.apply_fn, arrays.weights,
                              arrays.act_scales, arrays.x_q[:self.config.batch_size],
                              arrays.key)
    if loop == "scan":
      carry, (reconstruction, regularization) = _run(self, arrays)
    else:
      carry, (reconstruction, regularization) = loops.run_steps(self, arrays)
    (Vs, learned), _ = carry
    codes, hard = loops.finish(self, arrays, Vs)
    return ReconstructionResult(codes, hard, tuple(Vs), learned, reconstruction, regularization)


@functools.partial(jax.jit, static_argnums=0)
def _run(problem: Reconstruction, arrays):
  """The fused loop, compiled once per problem (equal problems share the compilation)."""
  return problem.run(arrays)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _as_tuple(name, value) -> tuple:
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f"`{name}` is empty: a block needs at least one weight.")
    return tuple(value)
  return (value,)


def _check_scale(w, scale, name: str):
  """A concrete, positive, finite step size broadcasting to ``w``, as a float32 array."""
  if isinstance(scale, jax.core.Tracer):
    raise ValueError(f"`{name}` must be a concrete array, not a traced value.")
  if np.size(scale) == 0:
    raise ValueError(f"`{name}` is empty; give a positive step size.")
  # Positive and finite everywhere, also where the scale is sharded across processes.
  checks.check_scale(w, scale, name)
  return jnp.asarray(scale, jnp.float32)


def _replicated(x):
  """`x` replicated when it is sharded over explicit mesh axes: the loop draws example
  rows and reduces over channels, which explicit axes would each ask an output sharding
  for; a layer's calibration data and weights are small enough to be held whole."""
  if isinstance(x, jax.Array) and codes_tree.explicit_sharding(x) is not None:
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return x


def _check_key(key) -> None:
  if not isinstance(key, jax.Array) or not (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32):
    raise ValueError(f"`key` must be a jax PRNG key (jax.random.key(seed)), got {key!r}.")


def reconstruction_problem(apply_fn: Callable, weights, scales, x_q, y_fp, *, weight_bits,
                           config: AdaRoundConfig = AdaRoundConfig(), act_scales=None,
                           x_fp=None, activation: Optional[Callable] = None,
                           signed: bool = True, key):
  """Validates :func:`reconstruct_block`'s arguments; the problem and its arrays.

  Returns:
    ``(problem, arrays)``: the :class:`Reconstruction` and its
    :class:`ReconstructionArrays` (inputs and targets cast to the weights' dtype).
    ``problem.run(arrays)`` is the fused loop, ``problem.step(carry, t, arrays)`` one
    iteration of it from ``problem.init(arrays)``, ``problem.solve(arrays)`` the lot.

  Raises:
    ValueError: as :func:`reconstruct_block`.
  """
  config = check_config(config)
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be a callable (weights, act_scales, x, key) -> output,"
                     f" got {apply_fn!r}.")
  weights = tuple(jnp.asarray(w) for w in _as_tuple("weights", weights))
  scales = _as_tuple("scales", scales)
  if len(scales) != len(weights):
    raise ValueError(f"`scales` must hold one step size per weight: {len(weights)} weights,"
                     f" {len(scales)} scales.")
  bit_list = (tuple(weight_bits) if isinstance(weight_bits, (list, tuple))
              else (weight_bits,) * len(weights))
  if len(bit_list) != len(weights):
    raise ValueError(f"`weight_bits` must be one bit width or one per weight: {len(weights)}"
                     f" weights, {len(bit_list)} bit widths.")
  grids = tuple(rounding.weight_grid(b, signed) for b in bit_list)
  checked = []
  for index, (w, s) in enumerate(zip(weights, scales)):
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.size == 0:
      raise ValueError(f"weight {index} must be a non-empty floating array, got {w.dtype} of"
                       f" shape {w.shape}.")
    checked.append(_check_scale(w, s, "scale" if len(weights) == 1 else f"scales[{index}]"))
  scales = tuple(checked)
  if act_scales is not None:
    for leaf in jax.tree.leaves(act_scales):
      checks.check_scale_values(leaf, "act_scales")
    act_scales = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), act_scales)
  x_q, y_fp = _replicated(jnp.asarray(x_q)), _replicated(jnp.asarray(y_fp))
  weights = tuple(_replicated(w) for w in weights)
  scales = tuple(_replicated(s) for s in scales)
  if x_q.ndim < 1 or y_fp.ndim < 2:
    raise ValueError(f"`x_q` must be (N, ...) and `y_fp` (N, ..., channels); got shapes"
                     f" {x_q.shape} and {y_fp.shape}.")
  if x_q.shape[0] == 0:
    raise ValueError("the calibration data is empty: `x_q` has no example.")
  if x_q.shape[0] != y_fp.shape[0]:
    raise ValueError(f"`x_q` and `y_fp` must hold the same number of examples; got"
                     f" {x_q.shape[0]} and {y_fp.shape[0]}.")
  if x_fp is None:
    if config.drop_prob > 0:
      raise ValueError("`drop_prob` > 0 (QDrop) mixes the quantized and the full-precision"
                       " inputs: give the full-precision model's inputs as `x_fp`.")
    x_fp = jnp.zeros((1,) + x_q.shape[1:], x_q.dtype)  # unused
  else:
    x_fp = _replicated(jnp.asarray(x_fp))
    if x_fp.shape != x_q.shape:
      raise ValueError(f"`x_fp` must have the shape of `x_q` {x_q.shape}, got {x_fp.shape}.")
  if activation is not None and not callable(activation):
    raise ValueError(f"`activation` must be None or a callable, got {activation!r}.")
  _check_key(key)
  dtype = weights[0].dtype
  x_q, x_fp, y_fp = x_q.astype(dtype), x_fp.astype(dtype), y_fp.astype(dtype)
  # Probed on a mini-batch of the loop's size: a model may shard its batch axis (an
  # out_sharding over the data axes), which one row cannot satisfy.
  probe = x_q[:config.batch_size]
  try:
    out = jax.eval_shape(apply_fn, weights, act_scales, probe, key)
  except Exception as error:  # the shapes do not fit apply_fn
    raise ValueError(f"`apply_fn` fails for weights of shapes {[w.shape for w in weights]} and"
                     f" x_q of shape {x_q.shape}: {error}") from error
  if tuple(out.shape) != (probe.shape[0],) + tuple(y_fp.shape[1:]):
    raise ValueError(f"`apply_fn` gives outputs of shape {tuple(out.shape)[1:]} per example but"
                     f" `y_fp` has {tuple(y_fp.shape[1:])}.")
  problem = Reconstruction(apply_fn, grids, config, activation)
  return problem, ReconstructionArrays(weights, scales, act_scales, x_q, x_fp, y_fp, key)


# ---------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------


def reconstruct_block(apply_fn: Callable, weights: Union[ArrayLike, Sequence[ArrayLike]],
                      scales: Union[ArrayLike, Sequence[ArrayLike]], x_q: ArrayLike,
                      y_fp: ArrayLike, *, weight_bits: Union[int, Sequence[int]],
                      config: AdaRoundConfig = AdaRoundConfig(),
                      act_scales: Optional[PyTree] = None, x_fp: Optional[ArrayLike] = None,
                      activation: Optional[Callable] = None, signed: bool = True,
                      key: jax.Array) -> ReconstructionResult:
  """Learns the rounding of several weights (and activation step sizes) against one output.

  Minimises ``||f_a(apply_fn(W_soft, a, x, k)) - f_a(y)||^2`` (summed over the last axis,
  averaged over the others) on mini-batches drawn with replacement from ``(x_q, y_fp)``,
  plus ``config.lam`` times the sum over the weights of
  :func:`trquant.adaround.rounding_regularizer` after the warm-up, with Adam at
  ``config.lr`` on every weight's rounding variables ``V`` (initialised by
  :func:`trquant.adaround.init_alpha`) and Adam at ``config.act_lr`` on the activation
  step sizes ``a`` (kept positive). With ``config.drop_prob = p > 0`` (QDrop) each element
  of a mini-batch's input is the full-precision ``x_fp`` instead of ``x_q`` with
  probability ``p``; ``apply_fn`` gets a fresh key ``k`` per step for dropping inside the
  block. The loop is one jitted ``lax.scan``, or on CPU, for a block with a convolution,
  a Python loop over one jitted step (``config.loop``). Mini-batch ``t`` is drawn from
  ``fold_in(key, t)``, so a key gives the same result on every call.

  Args:
    apply_fn: ``(weights, act_scales, x, key) -> output``: the block, pure and
      differentiable in ``weights`` (a tuple, in the order given) and ``act_scales``.
    weights: a float array or a sequence of them (e.g. the block's kernels).
    scales: the weights' step sizes, one per weight (positive scalars or keep-dims arrays,
      e.g. shape ``(1, out)`` per channel for an ``(in, out)`` kernel).
    x_q: the block's inputs ``(N, ...)``; for asymmetric reconstruction, from the model
      with the earlier blocks already quantized.
    y_fp: the full-precision block's outputs ``(N, ..., channels)``.
    weight_bits: weight bit width (``[2, 16]`` signed, ``[1, 16]`` unsigned), one for all
      or one per weight.
    config: the optimisation hyper-parameters, an :class:`trquant.adaround.AdaRoundConfig`.
    act_scales: a tree of positive activation step sizes to learn, or None.
    x_fp: the full-precision model's block inputs, shaped as ``x_q``; needed for
      ``config.drop_prob > 0``.
    activation: ``f_a`` applied to both outputs before the error (e.g. ``jax.nn.relu``),
      or None.
    signed: signed weight grid.
    key: a jax PRNG key for the mini-batches (and dropping).

  Returns:
    A :class:`ReconstructionResult`: per weight ``codes = clip(floor(w / s) + [V >= 0], lo, hi)``,
    ``weights = s * codes`` and ``V``; the learned ``act_scales``; the per-step losses.

  Raises:
    ValueError: for mismatched weights, scales and bits, bad bits or scales, empty or
      mismatched calibration arrays, ``drop_prob > 0`` without ``x_fp``, non-positive
      activation scales, outputs that do not match ``y_fp``, a bad key or a ``config``
      that is not an :class:`trquant.adaround.AdaRoundConfig`.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> w1, w2 = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (16, 4))
    >>> x = jax.random.normal(k[2], (256, 8))
    >>> block = lambda ws, a, x, key: jax.nn.relu(x @ ws[0]) @ ws[1]
    >>> s = [trquant.init_scale(w, bits=3, method="mse") for w in (w1, w2)]
    >>> config = trquant.adaround.AdaRoundConfig(iters=100, lr=1e-2)
    >>> result = trquant.adaround.reconstruct_block(
    ...     block, [w1, w2], s, x, block((w1, w2), None, x, None), weight_bits=3,
    ...     config=config, key=jax.random.key(1))
    >>> [c.shape for c in result.codes]
    [(8, 16), (16, 4)]
  """
  problem, arrays = reconstruction_problem(
      apply_fn, weights, scales, x_q, y_fp, weight_bits=weight_bits, config=config,
      act_scales=act_scales, x_fp=x_fp, activation=activation, signed=signed, key=key)
  return problem.solve(arrays)


def reconstruct_layer(apply_fn: Callable, w: ArrayLike, scale: ArrayLike, x_q: ArrayLike,
                      y_fp: ArrayLike, *, weight_bits: int,
                      config: AdaRoundConfig = AdaRoundConfig(),
                      activation: Optional[Callable] = None, x_fp: Optional[ArrayLike] = None,
                      signed: bool = True, key: jax.Array) -> ReconstructionResult:
  """AdaRound of one layer: :func:`reconstruct_block` of one weight, ``apply_fn(w, x)``.

  Learns to round ``w`` up or down to reconstruct the layer's output: minimises, with Adam
  on the rounding variables ``V`` only, ``||f_a(apply_fn(W_soft, x)) - f_a(y)||^2``
  (summed over the last axis, averaged over the others) plus ``config.lam`` times
  :func:`trquant.adaround.rounding_regularizer` after the warm-up, ``beta`` annealed by
  :func:`trquant.adaround.beta_schedule`. Exactly ``reconstruct_block(LayerAsBlock(apply_fn),
  [w], [scale], ...)``, with the result unpacked.

  Args:
    apply_fn: ``(w, x) -> output`` of the layer (e.g. its pre-activation), pure and
      differentiable in ``w``.
    w: full-precision weights (e.g. a Flax kernel, output channels last).
    scale: the step size, a positive scalar or a keep-dims array (per-channel,
      e.g. shape ``(1, out)`` for an ``(in, out)`` kernel).
    x_q: calibration inputs of the layer, ``(N, ...)``; for asymmetric
      reconstruction, the inputs produced by the already-quantized earlier layers.
    y_fp: target outputs, ``(N, ..., channels)``: the full-precision layer's outputs.
    weight_bits: weight bit width in ``[2, 16]`` (unsigned: ``[1, 16]``).
    config: the optimisation hyper-parameters, an :class:`trquant.adaround.AdaRoundConfig`.
    activation: ``f_a`` applied to both outputs before the error (e.g.
      ``jax.nn.relu``), or None.
    x_fp: the full-precision inputs, for ``config.drop_prob > 0`` (QDrop on the input).
    signed: signed (weights) or unsigned grid.
    key: a jax PRNG key for the mini-batches.

  Returns:
    A :class:`ReconstructionResult` of one weight: the arrays
    ``codes = clip(floor(w / scale) + [V >= 0], lo, hi)``, ``weights = scale * codes`` and
    ``V``, ``act_scales`` None, and the per-step losses.

  Raises:
    ValueError: for bad bits, a non-positive or non-broadcasting scale, empty or
      mismatched calibration arrays, ``apply_fn`` outputs that do not match ``y_fp``,
      a bad key or a ``config`` that is not an :class:`trquant.adaround.AdaRoundConfig`.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> w = jax.random.normal(jax.random.key(0), (16, 4))
    >>> x = jax.random.normal(jax.random.key(1), (256, 16))
    >>> s = trquant.init_scale(w, bits=3, method="mse")
    >>> result = trquant.adaround.reconstruct_layer(
    ...     lambda w, x: x @ w, w, s, x, x @ w, weight_bits=3,
    ...     config=trquant.adaround.AdaRoundConfig(iters=200, lr=1e-2), key=jax.random.key(2))
    >>> result.codes.shape, bool(jnp.all(result.weights == s * result.codes))
    ((16, 4), True)
  """
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be a callable (w, x) -> output, got {apply_fn!r}.")
  if isinstance(scale, (list, tuple)):
    raise ValueError(f"`scale` must be one step size (a number or an array), got a"
                     f" {type(scale).__name__}; for several weights use reconstruct_block.")
  result = reconstruct_block(LayerAsBlock(apply_fn), [w], [scale], x_q, y_fp,
                             weight_bits=weight_bits, config=config, x_fp=x_fp,
                             activation=activation, signed=signed, key=key)
  return result._replace(codes=result.codes[0], weights=result.weights[0], V=result.V[0])


# ---------------------------------------------------------------------------------------
# Output errors
# ---------------------------------------------------------------------------------------


def block_errors(apply_fn: Callable, candidates: Sequence, x, y, *,
                 activation: Optional[Callable] = None, batch_size: int = 256) -> list[float]:
  """:func:`block_error` of each ``(weights, act_scales)`` candidate, compiled once."""
  batch_size = checks.check_int("batch_size", batch_size, 1)
  x, y = _replicated(jnp.asarray(x)), _replicated(jnp.asarray(y))
  candidates = [jax.tree.map(_replicated, candidate) for candidate in candidates]
  if x.ndim < 1 or y.ndim < 2 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
    raise ValueError(f"`x` and `y` must hold the same positive number of examples; got shapes"
                     f" {x.shape} and {y.shape}.")

  @jax.jit
  def chunk(weights, act_scales, xb, yb):
    out = apply_fn(weights, act_scales, xb, None)
    if activation is not None:
      out, yb = activation(out), activation(yb)
    return jnp.sum(jnp.square(out - yb)) / np.prod(yb.shape[1:-1], dtype=int)

  return [sum(float(chunk(tuple(weights), act_scales, x[i:i + batch_size], y[i:i + batch_size]))
              for i in range(0, x.shape[0], batch_size)) / x.shape[0]
          for weights, act_scales in candidates]


def block_error(apply_fn: Callable, weights: Sequence, act_scales: Optional[PyTree],
                x: ArrayLike, y: ArrayLike, *,
                activation: Optional[Callable] = None, batch_size: int = 256) -> float:
  """The loss term of :func:`reconstruct_block` over a whole data set (no regulariser).

  ``mean(sum(|f_a(apply_fn(weights, act_scales, x, None)) - f_a(y)|^2, axis=-1))``, without
  dropping (``key=None``), in chunks of ``batch_size``, as a Python float.
  """
  return block_errors(apply_fn, [(weights, act_scales)], x, y, activation=activation,
                      batch_size=batch_size)[0]


def reconstruction_errors(apply_fn: Callable, weights: Sequence, x, y, *,
                          activation: Optional[Callable] = None,
                          batch_size: int = 256) -> list[float]:
  """:func:`reconstruction_error` of each of several weights, compiling the evaluation once."""
  return block_errors(LayerAsBlock(apply_fn), [((w,), None) for w in weights], x, y,
                      activation=activation, batch_size=batch_size)


def reconstruction_error(apply_fn: Callable, w: ArrayLike, x: ArrayLike, y: ArrayLike, *,
                         activation: Optional[Callable] = None,
                         batch_size: int = 256) -> float:
  """The loss term of :func:`reconstruct_layer` over a whole data set (no regulariser).

  Args:
    apply_fn: ``(w, x) -> output``.
    w: the weights to evaluate (e.g. ``ReconstructionResult.weights`` of :func:`reconstruct_layer`).
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
  return reconstruction_errors(apply_fn, [w], x, y, activation=activation,
                               batch_size=batch_size)[0]
