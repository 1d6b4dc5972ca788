"""Arrays on disk read and written row by row: .npy files (np.lib.format, so np.load reads them), for a
split's feature cache [N, h, w, C] or resized images [N, S, S, 3] that need not fit in memory.

Rows are read and written with pread/pwrite at their offsets, not through a memory map: the pages of a
mapped file that a process touches count in its resident memory (RSS) until it unmaps the file, so a
pass over a mapped 16k-image cache would show the whole file in the process's peak RSS; read with
pread, they stay in the kernel's page cache, which it can drop. Positional reads are thread-safe
(the input pipeline's decode threads read rows at once).

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


def create(path, shape: tuple, dtype: str) -> None:
  """A new .npy file of `shape` and `dtype` at `path`, all zeros (a sparse file until written)."""
  _, stored = _types(dtype)
  with open(path, 'wb') as f:
    np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(stored),
                                             'fortran_order': False, 'shape': tuple(shape)})
    f.truncate(f.tell() + int(np.prod(shape, dtype=np.int64)) * stored.itemsize)


class Rows:
  """The rows of a .npy file ([N, ...], C order) as `dtype`: len(), .shape, .dtype, rows[i] (one row),
  rows[a:b] or rows[int array] (a new array [k, ...]), np.asarray(rows) (all of them); write(index,
  rows) with mode 'r+'. Each read is a fresh array: nothing stays mapped."""

  def __init__(self, path, dtype: str, mode: str = 'r'):
    if mode not in ('r', 'r+'):
      raise ValueError(f"mode={mode!r} must be 'r' or 'r+'")
    self.path, self.fd = pathlib.Path(path), None
    self.dtype, self.stored = _types(dtype)
    with open(self.path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape, fortran, stored = read(f)
      self.offset = f.tell()
    if stored != self.stored or fortran or not shape:
      raise ValueError(f'{self.path} stores {stored} [{shape}]{" in Fortran order" if fortran else ""}, '
                       f'not the C-ordered rows of {self.stored} that {dtype} rows need')
    self.shape = tuple(shape)
    self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.stored.itemsize
    self.fd = os.open(self.path, os.O_RDWR if mode == 'r+' else os.O_RDONLY)

  def __len__(self) -> int:
    return self.shape[0]

  def _read(self, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) as stored, [count, ...]."""
    out = np.empty((count, *self.shape[1:]), self.stored)
    view, done, size = memoryview(out).cast('B'), 0, count * self.row_bytes
    while done < size:
      got = os.preadv(self.fd, [view[done:]], self.offset + start * self.row_bytes + done)
      if got <= 0:
        raise OSError(f'{self.path} ended at byte {self.offset + start * self.row_bytes + done}')
      done += got
    return out

  def __getitem__(self, key) -> np.ndarray:
    n = len(self)
    if isinstance(key, slice):
      start, stop, step = key.indices(n)
      if step == 1:
        return self._read(start, max(stop - start, 0)).view(self.dtype)
      key = np.arange(start, stop, step)
    if np.ndim(key) == 0:
      i = int(key)
      if not -n <= i < n:
        raise IndexError(f'row {i} of {n} in {self.path}')
      return self._read(i % n, 1)[0].view(self.dtype)
    index = np.asarray(key, np.int64)
    if index.size and (index.min() < -n or index.max() >= n):
      raise IndexError(f'rows outside [0, {n}) of {self.path}')
    index %= max(n, 1)
    out = np.empty((len(index), *self.shape[1:]), self.stored)
    for k, i in enumerate(index):
      out[k] = self._read(int(i), 1)[0]
    return out.view(self.dtype)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def write(self, index, rows) -> None:
    """rows [b, ...] (cast to the stored dtype) into rows `index` (int [b]) of the file."""
    index = np.asarray(index, np.int64)
    rows = np.ascontiguousarray(np.asarray(rows).astype(self.dtype, copy=False)).view(self.stored)
    if rows.shape != (len(index), *self.shape[1:]):
      raise ValueError(f'rows of shape {rows.shape} for {len(index)} indices of rows {self.shape[1:]}')
    if len(index) and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f'row indices outside [0, {len(self)}) for {self.path}')
    for i, row in zip(index.tolist(), rows):
      data, done = memoryview(row).cast('B'), 0
      while done < self.row_bytes:
        done += os.pwrite(self.fd, data[done:], self.offset + i * self.row_bytes + done)

  def close(self) -> None:
    if self.fd is not None:
      os.close(self.fd)
      self.fd = None

  def __del__(self):
    self.close()

  def __repr__(self) -> str:
    return f'Rows({self.path}, {self.dtype} {list(self.shape)})'


class RowWriter:
  """Fills path (.npy, `shape` [N, ...] of `dtype`) from batches of rows given with their indices, in
  any order, each row once.

    with RowWriter(path, (n, h, w, c), 'bfloat16') as w:
      for index, rows in batches:     # index int [b], rows [b, h, w, c]
        w.write(index, rows)
    features = Rows(path, 'bfloat16')   # [n, h, w, c]

  The rows go to a temporary file beside `path` (a leftover of a killed run is removed by the next
  writer of the same path); leaving the `with` block renames it to `path` when every row was written,
  and deletes it on an exception or when rows are missing (a RuntimeError saying how many). Memory:
  one bool per row besides the caller's batch.
  """

  def __init__(self, path, shape: tuple, dtype: str):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in self.path.parent.glob(f'.{self.path.name}.partial-*'):
      stale.unlink(missing_ok=True)
    self.tmp = self.path.with_name(f'.{self.path.name}.partial-{uuid.uuid4().hex[:12]}')
    create(self.tmp, shape, dtype)
    self.rows = Rows(self.tmp, dtype, 'r+')
    self.written = np.zeros(shape[0], bool)

  def write(self, index, rows) -> None:
    """rows [b, ...] into rows `index` (int [b]) of the file; a RuntimeError for a row written twice."""
    index = np.asarray(index, np.int64)
    if len(index) and (index.min() < 0 or index.max() >= len(self.written)):
      raise IndexError(f'row indices outside [0, {len(self.written)}) for {self.path}')
    again = index[self.written[index]]
    if len(again) or len(np.unique(index)) != len(index):
      raise RuntimeError(f'{self.path}: row {again[:1] if len(again) else index} written twice')
    self.rows.write(index, rows)
    self.written[index] = True

  def close(self) -> pathlib.Path:
    """Renames the complete file to `path`; a RuntimeError (and no file) when rows are missing."""
    missing = int(np.count_nonzero(~self.written))
    if missing:
      self.abort()
      raise RuntimeError(f'{self.path}: {missing} of {len(self.written)} rows were never written')
    self.rows.close()
    os.replace(self.tmp, self.path)
    return self.path

  def abort(self) -> None:
    """Deletes the temporary file."""
    self.rows.close()
    self.tmp.unlink(missing_ok=True)

  def __enter__(self) -> RowWriter:
    return self

  def __exit__(self, kind, value, tb) -> None:
    if kind is None:
      self.close()
    else:
      self.abort()
