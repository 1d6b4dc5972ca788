"""adtr_jax.metrics against scikit-learn and a brute-force threshold-sweep AUPRO."""
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from adtr_jax import metrics


def blobby_case(rng, n=4, size=24, levels=None):
  """[n, size, size] float32 maps correlated with blobby bool masks (several regions, some touching
  only diagonally); `levels` quantises the scores to force many ties."""
  masks = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 2, 2)) > 0.35
  masks[0] = False  # one normal image
  masks[1, 2, 2] = masks[1, 3, 3] = True  # a diagonal pair: one region under 8-connectivity
  maps = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 1, 1)) + 0.4 * masks
  if levels:
    maps = np.round(maps * levels) / levels
  return maps.astype(np.float32), masks


def brute_force_aupro(maps, masks, fpr_limit=0.3):
  """Threshold sweep over every unique score (highest first), trapezoid up to fpr_limit."""
  regions = []
  for m in masks:
    lab, num = ndimage.label(m, structure=np.ones((3, 3)))
    regions += [(lab == r) for r in range(1, num + 1)]
  imgs = [i for i, m in enumerate(masks) for _ in range(ndimage.label(m, np.ones((3, 3)))[1])]
  normal = ~masks
  fpr, pro = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    above = maps >= t
    fpr.append(np.sum(above & normal) / np.sum(normal))
    pro.append(np.mean([np.mean(above[i][r]) for i, r in zip(imgs, regions)]))
  fpr, pro = np.array(fpr), np.array(pro)
  keep = fpr <= fpr_limit
  f, p = fpr[keep], pro[keep]
  k = np.searchsorted(fpr, fpr_limit, 'left')  # first point at or past the limit
  if f[-1] < fpr_limit:
    p_end = pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    f, p = np.r_[f, fpr_limit], np.r_[p, p_end]
  return np.trapezoid(p, f) / fpr_limit


@pytest.mark.parametrize('seed,levels,limit', [(0, None, 0.3), (1, 4, 0.3), (2, 2, 0.3), (3, None, 0.05),
                                                (4, 8, 1.0), (5, 3, 0.3)])
def test_aupro_matches_brute_force(seed, levels, limit):
  maps, masks = blobby_case(np.random.default_rng(seed), levels=levels)
  got = metrics.pixel_metrics(maps, masks, fpr_limit=limit)['pixel_aupro']
  want = brute_force_aupro(maps, masks, limit)
  assert 0.0 <= got <= 1.0
  assert got == pytest.approx(want, abs=1e-9)
  fpr, pro = metrics.pro_curve(maps, masks, fpr_limit=limit)
  assert fpr[-1] == limit and np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
  assert np.trapezoid(pro, fpr) / limit == pytest.approx(got, abs=1e-12)


def test_aupro_limit_cuts_inside_a_tie_group():
  """Many normals share one score across FPR 0.3: the curve is interpolated, never extrapolated."""
  maps, masks = blobby_case(np.random.default_rng(7), levels=1)  # ~5 distinct values
  got = metrics.pixel_metrics(maps, masks)['pixel_aupro']
  assert got == pytest.approx(brute_force_aupro(maps, masks), abs=1e-12)
  assert 0.0 <= got <= 1.0


def test_aupro_extremes_and_constant_map():
  _, masks = blobby_case(np.random.default_rng(0))
  perfect = metrics.pixel_metrics(masks.astype(np.float32), masks)
  assert perfect['pixel_aupro'] == 1.0 and perfect['pixel_auroc'] == 1.0
  assert perfect['pixel_ap'] == 1.0 and perfect['pixel_f1_max'] == 1.0
  inverse = metrics.pixel_metrics(-masks.astype(np.float32), masks)
  assert inverse['pixel_aupro'] == 0.0 and inverse['pixel_auroc'] == 0.0
  # Constant map: every pixel ties, the curve is the diagonal -> AUPRO = limit / 2, AUROC 0.5.
  const = metrics.pixel_metrics(np.zeros(masks.shape, np.float32), masks, fpr_limit=0.3)
  assert const['pixel_aupro'] == pytest.approx(0.15, abs=1e-12)
  assert const['pixel_auroc'] == 0.5
  assert const['pixel_ap'] == pytest.approx(masks.mean())
  fpr, pro = metrics.pro_curve(np.zeros(masks.shape), masks)
  np.testing.assert_allclose(fpr, pro)  # the diagonal
  assert fpr[0] == pro[0] == 0.0 and fpr[-1] == pro[-1] == 1.0


