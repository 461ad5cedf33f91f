"""A decoder-only byte LM in plain Flax NNX (no trquant in it), written the way
Llama/Qwen-style models are written in NNX: the model that ``examples/train_lm.py``
quantizes by surgery (``trquant.nnx.quantize_model``).

A byte embedding (``nnx.Embed``, vocabulary 256), pre-norm blocks of grouped-query
attention (``nnx.Einsum`` projections, rotary position embeddings, a causal mask) and
a SwiGLU MLP (``nnx.Linear``), ``nnx.RMSNorm``, and an untied ``nnx.Linear`` head.

    from flax import nnx
    from trquant_examples.lm import LM, lm_loss
    model = LM(dim=128, layers=2, heads=4, kv_heads=2, hidden=384, rngs=nnx.Rngs(0))
    text = generate(model, prompt_tokens, num_tokens=64)  # greedy, with a KV cache
"""

from __future__ import annotations

import math
import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def rope(x, theta=10_000.0, offset=0):
  """Rotary position embedding of (batch, time, heads, head_dim), positions offset..offset+time-1."""
  time_, dim = x.shape[1], x.shape[-1]
  freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = (offset + jnp.arange(time_, dtype=jnp.float32))[:, None] * freqs
  sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _init(in_axis, out_axis):
  """Fan-in truncated-normal initializer of an nnx.Einsum kernel with these in / out axes."""
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                           in_axis=in_axis, out_axis=out_axis)


class Attention(nnx.Module):
  """Causal grouped-query attention: ``heads`` query heads share ``kv_heads`` key/value heads."""

  def __init__(self, dim, heads, kv_heads, *, rngs):
    self.head_dim = head_dim = dim // heads
    qkv = dict(kernel_init=_init(0, (1, 2)), rngs=rngs)
    self.q_proj = nnx.Einsum("btd,dhk->bthk", (dim, heads, head_dim), **qkv)
    self.k_proj = nnx.Einsum("btd,dhk->bthk", (dim, kv_heads, head_dim), **qkv)
    self.v_proj = nnx.Einsum("btd,dhk->bthk", (dim, kv_heads, head_dim), **qkv)
    self.o_proj = nnx.Einsum("bthk,hkd->btd", (heads, head_dim, dim), kernel_init=_init((0, 1), 2),
                             rngs=rngs)

  def __call__(self, x):
    return self.decode(x, None, 0)[0]

  def decode(self, x, cache, position):
    """Attention of ``x`` (batch, time, dim) over itself, or, given ``cache`` (the keys and
    values of the positions before ``position``, batch x max_len x kv_heads x head_dim),
    over the cache and itself; returns the output and the updated cache."""
    b, t, _ = x.shape
    q = rope(self.q_proj(x), offset=position)
    k, v = rope(self.k_proj(x), offset=position), self.v_proj(x)
    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, position, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, position, 0, 0))
      cache = {"k": k, "v": v}
    groups = k.shape[2]
    q = q.reshape(b, t, groups, -1, self.head_dim)  # query head g*r + i reads kv head g
    logits = jnp.einsum("btgrk,bsgk->bgrts", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    # Query i (at position + i) sees keys at positions <= position + i.
    causal = (position + jnp.arange(t))[:, None] >= jnp.arange(k.shape[1])[None, :]
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", weights, v).reshape(b, t, -1, self.head_dim)
    return self.o_proj(out), cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim, hidden, *, rngs):
    self.gate_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block: x + attention(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

  def __init__(self, dim, heads, kv_heads, hidden, *, rngs):
    self.input_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, kv_heads, rngs=rngs)
    self.post_attention_norm = nnx.RMSNorm(dim, rngs=rngs)
    self.mlp = MLP(dim, hidden, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.input_norm(x))
    return x + self.mlp(self.post_attention_norm(x))

  def decode(self, x, cache, position):
    """:meth:`__call__` with the attention over a KV cache; returns the output and the cache."""
    attended, cache = self.attn.decode(self.input_norm(x), cache, position)
    x = x + attended
    return x + self.mlp(self.post_attention_norm(x)), cache


