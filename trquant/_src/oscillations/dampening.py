"""The oscillation dampening loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from trquant._src import checks
from trquant._src import quantizers

__all__ = ["AGGREGATIONS", "dampening_loss"]

AGGREGATIONS = ("kernel_mean", "sum", "mean")


def dampening_loss(w: ArrayLike, scale: ArrayLike, *, bits: int, signed: bool = True,
                   narrow: bool = False, aggregation: str = "kernel_mean") -> jax.Array:
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
