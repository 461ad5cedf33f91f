"""Argument checks shared by trquant's modules: bit widths and quantization scales.

Each raises a ``ValueError`` that names the argument, what it got and what it must be.
Values are checked only when they are concrete (numbers, numpy arrays, jax arrays that
are not traced and live on this host): a traced value can only be checked where it is
computed.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import numpy as np

MAX_BITS = 16

__all__ = ["MAX_BITS", "check_bits", "check_scale", "check_scale_values", "concrete_values"]


def check_bits(bits, name: str = "bits") -> int:
  """``bits`` as an int, or a ValueError unless it is a Python int in [1, MAX_BITS]."""
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral):
    raise ValueError(f"`{name}` must be a Python int in [1, {MAX_BITS}], got {bits!r}.")
  bits = int(bits)
  if not 1 <= bits <= MAX_BITS:
    raise ValueError(f"`{name}` must be in [1, {MAX_BITS}], got {bits}.")
  return bits


def concrete_values(value) -> Optional[np.ndarray]:
  """``value`` as a numpy array when it is concrete (a number, numpy or jax array that is
  not traced and whose shards are all on this host), else None: a traced value can only
  be checked where it is computed."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, jax.Array):
    if not value.is_fully_addressable:
      return None
    return np.asarray(value)
  if isinstance(value, (numbers.Number, np.ndarray, np.generic)):
    return np.asarray(value)
  return None


def check_scale_values(scale, name: str = "scale"):
  """Raises a ValueError unless a concrete `scale` is positive and finite everywhere."""
  if isinstance(scale, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be a positive number or array, got {scale!r}.")
  values = concrete_values(scale)
  if values is not None and values.size:
    try:
      values = values.astype(np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"`{name}` must be a positive number or array, got dtype"
                       f" {values.dtype}.") from None
    bad = ~(np.isfinite(values) & (values > 0))
    if np.any(bad):
      first = values.reshape(-1)[np.argmax(bad.reshape(-1))]
      where = "" if values.ndim == 0 else f" everywhere ({int(bad.sum())} of {values.size} are not)"
      raise ValueError(f"`{name}` must be positive and finite{where}; got {float(first)!r}.")


def check_scale(x, scale, name: str = "scale"):
  """Validates `scale`: its shape always, its values when they are concrete.

  Python numbers, numpy arrays and concrete (untraced) jax arrays, such as the output
  of :func:`init_scale`, must be positive and finite everywhere. A traced scale (inside
  ``jax.jit``) cannot be checked here.
  """
  check_scale_values(scale, name)
  scale_shape = np.shape(scale)
  x_shape = np.shape(x)
  try:
    out_shape = np.broadcast_shapes(x_shape, scale_shape)
  except ValueError:
    out_shape = None
  if out_shape != tuple(x_shape):
    raise ValueError(
        f"`{name}` of shape {scale_shape} does not broadcast to x of shape {x_shape}; use a"
        " scalar for per-tensor or a keep-dims array (e.g. init_scale(..., axis=-1)) for"
        " per-channel quantization."
    )