class LM(nnx.Module):
  """Decoder-only LM on byte tokens (batch, time) -> logits (batch, time, vocab)."""

  def __init__(self, *, vocab=256, dim, layers, heads, kv_heads, hidden, rngs):
    self.embed = nnx.Embed(vocab, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.layers = nnx.List([Block(dim, heads, kv_heads, hidden, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(dim, rngs=rngs)
    self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))

  def init_cache(self, batch, max_len, dtype=jnp.float32):
    """An empty KV cache for ``max_len`` positions: one dict of ``k`` and ``v`` per block."""
    attn = self.layers[0].attn
    shape = (batch, max_len, attn.k_proj.kernel_shape[1], attn.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in self.layers]

  def decode(self, tokens, cache, position):
    """Logits of ``tokens`` (batch, time) at positions ``position``.., attending over the
    cached keys and values before them; returns the logits and the updated cache."""
    x = self.embed(tokens)
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache = layer.decode(x, layer_cache, position)
      new_cache.append(layer_cache)
    return self.lm_head(self.norm(x)), new_cache


def generate(model, prompt, num_tokens):
  """Greedy generation with a KV cache: ``prompt`` (batch, time) and ``num_tokens`` new
  tokens, (batch, time + num_tokens). One jitted prefill, then one jitted step per token."""
  prompt = jnp.asarray(prompt)
  batch, length = prompt.shape
  cache = model.init_cache(batch, length + num_tokens)
  logits, cache = _decode(model, prompt, cache, 0)
  tokens = [jnp.argmax(logits[:, -1], axis=-1)]
  for step in range(num_tokens - 1):
    logits, cache = _decode(model, tokens[-1][:, None], cache, jnp.int32(length + step))
    tokens.append(jnp.argmax(logits[:, -1], axis=-1))
  return jnp.concatenate([prompt, jnp.stack(tokens, axis=1).astype(prompt.dtype)], axis=1)


@nnx.jit
def _decode(model, tokens, cache, position):
  return model.decode(tokens, cache, position)


def adamw(learning_rate, weight_decay):
  """AdamW with weight decay on the matrices only (not on norms' scales or biases)."""
  return optax.adamw(learning_rate, weight_decay=weight_decay,
                     mask=lambda params: jax.tree.map(lambda leaf: jnp.ndim(leaf) >= 2, params))


def qat_optimizer(model, *, lr, steps, weight_decay, tr=False):
  """The examples' QAT recipe for a model quantized by rules: AdamW with a cosine LR over
  ``steps``, or (``tr=True``) AdamW then ``trquant.tr_schedule(measured_target)`` on the
  kernels of at most 4 bits (an 8-bit head keeps the cosine LR of every other parameter);
  oscillations tracked on those kernels either way (``trquant.nnx.oscillation_stats``)."""
  import trquant  # the model code above needs none of it

  cosine = optax.cosine_decay_schedule(lr, steps)
  codes = trquant.nnx.codes_fn(model, max_bits=4)
  track = trquant.track_oscillations(codes_fn=codes, decay=1.0 - min(1e-2, 20 / steps))
  if not tr:
    return optax.chain(adamw(cosine, weight_decay), track)
  quant = optax.chain(adamw(lr, weight_decay),
                      trquant.tr_schedule(trquant.measured_target(steps), codes_fn=codes))
  tx = optax.partition({"quant": quant, "float": adamw(cosine, weight_decay)},
                       trquant.nnx.param_labels(model, max_bits=4))
  return optax.chain(tx, track)


def lm_loss(model, batch):
  """Mean next-byte cross-entropy (nats) of (batch, context + 1) token windows."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch[:, 1:]).mean()


# Data: the standard library's source, one token per byte.


def load_corpus(max_files=None):
  """The Python standard library's own ``.py`` files (``site-packages`` left out), sorted
  by path, as bytes: every 10th file held out. Nothing is downloaded."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
  files = files[:max_files] if max_files else files
  train, held = [], []
  for index, path in enumerate(files):
    (held if index % 10 == 9 else train).append(path.read_bytes())
  as_array = lambda chunks: np.frombuffer(b"".join(chunks), np.uint8)
  return {"root": str(root), "files": len(files), "train": as_array(train), "held": as_array(held)}


def eval_windows(data, count, context):
  """``count`` fixed windows of ``context + 1`` bytes, evenly spaced over the data."""
  starts = np.linspace(0, len(data) - context - 1, count).astype(np.int64)
  return np.stack([data[s:s + context + 1] for s in starts]).astype(np.int32)


def train_batches(data, batch_size, context, seed):
  """Endless random windows of ``context + 1`` bytes (batch_size of them), seeded."""
  rng = np.random.default_rng(seed)
  index = np.arange(context + 1)
  while True:
    starts = rng.integers(0, len(data) - context - 1, batch_size)
    yield data[starts[:, None] + index].astype(np.int32)
