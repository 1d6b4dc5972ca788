"""Arrays on disk filled row by row: memory-mapped .npy files (np.lib.format), for a split's feature
cache [N, h, w, C] or resized images [N, S, S, 3] that need not fit in memory.

bfloat16 has no .npy type code (numpy writes ml_dtypes' bfloat16 as an opaque '|V2' and reads it back
as bytes), so bfloat16 rows are stored as their uint16 bit patterns and viewed as bfloat16 when read:
the reader names the dtype it expects, and a file of another stored dtype is refused.

`RowWriter` writes into a temporary file beside the target and renames it only when every row was
written, so a killed run never leaves a file under the target's name that looks complete.
"""
from __future__ import annotations

import os
import pathlib
import uuid

import ml_dtypes
import numpy as np

# dtype name -> (the dtype rows have in memory, the dtype stored in the .npy file)
DTYPES = {'bfloat16': (np.dtype(ml_dtypes.bfloat16), np.dtype('<u2')),
          'float32': (np.dtype('<f4'), np.dtype('<f4')),
          'uint8': (np.dtype('u1'), np.dtype('u1')),
          'int32': (np.dtype('<i4'), np.dtype('<i4'))}


def _types(dtype: str) -> tuple[np.dtype, np.dtype]:
  if dtype not in DTYPES:
    raise ValueError(f'dtype {dtype!r} must be one of {sorted(DTYPES)}')
  return DTYPES[dtype]


def create(path, shape: tuple, dtype: str) -> np.memmap:
  """A new .npy file of `shape` (zeros) at `path`, mapped for writing, viewed as `dtype`."""
  memory, stored = _types(dtype)
  out = np.lib.format.open_memmap(os.fspath(path), mode='w+', dtype=stored, shape=tuple(shape))
  return out.view(memory)


def open_rows(path, dtype: str, mode: str = 'r') -> np.memmap:
  """An existing .npy file mapped ('r': read only, 'r+': to write rows), viewed as `dtype`."""
  memory, stored = _types(dtype)
  out = np.load(os.fspath(path), mmap_mode=mode)
  if out.dtype != stored:
    raise ValueError(f'{path} stores {out.dtype}, not the {stored} of {dtype} rows')
  return out.view(memory)


class RowWriter:
  """Fills path (.npy, [N, *row_shape] of `dtype`) from batches of rows given with their indices,
  in any order, each row once.

    with RowWriter(path, (n, h, w, c), 'bfloat16') as w:
      for index, rows in batches:     # index int [b], rows [b, h, w, c]
        w.write(index, rows)
    features = open_rows(path, 'bfloat16')   # [n, h, w, c], memory-mapped

  The rows go to a temporary file beside `path` (a leftover of a killed run is removed by the next
  writer of the same path); leaving the `with` block renames it to `path` when every row was written,
  and deletes it on an exception or when rows are missing (a RuntimeError naming how many). Memory:
  one bool per row besides the caller's batch; the mapped pages are the kernel's to write back.
  """

  def __init__(self, path, shape: tuple, dtype: str):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in self.path.parent.glob(f'.{self.path.name}.partial-*'):
      stale.unlink(missing_ok=True)
    self.tmp = self.path.with_name(f'.{self.path.name}.partial-{uuid.uuid4().hex[:12]}')
    self.array = create(self.tmp, shape, dtype)
    self.written = np.zeros(shape[0], bool)

  def write(self, index, rows) -> None:
    """rows [b, *row_shape] into rows `index` (int [b]) of the file."""
    index = np.asarray(index, np.int64)
    rows = np.asarray(rows)
    if rows.shape != (len(index), *self.array.shape[1:]):
      raise ValueError(f'rows of shape {rows.shape} for {len(index)} indices of rows '
                       f'{self.array.shape[1:]}')
    if len(index) and (index.min() < 0 or index.max() >= len(self.written)):
      raise IndexError(f'row indices outside [0, {len(self.written)}) for {self.path}')
    if self.written[index].any() or len(np.unique(index)) != len(index):
      raise RuntimeError(f'{self.path}: row {index[self.written[index]][:1]} written twice')
    self.array[index] = rows.astype(self.array.dtype, copy=False)
    self.written[index] = True

  def close(self) -> pathlib.Path:
    """Flushes and renames the complete file to `path`; a RuntimeError (and no file) if rows are
    missing."""
    missing = int(np.count_nonzero(~self.written))
    if missing:
      self.abort()
      raise RuntimeError(f'{self.path}: {missing} of {len(self.written)} rows were never written')
    self.array.flush()
    del self.array
    os.replace(self.tmp, self.path)
    return self.path

  def abort(self) -> None:
    """Deletes the temporary file."""
    self.__dict__.pop('array', None)
    self.tmp.unlink(missing_ok=True)

  def __enter__(self) -> RowWriter:
    return self

  def __exit__(self, kind, value, tb) -> None:
    if kind is None:
      self.close()
    else:
      self.abort()
