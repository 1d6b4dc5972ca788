"""ADTR = frozen multi-scale CNN embedding + trainable reconstruction transformer."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from adtr_jax import errors
from adtr_jax.models import ablations
from adtr_jax.models.backbone import Backbone, build_backbone
from adtr_jax.models.reconstructor import Reconstructor

# model.type -> reconstruction network; only 'transformer' is ADTR, the others are ablations.
RECONSTRUCTORS = {'transformer': Reconstructor, 'mlp': ablations.TokenMLP, 'cnn': ablations.ConvNet}

# Parameters outside `backbone` are checkpointed and handed to the optimizer; everything under
# `backbone` is frozen (neither optimizer state nor checkpointed: checkpoints record its weight hash).
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains('backbone')))
FEATURE_NORMS = ('none', 'channel')


class FeatureStats(nnx.Param):
  """Statistics of the training features: saved with the weights, never trained (the forward pass
  stops their gradient and the optimizer excludes them from weight decay)."""


class FeatureNorm(nnx.Module):
  """f -> (f - mean) / std per channel, with the training set's statistics ('channel'), or f ('none').

  The backbone's channels differ in scale by orders of magnitude (ReLU6 outputs of the deepest layer
  against a few small early-layer channels), so the raw L2 loss and score are dominated by a few deep
  channels. Standardised, every channel counts alike in the loss and in the anomaly score.
  """

  def __init__(self, channels: int, kind: str):
    if kind not in FEATURE_NORMS:
      raise errors.ConfigError(f'model.feature_norm={kind!r} must be one of {FEATURE_NORMS}')
    self.kind = kind
    self.mean = FeatureStats(jnp.zeros((channels,), jnp.float32))
    self.std = FeatureStats(jnp.ones((channels,), jnp.float32))

  def __call__(self, f: jax.Array) -> jax.Array:
    if self.kind == 'none':
      return f.astype(jnp.float32)
    mean, std = jax.lax.stop_gradient(self.mean[...]), jax.lax.stop_gradient(self.std[...])
    return (f.astype(jnp.float32) - mean) / std

  def fit(self, features) -> None:
    """Sets the statistics from training features [N, h, w, C] (numpy, any float dtype)."""
    flat = np.asarray(features, np.float32).reshape(-1, features.shape[-1])
    self.set_statistics(flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64))

  def set_statistics(self, mean, std) -> None:
    """Sets the statistics from the training features' per-channel mean [C] and population std [C]
    (float64, e.g. from fit, or streamed batch by batch: adtr_jax.moments.Moments' mean and std)."""
    std = np.asarray(std, np.float64)
    # A channel (nearly) constant on normal data must not turn rounding noise into huge scores.
    std = np.maximum(std, 1e-2 * float(np.median(std)) + 1e-6)
    self.mean[...] = jnp.asarray(mean, jnp.float32)
    self.std[...] = jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model as jitted code takes it (nnx.split): its structure, its trainable parameters (TRAINABLE)
  and its frozen backbone. What the feature cache, scoring, calibration and export are given."""
  graphdef: nnx.GraphDef
  params: Any
  frozen: Any

  def merge(self) -> 'ADTR':
    return nnx.merge(self.graphdef, self.params, self.frozen)


def decays(params) -> object:
  """Weight-decay mask of a TRAINABLE state: True for every parameter but FeatureStats."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'feature_norm' not in jax.tree_util.keystr(path), params)


def to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 [..., 3] in [0, 255] (what the input pipeline sends: 4x fewer bytes) or float in [0, 1]
  -> float32 in [0, 1]. Normalising on the device keeps host-to-device traffic small."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


class ADTR(nnx.Module):
  """images [B, S, S, 3] (uint8, or float in [0, 1]) -> (features f, reconstruction f_hat), both
  [B, S/s, S/s, C] float32, f after feature_norm (the space the loss and the score live in)."""

  def __init__(self, backbone: Backbone | ablations.PixelEmbedding, reconstructor: nnx.Module,
               feature_norm: FeatureNorm):
    self.backbone = backbone
    self.reconstructor = reconstructor
    self.feature_norm = feature_norm

  def __call__(self, images: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    return self.reconstruct(self.embed(images), deterministic=deterministic, rngs=rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """The frozen backbone's features [B, S/s, S/s, C] (what the feature cache stores)."""
    return self.backbone(to_unit_range(images))

  def reconstruct(self, embedded: jax.Array, *, deterministic: bool = True,
                  rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """embed()'s output -> (f, f_hat) as in __call__."""
    f = self.feature_norm(embedded)
    return f, self.reconstructor(f, deterministic=deterministic, rngs=rngs)


def feature_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The token grid (H, W) that dataset.image_size and backbone.out_stride give."""
  size, stride = config.dataset.image_size, config.backbone.out_stride
  if size % stride:
    raise errors.ConfigError(f'dataset.image_size={size} must be a multiple of backbone.out_stride={stride}')
  return size // stride, size // stride


def reconstructor_options(cls: type, model: ml_collections.ConfigDict) -> dict:
  """The config.model fields that `cls` takes as keyword-only arguments, by name: a new model field
  needs one line in defaults.py and one argument in the class. Fields a class lacks (the ablation
  networks have no attention options) and those build_model reads itself (type, target,
  feature_norm) are not passed; a field missing from an older config leaves the class's default."""
  # cls.__init__, not cls: nnx.Module's metaclass hides the constructor's signature behind (*args, **kw).
  params = inspect.signature(cls.__init__).parameters.values()
  return {p.name: model[p.name] for p in params
          if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != 'rngs' and p.name in model}


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
    raise errors.ConfigError(f"model.target={target!r} must be 'features' or 'pixels'")
  if kind not in RECONSTRUCTORS:
    raise errors.ConfigError(f'model.type={kind!r} must be one of {sorted(RECONSTRUCTORS)}')
  cls = RECONSTRUCTORS[kind]
  reconstructor = cls(backbone.out_channels, feature_grid(config), **reconstructor_options(cls, m),
                      rngs=rngs)
  return ADTR(backbone, reconstructor, FeatureNorm(backbone.out_channels, m.feature_norm)), info
