"""Reads `.safetensors` files (timm, Hugging Face) into numpy arrays without the safetensors package.

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
(plus an optional "__metadata__"), then the raw little-endian tensor bytes; offsets are relative to the
end of the header.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from adtr_jax import errors

_DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4', 'I16': '<i2',
           'I8': 'i1', 'U8': 'u1', 'BOOL': '?'}


def _bf16_to_f32(raw: bytes) -> np.ndarray:
  """bfloat16 is the top half of a float32."""
  return (np.frombuffer(raw, '<u2').astype(np.uint32) << 16).view(np.float32)


def load(path) -> dict[str, np.ndarray]:
  """A .safetensors file -> {name: array}; a malformed file is a ValueError naming it."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  try:
    n = int(np.frombuffer(data[:8], '<u8')[0])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
      if name == '__metadata__':
        continue
      start, end = info['data_offsets']
      raw, shape, dtype = body[start:end], tuple(info['shape']), info['dtype']
      if dtype == 'BF16':
        array = _bf16_to_f32(raw)
      elif dtype in _DTYPES:
        array = np.frombuffer(raw, _DTYPES[dtype]).copy()
      else:
        raise errors.WeightsError(f'tensor {name!r} has unsupported dtype {dtype}')
      out[name] = array.reshape(shape)
  except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as e:
    raise errors.WeightsError(f'cannot read safetensors weights from {path}: {e}') from e
  if not out:
    raise errors.WeightsError(f'{path} holds no tensors')
  return out
