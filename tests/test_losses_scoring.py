"""L_norm and the score functions on hand-made inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adtr_jax import losses, scoring


def test_normal_loss_is_channel_sum_mean_over_positions():
  f = jnp.zeros((2, 2, 2, 3))
  f_hat = f.at[0, 0, 0].set(jnp.array([1.0, 2.0, 2.0]))  # squared norm 9 at one of 4 positions
  np.testing.assert_allclose(losses.normal_loss(f, f_hat), (9 / 4 + 0) / 2, rtol=1e-6)
  # Padding rows (weight 0) do not count.
  np.testing.assert_allclose(losses.normal_loss(f, f_hat, jnp.array([1.0, 0.0])), 9 / 4, rtol=1e-6)


def test_feature_score_map_is_l2_norm():
  f = jnp.zeros((1, 2, 2, 2))
  f_hat = f.at[0, 1, 0].set(jnp.array([3.0, 4.0]))
  np.testing.assert_allclose(scoring.feature_score_map(f, f_hat)[0], [[0, 0], [5, 0]])


def test_pixel_score_map_upsamples_and_blur_preserves_mass():
  f = jnp.zeros((1, 4, 4, 1))
  f_hat = f.at[0, 1, 2, 0].set(1.0)
  sharp = scoring.pixel_score_map(f, f_hat, 32)
  smooth = scoring.pixel_score_map(f, f_hat, 32, gaussian_sigma=2.0)
  assert sharp.shape == smooth.shape == (1, 32, 32)
  # The peak sits in the upsampled cell of feature position (row 1, col 2).
  r, c = np.unravel_index(int(jnp.argmax(sharp[0])), (32, 32))
  assert 8 <= r < 16 and 16 <= c < 24
  assert float(smooth.max()) < float(sharp.max())
  np.testing.assert_allclose(float(smooth.sum()), float(sharp.sum()), rtol=1e-3)


def test_image_scores():
  maps = jnp.zeros((2, 8, 8)).at[0, 0, 0].set(16.0).at[1, 2:6, 2:6].set(1.0)
  # A single hot pixel is diluted by 4x4 average pooling; a 4x4 blob is not.
  np.testing.assert_allclose(scoring.image_score(maps, 'max_avgpool', 4), [1.0, 1.0])
  np.testing.assert_allclose(scoring.image_score(maps, 'mean'), [16 / 64, 16 / 64])
  np.testing.assert_allclose(scoring.image_score(maps, 'topk_mean', topk=2), [8.0, 1.0])
  with pytest.raises(ValueError, match='scoring.image_score'):
    scoring.image_score(maps, 'median')


def test_gaussian_kernel_normalised():
  k = scoring.gaussian_kernel1d(4.0)
  assert k.shape == (33,)
  np.testing.assert_allclose(float(k.sum()), 1.0, rtol=1e-6)
  assert int(jnp.argmax(k)) == 16


@pytest.mark.parametrize('h, w, size, sigma', [(3, 5, 20, 1.5), (4, 4, 8, 4.0), (2, 3, 12, 0.0)])
def test_upsample_map_equals_resize_then_edge_padded_blur(h, w, size, sigma):
  # The matrix form against the two steps done directly: jax.image.resize, then a separable
  # Gaussian over an edge-padded copy (the kernel wider than the map in the second case).
  s = np.random.default_rng(0).random((2, h, w)).astype(np.float32)
  want = np.asarray(jax.image.resize(jnp.asarray(s), (2, size, size), method='bilinear'))
  if sigma > 0:
    k = scoring.gaussian_kernel1d(sigma)
    r = (len(k) - 1) // 2
    padded = np.pad(want, ((0, 0), (r, r), (r, r)), mode='edge')
    rows = np.stack([np.convolve(padded[b, :, x], k, mode='valid') for b in range(2)
                     for x in range(padded.shape[2])]).reshape(2, padded.shape[2], size).transpose(0, 2, 1)
    want = np.stack([np.convolve(rows[b, y], k, mode='valid') for b in range(2)
                     for y in range(size)]).reshape(2, size, size)
  got = scoring.upsample_map(jnp.asarray(s), size, sigma)
  assert got.shape == (2, size, size)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
