"""Reconstructors and embeddings for the paper's ablations (not the ADTR model itself).

  * `TokenMLP` / `ConvNet`: reconstruction networks without attention, at the transformer's width and
    depth (hidden D, FFN F, num_encoder_layers + num_decoder_layers residual blocks), so the comparison
    is about the operator: per-token MLP blocks (no token mixing) or 3x3 conv blocks (local mixing).
  * `PixelEmbedding`: reconstruct pixels instead of features: the "embedding" is the image cut into
    non-overlapping s x s patches, each flattened to s*s*3 values.
All share the reconstructor call signature: x [B, H, W, C] -> [B, H, W, C].
"""
from __future__ import annotations

import jax
from flax import nnx

from adtr_jax import errors


class _Block(nnx.Module):
  """x = LN(x + W2 relu(mix(x))), where mix is a token-wise linear (MLP) or a 3x3 conv (CNN)."""

  def __init__(self, dim: int, ffn_dim: int, dropout: float, conv: bool, *, rngs: nnx.Rngs):
    self.mix = (nnx.Conv(dim, ffn_dim, (3, 3), padding='SAME', rngs=rngs) if conv
                else nnx.Linear(dim, ffn_dim, rngs=rngs))
    self.out = nnx.Linear(ffn_dim, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, deterministic, rngs):
    """x [B, H, W, D] -> [B, H, W, D]."""
    h = self.dropout(jax.nn.relu(self.mix(x)), deterministic=deterministic, rngs=rngs)
    return self.norm(x + self.dropout(self.out(h), deterministic=deterministic, rngs=rngs))


class _BlockStack(nnx.Module):
  """1x1 C->D, residual blocks, 1x1 D->C."""
  conv = False

  def __init__(self, in_channels: int, grid: tuple[int, int], *, hidden_dim: int = 256,
               num_encoder_layers: int = 4, num_decoder_layers: int = 4, ffn_dim: int = 1024,
               dropout: float = 0.1, rngs: nnx.Rngs):
    self.grid = tuple(grid)
    self.input_proj = nnx.Linear(in_channels, hidden_dim, rngs=rngs)
    self.blocks = nnx.List([_Block(hidden_dim, ffn_dim, dropout, self.conv, rngs=rngs)
                            for _ in range(num_encoder_layers + num_decoder_layers)])
    self.output_proj = nnx.Linear(hidden_dim, in_channels, rngs=rngs)

  def __call__(self, features: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """features [B, H, W, C] -> reconstruction [B, H, W, C]."""
    x = self.input_proj(features)
    for block in self.blocks:
      x = block(x, deterministic=deterministic, rngs=rngs)
    return self.output_proj(x)


class TokenMLP(_BlockStack):
  conv = False


class ConvNet(_BlockStack):
  conv = True


class PixelEmbedding(nnx.Module):
  """images [B, S, S, 3] in [0, 1] -> patches [B, S/s, S/s, s*s*3], standardised to about unit scale."""

  def __init__(self, out_stride: int):
    self.out_stride = int(out_stride)
    self.out_channels = 3 * self.out_stride ** 2

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    s = self.out_stride
    if h % s or w % s:
      raise errors.ConfigError(f'image size {h}x{w} must be a multiple of backbone.out_stride={s}')
    x = (images - 0.5) / 0.25  # pixels in [0, 1] -> roughly zero mean, unit scale
    x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // s, w // s, s * s * c)
