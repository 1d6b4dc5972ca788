"""adtr_jax.protocols against the official evaluators' recorded figures (tests/protocol_reference.json,
made by experiments/official_metrics.py; docs/protocols.md), brute-force sweeps and ADEval."""
import json
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from adtr_jax import errors, metrics, protocols
from experiments import protocol_cases as cases
from tests.conftest import REPO

REFERENCE = json.loads((REPO / 'tests' / 'protocol_reference.json').read_text())
# The LOCO evaluator's adaptive threshold sampling (curve_max_distance 0.001) puts its command-line
# figures within this of the exact curve on the recorded cases (largest seen: 8.9e-5).
LOCO_CLI_TOL = 2e-4


def _loco_ours(case):
  config = protocols.parse_defects_config(case['config'])
  channels = [protocols.loco_channels(p, config) for p in case['pngs']]
  return protocols.loco_metrics(list(case['maps']), channels, case['types']), channels


def _flat(ours: dict) -> dict:
  out = {f'image_auroc/{k}': v for k, v in ours['image_auroc'].items()}
  for kind, by_limit in ours['au_spro'].items():
    out.update({f'au_spro/{kind}/{float(lim)}': v for lim, v in by_limit.items()})
  return out


@pytest.mark.parametrize('record', REFERENCE['loco'], ids=lambda r: json.dumps(r['case']))
def test_loco_au_spro_equals_the_official_evaluator(record):
  """Every AU-sPRO (both types and their mean, 5 FPR limits) equals the official code's own functions
  run at every distinct score to 1e-9, and its command line (adaptive thresholds) to LOCO_CLI_TOL."""
  case = cases.loco_case(**record['case'])
  assert len(np.unique(case['maps'])) == record['distinct_scores']  # the generator is unchanged
  ours = _flat(_loco_ours(case)[0])
  exact = record['official_exact_thresholds']
  spro_keys = [k for k in exact if k.startswith('au_spro/')]
  assert len(spro_keys) == 3 * len(protocols.LOCO_FPR_LIMITS)
  for k in spro_keys:
    assert ours[k] == pytest.approx(exact[k], abs=1e-9), k
  if isinstance(record['official_cli'], dict):
    for k in spro_keys:
      assert ours[k] == pytest.approx(record['official_cli'][k], abs=LOCO_CLI_TOL), k


@pytest.mark.parametrize('record', REFERENCE['loco'], ids=lambda r: json.dumps(r['case']))
def test_loco_image_auroc_equals_the_official_evaluator_without_ties(record):
  """Image AUROC per type against all good images: the official value where the image scores (map
  maxima) are distinct; with tied scores the official ROC cuts a corner (it takes a point after the first
  score of each tied run), so there ours is the Mann-Whitney value, never below the official one."""
  case = cases.loco_case(**record['case'])
  ours = _flat(_loco_ours(case)[0])
  scores = np.array([m.max() for m in case['maps']])
  types = np.array(case['types'])
  for kind in protocols.LOCO_TYPES:
    rows = (types == 'good') | (types == kind)
    want = roc_auc_score(types[rows] == kind, scores[rows])
    assert ours[f'image_auroc/{kind}'] == pytest.approx(want, abs=1e-12)
    official = record['official_exact_thresholds'][f'image_auroc/{kind}']
    if len(np.unique(scores[rows])) == rows.sum():
      assert ours[f'image_auroc/{kind}'] == pytest.approx(official, abs=1e-12)
    else:
      assert ours[f'image_auroc/{kind}'] >= official - 1e-12
  assert ours['image_auroc/mean'] == pytest.approx(
      0.5 * (ours['image_auroc/logical_anomalies'] + ours['image_auroc/structural_anomalies']))


