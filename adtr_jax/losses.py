"""Training losses. Features are channels-last: f, f_hat [B, H, W, C]."""
import jax
import jax.numpy as jnp


def feature_error(features: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Squared reconstruction error per position: ||f(:,u) - f_hat(:,u)||^2 as [B, H, W]."""
  return jnp.sum(jnp.square(features - reconstruction), axis=-1)


def normal_loss(features: jax.Array, reconstruction: jax.Array,
                weights: jax.Array | None = None) -> jax.Array:
  """The paper's L_norm = (1/HW) ||f - f_hat||^2 per image, averaged over the batch.

  Args:
    features, reconstruction: [B, H, W, C].
    weights: optional [B] per-image weights (0 for padding rows); the mean is taken over their sum.
  Returns:
    a scalar.
  """
  per_image = jnp.mean(feature_error(features, reconstruction), axis=(1, 2))
  if weights is None:
    return jnp.mean(per_image)
  return jnp.sum(per_image * weights) / jnp.maximum(jnp.sum(weights), 1.0)
