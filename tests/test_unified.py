"""The unified setting: one model on the normal images of several categories, evaluated per category."""
import json
import shutil

import pytest

from adtr_jax import errors, train
from adtr_jax.data import datasets
from tests.conftest import make_toy_mvtec, tiny_config


def test_concat_reads_each_source_in_turn():
  joined = datasets.Concat([[{'i': 0}, {'i': 1}], [], [{'i': 2}]])
  assert len(joined) == 3 and [joined[k]['i'] for k in range(3)] == [0, 1, 2]
  with pytest.raises(IndexError):
    joined[3]


@pytest.fixture(scope='module')
def two_categories(toy_root, tmp_path_factory):
  """toy_root's 'toy' plus a second toy category 'toy2' (another seed) in one root."""
  root = tmp_path_factory.mktemp('two')
  shutil.copytree(toy_root / 'toy', root / 'toy')
  other = make_toy_mvtec(tmp_path_factory.mktemp('other'), seed=1)
  shutil.copytree(other / 'toy', root / 'toy2')
  return root


@pytest.mark.slow
def test_unified_model_is_trained_once_and_evaluated_per_category(two_categories, tmp_path):
  config = tiny_config(two_categories, tmp_path / 'cache', num_epochs=20)
  config.dataset.category = 'toy,toy2'
  config.dataset.unified = True
  data = datasets.load_unified(config)
  per_category = [len(datasets.load_category(config, c).train) for c in ('toy', 'toy2')]
  assert len(data.train) == sum(per_category) and data.test is None
  report = train.train_and_evaluate(config, tmp_path / 'w')
  assert [s['category'] for s in report['train']] == ['unified']
  assert (tmp_path / 'w' / 'unified' / 'checkpoints').is_dir()
  assert not (tmp_path / 'w' / 'toy' / 'checkpoints').exists()
  saved = json.loads((tmp_path / 'w' / 'metrics.json').read_text())
  assert set(saved['categories']) == {'toy', 'toy2'}
  for name, values in saved['categories'].items():
    assert values['image_auroc'] >= 0.9, name    # the toy defects stand out for both categories
    assert (tmp_path / 'w' / name / 'heatmaps').is_dir()
  assert saved['mean']['image_auroc'] == pytest.approx(
      (saved['categories']['toy']['image_auroc'] + saved['categories']['toy2']['image_auroc']) / 2)


def test_unified_refuses_anomaly_training(two_categories, tmp_path):
  config = tiny_config(two_categories, tmp_path / 'cache')
  config.dataset.update(category='toy,toy2', unified=True)
  config.anomalies.synthetic = 'confetti'
  config.loss.type = 'pixel'
  with pytest.raises(errors.ConfigError, match='dataset.unified=True trains on normal images only'):
    datasets.load_unified(config)
