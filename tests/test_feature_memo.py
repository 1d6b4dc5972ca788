"""The evaluation feature memo: scoring images again reuses their backbone features, and only theirs."""
import jax
import numpy as np
import pytest

from adtr_jax import feature_cache, inference, sharding, train_state
from adtr_jax.data import datasets, pipeline
from adtr_jax.models.adtr import SplitModel, build_model
from tests import helpers
from tests.conftest import tiny_config


class Recorder(feature_cache.Embedder):
  """An Embedder that keeps itself in `made`, to read its hit counts after a pass."""
  made = []

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    Recorder.made.append(self)


@pytest.fixture
def setup(toy_root, tmp_path, monkeypatch):
  monkeypatch.setattr(feature_cache, 'MEMO', feature_cache.Memo())   # no rows from other tests
  monkeypatch.setattr(feature_cache, 'Embedder', Recorder)
  Recorder.made = []
  config = tiny_config(toy_root, tmp_path / 'cache')
  split = datasets.load_category(config, 'toy').train   # 16 images after the hold-out: 2 batches of 8
  model, _ = build_model(config)  # untrained: its scores still differ from image to image
  graphdef, state, frozen = train_state.init_state(model, config.train)
  return config, split, graphdef, state.params, frozen, sharding.make_mesh()


def _score(config, source, graphdef, params, frozen, mesh):
  result = helpers.score_rows(config, source, SplitModel(graphdef, params, frozen), mesh, 'memo split')
  return result, Recorder.made[-1]


def test_second_pass_skips_the_backbone_and_scores_the_same(setup):
  config, split, graphdef, params, frozen, mesh = setup
  first, e1 = _score(config, split, graphdef, params, frozen, mesh)
  second, e2 = _score(config, split, graphdef, params, frozen, mesh)
  assert e1.hits == 0 and e1.calls == pipeline.num_batches(len(split), 8, drop_remainder=False)
  assert e2.hits == e2.calls == e1.calls   # every batch from the memo
  for key in ('maps', 'scores', 'labels', 'index'):
    np.testing.assert_array_equal(second[key], first[key])
  # Both equal the fused forward pass (backbone and reconstructor in one jitted function).
  images = np.stack([split[i]['image'] for i in range(len(split))])
  maps, scores = jax.jit(lambda p, f, x: inference.score_fn(
      p, f, x, graphdef=graphdef, scoring_cfg=config.scoring, image_size=64))(params, frozen, images)
  np.testing.assert_allclose(second['scores'], scores, rtol=1e-5)
  np.testing.assert_allclose(second['maps'], maps, rtol=1e-5, atol=1e-6)


def test_another_backbone_or_new_images_miss(setup):
  config, split, graphdef, params, frozen, mesh = setup
  first, _ = _score(config, split, graphdef, params, frozen, mesh)
  # Other frozen weights, same images: the memo must not answer (the features would be wrong).
  other = jax.tree.map(lambda x: x * 1.5 if x.dtype == np.float32 else x, frozen)
  changed, e = _score(config, split, graphdef, params, other, mesh)
  assert e.hits == 0
  assert not np.allclose(changed['scores'], first['scores'])
  # One new image in the first batch: that batch misses, the others still hit.
  _, e = _score(config, EditedFirstRow(split), graphdef, params, frozen, mesh)
  assert e.calls - e.hits == 1 and e.calls > 1


class EditedFirstRow:
  """`source` with row 0's image inverted (a new image among known ones)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    row = self.source[i]
    return dict(row, image=255 - row['image']) if int(i) == 0 else row


def test_memo_off_and_budget(setup):
  config, split, graphdef, params, frozen, mesh = setup
  config.backbone.feature_memo_mb = 0
  _score(config, split, graphdef, params, frozen, mesh)
  _, e = _score(config, split, graphdef, params, frozen, mesh)
  assert e.hits == 0 and feature_cache.MEMO.bytes == 0


def test_memo_evicts_the_least_recently_used_rows():
  memo = feature_cache.Memo()
  rows = np.ones((3, 2, 2, 4), np.float32)   # 64 bytes a row
  memo.put('k', [b'a', b'b', b'c'], rows, max_bytes=192)
  assert memo.get('k', [b'a']) is not None   # 'a' is now the most recent
  memo.put('k', [b'd'], rows[:1], max_bytes=192)
  assert memo.bytes == 192
  assert memo.get('k', [b'b']) is None       # the least recently used went
  assert memo.get('k', [b'a', b'c', b'd']).shape == (3, 2, 2, 4)
  assert memo.get('other', [b'a']) is None   # rows belong to their backbone key


def test_training_feature_cache_reuses_the_memo(setup):
  """A second run on the same training set builds its feature cache from the memo, equal to the first."""
  config, split, graphdef, params, frozen, mesh = setup
  model = SplitModel(graphdef, params, frozen)

  def compute(memo_mb):
    config.backbone.feature_memo_mb = memo_mb
    return feature_cache.compute(split, model, mesh, config, 'bfloat16')

  plain, first, again = compute(0), compute(64), compute(64)
  assert Recorder.made[-2].hits == 0 and Recorder.made[-1].hits == Recorder.made[-1].calls == 2
  assert again.dtype == plain.dtype and again.shape == (len(split), 8, 8, plain.shape[-1])
  np.testing.assert_array_equal(first, plain)
  np.testing.assert_array_equal(again, plain)
