"""The nearest-neighbour reference and the resized-image cache."""
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from adtr_jax.baselines import nearest_neighbour as nn
from adtr_jax.data import builder, datasets, image_cache, mvtec
from tests.conftest import tiny_config


def test_reference_finds_the_toy_defects(toy_root, tmp_path):
  config = tiny_config(toy_root, tmp_path / 'cache')
  config.baseline.bank_fraction = 0.5
  report = nn.run(config, tmp_path / 'nn')
  toy = report['categories']['toy']
  assert toy['image_auroc'] >= 0.9 and toy['pixel_auroc'] >= 0.9
  assert toy['bank_size'] == round(0.5 * 16 * 8 * 8)    # 16 training images x 8x8 tokens
  assert json.loads((tmp_path / 'nn' / 'metrics.json').read_text())['method'] == 'nearest_neighbour'


def test_nearest_distance_is_the_brute_force_minimum():
  rng = np.random.default_rng(0)
  bank, q = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  got = nn.nearest_distance(jnp.asarray(bank), jnp.sum(jnp.asarray(bank) ** 2, -1), jnp.asarray(q))
  want = np.min(np.linalg.norm(q[..., None, :] - bank, axis=-1), axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_coreset_covers_better_than_random_rows():
  """Greedy k-center picks distinct rows and leaves every row closer to the bank than a random
  bank of the same size does (two far clusters: random rows miss the small one)."""
  rng = np.random.default_rng(0)
  tokens = np.concatenate([rng.normal(size=(490, 8)), 30 + rng.normal(size=(10, 8))]).astype(np.float32)
  def radius(bank):
    return float(np.max(np.min(np.linalg.norm(tokens[:, None] - bank[None], axis=-1), axis=1)))
  core = nn.subsample(tokens, 0.02, 'coreset', seed=0)
  rand = nn.subsample(tokens, 0.02, 'random', seed=0)
  assert core.shape == rand.shape == (10, 8)
  assert len(np.unique(core, axis=0)) == 10
  assert radius(core) < radius(rand)
  with pytest.raises(ValueError, match='bank_fraction'):
    nn.subsample(tokens, 0.0, 'random', 0)
  with pytest.raises(ValueError, match='baseline.subsample'):
    nn.subsample(tokens, 0.5, 'kmeans', 0)


def test_image_cache_is_written_once_and_matches_decoding(toy_root, tmp_path, monkeypatch):
  splits = builder.prepare(functools.partial(mvtec.scan_category, toy_root, 'toy'), tmp_path / 'tfds')
  first = image_cache.cached(splits['test'], 32)
  assert first.arrays['images'].dtype == np.uint8 and first.arrays['images'].shape == (8, 32, 32, 3)
  ex = first[5]
  assert ex['mask'].dtype == bool and ex['label'] == splits['test'][5]['label']
  np.testing.assert_array_equal(ex['image'], datasets.pipeline.load_resized(splits['test'], 5, 32)['image'])
  def no_decoding(*a, **k):
    raise AssertionError('decoded again')
  monkeypatch.setattr(image_cache, '_decode_all', no_decoding)
  again = image_cache.cached(splits['test'], 32)     # memory-mapped from disk
  np.testing.assert_array_equal(again.arrays['images'], first.arrays['images'])
  assert again.has_masks and again.paths == first.paths
  with pytest.raises(AssertionError, match='decoded again'):
    image_cache.cached(splits['test'], 48)           # another size is another cache
