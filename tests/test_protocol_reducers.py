"""adtr_jax.protocol_reducers: each reducer, fed batch by batch by two 'processes' (two instances, each
adding the rows dealt to it, as split passes deal them; their parts merged), equals its in-memory
function of adtr_jax/protocols.py on the same maps, and the official figures where they were recorded
(tests/protocol_reference.json). Pixel streams use tiny chunks so that every case writes many runs."""
import json
import pathlib
import tracemalloc
import types
import warnings

import numpy as np
import pytest
from PIL import Image

from adtr_jax import errors, maps_io, metrics, paths, protocol_reducers as pr, protocols
from adtr_jax.data import mvtec_ad2, mvtec_loco, realiad, visa
from experiments import protocol_cases as cases
from tests import benchmark_layouts as layouts
from tests.test_protocols import REFERENCE, _flat, _loco_ours

TINY = dict(chunk_pixels=300, fan_in=4, block=40)


def run_pass(reducers_of_part, maps, index, masks=None, scores=None, labels=None, seed=0,
             num_parts=2):
  """maps [N, S, S] (masks, scores, labels: the other row fields). Deals the rows in turn to num_parts instances (reducers_of_part(part) -> list), adds them in
  batches of 1-3 rows (a batch may leave a part without a row), finishes every part, and merges on
  the first: {key: value} of every reducer's result."""
  n = len(index)
  masks = np.zeros(np.shape(maps), bool) if masks is None else masks
  scores = np.zeros(n, np.float32) if scores is None else scores
  labels = np.zeros(n, np.int32) if labels is None else labels
  parts = [reducers_of_part(p) for p in range(num_parts)]
  rng = np.random.default_rng(seed)
  start = 0
  while start < n:
    batch = np.arange(start, min(n, start + int(rng.integers(1, 4))))
    for p, reducers in enumerate(parts):
      mine = batch[batch % num_parts == p]
      rows = {'maps': maps[mine], 'scores': scores[mine], 'labels': labels[mine], 'masks': masks[mine],
              'index': np.asarray(index, np.int64)[mine]}
      for r in reducers:
        r.add(rows)
    start = batch[-1] + 1
  finished = [[r.finish() for r in reducers] for reducers in parts]
  json.dumps(finished)   # parts travel between processes as JSON
  out = {}
  for k, r in enumerate(parts[0]):
    out.update(r.result([f[k] for f in finished]))
  return out


# ----------------------------------------------------------------------------------- MVTec LOCO AD
def write_loco(root: pathlib.Path, case: dict) -> list[dict]:
  """The case as an MVTec LOCO AD tree (images of the maps' size, one PNG per defect,
  defects_config.json), scanned by mvtec_loco.scan_category; returns its test records in the case's
  order (scan order: good, logical, structural, by stem, as the case lists them)."""
  cat = root / cases.LOCO_OBJECT
  h, w = case['maps'].shape[1:]
  blank = Image.fromarray(np.zeros((h, w, 3), np.uint8))
  for folder in ('train/good', 'validation/good'):
    (cat / folder).mkdir(parents=True)
    blank.save(cat / folder / '000.png')
  for kind, stem, pngs in zip(case['types'], case['stems'], case['pngs']):
    (cat / 'test' / kind).mkdir(parents=True, exist_ok=True)
    blank.save(cat / 'test' / kind / f'{stem}.png')
    for k, png in enumerate(pngs):
      out = cat / 'ground_truth' / kind / stem / f'{k:03d}.png'
      out.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(png).save(out)
  (cat / 'defects_config.json').write_text(json.dumps(case['config']))
  rows = mvtec_loco.scan_category(root, cases.LOCO_OBJECT).splits['test']
  assert [(r['defect_type'], pathlib.Path(r['path']).stem) for r in rows] == \
         list(zip(case['types'], case['stems']))
  return rows


def loco_pass(tmp_path, records, maps, num_parts=2, seed=0, name='scratch'):
  return run_pass(lambda p: [pr.LocoReducer(records, tmp_path / name, p, **TINY)], maps,
                  np.arange(len(records)), seed=seed, num_parts=num_parts)['loco']


