"""Anomaly scores from the reconstruction difference d = f - f_hat."""
import jax
import jax.numpy as jnp
import numpy as np

from adtr_jax import errors

IMAGE_SCORES = ('max_avgpool', 'mean', 'topk_mean')


def feature_score_map(features: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """s(u) = ||d(:, u)||_2 on the feature grid: [B, h, w, C] x2 -> [B, h, w]."""
  return jnp.sqrt(jnp.sum(jnp.square(features - reconstruction), axis=-1))


def gaussian_kernel1d(sigma: float) -> np.ndarray:
  """A normalised 1-D Gaussian truncated at 4 sigma (float32; numpy, so it is a constant under jit)."""
  radius = max(int(4.0 * sigma + 0.5), 1)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * np.square(x / sigma))
  return (k / np.sum(k)).astype(np.float32)


def blur_matrix(size: int, sigma: float) -> np.ndarray:
  """[size, size]: the 1-D Gaussian blur of a length-`size` axis with edge ('nearest') padding, as a
  matrix: row i holds the kernel's taps, those beyond either end added to the end element."""
  k = gaussian_kernel1d(sigma)
  r = (len(k) - 1) // 2
  rows = np.repeat(np.arange(size), len(k))
  cols = np.clip(rows + np.tile(np.arange(-r, r + 1), size), 0, size - 1)
  m = np.zeros((size, size), np.float32)
  np.add.at(m, (rows, cols), np.tile(k, size))
  return m


def upsample_matrix(n: int, size: int, gaussian_sigma: float = 0.0) -> jax.Array:
  """[size, n]: bilinear upsampling of a length-n axis to `size` (jax.image.resize's, applied to the
  identity), then the optional edge-padded blur, composed into one matrix. antialias only widens the
  kernel when downsampling, so it is off: the same numbers, and an op jax2onnx converts (export.py)."""
  m = jax.image.resize(jnp.eye(n, dtype=jnp.float32), (size, n), method='bilinear', antialias=False)
  if gaussian_sigma > 0:
    m = jnp.matmul(blur_matrix(size, gaussian_sigma), m, precision=jax.lax.Precision.HIGHEST)
  return m


def upsample_map(s: jax.Array, image_size: int, gaussian_sigma: float = 0.0) -> jax.Array:
  """A score map on the feature grid [B, h, w] -> [B, S, S]: bilinear upsampling, optional blur.

  Both steps are linear and act on rows and columns separately, so the map is A_h s A_w^T with the
  [S, h] and [S, w] matrices of upsample_matrix: two small matmuls, where a single-channel 33-tap
  convolution of the [S, S] map is far slower on XLA:CPU (BENCHMARKS.md).
  """
  rows = upsample_matrix(s.shape[1], image_size, gaussian_sigma)
  cols = upsample_matrix(s.shape[2], image_size, gaussian_sigma)
  return jnp.einsum('yi,bij,xj->byx', rows, s, cols, precision=jax.lax.Precision.HIGHEST)


def pixel_score_map(features: jax.Array, reconstruction: jax.Array, image_size: int,
                    gaussian_sigma: float = 0.0) -> jax.Array:
  """Score map at input resolution: [B, h, w, C] x2 -> [B, S, S] (see upsample_map)."""
  return upsample_map(feature_score_map(features, reconstruction), image_size, gaussian_sigma)


def image_score(maps: jax.Array, method: str = 'max_avgpool', avgpool_size: int = 16,
                topk: int = 100) -> jax.Array:
  """Image scores from score maps [B, S, S] -> [B].

  'max_avgpool': max of the k x k (stride 1, valid) average-pooled map, robust to single hot pixels;
  'mean': the map's mean (the paper's choice for CIFAR-10); 'topk_mean': mean of the k highest values.
  """
  if method == 'max_avgpool':
    k = min(avgpool_size, maps.shape[1], maps.shape[2])
    pooled = jax.lax.reduce_window(maps, 0.0, jax.lax.add, (1, k, k), (1, 1, 1), 'VALID') / (k * k)
    return jnp.max(pooled, axis=(1, 2))
  if method == 'mean':
    return jnp.mean(maps, axis=(1, 2))
  if method == 'topk_mean':
    flat = maps.reshape(maps.shape[0], -1)
    return jnp.mean(jax.lax.top_k(flat, min(topk, flat.shape[1]))[0], axis=-1)
  raise errors.ConfigError(f'scoring.image_score={method!r} is not one of {IMAGE_SCORES}')
