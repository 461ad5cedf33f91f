"""trquant._src.adaround.loop: how the reconstruction loops run, and that both forms agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import trquant
from trquant import adaround
from trquant._src.adaround import loop as loops


def _conv(w, x):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_problem(n=64, seed=0):
  kw, kx = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (3, 3, 4, 6)) * 0.3
  x = jax.nn.relu(jax.random.normal(kx, (n, 6, 6, 4)))
  return w, x, _conv(w, x)


def test_has_convolution_looks_inside_nested_programs():
  w, x = jnp.ones((3, 3, 2, 2)), jnp.ones((1, 5, 5, 2))
  assert adaround.has_convolution(_conv, w, x)
  nested = jax.jit(lambda w, x: jax.checkpoint(_conv)(w, x) + 1.0)
  assert adaround.has_convolution(nested, w, x)
  assert not adaround.has_convolution(lambda w, x: x @ w, jnp.ones((3, 2)), jnp.ones((4, 3)))


def test_resolve_loop():
  w, x = jnp.ones((3, 3, 2, 2)), jnp.ones((1, 5, 5, 2))
  expected = "steps" if jax.default_backend() == "cpu" else "scan"
  assert loops.resolve_loop("auto", _conv, w, x) == expected
  assert loops.resolve_loop("auto", lambda w, x: x @ w, jnp.ones((3, 2)), jnp.ones((4, 3))) == "scan"
  assert loops.resolve_loop("scan", _conv, w, x) == "scan"
  assert loops.resolve_loop("steps", lambda w, x: x @ w, None, None) == "steps"
  for bad in ("fused", None, 1):
    with pytest.raises(ValueError, match="`loop` must be one of"):
      loops.check_loop(bad)


def test_steps_and_scan_give_the_same_reconstruction_of_a_conv_layer():
  w, x, y = _conv_problem()
  scale = trquant.init_scale(w, bits=3, method="mse")
  config = adaround.AdaRoundConfig(iters=40, lr=1e-2, batch_size=8, warmup_steps=4)
  kwargs = dict(weight_bits=3, key=jax.random.key(3))
  scan = adaround.reconstruct_layer(_conv, w, scale, x, y, config=config.replace(loop="scan"),
                                    **kwargs)
  steps = adaround.reconstruct_layer(_conv, w, scale, x, y, config=config.replace(loop="steps"),
                                     **kwargs)
  auto = adaround.reconstruct_layer(_conv, w, scale, x, y, config=config, **kwargs)
  assert steps.reconstruction_loss.shape == (40,) and steps.regularization_loss.shape == (40,)
  # Same batches and updates; the compiled programs differ in float summation order only.
  np.testing.assert_allclose(steps.reconstruction_loss, scan.reconstruction_loss, rtol=1e-2)
  np.testing.assert_allclose(steps.V, scan.V, atol=0.1)
  assert float(jnp.mean(steps.codes == scan.codes)) > 0.97
  np.testing.assert_array_equal(auto.V, steps.V if jax.default_backend() == "cpu" else scan.V)


def test_steps_and_scan_give_the_same_block_reconstruction():
  w, x, y = _conv_problem(seed=1)
  w2 = jax.random.normal(jax.random.key(9), (1, 1, 6, 3)) * 0.4
  block = lambda ws, a, x, key: _conv(ws[1], jax.nn.relu(_conv(ws[0], x)))
  target = block((w, w2), None, x, None)
  scales = [trquant.init_scale(v, bits=3, method="mse") for v in (w, w2)]
  config = adaround.AdaRoundConfig(iters=30, lr=1e-2, batch_size=8)
  kwargs = dict(weight_bits=3, key=jax.random.key(4))
  scan = adaround.reconstruct_block(block, [w, w2], scales, x, target,
                                    config=config.replace(loop="scan"), **kwargs)
  steps = adaround.reconstruct_block(block, [w, w2], scales, x, target,
                                     config=config.replace(loop="steps"), **kwargs)
  np.testing.assert_allclose(steps.reconstruction_loss, scan.reconstruction_loss, rtol=1e-2)
  for a, b in zip(steps.codes, scan.codes):
    assert a.shape == b.shape and float(jnp.mean(a == b)) > 0.97


def test_bad_loop_is_named():
  w, x, y = _conv_problem(n=8)
  scale = trquant.init_scale(w, bits=3, method="mse")
  with pytest.raises(ValueError, match="`loop` must be one of"):
    adaround.AdaRoundConfig(iters=2, loop="python")
  with pytest.raises(ValueError, match="`loop` must be one of"):
    adaround.AdaRoundConfig(iters=2, loop="eager")
