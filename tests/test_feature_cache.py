"""The training feature cache on disk (adtr_jax/feature_cache.py): the same rows as in memory, the
moments streamed while they are written, reuse by content, feeds that read only their rows, and
memory bounded by the batch (tracemalloc peaks, not timed)."""
import functools
import os
import tracemalloc

import jax
import numpy as np
import pytest

from adtr_jax import feature_cache, loop, members, npy_rows, sharding, train_state
from adtr_jax.data import datasets, pipeline
from adtr_jax.models.adtr import FeatureNorm, SplitModel, build_model
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
  """The tiny config (memo off: each test embeds what it measures), the toy training split and a fresh
  model's backbone."""
  config = tiny_config(toy_root, tmp_path_factory.mktemp('cache'))
  config.backbone.feature_memo_mb = 0
  data = datasets.load_category(config, 'toy')
  model, _ = build_model(config)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  return config, data.train, SplitModel(graphdef, state.params, frozen)


class Synthetic:
  """n random 64 px images with records naming files under `folder` (the cache's key stats them)."""

  def __init__(self, folder, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    self.n, self.records = n, []
    for i in range(n):
      path = folder / f'{i:05d}.png'
      path.touch()
      self.records.append({'path': str(path)})

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(int(i))
    return {'image': rng.integers(0, 256, (64, 64, 3), np.uint8), 'label': 0, 'path': f'row {i}'}


def _cache(config, source, model, mesh, dtype='float32', every_block=False, name='toy'):
  size = len(source) + (-len(source) % sharding.data_size(mesh))
  return feature_cache.cache(source, model, mesh, config, dtype, name=name, size=size,
                             every_block=every_block)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_disk_cache_holds_the_rows_and_moments_of_the_in_memory_features(setup, dtype):
  """Bit for bit the rows `compute` keeps in memory; the moments streamed while writing give
  FeatureNorm.fit's statistics on those rows to float32 rounding (fit ran on the whole cache before)."""
  config, train, model = setup
  mesh = sharding.make_mesh()
  want = feature_cache.compute(train, model, mesh, config, dtype)
  features, m = _cache(config, train, model, mesh, dtype)
  assert features.shape == want.shape and features.dtype == want.dtype
  np.testing.assert_array_equal(features[:], want)
  np.testing.assert_array_equal(features[[5, 0, 15, 5]], want[[5, 0, 15, 5]])
  np.testing.assert_array_equal(features[3:11], want[3:11])
  assert m.count == want.size // want.shape[-1]
  fit, fed = FeatureNorm(want.shape[-1], 'channel'), FeatureNorm(want.shape[-1], 'channel')
  fit.fit(want)
  fed.set_statistics(m.mean, m.std)
  np.testing.assert_allclose(np.asarray(fed.mean[...]), np.asarray(fit.mean[...]), rtol=2e-7, atol=1e-7)
  np.testing.assert_allclose(np.asarray(fed.std[...]), np.asarray(fit.std[...]), rtol=2e-7)


def test_image_fed_statistics_come_from_one_streamed_pass(setup):
  """set_moments (no feature kept) == FeatureNorm.fit on the float32 features of every row."""
  config, train, model = setup
  mesh = sharding.make_mesh()
  want = feature_cache.compute(train, model, mesh, config, 'float32')
  m = feature_cache.set_moments(train, model, mesh, config)
  flat = want.reshape(-1, want.shape[-1]).astype(np.float64)
  assert m.count == len(flat)
  np.testing.assert_allclose(m.mean, flat.mean(0), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(m.std, flat.std(0), rtol=1e-7)


class Counting(feature_cache.Embedder):
  batches = 0

  def __call__(self, images):
    Counting.batches += 1
    return super().__call__(images)


def test_a_complete_cache_is_reused_and_a_changed_image_or_partial_file_is_not(setup, tmp_path, monkeypatch):
  config, _, model = setup
  config = config.copy_and_resolve_references()
  config.dataset.cache_dir = str(tmp_path / 'cache')
  monkeypatch.setattr(feature_cache, 'Embedder', Counting)
  mesh = sharding.make_mesh()
  source = Synthetic(tmp_path / 'images', 16)
  first, m1 = _cache(config, source, model, mesh)
  made = Counting.batches
  assert made == 2
  again, m2 = _cache(config, source, model, mesh)
  assert Counting.batches == made                      # found on disk: the backbone did not run
  np.testing.assert_array_equal(again[:], first[:])
  np.testing.assert_array_equal(m2.to_array(), m1.to_array())
  os.utime(source.records[3]['path'], ns=(1, 1))       # one image changed (its mtime): a new set
  _cache(config, source, model, mesh)
  assert Counting.batches == made + 2
  assert len(list((tmp_path / 'cache' / 'features').iterdir())) == 2
  # A run killed while writing leaves only a hidden partial file: the next run does not take it.
  where = feature_cache.folder(config, 'toy', source, model, 'float32')
  for f in where.glob('*'):
    f.unlink()
  npy_rows.create(where / '.rows-0-16.p0.npy.partial-0123456789ab', (16, 8, 8, 80), 'float32')
  features, _ = _cache(config, source, model, mesh)
  assert Counting.batches == made + 4
  np.testing.assert_array_equal(features[:], first[:])
  assert sorted(f.name for f in where.iterdir()) == ['moments-0-16.p0.npy', 'rows-0-16.p0.npy']


def test_blocks_follow_the_device_feeds_layout():
  assert feature_cache.blocks(21, 24, 2) == [(0, 12), (12, 21)]
  assert feature_cache.blocks(5, 8, 4) == [(0, 2), (2, 4), (4, 5), (5, 5)]
  with pytest.raises(ValueError):
    feature_cache.blocks(9, 8, 2)


def test_features_read_across_blocks_and_refuse_rows_they_do_not_hold(tmp_path):
  rows = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 1, 2, 3)
  parts = []
  for lo, hi in ((0, 4), (4, 10)):
    np.save(tmp_path / f'{lo}.npy', rows[lo:hi])
    parts.append((lo, hi, npy_rows.Rows(tmp_path / f'{lo}.npy', 'float32')))
  f = feature_cache.Features(10, (1, 2, 3), 'float32', parts)
  np.testing.assert_array_equal(f[2:9], rows[2:9])
  np.testing.assert_array_equal(f[np.array([[9, 0], [4, 3]])], rows[np.array([[9, 0], [4, 3]])])
  mine = feature_cache.Features(10, (1, 2, 3), 'float32', parts[1:])
  np.testing.assert_array_equal(mine[4:10], rows[4:10])
  with pytest.raises(IndexError, match='not in this process'):
    mine[[3]]
  with pytest.raises(IndexError, match='not in this process'):
    mine[2:6]


def test_pipeline_visits_the_rows_given_only(tmp_path):
  source = Synthetic(tmp_path, 12)
  order = np.arange(5, 10)
  got = list(pipeline.batches(source, batch_size=2, image_size=64, drop_remainder=False, order=order,
                              num_workers=1))
  index = np.concatenate([b['index'] for b in got])
  np.testing.assert_array_equal(index[index >= 0], order)
  assert len(got) == 3 and got[-1]['valid'].tolist() == [True, False]
  with pytest.raises(ValueError, match='at most once'):
    pipeline.batches(source, batch_size=2, image_size=64, drop_remainder=False, order=[1, 1])


def test_feeds_from_disk_give_the_inputs_of_the_feeds_from_memory(setup):
  """DeviceCache and HostCache fed from the files place and send, bit for bit, what the same feeds
  given the rows in memory do (tests/test_loop.py trains those feeds against each other and images)."""
  config, train, model = setup
  mesh = sharding.make_mesh()
  disk, _ = _cache(config, train, model, mesh)
  memory = disk[:]
  np.testing.assert_array_equal(np.asarray(loop.DeviceCache([disk], mesh, 8).resident),
                                np.asarray(loop.DeviceCache([memory], mesh, 8).resident))
  keys = members.member_keys([config])
  hyper = members.stack([members.numbers(config.train, steps_per_epoch=2, last_step=100, num_rows=16, data=0)])
  sent = [np.asarray(loop.HostCache([f], mesh, 8, keys, hyper).host_inputs(3, 4)) for f in (disk, memory)]
  assert sent[0].shape == (4, 1, 8, 8, 8, 80)
  np.testing.assert_array_equal(*sent)


class Recorded:
  """Features that record each read (its rows)."""

  def __init__(self, rows):
    self.rows, self.shape, self.dtype, self.reads = rows, rows.shape, rows.dtype, []

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, key):
    self.reads.append(np.arange(len(self.rows))[key].reshape(-1))
    return self.rows[key]


