"""adtr_jax.npy_rows: a feature cache written row by row on disk, renamed only when complete, and
read back row by row."""
import ml_dtypes
import numpy as np
import pytest

from adtr_jax import npy_rows


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_rows_land_at_their_indices(tmp_path, dtype):
  rng = np.random.default_rng(0)
  want = rng.standard_normal((13, 2, 3, 5)).astype(npy_rows.DTYPES[dtype][0])
  order = rng.permutation(13)   # rows come dealt to processes, not in order
  path = tmp_path / 'features.npy'
  with npy_rows.RowWriter(path, want.shape, dtype) as w:
    for start in range(0, 13, 4):
      index = order[start:start + 4]
      w.write(index, want[index])
  rows = npy_rows.Rows(path, dtype)
  assert rows.dtype == want.dtype and rows.shape == want.shape and len(rows) == 13
  got = np.asarray(rows)
  np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))   # bit for bit
  np.testing.assert_array_equal(np.load(path).view(want.dtype), want)      # a standard .npy file
  for key in (4, -1, slice(2, 9), slice(None, None, 3), [7, 0, 7]):
    np.testing.assert_array_equal(rows[key].view(np.uint8), want[key].view(np.uint8))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['features.npy']
  if dtype == 'bfloat16':   # stored as uint16 bits: a reader asking for float32 is refused
    with pytest.raises(ValueError, match='stores uint16'):
      npy_rows.Rows(path, 'float32')
    assert np.load(path).dtype == np.uint16 and ml_dtypes.bfloat16 == got.dtype


def test_a_failed_or_killed_run_leaves_no_complete_looking_file(tmp_path):
  path = tmp_path / 'features.npy'
  rows = np.ones((4, 2, 2, 3), np.float32)
  with pytest.raises(KeyboardInterrupt):   # an exception mid-way: nothing is left
    with npy_rows.RowWriter(path, rows.shape, 'float32') as w:
      w.write([0, 1], rows[:2])
      raise KeyboardInterrupt
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(RuntimeError, match='2 of 4 rows were never written'):
    with npy_rows.RowWriter(path, rows.shape, 'float32') as w:
      w.write([3, 1], rows[:2])
  assert list(tmp_path.iterdir()) == []
  # Killed (no exit at all): only a hidden partial file, which the next writer of the path removes.
  killed = npy_rows.RowWriter(path, rows.shape, 'float32')
  killed.write([0], rows[:1])
  assert not path.exists() and [p.name.startswith('.features.npy.partial-') for p in tmp_path.iterdir()] == [True]
  with npy_rows.RowWriter(path, rows.shape, 'float32') as w:
    w.write(np.arange(4), rows)
  assert [p.name for p in tmp_path.iterdir()] == ['features.npy']
  with pytest.raises(RuntimeError, match='written twice'):
    with npy_rows.RowWriter(path, rows.shape, 'float32') as w:
      w.write([1, 2], rows[:2])
      w.write([2], rows[:1])
  np.testing.assert_array_equal(npy_rows.Rows(path, 'float32'), rows)   # the old file stays
