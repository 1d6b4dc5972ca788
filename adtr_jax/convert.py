r"""Converts a backbone checkpoint into adtr_jax's Flax layout (an .npz with its arch and format).

  python -m adtr_jax.convert --arch=efficientnet_b4 --src=efficientnet-b4-6ed6700e.pth \
      --dst=weights/efficientnet_b4.npz
  python -m adtr_jax.convert --arch=wide_resnet50_2 --src=model.safetensors --format=timm --dst=wrn.npz

Sources: torchvision and timm `.pth`/`.safetensors`, efficientnet_pytorch (lukemelas) `.pth`. The
format is detected from the key names unless --format says it (timm EfficientNets must: `timm` for
`efficientnet_bX`, `timm_tf` for `tf_efficientnet_bX`). Any missing, extra or mis-shaped key is an
error listing them. Then train with `--config.backbone.weights=<dst>`; naming the original file there
works too (it is converted and cached automatically).
"""
from __future__ import annotations

import json
import pathlib

from absl import app, flags

from adtr_jax import errors
from adtr_jax.models import weights

_ARCH = flags.DEFINE_string('arch', None, 'Backbone architecture, e.g. efficientnet_b4, resnet18.')
_SRC = flags.DEFINE_string('src', None, 'Checkpoint to convert (.pth/.pt/.bin/.safetensors).')
_DST = flags.DEFINE_string('dst', None, 'Output .npz.')
_FORMAT = flags.DEFINE_string(
    'format', 'auto', 'efficientnet_pytorch | torchvision | timm | timm_tf (EfficientNet), torchvision | timm '
    '(ResNet), the *_inception variants for weights trained on (x-0.5)/0.5 inputs (AdvProp, timm '
    'ra4/ap tags), or auto (from key names).')
flags.mark_flags_as_required(['arch', 'src', 'dst'])


def convert_file(arch: str, src, dst, fmt: str = 'auto') -> dict:
  """Reads `src`, converts it for `arch`, writes `dst` (.npz). Returns the metadata written."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if dst.suffix != '.npz':
    raise errors.ConfigError(f'--dst={dst} must end in .npz')
  weights.family(arch)  # unknown arch: fail before reading a large file
  state = weights.read_state_dict(src)
  fmt = weights.resolve_format(state, arch, fmt)
  params = weights.convert(state, arch, fmt)
  meta = {'arch': arch, 'format': fmt, 'source': str(src.resolve()), 'source_sha256': weights.sha256(src)}
  weights.save_converted(dst, params, meta)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    meta = convert_file(_ARCH.value, _SRC.value, _DST.value, _FORMAT.value)
  except (ValueError, FileNotFoundError) as e:  # bad input: the message names the file and keys
    raise SystemExit(f'error: {e}') from None
  print(json.dumps(dict(meta, dst=str(pathlib.Path(_DST.value).resolve()))))


if __name__ == '__main__':
  app.run(main)