def test_place_and_host_feed_read_each_devices_rows_only():
  """The device feed reads each device's block once (never the whole set at once); the host feed reads
  each device's share of a chunk's rows."""
  mesh = sharding.make_mesh()   # 8 'data' devices
  f = Recorded(np.random.default_rng(0).standard_normal((29, 2, 2, 3)).astype(np.float32))
  placed, size = feature_cache.place([f], mesh)
  assert size == 32 and len(f.reads) == 8 and max(len(r) for r in f.reads) <= 4
  np.testing.assert_array_equal(np.sort(np.concatenate(f.reads)), np.arange(29))
  np.testing.assert_array_equal(np.asarray(placed)[0, :29], f.rows)
  f.reads = []
  config = tiny_config('/x', '/y')
  hyper = members.stack([members.numbers(config.train, steps_per_epoch=3, last_step=9, num_rows=29, data=0)])
  feed = loop.HostCache([f], mesh, 8, members.member_keys([config]), hyper)
  xs = feed.host_inputs(0, 3)                     # [3 steps, 1 model, 8 rows, ...]
  assert len(f.reads) == 8 and all(len(r) == 3 for r in f.reads)   # 3 steps x 1 row per device
  rows = np.asarray(jax.vmap(functools.partial(loop.step_rows, num_rows=29, steps_per_epoch=3, batch_size=8),
                             in_axes=(None, 0))(members.member_keys([config])[0], np.arange(3)))
  np.testing.assert_array_equal(np.asarray(xs)[:, 0], f.rows[rows])