@pytest.mark.parametrize('record', REFERENCE['loco'], ids=lambda r: json.dumps(r['case']))
def test_loco_reducer_equals_loco_metrics_and_the_official_figures(record, tmp_path):
  """Maps at the images' size (the resize is then the identity): every figure equals
  protocols.loco_metrics on the same maps to 1e-12, every AU-sPRO the official evaluator's functions
  at every distinct score to 1e-9 (its image AUROC cuts corners at tied scores: test_protocols.py), and
  one process's pass equals two processes' pass."""
  case = cases.loco_case(**record['case'])
  records = write_loco(tmp_path / 'data', case)
  got = loco_pass(tmp_path, records, case['maps'])
  want = _loco_ours(case)[0]
  flat_got, flat_want = _flat(got), _flat(want)
  assert flat_got.keys() == flat_want.keys() and len(flat_got) == 3 + 3 * 5
  for k, v in flat_want.items():
    assert flat_got[k] == pytest.approx(v, abs=1e-12), k
  for k, v in record['official_exact_thresholds'].items():
    if k.startswith('au_spro/'):
      assert flat_got[k] == pytest.approx(v, abs=1e-9), k
  one = _flat(loco_pass(tmp_path, records, case['maps'], num_parts=1, seed=3))
  assert one == pytest.approx(flat_got, abs=1e-12, rel=0)
  assert not (tmp_path / 'scratch').exists()   # result() removes its runs


def test_loco_reducer_scores_at_the_original_size(tmp_path):
  """Maps at a model size of 20 x 20 for images of 36 x 44: the reducer equals loco_metrics on the
  maps resized to 36 x 44 (maps_io.resize_map, as MapWriter writes them), with the defect PNGs and
  their saturation areas (absolute thresholds in original pixels) as they are."""
  case = cases.loco_case(seed=7, levels=50)
  records = write_loco(tmp_path / 'data', case)
  rng = np.random.default_rng(0)
  small = np.round(rng.standard_normal((len(records), 20, 20)) * 20).astype(np.float32) / 20
  small[:, 5:12, 5:15] += 1.0
  resized = [maps_io.resize_map(m, case['maps'].shape[1:]) for m in small]
  want = _flat(_loco_ours({**case, 'maps': resized})[0])
  got = _flat(loco_pass(tmp_path, records, small))
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-12), k


def test_loco_reducer_names_a_record_without_defects(tmp_path):
  """A record without LOCO's defects, or an anomalous one without any, is named before it is scored."""
  case = cases.loco_case(seed=0, n_good=1, n_logical=1, n_structural=1)
  records = write_loco(tmp_path / 'data', case)
  bad = [dict(r) for r in records]
  del bad[1]['defects']
  bad[2]['defects'] = []
  reducer = pr.LocoReducer(bad, tmp_path / 's')
  with pytest.raises(errors.DataError, match='lists no defects'):
    reducer.add({'maps': case['maps'][1:2], 'index': np.array([1])})
  with pytest.raises(errors.DataError, match='structural_anomalies test image must have at least one'):
    reducer.add({'maps': case['maps'][2:3], 'index': np.array([2])})


def _loco_peak_bytes(tmp_path, records, num_batches: int) -> int:
  """tracemalloc's peak over a LOCO pass of num_batches batches of 2 rows (records cycled) at 64 x 64."""
  rng = np.random.default_rng(0)
  reducer = pr.LocoReducer(records, tmp_path / f'peak{num_batches}', chunk_pixels=8192, fan_in=4,
                           block=2048)
  tracemalloc.start()
  try:
    for b in range(num_batches):
      index = np.array([2 * b, 2 * b + 1]) % len(records)
      reducer.add({'maps': rng.random((2, 64, 64)).astype(np.float32), 'index': index})
    reducer.result([reducer.finish()])
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_loco_memory_does_not_grow_with_the_split(tmp_path):
  """Ten times the rows: the peak stays within 1.25x, far below the pixels' own bytes (2.6 MB at 80
  batches); only the per-row scalars grow (9 bytes a row)."""
  root = layouts.make_mvtec_loco(tmp_path / 'loco')
  records = mvtec_loco.scan_category(root, 'pushpins').splits['test']
  few, many = _loco_peak_bytes(tmp_path, records, 8), _loco_peak_bytes(tmp_path, records, 80)
  assert many < 1.25 * few, (few, many)
  assert many < 0.25 * 80 * 2 * 64 * 64 * 4, many


