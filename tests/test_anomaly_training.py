"""Anomaly-aware training wired end to end: config checks, few-shot split, mixtures, losses, init_from."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from adtr_jax import checkpoint, step, train
from adtr_jax.data import datasets, mixing
from tests import helpers
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def test_config_combinations_are_checked(toy_root, cache_dir):
  config = tiny_config(toy_root, cache_dir)
  config.anomalies.synthetic = 'confetti'
  with pytest.raises(ValueError, match="loss.type='mse' would train to reconstruct them"):
    datasets.load_category(config, 'toy')
  config = tiny_config(toy_root, cache_dir)
  config.loss.type = 'pixel'
  with pytest.raises(ValueError, match='needs anomalies'):
    datasets.load_category(config, 'toy')
  config.anomalies.synthetic = 'sparkles'
  with pytest.raises(ValueError, match='unknown .sparkles.'):
    datasets.load_category(config, 'toy')


def test_few_shot_labelled_anomalies_leave_the_test_split(toy_root, cache_dir):
  config = tiny_config(toy_root, cache_dir)
  config.loss.type, config.anomalies.num_labelled = 'pixel', 2
  data = datasets.load_category(config, 'toy')
  assert len(data.labelled_files) == 2 and len(data.test) == 8 - 2
  test_paths = {data.test[i]['path'] for i in range(len(data.test))}
  assert not test_paths & set(data.labelled_files)
  assert all('/test/square/' in p for p in data.labelled_files)
  again = datasets.load_category(config, 'toy')
  assert again.labelled_files == data.labelled_files  # seeded
  # The labelled anomalies appear in training with their real masks.
  mixed = data.train
  slots = [mixed[len(mixed.normal) + s] for s in range(mixed.num_slots)]
  assert {s['path'] for s in slots} <= set(data.labelled_files)
  assert all(s['label'] == 1 and s['mask'].any() for s in slots)
  config.loss.type, config.anomalies.labelled_use = 'mse', 'exclude'  # same test set, no training use
  baseline = datasets.load_category(config, 'toy')
  assert baseline.labelled_files == data.labelled_files and len(baseline.test) == 6
  assert not isinstance(baseline.train, mixing.MixedSource)
  config.anomalies.num_labelled = 4
  with pytest.raises(ValueError, match="leaves no 'square' test image"):
    datasets.load_category(config, 'toy')


def test_mixture_fraction_and_fresh_synthetic_anomalies_per_epoch(toy_root, cache_dir):
  config = tiny_config(toy_root, cache_dir)
  config.loss.type, config.anomalies.synthetic, config.anomalies.fraction = 'pixel', 'confetti', 0.2
  mixed = datasets.load_category(config, 'toy').train
  assert len(mixed.normal) == 16 and mixed.num_slots == 4  # 4 / (16 + 4) = 0.2
  assert mixed[0]['label'] == 0
  a0, a0_again = mixed.for_epoch(0)[16], mixed.for_epoch(0)[16]
  a1 = mixed.for_epoch(1)[16]
  np.testing.assert_array_equal(a0['image'], a0_again['image'])
  assert a0['label'] == 1 and a0['mask'].any()
  assert not np.array_equal(a0['mask'], a1['mask'])


def test_external_images_are_whole_image_anomalies(toy_root, cache_dir):
  config = tiny_config(toy_root, cache_dir)
  config.loss.type = 'image'
  config.anomalies.external_dir = str(toy_root / 'toy' / 'test' / 'square')
  mixed = datasets.load_category(config, 'toy').train
  ex = mixed[len(mixed.normal)]
  assert ex['label'] == 1 and ex['mask'].all() and '/test/square/' in ex['path']


def test_make_loss_uses_masks_or_labels():
  f = jnp.ones((2, 4, 4, 3))
  f_hat = jnp.zeros_like(f)
  mask = np.zeros((2, 16, 16), np.float32)
  mask[1, :8, :8] = 1
  batch = {'mask': jnp.asarray(mask), 'label': jnp.array([0, 1]), 'valid': jnp.array([True, True])}
  cfg = tiny_config('/x', '/y').loss
  for kind in ('pixel', 'image'):
    cfg.type = kind
    value = step.make_loss(cfg)(f, f_hat, batch)
    assert np.isfinite(float(value))
  cfg.type = 'pixel'
  # Only the normal image: exactly its mean phi (phi of |d| = 1 is sqrt(2) - 1).
  normal = {k: v[:1] for k, v in batch.items()}
  np.testing.assert_allclose(step.make_loss(cfg)(f[:1], f_hat[:1], normal), np.sqrt(2) - 1, rtol=1e-5)


@pytest.mark.slow
def test_init_from_a_normal_run_then_pixel_loss_with_synthetic_anomalies(toy_root, cache_dir, tmp_path):
  normal_dir = tmp_path / 'normal'
  train.train_and_evaluate(tiny_config(toy_root, cache_dir, num_epochs=2), normal_dir, evaluate_after=False)
  config = tiny_config(toy_root, cache_dir, num_epochs=2)
  config.loss.type, config.anomalies.synthetic = 'pixel', 'confetti,cutpaste'
  config.anomalies.num_labelled = 1
  config.init_from = str(normal_dir)
  report = train.train_and_evaluate(config, tmp_path / 'aware')
  log = [json.loads(line) for line in (tmp_path / 'aware' / 'toy' / 'train_log.jsonl').open()]
  assert all(np.isfinite(r['loss']) for r in log if 'loss' in r)
  toy = report['eval']['categories']['toy']
  assert len(toy['labelled_anomalies_removed_from_test']) == 1 and toy['labelled_use'] == 'train'
  assert toy['num_test_images'] == 7
  mgr = checkpoint.manager(tmp_path / 'aware' / 'toy' / 'checkpoints')
  assert mgr.latest_step() == report['train'][0]['steps']
  assert [r['step'] for r in log] == list(range(1, mgr.latest_step() + 1))   # a fresh step count
  # init_from takes the normal run's weights: at a learning rate of 1e-30 they stay as they were.
  frozen_lr = config.copy_and_resolve_references()
  frozen_lr.train.learning_rate = 1e-30   # > 0 (validated), and far below float32 resolution
  train.train_and_evaluate(frozen_lr, tmp_path / 'lr0', evaluate_after=False)
  _, started, _ = helpers.params(config, tmp_path / 'lr0' / 'toy')
  _, normal_params, _ = helpers.params(config, normal_dir / 'toy')
  assert helpers.max_diff(started, normal_params) == 0.0
  paths = mixing.save_examples(datasets.load_category(config, 'toy').train, tmp_path / 'show', 64, n=3)
  assert len(paths) == 3
