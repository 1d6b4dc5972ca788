"""adtr_jax.preflight: what a training run will need, said before any work, and one-line errors naming
the option to change when it does not fit."""
import pytest

from adtr_jax import errors, members, preflight, train
from adtr_jax.data import datasets, image_cache
from tests.conftest import tiny_config

ROW = 8 * 8 * 80 * 4      # the tiny config's features of one image: 8 x 8 tokens, 80 channels, float32


def _need(config, tmp_path, say=None):
  lines = []
  need = preflight.check([members.members_of(config, tmp_path / 'work')], say=lambda text, **_: lines.append(text))
  return need, '\n'.join(lines)


def test_counts_the_caches_the_feed_and_the_memo(toy_root, tmp_path):
  """The toy: 18 training images (2 held out to calibrate: 16 train), 8 test; 8 CPU devices."""
  config = tiny_config(toy_root, tmp_path / 'cache')
  need, said = _need(config, tmp_path)
  images = 26 * image_cache.row_bytes(64)
  assert need.disk == images + 16 * ROW
  assert need.device == 16 // 8 * ROW                              # each 'data' device's rows
  assert need.host[preflight.DEVICE_FEED_ON_CPU] == 16 * ROW        # CPU devices: host memory
  assert need.host[preflight.MEMO] == 26 * ROW                      # all it could hold: 26 images
  assert 'image cache of toy' in said and '18 train, 8 test images at 64 px' in said
  assert 'feature cache' in said and 'toy 16' in said and 'feed: device' in said
  assert not (tmp_path / 'cache').exists()                         # nothing prepared, nothing written
  config.train.feature_cache = 'host'
  need, said = _need(config, tmp_path)
  assert preflight.DEVICE_FEED_ON_CPU not in need.host and need.device == 0
  # One chunk of log_every_steps=1 step x 8 rows, twice on CPU (numpy and its device copy).
  assert need.host[preflight.HOST_CHUNK] == 2 * 8 * ROW and 'feed: host' in said


def test_caches_already_there_are_not_new(toy_root, tmp_path):
  config = tiny_config(toy_root, tmp_path / 'cache')
  datasets.load_category(config, 'toy')                              # prepares and resizes
  from adtr_jax import feature_cache
  there = feature_cache.features_root(config) / (feature_cache.prefix('toy', 16, config, 'float32') + 'key')
  there.mkdir(parents=True)
  (there / 'rows-0-16.p0.npy').touch()
  need, _ = _need(config, tmp_path)
  assert need.disk == 0


@pytest.mark.parametrize('patch,option', [
    (('device_memory', lambda: 1000), '--config.train.feature_cache=host'),
    (('_free_disk', lambda path: 1000), '--config.dataset.cache_dir'),
    (('available_host_memory', lambda: 1000), '--config.backbone.feature_memo_mb'),
])
def test_what_does_not_fit_is_one_line_naming_the_option_before_any_work(toy_root, tmp_path, monkeypatch,
                                                                        patch, option):
  monkeypatch.setattr(preflight, *patch)
  config = tiny_config(toy_root, tmp_path / 'cache')
  with pytest.raises(errors.ConfigError, match=option.replace('.', r'\.')) as e:
    train.train_and_evaluate(config, tmp_path / 'work')
  assert '\n' not in str(e.value)
  assert not (tmp_path / 'cache').exists()                         # no data prepared


def test_on_cpu_the_device_feed_counts_as_host_memory(toy_root, tmp_path, monkeypatch):
  """Without the memo, the device feed is the largest part of the host memory on CPU: the error says
  to keep the features on disk."""
  monkeypatch.setattr(preflight, 'available_host_memory', lambda: 1000)
  config = tiny_config(toy_root, tmp_path / 'cache')
  config.backbone.feature_memo_mb = 0
  with pytest.raises(errors.ConfigError, match='set --config.train.feature_cache=host'):
    _need(config, tmp_path)


def test_auto_feed_is_host_on_cpu_and_device_on_an_accelerator_while_its_share_fits(toy_root, tmp_path,
                                                                                  monkeypatch):
  """train.feature_cache='auto' (the default): on CPU devices the host feed (no device feed in host
  memory); on an accelerator (its platform and memory patched in: none here) the device feed while a
  device's share is at most half of its memory, else the host feed, set on the members' configs so
  that training uses it, and said."""
  from adtr_jax import defaults
  assert defaults.get_config().train.feature_cache == 'auto'
  config = tiny_config(toy_root, tmp_path / 'cache', feature_cache='auto')
  assert members.feed_kind(config) == 'host'
  need, said = _need(config, tmp_path)
  assert need.device == 0 and preflight.HOST_CHUNK in need.host and 'feed: host' in said
  monkeypatch.setattr(members, 'platform', lambda: 'gpu')
  share = 16 // 8 * ROW                                             # each of the 8 devices' rows
  for memory, kind in ((2 * share, 'device'), (2 * share - 1, 'host')):
    monkeypatch.setattr(preflight, 'device_memory', lambda: memory)
    group = members.members_of(tiny_config(toy_root, tmp_path / 'cache', feature_cache='auto'), tmp_path / 'w')
    assert members.feed_kind(group[0].config) == 'device'
    lines = []
    need = preflight.check([group], say=lambda text, **_: lines.append(text))
    assert members.feed_kind(group[0].config) == kind, memory
    assert (need.device == share) == (kind == 'device')
    assert ('feed: auto chose host' in lines[0]) == (kind == 'host'), lines