def brute_force_spro_auc(maps, channels, limit):
  """Threshold sweep over every distinct score (highest first): FPR and mean min(1, TP / S), trapezoid
  up to the limit with the last piece interpolated."""
  normal = [~np.any([c.mask for c in ch], axis=0) if ch else np.ones(m.shape, bool)
            for m, ch in zip(maps, channels)]
  n_normal = sum(int(n.sum()) for n in normal)
  flat = [(m, c) for m, ch in zip(maps, channels) for c in ch]
  fpr, spro = [0.0], [0.0]
  for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
    fpr.append(sum(int(((m >= t) & n).sum()) for m, n in zip(maps, normal)) / n_normal)
    spro.append(np.mean([min(1.0, ((m >= t) & c.mask).sum() / c.saturation_area) for m, c in flat]))
  fpr, spro = np.array(fpr), np.array(spro)
  k = int(np.searchsorted(fpr, limit, 'left'))
  f, p = fpr[:k], spro[:k]
  if k < len(fpr):
    p_end = spro[k - 1] + (spro[k] - spro[k - 1]) * (limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    f, p = np.r_[f, limit], np.r_[p, p_end]
  return np.trapezoid(p, f) / limit


@pytest.mark.parametrize('seed,levels', [(10, None), (11, 3)])
def test_au_spro_matches_a_brute_force_sweep(seed, levels):
  """Overlapping defects, absolute saturation below and above the defect area, relative 0.5 (truncated)."""
  case = cases.loco_case(seed, n_good=2, n_logical=3, n_structural=3, shape=(14, 17), levels=levels)
  _, channels = _loco_ours(case)
  assert any(c.saturation_area < c.mask.sum() for ch in channels for c in ch)  # saturation bites
  maps = list(case['maps'])
  got = protocols.au_spro(maps, channels, (0.05, 0.3, 1.0))
  for lim, value in got.items():
    assert value == pytest.approx(brute_force_spro_auc(maps, channels, lim), abs=1e-12)


def test_au_spro_with_one_unsaturated_defect_per_region_is_pro():
  """Each connected region of a binary mask as its own defect saturating at its full area: sPRO is
  PRO, so AU-sPRO is metrics.pixel_metrics' AUPRO."""
  case = cases.pro_case(seed=4, n=8, size=40, levels=5)
  channels = []
  for mask in case['masks']:
    lab, num = ndimage.label(mask, structure=np.ones((3, 3)))
    channels.append([protocols.DefectChannel(lab == r, int((lab == r).sum()), 'region')
                     for r in range(1, num + 1)])
  got = protocols.au_spro(list(case['maps']), channels, (0.05, 0.3, 1.0))
  for lim, value in got.items():
    want = metrics.pixel_metrics(case['maps'], case['masks'], lim)['pixel_aupro']
    assert value == pytest.approx(want, abs=1e-12)


def test_saturation_areas_and_defect_pngs():
  config = protocols.parse_defects_config(cases.LOCO_DEFECTS)
  rel_half, absolute, huge = config[253], config[254], config[252]
  assert protocols.saturation_area(rel_half, 7) == 3  # int(0.5 * 7): truncated as the official code
  assert protocols.saturation_area(absolute, 100) == 40
  assert protocols.saturation_area(absolute, 25) == 25  # min(t, area)
  assert protocols.saturation_area(huge, 300) == 300
  png_a = np.zeros((5, 6), np.uint8)
  png_a[1:3, 1:4] = 254
  png_b = np.zeros((5, 6), np.uint8)
  png_b[2:5, 3:6] = 253
  chans = protocols.loco_channels([png_a, png_b], config)
  assert [c.name for c in chans] == ['additional_pushpin', 'broken']
  assert [c.saturation_area for c in chans] == [6, 4]
  assert chans[0].mask.sum() == 6 and chans[1].mask.dtype == bool
  two_values = png_a.copy()
  two_values[4, 0] = 253
  with pytest.raises(errors.DataError, match='one non-zero value'):
    protocols.loco_channels([two_values], config, 'gt/logical_anomalies/000')
  with pytest.raises(errors.DataError, match=r'gt/x.*pixel value 7 is not in defects_config'):
    protocols.loco_channels([np.where(png_a > 0, 7, 0).astype(np.uint8)], config, 'gt/x')
  tiny = np.zeros((5, 6), np.uint8)
  tiny[0, 0] = 253  # 1 pixel at relative 0.5 -> int(0.5) = 0
  with pytest.raises(errors.DataError, match='saturates at 0'):
    protocols.loco_channels([tiny], config)


@pytest.mark.parametrize('entry,message', [
    ({'defect_name': 'a', 'pixel_value': 0, 'saturation_threshold': 1.0, 'relative_saturation': True},
     'pixel_value'),
    ({'defect_name': 'a', 'pixel_value': 9, 'saturation_threshold': 10, 'relative_saturation': True},
     'relative saturation_threshold'),
    ({'defect_name': 'a', 'pixel_value': 9, 'saturation_threshold': 0.5, 'relative_saturation': False},
     'absolute saturation_threshold'),
    ({'defect_name': 'a', 'pixel_value': 9, 'relative_saturation': False}, 'lacks'),
])
def test_bad_defects_config_is_named(entry, message):
  with pytest.raises(errors.DataError, match=f'cfg.json: entry 1.*{message}'):
    protocols.parse_defects_config([cases.LOCO_DEFECTS[0], entry], 'cfg.json')
  with pytest.raises(errors.DataError, match='listed twice'):
    protocols.parse_defects_config([cases.LOCO_DEFECTS[0], cases.LOCO_DEFECTS[0]])


def test_loco_metrics_checks_types_against_ground_truth():
  case = cases.loco_case(0, n_good=2, n_logical=2, n_structural=2, shape=(16, 18))
  _, channels = _loco_ours(case)
  with pytest.raises(ValueError, match='good image must have no defect'):
    protocols.loco_metrics(list(case['maps']), channels[::-1], case['types'])


# ------------------------------------------------------------------------------------------ MVTec AD 2
@pytest.mark.parametrize('record', REFERENCE['mvtec_pro'], ids=lambda r: json.dumps(r['case']))
def test_au_pro_equals_mvtec_compute_pro(record):
  """metrics.pixel_metrics' AUPRO ('merged' ties) at 0.05 (MVTec AD 2), 0.3 and 1.0 equals MVTec's
  compute_pro + trapezoid to 1e-7 (that code rounds FPRs to float32; largest seen 3.7e-9)."""
  case = cases.pro_case(**record['case'])
  for lim, want in record['official_au_pro'].items():
    got = metrics.pixel_metrics(case['maps'], case['masks'], float(lim))['pixel_aupro']
    assert got == pytest.approx(want, abs=1e-7), lim
  assert str(protocols.AD2_FPR_LIMIT) in record['official_au_pro']


def test_segf1_threshold_is_mean_plus_three_std_of_validation_pixels():
  rng = np.random.default_rng(0)
  val = [rng.gamma(2.0, 1.5, (13, 17)), rng.gamma(2.0, 1.5, (9, 4)).astype(np.float32),
         1e4 + rng.standard_normal((30, 30))]
  pixels = np.concatenate([np.asarray(v, np.float64).ravel() for v in val])
  assert protocols.segf1_threshold(iter(val)) == pytest.approx(pixels.mean() + 3 * pixels.std(), rel=1e-12)
  assert protocols.segf1_threshold(val, num_std=0.5) == pytest.approx(pixels.mean() + 0.5 * pixels.std(),
                                                                      rel=1e-12)


def test_segf1_is_pixel_f1_over_the_split():
  case = cases.pro_case(seed=5, n=6, size=20, levels=4)
  maps = [m for m in case['maps']] + [np.full((7, 5), 2.0, np.float32)]
  masks = [m for m in case['masks']] + [np.ones((7, 5), bool)]
  threshold = float(np.median(case['maps']))  # a value the maps hold: ties at the threshold
  assert np.any(case['maps'] == threshold)
  pred = np.concatenate([(m > threshold).ravel() for m in maps])
  truth = np.concatenate([m.ravel() for m in masks])
  assert protocols.segf1(maps, masks, threshold) == pytest.approx(f1_score(truth, pred), abs=1e-12)
  assert np.array_equal(protocols.binarize(maps[0], threshold) == 255, maps[0] > threshold)
  with warnings.catch_warnings(record=True):
    warnings.simplefilter('always')
    assert np.isnan(protocols.segf1([np.zeros((3, 3))], [np.zeros((3, 3), bool)], 1.0))


# -------------------------------------------------------------------------------------------- Real-IAD
@pytest.mark.parametrize('record', REFERENCE['adeval'], ids=lambda r: json.dumps(r['case']))
def test_sample_auroc_equals_adeval(record):
  """Sample-level AUROC (max over the 5 views) equals ADEval's s_auroc as recorded from its command
  line, to 1e-12 (its 1000-bin histogram separates these samples' scores)."""
  case = cases.realiad_case(**record['case'])
  got = protocols.sample_metrics(case['scores'], case['labels'], case['sample_ids'], cases.REALIAD_VIEWS)
  assert got['num_samples'] == len(case['scores']) // cases.REALIAD_VIEWS
  assert got['sample_auroc'] == pytest.approx(record['adeval']['s_auroc'], abs=1e-12)


def test_views_group_into_samples():
  paths = ['audiojack/NG/AK/0003/audiojack_0003_NG_AK_C1_20231021.jpg',
           'audiojack/NG/AK/0003/audiojack_0003_NG_AK_C2_20231021.jpg',
           'audiojack/OK/S0001/audiojack_0001_OK_C1_20231021.jpg',
           'pcb/NG/QS/0010/pcb_0010_NG_QS_C5_2023.jpg']
  ids = [protocols.realiad_sample_id(p) for p in paths]
  assert ids == ['audiojack_0003_NG_AK', 'audiojack_0003_NG_AK', 'audiojack_0001_OK', 'pcb_0010_NG_QS']
  # The NG sample's second view does not show the defect (label 0): the sample is still anomalous.
  sample_ids, s, y = protocols.by_sample([0.2, 0.9, 0.5, 0.1], [1, 0, 0, 1], ids)
  assert sample_ids.tolist() == ['audiojack_0001_OK', 'audiojack_0003_NG_AK', 'pcb_0010_NG_QS']
  assert s.tolist() == pytest.approx([0.5, 0.9, 0.1]) and y.tolist() == [False, True, True]
  with pytest.raises(ValueError, match='do not have 2 views'):
    protocols.by_sample([0.2, 0.9, 0.5, 0.1], [1, 0, 0, 1], ids, views_per_sample=2)
  with pytest.raises(errors.DataError, match='not a Real-IAD view name'):
    protocols.realiad_sample_id('audiojack/OK/0001.jpg')


@pytest.mark.slow
def test_sample_auroc_equals_adeval_run_now(tmp_path):
  """ADEval's own command line (grouping by its --sample_key_pat) run now on a fresh case: the same
  sample AUROC. Integer scores 0..1000 put each distinct score in its own bin of ADEval's float32
  1000-bin histogram (with continuous scores it can drop the lowest score below its first edge and
  lose up to 1 / #normal samples, docs/protocols.md). ~20 s (ADEval starts a process per core)."""
  from experiments import official_metrics
  case = cases.realiad_case(seed=7, n_samples=24)
  theirs = official_metrics.official_adeval(case, tmp_path)
  ours = protocols.sample_metrics(case['scores'], case['labels'], case['sample_ids'])
  assert ours['sample_auroc'] == pytest.approx(theirs['s_auroc'], abs=1e-12)
