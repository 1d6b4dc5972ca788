"""Anomaly scores from the reconstruction difference d = f - f_hat."""
import jax
import jax.numpy as jnp

from adtr_jax import errors

IMAGE_SCORES = ('max_avgpool', 'mean', 'topk_mean')


def feature_score_map(features: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """s(u) = ||d(:, u)||_2 on the feature grid: [B, h, w, C] x2 -> [B, h, w]."""
  return jnp.sqrt(jnp.sum(jnp.square(features - reconstruction), axis=-1))


def gaussian_kernel1d(sigma: float) -> jax.Array:
  """A normalised 1-D Gaussian truncated at 4 sigma."""
  radius = max(int(4.0 * sigma + 0.5), 1)
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * jnp.square(x / sigma))
  return k / jnp.sum(k)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian smoothing of [B, H, W] maps with edge ('nearest') padding."""
  k = gaussian_kernel1d(sigma)
  r = (k.shape[0] - 1) // 2
  x = jnp.pad(maps, ((0, 0), (r, r), (r, r)), mode='edge')[..., None]
  dn = ('NHWC', 'HWIO', 'NHWC')
  x = jax.lax.conv_general_dilated(x, k.reshape(-1, 1, 1, 1), (1, 1), 'VALID', dimension_numbers=dn)
  x = jax.lax.conv_general_dilated(x, k.reshape(1, -1, 1, 1), (1, 1), 'VALID', dimension_numbers=dn)
  return x[..., 0]


def upsample_map(s: jax.Array, image_size: int, gaussian_sigma: float = 0.0) -> jax.Array:
  """A score map on the feature grid [B, h, w] -> [B, S, S] (bilinear upsampling, optional blur)."""
  s = jax.image.resize(s, (s.shape[0], image_size, image_size), method='bilinear')
  return gaussian_blur(s, gaussian_sigma) if gaussian_sigma > 0 else s


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
