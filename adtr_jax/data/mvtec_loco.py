"""MVTec LOCO AD, read where it lies.

<root>/<obj>/train/good/*.png, validation/good/*.png      normal images
<root>/<obj>/test/{good,logical_anomalies,structural_anomalies}/*.png
<root>/<obj>/ground_truth/<type>/<stem>/000.png, 001.png, ...   one PNG per defect of image <stem>
<root>/<obj>/defects_config.json     [{defect_name, pixel_value, saturation_threshold, relative_saturation}]

Each defect PNG holds one non-zero value, its defect's pixel_value in defects_config.json, whose
saturation threshold (an area in pixels, or with relative_saturation a fraction of the defect's area)
caps the defect's true-positive area in sPRO. The union of an image's defect PNGs is its mask for the
pixel metrics.

Splits 'train', 'validation' (calibrates the decision threshold: datasets.load_category uses it as the
hold-out) and 'test'. Test records (records.py) of anomalous images add 'defects': one dict per PNG,
{'mask_path', 'pixel_value', 'defect_name', 'saturation_threshold', 'relative_saturation'}; normal ones
have 'defects': [].
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from adtr_jax import errors
from adtr_jax.data import mvtec, records

OBJECTS = ('breakfast_box', 'juice_bottle', 'pushpins', 'screw_bag', 'splicing_connectors')
ANOMALY_TYPES = ('logical_anomalies', 'structural_anomalies')
CONFIG_KEYS = ('defect_name', 'pixel_value', 'saturation_threshold', 'relative_saturation')


def defects_config(cat: pathlib.Path) -> dict[int, dict]:
  """defects_config.json as {pixel_value: its entry}."""
  path = records.existing(cat / 'defects_config.json', 'the saturation thresholds of the defect types')
  try:
    entries = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise errors.DataError(f'cannot read {path}: {e}') from e
  if not isinstance(entries, list) or not all(isinstance(e, dict) and set(CONFIG_KEYS) <= e.keys()
                                              for e in entries):
    raise errors.DataError(f'{path} must be a list of {{{", ".join(CONFIG_KEYS)}}} entries')
  return {int(e['pixel_value']): {k: e[k] for k in CONFIG_KEYS} for e in entries}


def _defect(png: pathlib.Path, config: dict[int, dict], config_path: pathlib.Path) -> dict:
  values = np.unique(mvtec.load_grey(png))
  values = values[values > 0]
  if len(values) != 1:
    raise errors.DataError(f'defect mask {png} must hold one non-zero value, found '
                           f'{values.tolist() or "none"}')
  value = int(values[0])
  if value not in config:
    raise errors.DataError(f'defect mask {png} has pixel value {value}, which {config_path} does not list '
                           f'(it lists {sorted(config)})')
  return {'mask_path': str(png), **config[value]}


def scan_category(root, category: str) -> records.Scan:
  cat = mvtec.category_dir(root, category)
  config = defects_config(cat)
  test = cat / 'test'
  if not test.is_dir():
    raise errors.DataError(f'{test} does not exist: a category needs test/good/ and test/<type>/ folders')
  rows = []
  for folder in (p for p in sorted(test.iterdir()) if p.is_dir() and not p.name.startswith('.')):
    for image in mvtec.images_in(folder):
      if folder.name == mvtec.GOOD:
        rows.append(records.record(image, 0, mvtec.GOOD, defects=[]))
        continue
      truth = cat / 'ground_truth' / folder.name / image.stem
      pngs = mvtec.images_in(truth) if truth.is_dir() else []
      if not pngs:
        raise errors.DataError(f'anomalous test image {image} has no defect masks in {truth}/')
      defects = [_defect(png, config, cat / 'defects_config.json') for png in pngs]
      rows.append(records.record(image, 1, folder.name, pngs, defects=defects))
  if not rows:
    raise errors.DataError(f'the test split {test} has no images in test/<type>/ folders')
  return records.Scan(
      name=category, origin=f'mvtec_loco {cat}', mask_threshold=records.NONZERO,
      splits={'train': mvtec.scan_good(cat / 'train'), 'validation': mvtec.scan_good(cat / 'validation'),
              'test': rows})
