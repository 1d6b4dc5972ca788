"""ResNet-18/34/50 and Wide-ResNet-50-2 (He et al. 2016; Zagoruyko & Komodakis 2016), channels-last,
inference only.

The layout follows the torchvision "v1.5" ResNet, which timm's ResNets share (same module names, shapes
and semantics): a 7x7/2 stem conv (padding 3), BN, ReLU, a 3x3/2 max-pool (padding 1, padded with -inf),
then four stages of BasicBlocks (18/34) or Bottlenecks (50, Wide-50-2), the first block of stages 2-4
having stride 2. In a Bottleneck the stride sits on the 3x3 conv (v1.5; the original v1 put it on the
first 1x1 conv), and the Wide variant doubles the Bottleneck's inner width (the 3x3 conv's channels),
not its output. A block whose stride or channel count changes has a 1x1 conv + BN shortcut
("downsample"). The model is always frozen: BatchNorm uses its running statistics (eps 1e-5). Images
arrive in [0, 1] and are normalised with the ImageNet mean/std inside the model.

NAMING CLASH. Our feature names follow the output stride, as for every backbone family here:
'layerK' is the feature map at stride 2^K. torchvision/timm call their four stages layer1..layer4,
which are at strides 4..32. So:

    ours      stride  what it is                                   torchvision/timm
    layer1      2     stem conv + BN + ReLU (before the max-pool)  relu (after conv1, bn1)
    layer2      4     output of the 1st stage                      layer1
    layer3      8     output of the 2nd stage                      layer2
    layer4     16     output of the 3rd stage                      layer3
    layer5     32     output of the 4th stage                      layer4

To keep the two apart, the Flax modules do not use the torch names: the stem is `stem_conv`/`stem_bn`
and the stages are `stages[0..3]` (torch `layer1..layer4`); `torch_modules` holds the mapping.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

BN_EPS = 1e-5
STEM_CHANNELS = 64
NUM_CLASSES = 1000
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Spec:
  """An architecture: block type, blocks per stage and the Bottleneck's inner-width multiplier."""
  bottleneck: bool
  depths: tuple[int, int, int, int]
  width_factor: int = 1

  @property
  def expansion(self) -> int:
    """Block output channels / stage planes."""
    return 4 if self.bottleneck else 1


@dataclasses.dataclass(frozen=True)
class Block:
  """One residual block's geometry."""
  in_channels: int
  width: int         # channels inside the block (of its 3x3 convs)
  out_channels: int
  stride: int        # on the first 3x3 conv (BasicBlock) or the 3x3 conv (Bottleneck)
  bottleneck: bool

  @property
  def downsample(self) -> bool:
    """Whether the shortcut needs a 1x1 conv + BN (shape change) instead of the identity."""
    return self.stride != 1 or self.in_channels != self.out_channels


def stages(arch: str) -> tuple[tuple[Block, ...], ...]:
  """The four stages' blocks, in order (stage s is torch's `layer{s+1}`, our 'layer{s+2}')."""
  if arch not in ARCHS:
    raise ValueError(f'unknown ResNet arch {arch!r}; known: {sorted(ARCHS)}')
  spec, channels, out = ARCHS[arch], STEM_CHANNELS, []
  for planes, stride, depth in zip(STAGE_PLANES, STAGE_STRIDES, spec.depths):
    width = planes * spec.width_factor if spec.bottleneck else planes
    stage = []
    for i in range(depth):
      stage.append(Block(channels, width, planes * spec.expansion, stride if i == 0 else 1,
                         spec.bottleneck))
      channels = planes * spec.expansion
    out.append(tuple(stage))
  return tuple(out)


def layer_channels(arch: str) -> dict[str, int]:
  """{'layer1': C1, ..., 'layer5': C5}: channels of each output-stride layer (see module docstring)."""
  out = {'layer1': STEM_CHANNELS}
  out.update({f'layer{s + 2}': stage[-1].out_channels for s, stage in enumerate(stages(arch))})
  return out


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs) -> nnx.Conv:
  """kxk conv without bias, symmetric zero padding k//2 (torch's `padding=k//2`)."""
  p = kernel // 2
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                  use_bias=False, rngs=rngs)


