"""What a dataset source hands the builder: one category's files as split records, and how to read them.

Every source (mvtec, visa, realiad, mvtec_ad2, mvtec_loco; elpv and classes through their MVTec-layout
export) lists a category as a `Scan`; builder.prepare stores its labelled splits, row i of a split being
record i of `Scan.splits[split]`. A record is a JSON-able dict:

  'path'         absolute path of the image
  'label'        0 normal, 1 anomalous
  'defect_type'  'good' for normal images, else the source's defect name
  'mask_paths'   list of mask files (absolute); the image's mask is their union, each binarised at
                 Scan.mask_threshold; [] for normal images (and for image-labelled anomalies)

and, per source, fields the protocols need (sample_id for Real-IAD, defects for MVTec LOCO, ...: see
each source module).
"""
from __future__ import annotations

import dataclasses
import pathlib

from adtr_jax import errors

# Grey value from which a mask pixel is anomalous: MVTec-style masks are 0/255 (JPEG-era ones are not
# exactly 0/255, hence 128); VisA and MVTec LOCO store ids / defect values in 1..255 (anything > 0).
HALF = 128
NONZERO = 1


@dataclasses.dataclass(frozen=True)
class Scan:
  """One category as a source lists it.

  name: the category. origin: what was read, naming the source and its settings (e.g.
  'visa 2cls_fewshot /data/visa/split_csv/2cls_fewshot.csv candle'): datasets prepared from the same
  origin replace each other when the files change. splits: {split: [record, ...]} for the labelled
  splits ('train' and 'test' always; 'validation' where the benchmark has one). unlabelled: {split:
  folder of images without labels} (MVTec AD 2's private test sets). mask_threshold: HALF or NONZERO.
  """
  name: str
  origin: str
  splits: dict
  mask_threshold: int = HALF
  unlabelled: dict = dataclasses.field(default_factory=dict)


def record(path, label: int, defect_type: str, mask_paths=(), **extra) -> dict:
  return {'path': str(path), 'label': int(label), 'defect_type': defect_type,
          'mask_paths': [str(p) for p in mask_paths], **extra}


def existing(path: pathlib.Path, what: str) -> pathlib.Path:
  """`path` if it is a file, else a DataError naming it and what refers to it."""
  if not path.is_file():
    raise errors.DataError(f'{path} does not exist ({what})')
  return path


def missing_root(root: pathlib.Path, what: str) -> errors.DataError | None:
  """A DataError naming `root` when it is not a folder (`what`: what it should hold), else None."""
  if not root.is_dir():
    return errors.DataError(f'dataset root {root} does not exist (it should hold {what})')
  return None
