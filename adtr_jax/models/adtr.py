"""ADTR = frozen multi-scale CNN embedding + trainable reconstruction transformer."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from adtr_jax.models import ablations
from adtr_jax.models.backbone import Backbone, build_backbone
from adtr_jax.models.reconstructor import Reconstructor

# model.type -> reconstruction network; only 'transformer' is ADTR, the others are ablations.
RECONSTRUCTORS = {'transformer': Reconstructor, 'mlp': ablations.TokenMLP, 'cnn': ablations.ConvNet}

# Only the reconstructor's parameters are trained; everything under `backbone` is frozen (its weights
# are neither optimizer state nor checkpointed: checkpoints record the weight file's hash instead).
TRAINABLE = nnx.All(nnx.Param, nnx.PathContains('reconstructor'))


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] in [0, 255] (what the input pipeline sends: 4x fewer bytes) or float in [0, 1]
  -> float32 in [0, 1]. Normalising on the device keeps host-to-device traffic small."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


class ADTR(nnx.Module):
  """images [B, S, S, 3] (uint8, or float in [0, 1]) -> (features f, reconstruction f_hat), both
  [B, S/s, S/s, C] float32."""

  def __init__(self, backbone: Backbone | ablations.PixelEmbedding, reconstructor: nnx.Module):
    self.backbone = backbone
    self.reconstructor = reconstructor

  def __call__(self, images: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    features = self.embed(images)
    return features, self.reconstructor(features, deterministic=deterministic, rngs=rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """The frozen features f [B, S/s, S/s, C] (what the feature cache stores)."""
    return self.backbone(to_unit_range(images))


def feature_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The token grid (H, W) that dataset.image_size and backbone.out_stride give."""
  size, stride = config.dataset.image_size, config.backbone.out_stride
  if size % stride:
    raise ValueError(f'dataset.image_size={size} must be a multiple of backbone.out_stride={stride}')
  return size // stride, size // stride


def _transformer_options(m: ml_collections.ConfigDict) -> dict:
  """config.model fields that only the transformer has (the ablation networks take none of them)."""
  if m.get('type', 'transformer') != 'transformer':
    return {}
  if m.dtype not in DTYPES:
    raise ValueError(f'model.dtype={m.dtype!r} must be one of {sorted(DTYPES)}')
  return {'embed_init_std': m.embed_init_std, 'dtype': DTYPES[m.dtype], 'attention': m.attention}


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> tuple[ADTR, dict]:
  """Builds ADTR with pretrained backbone weights loaded. Returns (model, backbone metadata)."""
  rngs = nnx.Rngs(config.seed if seed is None else seed)
  m = config.model
  target, kind = m.get('target', 'features'), m.get('type', 'transformer')
  if target == 'features':
    backbone, info = build_backbone(config.backbone, rngs=rngs)
  elif target == 'pixels':  # ablation: reconstruct image patches, no CNN
    backbone = ablations.PixelEmbedding(config.backbone.out_stride)
    info = {'arch': 'pixels', 'weights_sha256': None, 'out_channels': backbone.out_channels}
  else:
    raise ValueError(f"model.target={target!r} must be 'features' or 'pixels'")
  if kind not in RECONSTRUCTORS:
    raise ValueError(f'model.type={kind!r} must be one of {sorted(RECONSTRUCTORS)}')
  reconstructor = RECONSTRUCTORS[kind](
      backbone.out_channels, feature_grid(config), hidden_dim=m.hidden_dim,
      num_encoder_layers=m.num_encoder_layers, num_decoder_layers=m.num_decoder_layers,
      num_heads=m.num_heads, ffn_dim=m.ffn_dim, dropout=m.dropout,
      aux_query=m.get('aux_query', True), **_transformer_options(m), rngs=rngs)
  return ADTR(backbone, reconstructor), info
