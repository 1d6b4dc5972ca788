"""Exact anomaly-detection metrics: image/pixel AUROC, AP, F1-max and pixel AUPRO (numpy/scipy only).

All pixel metrics come from two value sorts (normal pixels, anomalous pixels) instead of an argsort of
every pixel: on AVX-512 machines `np.sort` of float32 is far faster than `np.argsort`, and the counts a
ranking curve needs at a threshold t (normals >= t, anomalous >= t, PRO weight >= t) are positions in
those two sorted arrays (`np.searchsorted`). Every curve point is taken where the score changes, so ties
are handled exactly like scikit-learn (`roc_auc_score`, `average_precision_score`,
`precision_recall_curve`), and there is no threshold sweep. AUPRO is the exact trapezoid area of the
PRO(FPR) curve through those points, summed per anomalous pixel (see `_aupro`), so beyond the sorted
normal scores only arrays of the anomalous pixels' size are built (`python -m adtr_jax.benchmark
--metrics` times it, BENCHMARKS.md).

Conventions (all values are fractions in [0, 1]):
- image metrics with a single class present raise ValueError;
- pixel metrics with a single pixel class (no anomalous pixel, or no normal pixel) return NaN for every
  pixel key and warn, so that datasets with image labels only still evaluate;
- NaN or infinite scores, labels other than 0/1, and shape mismatches raise ValueError.
"""
import time
import warnings

import numpy as np
from scipy import ndimage

PIXEL_KEYS = ('pixel_auroc', 'pixel_ap', 'pixel_f1_max', 'pixel_aupro')
# What metrics.json reports per category and averages over them, in table order.
METRIC_KEYS = ('image_auroc', 'image_ap', 'image_f1_max', *PIXEL_KEYS)

# ----------------------------------------------------------------------------------------------- input
def _scores_array(x, name: str, ndim: int) -> np.ndarray:
  """Scores as float64 if given so (exact), else float32; rejects wrong rank and non-finite values."""
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f'{name} must have {ndim} dimension(s), got shape {x.shape}')
  if x.dtype != np.float64:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
      raise ValueError(f'{name} must be numeric, got dtype {x.dtype}')
    x = x.astype(np.float32, copy=False)  # also float16/bfloat16/int inputs: ranks kept exactly
  if x.size == 0:
    raise ValueError(f'{name} is empty')
  if not np.isfinite(x).all():
    raise ValueError(f'{name} contains NaN or infinite values')
  return x


def _binary_array(x, name: str, shape: tuple) -> np.ndarray:
  """A bool array of `shape` from bool or 0/1-valued input."""
  x = np.asarray(x)
  if x.shape != shape:
    raise ValueError(f'{name} has shape {x.shape}, expected {shape} (the shape of the scores)')
  if x.dtype == np.bool_:
    return x
  if not np.issubdtype(x.dtype, np.number) or not np.isin(x, (0, 1)).all():
    raise ValueError(f'{name} must be bool or contain only 0 and 1')
  return x != 0


# ---------------------------------------------------------------------------------- ranking metrics
def _ranking_metrics(neg_asc: np.ndarray, pos_asc: np.ndarray) -> dict:
  """AUROC, AP and F1-max from ascending sorted negative [Nn] and positive [Np] scores (same dtype).

  AUROC is the Mann-Whitney statistic (ties count 1/2), exact in integers. AP and F1-max only need the
  precision-recall points where recall changes, i.e. at each distinct positive value v:
  tp = #positives >= v, fp = #negatives >= v. Points where only negatives enter have the same recall
  (no AP term) and a lower F1, so skipping them changes neither value.
  """
  n_neg, n_pos = len(neg_asc), len(pos_asc)
  below = np.searchsorted(neg_asc, pos_asc, 'left')  # [Np] negatives strictly below each positive
  not_above = np.searchsorted(neg_asc, pos_asc, 'right')  # ... below or tied
  auroc = int(below.sum(dtype=np.int64) + not_above.sum(dtype=np.int64)) / (2.0 * n_pos * n_neg)
  starts = np.flatnonzero(np.r_[True, pos_asc[1:] != pos_asc[:-1]])  # groups of equal positives
  tp = (n_pos - starts).astype(np.float64)
  fp = (n_neg - below[starts]).astype(np.float64)
  d_tp = np.diff(np.r_[starts, n_pos])
  ap = float(np.sum(d_tp * (tp / (tp + fp)))) / n_pos
  f1_max = float(np.max(2.0 * tp / (tp + fp + n_pos)))  # = 2PR / (P + R)
  return {'auroc': auroc, 'ap': ap, 'f1_max': f1_max}


