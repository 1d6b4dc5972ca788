"""adtr_jax.maps_io: the resize back to the original size, TIFF maps, layouts, MVTec AD 2's submission tree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image

from adtr_jax import errors, maps_io, protocols


@pytest.mark.parametrize('src,dst', [((14, 14), (375, 265)), ((224, 224), (596, 260)), ((8, 8), (5, 3)),
                                     ((3, 5), (3, 5))])
def test_resize_map_is_the_projects_bilinear(src, dst):
  """Half-pixel centres, edge-clamped, no antialiasing: jax.image.resize('bilinear', antialias=False),
  which scoring.upsample_matrix uses, up to float32 rounding."""
  m = np.random.default_rng(0).standard_normal(src)
  got = maps_io.resize_map(m, dst)
  assert got.shape == dst and got.dtype == np.float32
  with jax.enable_x64(True):
    want = np.asarray(jax.image.resize(jnp.asarray(m, jnp.float64), dst, 'bilinear', antialias=False))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert m.min() - 1e-6 <= got.min() and got.max() <= m.max() + 1e-6
  np.testing.assert_array_equal(maps_io.resize_map(np.full(src, 2.5), dst), np.full(dst, 2.5, np.float32))


def test_resize_map_keeps_a_linear_ramp_inside():
  """A ramp in x stays a ramp at the new pixel centres (away from the clamped half-pixel borders)."""
  m = np.tile(np.arange(10.0), (4, 1))  # [4, 10], value = column index
  got = maps_io.resize_map(m, (8, 40))  # x4 in width
  x = (np.arange(40) + 0.5) / 4 - 0.5
  inside = (x >= 0) & (x <= 9)
  np.testing.assert_allclose(got[3, inside], x[inside], atol=1e-6)


def test_tiffs_round_trip(tmp_path):
  m = np.random.default_rng(1).standard_normal((13, 7)).astype(np.float32) * 100
  p32 = maps_io.write_tiff(tmp_path / 'a' / 'x.tiff', m)
  back = tifffile.imread(p32)  # what the official evaluators call
  assert back.dtype == np.float32 and np.array_equal(back, m)
  p16 = maps_io.write_tiff(tmp_path / 'y.tiff', m, np.float16)
  back = maps_io.read_tiff(p16)
  assert back.dtype == np.float16 and np.array_equal(back, m.astype(np.float16))
  with pytest.raises(ValueError, match='overflow float16'):
    maps_io.write_tiff(tmp_path / 'z.tiff', m * 1000, np.float16)
  with pytest.raises(ValueError, match=r'\[H, W\]'):
    maps_io.write_tiff(tmp_path / 'z.tiff', m[None])
  with pytest.raises(ValueError, match='NaN'):
    maps_io.write_tiff(tmp_path / 'z.tiff', np.full((2, 2), np.nan))
  tifffile.imwrite(tmp_path / 'rgb.tiff', np.zeros((4, 4, 3), np.float32), photometric='rgb')
  with pytest.raises(errors.DataError, match='single-channel'):
    maps_io.read_tiff(tmp_path / 'rgb.tiff')


def test_maps_are_written_at_each_original_size_in_the_evaluators_layout(tmp_path):
  rels = ['pushpins/test/good/000.png', 'pushpins/test/logical_anomalies/003.png',
          'can/test_public/bad/001_overexposed.png']
  sizes = [(30, 20), (11, 40), (7, 7)]
  maps = np.random.default_rng(2).random((3, 6, 6)).astype(np.float32)
  paths = maps_io.write_maps(tmp_path, rels, maps, sizes)
  assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
      'pushpins/test/good/000.tiff', 'pushpins/test/logical_anomalies/003.tiff',
      'can/test_public/bad/001_overexposed.tiff']
  for p, m, size in zip(paths, maps, sizes):
    back = tifffile.imread(p)
    assert back.shape == size and np.array_equal(back, maps_io.resize_map(m, size))
  with pytest.raises(ValueError, match='relative to the benchmark root'):
    maps_io.map_path(tmp_path, '/abs/000.png')
  with pytest.raises(ValueError, match='3 paths, 2 maps'):
    maps_io.write_maps(tmp_path, rels, maps[:2], sizes)


def _submission(root, obj='sheet_metal', threshold=0.5):
  n = maps_io.AD2_PRIVATE_COUNTS[obj]
  rng = np.random.default_rng(3)
  for split, suffix in maps_io.AD2_PRIVATE_SPLITS.items():
    names = [f'{i:03d}_{suffix}' for i in range(n)][::-1]  # any order
    maps = rng.random((n, 3, 4)).astype(np.float32)
    maps[-6] = threshold + 1e-5  # image 005: above the threshold in float32, equal to it in float16
    maps_io.write_ad2_submission(root, obj, split, names, maps, [(5, 6)] * n, threshold)
  return n


def test_ad2_submission_tree_passes_the_checkers_rules(tmp_path):
  n = _submission(tmp_path)
  maps_io.check_ad2_submission(tmp_path, objects=('sheet_metal',))
  for split, suffix in maps_io.AD2_PRIVATE_SPLITS.items():
    tiffs = sorted((tmp_path / 'anomaly_images' / 'sheet_metal' / split).iterdir())
    pngs = sorted((tmp_path / 'anomaly_images_thresholded' / 'sheet_metal' / split).iterdir())
    assert len(tiffs) == len(pngs) == n and tiffs[0].name == f'000_{suffix}.tiff'
    for tiff, png in zip(tiffs, pngs):  # the PNG is the float16 map the server reads, binarised
      m, b = tifffile.imread(tiff), np.asarray(Image.open(png))
      assert m.dtype == np.float16 and m.shape == b.shape == (5, 6)
      assert set(np.unique(b)) <= {0, 255} and np.array_equal(b == 255, m > 0.5)
    assert not np.asarray(Image.open(pngs[5])).any()
  with pytest.raises(errors.DataError, match='anomaly_images: missing folders'):
    maps_io.check_ad2_submission(tmp_path)  # the real checker wants all eight objects


@pytest.mark.parametrize('damage,message', [
    (lambda d: (d / 'anomaly_images_thresholded/sheet_metal/test_private/007_regular.png').unlink(),
     'missing files'),
    (lambda d: (d / 'anomaly_images/sheet_metal/test_private_mixed/notes.txt').write_text('x'),
     'unexpected entries'),
    (lambda d: tifffile.imwrite(d / 'anomaly_images/sheet_metal/test_private/003_regular.tiff',
                                np.zeros((5, 6), np.float32)), 'float16'),
    (lambda d: Image.fromarray(np.full((5, 6), 7, np.uint8)).save(
        d / 'anomaly_images_thresholded/sheet_metal/test_private/003_regular.png'), '0 and 255'),
])
def test_ad2_checks_refuse_a_damaged_tree(tmp_path, damage, message):
  _submission(tmp_path)
  damage(tmp_path)
  with pytest.raises(errors.DataError, match=message):
    maps_io.check_ad2_submission(tmp_path, objects=('sheet_metal',))


def test_ad2_submission_needs_the_checkers_names(tmp_path):
  with pytest.raises(ValueError, match='the checker wants the 142 images 000_regular..141_regular'):
    maps_io.write_ad2_submission(tmp_path, 'sheet_metal', 'test_private', ['000_regular'],
                                 np.zeros((1, 2, 2)), [(2, 2)], 0.5)
  assert not (tmp_path / 'anomaly_images').exists()
  assert protocols.binarize(np.array([[0.5, 0.6]]), 0.5).tolist() == [[0, 255]]
