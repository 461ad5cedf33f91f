"""trquant.codes_tree's counts against a straightforward reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trquant._src import codes_tree

# Sizes around the packed group of 16 flags, a scalar, an empty leaf and kernel shapes.
SHAPES = [(), (0,), (1,), (15,), (16,), (17,), (33, 7), (3, 3, 16, 8), (1024, 10)]


def _codes(shape, seed):
  rng = np.random.default_rng(seed)
  before = rng.integers(-2, 2, shape).astype(np.float32)
  after = np.where(rng.random(shape) < 0.3, rng.integers(-2, 2, shape), before).astype(np.float32)
  return before, after, rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_counts_match_reference(shape, dtype):
  before, after, update = (jnp.asarray(a, dtype) for a in _codes(shape, seed=len(shape)))
  expected = int(np.sum(np.asarray(before, np.float32) != np.asarray(after, np.float32)))
  count = jax.jit(codes_tree.count_transitions)(before, after, update)
  assert count.dtype == jnp.float32 and float(count) == expected
  assert int(jax.jit(codes_tree.count_true)(before != after)) == expected
  assert int(codes_tree.count_true(before != after)) == expected


def test_nan_codes_count_as_changed_as_before():
  before = jnp.array([0.0, jnp.nan, 1.0, jnp.nan] * 5)
  after = jnp.array([0.0, jnp.nan, 0.0, 1.0] * 5)
  expected = float(jnp.sum(before != after))  # NaN != NaN: a NaN code counts as a change
  assert float(codes_tree.count_transitions(before, after, jnp.ones(20))) == expected == 15.0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("shape", [s for s in SHAPES if np.prod(s) > 0])
def test_non_finite_update_gives_nan(shape, bad):
  before, after, update = _codes(shape, seed=3)
  size = max(int(np.prod(shape)), 1)
  for index in {0, size // 2, size - 1}:  # in a packed group and in the tail
    flat = update.reshape(-1).copy()
    flat[index] = bad
    count = jax.jit(codes_tree.count_transitions)(before, after, flat.reshape(shape))
    assert np.isnan(float(count))


@pytest.mark.parametrize("shape", [s for s in SHAPES if np.prod(s) > 0])
def test_count_finite_matches_reference(shape):
  before, after, update = _codes(shape, seed=5)
  mask = jnp.asarray(before != after)
  count, finite = jax.jit(codes_tree.count_finite)(mask, jnp.asarray(update))
  assert int(count) == int(np.sum(before != after)) and bool(finite)
  flat = update.reshape(-1).copy()
  flat[-1] = np.nan
  count, finite = codes_tree.count_finite(mask, jnp.asarray(flat.reshape(shape)))
  assert not bool(finite)
  assert int(count) == int(np.sum((before != after).reshape(-1)[:-1]))