def image_metrics(scores, labels) -> dict:
  """Image-level AUROC, AP and F1-max.

  scores: [N] anomaly scores (higher = more anomalous); labels: [N] bool or 0/1 (1 = anomalous).
  Returns {'image_auroc', 'image_ap', 'image_f1_max'}; equal to scikit-learn's `roc_auc_score`,
  `average_precision_score` and the max F1 over `precision_recall_curve`.
  Raises ValueError when only one class is present (the metrics are undefined).
  """
  scores = _scores_array(scores, 'image scores', 1)
  labels = _binary_array(labels, 'image labels', scores.shape)
  n_pos = int(labels.sum())
  if n_pos in (0, len(labels)):
    raise ValueError(f'image metrics need both normal and anomalous images; got {n_pos} anomalous '
                     f'of {len(labels)}')
  m = _ranking_metrics(np.sort(scores[~labels]), np.sort(scores[labels]))
  return {'image_auroc': m['auroc'], 'image_ap': m['ap'], 'image_f1_max': m['f1_max']}


# ------------------------------------------------------------------------------------- pixel metrics
def _split_pixels(score_maps, masks):
  """Sorted normal scores [Nn], sorted anomalous scores [Na], their PRO weights [Na] and suffix sums.

  A pixel of region r weighs 1 / (num_regions * area_r) (weights sum to 1); suffix [Na + 1]:
  suffix[i] = weight of pos_asc[i:], with suffix[0] == 1 exactly and suffix[Na] == 0.
  Returns None for a single pixel class.
  """
  maps = _scores_array(score_maps, 'score maps', 3)
  masks = _binary_array(masks, 'masks', maps.shape)
  n_pos = int(np.count_nonzero(masks))
  if n_pos in (0, masks.size):
    return None
  # Region id of every anomalous pixel, in the C order of maps[masks]; labelled image by image so the
  # int32 label array is one image, not the whole stack.
  region_ids, num_regions = [], 0
  for m in masks[masks.any(axis=(1, 2))]:
    labels, num = ndimage.label(m, structure=np.ones((3, 3), bool))  # 8-connectivity
    region_ids.append(labels[m] + (num_regions - 1))
    num_regions += num
  region_of_pixel = np.concatenate(region_ids)  # [Na] in 0..R-1
  inv_area = 1.0 / np.bincount(region_of_pixel, minlength=num_regions)  # [R]
  pos = maps[masks]
  order = np.argsort(pos)  # the anomalous pixels only: weights must follow their scores
  pos_asc = pos[order]
  weights = inv_area[region_of_pixel[order]]
  del pos, order, region_of_pixel
  suffix = np.empty(n_pos + 1)
  suffix[:-1] = np.cumsum(weights[::-1])[::-1]
  suffix[-1] = 0.0
  weights /= suffix[0]  # suffix[0] = num_regions up to rounding
  suffix /= suffix[0]  # x / x == 1 exactly, and division keeps the sums monotone, so PRO <= 1
  neg_asc = maps[~masks]
  neg_asc.sort()
  return neg_asc, pos_asc, weights, suffix


def _normals_reaching(n_neg: int, fpr_limit: float) -> int:
  """How many normal pixels (highest first) make the FPR reach fpr_limit."""
  needed = min(int(np.ceil(fpr_limit * n_neg)), n_neg)
  if needed < n_neg and needed / n_neg < fpr_limit:  # rounding in the product: one more only adds
    needed += 1  # a zero-width piece, one too few would extrapolate
  return needed