# --------------------------------------------------------------------------------------- MVTec AD 2
@pytest.mark.parametrize('record', REFERENCE['mvtec_pro'], ids=lambda r: json.dumps(r['case']))
def test_ad2_aupro_equals_pixel_metrics_and_compute_pro(record, tmp_path):
  case = cases.pro_case(**record['case'])
  got = run_pass(lambda p: [pr.PixelAupro(tmp_path / 'a', p, **TINY)], case['maps'],
                 np.arange(len(case['maps'])), masks=case['masks'])
  want = metrics.pixel_metrics(case['maps'], case['masks'], fpr_limit=protocols.AD2_FPR_LIMIT)
  assert got['ad2_aupro_05'] == pytest.approx(want['pixel_aupro'], abs=1e-12)
  assert got['ad2_aupro_05'] == pytest.approx(record['official_au_pro'][str(protocols.AD2_FPR_LIMIT)],
                                              abs=1e-7)


def test_segf1_threshold_and_segf1_equal_protocols(tmp_path):
  """Validation pass -> threshold (streamed moments) -> test pass -> SegF1 (counts): equal to
  protocols.segf1_threshold (1e-12; bit-equal for one process) and protocols.segf1 (exactly)."""
  val = cases.pro_case(seed=3, n=7, size=24)['maps'] * 0.5
  test = cases.pro_case(seed=4, n=9, size=24, levels=6)
  want_t = protocols.segf1_threshold(list(val))
  got_t = run_pass(lambda p: [pr.SegF1Threshold()], val, np.arange(len(val)))['ad2_segf1_threshold']
  assert got_t == pytest.approx(want_t, rel=1e-12)
  one = run_pass(lambda p: [pr.SegF1Threshold()], val, np.arange(len(val)), num_parts=1)
  assert one['ad2_segf1_threshold'] == want_t
  got = run_pass(lambda p: pr.test_reducers('mvtec_ad2', _Data(test=_Split([{}] * 9)), tmp_path / 's', p,
                                            {'ad2_segf1_threshold': got_t}),
                 test['maps'], np.arange(9), masks=test['masks'])
  assert got['ad2_segf1'] == protocols.segf1(list(test['maps']), list(test['masks']), got_t)
  assert got['ad2_segf1_threshold'] == got_t
  assert 0.0 < got['ad2_segf1'] < 1.0
  assert got['ad2_aupro_05'] == pytest.approx(metrics.pixel_metrics(test['maps'], test['masks'], 0.05)
                                              ['pixel_aupro'], abs=1e-12)
  with pytest.raises(ValueError, match='ad2_segf1_threshold'):
    pr.test_reducers('mvtec_ad2', _Data(test=_Split([])), tmp_path / 's')


def test_submission_threshold_is_taken_at_the_original_size(tmp_path):
  root = layouts.make_mvtec_ad2(tmp_path / 'ad2', n_val=4)
  records = mvtec_ad2.scan_category(root, 'vial').splits['validation']
  rng = np.random.default_rng(0)
  small = rng.gamma(2.0, 1.0, (4, 16, 16)).astype(np.float32)
  reducer = pr.submission_threshold_reducer(_Data(validation=_Split(records)))
  got = run_pass(lambda p: [reducer] if p == 0 else [pr.SegF1Threshold(reducer.paths)], small,
                 np.arange(4))['ad2_segf1_threshold']
  want = protocols.segf1_threshold([maps_io.resize_map(m, (layouts.SIZE, layouts.SIZE)) for m in small])
  assert got == pytest.approx(want, rel=1e-12)
  assert got != pytest.approx(protocols.segf1_threshold(list(small)), rel=1e-6)


