"""Uniform, learned-step-size and binary quantizers with straight-through gradients.

Every quantizer here is a pure function of arrays, safe under ``jax.jit``,
``jax.vmap`` and ``jax.grad``. Conventions used throughout trquant:

* ``scale`` is the *step size* of the integer grid: ``codes = clip(round(x /
  scale), lo, hi)`` and the dequantized value is ``scale * codes``.
* Grid for ``b`` bits: signed ``[-2^(b-1), 2^(b-1) - 1]``; signed and narrow
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; unsigned ``[0, 2^b - 1]``. ``bits=1`` with
  ``signed=True`` is binary: codes ``sign(x)`` in ``{-1, +1}`` (``sign(0) = +1``).
  The clipping bound is the last grid point itself (``hi * scale``), not
  ``(hi + 0.5) * scale`` as some libraries use.
* ``scale`` broadcasts against ``x``: a scalar for per-tensor quantization or a
  keep-dims array (e.g. shape ``(1, out)`` for a Flax ``(in, out)`` kernel) for
  per-channel quantization. It may not enlarge ``x``'s shape.
* Rounding is round-half-to-even (``jnp.round``).

References:
  Esser et al., `Learned Step Size Quantization <https://arxiv.org/abs/1902.08153>`_, ICLR 2020.
  Lee et al., `Scheduling Weight Transitions for Quantization-Aware Training
  <https://arxiv.org/abs/2404.19248>`_, ICCV 2025 (Eq. 13).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from trquant._src import checks

Axis = Optional[Union[int, Sequence[int]]]
PyTree = Any

MAX_BITS = checks.MAX_BITS


class _Grid(NamedTuple):
  """Integer grid; `binary` distinguishes sign codes {-1, +1} from ternary {-1, 0, 1}."""

  lo: int
  hi: int
  binary: bool


def _grid(bits: int, signed: bool, narrow: bool) -> _Grid:
  lo, hi = quant_range(bits, signed=signed, narrow=narrow)
  return _Grid(lo, hi, signed and int(bits) == 1)


def quant_range(bits: int, *, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
  """Returns the integer grid ``(lo, hi)`` for a bit width.

  Args:
    bits: bit width, an int in ``[1, 16]``.
    signed: signed (weights) or unsigned (post-ReLU activations) grid.
    narrow: drop the most negative signed code, making the grid symmetric
      (``bits=2, narrow=True`` is ternary ``{-1, 0, 1}``).

  Returns:
    ``(lo, hi)`` as Python ints. ``bits=1, signed=True`` gives ``(-1, 1)``:
    the binary grid ``{-1, +1}``.

  Example:
    >>> import trquant
    >>> trquant.quant_range(4)
    (-8, 7)
    >>> trquant.quant_range(4, signed=False)
    (0, 15)
  """
  bits = checks.check_bits(bits)
  if not signed:
    if narrow:
      raise ValueError("`narrow=True` only applies to signed grids (signed=True).")
    return 0, 2**bits - 1
  if bits == 1:
    if narrow:
      raise ValueError("`narrow=True` is meaningless for binary (bits=1) quantization.")
    return -1, 1
  hi = 2 ** (bits - 1) - 1
  return (-hi if narrow else -hi - 1), hi


def _sum_to_shape(g, shape):
  """Reduces a broadcast gradient back to `shape` (the reverse of broadcasting)."""
  if g.shape == tuple(shape):
    return g
  lead = g.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, dim in enumerate(shape) if dim == 1 and g.shape[lead + i] != 1
  )
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def _codes(v, grid: _Grid):
  """Integer codes of already-scaled values ``v = x / scale``."""
  if grid.binary:
    return jnp.where(v >= 0, 1, -1).astype(v.dtype)
  return jnp.clip(jnp.round(v), grid.lo, grid.hi)


def _compute_dtype(x, scale):
  return jnp.promote_types(jnp.result_type(x), jnp.result_type(scale))


def _group_layout(shape, group_size, group_axis) -> tuple[int, int]:
  """``(axis, groups)``: `group_axis` normalised and the number of groups along it; a
  ValueError naming the problem when `group_size` does not split that axis."""
  group_size = checks.check_group_size(group_size)
  ndim = len(shape)
  if ndim == 0:
    raise ValueError("`group_size` needs an array with an axis to group; got a scalar.")
  if isinstance(group_axis, (bool, np.bool_)) or not isinstance(group_axis, numbers.Integral) \
      or not -ndim <= int(group_axis) < ndim:
    raise ValueError(f"`group_axis` must be an int axis of an array of rank {ndim}, got"
                     f" {group_axis!r}.")
  axis = int(group_axis) % ndim
  if shape[axis] % group_size:
    raise ValueError(f"`group_size`={group_size} does not divide axis {group_axis} of length"
                     f" {shape[axis]}: use a group size that divides it (e.g. 32, 64, 128 for"
                     " a kernel whose input features are a multiple of it).")
  return axis, shape[axis] // group_size


def group_scale_shape(shape: Sequence[int], group_size: int, *, group_axis: int = -2,
                      channel_axis: Optional[int] = -1) -> tuple[int, ...]:
  """The shape of per-group step sizes for an array of `shape`.

  One step size per group of ``group_size`` consecutive entries along ``group_axis`` (the
  contraction axis: the input features of a Flax ``(in, out)`` kernel, ``-2`` of a conv's
  ``(kh, kw, in, out)``) and per entry of ``channel_axis`` (the output channels); every
  other axis is shared (size 1).

  Example:
    >>> import trquant
    >>> trquant.group_scale_shape((256, 64), 32)
    (8, 64)
    >>> trquant.group_scale_shape((3, 3, 64, 128), 32)
    (1, 1, 2, 128)
  """
  axis, groups = _group_layout(tuple(shape), group_size, group_axis)
  channel = None if channel_axis is None else int(channel_axis) % len(shape)
  if channel == axis:
    raise ValueError("`channel_axis` and `group_axis` must differ: groups split the"
                     " contraction axis of each output channel.")
  return tuple(groups if i == axis else (n if i == channel else 1) for i, n in enumerate(shape))


def expand_group_scale(scale: ArrayLike, group_size: int, *,
                       group_axis: int = -2) -> jax.Array:
  """Per-group step sizes repeated over their groups: an array that broadcasts to the
  quantized tensor as a per-channel scale does (``jnp.repeat`` along ``group_axis``).

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.expand_group_scale(jnp.array([[0.1], [1.0]]), 2)[:, 0]
    Array([0.1, 0.1, 1. , 1. ], dtype=float32)
  """
  checks.check_group_size(group_size)
  return jnp.repeat(jnp.asarray(scale), int(group_size), axis=group_axis)


def _grouped(x, scale, group_size, group_axis):
  """``(x', scale', restore)``: `x` with its group axis split into ``(groups, group_size)``
  and `scale` (one entry per group on that axis) given a size-1 axis there, so that they
  broadcast; ``restore`` turns an ``x'``-shaped result back into `x`'s shape."""
  x = jnp.asarray(x)
  axis, groups = _group_layout(x.shape, group_size, group_axis)
  scale = jnp.asarray(scale)
  if scale.ndim != x.ndim or scale.shape[axis] != groups:
    raise ValueError(
        f"per-group `scale` of shape {scale.shape} does not match x of shape {x.shape} with"
        f" group_size={group_size} along axis {group_axis}: it needs rank {x.ndim} and"
        f" {groups} entries on that axis (see trquant.group_scale_shape).")
  grouped_shape = x.shape[:axis] + (groups, int(group_size)) + x.shape[axis + 1:]
  return (x.reshape(grouped_shape), jnp.expand_dims(scale, axis + 1),
          lambda y: y.reshape(x.shape))


# --------------------------------------------------------------------------------------
# Integer codes
# --------------------------------------------------------------------------------------


def quantize(x: ArrayLike, scale: ArrayLike, *, bits: int, signed: bool = True,
             narrow: bool = False, group_size: Optional[int] = None,
             group_axis: int = -2) -> jax.Array:
  """Integer codes ``clip(round(x / scale), lo, hi)`` of ``x``.

  The codes are integer-valued but keep ``x``'s floating dtype, so they can be
  compared, counted or dequantized without casts. Not differentiable (use
  :func:`fake_quant` for training): its gradient is zero.

  Args:
    x: array to quantize.
    scale: positive step size, a scalar (per-tensor) or an array that
      broadcasts to ``x`` (per-channel).
    bits: bit width in ``[1, 16]``; ``bits=1, signed=True`` gives binary codes.
    signed: signed or unsigned grid (see :func:`quant_range`).
    narrow: symmetric signed grid without the most negative code.
    group_size: per-group (sub-channel) scales: ``scale`` holds one step size per group
      of ``group_size`` consecutive entries along ``group_axis`` (shape from
      :func:`group_scale_shape`). None: ``scale`` broadcasts to ``x``.
    group_axis: the axis split into groups (default ``-2``: the input features of a
      Flax ``(in, out)`` kernel or a conv's ``(kh, kw, in, out)``).

  Returns:
    Codes with ``x``'s shape and floating dtype. bfloat16 holds integers exactly
    only up to 256, so quantize bfloat16 inputs to more than 8 bits in float32.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.quantize(jnp.array([-1.0, 0.26, 0.9, 5.0]), 0.5, bits=2)
    Array([-2.,  1.,  1.,  1.], dtype=float32)
    >>> w = jnp.array([[0.1], [0.2], [1.0], [2.0]])          # (in=4, out=1), groups of 2
    >>> trquant.quantize(w, jnp.array([[0.1], [1.0]]), bits=4, group_size=2)[:, 0]
    Array([1., 2., 1., 2.], dtype=float32)
  """
  if group_size is not None:
    xg, sg, restore = _grouped(x, scale, group_size, group_axis)
    return restore(quantize(xg, sg, bits=bits, signed=signed, narrow=narrow))
  grid = _grid(bits, signed, narrow)
  checks.check_scale(x, scale)
  x = jnp.asarray(x)
  dtype = _compute_dtype(x, scale)
  v = jax.lax.stop_gradient(x.astype(dtype) / jnp.asarray(scale, dtype))
  return _codes(v, grid).astype(x.dtype)


def dequantize(codes: ArrayLike, scale: ArrayLike, *, group_size: Optional[int] = None,
               group_axis: int = -2) -> jax.Array:
  """Dequantized values ``scale * codes`` (in the floating dtype of ``codes``/``scale``).

  With ``group_size``, ``scale`` holds one step size per group along ``group_axis``, as
  in :func:`quantize`.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.dequantize(jnp.array([-2.0, 1.0]), 0.5)
    Array([-1. ,  0.5], dtype=float32)
  """
  if group_size is not None:
    codes_g, scale_g, restore = _grouped(codes, scale, group_size, group_axis)
    return restore(dequantize(codes_g, scale_g))
  checks.check_scale(codes, scale)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.floating):
    codes = codes.astype(jnp.result_type(scale, jnp.float32))
  return (codes * jnp.asarray(scale)).astype(_compute_dtype(codes, scale))


def transition_rate(codes_before: PyTree, codes_after: PyTree) -> PyTree:
  """Fraction of quantized weights whose integer level changed (TR paper Eq. 5).

  Args:
    codes_before: codes (array or pytree of arrays) before an update.
    codes_after: codes of the same structure and shapes after the update.

  Returns:
    A float32 scalar per leaf, with the structure of the inputs:
    ``mean(codes_after != codes_before)``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.transition_rate(jnp.array([0., 1., 1., -1.]), jnp.array([0., 1., 0., -1.]))
    Array(0.25, dtype=float32)
  """
  before_def = jax.tree.structure(codes_before)
  after_def = jax.tree.structure(codes_after)
  if before_def != after_def:  # type: ignore[operator]  # jaxlib has no stub for PyTreeDef
    raise ValueError(
        "`codes_before` and `codes_after` must have the same tree structure; got"
        f" {before_def} and {after_def}."
    )

  def rate(before, after):
    if np.shape(before) != np.shape(after):
      raise ValueError(
          f"codes shapes differ: {np.shape(before)} before and {np.shape(after)} after."
      )
    return jnp.mean(jnp.asarray(before) != jnp.asarray(after), dtype=jnp.float32)

  return jax.tree.map(rate, codes_before, codes_after)


# --------------------------------------------------------------------------------------
# Straight-through estimators
# --------------------------------------------------------------------------------------


@jax.custom_vjp
def round_ste(x: ArrayLike) -> jax.Array:
  """``round(x)`` whose gradient is the identity (straight-through estimator).

  Example:
    >>> import jax, trquant
    >>> jax.grad(trquant.round_ste)(0.3)
    Array(1., dtype=float32, weak_type=True)
  """
  return jnp.round(x)


def _round_ste_fwd(x):
  return jnp.round(x), None


def _round_ste_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fake_quant(x, scale, grid: _Grid):
  dtype = _compute_dtype(x, scale)
  scale_c = scale.astype(dtype)
  return (scale_c * _codes(x.astype(dtype) / scale_c, grid)).astype(x.dtype)


def _fake_quant_fwd(x, scale, grid):
  return _fake_quant(x, scale, grid), (x, scale)


def _fake_quant_bwd(grid, residuals, g):
  lo, hi = grid.lo, grid.hi
  x, scale = residuals
  dtype = _compute_dtype(x, scale)
  v = x.astype(dtype) / scale.astype(dtype)
  g = g.astype(dtype)
  below, above = v < lo, v > hi
  inside = ~(below | above)
  grad_x = jnp.where(inside, g, 0).astype(x.dtype)
  # LSQ: d(scale * codes)/d scale = codes - v inside the range, lo / hi outside.
  dq_dscale = jnp.where(below, lo, jnp.where(above, hi, _codes(v, grid) - v))
  grad_scale = _sum_to_shape(g * dq_dscale, scale.shape).astype(scale.dtype)
  return grad_x, grad_scale


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: ArrayLike, scale: ArrayLike, *, bits: int, signed: bool = True,
               narrow: bool = False, group_size: Optional[int] = None,
               group_axis: int = -2) -> jax.Array:
  """Quantize-dequantize with straight-through gradients.

  Forward: ``scale * clip(round(x / scale), lo, hi)``. Backward: the gradient
  w.r.t. ``x`` is passed straight through inside the clipping range
  ``[lo * scale, hi * scale]`` and is zero outside; ``scale`` gets the LSQ
  gradient (``round(v) - v`` inside, ``lo`` below, ``hi`` above, with
  ``v = x / scale``), summed over the elements that share it. No gradient
  scaling is applied; see :func:`lsq` for that.

  Args:
    x: array to quantize (any floating dtype; the output keeps it).
    scale: positive step size, scalar or broadcastable keep-dims array.
    bits: bit width in ``[1, 16]``; ``bits=1, signed=True`` gives
      ``scale * sign(x)`` with gradient mask ``|x| <= scale``.
    signed: signed or unsigned grid.
    narrow: symmetric signed grid.
    group_size, group_axis: per-group scales, as in :func:`quantize`; each group's step
      size gets the gradient summed over its group.

  Returns:
    The fake-quantized array, same shape and dtype as ``x``.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> x = jnp.array([-0.7, 0.2, 3.0])
    >>> trquant.fake_quant(x, 0.5, bits=2)
    Array([-0.5,  0. ,  0.5], dtype=float32)
    >>> jax.grad(lambda x: trquant.fake_quant(x, 0.5, bits=2).sum())(x)
    Array([1., 1., 0.], dtype=float32)
  """
  if group_size is not None:
    xg, sg, restore = _grouped(x, scale, group_size, group_axis)
    return restore(fake_quant(xg, sg, bits=bits, signed=signed, narrow=narrow))
  grid = _grid(bits, signed, narrow)
  checks.check_scale(x, scale)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`x` must have a floating dtype to be fake-quantized, got {x.dtype}.")
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    scale = scale.astype(x.dtype)
  return _fake_quant(x, scale, grid)


def _grad_scaled(scale, grad_scale):
  """Value of ``scale`` whose gradient is multiplied by ``grad_scale``."""
  return scale * grad_scale + jax.lax.stop_gradient(scale - scale * grad_scale)


def lsq(x: ArrayLike, scale: ArrayLike, *, bits: int, signed: bool = True, narrow: bool = False,
        grad_scale: Optional[ArrayLike] = None, group_size: Optional[int] = None,
        group_axis: int = -2) -> jax.Array:
  """Learned step size quantization (LSQ): :func:`fake_quant` with a scaled step-size gradient.

  The step size's gradient is multiplied by ``grad_scale`` (default
  ``1 / sqrt(N * hi)``, N = number of elements of ``x`` that share one step
  size, i.e. ``x.size // scale.size``), applied as
  ``s * g + stop_gradient(s - s * g)`` so the forward value is unchanged. For
  activations the LSQ paper uses N = features per example: pass
  ``grad_scale=1 / sqrt(features * hi)`` explicitly.

  Args:
    x: array to quantize.
    scale: learnable positive step size (scalar or keep-dims array).
    bits: bit width in ``[1, 16]``.
    signed: signed or unsigned grid.
    narrow: symmetric signed grid.
    grad_scale: multiplier of the step size gradient, or None for LSQ's default.
    group_size, group_axis: per-group scales, as in :func:`quantize` (N is then the
      number of entries one group's step size covers).

  Returns:
    The fake-quantized array, same shape and dtype as ``x``.

  References:
    Esser et al., `Learned Step Size Quantization <https://arxiv.org/abs/1902.08153>`_, 2020.

  Example:
    >>> import jax, jax.numpy as jnp, trquant
    >>> w = jnp.linspace(-1.0, 1.0, 16)
    >>> s = trquant.init_scale(w, bits=4, method="lsq")
    >>> jax.grad(lambda s: trquant.lsq(w, s, bits=4).sum())(s).shape
    ()
  """
  if group_size is not None:
    xg, sg, restore = _grouped(x, scale, group_size, group_axis)
    return restore(lsq(xg, sg, bits=bits, signed=signed, narrow=narrow, grad_scale=grad_scale))
  lo, hi = quant_range(bits, signed=signed, narrow=narrow)
  checks.check_scale(x, scale)
  if grad_scale is None:
    shares = max(int(np.size(x)) // max(int(np.size(scale)), 1), 1)
    grad_scale = 1.0 / math.sqrt(shares * max(hi, 1))
  elif isinstance(grad_scale, numbers.Real) and not float(grad_scale) > 0:
    raise ValueError(f"`grad_scale` must be positive, got {grad_scale!r}.")
  scale = jnp.asarray(scale)
  return fake_quant(x, _grad_scaled(scale, grad_scale), bits=bits, signed=signed, narrow=narrow)


def fake_quant_dynamic(x: ArrayLike, *, bits: int, signed: bool = True,
                       axis: Axis = -1) -> jax.Array:
  """Dynamic absmax quantization with straight-through gradients: per token by default.

  The step size is computed from ``x`` itself, ``max(|x|) / hi`` over ``axis`` (the
  feature axis: one scale per row, i.e. per token of an LM's activations), as the W8A8 /
  "8da4w" recipes quantize activations; it is not learned and gets no gradient, ``x``
  gets the straight-through gradient (the whole row is inside the grid by construction).

  Args:
    x: activations (any floating dtype; the output keeps it).
    bits: bit width in ``[2, 16]``.
    signed: signed grid (inputs of either sign) or unsigned (non-negative inputs).
    axis: the axis (axes) each scale spans; default the last, one scale per row.

  Returns:
    The fake-quantized array, same shape and dtype as ``x``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> x = jnp.array([[1.0, -0.5, 0.2], [10.0, 3.0, -1.0]])
    >>> q = trquant.fake_quant_dynamic(x, bits=8)     # row scales 1/127 and 10/127
    >>> bool(jnp.all(jnp.abs(q - x) <= jnp.array([[0.5 / 127], [5.0 / 127]]) + 1e-7))
    True
  """
  grid = _grid(bits, signed, False)
  if grid.binary:
    raise ValueError("`bits`=1 (signed) is binary: sign(x) needs no dynamic scale; use bits >= 2.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`x` must have a floating dtype to be fake-quantized, got {x.dtype}.")
  compute = jnp.promote_types(x.dtype, jnp.float32)
  absmax = jnp.max(jnp.abs(x.astype(compute)), axis=axis, keepdims=True)
  scale = jax.lax.stop_gradient(jnp.maximum(absmax / grid.hi, jnp.finfo(jnp.float32).tiny))
  # Every entry lies inside the grid by construction, so the gradient is the identity
  # everywhere (x / scale can exceed hi by a rounding error at a row's largest entry).
  quantized = jax.lax.stop_gradient(_fake_quant(x, scale, grid))
  return (x - jax.lax.stop_gradient(x)) + quantized  # exactly `quantized`, gradient 1


def binarize(x: ArrayLike, scale: Optional[ArrayLike] = None) -> jax.Array:
  """Binary quantization ``scale * sign(x)`` (``sign(0) = +1``) with a clipped-identity STE.

  The gradient w.r.t. ``x`` is passed through where ``|x| <= scale`` (``|x| <=
  1`` without a scale) and is zero elsewhere. A given ``scale`` gets the LSQ
  gradient of the binary grid (``sign(v) - v`` inside, ``-1``/``+1`` outside).
  Same as ``fake_quant(x, scale, bits=1)``.

  Args:
    x: array to binarize.
    scale: optional positive scale (scalar or keep-dims array); None means 1.

  Returns:
    Values in ``{-scale, +scale}``, same shape and dtype as ``x``.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.binarize(jnp.array([-0.3, 0.0, 2.0]))
    Array([-1.,  1.,  1.], dtype=float32)
  """
  x = jnp.asarray(x)
  if scale is None:
    scale = jnp.ones((), x.dtype)
  return fake_quant(x, scale, bits=1, signed=True)


def fake_quant_unscaled(x: ArrayLike, scale: ArrayLike, *, bits: int,
                        signed: bool = True) -> jax.Array:
  """The TR paper's quantizer (Eq. 13): normalized codes, no multiplication by the scale.

  ``x_q = (1 / gamma) * round(clip(gamma * x / s, alpha, beta))`` with
  ``(alpha, beta, gamma) = (-2^(b-1), 2^(b-1) - 1, 2^(b-1))`` for signed and
  ``(0, 2^b - 1, 2^b)`` for unsigned inputs; binary (``bits=1``, signed) uses
  ``sign`` and ``(-1, 1, 1)``. Here ``scale`` is trquant's step size, i.e. the
  paper's clipping range ``s`` divided by ``gamma``, so the codes equal
  :func:`quantize`'s and the output is ``quantize(x, scale) / gamma``, a value in
  about ``[-1, 1]`` independent of the scale. It relies on a normalization
  layer (BatchNorm) after the layer to restore magnitudes.

  Gradients: rounding is straight-through; the clip and the division are
  differentiated exactly, so ``x`` gets ``1 / (gamma * scale)`` inside the range
  and the scale ``-x / (gamma * scale^2)`` inside, zero outside.

  Args:
    x: array to quantize.
    scale: positive step size (``s / gamma`` in the paper's notation).
    bits: bit width in ``[1, 16]``.
    signed: weights (signed) or post-ReLU activations (unsigned).

  Returns:
    Normalized quantized values, same shape and dtype as ``x``.

  References:
    Lee et al., `Scheduling Weight Transitions for Quantization-Aware Training
    <https://arxiv.org/abs/2404.19248>`_, ICCV 2025, Eq. 13.

  Example:
    >>> import jax.numpy as jnp, trquant
    >>> trquant.fake_quant_unscaled(jnp.array([-1.0, 0.3, 5.0]), 0.25, bits=2)
    Array([-1. ,  0.5,  0.5], dtype=float32)
  """
  grid = _grid(bits, signed, False)
  lo, hi = grid.lo, grid.hi
  checks.check_scale(x, scale)
  x = jnp.asarray(x)
  dtype = _compute_dtype(x, scale)
  v = x.astype(dtype) / jnp.asarray(scale, dtype)
  if grid.binary:
    clipped = jnp.clip(v, -1.0, 1.0)
    codes = clipped + jax.lax.stop_gradient(_codes(v, grid) - clipped)
    return codes.astype(x.dtype)
  gamma = 2 ** (bits - 1) if signed else 2**bits
  return (round_ste(jnp.clip(v, lo, hi)) / gamma).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Scale initialisation
# --------------------------------------------------------------------------------------

INIT_METHODS = ("lsq", "std3", "absmax", "mse")


def _reduce_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
  """Axes to reduce over when `axis` (keep-dims, per-channel) is kept."""
  if axis is None:
    return tuple(range(ndim))
  kept = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)  # type: ignore[arg-type]
  normalized = set()
  for a in kept:
    if not isinstance(a, numbers.Integral) or not -ndim <= int(a) < ndim:
      raise ValueError(f"`axis` {axis!r} is out of range for an array of rank {ndim}.")
    normalized.add(int(a) % ndim)
  return tuple(i for i in range(ndim) if i not in normalized)


def init_scale(
    x: ArrayLike,
    *,
    bits: int,
    method: str = "lsq",
    axis: Axis = None,
    signed: bool = True,
    narrow: bool = False,
    num_candidates: int = 100,
    group_size: Optional[int] = None,
    group_axis: int = -2,
) -> jax.Array:
  """Initial step size for quantizing ``x``.

  Args:
    x: the tensor to be quantized (a weight, or a batch of activations).
    bits: bit width in ``[1, 16]``.
    method: ``"lsq"``: ``2 * mean(|x|) / sqrt(hi)`` (LSQ paper);
      ``"std3"``: clipping range ``3 * std(x)`` mapped onto the grid,
      ``3 * std(x) / gamma`` with ``gamma = 2^(b-1)`` signed or ``2^b``
      unsigned (the TR paper's initialisation);
      ``"absmax"``: ``max(|x|) / hi`` (no clipping);
      ``"mse"``: grid search over ``num_candidates`` clipping ranges
      ``c * max(|x|)``, ``c`` in ``(0, 1]``, minimising the mean squared
      quantization error. For binary (``bits=1, signed=True``) ``"std3"``
      returns ``3 * std(x)``: the TR paper's binary quantizer
      ``sign(x)`` with a straight-through window ``|x| <= 3 std``; every other
      method returns ``mean(|x|)``, the error-minimising binary scale.
    axis: None for one per-tensor scale, or the axis (axes) to keep for
      per-channel scales, e.g. ``axis=-1`` for the output channels of a Flax
      kernel. The result keeps reduced dimensions, so it broadcasts to ``x``.
    signed: signed or unsigned grid.
    narrow: symmetric signed grid.
    num_candidates: number of clipping ranges tried by ``"mse"``.
    group_size: per-group (sub-channel) step sizes: one per group of ``group_size``
      consecutive entries along ``group_axis`` and per entry of the kept ``axis``
      (default ``-1`` with groups: the output channels), of the shape
      :func:`group_scale_shape` gives; every method is applied to each group. With
      ``"mse"`` each group also tries its channel's own MSE step size, so the grouped
      error is never above the per-channel one. ``group_size`` equal to the axis
      length gives exactly the per-channel scales.
    group_axis: the axis split into groups (default ``-2``, the input features).

  Returns:
    A float32 positive step size: a scalar, or a keep-dims array when ``axis``
    is given. Zero tensors get a tiny positive scale instead of zero.

  Example:
    >>> import jax, trquant
    >>> w = jax.random.normal(jax.random.key(0), (64, 8))
    >>> trquant.init_scale(w, bits=4, method="mse", axis=-1).shape
    (1, 8)
  """
  grid = _grid(bits, signed, narrow)
  lo, hi = grid.lo, grid.hi
  if method not in INIT_METHODS:
    raise ValueError(f"`method` must be one of {INIT_METHODS}, got {method!r}.")
  num_candidates = checks.check_int("num_candidates", num_candidates)
  if group_size is not None:
    axis = -1 if axis is None else axis
    return _init_group_scale(
        x, bits=bits, method=method,
        axis=tuple(axis) if isinstance(axis, Sequence) else int(axis), signed=signed,
        narrow=narrow, num_candidates=num_candidates,
        group_size=checks.check_group_size(group_size), group_axis=group_axis)
  x = jnp.asarray(x, jnp.float32)
  if x.size == 0:
    raise ValueError("`x` is empty: cannot initialise a scale from no values.")
  axes = _reduce_axes(x.ndim, axis)
  keep = axis is not None
  abs_x = jnp.abs(x)
  tiny = jnp.finfo(jnp.float32).tiny

  def reduce(fn, value):
    out = fn(value, axis=axes, keepdims=keep)
    return out if keep else out.reshape(())

  if grid.binary and method == "std3":
    scale = 3.0 * reduce(jnp.std, x)
  elif grid.binary:
    scale = reduce(jnp.mean, abs_x)
  elif method == "lsq":
    scale = 2.0 * reduce(jnp.mean, abs_x) / math.sqrt(hi)
  elif method == "std3":
    gamma = 2 ** (bits - 1) if signed else 2**bits
    scale = 3.0 * reduce(jnp.std, x) / gamma
  elif method == "absmax":
    scale = reduce(jnp.max, abs_x) / hi
  else:
    scale = _mse_step_size(x, lo=lo, hi=hi, axes=axes, keep=keep,
                           num_candidates=num_candidates)
  return jnp.maximum(scale, tiny).astype(jnp.float32)


# Jitted once per shape and grid: called eagerly (e.g. by each layer's constructor) the
# search would otherwise trace and compile its loop anew on every call.
@functools.partial(jax.jit, static_argnames=("lo", "hi", "axes", "keep", "num_candidates"))
def _mse_step_size(x, *, lo, hi, axes, keep, num_candidates):
  """The ``"mse"`` step size of :func:`init_scale`: the best of ``num_candidates`` clips."""
  tiny = jnp.finfo(jnp.float32).tiny

  def reduce(fn, value):
    out = fn(value, axis=axes, keepdims=keep)
    return out if keep else out.reshape(())

  absmax = reduce(jnp.max, jnp.abs(x))
  fractions = jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / num_candidates

  def error(fraction):
    step = jnp.maximum(fraction * absmax / hi, tiny)
    x_q = step * jnp.clip(jnp.round(x / step), lo, hi)
    return reduce(jnp.mean, jnp.square(x_q - x))

  errors = jax.lax.map(error, fractions)  # (num_candidates, *scale_shape)
  best = jnp.argmin(errors, axis=0)
  # fractions[best], computed instead of gathered: a gather with indices sharded over
  # explicit mesh axes needs an output sharding; this is the same float32 arithmetic.
  return (best + 1).astype(jnp.float32) / num_candidates * absmax / hi


# Jitted for the same reason as _mse_step_size (its arguments but x are static).
@functools.partial(jax.jit, static_argnames=("bits", "method", "axis", "signed", "narrow",
                                             "num_candidates", "group_size", "group_axis"))
def _init_group_scale(x, *, bits, method, axis, signed, narrow, num_candidates, group_size,
                      group_axis):
  """:func:`init_scale` per group: the method on each group of the grouped array."""
  x = jnp.asarray(x, jnp.float32)
  group, groups = _group_layout(x.shape, group_size, group_axis)
  kept = {int(a) % x.ndim for a in ((axis,) if isinstance(axis, numbers.Integral) else axis)}
  if group in kept:
    raise ValueError(f"`axis` {axis!r} keeps the grouped axis {group_axis}: groups split"
                     " the contraction axis of each kept (output) channel.")
  common = dict(bits=bits, method=method, signed=signed, narrow=narrow,
                num_candidates=num_candidates)
  per_channel = init_scale(x, axis=tuple(sorted(kept)), **common)
  if groups == 1:
    return per_channel  # one group: the per-channel scales themselves
  grouped = x.reshape(x.shape[:group] + (groups, int(group_size)) + x.shape[group + 1:])
  grouped_kept = tuple(sorted({group} | {a + 1 if a > group else a for a in kept}))
  scale = init_scale(grouped, axis=grouped_kept, **common)  # (..., groups, 1, ...)
  if method == "mse" and not (signed and bits == 1):
    # Each group also tries its channel's step size: never worse than per-channel.
    lo, hi = quant_range(bits, signed=signed, narrow=narrow)
    reduce_axes = tuple(i for i in range(grouped.ndim) if i not in grouped_kept)

    def error(step):
      x_q = step * jnp.clip(jnp.round(grouped / step), lo, hi)
      return jnp.mean(jnp.square(x_q - grouped), axis=reduce_axes, keepdims=True)

    channel = jnp.expand_dims(per_channel, group + 1)
    scale = jnp.where(error(channel) < error(scale), channel, scale)
  return jnp.squeeze(scale, group + 1).astype(jnp.float32)
