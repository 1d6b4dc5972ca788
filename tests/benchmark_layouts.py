"""Small trees in the official layouts of VisA, Real-IAD, MVTec AD 2 and MVTec LOCO AD, with the
conventions that bite (see each writer). Images are 64 x 64 striped textures; defects are dark squares."""
from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
from PIL import Image

from tests.conftest import _texture

SIZE = 64


def _image(path: pathlib.Path, rng, defect: tuple | None = None) -> None:
  """A texture (with a dark square at defect=(row, col, side)), saved in the format of the suffix."""
  img = _texture(rng, SIZE)
  if defect:
    r, c, side = defect
    img[r:r + side, c:c + side] = 20
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.repeat(img[..., None], 3, -1)).save(path, quality=95)


def _mask(path: pathlib.Path, regions: list[tuple]) -> np.ndarray:
  """A uint8 mask with each (row, col, side, value) square set to value; returns it."""
  mask = np.zeros((SIZE, SIZE), np.uint8)
  for r, c, side, value in regions:
    mask[r:r + side, c:c + side] = value
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(mask).save(path)
  return mask


def make_visa(root: pathlib.Path, classes=('candle',), n_train=12, n_good=3, n_bad=4, seed=0) -> pathlib.Path:
  """VisA: <class>/Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png holding defect ids
  (each anomaly has ids 2 and 7, neither >= 128), and split_csv/{1cls,2cls_fewshot}.csv: 2cls_fewshot
  puts anomalies 000 and 001 into training, and is 1cls otherwise."""
  rng = np.random.default_rng(seed)
  rows = {'1cls': [], '2cls_fewshot': []}
  for cls in classes:
    data = root / cls / 'Data'
    for i in range(n_train + n_good):
      image = f'{cls}/Data/Images/Normal/{i:04d}.JPG'
      _image(root / image, rng)
      split = 'train' if i < n_train else 'test'
      for name in rows:
        rows[name].append([cls, split, 'normal', image, ''])
    for i in range(n_bad):
      image, mask = f'{cls}/Data/Images/Anomaly/{i:03d}.JPG', f'{cls}/Data/Masks/Anomaly/{i:03d}.png'
      _image(root / image, rng, (8 + 4 * i, 8, 16))
      _mask(data / 'Masks/Anomaly' / f'{i:03d}.png', [(8 + 4 * i, 8, 8, 2), (8 + 4 * i + 8, 8, 8, 7)])
      rows['1cls'].append([cls, 'test', 'anomaly', image, mask])
      rows['2cls_fewshot'].append([cls, 'train' if i < 2 else 'test', 'anomaly', image, mask])
  (root / 'split_csv').mkdir(parents=True, exist_ok=True)
  for name, lines in rows.items():
    with (root / 'split_csv' / f'{name}.csv').open('w', newline='') as f:
      csv.writer(f).writerows([['object', 'split', 'label', 'image', 'mask'], *lines])
  return root


REALIAD_TIME = '20230922093358'


def make_realiad(root: pathlib.Path, categories=('audiojack', 'pcb'), n_train_samples=4, views=3,
                 seed=0) -> pathlib.Path:
  """Real-IAD: realiad_256/<cat>/{OK,NG/BX}/S<nnnn>/<cat>_<nnnn>_<OK|NG_BX>_C<v>_<time>.jpg and
  realiad_jsons/<cat>.json. Test sample NG/BX/S0001 has view C1 anomalous (with its mask), view C2 an
  'OK' view under NG/ (defect not visible: anomaly_class OK, mask_path null), the rest anomalous."""
  rng = np.random.default_rng(seed)
  for cat in categories:
    base = root / 'realiad_256' / cat
    train, test = [], []

    def entry(rel, anomaly_class, mask):
      return {'category': cat, 'anomaly_class': anomaly_class, 'image_path': rel, 'mask_path': mask}

    for s in range(1, n_train_samples + 2):
      for v in range(1, views + 1):
        rel = f'OK/S{s:04d}/{cat}_{s:04d}_OK_C{v}_{REALIAD_TIME}.jpg'
        _image(base / rel, rng)
        (train if s <= n_train_samples else test).append(entry(rel, 'OK', None))
    for v in range(1, views + 1):
      stem = f'NG/BX/S0001/{cat}_0001_NG_BX_C{v}_{REALIAD_TIME}'
      visible = v != 2
      _image(base / f'{stem}.jpg', rng, (10 + 6 * v, 12, 14) if visible else None)
      if visible:
        _mask(base / f'{stem}.png', [(10 + 6 * v, 12, 14, 255)])
      test.append(entry(f'{stem}.jpg', 'BX' if visible else 'OK', f'{stem}.png' if visible else None))
    path = root / 'realiad_jsons' / f'{cat}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'meta': {'prefix': f'{cat}/', 'normal_class': 'OK'},
                                'train': train, 'test': test}, indent=1))
  return root


