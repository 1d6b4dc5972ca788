"""VisA (Amazon's spot-diff release), read where it lies.

<root>/<class>/Data/Images/{Normal,Anomaly}/*.JPG     images
<root>/<class>/Data/Masks/Anomaly/*.png               masks: defect ids 1..9 per pixel (anomalous: > 0)
<root>/split_csv/<split>.csv                          object,split,label,image,mask (paths from <root>)

The split files come with the spot-diff repository, not the image archive: put its split_csv/ into
<root>. '1cls' is the one-class protocol (normal training images only); '2cls_highshot' and
'2cls_fewshot' also put labelled anomalies (with masks) in the training split: they train the
anomaly-aware losses (datasets.load_category hands them to data/mixing.py as labelled anomalies).

Records (records.py) add nothing; defect_type is 'good' or 'anomaly'.
"""
from __future__ import annotations

import csv
import pathlib

from adtr_jax import errors
from adtr_jax.data import mvtec, records

SPLITS = ('1cls', '2cls_highshot', '2cls_fewshot')
LABELLED_SPLITS = ('2cls_highshot', '2cls_fewshot')   # anomalies in the training split
CLASSES = ('candle', 'capsules', 'cashew', 'chewinggum', 'fryum', 'macaroni1', 'macaroni2', 'pcb1',
           'pcb2', 'pcb3', 'pcb4', 'pipe_fryum')
COLUMNS = ('object', 'split', 'label', 'image', 'mask')
LABELS = {'normal': 0, 'anomaly': 1}
SPLIT_NAMES = ('train', 'test')


def split_file(root, split: str) -> pathlib.Path:
  """<root>/split_csv/<split>.csv, or an error naming it when it is missing."""
  root = pathlib.Path(root).expanduser().resolve()
  if problem := records.missing_root(root, '<class>/Data/ and split_csv/'):
    raise problem
  path = root / 'split_csv' / f'{split}.csv'
  if not path.is_file():
    raise errors.DataError(f'VisA split file {path} does not exist: copy split_csv/ of the spot-diff '
                           f'repository into {root}')
  return path


def _rows(path: pathlib.Path) -> list[tuple[int, dict]]:
  with path.open(newline='') as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != COLUMNS:
      raise errors.DataError(f'{path}: the header must be {",".join(COLUMNS)}, got '
                             f'{",".join(reader.fieldnames or ())}')
    return [(n, row) for n, row in enumerate(reader, 2)]


def scan_category(root, category: str, split: str = '1cls') -> records.Scan:
  """The rows of `split`'s CSV for object `category`: splits 'train' and 'test', in the CSV's order.

  Every listed image, and every anomaly's mask, must exist; in '1cls' training images are normal.
  """
  path = split_file(root, split)
  root = path.parent.parent
  rows = _rows(path)
  mine = [(n, row) for n, row in rows if row['object'] == category]
  if not mine:
    objects = sorted({row['object'] for _, row in rows})
    folders = [c for c in objects if (root / c / 'Data').is_dir()]
    raise errors.DataError(f'VisA class {category!r} is not in {path}; its classes: {", ".join(objects)} '
                           f'(with a folder under {root}: {", ".join(folders) or "none"})')
  splits = {name: [] for name in SPLIT_NAMES}
  for n, row in mine:
    where = f'{path}:{n}'
    if row['split'] not in splits or row['label'] not in LABELS:
      raise errors.DataError(f'{where}: split must be train or test and label normal or anomaly, got '
                             f'{row["split"]!r}, {row["label"]!r}')
    label = LABELS[row['label']]
    if label and row['split'] == 'train' and split not in LABELLED_SPLITS:
      raise errors.DataError(f'{where}: an anomalous training image in the one-class split {split!r}')
    if label and not row['mask']:
      raise errors.DataError(f'{where}: the anomalous image {row["image"]} has no mask')
    image = records.existing(root / row['image'], f'listed at {where}')
    masks = [records.existing(root / row['mask'], f'mask listed at {where}')] if label else []
    splits[row['split']].append(records.record(image, label, row['label'] if label else mvtec.GOOD, masks))
  for name, found in splits.items():
    if not found:
      raise errors.DataError(f'{path} lists no {name} images of {category!r}')
  return records.Scan(name=category, origin=f'visa {split} {path} {category}', splits=splits,
                      mask_threshold=records.NONZERO)
