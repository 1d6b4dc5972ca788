"""Data: MVTec-layout scanning, the tfds builder, the ELPV export and the batch pipeline."""
import collections
import functools
import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from adtr_jax import errors
from adtr_jax.data import builder, datasets, elpv, mvtec, pipeline
from adtr_jax import defaults
from tests.conftest import make_toy_mvtec


def _prepare(root, data_dir, category='toy', require_masks=True):
  return builder.prepare(functools.partial(mvtec.scan_category, root, category, require_masks), data_dir)


def _config(**dataset):
  config = defaults.get_config()
  config.dataset.update(**dataset)
  return config


@pytest.fixture(scope='module')
def toy_splits(toy_root, tmp_path_factory):
  return _prepare(toy_root, tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def own_toy(tmp_path):
  """A toy category this test may change (toy_root is shared with other test files)."""
  return make_toy_mvtec(tmp_path / 'data')


# --- the prepared tfds dataset -------------------------------------------------------------------

def test_toy_prepared_and_read_back(toy_root, toy_splits):
  train, test = toy_splits['train'], toy_splits['test']
  assert (len(train), len(test)) == (18, 8)
  files = sorted((toy_root / 'toy/test').glob('*/*.png'))
  assert [test[i]['path'] for i in range(len(test))] == [str(p) for p in files]
  for i in range(len(test)):
    ex = test[i]
    path = pathlib.Path(ex['path'])
    grey = np.asarray(Image.open(path))                      # the toy images are greyscale
    assert ex['image'].shape == grey.shape + (3,) and ex['image'].dtype == np.uint8
    assert all((ex['image'][..., c] == grey).all() for c in range(3))
    anomalous = path.parent.name == 'square'
    assert ex['label'] == int(anomalous) and ex['defect_type'] == path.parent.name
    truth = (np.asarray(Image.open(toy_root / 'toy/ground_truth/square' / f'{path.stem}_mask.png')) > 0
             if anomalous else np.zeros_like(grey, bool))
    np.testing.assert_array_equal(ex['mask'], truth)
    assert ex['mask'].any() == anomalous
  assert all(train[i]['label'] == 0 and not train[i]['mask'].any() for i in range(len(train)))
  assert test.has_masks


def test_mask_binarised_at_128(own_toy, tmp_path):
  mask_path = own_toy / 'toy/ground_truth/square/000_mask.png'
  raw = np.zeros((64, 64), np.uint8)
  raw[:, 20:40] = 127
  raw[:, 40:] = 128
  Image.fromarray(raw).save(mask_path)
  np.testing.assert_array_equal(mvtec.load_mask(mask_path), raw >= 128)
  test = _prepare(own_toy, tmp_path / 'tfds')['test']
  row = [test[i]['path'] for i in range(len(test))].index(str(own_toy / 'toy/test/square/000.png'))
  np.testing.assert_array_equal(test[row]['mask'], raw >= 128)
  batch = next(pipeline.batches(test, batch_size=8, image_size=64,
                                drop_remainder=False, num_workers=1))
  np.testing.assert_array_equal(batch['mask'][row], raw >= 128)


def test_decoding_colour_modes(tmp_path):
  rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(mvtec.load_image(tmp_path / 'rgba.png'), rgba[..., :3])
  wide = np.full((4, 4), 65535, np.uint16)
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  np.testing.assert_array_equal(mvtec.load_image(tmp_path / 'wide.png'), 255)


def test_rebuilt_only_when_the_folder_changes(own_toy, tmp_path):
  first = _prepare(own_toy, tmp_path / 'tfds')['train']
  again = _prepare(own_toy, tmp_path / 'tfds')['train']
  assert again.data_dir == first.data_dir
  shutil.copy(own_toy / 'toy/train/good/000.png', own_toy / 'toy/train/good/new.png')
  changed = _prepare(own_toy, tmp_path / 'tfds')['train']
  assert changed.data_dir != first.data_dir
  assert (len(first), len(changed)) == (18, 19)
  assert changed[18]['path'].endswith('new.png')
  assert not pathlib.Path(first.data_dir).exists()  # the stale copy is removed


# --- bad input -----------------------------------------------------------------------------------

def test_missing_mask_names_image_and_mask(own_toy, tmp_path):
  (own_toy / 'toy/ground_truth/square/002_mask.png').unlink()
  with pytest.raises(errors.DataError, match=r'test/square/002\.png.*ground_truth/square/002_mask'):
    _prepare(own_toy, tmp_path / 'tfds')


def test_unreadable_image_names_the_file(own_toy, tmp_path):
  (own_toy / 'toy/test/good/bad.png').write_bytes(b'this is not a png')
  with pytest.raises(errors.DataError, match=r'cannot decode image .*test/good/bad\.png'):
    _prepare(own_toy, tmp_path / 'tfds')


def test_empty_test_split(own_toy):
  for folder in (own_toy / 'toy/test').iterdir():
    shutil.rmtree(folder)
  with pytest.raises(errors.DataError, match=r'toy/test has no images'):
    mvtec.scan_category(own_toy, 'toy')


def test_missing_category_lists_existing_ones(own_toy):
  (own_toy / 'other/train').mkdir(parents=True)
  with pytest.raises(errors.DataError, match=r'nope does not exist.*categories .*: other, toy'):
    mvtec.scan_category(own_toy, 'nope')


def test_train_holds_only_good(own_toy):
  (own_toy / 'toy/train/square').mkdir()
  with pytest.raises(errors.DataError, match=r'may only contain good/.*found: square'):
    mvtec.scan_category(own_toy, 'toy')
  shutil.rmtree(own_toy / 'toy/train')
  (own_toy / 'toy/train/good').mkdir(parents=True)
  with pytest.raises(errors.DataError, match=r'train/good is missing or has no images'):
    mvtec.scan_category(own_toy, 'toy')


def test_no_ground_truth_means_image_labels_only(own_toy, tmp_path):
  shutil.rmtree(own_toy / 'toy/ground_truth')
  with pytest.raises(errors.DataError, match='has no mask'):
    mvtec.scan_category(own_toy, 'toy')
  test = _prepare(own_toy, tmp_path / 'tfds', require_masks=False)['test']
  assert not test.has_masks
  assert [test[i]['label'] for i in range(len(test))] == [0] * 4 + [1] * 4
  assert not any(test[i]['mask'].any() for i in range(len(test)))


# --- config-level loading ------------------------------------------------------------------------

def test_categories_and_config_errors(toy_root, tmp_path, monkeypatch):
  assert datasets.categories(_config(category=' bottle, cable ,')) == ['bottle', 'cable']
  with pytest.raises(ValueError, match='--config.dataset.category'):
    datasets.categories(_config(category=' , '))
  with pytest.raises(ValueError, match='--config.dataset.root=/path'):
    datasets.load_category(_config(category='toy'), 'toy')
  with pytest.raises(ValueError, match='mvtec, elpv, classes, visa, realiad'):
    datasets.load_category(_config(source='kitti', root=str(toy_root)), 'toy')
  monkeypatch.setenv('ADTR_JAX_CACHE', str(tmp_path / 'env'))
  assert datasets.cache_dir(_config()) == tmp_path / 'env'
  assert datasets.cache_dir(_config(cache_dir=str(tmp_path / 'cfg'))) == tmp_path / 'cfg'


def test_load_category_and_example(toy_root, tmp_path):
  data = datasets.load_category(_config(root=str(toy_root), cache_dir=str(tmp_path)), 'toy')
  assert (len(data.train), len(data.test), data.has_masks, data.root) == (16, 8, True, toy_root)
  example = datasets.load_example(data.test, 5, 32)
  assert example['image'].shape == (32, 32, 3) and example['image'].dtype == np.float32
  assert example['path'] == data.test[5]['path']


# --- the batch pipeline --------------------------------------------------------------------------

class _Rows:
  """A source whose row i is a greyscale image filled with i (sizes vary), label i % 2."""

  def __init__(self, n: int, broken: int = -1):
    self.n, self.broken = n, broken

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.full((20 + i % 3, 30), i, np.uint8)
    if i == self.broken:
      image = np.zeros((2, 2, 2, 2), np.uint8)  # no PIL mode fits this
    return {'image': image, 'mask': np.zeros(image.shape[:2], bool), 'label': i % 2,
            'path': f'row{i}.png'}


def _epoch(source, process_count=1, **kw):
  """Batches of every process, zipped: [[batch of process 0, batch of process 1, ...], ...]."""
  args = dict(batch_size=4, image_size=8, drop_remainder=False,
              num_workers=2) | kw
  return list(zip(*(pipeline.batches(source, process_index=p, process_count=process_count, **args)
                    for p in range(process_count))))


def _valid_rows(epoch) -> np.ndarray:
  return np.concatenate([b['index'][b['valid']] for batches in epoch for b in batches])


def test_batch_shapes_and_dtypes(toy_splits):
  batch = next(pipeline.batches(toy_splits['test'], batch_size=4, image_size=32, drop_remainder=True, num_workers=2))
  expected = {'image': ((4, 32, 32, 3), np.uint8), 'mask': ((4, 32, 32), np.uint8),
              'label': ((4,), np.int32), 'valid': ((4,), np.bool_), 'index': ((4,), np.int64)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch['image'].max() > 0  # uint8 pixels, normalised on the device
  assert set(np.unique(batch['mask'])) <= {0, 1}
  for row, index in enumerate(batch['index']):
    assert batch['label'][row] == toy_splits['test'][int(index)]['label']


def test_every_row_once_per_epoch_over_two_processes():
  source = _Rows(10)
  shuffled = np.random.default_rng(3).permutation(10)
  for shuffle in (False, True):
    epoch = _epoch(source, process_count=2, order=shuffled if shuffle else None)
    assert len(epoch) == pipeline.num_batches(10, 4, drop_remainder=False) == 3
    rows = _valid_rows(epoch)
    if shuffle:
      assert list(rows) == list(shuffled)
    else:
      assert list(rows) == list(range(10))
    for batches in epoch:
      for b in batches:  # the image content says which row was decoded
        assert b['image'].shape == (2, 8, 8, 3)
        real = b['index'][b['valid']]
        np.testing.assert_array_equal(b['image'][b['valid']][:, 0, 0, 0], real)
        assert list(b['label'][b['valid']]) == list(real % 2)


def test_padding_flagged():
  last = _epoch(_Rows(10), process_count=2)[-1]   # positions 8, 9 | 10, 11
  assert list(last[0]['valid']) == [True, True] and list(last[0]['index']) == [8, 9]
  assert not last[1]['valid'].any() and list(last[1]['index']) == [-1, -1]
  assert last[1]['image'].max() > 0    # a copy of a real row, not zeros
  dropped = _epoch(_Rows(10), drop_remainder=True)
  assert len(dropped) == 2 and all(b['valid'].all() for (b,) in dropped)


def test_skip_batches_is_the_tail_of_the_epoch():
  order = np.random.default_rng(5).permutation(22)
  full = _epoch(_Rows(22), process_count=2, order=order, drop_remainder=True)
  tail = _epoch(_Rows(22), process_count=2, order=order, drop_remainder=True, skip_batches=3)
  assert len(full) == 5 and len(tail) == 2
  for got, want in zip(tail, full[3:]):
    for g, w in zip(got, want):
      assert all(np.array_equal(g[k], w[k]) for k in w)


def test_worker_errors_name_the_file_and_bad_arguments_fail_early():
  with pytest.raises(errors.DataError, match='row6.png'):
    _epoch(_Rows(10, broken=6))
  with pytest.raises(ValueError, match='batch_size=5'):
    pipeline.batches(_Rows(10), batch_size=5, image_size=8,
                     drop_remainder=False, process_count=2)


# --- ELPV ----------------------------------------------------------------------------------------

def test_elpv_export_mono(tmp_path):
  root, category = elpv.export_elpv(tmp_path, 'mono')
  cat = root / category
  labels = collections.defaultdict(set)
  for line in (elpv.package_data_dir() / 'labels.csv').read_text().splitlines():
    path, prob, kind = line.split()
    if kind == 'mono':
      labels[round(float(prob) * 3)].add(pathlib.Path(path).name)
  folders = {f: {p.name for p in (cat / f).iterdir()}
             for f in ('train/good', 'test/good', 'test/defective')}
  assert folders['train/good'] | folders['test/good'] == labels[0]
  assert not folders['train/good'] & folders['test/good']
  assert len(folders['test/good']) == round(0.25 * len(labels[0]))
  assert folders['test/defective'] == labels[2] | labels[3]
  split = json.loads((cat / 'split.json').read_text())
  assert set(split['excluded']) == {f'images/{n}' for n in labels[1]}
  assert split['counts'] == {f: len(v) for f, v in folders.items()} | {'excluded': len(labels[1])}
  assert not (cat / 'ground_truth').exists()

  stamp = (cat / 'split.json').stat().st_mtime_ns
  assert elpv.export_elpv(tmp_path, 'mono') == (root, category)
  assert (cat / 'split.json').stat().st_mtime_ns == stamp           # complete: left alone
  next((cat / 'test/good').iterdir()).unlink()
  elpv.export_elpv(tmp_path, 'mono')
  assert {p.name for p in (cat / 'test/good').iterdir()} == folders['test/good']  # redone


def test_elpv_loads_as_image_level_category(tmp_path):
  config = _config(source='elpv', category='elpv_mono', elpv_cell_type='mono', cache_dir=str(tmp_path))
  data = datasets.load_category(config, 'elpv_mono')
  assert not data.has_masks and data.root == tmp_path / 'elpv'
  labels = collections.Counter(int(data.test[i]['label']) for i in range(len(data.test)))
  split = json.loads((data.root / 'elpv_mono/split.json').read_text())['counts']
  assert (len(data.train) + len(data.calib), labels[0], labels[1]) == (
      split['train/good'], split['test/good'], split['test/defective'])
  assert len(data.calib) == round(0.1 * split['train/good'])  # the calibration hold-out
  with pytest.raises(ValueError, match='elpv_cell_type'):
    datasets.load_category(config, 'elpv_poly')


# --- real data: Magnetic Tile Defects ------------------------------------------------------------

@pytest.mark.realdata
def test_magnetic_tile(shared_data, tmp_path):
  if not (shared_data / 'magnetic_tile').is_dir():
    pytest.skip(f'{shared_data}/magnetic_tile is missing')
  records = mvtec.scan_category(shared_data, 'magnetic_tile').splits
  cat = shared_data / 'magnetic_tile'
  assert len(records['train']) == len(list((cat / 'train/good').glob('*.jpg')))
  assert len(records['test']) == len(list((cat / 'test').glob('*/*.jpg')))
  for r in records['test']:
    assert (r['label'] == 1) == (r['defect_type'] != 'good')
    assert len(r['mask_paths']) == r['label']
    assert all(pathlib.Path(m).is_file() for m in r['mask_paths'])
  splits = _prepare(shared_data, tmp_path / 'tfds', 'magnetic_tile')
  assert (len(splits['train']), len(splits['test'])) == (len(records['train']), len(records['test']))
  for i in (0, len(records['test']) - 1):
    ex, r = splits['test'][i], records['test'][i]
    assert ex['path'] == r['path'] and ex['image'].shape == ex['mask'].shape + (3,)
    np.testing.assert_array_equal(ex['mask'], mvtec.load_mask(r['mask_paths'][0]) if r['mask_paths']
                                  else np.zeros(ex['mask'].shape, bool))
  batch = next(pipeline.batches(splits['test'], batch_size=8, image_size=64, drop_remainder=True))
  assert batch['image'].shape == (8, 64, 64, 3)


def _class_folders(root: pathlib.Path, counts=(('cat', 5, 2), ('dog', 4, 3), ('emu', 3, 1))):
  """A tiny folder-per-class dataset: <root>/{train,test}/<class>/*.png (distinct grey levels)."""
  rng = np.random.default_rng(0)
  for name, n_train, n_test in counts:
    for split, n in (('train', n_train), ('test', n_test)):
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            root / split / name / f'{i:02d}.png')
  return root


@pytest.mark.parametrize('archived', [False, True])
def test_folder_per_class_is_the_one_class_protocol(tmp_path, archived):
  import tarfile
  root = _class_folders(tmp_path / 'classes')
  if archived:
    with tarfile.open(tmp_path / 'classes.tar.gz', 'w:gz') as tar:
      tar.add(root, arcname='data')   # one top folder, as many archives have
    root = tmp_path / 'classes.tar.gz'
  config = defaults.get_config()
  config.dataset.update(source='classes', root=str(root), category='dog', image_size=16,
                        cache_dir=str(tmp_path / 'cache'), num_workers=1)
  config.calibration.holdout_fraction = 0.0
  data = datasets.load_category(config, 'dog')
  assert len(data.train) == 4 and not data.has_masks
  labels = [data.test[i]['label'] for i in range(len(data.test))]
  assert sorted(labels) == [0] * 3 + [1] * (2 + 1)        # dog's 3 normal, cat's 2 + emu's 1 anomalous
  assert data.train[0]['image'].shape == (16, 16, 3)


def test_folder_per_class_errors_name_the_problem(tmp_path):
  config = defaults.get_config()
  config.dataset.update(source='classes', root=str(tmp_path / 'missing.tar.gz'), image_size=16,
                        cache_dir=str(tmp_path / 'cache'))
  with pytest.raises(errors.DataError, match='missing.tar.gz does not exist'):
    datasets.load_category(config, 'dog')
  config.dataset.root = str(_class_folders(tmp_path / 'classes'))
  with pytest.raises(errors.ConfigError, match="'fox' is not a class of .*classes: cat, dog, emu"):
    datasets.load_category(config, 'fox')
  shutil.rmtree(tmp_path / 'classes' / 'test' / 'emu')
  with pytest.raises(errors.DataError, match='train/ and test/ hold different classes'):
    datasets.load_category(config, 'dog')


@pytest.mark.realdata
def test_cifar10_archive_is_the_one_class_protocol(shared_data, tmp_path):
  """The real CIFAR-10 archive of ../shared/data, extracted into the cache: class 'cat' gives its 5,000
  training images as normal, its 1,000 test images as test/good and the other 9 x 1,000 as anomalous."""
  from adtr_jax.data import classes
  archive = shared_data / 'cifar10_jpeg.tar.gz'
  if not archive.is_file():
    pytest.skip(f'{archive} is missing')
  root, category = classes.export_class(archive, 'cat', tmp_path / 'classes')
  counts = {p.relative_to(root / category).as_posix(): len(list(p.iterdir()))
            for p in (root / category).glob('*/*') if p.is_dir()}
  assert counts['train/good'] == 5000 and counts['test/good'] == 1000
  others = {k: v for k, v in counts.items() if k.startswith('test/') and k != 'test/good'}
  assert len(others) == 9 and set(others.values()) == {1000} and 'test/cat' not in others