# --------------------------------------------------------------------------------------- Real-IAD
@pytest.mark.parametrize('record', REFERENCE['adeval'], ids=lambda r: json.dumps(r['case']))
def test_sample_metrics_equal_protocols_and_adeval(record, tmp_path):
  case = cases.realiad_case(**record['case'])
  records = [{'path': p, 'sample_id': realiad.sample_id(p)} for p in case['paths']]
  assert [r['sample_id'] for r in records] == case['sample_ids']
  n = len(records)
  got = run_pass(lambda p: [pr.SampleMetrics(records, tmp_path / 's', p)], np.zeros((n, 1, 1), np.float32),
                 np.arange(n), scores=case['scores'].astype(np.float32), labels=case['labels'].astype(np.int32))
  want = protocols.sample_metrics(case['scores'].astype(np.float32), case['labels'], case['sample_ids'])
  assert got == want and set(got) == set(pr.SAMPLE_KEYS)
  assert got['sample_auroc'] == pytest.approx(record['adeval']['s_auroc'], abs=1e-12)


# ----------------------------------------------------------------------------------- map files
def test_map_writer_writes_original_size_tiffs_in_the_evaluators_layout(tmp_path):
  """Two processes write their own rows of a LOCO fixture (64 x 64 images, maps at 24 x 24): one
  float32 TIFF per test image at <maps>/<obj>/test/<type>/<stem>.tiff, equal to resize_map."""
  root = layouts.make_mvtec_loco(tmp_path / 'loco')
  records = mvtec_loco.scan_category(root, 'pushpins').splits['test']
  rng = np.random.default_rng(0)
  maps = rng.standard_normal((len(records), 24, 24)).astype(np.float32)
  out = paths.maps_dir(tmp_path / 'work')
  got = run_pass(lambda p: [pr.MapWriter(records, root, out)], maps, np.arange(len(records)))
  assert got == {'maps_dir': str(out), 'num_maps': len(records)}
  written = sorted(out.rglob('*.tiff'))
  assert [p.relative_to(out).as_posix() for p in written] == sorted(
      f'pushpins/test/{r["defect_type"]}/{pathlib.Path(r["path"]).stem}.tiff' for r in records)
  for i, r in enumerate(records):
    m = maps_io.read_tiff(maps_io.map_path(out, pathlib.Path(r['path']).relative_to(root)))
    assert m.dtype == np.float32 and m.shape == (layouts.SIZE, layouts.SIZE)
    assert np.array_equal(m, maps_io.resize_map(maps[i], (layouts.SIZE, layouts.SIZE)))
  writer = pr.MapWriter(records, root, out)
  with pytest.raises(RuntimeError, match='3 maps were written'):
    writer.result([1, 2])
  with pytest.raises(errors.DataError, match='not under the benchmark root'):
    pr.MapWriter(records, tmp_path / 'elsewhere', out).add(
        {'maps': maps[:1], 'index': np.array([0])})


def test_ad2_submission_passes_the_checkers_rules(tmp_path):
  """sheet_metal's two private splits (142 images each, as MVTec's checker wants), scored by two
  processes: the tree passes check_ad2_submission for that object; each PNG is the float16 TIFF
  binarised at the threshold. A split with other file names is refused before any work."""
  n = maps_io.AD2_PRIVATE_COUNTS['sheet_metal']
  root = layouts.make_mvtec_ad2(tmp_path / 'ad2', obj='sheet_metal', n_train=1, n_val=1, n_good=1,
                                n_bad=1, n_private=n)
  data = _Data(unlabelled={s: _Folder(sorted((root / 'sheet_metal' / s).iterdir()))
                           for s in mvtec_ad2.PRIVATE_SPLITS})
  out = paths.ad2_submission_dir(tmp_path / 'work')
  rng = np.random.default_rng(0)
  threshold = 0.8
  for split, reducers in pr.submission_reducers(data, 'sheet_metal', out, threshold).items():
    maps = rng.random((n, 16, 16)).astype(np.float32)
    got = run_pass(lambda p: reducers if p == 0 else
                   [pr.Ad2Submission(data.unlabelled[split].paths, 'sheet_metal', split, out, threshold)],
                   maps, np.arange(n), seed=len(split))
    assert got == {f'ad2_submission_{split}': n}
  maps_io.check_ad2_submission(out, objects=('sheet_metal',))
  tiff = maps_io.read_tiff(out / 'anomaly_images/sheet_metal/test_private_mixed/005_mixed.tiff')
  png = np.asarray(Image.open(out / 'anomaly_images_thresholded/sheet_metal/test_private_mixed/005_mixed.png'))
  assert tiff.shape == (layouts.SIZE, layouts.SIZE) and np.array_equal(png, protocols.binarize(tiff, threshold))
  assert 0 < np.count_nonzero(png) < png.size
  short = data.unlabelled['test_private'].paths[:-1]
  with pytest.raises(errors.DataError, match=f'checker wants exactly the {n} images'):
    pr.Ad2Submission(short, 'sheet_metal', 'test_private', out, threshold)
  with pytest.raises(errors.DataError, match='submission holds the objects'):
    pr.Ad2Submission(short, 'bottle', 'test_private', out, threshold)
  pr.check_submission(data, 'sheet_metal')   # what predict checks before scoring: these pass
  fewer = types.SimpleNamespace(unlabelled={**data.unlabelled, 'test_private': types.SimpleNamespace(paths=short)})
  with pytest.raises(errors.DataError, match=f'checker wants exactly the {n} images'):
    pr.check_submission(fewer, 'sheet_metal')


