"""adtr_jax.moments: streamed per-channel moments give FeatureNorm.fit's statistics."""
import ml_dtypes
import numpy as np
import pytest

from adtr_jax.models.adtr import FeatureNorm
from adtr_jax.moments import Moments


def features(seed: int, n: int = 23, dtype=np.float32) -> np.ndarray:
  """[n, 3, 4, 6]: channels of very different offsets and scales, one nearly constant (the floor of
  FeatureNorm's std applies to it), one constant."""
  rng = np.random.default_rng(seed)
  scale = np.array([1.0, 1e-3, 50.0, 1e-7, 0.0, 3.0])
  offset = np.array([0.0, 1e3, -20.0, 5.0, 2.0, 1e-2])
  return (offset + scale * rng.standard_normal((n, 3, 4, 6))).astype(dtype)


def streamed(x: np.ndarray, seed: int) -> Moments:
  """Moments of x's rows added in uneven batches."""
  rng = np.random.default_rng(seed)
  m, i = Moments(x.shape[-1]), 0
  while i < len(x):
    b = int(rng.integers(1, 6))
    m.add(x[i:i + b])
    i += b
  return m


def ulps(a: np.ndarray, b: np.ndarray) -> int:
  """The largest distance in float32 units of last place between a and b."""
  return int(np.max(np.abs(a.astype(np.float32).view(np.int32).astype(np.int64) -
                           b.astype(np.float32).view(np.int32).astype(np.int64))))


@pytest.mark.parametrize('seed,dtype', [(0, np.float32), (1, np.float32), (2, ml_dtypes.bfloat16)])
def test_streamed_moments_give_fits_statistics(seed, dtype):
  x = features(seed, dtype=dtype)
  flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  m = streamed(x, seed)
  assert m.count == len(flat)
  np.testing.assert_allclose(m.mean, flat.mean(axis=0), rtol=1e-12, atol=0)
  np.testing.assert_allclose(m.std, flat.std(axis=0), rtol=1e-9, atol=1e-300)
  fit, fed = FeatureNorm(6, 'channel'), FeatureNorm(6, 'channel')
  fit.fit(x)
  fed.set_statistics(m.mean, m.std)
  # float32 statistics equal to float32 rounding (measured: identical)
  assert ulps(np.asarray(fed.mean[...]), np.asarray(fit.mean[...])) <= 1
  assert ulps(np.asarray(fed.std[...]), np.asarray(fit.std[...])) <= 1
  assert np.asarray(fit.std[...])[4] > 0   # the constant channel got the floor, in both


def test_parts_combine_to_the_whole_in_any_split():
  """Two 'processes' with their own rows, gathered as arrays: the moments of all rows together."""
  x = features(3, n=31)
  whole = streamed(x, 0)
  a, b = streamed(x[0::2], 1), streamed(x[1::2], 2)
  both = Moments.combine(np.stack([a.to_array(), b.to_array()]))
  assert both.count == whole.count
  np.testing.assert_allclose(both.mean, whole.mean, rtol=1e-12, atol=0)
  np.testing.assert_allclose(both.std, whole.std, rtol=1e-9, atol=1e-300)
  assert Moments.combine([Moments(6), a]).count == a.count   # a process without rows adds nothing
  with pytest.raises(ValueError, match='channels'):
    Moments(5).add(x)
  with pytest.raises(ValueError, match='no rows'):
    _ = Moments(6).std
