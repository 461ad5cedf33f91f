"""A vision transformer in plain Flax NNX (no trquant in it), the model that
``examples/train_vit.py`` quantizes by surgery (``trquant.nnx.quantize_model``).

    from flax import nnx
    from trquant_examples.vit import ViT
    model = ViT(image_shape=(28, 28, 1), patch=7, dim=64, depth=4, heads=4, mlp_dim=128,
                num_classes=10, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, dim, heads, mlp_dim, *, rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
  """Vision transformer on (N, H, W, C) images with p x p patches and a class token."""

  def __init__(self, *, image_shape, patch, dim, depth, heads, mlp_dim, num_classes, rngs):
    height, width, channels = image_shape
    if height % patch or width % patch:
      raise ValueError(f"the patch size {patch} must divide the image size {height}x{width}")
    self.patch = patch
    tokens = (height // patch) * (width // patch)
    self.patch_embed = nnx.Linear(patch * patch * channels, dim, rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos_embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, tokens + 1, dim)))
    self.blocks = nnx.List([Block(dim, heads, mlp_dim, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, images):
    n, height, width, channels = images.shape
    p = self.patch
    patches = images.reshape(n, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * channels)
    x = self.patch_embed(patches)
    cls = jnp.broadcast_to(self.cls_token.get_value(), (n, 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.get_value()
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])