def _bn(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, use_running_average=True, epsilon=BN_EPS, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """x [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]: 3x3 max, stride 2, padding 1 filled with -inf."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class _Residual(nnx.Module):
  """Shared shortcut handling: identity, or 1x1/stride conv + BN when the shape changes."""

  def _init_shortcut(self, b: Block, rngs: nnx.Rngs) -> None:
    self.down_conv = _conv(b.in_channels, b.out_channels, 1, b.stride, rngs=rngs) if b.downsample else None
    self.down_bn = _bn(b.out_channels, rngs=rngs) if b.downsample else None

  def _shortcut(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H/stride, W/stride, Cout]."""
    return x if self.down_conv is None else self.down_bn(self.down_conv(x))


class BasicBlock(_Residual):
  """3x3 conv (stride), BN, ReLU, 3x3 conv, BN, + shortcut, ReLU."""

  def __init__(self, b: Block, *, rngs: nnx.Rngs):
    self.conv1 = _conv(b.in_channels, b.width, 3, b.stride, rngs=rngs)
    self.bn1 = _bn(b.width, rngs=rngs)
    self.conv2 = _conv(b.width, b.out_channels, 3, rngs=rngs)
    self.bn2 = _bn(b.out_channels, rngs=rngs)
    self._init_shortcut(b, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H/stride, W/stride, Cout]."""
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    return jax.nn.relu(h + self._shortcut(x))


class Bottleneck(_Residual):
  """1x1 conv, BN, ReLU, 3x3 conv (stride), BN, ReLU, 1x1 conv, BN, + shortcut, ReLU."""

  def __init__(self, b: Block, *, rngs: nnx.Rngs):
    self.conv1 = _conv(b.in_channels, b.width, 1, rngs=rngs)
    self.bn1 = _bn(b.width, rngs=rngs)
    self.conv2 = _conv(b.width, b.width, 3, b.stride, rngs=rngs)
    self.bn2 = _bn(b.width, rngs=rngs)
    self.conv3 = _conv(b.width, b.out_channels, 1, rngs=rngs)
    self.bn3 = _bn(b.out_channels, rngs=rngs)
    self._init_shortcut(b, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, Cin] -> [B, H/stride, W/stride, Cout]."""
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = jax.nn.relu(self.bn2(self.conv2(h)))
    h = self.bn3(self.conv3(h))
    return jax.nn.relu(h + self._shortcut(x))


def normalize(images: jax.Array) -> jax.Array:
  """images [..., 3] in [0, 1] -> (images - ImageNet mean) / ImageNet std."""
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(IMAGENET_STD, images.dtype)
  return (images - mean) / std


LAYERS = ('layer1', 'layer2', 'layer3', 'layer4', 'layer5')


class ResNet(nnx.Module):
  """ResNet-18/34/50 or Wide-ResNet-50-2: images [B, H, W, 3] in [0, 1] -> features or ImageNet logits."""

  def __init__(self, arch: str, *, rngs: nnx.Rngs):
    self.arch = arch
    specs = stages(arch)
    block = Bottleneck if ARCHS[arch].bottleneck else BasicBlock
    self.stem_conv = _conv(3, STEM_CHANNELS, 7, 2, rngs=rngs)
    self.stem_bn = _bn(STEM_CHANNELS, rngs=rngs)
    self.stages = nnx.List([nnx.List([block(b, rngs=rngs) for b in stage]) for stage in specs])
    self.fc = nnx.Linear(specs[-1][-1].out_channels, NUM_CLASSES, rngs=rngs)

  def _trunk(self, images: jax.Array, num_layers: int) -> list[jax.Array]:
    """images [B, H, W, 3] -> [layer1, ..., layer{num_layers}], layerK [B, H/2^K, W/2^K, C_K]."""
    x = jax.nn.relu(self.stem_bn(self.stem_conv(normalize(images))))
    outs = [x]
    x = max_pool_3x3_s2(x)
    for stage in self.stages[:num_layers - 1]:
      for block in stage:
        x = block(x)
      outs.append(x)
    return outs

  def features(self, images: jax.Array, layers=LAYERS) -> dict[str, jax.Array]:
    """images [B, H, W, 3] -> {'layerK': [B, H/2^K, W/2^K, C_K]} for the requested layers.

    'layerK' is at output stride 2^K (layer2 = torchvision's layer1, see the module docstring); stages
    after the deepest requested layer are not run. H and W should be multiples of 32 for exact strides.
    """
    unknown = [name for name in layers if name not in LAYERS]
    if unknown:
      raise ValueError(f'unknown layers {unknown}; known: {list(LAYERS)}')
    outs = self._trunk(images, 1 + max(LAYERS.index(name) for name in layers))
    return {name: outs[LAYERS.index(name)] for name in layers}

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> ImageNet logits [B, 1000] (global average pool, then fc)."""
    x = self._trunk(images, len(LAYERS))[-1]
    return self.fc(jnp.mean(x, axis=(1, 2)))


# --- Family interface (see models/weights.py) ----------------------------------------------------------

ARCHS = {
    'resnet18': Spec(bottleneck=False, depths=(2, 2, 2, 2)),
    'resnet34': Spec(bottleneck=False, depths=(3, 4, 6, 3)),
    'resnet50': Spec(bottleneck=True, depths=(3, 4, 6, 3)),
    'wide_resnet50_2': Spec(bottleneck=True, depths=(3, 4, 6, 3), width_factor=2),
}
# timm's ResNets have the same module names, shapes and semantics as torchvision's; both are accepted
# by name, and detection (which cannot tell them apart) reports 'torchvision'.
FORMATS = ('torchvision', 'timm')


def packaged_weights(arch: str) -> tuple[str, str] | None:
  """No pip package ships these weights here: backbone.weights must name a checkpoint."""
  del arch
  return None


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f'ResNet weights format {fmt!r} is not one of {FORMATS}')


def build(arch: str, fmt: str, *, rngs: nnx.Rngs) -> ResNet:
  _check_format(fmt)
  return ResNet(arch, rngs=rngs)


def detect_format(keys: set[str]) -> str | None:
  """'torchvision' for torchvision/timm ResNet key names, else None."""
  return 'torchvision' if {'conv1.weight', 'layer1.0.conv1.weight'} <= set(keys) else None


def torch_modules(arch: str, fmt: str):
  """Yields (torch module prefix, Flax path, kind) for every weight-holding module."""
  _check_format(fmt)
  yield 'conv1', ('stem_conv',), 'conv'
  yield 'bn1', ('stem_bn',), 'bn'
  for s, stage in enumerate(stages(arch)):
    for i, block in enumerate(stage):
      p, f = f'layer{s + 1}.{i}.', ('stages', s, i)
      for n in range(1, 4 if block.bottleneck else 3):
        yield p + f'conv{n}', f + (f'conv{n}',), 'conv'
        yield p + f'bn{n}', f + (f'bn{n}',), 'bn'
      if block.downsample:
        yield p + 'downsample.0', f + ('down_conv',), 'conv'
        yield p + 'downsample.1', f + ('down_bn',), 'bn'
  yield 'fc', ('fc',), 'linear'
