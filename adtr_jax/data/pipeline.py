"""Host input pipeline: per-process slices of global batches, threaded decoding.

A source is anything with len() and source[i] -> {'image': uint8 [H, W, 3] or [H, W],
'mask': bool [H, W] (optional), 'label': int, 'path': str} (e.g. builder.ExampleSource).
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from adtr_jax import errors


# Batches decoded ahead of the consumer: enough to hide decoding behind a train step, few enough
# that memory stays at a handful of batches.
PREFETCH_BATCHES = 3


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
  """Global batches per epoch of n examples."""
  return n // batch_size if drop_remainder else -(-n // batch_size)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W] or [H, W, 3] -> uint8 [size, size, 3] (PIL bilinear). The device normalises to
  [0, 1] (models.adtr.to_unit_range): uint8 is a quarter of float32's bytes to send."""
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return np.asarray(image, np.uint8)


def _resize_mask(mask: np.ndarray | None, size: int) -> np.ndarray:
  """bool [H, W] (None: no defect) -> uint8 [size, size] in {0, 1} (nearest, so it stays binary)."""
  if mask is None:
    return np.zeros((size, size), np.uint8)
  mask = np.asarray(mask)
  if mask.shape != (size, size):
    grey = Image.fromarray(mask.astype(np.uint8) * 255)
    mask = np.asarray(grey.resize((size, size), Image.NEAREST)) >= 128
  return mask.astype(np.uint8)


def load_resized(source, index: int, image_size: int) -> dict:
  """source[index] at the model's size: 'image' uint8 [S, S, 3], 'mask' uint8 [S, S] in {0, 1}, 'label',
  'path'."""
  example = source[int(index)]
  path = example.get('path', f'row {index} of {type(source).__name__}')
  try:
    return {'image': resize_image(np.asarray(example['image']), image_size),
            'mask': _resize_mask(example.get('mask'), image_size),
            'label': int(example['label']), 'path': path}
  except errors.DataError:
    raise
  except Exception as e:  # name the file: a bare PIL/numpy error does not say which one
    raise errors.DataError(f'cannot prepare {path}: {type(e).__name__}: {e}') from e


def parallel_map(fn: Callable, groups: Iterable[list], num_workers: int,
                 prefetch: int = PREFETCH_BATCHES) -> Iterator[list]:
  """[fn(x) for x in group] for each group, in order, computed by `num_workers` threads at most
  `prefetch` groups ahead. A worker's exception is raised here, in the consumer's thread."""
  if num_workers < 1:
    raise ValueError(f'num_workers={num_workers} must be >= 1')
  pending = collections.deque()
  groups = iter(groups)
  with concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='adtr_data') as pool:
    try:
      for group in groups:
        pending.append([pool.submit(fn, x) for x in group])
        if len(pending) > prefetch:
          yield [f.result() for f in pending.popleft()]
      while pending:
        yield [f.result() for f in pending.popleft()]
    finally:  # the consumer stopped early or a worker failed: do not decode the rest
      for futures in pending:
        for f in futures:
          f.cancel()


def _slices(n: int, order: np.ndarray, batch_size: int, local: int, process_index: int,
            drop_remainder: bool, skip_batches: int) -> Iterator[np.ndarray]:
  """int64 [local] source rows of this process for each batch after `skip_batches`; -1 = padding."""
  for i in range(skip_batches, num_batches(n, batch_size, drop_remainder)):
    start = i * batch_size + process_index * local
    positions = np.arange(start, start + local)
    yield np.where(positions < n, order[np.minimum(positions, n - 1)], -1)


def _fill_padding(rows: np.ndarray, last_row: int) -> np.ndarray:
  """rows [b] with padding (-1) replaced by a real row: one of the slice's own, or the epoch's last
  row when the whole slice is padding (a process past the end of the last batch)."""
  real = rows[rows >= 0]
  return np.where(rows >= 0, rows, real[0] if real.size else last_row)


def _collate(rows: list[dict], index: np.ndarray) -> dict:
  """Stacks one process's rows; padding rows (index -1) repeat a real row and are flagged invalid."""
  return {'image': np.stack([r['image'] for r in rows]),
          'mask': np.stack([r['mask'] for r in rows]),
          'label': np.asarray([r['label'] for r in rows], np.int32),
          'valid': index >= 0,
          'index': index.astype(np.int64)}


def batches(source, *, batch_size: int, image_size: int, drop_remainder: bool, skip_batches: int = 0,
            process_index: int = 0, process_count: int = 1, num_workers: int = 2,
            order: np.ndarray | None = None) -> Iterator[dict]:
  """This process's part of each global batch of one epoch.

  Global batch i holds positions [i*B, (i+1)*B) of `order` (the rows to visit: a permutation of the
  rows, or some of them, each at most once; default: every row in the source's order; training draws
  it from (seed, epoch) on device, loop.epoch_order); process p takes
  [i*B + p*b, i*B + (p+1)*b), b = B / process_count. Yields numpy dicts: 'image' uint8
  [b, S, S, 3], 'mask' uint8 [b, S, S] in {0, 1}, 'label' int32 [b] (1 = anomalous),
  'valid' bool [b], 'index' int64 [b] (source row, -1 for padding). With drop_remainder=False the
  last batch is padded to B with copies of a real row (valid=False). The first `skip_batches`
  batches are skipped without decoding (resuming mid-epoch). `num_workers` threads decode and resize,
  PREFETCH_BATCHES batches ahead; a failure is raised by the generator, naming the file.
  """
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} must be a positive multiple of the process count '
                     f'({process_count})')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  if skip_batches < 0:
    raise ValueError(f'skip_batches={skip_batches} must be >= 0')
  n = len(source)
  if n == 0:
    raise ValueError(f'cannot make batches of an empty source {source!r}')
  if order is None:
    order = np.arange(n, dtype=np.int64)
  else:
    order = np.asarray(order, np.int64)
    if (not len(order) or order.min() < 0 or order.max() >= n
        or len(np.unique(order)) != len(order)):
      raise ValueError(f'order must list rows of the {n} rows of {source!r}, each at most once')
    n = len(order)
  slices = _slices(n, order, batch_size, batch_size // process_count, process_index,
                   drop_remainder, skip_batches)
  # Checks above run at the call; decoding starts when the first batch is asked for.
  return _decode_batches(source, [(rows, _fill_padding(rows, order[-1])) for rows in slices],
                         image_size, num_workers)


def _decode_batches(source, plans: list, image_size: int, num_workers: int) -> Iterator[dict]:
  """plans: (index [b] with -1 for padding, rows [b] to decode) per batch."""
  def load(row: int) -> dict:
    return load_resized(source, row, image_size)

  # Each distinct row is decoded once per batch: padding copies reuse a decoded row.
  groups = (np.unique(filled).tolist() for _, filled in plans)
  for (index, filled), decoded in zip(plans, parallel_map(load, groups, num_workers), strict=True):
    by_row = dict(zip(np.unique(filled).tolist(), decoded))
    yield _collate([by_row[r] for r in filled.tolist()], index)
