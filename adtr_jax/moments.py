"""Per-channel mean and standard deviation of a split's features, added batch by batch.

FeatureNorm.fit (models/adtr.py) takes every training feature at once ([N, h, w, C], plus a float32
copy and a float64 temporary). `Moments` keeps three numbers per channel instead: the count, the mean
and M2 (the sum of squared deviations from the mean), in float64. Two sets of moments combine exactly
(up to float64 rounding) by the parallel formula of Chan, Golub and LeVeque (1979):
  n = na + nb,  delta = mean_b - mean_a,  mean = mean_a + delta * nb / n,
  M2 = M2_a + M2_b + delta^2 * na * nb / n,
so batches, and the processes of a multi-host run (each adding its own rows; `to_array` /
`from_array` travel through an all-gather), give the statistics of all rows together. The std is the
population one (ddof 0), as np.std in FeatureNorm.fit.
"""
from __future__ import annotations

import numpy as np


class Moments:
  """count, mean [C] and M2 [C] (float64) of the rows [..., C] added so far."""

  def __init__(self, channels: int):
    self.count = 0
    self.mean = np.zeros(channels)
    self.m2 = np.zeros(channels)

  @property
  def channels(self) -> int:
    return len(self.mean)

  def add(self, features) -> Moments:
    """features [..., C] (any float dtype, bfloat16 included; e.g. a batch [b, h, w, C]): their rows
    join the moments. The batch's own moments take one float64 copy of the batch."""
    x = np.asarray(features)
    if x.shape[-1:] != (self.channels,):
      raise ValueError(f'features of shape {x.shape} do not end in the {self.channels} channels')
    x = x.reshape(-1, self.channels).astype(np.float64)
    if not len(x):
      return self
    batch = Moments(self.channels)
    batch.count = len(x)
    batch.mean = x.mean(axis=0)
    x -= batch.mean
    batch.m2 = np.einsum('ij,ij->j', x, x)
    return self.merge(batch)

  def merge(self, other: Moments) -> Moments:
    """Adds `other`'s rows (Chan's formula); returns self."""
    if other.channels != self.channels:
      raise ValueError(f'cannot merge moments of {other.channels} channels into {self.channels}')
    if other.count == 0:
      return self
    if self.count == 0:
      self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
      return self
    n = self.count + other.count
    delta = other.mean - self.mean
    self.mean = self.mean + delta * (other.count / n)
    self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
    self.count = n
    return self

  @property
  def std(self) -> np.ndarray:
    """[C] float64: the population standard deviation (np.std's ddof=0)."""
    if self.count == 0:
      raise ValueError('no rows were added: the moments have no std')
    return np.sqrt(self.m2 / self.count)

  def to_array(self) -> np.ndarray:
    """float64 [2C + 1]: (count, mean, M2), for an all-gather across processes."""
    return np.concatenate([[float(self.count)], self.mean, self.m2])

  @classmethod
  def from_array(cls, a) -> Moments:
    """The inverse of to_array: a [2C + 1]."""
    a = np.asarray(a, np.float64)
    out = cls((len(a) - 1) // 2)
    out.count, out.mean, out.m2 = int(a[0]), a[1:out.channels + 1].copy(), a[out.channels + 1:].copy()
    return out

  @classmethod
  def combine(cls, parts) -> Moments:
    """The moments of every part's rows together: parts is a sequence of Moments or of to_array()s
    ([P, 2C + 1], e.g. gathered from the processes), merged in their order."""
    parts = [p if isinstance(p, Moments) else cls.from_array(p) for p in parts]
    out = cls(parts[0].channels)
    for p in parts:
      out.merge(p)
    return out
