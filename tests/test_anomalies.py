"""Synthetic anomaly generators: masks match the changes, seeds are deterministic, images stay valid."""
import numpy as np
import pytest
from scipy import ndimage

from adtr_jax.data import anomalies


def _noise_image(shape=(48, 64, 3), dtype=np.uint8, seed=0):
  """Random pixels, so every patch is unique and a pasted copy can be traced back to its source."""
  rng = np.random.default_rng(seed)
  if dtype == np.uint8:
    return rng.integers(0, 256, shape).astype(np.uint8)
  return rng.uniform(0, 1, shape).astype(dtype)


def _bbox_area(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def _changed(a, b):
  diff = a != b
  return diff.any(-1) if diff.ndim == 3 else diff


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_confetti_mask_is_exactly_the_pasted_squares(dtype):
  image = _noise_image(dtype=dtype)
  out, mask = anomalies.confetti(image, 7, num_squares=(3, 5), size=(4, 9))
  squares = anomalies.confetti_squares(image, 7, num_squares=(3, 5), size=(4, 9))
  assert 3 <= len(squares) <= 5
  want_image, want_mask = image.copy(), np.zeros(image.shape[:2], bool)
  for sq in squares:
    assert 4 <= sq.side <= 9
    want_image[sq.row:sq.row + sq.side, sq.col:sq.col + sq.side] = sq.colour
    want_mask[sq.row:sq.row + sq.side, sq.col:sq.col + sq.side] = True
  np.testing.assert_array_equal(out, want_image)
  np.testing.assert_array_equal(mask, want_mask)
  changed = _changed(out, image)
  assert not np.any(changed & ~mask)  # nothing outside the mask moved
  assert changed.sum() >= 0.9 * mask.sum()  # random colours rarely match the original


def test_confetti_side_is_clipped_to_small_images():
  out, mask = anomalies.confetti(np.zeros((5, 6), np.uint8), 0, num_squares=(1, 1), size=(10, 10))
  assert out.shape == (5, 6) and mask.sum() == 25


def test_cutpaste_pastes_a_rectangle_from_elsewhere():
  image = _noise_image()
  h, w = image.shape[:2]
  for seed in range(5):
    out, mask = anomalies.cutpaste(image, seed, jitter=0.0)
    assert mask.sum() == _bbox_area(mask)  # one filled rectangle
    assert 0.02 * h * w * 0.7 <= mask.sum() <= 0.15 * h * w * 1.3  # rounding of the sides
    changed = _changed(out, image)
    assert not np.any(changed & ~mask) and changed.any()
    # Without jitter the pasted pixels are an exact copy of a different rectangle of the image.
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    ph, pw = len(rows), len(cols)
    patch = out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    sources = [(r, c) for r in range(h - ph + 1) for c in range(w - pw + 1)
               if np.array_equal(image[r:r + ph, c:c + pw], patch)]
    assert len(sources) == 1 and sources[0] != (rows[0], cols[0])


def test_cutpaste_jitter_changes_colour():
  image = np.full((32, 32, 3), 128, np.uint8)
  out, mask = anomalies.cutpaste(image, 3, jitter=0.3)
  assert np.all(out[~mask] == 128) and np.any(out[mask] != 128)


def test_perlin_blend_changes_only_the_mask():
  image = _noise_image()
  texture = _noise_image(seed=1)
  out, mask = anomalies.perlin_blend(image, 4, texture=texture, opacity=(1.0, 1.0))
  assert mask.any() and not mask.all()
  np.testing.assert_array_equal(out[mask], texture[mask])
  np.testing.assert_array_equal(out[~mask], image[~mask])
  # An unreachable threshold still yields a non-empty mask (the noise peak).
  _, mask = anomalies.perlin_blend(image, 4, threshold=10.0)
  assert mask.any()
  with pytest.raises(ValueError, match='texture'):
    anomalies.perlin_blend(image, 4, texture=texture[:-1])


def test_perlin_noise_is_smooth_and_bounded():
  noise = anomalies.perlin_noise((64, 64), (4, 4), 0)
  assert noise.shape == (64, 64) and np.abs(noise).max() <= np.sqrt(0.5) + 1e-9
  assert np.abs(np.diff(noise, axis=0)).max() < 0.2 and noise.std() > 0.05


@pytest.mark.parametrize('name', sorted(anomalies.GENERATORS))
@pytest.mark.parametrize('shape,dtype', [((40, 40, 3), np.uint8), ((40, 40, 3), np.float32),
                                         ((36, 44), np.uint8), ((36, 44), np.float64)])
def test_generators_are_deterministic_and_keep_the_image_valid(name, shape, dtype):
  image = _noise_image(shape, dtype)
  before = image.copy()
  out, mask = anomalies.make_anomaly(name, image, 11)
  np.testing.assert_array_equal(image, before)  # the input is not modified
  assert out.shape == image.shape and out.dtype == image.dtype
  assert mask.shape == shape[:2] and mask.dtype == bool and mask.any()
  assert out.min() >= 0 and out.max() <= (255 if dtype == np.uint8 else 1.0)
  assert not np.any(_changed(out, image) & ~mask)
  # Same seed (int or Generator): same output; different seed: different output.
  again, again_mask = anomalies.GENERATORS[name](image, np.random.default_rng(11))
  np.testing.assert_array_equal(again, out)
  np.testing.assert_array_equal(again_mask, mask)
  other, other_mask = anomalies.make_anomaly(name, image, 12)
  assert not (np.array_equal(other, out) and np.array_equal(other_mask, mask))


def test_unknown_name_and_bad_images():
  image = _noise_image()
  with pytest.raises(ValueError, match=r"anomalies\.synthetic.*confetti, cutpaste, perlin"):
    anomalies.make_anomaly('scratch', image, 0)
  with pytest.raises(ValueError, match='dtype'):
    anomalies.make_anomaly('confetti', image.astype(np.int32), 0)
  with pytest.raises(ValueError, match='shape'):
    anomalies.make_anomaly('cutpaste', image[None], 0)
  with pytest.raises(ValueError, match='size'):
    anomalies.confetti(image, 0, size=(8, 4))


def test_training_anomalies_are_made_at_model_size(tmp_path):
  """On 1024 px source images and a 256 px model input, every synthetic anomaly is generated after
  the resize, so its size is in model pixels: confetti squares of side 4-16 (1-6 of them), CutPaste
  rectangles of 2-15% of the image. Pasting before the resize would give 1-4 px squares."""
  from adtr_jax.data import datasets
  from tests.conftest import make_toy_mvtec, tiny_config
  root = make_toy_mvtec(tmp_path / 'data', n_train=6, n_good=1, n_bad=1, size=1024)
  config = tiny_config(root, tmp_path / 'cache')
  config.dataset.image_size = 256
  config.anomalies.synthetic = 'confetti,cutpaste,perlin'
  config.anomalies.fraction = 0.75   # 3 anomalous slots per normal image: many samples
  config.loss.type = 'pixel'
  train = datasets.load_category(config, 'toy').train
  areas = {'confetti': [], 'cutpaste': [], 'perlin': []}
  for epoch in range(3):
    mixed = train.for_epoch(epoch)
    for slot in range(mixed.num_slots):
      example = mixed[len(mixed.normal) + slot]
      assert example['image'].shape == (256, 256, 3) and example['mask'].shape == (256, 256)
      kind = example['path'].split('(')[0]
      areas[kind].append(int(example['mask'].sum()))
      if kind == 'confetti':  # every square (or union of overlapping ones) spans >= 4 model pixels
        for rows, cols in ndimage.find_objects(ndimage.label(example['mask'])[0]):
          assert min(rows.stop - rows.start, cols.stop - cols.start) >= 4
  assert all(areas.values()), areas
  assert all(4 * 4 <= a <= 6 * 16 * 16 for a in areas['confetti']), areas['confetti']
  assert all(0.02 * 0.9 <= a / 256**2 <= 0.15 * 1.1 for a in areas['cutpaste']), areas['cutpaste']
  assert all(a > 0 for a in areas['perlin'])
