"""Test set-up: 8 fake CPU devices and a compilation cache (set before JAX starts), and a shared weight
cache."""
import atexit
import os
import pathlib
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# JAX's persistent compilation cache, one folder for the whole session: pytest-xdist's workers inherit
# the controller's environment, and every CLI run a test starts inherits theirs, so a program compiled
# once is loaded from disk by every later process (the same executable: the same numbers). A tiny
# train_and_eval through the CLI takes 11 s instead of 19 s with it. Removed when the session ends.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix='adtr_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')   # cache every program

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  """../shared/data beside the repo, or $ADTR_SHARED_DATA."""
  return pathlib.Path(os.environ.get('ADTR_SHARED_DATA', REPO.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data():
  path = shared_data_dir()
  if not path.is_dir():
    pytest.skip(f'real data folder {path} is missing (set ADTR_SHARED_DATA)')
  return path


def _texture(rng, size: int):
  """A smooth striped texture with noise, [size, size] uint8: 'normal' images of the toy category."""
  y, x = np.mgrid[0:size, 0:size] / size
  phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(5, 7)
  img = 0.5 + 0.25 * np.sin(2 * np.pi * freq * (x + 0.3 * y) + phase)
  return np.clip((img + rng.normal(0, 0.03, img.shape)) * 255, 0, 255).astype(np.uint8)


def make_toy_mvtec(root: pathlib.Path, n_train=18, n_good=4, n_bad=4, size=64, seed=0):
  """A small MVTec-layout category 'toy' with striped normals and dark-square defects (with masks)."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  cat = root / 'toy'
  for sub in ('train/good', 'test/good', 'test/square', 'ground_truth/square'):
    (cat / sub).mkdir(parents=True, exist_ok=True)
  for i in range(n_train):
    Image.fromarray(_texture(rng, size)).save(cat / 'train/good' / f'{i:03d}.png')
  for i in range(n_good):
    Image.fromarray(_texture(rng, size)).save(cat / 'test/good' / f'{i:03d}.png')
  for i in range(n_bad):
    img, mask = _texture(rng, size), np.zeros((size, size), np.uint8)
    r, c = rng.integers(8, size - 24, 2)
    img[r:r + 16, c:c + 16] = 20
    mask[r:r + 16, c:c + 16] = 255
    Image.fromarray(img).save(cat / 'test/square' / f'{i:03d}.png')
    Image.fromarray(mask).save(cat / 'ground_truth/square' / f'{i:03d}_mask.png')
  return root


def make_two_toys(tmp: pathlib.Path) -> pathlib.Path:
  """A root with two toy categories: 'toy' (18 training images) and 'toy2' (26, another seed)."""
  import shutil
  root = tmp / 'data'
  make_toy_mvtec(tmp / 'a')
  make_toy_mvtec(tmp / 'b', n_train=26, seed=1)
  shutil.copytree(tmp / 'a' / 'toy', root / 'toy')
  shutil.copytree(tmp / 'b' / 'toy', root / 'toy2')
  return root


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
  return make_toy_mvtec(tmp_path_factory.mktemp('toy_mvtec'))


def tiny_config(root, cache_dir, **train):
  """A small, fast ADTR on the toy category (see tests/tiny_config.py)."""
  from tests import tiny_config as tc
  return tc.make(root, cache_dir, **train)
