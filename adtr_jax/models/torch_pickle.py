"""Reads PyTorch `.pth` state dicts into numpy arrays without importing torch.

Two on-disk layouts exist:
  * zip (torch >= 1.6): `<prefix>/data.pkl` holds the pickled object, `<prefix>/data/<key>` each storage's bytes.
  * legacy: five things back to back -- pickled magic number, protocol version, sys_info, then the object,
    then the list of storage keys, then for each key an int64 element count followed by the raw bytes.
In both, tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
storages as persistent ids. Only those few globals are allowed, so a weight file cannot run code.
"""
from __future__ import annotations

import collections
import io
import pathlib
import pickle
import zipfile

import numpy as np

from adtr_jax import errors

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _Storage:
  """A storage whose bytes may arrive after unpickling (legacy layout)."""

  def __init__(self, dtype, key: str, numel: int):
    self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
    self.array: np.ndarray | None = None


class _TensorRef:
  """A tensor view into a storage, materialised once every storage is read."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    flat = self.storage.array
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride], writeable=False)
    return np.array(view, order='C')  # a C-contiguous copy that owns its memory


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


class _Unpickler(pickle.Unpickler):
  """Allows only the globals a state dict needs; storages come from `persistent_load`."""

  def __init__(self, file, storages: dict[str, _Storage]):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module, name):
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor_v2
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _DTYPES:
      return _DTYPES[name]  # a storage type stands for the dtype it holds
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    raise pickle.UnpicklingError(
        f'refusing to unpickle {module}.{name}; only tensors, storages and OrderedDict are allowed')

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy: (..., numel, view_metadata).
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
    if key not in self._storages:
      self._storages[key] = _Storage(dtype, key, numel)
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError('storage views (legacy view_metadata) are not supported')
    return self._storages[key]


def _load_zip(path: pathlib.Path):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise errors.WeightsError('a zip file without data.pkl is not a PyTorch checkpoint')
    prefix = pkl[0][:-len('data.pkl')]
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
    for key, st in storages.items():
      raw = zf.read(f'{prefix}data/{key}')
      st.array = np.frombuffer(raw, dtype=st.dtype, count=st.numel)
  return obj


def _load_legacy(path: pathlib.Path):
  f = io.BytesIO(path.read_bytes())
  magic = pickle.load(f)
  if magic != _LEGACY_MAGIC:
    raise errors.WeightsError('not a PyTorch checkpoint (neither a zip file nor the legacy magic number)')
  pickle.load(f)  # protocol version
  pickle.load(f)  # sys_info (endianness, type sizes); little-endian is assumed below
  storages: dict[str, _Storage] = {}
  obj = _Unpickler(f, storages).load()
  keys = pickle.load(f)
  for key in keys:
    st = storages[str(key)]
    numel = int(np.frombuffer(f.read(8), '<i8')[0])
    if numel != st.numel:
      raise errors.WeightsError(f'storage {key} has {numel} elements, the pickle says {st.numel}')
    raw = f.read(numel * st.dtype.itemsize)
    st.array = np.frombuffer(raw, dtype=st.dtype.newbyteorder('<'), count=numel)
  return obj


def _unwrap(obj) -> dict[str, np.ndarray]:
  """The tensor dict itself, or the one under 'state_dict' / 'model' of a training checkpoint."""
  if isinstance(obj, dict):
    for key in ('state_dict', 'model'):
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict):
    raise errors.WeightsError(f'expected a state dict (name -> tensor), got {type(obj).__name__}')
  out = {}
  for name, value in obj.items():
    if isinstance(value, _TensorRef):
      out[str(name)] = value.to_numpy()
  if not out:
    raise errors.WeightsError('the state dict holds no tensors')
  return out


def load_state_dict(path) -> dict[str, np.ndarray]:
  """A `.pth` file (zip or legacy layout) -> {parameter name: numpy array in torch layout}."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'weight file {path} does not exist')
  try:
    return _unwrap(_load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path))
  # Whatever a malformed file makes the readers trip over, report it against the file.
  except (pickle.UnpicklingError, ValueError, TypeError, EOFError, KeyError, IndexError,
          zipfile.BadZipFile) as e:
    raise errors.WeightsError(f'cannot read PyTorch weights from {path}: {e}') from e
