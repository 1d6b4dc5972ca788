"""The ADTR reconstruction transformer.

Tokens from the frozen backbone go through a 1x1 conv C->D, a post-norm transformer encoder, and a decoder
whose input is a learned auxiliary query embedding (not the encoder output), so the decoder cannot copy an
anomalous token through; a 1x1 conv maps D->C back. Learned position embeddings are added to queries and
keys of every attention layer (values carry no position), as in DETR-style transformers.

Precision: parameters are float32; `dtype` sets the compute dtype of the matmuls (bfloat16 on
accelerators). The output is always float32, so losses and scores are computed in float32.
Attention is `jax.nn.dot_product_attention` (cuDNN flash attention on GPUs with bfloat16); like that
kernel it has no dropout on the attention weights, only on each residual branch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adtr_jax import errors

ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'auto')
POS_INITS = ('normal', 'fourier')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}   # model.dtype -> compute dtype


def check_heads(hidden_dim: int, num_heads: int) -> None:
  if hidden_dim % num_heads:
    raise errors.ConfigError(f'model.hidden_dim={hidden_dim} must be divisible by model.num_heads={num_heads}')


def compute_dtype(dtype: str | type) -> type:
  """model.dtype ('float32' | 'bfloat16', as configs spell it) or jnp.float32 / jnp.bfloat16 -> the jnp type."""
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in DTYPES:
    raise errors.ConfigError(f'model.dtype={dtype!r} must be one of {sorted(DTYPES)}')
  return DTYPES[name]


def fourier_positions(key: jax.Array, grid: tuple[int, int], dim: int, scale: float = 1.0) -> jax.Array:
  """[H*W, dim] float32 random Fourier features of the 2-D token position (u_i in token units):
  sqrt(2) cos(w_k . u_i + b_k), w_k ~ N(0, I), b_k ~ U[0, 2 pi). Each dim has unit variance (the scale
  of an N(0, 1) embedding), and p_i . p_j / dim ~ exp(-|u_i - u_j|^2 / 2): a Gaussian kernel one token
  wide, where independent draws give ~0 for every j != i. So tied q/k attention starts out looking at
  a token and its nearest neighbours instead of at the token alone and random others.
  """
  rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
  u = jnp.asarray(np.stack([rows, cols], axis=1), jnp.float32)     # [T, 2]
  kw, kb = jax.random.split(key)
  w = jax.random.normal(kw, (2, dim))
  b = jax.random.uniform(kb, (dim,), maxval=2 * np.pi)
  return scale * np.sqrt(2.0) * jnp.cos(u @ w + b)


class FeedForward(nnx.Module):
  """Linear D->F, ReLU, dropout, linear F->D."""

  def __init__(self, dim: int, ffn_dim: int, dropout: float, *, dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, ffn_dim, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(ffn_dim, dim, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.dropout(jax.nn.relu(self.fc1(x)), deterministic=deterministic, rngs=rngs)
    return self.fc2(h)


class Attention(nnx.Module):
  """Multi-head attention (q, k, v and output projections) followed by dropout: the residual branch."""

  def __init__(self, dim: int, num_heads: int, dropout: float, *, dtype, implementation: str,
               tie_qk_init: bool = False, rngs: nnx.Rngs):
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise errors.ConfigError(f'model.attention={implementation!r} must be one of {ATTENTION_IMPLEMENTATIONS}')
    self.num_heads = num_heads
    self.implementation = None if implementation == 'auto' else implementation
    self.query, self.key, self.value, self.out = (
        nnx.Linear(dim, dim, dtype=dtype, rngs=rngs) for _ in range(4))
    if tie_qk_init:
      # Start with W_k = W_q: (x_i + p_i) . (y_j + p_j) then holds p_i W W^T p_j, largest at j = i, so
      # attention starts out matching positions instead of learning to from random projections.
      # Only the initial values are shared; the two are trained independently.
      self.key.kernel[...] = jnp.copy(self.query.kernel[...])  # a buffer of its own (donation)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, q, k, v, *, deterministic: bool, rngs: nnx.Rngs | None, mask=None):
    """q [B, Tq, D], k and v [B, Tk, D] -> [B, Tq, D]; mask [Tq, Tk] bool (True: may attend) or None."""
    def heads(x):  # [B, T, D] -> [B, T, H, D/H], the layout dot_product_attention takes
      return x.reshape(*x.shape[:2], self.num_heads, -1)

    out = jax.nn.dot_product_attention(heads(self.query(q)), heads(self.key(k)), heads(self.value(v)),
                                       mask=None if mask is None else mask[None, None],
                                       implementation=self.implementation)
    out = self.out(out.reshape(*out.shape[:2], -1))
    return self.dropout(out, deterministic=deterministic, rngs=rngs)


class EncoderLayer(nnx.Module):
  """x = LN(x + SelfAttn(x+pos, x+pos, x)); x = LN(x + FFN(x))."""

  def __init__(self, dim, num_heads, ffn_dim, dropout, *, dtype, attention: str, tie_qk_init: bool,
               rngs: nnx.Rngs):
    self.self_attn = Attention(dim, num_heads, dropout, dtype=dtype, implementation=attention,
                               tie_qk_init=tie_qk_init, rngs=rngs)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.ffn = FeedForward(dim, ffn_dim, dropout, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, pos, *, deterministic, rngs, mask=None):
    kw = dict(deterministic=deterministic, rngs=rngs)
    qk = x + pos
    x = self.norm1(x + self.self_attn(qk, qk, x, mask=mask, **kw))
    return self.norm2(x + self.dropout(self.ffn(x, **kw), **kw))


class DecoderLayer(nnx.Module):
  """Self-attention over the queries, then encoder-decoder attention, then FFN; post-norm."""

  def __init__(self, dim, num_heads, ffn_dim, dropout, *, dtype, attention: str, tie_qk_init: bool,
               rngs: nnx.Rngs):
    attn = dict(dtype=dtype, implementation=attention, tie_qk_init=tie_qk_init, rngs=rngs)
    self.self_attn = Attention(dim, num_heads, dropout, **attn)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.cross_attn = Attention(dim, num_heads, dropout, **attn)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.ffn = FeedForward(dim, ffn_dim, dropout, dtype=dtype, rngs=rngs)
    self.norm3 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, tgt, memory, pos, *, deterministic, rngs, mask=None):
    kw = dict(deterministic=deterministic, rngs=rngs)
    qk = tgt + pos
    tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt, mask=mask, **kw))
    tgt = self.norm2(tgt + self.cross_attn(tgt + pos, memory + pos, memory, mask=mask, **kw))
    return self.norm3(tgt + self.dropout(self.ffn(tgt, **kw), **kw))


class Reconstructor(nnx.Module):
  """Reconstructs backbone features f [B, H, W, C] as f_hat [B, H, W, C] (float32).

  Args:
    in_channels: C, the backbone's concatenated channel count.
    grid: (H, W), the token grid; position and query embeddings have H*W rows.
    aux_query: when False the decoder is fed the encoder output instead of the learned query embedding
      (an ablation of the paper; the paper's model uses True).
    embed_init_std: standard deviation of the initial position and query embeddings. At 0.02 (BERT's
      habit) position barely moves attention for thousands of steps at lr 1e-4; at 1.0 (the scale of
      the LayerNorm'd tokens they are added to) the decoder tells positions apart from the first step.
    pos_init: 'normal' (N(0, embed_init_std) draws) or 'fourier' (random Fourier features of the
      position at the same scale, see fourier_positions); either way the position embedding is
      learned. The query embedding is N(0, embed_init_std) in both cases.
    dtype: compute dtype, 'float32' or 'bfloat16' (or the jnp type); parameters stay float32.
    attention: 'xla', 'cudnn' (GPU, bfloat16) or 'auto' (let JAX choose).
    tie_qk_init: initialise every attention's key projection equal to its query projection (see
      Attention); False draws them independently.
    neighbour_mask: k > 0 forbids every attention (encoder, decoder self and cross) to look at the
      k x k tokens around a token's own position (UniAD's neighbour-masked attention; ADTR has none).
    feature_jitter: s > 0 adds N(0, 1) * |f_u| / C * s to each input token while training (UniAD's
      feature jitter; the target stays the clean features; ADTR has none).
  """

  def __init__(self, in_channels: int, grid: tuple[int, int], *, hidden_dim: int = 256,
               num_encoder_layers: int = 4, num_decoder_layers: int = 4, num_heads: int = 8,
               ffn_dim: int = 1024, dropout: float = 0.1, aux_query: bool = True,
               embed_init_std: float = 1.0, dtype: str | type = 'float32', attention: str = 'xla',
               tie_qk_init: bool = False, neighbour_mask: int = 0, feature_jitter: float = 0.0,
               pos_init: str = 'normal', rngs: nnx.Rngs):
    check_heads(hidden_dim, num_heads)
    dtype = compute_dtype(dtype)
    self.grid = tuple(grid)
    num_tokens = grid[0] * grid[1]
    init = nnx.initializers.normal(embed_init_std)
    self.input_proj = nnx.Linear(in_channels, hidden_dim, dtype=dtype, rngs=rngs)   # 1x1 conv C->D
    if pos_init not in POS_INITS:
      raise errors.ConfigError(f'model.pos_init={pos_init!r} must be one of {POS_INITS}')
    key = rngs.params()   # one draw either way, so every later parameter gets the same values
    self.pos_embed = nnx.Param(fourier_positions(key, self.grid, hidden_dim, embed_init_std)
                               if pos_init == 'fourier' else init(key, (num_tokens, hidden_dim)))
    self.aux_query = nnx.Param(init(rngs.params(), (num_tokens, hidden_dim))) if aux_query else None
    layer_args = (hidden_dim, num_heads, ffn_dim, dropout)
    kw = dict(dtype=dtype, attention=attention, tie_qk_init=tie_qk_init, rngs=rngs)
    self.encoder = nnx.List([EncoderLayer(*layer_args, **kw) for _ in range(num_encoder_layers)])
    self.decoder = nnx.List([DecoderLayer(*layer_args, **kw) for _ in range(num_decoder_layers)])
    self.output_proj = nnx.Linear(hidden_dim, in_channels, dtype=dtype, rngs=rngs)  # 1x1 conv D->C
    self.dtype = dtype
    self.neighbour_mask, self.feature_jitter = int(neighbour_mask), float(feature_jitter)

  def attention_mask(self) -> jax.Array | None:
    """[T, T] bool, False inside each token's neighbour_mask x neighbour_mask window; None when off."""
    if not self.neighbour_mask:
      return None
    rows, cols = np.divmod(np.arange(self.grid[0] * self.grid[1]), self.grid[1])
    half = self.neighbour_mask // 2
    near = ((np.abs(rows[:, None] - rows[None]) <= half) & (np.abs(cols[:, None] - cols[None]) <= half))
    return jnp.asarray(~near)

  def __call__(self, features: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """features [B, H, W, C] -> reconstruction [B, H, W, C] float32. Dropout needs rngs when training."""
    b, h, w, c = features.shape
    if (h, w) != self.grid:
      raise errors.ConfigError(f'feature grid {(h, w)} differs from the model grid {self.grid}: '
                               'dataset.image_size / backbone.out_stride must match the trained model')
    kw = dict(deterministic=deterministic, rngs=rngs, mask=self.attention_mask())
    tokens = features.reshape(b, h * w, c)
    if self.feature_jitter and not deterministic:
      scale = jnp.linalg.norm(tokens, axis=-1, keepdims=True) / c * self.feature_jitter
      tokens = tokens + jax.random.normal(rngs.dropout(), tokens.shape) * scale
    memory = self.input_proj(tokens.astype(self.dtype))
    pos = self.pos_embed[...][None].astype(self.dtype)
    for layer in self.encoder:
      memory = layer(memory, pos, **kw)
    tgt = (memory if self.aux_query is None else
           jnp.broadcast_to(self.aux_query[...][None].astype(self.dtype), memory.shape))
    for layer in self.decoder:
      tgt = layer(tgt, memory, pos, **kw)
    return self.output_proj(tgt).astype(jnp.float32).reshape(b, h, w, c)