def _peak(fn) -> int:
  """tracemalloc's peak of fn() above what was traced before it."""
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    fn()
    return tracemalloc.get_traced_memory()[1] - before
  finally:
    tracemalloc.stop()


@pytest.mark.slow
def test_writing_the_cache_holds_a_batch_not_the_split(setup, tmp_path):
  """The feature pass of 24 rows and of 240 peaks alike: rows go to disk as they come (all 240 rows
  held in memory would take 4.4 MiB more; measured difference: under 0.1 MiB)."""
  config, _, model = setup
  config = config.copy_and_resolve_references()
  config.dataset.cache_dir = str(tmp_path / 'cache')
  mesh = sharding.make_mesh()
  _cache(config, Synthetic(tmp_path / 'warm', 8), model, mesh)   # compiles outside the measurement
  row = 8 * 8 * 80 * 4
  peaks = {n: _peak(lambda n=n: _cache(config, Synthetic(tmp_path / f'n{n}', n), model, mesh)) for n in (24, 240)}
  assert peaks[240] - peaks[24] < 216 * row / 4, peaks


def test_host_feed_holds_a_chunk_not_the_set(tmp_path):
  """host_inputs reads a chunk's rows from disk: the same peak for a set 10x larger."""
  mesh = sharding.make_mesh()
  config = tiny_config('/x', '/y')
  keys = members.member_keys([config])

  def peak(n):
    rows = np.random.default_rng(n).standard_normal((n, 8, 8, 80)).astype(np.float32)
    np.save(tmp_path / f'{n}.npy', rows)
    f = feature_cache.Features(n, (8, 8, 80), 'float32', [(0, n, npy_rows.Rows(tmp_path / f'{n}.npy', 'float32'))])
    hyper = members.stack([members.numbers(config.train, steps_per_epoch=n // 8, last_step=100, num_rows=n,
                                           data=0)])
    feed = loop.HostCache([f], mesh, 8, keys, hyper)
    feed.host_inputs(0, 2)   # compiles the row drawing outside the measurement
    del rows
    return _peak(lambda: feed.host_inputs(2, 4))

  small, large = peak(64), peak(640)
  assert large < small + 576 * 8 * 8 * 80 * 4 / 8, (small, large)


def test_memo_stays_within_its_budget():
  """Rows kept by the memo are copies: evicted rows free their memory, and no row keeps its whole
  batch alive. After 20 batches of 32 rows into a budget of 10 rows, what stays traced is the budget."""
  memo = feature_cache.Memo()
  row = 8 * 8 * 80 * 4
  tracemalloc.start()
  try:
    before = tracemalloc.get_traced_memory()[0]
    for b in range(20):
      batch = np.full((32, 8, 8, 80), b, np.float32)
      memo.put('k', [bytes([b, i]) for i in range(32)], batch, max_bytes=10 * row)
    del batch
    kept = tracemalloc.get_traced_memory()[0] - before
  finally:
    tracemalloc.stop()
  assert memo.bytes <= 10 * row and len(memo.rows) == 10
  assert kept < 10 * row + 64 * 1024, kept