def _pro_segments(neg_asc, pos_asc, suffix, fpr_limit: float):
  """The PRO curve's segments over FPR, one per distinct normal value v, highest v first.

  Lowering the threshold to v adds the normals equal to v (FPR: f0 -> f1) and the anomalous pixels equal
  to v (PRO: p0 -> p1), so the segment is straight from (f0, p0) to (f1, p1); anomalous pixels between two
  normal values make a vertical step (no area) between segments. Only segments starting below fpr_limit
  are returned: f0, f1, p0, p1 as [G] float64 arrays.
  """
  n_neg = len(neg_asc)
  v_cut = neg_asc[n_neg - _normals_reaching(n_neg, fpr_limit)]
  top = neg_asc[np.searchsorted(neg_asc, v_cut, 'left'):][::-1]  # [T] descending, ties with v_cut in
  ends = np.flatnonzero(np.r_[top[1:] != top[:-1], True])  # last index of each group of equal values
  values = top[ends]
  f1 = (ends + 1) / n_neg
  f0 = np.r_[0.0, f1[:-1]]
  p0 = suffix[np.searchsorted(pos_asc, values, 'right')]  # anomalous pixels > v
  p1 = suffix[np.searchsorted(pos_asc, values, 'left')]  # anomalous pixels >= v
  return f0, f1, p0, p1


def _aupro(neg_asc, pos_asc, weights, suffix, fpr_limit: float) -> float:
  """Area under PRO(FPR) from 0 to exactly fpr_limit (last segment interpolated), / fpr_limit.

  The trapezoid sum over the segments of `_pro_segments` without building them: let v_cut be the normal
  value whose segment holds fpr_limit. Each normal pixel n above v_cut adds
  (PRO(> v_n) + PRO(>= v_n)) / (2 * Nn); swapping the sums, each anomalous pixel i adds
  w_i * (#normals in (v_cut, s_i) + #normals in (v_cut, s_i]) / (2 * Nn), which needs only [Na]-sized
  arrays. The segment of v_cut is then added up to fpr_limit by linear interpolation.
  """
  n_neg = len(neg_asc)
  v_cut = neg_asc[n_neg - _normals_reaching(n_neg, fpr_limit)]
  cut_lo, cut_hi = np.searchsorted(neg_asc, v_cut, 'left'), np.searchsorted(neg_asc, v_cut, 'right')
  lt = np.maximum(np.searchsorted(neg_asc, pos_asc, 'left') - cut_hi, 0)
  le = np.maximum(np.searchsorted(neg_asc, pos_asc, 'right') - cut_hi, 0)
  area = float(np.dot(weights, lt + le)) / (2.0 * n_neg)
  f0, f1 = (n_neg - cut_hi) / n_neg, (n_neg - cut_lo) / n_neg
  p0 = suffix[np.searchsorted(pos_asc, v_cut, 'right')]
  p1 = suffix[np.searchsorted(pos_asc, v_cut, 'left')]
  p_limit = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
  area += (fpr_limit - f0) * (p0 + p_limit) / 2.0
  return float(min(area / fpr_limit, 1.0))  # min: only float rounding can pass 1


