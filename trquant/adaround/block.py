"""Block reconstruction on arrays: several layers' rounding (and activation scales) at once.

AdaRound reconstructs one layer's output at a time. BRECQ reconstructs the output of a
block of layers (a residual block, say) and learns the rounding variables of all its
layers jointly, so that the rounding of one layer can make up for another's; with
activation quantization inside the block it also learns the activation step sizes
(LSQ) against the block's output. QDrop, in addition, replaces the quantized value by
the full-precision one at random (probability ``p`` per element) while it reconstructs,
which flattens the loss surface the rounding ends up in.

:func:`reconstruct_block` does this for any pure ``apply_fn(weights, act_scales, x,
key)``: one jitted ``lax.scan`` over the iterations. With one weight, no activation
scales and no dropping it is exactly :func:`trquant.adaround.reconstruct_layer`.
:func:`trquant.adaround.reconstruct_model` drives it over an NNX model.

References:
  Li, Gong, Tan, Yang, Hu, Zhang, Yu, Wang, Gu, `BRECQ: Pushing the Limit of
  Post-Training Quantization by Block Reconstruction <https://arxiv.org/abs/2102.05426>`_,
  ICLR 2021.
  Wei, Gong, Li, Liu, Yu, `QDrop: Randomly Dropping Quantization for Extremely
  Low-bit Post-Training Quantization <https://arxiv.org/abs/2203.05740>`_, ICLR 2022.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trquant import checks
from trquant.adaround import loop as loops
from trquant.adaround import rounding

__all__ = ["BlockResult", "block_error", "block_errors", "reconstruct_block"]

# Activation step sizes are kept above this after each update (LSQ scales must stay positive).
_MIN_ACT_SCALE = 1e-8


class BlockResult(NamedTuple):
  """Output of :func:`reconstruct_block`."""

  codes: tuple  # per weight, its shape and dtype: clip(floor(w / s) + [V >= 0], lo, hi)
  weights: tuple  # per weight: the hard-rounded weight scale * codes
  act_scales: Any  # the learned activation step sizes (the tree given), float32
  reconstruction_loss: jax.Array  # (iters,) float32: the block's output error per mini-batch
  regularization_loss: jax.Array  # (iters,) float32: sum over weights of sum(1 - |2h - 1|^beta)


@dataclasses.dataclass(frozen=True)
class _Block:
  """One block problem: pure init / step / run / finish over explicit arrays."""

  apply_fn: Callable
  grids: tuple  # (lo, hi) per weight
  iters: int
  batch_size: int
  lam: float
  lr: float
  act_lr: float
  warmup: float
  beta: tuple
  beta_mode: str
  drop_prob: float
  zeta: float
  gamma: float

  @property
  def start_step(self) -> int:
    return math.ceil(self.warmup * self.iters)

  @property
  def beta_fn(self):
    return rounding.beta_schedule(self.iters, start=self.beta[0], end=self.beta[1],
                                  warmup=self.warmup, mode=self.beta_mode)

  def init(self, weights, scales, act_scales):
    Vs = tuple(rounding.init_alpha(w, s, zeta=self.zeta, gamma=self.gamma)
               for w, s in zip(weights, scales))
    return (Vs, act_scales), (optax.adam(self.lr).init(Vs), optax.adam(self.act_lr).init(act_scales))

  def soft(self, weights, scales, Vs):
    out = []
    for w, s, V, (lo, hi) in zip(weights, scales, Vs, self.grids):
      h = jnp.clip(jax.nn.sigmoid(V) * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)
      out.append((s * jnp.clip(jnp.floor(w / s) + h, lo, hi)).astype(w.dtype))
    return tuple(out)

  def loss(self, params, step, weights, scales, xb, yb, key):
    Vs, act_scales = params
    out = self.apply_fn(self.soft(weights, scales, Vs), act_scales, xb, key)
    reconstruction = jnp.mean(jnp.sum(jnp.square(out - yb), axis=-1))
    beta = self.beta_fn(step)
    regularization = sum(
        rounding.rounding_regularizer(V, beta, zeta=self.zeta, gamma=self.gamma) for V in Vs)
    lam = jnp.where(step >= self.start_step, self.lam, 0.0)
    return reconstruction + lam * regularization, (reconstruction, regularization)

  def step(self, carry, step, arrays):
    """One Adam step; mini-batch ``t`` comes from ``fold_in(key, t)`` as in reconstruct_layer."""
    (Vs, act_scales), (v_state, a_state) = carry
    weights, scales, x_q, x_fp, y, key = arrays
    step_key = jax.random.fold_in(key, step)
    index = jax.random.randint(step_key, (self.batch_size,), 0, x_q.shape[0])
    xb = jnp.take(x_q, index, axis=0)
    drop_key, apply_key = jax.random.split(jax.random.fold_in(step_key, 1))
    if self.drop_prob > 0:
      # QDrop on the block input: the full-precision input with probability p per element.
      keep_fp = jax.random.bernoulli(drop_key, self.drop_prob, xb.shape)
      xb = jnp.where(keep_fp, jnp.take(x_fp, index, axis=0), xb)
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    (_, losses), (v_grads, a_grads) = grad_fn((Vs, act_scales), step, weights, scales, xb,
                                              jnp.take(y, index, axis=0), apply_key)
    v_updates, v_state = optax.adam(self.lr).update(v_grads, v_state, Vs)
    a_updates, a_state = optax.adam(self.act_lr).update(a_grads, a_state, act_scales)
    act_scales = jax.tree.map(lambda s, u: jnp.maximum(s + u, _MIN_ACT_SCALE), act_scales,
                              a_updates)
    return ((optax.apply_updates(Vs, v_updates), act_scales), (v_state, a_state)), losses

  def run(self, weights, scales, act_scales, x_q, x_fp, y, key):
    carry = self.init(weights, scales, act_scales)
    arrays = (weights, scales, x_q, x_fp, y, key)
    ((Vs, act_scales), _), (reconstruction, regularization) = jax.lax.scan(
        lambda carry, step: self.step(carry, step, arrays), carry,
        jnp.arange(self.iters, dtype=jnp.int32))
    return Vs, act_scales, reconstruction, regularization

  def finish(self, weights, scales, Vs):
    codes, hard = [], []
    for w, s, V, (lo, hi) in zip(weights, scales, Vs, self.grids):
      c = jnp.clip(jnp.floor(w / s) + (V >= 0), lo, hi)
      codes.append(c.astype(w.dtype))
      hard.append((s * c).astype(w.dtype))
    return tuple(codes), tuple(hard)


@functools.partial(jax.jit, static_argnums=0)
def _run(problem: _Block, weights, scales, act_scales, x_q, x_fp, y, key):
  return problem.run(weights, scales, act_scales, x_q, x_fp, y, key)


def _as_tuple(name, value) -> tuple:
  if isinstance(value, (list, tuple)):
    if not value:
      raise ValueError(f"`{name}` is empty: a block needs at least one weight.")
    return tuple(value)
  return (value,)


def reconstruct_block(apply_fn: Callable, weights, scales, x_q, y_fp, *, bits,
                      act_scales=None, x_fp=None, drop_prob: float = 0.0,
                      signed: bool = True, iters: int = 10_000, batch_size: int = 32,
                      lam: float = 0.01, lr: float = 1e-3, act_lr: float = 4e-5,
                      warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0),
                      beta_mode: str = "cosine", zeta: float = rounding.ZETA,
                      gamma: float = rounding.GAMMA, key, loop: str = "auto") -> BlockResult:
  """Learns the rounding of several weights (and activation step sizes) against one output.

  Minimises ``||apply_fn(W_soft, a, x, k) - y||^2`` (summed over the last axis, averaged
  over the others) on mini-batches drawn with replacement from ``(x_q, y_fp)``, plus
  ``lam`` times the sum over the weights of
  :func:`trquant.adaround.rounding_regularizer` after the warm-up, with Adam at ``lr``
  on every weight's rounding variables ``V`` and Adam at ``act_lr`` on the activation
  step sizes ``a`` (kept positive). With ``drop_prob = p > 0`` (QDrop) each element of
  a mini-batch's input is the full-precision ``x_fp`` instead of ``x_q`` with
  probability ``p``; ``apply_fn`` gets a fresh key ``k`` per step for dropping inside
  the block. The loop is one jitted ``lax.scan``, or on CPU, for a block with a
  convolution, a Python loop over one jitted step (``loop``).

  Args:
    apply_fn: ``(weights, act_scales, x, key) -> output``: the block, pure and
      differentiable in ``weights`` (a tuple, in the order given) and
      ``act_scales``.
    weights: a float array or a sequence of them (e.g. the block's kernels).
    scales: the weights' step sizes, one per weight (scalars or keep-dims arrays).
    x_q: the block's inputs ``(N, ...)`` from the model with the earlier blocks
      quantized.
    y_fp: the full-precision block's outputs ``(N, ..., channels)``.
    bits: weight bit width (``[2, 16]`` signed), one for all or one per weight.
    act_scales: a tree of positive activation step sizes to learn, or None.
    x_fp: the full-precision model's block inputs, shaped as ``x_q``; needed for
      ``drop_prob > 0``.
    drop_prob: QDrop's probability in ``[0, 1)`` (0.5 in the paper); 0 is BRECQ.
    signed: signed weight grid.
    iters, batch_size, lam, lr, warmup, beta, beta_mode, zeta, gamma: as
      :func:`trquant.adaround.reconstruct_layer`.
    act_lr: Adam learning rate of the activation step sizes (BRECQ: 4e-5).
    key: a jax PRNG key.
    loop: ``"auto"``, ``"scan"`` or ``"steps"``, as :func:`trquant.adaround.reconstruct_layer`.

  Returns:
    A :class:`BlockResult`.

  Raises:
    ValueError: for mismatched weights, scales and bits, bad bits or scales, empty or
      mismatched calibration arrays, ``drop_prob`` outside ``[0, 1)`` or without
      ``x_fp``, non-positive activation scales, outputs that do not match ``y_fp``,
      or bad hyper-parameters.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> w1, w2 = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (16, 4))
    >>> x = jax.random.normal(k[2], (256, 8))
    >>> block = lambda ws, a, x, key: jax.nn.relu(x @ ws[0]) @ ws[1]
    >>> s = [trquant.init_scale(w, bits=3, method="mse") for w in (w1, w2)]
    >>> result = trquant.adaround.reconstruct_block(block, [w1, w2], s, x, block((w1, w2), None, x, None),
    ...                                             bits=3, iters=100, lr=1e-2, key=jax.random.key(1))
    >>> [c.shape for c in result.codes]
    [(8, 16), (16, 4)]
  """
  loops.check_loop(loop)
  if not callable(apply_fn):
    raise ValueError(f"`apply_fn` must be a callable (weights, act_scales, x, key) -> output,"
                     f" got {apply_fn!r}.")
  weights = tuple(jnp.asarray(w) for w in _as_tuple("weights", weights))
  scales = _as_tuple("scales", scales)
  if len(scales) != len(weights):
    raise ValueError(f"`scales` must hold one step size per weight: {len(weights)} weights,"
                     f" {len(scales)} scales.")
  bit_list = tuple(bits) if isinstance(bits, (list, tuple)) else (bits,) * len(weights)
  if len(bit_list) != len(weights):
    raise ValueError(f"`bits` must be one bit width or one per weight: {len(weights)} weights,"
                     f" {len(bit_list)} bit widths.")
  grids = tuple(rounding.weight_grid(b, signed) for b in bit_list)
  checked = []
  for index, (w, s) in enumerate(zip(weights, scales)):
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.size == 0:
      raise ValueError(f"weight {index} must be a non-empty floating array, got {w.dtype} of"
                       f" shape {w.shape}.")
    checks.check_scale(w, s, f"scales[{index}]")
    if isinstance(s, jax.core.Tracer):
      raise ValueError(f"`scales[{index}]` must be concrete, not a traced value.")
    checked.append(jnp.asarray(s, jnp.float32))
  scales = tuple(checked)
  if act_scales is not None:
    for leaf in jax.tree.leaves(act_scales):
      checks.check_scale_values(leaf, "act_scales")
    act_scales = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), act_scales)
  x_q, y_fp = jnp.asarray(x_q), jnp.asarray(y_fp)
  if x_q.ndim < 1 or y_fp.ndim < 2 or x_q.shape[0] == 0 or x_q.shape[0] != y_fp.shape[0]:
    raise ValueError(f"`x_q` (N, ...) and `y_fp` (N, ..., channels) must hold the same positive"
                     f" number of examples; got shapes {x_q.shape} and {y_fp.shape}.")
  if (isinstance(drop_prob, (bool, np.bool_)) or not isinstance(drop_prob, numbers.Real)
      or not 0.0 <= float(drop_prob) < 1.0):
    raise ValueError(f"`drop_prob` must be a number in [0, 1), got {drop_prob!r}.")
  drop_prob = float(drop_prob)
  if x_fp is None:
    if drop_prob > 0:
      raise ValueError("`drop_prob` > 0 (QDrop) mixes the quantized and the full-precision"
                       " block inputs: give the full-precision model's inputs as `x_fp`.")
    x_fp = jnp.zeros((1,) + x_q.shape[1:], x_q.dtype)  # unused
  else:
    x_fp = jnp.asarray(x_fp)
    if x_fp.shape != x_q.shape:
      raise ValueError(f"`x_fp` must have the shape of `x_q` {x_q.shape}, got {x_fp.shape}.")
  iters, batch_size, lam, lr, warmup, beta = rounding.check_loop_args(
      iters=iters, batch_size=batch_size, lam=lam, lr=lr, warmup=warmup, beta=beta,
      beta_mode=beta_mode)
  if (isinstance(act_lr, (bool, np.bool_)) or not isinstance(act_lr, numbers.Real)
      or not float(act_lr) > 0 or not math.isfinite(float(act_lr))):
    raise ValueError(f"`act_lr` must be a positive number, got {act_lr!r}.")
  rounding.init_alpha(jnp.zeros(()), 1.0, zeta=zeta, gamma=gamma)  # validates the stretch
  if not isinstance(key, jax.Array) or not (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32):
    raise ValueError(f"`key` must be a jax PRNG key (jax.random.key(seed)), got {key!r}.")
  dtype = weights[0].dtype
  x_q, x_fp, y_fp = x_q.astype(dtype), x_fp.astype(dtype), y_fp.astype(dtype)
  try:
    out = jax.eval_shape(apply_fn, weights, act_scales, x_q[:1], key)
  except Exception as error:  # the shapes do not fit apply_fn
    raise ValueError(f"`apply_fn(weights, act_scales, x_q, key)` fails for weights of shapes"
                     f" {[w.shape for w in weights]} and x_q of shape {x_q.shape}: {error}"
                     ) from error
  if tuple(out.shape[1:]) != tuple(y_fp.shape[1:]):
    raise ValueError(f"`apply_fn` gives outputs of shape {tuple(out.shape[1:])} per example but"
                     f" `y_fp` has {tuple(y_fp.shape[1:])}.")
  problem = _Block(apply_fn, grids, iters, batch_size, lam, lr, float(act_lr), warmup, beta,
                   beta_mode, drop_prob, float(zeta), float(gamma))
  if loops.resolve_loop(loop, apply_fn, weights, act_scales, x_q[:1], key) == "scan":
    Vs, learned, reconstruction, regularization = _run(problem, weights, scales, act_scales, x_q,
                                                       x_fp, y_fp, key)
  else:
    ((Vs, learned), _), (reconstruction, regularization) = loops.run_steps(
        problem, (weights, scales, act_scales), (weights, scales, x_q, x_fp, y_fp, key))
  codes, hard = loops.finish(problem, weights, scales, Vs)
  return BlockResult(codes, hard, learned, reconstruction, regularization)


def block_error(apply_fn: Callable, weights: Sequence, act_scales, x, y, *,
                batch_size: int = 256) -> float:
  """``mean(sum(|apply_fn(weights, act_scales, x, None) - y|^2, axis=-1))`` over a data set.

  The block's output error without dropping (``key=None``), in chunks of ``batch_size``.
  """
  return block_errors(apply_fn, [(weights, act_scales)], x, y, batch_size=batch_size)[0]


def block_errors(apply_fn: Callable, candidates: Sequence, x, y, *,
                 batch_size: int = 256) -> list[float]:
  """:func:`block_error` of each ``(weights, act_scales)`` candidate, compiled once."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
    raise ValueError(f"`x` and `y` must hold the same positive number of examples; got shapes"
                     f" {x.shape} and {y.shape}.")

  @jax.jit
  def chunk(weights, act_scales, xb, yb):
    out = apply_fn(weights, act_scales, xb, None)
    return jnp.sum(jnp.square(out - yb)) / np.prod(yb.shape[1:-1], dtype=int)

  return [sum(float(chunk(tuple(weights), act_scales, x[i:i + batch_size], y[i:i + batch_size]))
              for i in range(0, x.shape[0], batch_size)) / x.shape[0]
          for weights, act_scales in candidates]
