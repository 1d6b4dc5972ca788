"""Decode and resize each image once per (prepared dataset, image size): uint8 arrays on disk.

Decoding a 1024 px PNG costs ~30 ms; a training run visits every image many times. The first use of a
split at a size writes `<tfds data_path>/resized_<S>/<split>/{images,masks,labels}.npy` and
`paths.json` beside the prepared tfds data (so a changed folder, which is a new tfds dataset, gets new
arrays); later uses memory-map them.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from absl import logging
from tqdm.auto import tqdm

from adtr_jax import faults
from adtr_jax.data import pipeline


class ArraySource:
  """A split already at the model's size. [i] -> {'image': uint8 [S, S, 3], 'mask': bool [S, S],
  'label': int, 'path': str}; `arrays` holds the whole split ('images', 'masks', 'labels');
  records[i] is row i's scan record (records.py)."""

  def __init__(self, arrays: dict, paths: list[str], has_masks: bool, name: str, records: list[dict]):
    self.arrays, self.paths, self.has_masks, self.name = arrays, paths, has_masks, name
    self.records = records

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {'image': np.asarray(self.arrays['images'][i]), 'mask': self.arrays['masks'][i] > 0,
            'label': int(self.arrays['labels'][i]), 'path': self.paths[i]}

  def __repr__(self) -> str:
    return f'ArraySource({self.name})'


def _decode_all(source, image_size: int, num_workers: int, desc: str) -> tuple[dict, list[str]]:
  n = len(source)
  arrays = {'images': np.zeros((n, image_size, image_size, 3), np.uint8),
            'masks': np.zeros((n, image_size, image_size), np.uint8),
            'labels': np.zeros((n,), np.int32)}
  paths = [''] * n
  groups = (list(range(i, min(i + 32, n))) for i in range(0, n, 32))
  bar = tqdm(total=n, desc=desc, unit='img', leave=False)
  rows = (r for g in pipeline.parallel_map(lambda i: (i, pipeline.load_resized(source, i, image_size)),
                                           groups, num_workers) for r in g)
  for i, example in rows:
    arrays['images'][i], arrays['masks'][i] = example['image'], example['mask']
    arrays['labels'][i], paths[i] = example['label'], example['path']
    faults.point('resize')
    bar.update(1)
  bar.close()
  return arrays, paths


def cached(source, image_size: int, num_workers: int = 2) -> ArraySource:
  """`source` (a builder.ExampleSource) at image_size, from the disk cache (made on first use)."""
  folder = pathlib.Path(source.data_dir) / f'resized_{image_size}' / source.split
  name = f'{source.split} at {image_size} px, {folder}'
  if not (folder / 'paths.json').is_file():
    arrays, paths = _decode_all(source, image_size, num_workers, f'resize {source.split}')
    # Written into a temporary folder and renamed: a killed run never leaves half an array behind.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f'.{source.split}-'))
    for key, value in arrays.items():
      np.save(tmp / f'{key}.npy', value)
    (tmp / 'paths.json').write_text(json.dumps(paths))
    try:
      os.rename(tmp, folder)
    except OSError:  # another process wrote it first: theirs is identical
      shutil.rmtree(tmp, ignore_errors=True)
    logging.info('cached %d resized images in %s', len(paths), folder)
  arrays = {k: np.load(folder / f'{k}.npy', mmap_mode='r') for k in ('images', 'masks', 'labels')}
  paths = json.loads((folder / 'paths.json').read_text())
  if len(paths) != len(source):
    raise RuntimeError(f'{folder} holds {len(paths)} images but {source} has {len(source)}: '
                       f'delete {folder} and run again')
  return ArraySource(arrays, paths, source.has_masks, name, source.records)
