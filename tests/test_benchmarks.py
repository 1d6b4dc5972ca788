"""The benchmark sources (visa, realiad, mvtec_ad2, mvtec_loco) on small trees in their official layouts
(tests/benchmark_layouts.py): counts, labels and masks, the checks made before any work, and a tiny
train and eval through the CLI for each."""
import functools
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from adtr_jax import errors, maps_io, metrics, paths, validate
from adtr_jax import protocol_reducers as pr
from adtr_jax.data import datasets, mixing, realiad
from tests import benchmark_layouts as layouts
from tests.conftest import tiny_config
from tests.test_cli import _run as _cli


def _config(root, cache, source, category, **dataset):
  config = tiny_config(root, cache)
  config.dataset.update(source=source, category=category, **dataset)
  return config


def _labels(source) -> list[int]:
  return [source[i]['label'] for i in range(len(source))]


def _raw(path) -> np.ndarray:
  return np.asarray(Image.open(path))


# --- VisA ----------------------------------------------------------------------------------------

def test_visa_1cls_counts_labels_and_defect_id_masks(tmp_path):
  root = layouts.make_visa(tmp_path / 'visa')
  data = datasets.load_category(_config(root, tmp_path / 'cache', 'visa', 'candle'), 'candle')
  assert len(data.train) + len(data.calib) == 12 and set(_labels(data.train)) == {0}
  assert _labels(data.test) == [0] * 3 + [1] * 4 and data.has_masks
  assert [r['path'] for r in data.test.records] == [str(root / p) for p in (
      *(f'candle/Data/Images/Normal/{i:04d}.JPG' for i in range(12, 15)),
      *(f'candle/Data/Images/Anomaly/{i:03d}.JPG' for i in range(4)))]
  for i in range(3, 7):
    raw = _raw(root / 'candle/Data/Masks/Anomaly' / f'{i - 3:03d}.png')
    assert set(np.unique(raw)) == {0, 2, 7}            # defect ids, all below 128
    np.testing.assert_array_equal(data.test[i]['mask'], raw > 0)
  assert not any(data.test[i]['mask'].any() for i in range(3))


def test_visa_2cls_labelled_training_anomalies_feed_the_anomaly_aware_loss(tmp_path):
  root = layouts.make_visa(tmp_path / 'visa')
  config = _config(root, tmp_path / 'cache', 'visa', 'candle', visa_split='2cls_fewshot')
  with pytest.raises(errors.ConfigError, match="loss.type='mse' would train to reconstruct them"):
    validate.check(config)
  config.loss.type = 'pixel'
  validate.check(config)
  data = datasets.load_category(config, 'candle')
  assert isinstance(data.train, mixing.MixedSource)
  assert len(data.train.normal) + len(data.calib) == 12 and set(_labels(data.train.normal)) == {0}
  assert set(_labels(data.calib)) == {0}
  labelled = data.train.labelled
  assert [r['path'] for r in labelled.records] == [
      str(root / f'candle/Data/Images/Anomaly/{i:03d}.JPG') for i in range(2)]
  for i in range(2):
    np.testing.assert_array_equal(labelled[i]['mask'],
                                  _raw(root / f'candle/Data/Masks/Anomaly/{i:03d}.png') > 0)
  assert _labels(data.test) == [0] * 3 + [1] * 2
  config.anomalies.num_labelled = 1
  with pytest.raises(errors.ConfigError, match='already puts labelled anomalies into training'):
    validate.check(config)
  # 'exclude': the same test set, trained on the normal images alone.
  config.anomalies.num_labelled, config.anomalies.labelled_use, config.loss.type = 0, 'exclude', 'mse'
  validate.check(config)
  data = datasets.load_category(config, 'candle')
  assert len(data.train) + len(data.calib) == 12 and set(_labels(data.train)) == {0}


# --- Real-IAD ------------------------------------------------------------------------------------

def test_realiad_labels_come_from_the_json_and_views_keep_their_sample(tmp_path):
  root = layouts.make_realiad(tmp_path / 'realiad')
  data = datasets.load_category(_config(root, tmp_path / 'cache', 'realiad', 'audiojack'), 'audiojack')
  assert len(data.train) + len(data.calib) == 12 and set(_labels(data.train)) == {0}
  test = data.test.records
  assert [r['sample_id'] for r in test] == ['audiojack_0005_OK'] * 3 + ['audiojack_0001_NG_BX'] * 3
  ng = [i for i, r in enumerate(test) if '/NG/' in r['path']]
  # The C2 view lies under NG/ but its defect is not visible: anomaly_class OK, mask_path null.
  assert [test[i]['label'] for i in ng] == [1, 0, 1] and test[ng[1]]['anomaly_class'] == 'OK'
  assert _labels(data.test) == [r['label'] for r in test]
  assert not data.test[ng[1]]['mask'].any()
  for i in (ng[0], ng[2]):
    np.testing.assert_array_equal(data.test[i]['mask'], _raw(test[i]['mask_paths'][0]) >= 128)
  assert realiad.sample_id('NG/BX/S0007/renamed.jpg') == 'NG/BX/S0007'


