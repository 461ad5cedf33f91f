"""BatchNorm after QAT: trquant.nnx.check_batchnorm detects statistics that lag the weights."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant.nnx import QuantRule


class _ConvBN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


def _batches(n=6):
  return [jax.random.normal(jax.random.key(i), (32, 8, 8, 1)) for i in range(n)]


def _lagging_model():
  """Running statistics of the full-precision weights, then 2-bit weights: what a QAT
  run whose statistics lag its weights leaves (eval output no longer the trained one)."""
  fp = _ConvBN(nnx.Rngs(0))
  trquant.nnx.reestimate_batchnorm(fp, _batches())  # settled statistics of the FP weights
  q = trquant.nnx.quantize_model(fp, [QuantRule("conv.*", weight_bits=2, scale_method="absmax")])
  return fp, q


def test_statistics_of_the_weights_pass_and_lagging_ones_warn():
  fp, q = _lagging_model()
  batches = _batches()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the settled FP model: no warning
    settled = trquant.nnx.check_batchnorm(fp, batches)
  assert max(settled.values()) < 1e-3, settled
  with pytest.warns(trquant.nnx.BatchNormDivergenceWarning, match="bn2.*reestimate_batchnorm"):
    lagging = trquant.nnx.check_batchnorm(q, batches)
  assert lagging["bn2"] > 0.01, lagging
  # The running statistics were left as they were (only measured).
  assert trquant.nnx.batchnorm_divergence(q, batches) == pytest.approx(lagging)


def test_reestimate_fixes_the_statistics_and_the_eval_model():
  _, q = _lagging_model()
  batches = _batches()
  train_mode = nnx.clone(q)
  train_mode.train()
  before = np.abs(np.asarray(q(batches[0]) - train_mode(batches[0]))).max()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    measured = trquant.nnx.check_batchnorm(q, batches, reestimate=True)
  assert measured["bn2"] > 0.01
  after = trquant.nnx.check_batchnorm(q, batches)
  assert max(after.values()) < 1e-3, after
  # Evaluation now normalises as training on these batches did.
  gap = np.abs(np.asarray(q(batches[0]) - train_mode(batches[0]))).max()
  assert gap < 0.2 * before, (gap, before)


def test_check_batchnorm_bad_arguments():
  model = _ConvBN(nnx.Rngs(0))
  batches = _batches(2)
  for kwargs, match in [(dict(threshold=0), "threshold"),
                        (dict(threshold=float("nan")), "threshold"),
                        (dict(num_batches=0), "num_batches"),
                        (dict(reestimate="yes"), "reestimate")]:
    with pytest.raises(ValueError, match=match):
      trquant.nnx.check_batchnorm(model, batches, **kwargs)
  with pytest.raises(ValueError, match="no batch"):
    trquant.nnx.check_batchnorm(model, [])
  with pytest.raises(ValueError, match="no nnx.BatchNorm"):
    trquant.nnx.check_batchnorm(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [jnp.ones((2, 2))])
