"""The frozen multi-scale embedding: selected CNN layers (EfficientNet, ResNet) on one grid, concatenated."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from adtr_jax import errors, scoring
from adtr_jax.models import weights

LAYERS = ('layer1', 'layer2', 'layer3', 'layer4', 'layer5')
LAYER_STRIDES = {name: 2 ** (k + 1) for k, name in enumerate(LAYERS)}


def check_layers(layers, out_stride) -> None:
  """backbone.layers and backbone.out_stride, naming the field."""
  if not layers or any(name not in LAYERS for name in layers) or len(set(layers)) != len(layers):
    raise errors.ConfigError(f'backbone.layers={tuple(layers)!r} must be distinct names from {LAYERS}')
  if out_stride not in LAYER_STRIDES.values() or isinstance(out_stride, bool):
    raise errors.ConfigError(f'backbone.out_stride={out_stride!r} must be a power of 2 from 2 to 32')


def _to_grid(x: jax.Array, stride: int, out_stride: int, size: tuple[int, int]) -> jax.Array:
  """x [B, h, w, C] at `stride` -> [B, *size, C] at `out_stride`.

  Coarser layers are upsampled bilinearly (jax.image.resize's numbers, written as two small matmuls
  with scoring.upsample_matrix: jax2onnx converts a resize only with a constant batch size, and an
  export's is dynamic). Finer ones are average-pooled over each output cell's exact footprint
  (factor x factor): an alias-free area resize, cheaper and simpler than an antialiased bilinear
  kernel, and on the same half-pixel-centred grid as the upsampling.
  """
  b, h, w, c = x.shape
  if stride > out_stride:
    rows, cols = scoring.upsample_matrix(h, size[0]), scoring.upsample_matrix(w, size[1])
    return jnp.einsum('yi,bijc,xj->byxc', rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  f = out_stride // stride
  return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


class Backbone(nnx.Module):
  """images [B, H, W, 3] in [0, 1] -> frozen features [B, H/out_stride, W/out_stride, out_channels]."""

  def __init__(self, arch: str, layers, out_stride: int, fmt: str, *, rngs: nnx.Rngs):
    """fmt: the weights' checkpoint format, which fixes padding/BN-epsilon/input-normalisation details."""
    layers = tuple(layers)
    check_layers(layers, out_stride)
    fam = weights.family(arch)
    self.cnn = fam.build(arch, fmt, rngs=rngs)
    self.layers = layers
    self.out_stride = int(out_stride)
    channels = fam.layer_channels(arch)
    self.out_channels = sum(channels[name] for name in layers)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3], H and W multiples of out_stride -> [B, H/s, W/s, sum of layer channels]."""
    _, height, width, _ = images.shape
    if height % self.out_stride or width % self.out_stride:
      raise errors.ConfigError(f'image size {height}x{width} must be a multiple of backbone.out_stride='
                               f'{self.out_stride}')
    size = (height // self.out_stride, width // self.out_stride)
    feats = self.cnn.features(images, self.layers)
    maps = [_to_grid(feats[name], LAYER_STRIDES[name], self.out_stride, size) for name in self.layers]
    # Frozen: no gradient ever flows into the CNN (its weights are not trained).
    return jax.lax.stop_gradient(jnp.concatenate(maps, axis=-1))


def build_backbone(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> tuple[Backbone, dict]:
  """config.backbone (arch, layers, out_stride, weights) -> (pretrained Backbone, JSON-able info).

  `rngs` is not drawn from: every backbone variable is pretrained, so the module is built abstractly
  (no random initialisation to compute and throw away) and then filled with the converted weights.
  """
  del rngs
  # Checked first so bad layers/out_stride fail before any weight file is read (load_params checks
  # the arch before reading).
  check_layers(tuple(cfg.layers), cfg.out_stride)
  params, info = weights.load_params(cfg.arch, cfg.get('weights', ''), cfg.get('weights_format', 'auto'))
  backbone = nnx.eval_shape(
      lambda: Backbone(cfg.arch, cfg.layers, cfg.out_stride, info['format'], rngs=nnx.Rngs(0)))
  weights.load_into(backbone.cnn, params)
  info = dict(info, layers=list(backbone.layers), out_stride=backbone.out_stride,
              out_channels=backbone.out_channels)
  return backbone, info
