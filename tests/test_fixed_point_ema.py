"""The fixed-point EMA of the oscillation transforms and its fused random draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trquant._src.oscillations import fixed_point_ema


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4), (1024, 10), (3, 3, 16, 32)])
def test_uniform_is_jax_random_uniform_bit_for_bit(shape):
  for seed in (0, 1, 12345):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 17), 2)
    expected = np.asarray(jax.random.uniform(key, shape, jnp.float32))
    for got in (fixed_point_ema.uniform(key, shape),
                jax.jit(fixed_point_ema.uniform, static_argnums=1)(key, shape)):
      assert got.shape == expected.shape and got.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(got).view(np.uint32), expected.view(np.uint32))


@settings(max_examples=20, deadline=None)
@given(stored=st.integers(0, 1000), target=st.integers(0, 1000),
       decay=st.sampled_from([0.0, 0.5, 0.9, 0.999]))
def test_stochastic_ema_is_unbiased_and_within_one_unit(stored, target, decay):
  """Each draw is the float EMA rounded down or up; the mean over many draws is the EMA."""
  n = 20000
  stored_array = jnp.full([n], stored, jnp.int32)
  new = fixed_point_ema.stochastic_ema(stored_array, jnp.full([n], target, jnp.float32), decay,
                                       fixed_point_ema.step_key(7, 3, 1), 0, 2**16)
  exact = stored + (1.0 - decay) * (target - stored)
  new = np.asarray(new, np.float64)
  assert np.all(np.abs(new - exact) < 1.0 + 1e-6)
  assert abs(new.mean() - exact) < 0.02  # the std of a mean of 20000 Bernoullis is <= 0.0036


def test_stochastic_ema_clips_to_its_range():
  stored = jnp.array([250, 5], jnp.int32)
  new = fixed_point_ema.stochastic_ema(stored, jnp.array([1000.0, -1000.0]), 0.0,
                                       fixed_point_ema.step_key(0, 0, 0), 0, 255)
  np.testing.assert_array_equal(np.asarray(new), [255, 0])
