"""Anomaly-aware losses (phi, L_px, L_img) and mask downsampling on hand-made inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adtr_jax import losses


def _phi_of(m):
  return np.sqrt(m * m + 1.0) - 1.0


def _features(m_map, channels=4):
  """f = 0 and f_hat with |d(i, u)| = m_map[u] in every channel (signs alternate), so phi = phi(m)."""
  m_map = jnp.asarray(m_map, jnp.float32)
  signs = jnp.array([1.0, -1.0] * (channels // 2))
  return jnp.zeros(m_map.shape + (channels,)), m_map[..., None] * signs


def _log1mexp(x):
  return float(np.log(-np.expm1(-np.float64(x))))


def test_phi_is_pseudo_huber_of_channel_mean_abs():
  f = jnp.zeros((1, 1, 2, 3))
  f_hat = f.at[0, 0, 0].set(jnp.array([1.0, -2.0, 3.0]))  # mean |d| = 2
  np.testing.assert_allclose(losses.phi(f, f_hat), [[[np.sqrt(5.0) - 1.0, 0.0]]], rtol=1e-6)
  # Small errors keep full relative precision (the naive sqrt(m^2 + 1) - 1 is 0 in float32 here).
  f, f_hat = _features([[[1e-4]]])
  np.testing.assert_allclose(losses.phi(f, f_hat), [[[5e-9]]], rtol=1e-5)


def test_log1mexp_neg_values_and_gradients():
  x = jnp.array([0.0, 1e-12, 1e-3, 0.5, np.log(2.0), 1.0, 20.0, 1e4])
  got = losses.log1mexp_neg(x)
  np.testing.assert_allclose(got[1:], [_log1mexp(v) for v in x[1:]], rtol=1e-5, atol=1e-7)
  assert np.isfinite(got[0]) and got[0] < got[1]
  grads = jax.vmap(jax.grad(losses.log1mexp_neg))(x)
  assert np.all(np.isfinite(grads))
  x64 = np.float64(x[2:])
  np.testing.assert_allclose(grads[2:], np.exp(-x64) / -np.expm1(-x64), rtol=1e-4)  # 1/(e^x - 1)


def test_downsample_mask_area_and_max():
  mask = np.zeros((1, 4, 4), bool)
  mask[0, 0, 0] = True  # 1 of 4 pixels in the top-left cell
  mask[0, 2:4, 2:4] = True  # the whole bottom-right cell
  np.testing.assert_allclose(losses.downsample_mask(mask, (2, 2)), [[[0.25, 0.0], [0.0, 1.0]]])
  np.testing.assert_allclose(losses.downsample_mask(mask, (2, 2), 'max'), [[[1.0, 0.0], [0.0, 1.0]]])
  # Non-square grids and identity.
  np.testing.assert_allclose(losses.downsample_mask(mask, (1, 2)), [[[0.125, 0.5]]])
  np.testing.assert_allclose(losses.downsample_mask(mask, (4, 4)), mask.astype(np.float32))
  with pytest.raises(ValueError, match='multiple'):
    losses.downsample_mask(mask, (3, 3))
  with pytest.raises(ValueError, match='method'):
    losses.downsample_mask(mask, (2, 2), 'min')


def test_pixel_loss_by_hand():
  m = np.array([[[1.0, 2.0], [0.0, 3.0]], [[0.5, 0.5], [0.5, 0.5]]], np.float32)
  f, f_hat = _features(m)
  y = np.array([[[0.0, 1.0], [0.0, 0.5]], np.zeros((2, 2))], np.float32)
  p = _phi_of(m.astype(np.float64))
  alpha = 0.1
  img0 = np.mean((1 - y[0]) * p[0]) - alpha * _log1mexp(np.mean(y[0] * p[0]))
  img1 = np.mean(p[1])  # normal image in a mixed batch: no anomalous term
  np.testing.assert_allclose(losses.pixel_loss(f, f_hat, y, alpha), (img0 + img1) / 2, rtol=1e-5)
  # Padding rows (weight 0) do not count.
  np.testing.assert_allclose(losses.pixel_loss(f, f_hat, y, alpha, jnp.array([1.0, 0.0])), img0,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.pixel_loss(f, f_hat, y, alpha, jnp.array([0.0, 1.0])), img1,
                             rtol=1e-5)
  with pytest.raises(ValueError, match='mask_grid'):
    losses.pixel_loss(f, f_hat, y[:, :1])


def test_pixel_loss_normal_batch_is_mean_phi():
  m = np.random.default_rng(0).uniform(0, 3, (3, 4, 4)).astype(np.float32)
  f, f_hat = _features(m)
  got = losses.pixel_loss(f, f_hat, jnp.zeros((3, 4, 4)))
  np.testing.assert_allclose(got, np.mean(_phi_of(m.astype(np.float64))), rtol=1e-5)


def test_image_loss_by_hand_topk_picks_largest():
  m = np.array([[[0.0, 4.0, 1.0], [3.0, 0.5, 2.0]]] * 2, np.float32)  # [2, 2, 3]
  f, f_hat = _features(m)
  p = np.sort(_phi_of(m[0].astype(np.float64)).ravel())[::-1]
  q2 = np.mean(p[:2])  # phi(4), phi(3)
  alpha = 0.1
  want_normal, want_anom = q2, -alpha * _log1mexp(q2)
  got = losses.image_loss(f, f_hat, jnp.array([0.0, 1.0]), alpha, k=2)
  np.testing.assert_allclose(got, (want_normal + want_anom) / 2, rtol=1e-5)
  np.testing.assert_allclose(losses.image_loss(f, f_hat, jnp.array([0.0, 1.0]), alpha, 2,
                                               jnp.array([0.0, 1.0])), want_anom, rtol=1e-5)
  # k larger than h*w averages every position.
  got = losses.image_loss(f, f_hat, jnp.array([0.0, 0.0]), alpha, k=100)
  np.testing.assert_allclose(got, np.mean(p), rtol=1e-5)
  with pytest.raises(ValueError, match='labels'):
    losses.image_loss(f, f_hat, jnp.array([1.0]))


@pytest.mark.parametrize('m', [0.0, np.sqrt(2e-12), 1e4])  # phi = 0, 1e-12, ~1e4
def test_losses_and_gradients_finite_at_extremes(m):
  f, f_hat = _features(np.full((2, 2, 2), m, np.float32))
  y = jnp.zeros((2, 2, 2)).at[0, 0, 0].set(1.0)
  labels = jnp.array([1.0, 0.0])

  def total(f_hat):
    return losses.pixel_loss(f, f_hat, y) + losses.image_loss(f, f_hat, labels, k=2)

  value, grad = jax.value_and_grad(total)(f_hat)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))


def test_anomalous_term_falls_as_anomalous_error_grows():
  m = np.full((1, 2, 2), 0.3, np.float32)
  f, f_hat = _features(m)
  y = jnp.zeros((1, 2, 2)).at[0, 0, 0].set(1.0)
  anomalous = np.zeros((1, 2, 2, 4), np.float32)
  anomalous[0, 0, 0] = 1.0
  # d = f - f_hat = -f_hat: growing |f_hat| in the anomalous cell grows its error phi there.
  outward = jnp.sign(f_hat) * anomalous
  g_px = jax.grad(lambda r: losses.pixel_loss(f, r, y))(f_hat)
  assert float(jnp.sum(g_px * outward)) < 0  # the loss drops as the anomalous error grows
  normal_cells = (1 - anomalous) * jnp.sign(f_hat)
  assert float(jnp.sum(g_px * normal_cells)) > 0  # ... and rises with the normal cells' error
  g_img = jax.grad(lambda r: losses.image_loss(f, r, jnp.array([1.0]), k=1))(f_hat)
  assert float(jnp.sum(g_img * jnp.sign(f_hat))) < 0
  # The value too: a larger anomalous error gives a smaller loss.
  bigger = f_hat.at[0, 0, 0].multiply(3.0)
  assert float(losses.pixel_loss(f, bigger, y)) < float(losses.pixel_loss(f, f_hat, y))
