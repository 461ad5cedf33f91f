"""The examples' byte LM (trquant_examples.lm): KV-cache decoding and greedy generation,
float, fake-quantized and packed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import trquant
from trquant_examples.lm import LM, generate

pytestmark = pytest.mark.integration  # `python -m pytest -m integration`


def _lm(seed=0):
  return LM(dim=32, layers=2, heads=4, kv_heads=2, hidden=64, rngs=nnx.Rngs(seed))


def _quantized(model):
  return trquant.nnx.quantize_model(model, [
      trquant.nnx.QuantRule("embed", skip=True),
      trquant.nnx.QuantRule("lm_head", weight_bits=8, per_channel=True),
      trquant.nnx.QuantRule(".*", weight_bits=4, group_size=8)])


def _greedy_without_cache(model, prompt, num_tokens):
  tokens = prompt
  for _ in range(num_tokens):
    next_token = jnp.argmax(model(tokens)[:, -1], axis=-1).astype(tokens.dtype)
    tokens = jnp.concatenate([tokens, next_token[:, None]], axis=1)
  return tokens


def test_cached_decoding_matches_the_full_forward_pass():
  model = _lm()
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  full = model(tokens)
  cache = model.init_cache(2, 12)
  prefill, cache = model.decode(tokens[:, :5], cache, 0)
  steps = [prefill]
  for position in range(5, 12):
    logits, cache = model.decode(tokens[:, position:position + 1], cache, position)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_generation_float_fake_quant_and_packed():
  model = _lm()
  prompt = jax.random.randint(jax.random.key(2), (2, 6), 0, 256)
  generated = generate(model, prompt, 8)
  assert generated.shape == (2, 14)
  np.testing.assert_array_equal(generated[:, :6], prompt)
  np.testing.assert_array_equal(generated, _greedy_without_cache(model, prompt, 8))
  fake_quant = _quantized(model)
  packed = trquant.export.packed_model(fake_quant)
  np.testing.assert_array_equal(generate(packed, prompt, 8), generate(fake_quant, prompt, 8))
  np.testing.assert_array_equal(generate(packed, prompt, 8),
                                _greedy_without_cache(fake_quant, prompt, 8))