def test_realiad_unified_trains_on_every_category(tmp_path):
  root = layouts.make_realiad(tmp_path / 'realiad')
  config = _config(root, tmp_path / 'cache', 'realiad', 'audiojack,pcb', unified=True)
  validate.check(config)
  data = datasets.load_unified(config)
  assert len(data.train) + len(data.calib) == 24
  assert {r['path'].split('/realiad_256/')[1].split('/')[0] for r in data.train.records} == {'audiojack', 'pcb'}


# --- MVTec AD 2 ----------------------------------------------------------------------------------

def test_mvtec_ad2_splits_calibration_and_private_sets(tmp_path):
  root = layouts.make_mvtec_ad2(tmp_path / 'ad2')
  data = datasets.load_category(_config(root, tmp_path / 'cache', 'mvtec_ad2', 'vial'), 'vial')
  assert len(data.train) == 12 and data.calib is data.validation and len(data.validation) == 3
  assert _labels(data.test) == [1] * 3 + [0] * 2 and data.has_masks
  for i in range(3):
    np.testing.assert_array_equal(
        data.test[i]['mask'], _raw(root / f'vial/test_public/ground_truth/bad/{i:03d}_regular_mask.png') > 0)
  assert sorted(data.unlabelled) == ['test_private', 'test_private_mixed']
  assert [str(p) for p in data.unlabelled['test_private'].paths] == [
      str(root / f'vial/test_private/{i:03d}_regular.png') for i in range(3)]


# --- MVTec LOCO AD -------------------------------------------------------------------------------

def test_mvtec_loco_union_mask_and_saturation_records(tmp_path):
  root = layouts.make_mvtec_loco(tmp_path / 'loco')
  data = datasets.load_category(_config(root, tmp_path / 'cache', 'mvtec_loco', 'pushpins'), 'pushpins')
  assert len(data.train) == 12 and data.calib is data.validation and len(data.validation) == 3
  test = data.test.records
  assert [r['defect_type'] for r in test] == ['good'] * 2 + ['logical_anomalies'] * 2 + \
      ['structural_anomalies'] * 2
  assert _labels(data.test) == [0, 0, 1, 1, 1, 1]
  two = test[2]
  truth = root / 'pushpins/ground_truth/logical_anomalies/000'
  config = {d['pixel_value']: d for d in layouts.LOCO_DEFECTS}
  assert two['defects'] == [{'mask_path': str(truth / f'00{k}.png'), **config[v]}
                            for k, v in ((0, 255), (1, 254))]
  union = (_raw(truth / '000.png') > 0) | (_raw(truth / '001.png') > 0)
  assert (_raw(truth / '000.png') > 0).sum() < union.sum()
  np.testing.assert_array_equal(data.test[2]['mask'], union)
  assert test[0]['defects'] == [] and not data.test[0]['mask'].any()


def test_shipped_benchmark_configs_pass_on_their_layouts(tmp_path):
  from configs import mvtec_ad2, mvtec_loco, realiad as realiad_config, visa
  for module, make, category in ((visa, layouts.make_visa, 'candle'),
                                 (realiad_config, layouts.make_realiad, 'audiojack,pcb'),
                                 (mvtec_ad2, layouts.make_mvtec_ad2, 'vial'),
                                 (mvtec_loco, layouts.make_mvtec_loco, 'pushpins')):
    config = module.get_config()
    assert len(datasets.categories(config)) == {'visa': 12, 'realiad': 30, 'mvtec_ad2': 8,
                                                'mvtec_loco': 5}[config.dataset.source]
    config.dataset.root, config.dataset.category = str(make(tmp_path / module.__name__)), category
    validate.check(config)


# --- checked before any work ---------------------------------------------------------------------

def _break_visa_csv(root):
  (root / 'split_csv/1cls.csv').unlink()


def _break_visa_image(root):
  (root / 'candle/Data/Images/Normal/0000.JPG').unlink()


def _break_realiad_image(root):
  (root / f'realiad_256/audiojack/OK/S0001/audiojack_0001_OK_C1_{layouts.REALIAD_TIME}.jpg').unlink()


