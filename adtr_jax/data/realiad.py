"""Real-IAD (Tencent's release), read where it lies.

<root>/realiad_{256,512,1024,raw}/<cat>/{OK,NG/<type>}/S<nnnn>/<cat>_<nnnn>_<OK|NG_type>_C<v>_<time>.jpg
<root>/<variant>/<cat>.json (or <root>/realiad_jsons/<variant>/<cat>.json, as some archives unpack)

A JSON holds meta.prefix (e.g. '<cat>/') and meta.normal_class ('OK'), then 'train' and 'test' lists of
{category, anomaly_class, image_path, mask_path} with paths under <root>/realiad_<res>/<prefix>. Labels
come from the JSON only, as the release's loader reads them: a test image is anomalous when its
mask_path is set and its anomaly_class is not meta.normal_class. Folder names do not label: views of a
defective sample where the defect cannot be seen lie under NG/ but are 'OK'. Training entries are all
used as normal (the fuiad variants deliberately hold unlabelled anomalies there).

Records (records.py) add 'sample_id' (the sample a view belongs to; its views share it, and the
sample-level metric takes the max over them) and 'anomaly_class'.
"""
from __future__ import annotations

import json
import pathlib
import re

from adtr_jax import errors
from adtr_jax.data import mvtec, records

RESOLUTIONS = ('256', '512', '1024', 'raw')
JSON_VARIANTS = ('realiad_jsons', 'realiad_jsons_sv', 'realiad_jsons_fuiad_0.0', 'realiad_jsons_fuiad_0.1',
                 'realiad_jsons_fuiad_0.2', 'realiad_jsons_fuiad_0.4')
CATEGORIES = ('audiojack', 'bottle_cap', 'button_battery', 'end_cap', 'eraser', 'fire_hood', 'mint',
              'mounts', 'pcb', 'phone_battery', 'plastic_nut', 'plastic_plug', 'porcelain_doll',
              'regulator', 'rolled_strip_base', 'sim_card_set', 'switch', 'tape', 'terminalblock',
              'toothbrush', 'toy', 'toy_brick', 'transistor1', 'u_block', 'usb', 'usb_adaptor', 'vcpill',
              'wooden_beads', 'woodstick', 'zipper')
# The sample key of a view's path, as the release evaluates it (ADEval's --sample_key_pat in the
# release's README): '<cat>_<nnnn>_<OK|NG_type>' before '_C<view>_'.
SAMPLE_KEY = re.compile(r'([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_')
ENTRY_KEYS = {'category', 'anomaly_class', 'image_path', 'mask_path'}


def sample_id(image_path: str) -> str:
  """The sample a view belongs to: the release's sample key of the path, else (a renamed file) its
  folder, which holds one sample's views (e.g. 'NG/BX/S0001')."""
  found = SAMPLE_KEY.search(image_path)
  return found.group(1) if found else str(pathlib.PurePosixPath(image_path).parent)


def json_file(root, category: str, variant: str) -> pathlib.Path:
  """The category's JSON of `variant`, or an error naming where it was looked for."""
  root = pathlib.Path(root).expanduser().resolve()
  if problem := records.missing_root(root, 'realiad_<resolution>/ and realiad_jsons*/'):
    raise problem
  folders = [root / variant, root / 'realiad_jsons' / variant]
  folder = next((f for f in folders if f.is_dir()), None)
  if folder is None:
    raise errors.DataError(f'Real-IAD JSON folder {folders[0]} does not exist (nor {folders[1]})')
  path = folder / f'{category}.json'
  if not path.is_file():
    found = sorted(p.stem for p in folder.glob('*.json'))
    raise errors.DataError(f'Real-IAD category file {path} does not exist; categories in {folder}: '
                           f'{", ".join(found) or "none"}')
  return path


def image_dir(root, resolution: str) -> pathlib.Path:
  root = pathlib.Path(root).expanduser().resolve()
  folder = root / f'realiad_{resolution}'
  if not folder.is_dir():
    found = sorted(p.name for p in root.glob('realiad_*') if p.is_dir() and 'jsons' not in p.name)
    raise errors.DataError(f'Real-IAD image folder {folder} does not exist (--config.dataset.'
                           f'realiad_resolution={resolution!r}); image folders in {root}: '
                           f'{", ".join(found) or "none"}')
  return folder


def _load(path: pathlib.Path) -> dict:
  try:
    info = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise errors.DataError(f'cannot read {path}: {e}') from e
  if not (isinstance(info, dict) and {'meta', 'train', 'test'} <= info.keys()
          and {'prefix', 'normal_class'} <= info['meta'].keys()):
    raise errors.DataError(f'{path} is not a Real-IAD JSON: it needs meta.prefix, meta.normal_class, '
                           'train and test')
  return info


def scan_category(root, category: str, resolution: str = '256', variant: str = 'realiad_jsons'
                  ) -> records.Scan:
  """The JSON's 'train' and 'test' entries of `category`, in the JSON's order. Every image, and the
  mask of every anomalous test image, must exist."""
  path = json_file(root, category, variant)
  base = image_dir(root, resolution)
  info = _load(path)
  prefix, normal = base / info['meta']['prefix'], info['meta']['normal_class']
  splits = {}
  for split in ('train', 'test'):
    rows = []
    for i, entry in enumerate(info[split]):
      where = f'{path}: {split}[{i}]'
      if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        raise errors.DataError(f'{where} must have exactly the keys {", ".join(sorted(ENTRY_KEYS))}')
      image = records.existing(prefix / entry['image_path'], f'{where}')
      anomalous = split == 'test' and entry['mask_path'] is not None and entry['anomaly_class'] != normal
      masks = [records.existing(prefix / entry['mask_path'], f'mask of {where}')] if anomalous else []
      rows.append(records.record(image, anomalous, entry['anomaly_class'] if anomalous else mvtec.GOOD,
                                 masks, sample_id=sample_id(entry['image_path']),
                                 anomaly_class=entry['anomaly_class']))
    if not rows:
      raise errors.DataError(f'{path} lists no {split} images')
    splits[split] = rows
  return records.Scan(name=category, origin=f'realiad {base} {path}', splits=splits)
