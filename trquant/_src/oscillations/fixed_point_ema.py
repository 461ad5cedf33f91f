"""Fixed-point EMAs with unbiased stochastic rounding, and the random draws they use.

The oscillation transforms keep per-weight EMAs (an oscillation frequency, a code) in
uint16/int16 fixed point: 2-3 bytes per weight, and exact in expectation where a
low-precision float EMA loses small decrements (``(1 - decay) * f`` far below one unit).
The uniform draws are jax.random's, bit for bit, computed as elementwise operations that
fuse into the EMA update's single pass over the weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["step_key", "stochastic_ema", "threefry2x32", "uniform"]

THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
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
    for r in THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ rotate_left(x2, r)
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def uniform(key, shape):
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
  bits1, bits2 = threefry2x32(k1, k2, jnp.zeros(shape, jnp.uint32), counts)
  # jax.random.uniform's mapping: 23 random mantissa bits with exponent 0, minus 1.
  mantissa = ((bits1 ^ bits2) >> np.uint32(9)) | np.uint32(0x3F800000)
  return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)


def stochastic_ema(stored, target, decay, key, lo: int, hi: int):
  """``stored + (1 - decay) * (target - stored)`` rounded stochastically to an integer.

  ``stored`` is an integer array, ``target`` a float32 array in the same units. The
  increment is rounded down or up with probabilities that make the result exact in
  expectation, so small decrements (``(1 - decay) * f`` is far below one unit) are not lost
  the way a low-precision float EMA loses them.
  """
  delta = jnp.asarray(1.0 - decay, jnp.float32) * (target - stored.astype(jnp.float32))
  whole = jnp.floor(delta)
  round_up = uniform(key, delta.shape) < delta - whole
  new = stored.astype(jnp.int32) + whole.astype(jnp.int32) + round_up.astype(jnp.int32)
  return jnp.clip(new, lo, hi).astype(stored.dtype)


def _leaf_key(seed: int, step, slot: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), slot)


def step_key(seed: int, step, slot: int):
  """The key of one leaf's draws at one step: a fixed seed folded with the step and slot,
  so runs are reproducible and a restored state continues bit-identically."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), slot)