def _break_realiad_mask(root):
  (root / f'realiad_256/audiojack/NG/BX/S0001/audiojack_0001_NG_BX_C3_{layouts.REALIAD_TIME}.png').unlink()


def _break_loco_value(root):
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(
      root / 'pushpins/ground_truth/structural_anomalies/001/000.png')


def _break_loco_config(root):
  (root / 'pushpins/defects_config.json').unlink()


def _break_ad2_mask(root):
  (root / 'vial/test_public/ground_truth/bad/001_regular_mask.png').unlink()


BAD = [  # (writer, source, category, break, dataset fields, what the one line says)
    (layouts.make_visa, 'visa', 'candle', _break_visa_csv, {},
     r'VisA split file .*/split_csv/1cls\.csv does not exist: copy split_csv/ of the spot-diff'),
    (layouts.make_visa, 'visa', 'candle', None, {'visa_split': '2cls_highshot'},
     r'split_csv/2cls_highshot\.csv does not exist'),
    (layouts.make_visa, 'visa', 'pcb9', None, {},
     r"VisA class 'pcb9' is not in .*1cls\.csv; its classes: candle \(with a folder under .*: candle\)"),
    (layouts.make_visa, 'visa', 'candle', _break_visa_image, {},
     r'Normal/0000\.JPG does not exist \(listed at .*1cls\.csv:2\)'),
    (layouts.make_realiad, 'realiad', 'audiojack', _break_realiad_image, {},
     r'audiojack_0001_OK_C1_\d+\.jpg does not exist \(.*realiad_jsons/audiojack\.json: train\[0\]\)'),
    (layouts.make_realiad, 'realiad', 'audiojack', _break_realiad_mask, {},
     r'NG_BX_C3_\d+\.png does not exist \(mask of .*audiojack\.json: test\[5\]\)'),
    (layouts.make_realiad, 'realiad', 'tape', None, {},
     r'realiad_jsons/tape\.json does not exist; categories in .*: audiojack, pcb'),
    (layouts.make_realiad, 'realiad', 'audiojack', None, {'realiad_resolution': '512'},
     r'realiad_512 does not exist .*; image folders in .*: realiad_256'),
    (layouts.make_realiad, 'realiad', 'audiojack', None, {'realiad_json': 'realiad_jsons_sv'},
     r'JSON folder .*realiad_jsons_sv does not exist'),
    (layouts.make_mvtec_loco, 'mvtec_loco', 'pushpins', _break_loco_value, {},
     r'structural_anomalies/001/000\.png has pixel value 200, which .*defects_config\.json does not list '
     r'\(it lists \[253, 254, 255\]\)'),
    (layouts.make_mvtec_loco, 'mvtec_loco', 'pushpins', _break_loco_config, {},
     r'pushpins/defects_config\.json does not exist'),
    (layouts.make_mvtec_loco, 'mvtec_loco', 'screw_bag', None, {},
     r'category folder .*/screw_bag does not exist; categories under .*: pushpins'),
    (layouts.make_mvtec_ad2, 'mvtec_ad2', 'vial', _break_ad2_mask, {},
     r'test_public/bad/001_regular\.png has no mask .*ground_truth/bad/001_regular_mask\.png'),
    (layouts.make_mvtec_ad2, 'mvtec_ad2', 'can', None, {},
     r'category folder .*/can does not exist; categories under .*: vial'),
]


@pytest.mark.parametrize('make,source,category,spoil,fields,expected', BAD,
                         ids=[f'{b[1]}-{b[2]}-{b[3].__name__ if b[3] else next(iter(b[4]), "")}'
                              for b in BAD])
def test_bad_input_is_named_before_any_work(tmp_path, make, source, category, spoil, fields, expected):
  root = make(tmp_path / 'data')
  if spoil:
    spoil(root)
  config = _config(root, tmp_path / 'cache', source, category, **fields)
  with pytest.raises(errors.DataError, match=expected):
    validate.check(config)
  assert not (tmp_path / 'cache').exists()


def test_cli_names_a_missing_split_file_in_one_line(tmp_path):
  root = layouts.make_visa(tmp_path / 'visa')
  shutil.rmtree(root / 'split_csv')
  rc, out = _cli(f'--config=tests/tiny_config.py:{root}|{tmp_path / "cache"}', f'--workdir={tmp_path / "w"}',
                 '--config.dataset.source=visa', '--config.dataset.category=candle')
  assert rc == 2 and 'Traceback' not in out, out[-2000:]
  assert out.strip().splitlines()[-1] == (
      f'adtr_jax: error: VisA split file {root}/split_csv/1cls.csv does not exist: copy split_csv/ of '
      f'the spot-diff repository into {root}')
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'cache').exists()


