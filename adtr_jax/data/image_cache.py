"""Decode and resize each image once per (prepared dataset, image size): uint8 arrays on disk.

Decoding a large PNG costs far more than reading its resized rows, and a training run visits every
image many times. The first use of a split at a size writes
`<tfds data_path>/resized_<S>/<split>/{images,masks,labels}.npy` and `paths.json` beside the prepared
tfds data (so a changed folder, which is a new tfds dataset, gets new arrays); later uses read their
rows from disk (npy_rows.Rows).

Writing: process 0 makes the arrays, at their full size, in a temporary folder beside the cache; every
process of the run decodes its share of the rows (process p of P: rows p, p + P, ...) and writes them
in place, so memory is the decode queue's, not the split's, and P processes share the work. Once all
have written, process 0 joins the paths and renames the folder: a killed run never leaves half a
cache under its name. A process that does not see process 0's folder (hosts with their own disks)
makes its own cache of the whole split the same way.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from adtr_jax import faults, multihost, npy_rows
from adtr_jax.data import pipeline

ARRAYS = {'images': 'uint8', 'masks': 'uint8', 'labels': 'int32'}   # file stem -> npy_rows dtype
GROUP = 32   # rows decoded per task of the thread pool


class ArraySource:
  """A split already at the model's size. [i] -> {'image': uint8 [S, S, 3], 'mask': bool [S, S],
  'label': int, 'path': str}; `arrays` holds the split's rows on disk ('images' [N, S, S, 3], 'masks'
  [N, S, S], 'labels' [N]: npy_rows.Rows, read a row at a time); records[i] is row i's scan record
  (records.py)."""

  def __init__(self, arrays: dict, paths: list[str], has_masks: bool, name: str, records: list[dict]):
    self.arrays, self.paths, self.has_masks, self.name = arrays, paths, has_masks, name
    self.records = records

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {'image': self.arrays['images'][i], 'mask': self.arrays['masks'][i] > 0,
            'label': int(self.arrays['labels'][i]), 'path': self.paths[i]}

  def __repr__(self) -> str:
    return f'ArraySource({self.name})'


def _temporary(folder: pathlib.Path, token: int) -> pathlib.Path:
  return folder.parent / f'.{folder.name}-{token:08x}'


def _create(folder: pathlib.Path, n: int, image_size: int) -> int:
  """Process 0: a temporary folder beside `folder` holding the empty arrays of n rows. Returns its
  token (see _temporary), > 0."""
  folder.parent.mkdir(parents=True, exist_ok=True)
  while True:
    token = random.SystemRandom().randrange(1, 2**31)
    tmp = _temporary(folder, token)
    try:
      tmp.mkdir()
      break
    except FileExistsError:
      continue
  shapes = {'images': (n, image_size, image_size, 3), 'masks': (n, image_size, image_size), 'labels': (n,)}
  for key, dtype in ARRAYS.items():
    npy_rows.create(tmp / f'{key}.npy', shapes[key], dtype)
  return token


def _decode_all(source, tmp: pathlib.Path, rows: list[int], image_size: int, num_workers: int,
                desc: str) -> None:
  """Decodes and resizes `rows` of source into the arrays in tmp; their paths go to
  tmp/paths-<process>.json ({'rows': [...], 'paths': [...]})."""
  out = {key: npy_rows.Rows(tmp / f'{key}.npy', dtype, 'r+') for key, dtype in ARRAYS.items()}
  groups = (rows[i:i + GROUP] for i in range(0, len(rows), GROUP))
  bar = tqdm(total=len(rows), desc=desc, unit='img', leave=False, disable=jax.process_index() != 0)
  done = {'rows': [], 'paths': []}
  for group in pipeline.parallel_map(lambda i: (i, pipeline.load_resized(source, i, image_size)),
                                     groups, num_workers):
    index = [i for i, _ in group]
    out['images'].write(index, np.stack([e['image'] for _, e in group]))
    out['masks'].write(index, np.stack([e['mask'] for _, e in group]))
    out['labels'].write(index, np.asarray([e['label'] for _, e in group], np.int32))
    done['rows'] += index
    done['paths'] += [e['path'] for _, e in group]
    faults.point('resize')
    bar.update(len(group))
  bar.close()
  for rows_file in out.values():
    rows_file.close()
  (tmp / f'paths-{jax.process_index()}.json').write_text(json.dumps(done))


def _finish(tmp: pathlib.Path, folder: pathlib.Path, n: int, processes: list[int]) -> None:
  """Once `processes` wrote their rows into tmp: paths.json from their parts, then the rename."""
  paths = [None] * n
  for p in processes:
    part = tmp / f'paths-{p}.json'
    done = json.loads(part.read_text())
    for i, path in zip(done['rows'], done['paths']):
      paths[i] = path
    part.unlink()
  if any(p is None for p in paths):
    raise RuntimeError(f'{tmp}: {sum(p is None for p in paths)} rows were not resized by any process')
  (tmp / 'paths.json').write_text(json.dumps(paths))
  try:
    os.rename(tmp, folder)
  except OSError:  # another process or run wrote it first: theirs is identical
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info('cached %d resized images in %s', n, folder)


def _complete(folder: pathlib.Path) -> bool:
  return (folder / 'paths.json').is_file()


def folder_of(data_dir, split: str, image_size: int) -> pathlib.Path:
  """Where the resized rows of a prepared split (its tfds data_dir) live."""
  return pathlib.Path(data_dir) / f'resized_{image_size}' / split


def is_cached(data_dir, split: str, image_size: int) -> bool:
  return _complete(folder_of(data_dir, split, image_size))


def row_bytes(image_size: int) -> int:
  """Disk bytes of one row: its image [S, S, 3] and mask [S, S] (uint8) and label (int32)."""
  return image_size * image_size * 4 + 4


def cached(source, image_size: int, num_workers: int = 2) -> ArraySource:
  """`source` (a builder.ExampleSource) at image_size, from the disk cache (made on first use).

  A collective in a multi-process run: every process calls it for the same splits in the same order.
  The processes that see the files process 0 makes (one filesystem) share the resizing, each its
  share of the rows; a process that does not (a host with its own disk) makes its own cache of the
  whole split, as every process did before the work was shared.
  """
  folder = folder_of(source.data_dir, source.split, image_size)
  name = f'{source.split} at {image_size} px, {folder}'
  n, me = len(source), jax.process_index()
  token = multihost.from_first(lambda: 0 if _complete(folder) else _create(folder, n, image_size),
                               f'resize {folder}')
  shared = _temporary(folder, token) if token else None
  seen = multihost.gather_flags(shared.is_dir() if token else _complete(folder))
  if token or not all(seen):   # the same on every process: all take part in the barriers below
    group = [p for p, s in enumerate(seen) if s]   # process 0 and those sharing its filesystem
    tmp = shared if seen[me] else None
    try:
      if token and seen[me]:
        _decode_all(source, tmp, list(range(group.index(me), n, len(group))), image_size, num_workers,
                    f'resize {source.split}')
      elif not seen[me] and not _complete(folder):
        tmp = _temporary(folder, _create(folder, n, image_size))
        _decode_all(source, tmp, list(range(n)), image_size, num_workers, f'resize {source.split}')
        _finish(tmp, folder, n, [me])
      multihost.barrier(f'resized {source.split} at {image_size} px')
      if token and me == 0:
        _finish(tmp, folder, n, group)
    except BaseException:
      if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
      raise
    multihost.barrier(f'cached {source.split} at {image_size} px')
  arrays = {key: npy_rows.Rows(folder / f'{key}.npy', dtype) for key, dtype in ARRAYS.items()}
  paths = json.loads((folder / 'paths.json').read_text())
  if len(paths) != n:
    raise RuntimeError(f'{folder} holds {len(paths)} images but {source} has {n}: '
                       f'delete {folder} and run again')
  return ArraySource(arrays, paths, source.has_masks, name, source.records)