def positional_brute_force(maps, masks, fpr_limit):
  """The MVTec 3D-AD convention with every normal pixel's position as a threshold: FPR = share of the
  sorted normals above the position, PRO = mean over regions of the share strictly above its score,
  the curve closed at (1, 1), trapezoid with the piece holding the limit interpolated."""
  regions, normals = [], []
  for a, m in zip(maps, masks):
    lab, num = ndimage.label(m, structure=np.ones((3, 3)))
    normals.append(a[lab == 0])
    regions += [a[lab == r] for r in range(1, num + 1)]
  normals = np.sort(np.concatenate(normals))[::-1]  # highest first
  fpr = np.r_[np.arange(len(normals)) / len(normals), 1.0]
  pro = np.r_[[np.mean([np.mean(r > t) for r in regions]) for t in normals], 1.0]
  k = np.searchsorted(fpr, fpr_limit, 'right')  # first point past the limit
  f, p = fpr[:k], pro[:k]
  if f[-1] < fpr_limit:
    p_end = pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    f, p = np.r_[f, fpr_limit], np.r_[p, p_end]
  return np.trapezoid(p, f) / fpr_limit


@pytest.mark.parametrize('seed,levels,limit', [(0, None, 0.3), (1, 4, 0.3), (5, 1, 0.3), (4, 8, 1.0)])
def test_positional_ties_match_their_brute_force(seed, levels, limit):
  maps, masks = blobby_case(np.random.default_rng(seed), levels=levels)
  got = metrics.pixel_metrics(maps, masks, fpr_limit=limit, aupro_ties='positional')['pixel_aupro']
  assert got == pytest.approx(positional_brute_force(maps, masks, limit), abs=1e-9)


def test_tie_conventions_pinned_on_a_small_case():
  """One image, 4 normal pixels scoring (0.5, 0.5, 0.5, 0) and one 2-pixel region scoring (0.5, 1).
  merged: the tied block is the straight piece (0, 1/2) -> (3/4, 1); at 0.3 PRO = 0.7, area
  0.3 * (0.5 + 0.7) / 2 = 0.18 -> 0.6. positional: PRO stays 1/2 (only the 1 is strictly above 0.5)
  for positions 0, 1, 2 (FPR 0, 1/4, 1/2) -> area 0.3 * 0.5 = 0.15 -> 0.5."""
  maps = np.array([[[0.5, 0.5, 0.5, 0.0, 0.5, 1.0]]], np.float32)
  masks = np.array([[[0, 0, 0, 0, 1, 1]]], bool)
  merged = metrics.pixel_metrics(maps, masks, aupro_ties='merged')['pixel_aupro']
  positional = metrics.pixel_metrics(maps, masks, aupro_ties='positional')['pixel_aupro']
  assert merged == pytest.approx(0.6, abs=1e-12)
  assert positional == pytest.approx(0.5, abs=1e-12)
  # On continuous maps the two agree up to the 1 / (number of normal pixels) position shift.
  maps, masks = blobby_case(np.random.default_rng(0))
  both = [metrics.pixel_metrics(maps, masks, aupro_ties=t)['pixel_aupro'] for t in metrics.AUPRO_TIES]
  assert abs(both[0] - both[1]) < 2.0 / np.count_nonzero(~masks)
  with pytest.raises(ValueError, match='eval.aupro_ties'):
    metrics.pixel_metrics(maps, masks, aupro_ties='official')


def test_pro_weights_regions_equally():
  """One image, a 1-pixel region found and a 9-pixel region missed: PRO is 1/2, not 1/10."""
  masks = np.zeros((1, 8, 8), bool)
  masks[0, 0, 0] = True
  masks[0, 4:7, 4:7] = True
  maps = np.zeros((1, 8, 8), np.float32)
  maps[0, 0, 0] = 2.0  # above every normal pixel (0); the big region ties with the normals at 0
  fpr, pro = metrics.pro_curve(maps, masks)
  assert pro[np.searchsorted(fpr, 0.0, "right") - 1] == pytest.approx(0.5)
  # From FPR 0 to 1 the curve goes straight from PRO 0.5 to 1 -> area 0.75.
  assert metrics.pixel_metrics(maps, masks, fpr_limit=1.0)['pixel_aupro'] == pytest.approx(0.75)


def test_regions_do_not_connect_across_images():
  """The same blob in two images is two regions: finding one of them gives PRO 1/2."""
  masks = np.zeros((2, 6, 6), bool)
  masks[:, 2:4, 2:4] = True
  maps = np.zeros((2, 6, 6), np.float32)
  maps[0][masks[0]] = 1.0
  maps[1][masks[1]] = -1.0
  fpr, pro = metrics.pro_curve(maps, masks)
  assert pro[np.searchsorted(fpr, 0.0, "right") - 1] == pytest.approx(0.5)


def sklearn_values(scores, labels):
  precision, recall, _ = precision_recall_curve(labels, scores)
  with np.errstate(invalid='ignore'):
    f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
  return roc_auc_score(labels, scores), average_precision_score(labels, scores), f1.max()


