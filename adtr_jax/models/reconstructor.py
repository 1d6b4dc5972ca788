"""The ADTR reconstruction transformer.

Tokens from the frozen backbone go through a 1x1 conv C->D, a post-norm transformer encoder, and a decoder
whose input is a learned auxiliary query embedding (not the encoder output), so the decoder cannot copy an
anomalous token through; a 1x1 conv maps D->C back. Learned position embeddings are added to queries and
keys of every attention layer (values carry no position), as in DETR-style transformers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _with_pos(x: jax.Array, pos: jax.Array) -> jax.Array:
  return x + pos


class FeedForward(nnx.Module):
  """Linear D->F, ReLU, dropout, linear F->D."""

  def __init__(self, dim: int, ffn_dim: int, dropout: float, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, ffn_dim, rngs=rngs)
    self.fc2 = nnx.Linear(ffn_dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.dropout(jax.nn.relu(self.fc1(x)), deterministic=deterministic, rngs=rngs)
    return self.fc2(h)


class Attention(nnx.Module):
  """Multi-head attention followed by dropout (the residual branch)."""

  def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.attn = nnx.MultiHeadAttention(
        num_heads, dim, dropout_rate=dropout, broadcast_dropout=False, decode=False, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, q, k, v, *, deterministic: bool, rngs: nnx.Rngs | None):
    out = self.attn(q, k, v, deterministic=deterministic, rngs=rngs)
    return self.dropout(out, deterministic=deterministic, rngs=rngs)


class EncoderLayer(nnx.Module):
  """x = LN(x + SelfAttn(x+pos, x+pos, x)); x = LN(x + FFN(x))."""

  def __init__(self, dim, num_heads, ffn_dim, dropout, *, rngs: nnx.Rngs):
    self.self_attn = Attention(dim, num_heads, dropout, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.ffn = FeedForward(dim, ffn_dim, dropout, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, pos, *, deterministic, rngs):
    qk = _with_pos(x, pos)
    x = self.norm1(x + self.self_attn(qk, qk, x, deterministic=deterministic, rngs=rngs))
    ffn = self.dropout(self.ffn(x, deterministic=deterministic, rngs=rngs),
                       deterministic=deterministic, rngs=rngs)
    return self.norm2(x + ffn)


class DecoderLayer(nnx.Module):
  """Self-attention over the queries, then encoder-decoder attention, then FFN; post-norm."""

  def __init__(self, dim, num_heads, ffn_dim, dropout, *, rngs: nnx.Rngs):
    self.self_attn = Attention(dim, num_heads, dropout, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.cross_attn = Attention(dim, num_heads, dropout, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.ffn = FeedForward(dim, ffn_dim, dropout, rngs=rngs)
    self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, tgt, memory, pos, *, deterministic, rngs):
    kw = dict(deterministic=deterministic, rngs=rngs)
    qk = _with_pos(tgt, pos)
    tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt, **kw))
    tgt = self.norm2(tgt + self.cross_attn(_with_pos(tgt, pos), _with_pos(memory, pos), memory, **kw))
    return self.norm3(tgt + self.dropout(self.ffn(tgt, **kw), **kw))


class Reconstructor(nnx.Module):
  """Reconstructs backbone features f [B, H, W, C] as f_hat [B, H, W, C].

  Args:
    in_channels: C, the backbone's concatenated channel count.
    grid: (H, W), the token grid; position and query embeddings have H*W rows.
    aux_query: when False the decoder is fed the encoder output instead of the learned query embedding
      (an ablation of the paper; the paper's model uses True).
  """

  def __init__(self, in_channels: int, grid: tuple[int, int], *, hidden_dim: int = 256,
               num_encoder_layers: int = 4, num_decoder_layers: int = 4, num_heads: int = 8,
               ffn_dim: int = 1024, dropout: float = 0.1, aux_query: bool = True, rngs: nnx.Rngs):
    if hidden_dim % num_heads:
      raise ValueError(f'model.hidden_dim={hidden_dim} must be divisible by model.num_heads={num_heads}')
    self.grid = tuple(grid)
    num_tokens = grid[0] * grid[1]
    init = nnx.initializers.normal(0.02)
    self.input_proj = nnx.Linear(in_channels, hidden_dim, rngs=rngs)   # the 1x1 conv C->D
    self.pos_embed = nnx.Param(init(rngs.params(), (num_tokens, hidden_dim)))
    self.aux_query = nnx.Param(init(rngs.params(), (num_tokens, hidden_dim))) if aux_query else None
    layer_args = (hidden_dim, num_heads, ffn_dim, dropout)
    self.encoder = nnx.List([EncoderLayer(*layer_args, rngs=rngs) for _ in range(num_encoder_layers)])
    self.decoder = nnx.List([DecoderLayer(*layer_args, rngs=rngs) for _ in range(num_decoder_layers)])
    self.output_proj = nnx.Linear(hidden_dim, in_channels, rngs=rngs)  # the 1x1 conv D->C

  def __call__(self, features: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """features [B, H, W, C] -> reconstruction [B, H, W, C]. Dropout needs rngs when not deterministic."""
    b, h, w, c = features.shape
    if (h, w) != self.grid:
      raise ValueError(f'feature grid {(h, w)} differs from the model grid {self.grid}: '
                       'dataset.image_size / backbone.out_stride must match the trained model')
    kw = dict(deterministic=deterministic, rngs=rngs)
    x = self.input_proj(features.reshape(b, h * w, c))
    pos = self.pos_embed[...][None]
    memory = x
    for layer in self.encoder:
      memory = layer(memory, pos, **kw)
    tgt = memory if self.aux_query is None else jnp.broadcast_to(self.aux_query[...][None], memory.shape)
    for layer in self.decoder:
      tgt = layer(tgt, memory, pos, **kw)
    return self.output_proj(tgt).reshape(b, h, w, c)