# ------------------------------------------------------------------------------- what runs where
class _Split:
  def __init__(self, records):
    self.records = records


class _Folder:
  def __init__(self, files):
    self.paths = [str(p) for p in files]


class _Data:
  """What the factories read of a datasets.CategoryData."""

  def __init__(self, test=None, validation=None, root=None, unlabelled=None):
    self.test, self.validation, self.root, self.unlabelled = test, validation, root, unlabelled or {}


LAYOUTS = {  # source: (fixture writer, category, scanner)
    'mvtec_loco': (layouts.make_mvtec_loco, 'pushpins', mvtec_loco.scan_category),
    'mvtec_ad2': (layouts.make_mvtec_ad2, 'vial', mvtec_ad2.scan_category),
    'realiad': (layouts.make_realiad, 'audiojack', realiad.scan_category),
    'visa': (layouts.make_visa, 'candle', lambda root, c: visa.scan_category(root, c, '1cls')),
}


@pytest.mark.parametrize('source', list(LAYOUTS))
def test_each_benchmark_runs_its_reducers_and_reports_their_keys(source, tmp_path):
  """The fixture tree of each layout, scanned: the validation and test reducers test_reducers picks
  (with eval.save_maps) run over maps at 32 x 32 and report exactly report_keys(source, True)."""
  make, category, scan = LAYOUTS[source]
  root = make(tmp_path / 'data')
  splits = scan(root, category).splits
  data = _Data(test=_Split(splits['test']), validation=_Split(splits.get('validation', [])), root=root)
  rng = np.random.default_rng(0)

  def maps_of(n):
    return rng.random((n, 32, 32)).astype(np.float32)
  validation = {}
  if pr.validation_reducers(source):
    n = len(data.validation.records)
    validation = run_pass(lambda p: pr.validation_reducers(source), maps_of(n), np.arange(n))
  n = len(data.test.records)
  labels = np.array([r['label'] for r in data.test.records], np.int32)
  masks = np.zeros((n, 32, 32), bool)
  masks[labels == 1, 8:20, 8:20] = True
  out = paths.maps_dir(tmp_path / 'work')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    got = run_pass(lambda p: pr.test_reducers(source, data, tmp_path / 'scratch', p, validation, out),
                   maps_of(n), np.arange(n), masks=masks, labels=labels,
                   scores=rng.random(n).astype(np.float32) + labels)
  assert tuple(got) == pr.report_keys(source, save_maps=True)
  assert got['num_maps'] == n == len(list(out.rglob('*.tiff')))
  assert pr.report_keys(source) == pr.report_keys(source, True)[:-2]
  if source == 'mvtec_loco':
    assert set(got['loco']['au_spro']) == {'logical_anomalies', 'structural_anomalies', 'mean'}
  if source == 'realiad':   # one test sample of 3 views (one not showing its defect), one normal one
    assert got['num_samples'] == 2 and got['sample_auroc'] == 1.0