@pytest.mark.parametrize('seed', range(8))
def test_image_metrics_equal_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 300))
  labels = rng.random(n) < rng.uniform(0.1, 0.9)
  labels[:2] = [False, True]
  scores = rng.integers(0, int(rng.integers(2, 20)), n) + 0.7 * labels * rng.random(n)
  scores = np.round(scores, 1)  # many ties, also across the classes
  got = metrics.image_metrics(scores, labels)
  auroc, ap, f1 = sklearn_values(scores, labels)
  assert got['image_auroc'] == pytest.approx(auroc, abs=1e-9)
  assert got['image_ap'] == pytest.approx(ap, abs=1e-9)
  assert got['image_f1_max'] == pytest.approx(f1, abs=1e-9)


@pytest.mark.parametrize('seed,levels', [(0, None), (1, 3), (2, 1)])
def test_pixel_ranking_metrics_equal_sklearn(seed, levels):
  maps, masks = blobby_case(np.random.default_rng(seed), n=6, size=32, levels=levels)
  got = metrics.pixel_metrics(maps, masks)
  auroc, ap, f1 = sklearn_values(maps.ravel(), masks.ravel())
  assert got['pixel_auroc'] == pytest.approx(auroc, abs=1e-9)
  assert got['pixel_ap'] == pytest.approx(ap, abs=1e-9)
  assert got['pixel_f1_max'] == pytest.approx(f1, abs=1e-9)


def test_compute_all_keys_and_float64_kept():
  rng = np.random.default_rng(3)
  maps, masks = blobby_case(rng)
  labels = masks.any(axis=(1, 2))
  scores = maps.max(axis=(1, 2))
  only_image = metrics.compute_all(scores, labels)
  assert set(only_image) == {'image_auroc', 'image_ap', 'image_f1_max'}
  both = metrics.compute_all(scores, labels, maps, masks)
  assert set(both) == set(only_image) | set(metrics.PIXEL_KEYS)
  # float64 maps stay float64: values below float32 resolution keep their order.
  fine = maps.astype(np.float64) + masks * 1e-12
  assert (metrics.pixel_metrics(fine, masks)['pixel_auroc']
          == pytest.approx(roc_auc_score(masks.ravel(), fine.ravel()), abs=1e-12))


def test_degenerate_inputs():
  rng = np.random.default_rng(0)
  maps, masks = blobby_case(rng)
  with pytest.raises(ValueError, match='both normal and anomalous'):
    metrics.image_metrics([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match='NaN'):
    metrics.image_metrics([0.1, np.nan], [0, 1])
  with pytest.raises(ValueError, match='NaN or infinite'):
    metrics.image_metrics([0.1, np.inf], [0, 1])
  with pytest.raises(ValueError, match='shape'):
    metrics.image_metrics([0.1, 0.2, 0.3], [0, 1])
  with pytest.raises(ValueError, match='only 0 and 1'):
    metrics.image_metrics([0.1, 0.2], [0, 2])
  bad = maps.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='score maps contains NaN'):
    metrics.pixel_metrics(bad, masks)
  with pytest.raises(ValueError, match='masks has shape'):
    metrics.pixel_metrics(maps, masks[:, :-1])
  with pytest.raises(ValueError, match='3 dimension'):
    metrics.pixel_metrics(maps[0], masks[0])
  with pytest.raises(ValueError, match='fpr_limit'):
    metrics.pixel_metrics(maps, masks, fpr_limit=0.0)
  with pytest.raises(ValueError, match='both score_maps and masks'):
    metrics.compute_all([0.1, 0.2], [0, 1], score_maps=maps[:2])
  with pytest.raises(ValueError, match='images'):
    metrics.compute_all([0.1, 0.2], [0, 1], maps, masks)
  for single in (np.zeros_like(masks), np.ones_like(masks)):
    with pytest.warns(UserWarning, match='single pixel class'):
      out = metrics.pixel_metrics(maps, single)
    assert set(out) == set(metrics.PIXEL_KEYS) and all(np.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match='single pixel class'):
      metrics.pro_curve(maps, single)
  # Image-level-only dataset: the image keys still evaluate, pixel keys are NaN.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    out = metrics.compute_all([0.1, 0.9, 0.2, 0.3], [0, 1, 0, 0], maps, np.zeros_like(masks))
  assert out['image_auroc'] == 1.0 and np.isnan(out['pixel_aupro'])


def test_time_metrics_small():
  out = metrics.time_metrics(n=4, size=32, seed=1)
  assert out['num_pixels'] == 4 * 32 * 32
  assert all(out[k] >= 0 for k in ('image_metrics_s', 'pixel_metrics_s', 'compute_all_s'))