# --- a tiny train and eval through the CLI -------------------------------------------------------

# MVTec AD 2's submission checker wants exactly 142 images per private split of sheet_metal.
_AD2 = functools.partial(layouts.make_mvtec_ad2, obj='sheet_metal',
                         n_private=maps_io.AD2_PRIVATE_COUNTS['sheet_metal'])
CLI_RUNS = [  # (writer, categories evaluated, overrides)
    (layouts.make_visa, ['candle'], ['--config.dataset.source=visa', '--config.dataset.category=candle',
                                     '--config.dataset.visa_split=2cls_fewshot', '--config.loss.type=pixel']),
    (layouts.make_realiad, ['audiojack', 'pcb'], ['--config.dataset.source=realiad',
                                                  '--config.dataset.category=audiojack,pcb',
                                                  '--config.dataset.unified=True']),
    (_AD2, ['sheet_metal'], ['--config.dataset.source=mvtec_ad2', '--config.dataset.category=sheet_metal']),
    (layouts.make_mvtec_loco, ['pushpins'], ['--config.dataset.source=mvtec_loco',
                                             '--config.dataset.category=pushpins']),
]


@pytest.mark.slow
@pytest.mark.parametrize('make,categories,overrides', CLI_RUNS, ids=[r[2][0].split('=')[1] for r in CLI_RUNS])
def test_tiny_train_and_eval_through_the_cli(tmp_path, make, categories, overrides):
  """Each benchmark trains and evaluates through the CLI: metrics.json holds the standard metrics and
  exactly the benchmark's own keys (protocol_reducers.report_keys, with eval.save_maps), and the raw
  maps lie at each test image's path under the root, at its original size. MVTec AD 2's --mode=predict
  without --predict_dir then writes a submission that passes the checker's rules."""
  root = make(tmp_path / 'data')
  workdir = tmp_path / 'w'
  source = overrides[0].split('=')[1]
  config = f'--config=tests/tiny_config.py:{root}|{tmp_path / "cache"}'
  rc, out = _cli(config, f'--workdir={workdir}', '--config.train.num_epochs=1', '--config.eval.num_heatmaps=2',
                 '--config.eval.save_maps=True', *overrides)
  assert rc == 0, out[-3000:]
  report = json.loads((workdir / 'metrics.json').read_text())
  assert sorted(report['categories']) == categories
  standard = {'image_auroc', 'pixel_aupro', 'num_anomalous', 'checkpoint_step'}
  for name in categories:
    values = report['categories'][name]
    assert 0.0 <= values['image_auroc'] <= 1.0 and 0.0 <= values['pixel_aupro'] <= 1.0
    assert values['num_anomalous'] > 0
    assert set(pr.report_keys(source, True)) <= set(values), sorted(values)
    # Nothing else beside the standard entries: the protocol keys are exactly report_keys.
    others = set(values) - set(pr.report_keys(source, True)) - set(metrics.METRIC_KEYS) - standard
    assert others <= {'num_test_images', 'heatmap_dir', 'num_heatmaps', 'curves',
                      'labelled_anomalies_removed_from_test', 'labelled_use'}, others
  maps = sorted(paths.maps_dir(workdir).rglob('*.tiff'))
  assert len(maps) == sum(report['categories'][c]['num_maps'] for c in categories) > 0
  for tiff in maps[:3]:
    image = next(root.glob(str(tiff.relative_to(paths.maps_dir(workdir)).with_suffix('.*'))))
    assert maps_io.read_tiff(tiff).shape == Image.open(image).size[::-1]
  if source == 'mvtec_loco':
    loco = report['categories']['pushpins']['loco']
    assert set(loco['au_spro']) == {'logical_anomalies', 'structural_anomalies', 'mean'}
    assert all(0.0 <= v <= 1.0 for v in loco['au_spro']['mean'].values())
  if source == 'mvtec_ad2':
    values = report['categories']['sheet_metal']
    assert values['ad2_segf1_threshold'] > 0 and 0.0 <= values['ad2_segf1'] <= 1.0
    rc, out = _cli(config, f'--workdir={workdir}', '--mode=predict', *overrides)
    assert rc == 0, out[-3000:]
    maps_io.check_ad2_submission(paths.ad2_submission_dir(workdir), objects=('sheet_metal',))
    assert 'MVTec AD 2 submission of sheet_metal: 142 test_private, 142 test_private_mixed' in out
