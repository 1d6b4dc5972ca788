"""Training losses. Features are channels-last: f, f_hat [B, H, W, C]."""
import jax
import jax.numpy as jnp


def feature_error(features: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Squared reconstruction error per position: ||f(:,u) - f_hat(:,u)||^2 as [B, H, W]."""
  return jnp.sum(jnp.square(features - reconstruction), axis=-1)


def _weighted_mean(per_image: jax.Array, weights: jax.Array | None) -> jax.Array:
  """[B] -> scalar: the mean over images, or the mean weighted by `weights` [B] (0 for padding rows).
  Every loss here averages its batch this way."""
  if weights is None:
    return jnp.mean(per_image)
  return jnp.sum(per_image * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def normal_loss(features: jax.Array, reconstruction: jax.Array,
                weights: jax.Array | None = None) -> jax.Array:
  """The paper's L_norm = (1/HW) ||f - f_hat||^2 per image, averaged over the batch.

  Args:
    features, reconstruction: [B, H, W, C].
    weights: optional [B] per-image weights (0 for padding rows); the mean is taken over their sum.
  Returns:
    a scalar.
  """
  return _weighted_mean(jnp.mean(feature_error(features, reconstruction), axis=(1, 2)), weights)


# ---- Anomaly-aware losses (paper Sec. 3.3): used when pixel masks or image labels of anomalies exist.

DOWNSAMPLE_METHODS = ('area', 'max')


def phi(features: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Pseudo-Huber error per position, phi(u) = sqrt(m(u)^2 + 1) - 1 with m(u) = mean_i |d(i, u)|.

  Args:
    features, reconstruction: [B, H, W, C].
  Returns:
    [B, H, W], >= 0.
  """
  m = jnp.mean(jnp.abs(features - reconstruction), axis=-1)
  # m^2 / (sqrt(m^2 + 1) + 1) is the same value without the cancellation of sqrt(..) - 1 at small m,
  # where the anomalous term's log(1 - exp(-phi)) needs phi to full relative precision.
  m2 = jnp.square(m)
  return m2 / (jnp.sqrt(m2 + 1.0) + 1.0)


def log1mexp_neg(x: jax.Array) -> jax.Array:
  """log(1 - exp(-x)) for x >= 0, stable at both ends, with finite gradients everywhere.

  x is clamped below at sqrt(finfo.tiny) (~1e-19 in float32), so x = 0 gives a large negative but
  finite value (~-44) and gradient 1/x stays representable. Any shape; float dtype kept (ints -> f32).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  x = jnp.maximum(x, jnp.sqrt(jnp.finfo(x.dtype).tiny).astype(x.dtype))
  log2 = jnp.asarray(jnp.log(2.0), x.dtype)
  small = x < log2
  # expm1 keeps 1 - exp(-x) precise for small x, log1p keeps the log precise for large x. jnp.where
  # differentiates both branches, so each gets an input inside its own safe range.
  x_small = jnp.where(small, x, log2)
  x_large = jnp.where(small, log2, x)
  return jnp.where(small, jnp.log(-jnp.expm1(-x_small)), jnp.log1p(-jnp.exp(-x_large)))


def downsample_mask(mask: jax.Array, grid: tuple[int, int], method: str = 'area') -> jax.Array:
  """Pixel masks to the feature grid: [B, S, S'] (bool or [0, 1]) -> float [B, h, w] in [0, 1].

  'area' (default): fraction of anomalous pixels in each cell (mean over exact S/h x S'/w blocks), so
  pixel_loss then trains on soft labels y in [0, 1]; 'max': 1 where the cell holds any anomalous pixel.
  S must be a multiple of h and S' of w.
  """
  if method not in DOWNSAMPLE_METHODS:
    raise ValueError(f'losses.downsample_mask: method {method!r} is not one of {DOWNSAMPLE_METHODS}')
  b, s_h, s_w = mask.shape
  h, w = grid
  if s_h % h or s_w % w:
    raise ValueError(f'losses.downsample_mask: mask size {s_h}x{s_w} is not a multiple of the '
                     f'feature grid {h}x{w}')
  blocks = jnp.asarray(mask, jnp.float32).reshape(b, h, s_h // h, w, s_w // w)
  return jnp.mean(blocks, axis=(2, 4)) if method == 'area' else jnp.max(blocks, axis=(2, 4))


def pixel_loss(features: jax.Array, reconstruction: jax.Array, mask_grid: jax.Array,
               alpha: float = 0.003, weights: jax.Array | None = None) -> jax.Array:
  """The paper's L_px with pixel labels, per image, averaged over the batch.

  L_px = mean_u (1 - y(u)) phi(u) - alpha * log(1 - exp(-mean_u y(u) phi(u))); the second (anomalous)
  term is only added for images with some y > 0, so normal images in a mixed batch give mean phi.

  Args:
    features, reconstruction: [B, h, w, C].
    mask_grid: [B, h, w] labels y in [0, 1] (see downsample_mask).
    alpha: weight of the anomalous term.
    weights: optional [B] per-image weights (0 for padding rows).
  Returns:
    a scalar.
  """
  p = phi(features, reconstruction)
  if mask_grid.shape != p.shape:
    raise ValueError(f'losses.pixel_loss: mask_grid shape {mask_grid.shape} != feature grid {p.shape}')
  y = jnp.asarray(mask_grid, p.dtype)
  normal = jnp.mean((1.0 - y) * p, axis=(1, 2))
  has_anomaly = jnp.any(y > 0, axis=(1, 2))
  # Normal images see a safe stand-in (1.0): log(1 - exp(-0)) is the clamped extreme, and jnp.where
  # would still carry its gradient.
  anomalous = jnp.where(has_anomaly, jnp.mean(y * p, axis=(1, 2)), 1.0)
  per_image = normal - alpha * jnp.where(has_anomaly, log1mexp_neg(anomalous), 0.0)
  return _weighted_mean(per_image, weights)


def image_loss(features: jax.Array, reconstruction: jax.Array, labels: jax.Array,
               alpha: float = 0.003, k: int = 20, weights: jax.Array | None = None) -> jax.Array:
  """The paper's L_img with image labels, per image, averaged over the batch.

  q = mean of the k largest phi(u) of an image (k clipped to h*w);
  L_img = (1 - y) q - alpha * y * log(1 - exp(-q)).

  Args:
    features, reconstruction: [B, h, w, C].
    labels: [B] y in {0, 1} (1 = anomalous).
    alpha: weight of the anomalous term; k: how many positions q averages.
    weights: optional [B] per-image weights (0 for padding rows).
  Returns:
    a scalar.
  """
  p = phi(features, reconstruction)
  b = p.shape[0]
  if k < 1:
    raise ValueError(f'losses.image_loss: k must be >= 1, got {k}')
  if labels.shape != (b,):
    raise ValueError(f'losses.image_loss: labels shape {labels.shape} != ({b},)')
  q = jnp.mean(jax.lax.top_k(p.reshape(b, -1), min(k, p.shape[1] * p.shape[2]))[0], axis=-1)
  y = jnp.asarray(labels, p.dtype)
  return _weighted_mean((1.0 - y) * q - alpha * y * log1mexp_neg(q), weights)
