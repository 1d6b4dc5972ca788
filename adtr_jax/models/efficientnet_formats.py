"""EfficientNet checkpoint formats: what each fixes about the network, and its torch key names.

B0..B7 weights come from several PyTorch code bases that agree on tensor shapes but not on three
details a checkpoint does not record, so the format (config `backbone.weights_format`) names them:

  format                          padding    BN eps            normalisation    keys
  efficientnet_pytorch            TF SAME    1e-3              ImageNet         _blocks.N._se_reduce
  efficientnet_pytorch_inception  TF SAME    1e-3              (x - 0.5) / 0.5  (same as above)
  torchvision                     symmetric  1e-5 (B5-7 1e-3)  ImageNet         features.S.B.block.J
  timm (efficientnet_bX)          symmetric  1e-5              ImageNet         blocks.S.B.conv_dw
  timm_inception                  symmetric  1e-5              (x - 0.5) / 0.5  (as timm)
  timm_tf (tf_efficientnet_bX)    TF SAME    1e-3              ImageNet         (as timm)
  timm_tf_inception               TF SAME    1e-3              (x - 0.5) / 0.5  (as timm)

Why they differ:
* Padding. The original TensorFlow models (and every port of their weights that keeps TF's layout:
  lukemelas, timm's `tf_` models) use TF "SAME" padding: ceil(size/stride) outputs, with the odd extra
  pad pixel on the bottom/right; it depends on the input size (lukemelas can precompute it for a fixed
  `image_size`; we compute it per call, which equals lukemelas' dynamic padding and its static padding at
  the size it was built for). timm's own `efficientnet_bX` weights were trained in PyTorch with
  symmetric padding (k-1)//2, and torchvision uses symmetric padding for all B0..B7 (its B0..B4 are
  timm's weights; its B5..B7 are lukemelas' TF ports, which torchvision nevertheless runs with
  symmetric padding, so that is what its checkpoints get here too). The two agree for stride 1 and for
  stride 2 on odd sizes; for stride 2 on even sizes SAME pads one pixel less before, which shifts the
  sampling grid by a pixel.
* BN epsilon. TF's default is 1e-3 (lukemelas, timm `tf_`, torchvision B5..B7, whose norm layer is
  `BatchNorm2d(eps=0.001)`); PyTorch-trained weights use PyTorch's default 1e-5 (timm, torchvision
  B0..B4).
* Normalisation. Images arrive in [0, 1]. Most B-series weights expect ImageNet mean/std
  ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): torchvision (all of B0..B7), lukemelas'
  standard weights, timm's `efficientnet_bX.ra_in1k`/`ra2`/`ft`/`sw` and `tf_efficientnet_bX.ns_jft`/
  `aa`/`ra`/`in1k`. Some weights expect mean = std = 0.5 instead, i.e. inputs in [-1, 1]: lukemelas'
  AdvProp weights (`advprop=True`), timm's `tf_efficientnet_bX.ap_in1k` (AdvProp) and
  `efficientnet_b0.ra4_e3600_r224_in1k` / `efficientnet_b1.ra4_e3600_r240_in1k` (note: the latter is
  timm's default tag for `efficientnet_b1`). Key names are identical, so those need the explicit
  `*_inception` format. EfficientNet-Lite weights (format efficientnet_pytorch only) expect
  (x*255 - 127)/128, i.e. mean 127/255 and std 128/255.

Key names are enough to tell lukemelas from torchvision from timm, but not timm from timm_tf (same
modules, different padding/epsilon) nor any format from its `_inception` twin: `detect_format` returns
None for timm keys, so the user has to say which; for lukemelas keys it returns the standard
(non-AdvProp) `efficientnet_pytorch`.

Native (training) resolutions: B0 224, B1 240, B2 260, B3 300, B4 380, B5 456, B6 528, B7 600
(torchvision's B2 weights: 288; timm's `efficientnet_b2/b3/b4` weights: 256/288/320); Lite0..2:
224/240/260. Any input size works (the features are fully convolutional).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3  # (x*255 - 127) / 128
TF_BN_EPS, TORCH_BN_EPS = 1e-3, 1e-5


@dataclasses.dataclass(frozen=True)
class Flavour:
  """What a checkpoint format fixes about the network (see the module docstring)."""
  padding: str  # 'same' (TF SAME: ceil(size/stride) outputs, extra pixel after) or 'symmetric'
  bn_eps: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class _Format:
  keys: str       # which key naming: 'efficientnet_pytorch', 'torchvision' or 'timm'
  flavour: Flavour


_IMAGENET, _INCEPTION = (IMAGENET_MEAN, IMAGENET_STD), (INCEPTION_MEAN, INCEPTION_STD)
_FORMATS = {
    'efficientnet_pytorch': _Format('efficientnet_pytorch', Flavour('same', TF_BN_EPS, *_IMAGENET)),
    'efficientnet_pytorch_inception': _Format('efficientnet_pytorch',
                                              Flavour('same', TF_BN_EPS, *_INCEPTION)),
    'torchvision': _Format('torchvision', Flavour('symmetric', TORCH_BN_EPS, *_IMAGENET)),
    'timm': _Format('timm', Flavour('symmetric', TORCH_BN_EPS, *_IMAGENET)),
    'timm_inception': _Format('timm', Flavour('symmetric', TORCH_BN_EPS, *_INCEPTION)),
    'timm_tf': _Format('timm', Flavour('same', TF_BN_EPS, *_IMAGENET)),
    'timm_tf_inception': _Format('timm', Flavour('same', TF_BN_EPS, *_INCEPTION)),
}
FORMATS = tuple(_FORMATS)
LITE_FORMATS = ('efficientnet_pytorch',)
LITE_FLAVOUR = Flavour('same', TF_BN_EPS, LITE_MEAN, LITE_STD)
# torchvision builds B5..B7 with BatchNorm2d(eps=0.001) (TF-ported weights), B0..B4 with the default.
_TORCHVISION_TF_EPS_VARIANTS = ('b5', 'b6', 'b7')


def check_format(fmt: str, variant: str) -> None:
  allowed = LITE_FORMATS if variant.startswith('lite') else FORMATS
  if fmt not in allowed:
    raise ValueError(f'EfficientNet-{variant} weights format {fmt!r} is not one of {allowed}')


def flavour(fmt: str, variant: str) -> Flavour:
  """The padding / BN epsilon / normalisation to build `variant` ('b4', 'lite0') with for `fmt`."""
  check_format(fmt, variant)
  if variant.startswith('lite'):
    return LITE_FLAVOUR
  out = _FORMATS[fmt].flavour
  if fmt == 'torchvision' and variant in _TORCHVISION_TF_EPS_VARIANTS:
    out = dataclasses.replace(out, bn_eps=TF_BN_EPS)
  return out


def detect_format(keys: set[str]) -> str | None:
  """The format named by the key names, or None where they do not decide it (timm vs timm_tf)."""
  if '_conv_stem.weight' in keys:
    return 'efficientnet_pytorch'
  if 'features.0.0.weight' in keys:
    return 'torchvision'
  return None  # includes timm's 'conv_stem.weight': timm or timm_tf, which only the user knows


# Per key naming: torch module names of the stem conv/BN, head conv/BN and classifier.
_OUTER = {
    'efficientnet_pytorch': ('_conv_stem', '_bn0', '_conv_head', '_bn1', '_fc'),
    'timm': ('conv_stem', 'bn1', 'conv_head', 'bn2', 'classifier'),
}
# Per key naming: block role -> torch module name inside the block.
_EP_BLOCK = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0', 'depthwise_conv': '_depthwise_conv',
             'depthwise_bn': '_bn1', 'se_reduce': '_se_reduce', 'se_expand': '_se_expand',
             'project_conv': '_project_conv', 'project_bn': '_bn2'}
# timm: InvertedResidual blocks, and the first stage's DepthwiseSeparableConv (expand ratio 1).
_TIMM_BLOCK = {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'depthwise_conv': 'conv_dw',
               'depthwise_bn': 'bn2', 'se_reduce': 'se.conv_reduce', 'se_expand': 'se.conv_expand',
               'project_conv': 'conv_pwl', 'project_bn': 'bn3'}
_TIMM_DS_BLOCK = {'depthwise_conv': 'conv_dw', 'depthwise_bn': 'bn1', 'se_reduce': 'se.conv_reduce',
                  'se_expand': 'se.conv_expand', 'project_conv': 'conv_pw', 'project_bn': 'bn2'}
# Flax sub-module of an MBConv block (in order) -> weights.KINDS entry.
_ROLE_KINDS = {'expand_conv': 'conv', 'expand_bn': 'bn', 'depthwise_conv': 'conv', 'depthwise_bn': 'bn',
               'se_reduce': 'conv_bias', 'se_expand': 'conv_bias', 'project_conv': 'conv',
               'project_bn': 'bn'}


def _torchvision_block(expand: bool) -> dict[str, str]:
  """torchvision's MBConv is one Sequential: [expand (conv, bn)], depthwise, SE (fc1, fc2), project."""
  parts = (['expand'] if expand else []) + ['depthwise', 'se', 'project']
  out = {}
  for j, part in enumerate(parts):
    if part == 'se':
      out.update(se_reduce=f'block.{j}.fc1', se_expand=f'block.{j}.fc2')
    else:
      out.update({f'{part}_conv': f'block.{j}.0', f'{part}_bn': f'block.{j}.1'})
  return out