def _aupro_positional(neg_asc, pos_asc, suffix, fpr_limit: float) -> float:
  """AUPRO with the MVTec 3D-AD evaluation's tie convention, at every threshold position.

  That code sorts the normal scores and, at threshold position j (the j-th highest normal, j = 0..Nn-1),
  takes FPR = j / Nn by position and PRO = fraction of region pixels scoring strictly above that normal's
  score; the curve ends at (1, 1). Within a block of tied normal scores the FPR advances by position
  while the PRO stays at its value above the tie, so a tied block is a horizontal step instead of the
  straight segment of `_aupro`. (Their code samples `num_thresholds` of these positions; this takes all.)
  On continuous maps the two conventions differ by O(1 / Nn).
  """
  n_neg = len(neg_asc)
  last = min(int(np.floor(fpr_limit * n_neg)) + 1, n_neg)  # positions j = 0..last-1 reach the limit
  thresholds = neg_asc[::-1][:last + 1]  # highest first, one position past the limit if there is one
  pro = suffix[np.searchsorted(pos_asc, thresholds, 'right')]  # PRO above each threshold
  fpr = np.arange(len(pro)) / n_neg
  if len(pro) == n_neg:  # the curve's end point
    fpr, pro = np.r_[fpr, 1.0], np.r_[pro, 1.0]
  k = int(np.searchsorted(fpr, fpr_limit, 'right'))  # fpr[:k] <= fpr_limit (fpr increases)
  area = float(np.sum((pro[1:k] + pro[:k - 1]) * np.diff(fpr[:k])) / 2.0)
  if fpr[k - 1] < fpr_limit:  # the piece that holds the limit, interpolated as their trapezoid does
    p_limit = pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    area += (fpr_limit - fpr[k - 1]) * (pro[k - 1] + p_limit) / 2.0
  return float(min(area / fpr_limit, 1.0))


AUPRO_TIES = ('merged', 'positional')


def _check_fpr_limit(fpr_limit: float) -> float:
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f'fpr_limit must be in (0, 1], got {fpr_limit}')
  return float(fpr_limit)


def pixel_metrics(score_maps, masks, fpr_limit: float = 0.3, aupro_ties: str = 'merged') -> dict:
  """Pixel-level AUROC, AP, F1-max and AUPRO up to FPR `fpr_limit`.

  score_maps: [N, H, W] (float32 is kept; float64 is kept for exactness; others become float32);
  masks: [N, H, W] bool or 0/1 ground truth. AUROC/AP/F1-max treat all pixels of all images as one set
  (scikit-learn's definitions). AUPRO: PRO(t) = mean over the connected ground-truth regions of all images
  (8-connectivity, per image) of the fraction of the region's pixels scoring >= t; FPR(t) = fraction of
  normal pixels scoring >= t; the area under PRO(FPR) from 0 to exactly fpr_limit (linear interpolation
  of the curve at fpr_limit) divided by fpr_limit. A constant map gives AUROC 0.5 and AUPRO
  fpr_limit / 2 (the diagonal), a perfect map AUPRO 1, a map ranking every normal pixel above every
  anomalous one AUPRO 0.
  aupro_ties: 'merged' (the above; tied scores form one straight piece of the curve, as in the MVTec AD
  evaluation code, which keeps one curve point per distinct score) or 'positional' (the MVTec 3D-AD
  evaluation code's convention, see `_aupro_positional`). Both agree on continuous maps to O(1 / Nn); on
  maps with many tied scores 'positional' is lower.
  Returns NaN for every key, with a warning, when the masks hold no anomalous or no normal pixel.
  """
  fpr_limit = _check_fpr_limit(fpr_limit)
  if aupro_ties not in AUPRO_TIES:
    raise ValueError(f'aupro_ties={aupro_ties!r} must be one of {AUPRO_TIES} (config field eval.aupro_ties)')
  split = _split_pixels(score_maps, masks)
  if split is None:
    warnings.warn('pixel metrics are undefined: the masks hold a single pixel class '
                  '(no anomalous or no normal pixel); returning NaN', stacklevel=2)
    return {k: float('nan') for k in PIXEL_KEYS}
  neg_asc, pos_asc, weights, suffix = split
  m = _ranking_metrics(neg_asc, pos_asc)
  aupro = (_aupro(neg_asc, pos_asc, weights, suffix, fpr_limit) if aupro_ties == 'merged'
           else _aupro_positional(neg_asc, pos_asc, suffix, fpr_limit))
  return {'pixel_auroc': m['auroc'], 'pixel_ap': m['ap'], 'pixel_f1_max': m['f1_max'],
          'pixel_aupro': aupro}