def make_mvtec_ad2(root: pathlib.Path, obj='vial', n_train=12, n_val=3, n_good=2, n_bad=3, n_private=3,
                   seed=0) -> pathlib.Path:
  """MVTec AD 2: train/good, validation/good, test_public/{good,bad} with
  test_public/ground_truth/bad/<stem>_mask.png, and test_private/<NNN>_regular.png,
  test_private_mixed/<NNN>_mixed.png without labels (n_private each; the submission checker wants
  maps_io.AD2_PRIVATE_COUNTS[obj])."""
  rng = np.random.default_rng(seed)
  cat = root / obj
  for folder, n in (('train/good', n_train), ('validation/good', n_val), ('test_public/good', n_good),
                    ('test_private', n_private), ('test_private_mixed', n_private)):
    suffix = 'mixed' if folder == 'test_private_mixed' else 'regular'
    for i in range(n):
      _image(cat / folder / f'{i:03d}_{suffix}.png', rng, (20, 20, 12) if folder.startswith('test_pr') and i
             else None)
  for i in range(n_bad):
    _image(cat / 'test_public/bad' / f'{i:03d}_regular.png', rng, (8 + 6 * i, 30, 14))
    _mask(cat / 'test_public/ground_truth/bad' / f'{i:03d}_regular_mask.png', [(8 + 6 * i, 30, 14, 255)])
  return root


LOCO_DEFECTS = [
    {'defect_name': 'missing_pushpin', 'pixel_value': 255, 'saturation_threshold': 1.0,
     'relative_saturation': True},
    {'defect_name': 'additional_pushpin', 'pixel_value': 254, 'saturation_threshold': 300,
     'relative_saturation': False},
    {'defect_name': 'broken', 'pixel_value': 253, 'saturation_threshold': 0.5, 'relative_saturation': True},
]


def make_mvtec_loco(root: pathlib.Path, obj='pushpins', n_train=12, n_val=3, n_good=2, seed=0
                    ) -> pathlib.Path:
  """MVTec LOCO AD: train/good, validation/good, test/{good,logical_anomalies,structural_anomalies},
  ground_truth/<type>/<stem>/NNN.png (logical 000 has two PNGs, values 255 and 254, one defect each)
  and defects_config.json."""
  rng = np.random.default_rng(seed)
  cat = root / obj
  for folder, n in (('train/good', n_train), ('validation/good', n_val), ('test/good', n_good)):
    for i in range(n):
      _image(cat / folder / f'{i:03d}.png', rng)
  defects = {'logical_anomalies': [[(8, 8, 10, 255), (40, 40, 12, 254)], [(20, 30, 16, 255)]],
             'structural_anomalies': [[(30, 10, 12, 253)], [(12, 40, 10, 253)]]}
  for kind, per_image in defects.items():
    for i, regions in enumerate(per_image):
      _image(cat / 'test' / kind / f'{i:03d}.png', rng, regions[0][:3])
      for k, region in enumerate(regions):
        _mask(cat / 'ground_truth' / kind / f'{i:03d}' / f'{k:03d}.png', [region])
  (cat / 'defects_config.json').write_text(json.dumps(LOCO_DEFECTS, indent=1))
  return root