def torch_modules(fmt: str, blocks: Sequence, se: bool) -> Iterator[tuple[str, tuple, str]]:
  """(torch module prefix, Flax path, kind) for every weight-holding module.

  blocks: the model's MBConv specs (with .stage, .index within the stage and .expand); se: whether the
  blocks have squeeze-excitation.
  """
  keys = _FORMATS[fmt].keys
  if keys == 'torchvision':
    head = len({b.stage for b in blocks}) + 1
    stem_conv, stem_bn, head_conv, head_bn, fc = (
        'features.0.0', 'features.0.1', f'features.{head}.0', f'features.{head}.1', 'classifier.1')
  else:
    stem_conv, stem_bn, head_conv, head_bn, fc = _OUTER[keys]
  yield stem_conv, ('stem_conv',), 'conv'
  yield stem_bn, ('stem_bn',), 'bn'
  for i, b in enumerate(blocks):
    if keys == 'efficientnet_pytorch':
      prefix, names = f'_blocks.{i}.', _EP_BLOCK
    elif keys == 'torchvision':
      prefix, names = f'features.{b.stage + 1}.{b.index}.', _torchvision_block(b.expand != 1)
    else:
      prefix, names = f'blocks.{b.stage}.{b.index}.', _TIMM_BLOCK if b.expand != 1 else _TIMM_DS_BLOCK
    for role, kind in _ROLE_KINDS.items():
      if (role.startswith('expand_') and b.expand == 1) or (role.startswith('se_') and not se):
        continue  # no expansion conv at expand ratio 1; no squeeze-excite in Lite
      yield prefix + names[role], ('blocks', i, role), kind
  yield head_conv, ('head_conv',), 'conv'
  yield head_bn, ('head_bn',), 'bn'
  yield fc, ('fc',), 'linear'