def pro_curve(score_maps, masks, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """The exact PRO curve for plotting: (fpr [K], pro [K]) float64, non-decreasing, from (0, 0).

  Same definitions as `pixel_metrics`; points where the score changes (both ends of each straight
  piece), cut at exactly fpr_limit by linear interpolation. With fpr_limit=1 it ends at (1, 1).
  `np.trapezoid(pro, fpr) / fpr_limit` equals pixel_metrics' AUPRO. Raises ValueError for a single pixel
  class (nothing to plot).
  """
  fpr_limit = _check_fpr_limit(fpr_limit)
  split = _split_pixels(score_maps, masks)
  if split is None:
    raise ValueError('no PRO curve: the masks hold a single pixel class')
  neg_asc, pos_asc, _, suffix = split
  f0, f1, p0, p1 = _pro_segments(neg_asc, pos_asc, suffix, fpr_limit)
  p1[-1] = p0[-1] + (p1[-1] - p0[-1]) * (fpr_limit - f0[-1]) / (f1[-1] - f0[-1])
  f1[-1] = fpr_limit
  fpr = np.r_[0.0, np.column_stack([f0, f1]).ravel()]
  pro = np.r_[0.0, np.column_stack([p0, p1]).ravel()]
  if fpr_limit == 1.0:  # anomalous pixels below every normal one: the last vertical step to PRO 1
    fpr, pro = np.r_[fpr, 1.0], np.r_[pro, 1.0]
  return fpr, pro


def compute_all(image_scores, image_labels, score_maps=None, masks=None,
                fpr_limit: float = 0.3, aupro_ties: str = 'merged') -> dict:
  """Image metrics, plus pixel metrics when both score_maps [N, H, W] and masks [N, H, W] are given.

  Image-level errors raise (see `image_metrics`); pixel keys are NaN when the masks hold one class.
  """
  out = image_metrics(image_scores, image_labels)
  if (score_maps is None) != (masks is None):
    raise ValueError('pass both score_maps and masks for pixel metrics, or neither')
  if score_maps is not None:
    if np.shape(score_maps)[:1] != np.shape(image_scores)[:1]:
      raise ValueError(f'score_maps has {np.shape(score_maps)[:1]} images but image_scores has '
                       f'{np.shape(image_scores)[:1]}')
    out.update(pixel_metrics(score_maps, masks, fpr_limit, aupro_ties))
  return out


# -------------------------------------------------------------------------------------------- timing
def synthetic_case(n: int = 150, size: int = 256, seed: int = 0):
  """A realistic random test set: half the images hold 1-3 elliptic defects; scores are smooth noise
  that is higher inside defects. Returns image_scores [n], image_labels [n] bool,
  score_maps [n, size, size] float32 and masks [n, size, size] bool."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  masks = np.zeros((n, size, size), bool)
  labels = np.arange(n) % 2 == 1
  for i in np.flatnonzero(labels):
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.uniform(0.15, 0.85, 2)
      ry, rx = rng.uniform(0.02, 0.12, 2)
      masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
  maps = rng.standard_normal((n, size, size), dtype=np.float32)
  ndimage.gaussian_filter(maps, sigma=(0, 4, 4), output=maps)
  maps += 0.15 * ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3, 3))
  image_scores = maps.reshape(n, -1).max(axis=1)
  return image_scores, labels, maps, masks


def time_metrics(n: int = 150, size: int = 256, seed: int = 0) -> dict:
  """Seconds taken by image_metrics, pixel_metrics and compute_all on `synthetic_case(n, size, seed)`."""
  image_scores, labels, maps, masks = synthetic_case(n, size, seed)
  out = {'num_pixels': int(maps.size), 'anomalous_pixel_fraction': float(masks.mean())}
  for name, fn in (('image_metrics_s', lambda: image_metrics(image_scores, labels)),
                   ('pixel_metrics_s', lambda: pixel_metrics(maps, masks)),
                   ('compute_all_s', lambda: compute_all(image_scores, labels, maps, masks))):
    start = time.perf_counter()
    fn()
    out[name] = time.perf_counter() - start
  return out
