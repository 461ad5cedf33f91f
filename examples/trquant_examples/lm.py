"""A decoder-only byte LM in plain Flax NNX (no trquant in it), written the way
Llama/Qwen-style models are written in NNX: the model that ``examples/train_lm.py``
quantizes by surgery (``trquant.nnx.quantize_model``).

A byte embedding (``nnx.Embed``, vocabulary 256), pre-norm blocks of grouped-query
attention (``nnx.Einsum`` projections, rotary position embeddings, a causal mask) and
a SwiGLU MLP (``nnx.Linear``), ``nnx.RMSNorm``, and an untied ``nnx.Linear`` head.

    from flax import nnx
    from trquant_examples.lm import LM, lm_loss
    model = LM(dim=128, layers=2, heads=4, kv_heads=2, hidden=384, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def rope(x, theta=10_000.0):
  """Rotary position embedding of (batch, time, heads, head_dim), positions 0..time-1."""
  time_, dim = x.shape[1], x.shape[-1]
  freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(time_, dtype=jnp.float32)[:, None] * freqs
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
    b, t, _ = x.shape
    q, k, v = rope(self.q_proj(x)), rope(self.k_proj(x)), self.v_proj(x)
    groups = k.shape[2]
    q = q.reshape(b, t, groups, -1, self.head_dim)  # query head g*r + i reads kv head g
    logits = jnp.einsum("btgrk,bsgk->bgrts", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", weights, v).reshape(b, t, -1, self.head_dim)
    return self.o_proj(out)


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


def lm_loss(model, batch):
  """Mean next-byte cross-entropy (nats) of (batch, context + 1) token windows."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch[:, 1:]).mean()
