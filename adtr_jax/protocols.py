"""The benchmarks' own metrics: MVTec LOCO AD's sPRO, MVTec AD 2's AU-PRO@0.05 and SegF1, Real-IAD's
sample level (numpy only; docs/protocols.md says where each reference figure came from).

- **sPRO (MVTec LOCO AD).** Each defect of an image is one ground-truth PNG whose single pixel value
  names an entry of the object's defects_config.json: {defect_name, pixel_value, saturation_threshold,
  relative_saturation}. A defect of area A saturates at S = int(t * A) pixels (relative, t in (0, 1]) or
  S = min(t, A) (absolute, t an integer), and sPRO(t) = mean over every defect of every image of
  min(1, TP(t) / S). FPR(t) counts the pixels outside every defect of their image (good images: all
  pixels). `au_spro` is the area under sPRO(FPR) from 0 to each FPR limit, divided by the limit, with
  the curve taken at every distinct score (exact; the official evaluator samples thresholds
  adaptively, so its figures are within ~1e-4 of these, see docs/protocols.md).
- **AU-PRO@0.05 (MVTec AD 2)** is `metrics.pixel_metrics(maps, masks, fpr_limit=AD2_FPR_LIMIT)
  ['pixel_aupro']`: MVTec's `compute_pro` keeps one curve point per distinct score (our 'merged' ties)
  and `trapezoid` interpolates linearly at the limit, as ours does; it only rounds FPRs to float32.
- **SegF1 (MVTec AD 2)**: the pixel F1 of the maps binarised at one threshold, TP/FP/FN summed over
  every pixel of the split; the threshold is chosen on validation/good (`segf1_threshold`).
- **Real-IAD sample level** (ADEval's): the views of one physical sample share a sample id; the
  sample's score and label are the max over its views (`by_sample`, `sample_metrics`).

Every value is exact (ties as in `metrics`, ranks from sorted scores); image metrics come from
`metrics.image_metrics`.
"""
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from adtr_jax import errors, metrics, moments

# ----------------------------------------------------------------------------------- MVTec LOCO AD
LOCO_FPR_LIMITS = (0.01, 0.05, 0.1, 0.3, 1.0)  # the official evaluator's MAX_FPRS
LOCO_TYPES = ('logical_anomalies', 'structural_anomalies')


class DefectSpec(NamedTuple):
  """One entry of defects_config.json."""
  name: str
  pixel_value: int
  saturation_threshold: float | int
  relative: bool


class DefectChannel(NamedTuple):
  """One defect of one image: its mask bool [H, W], saturation area in pixels (>= 1), and name."""
  mask: np.ndarray
  saturation_area: int
  name: str


def parse_defects_config(entries, source: str = 'defects_config.json') -> dict[int, DefectSpec]:
  """The parsed list of a LOCO object's defects_config.json -> {pixel value: DefectSpec}.

  Each entry needs defect_name, pixel_value (1..255), saturation_threshold and relative_saturation:
  a relative threshold is a fraction in (0, 1] of the defect's area, an absolute one an integer number of
  pixels >= 1 (the official evaluator's checks). A pixel value listed twice is an error (the official
  code would silently keep the last). Raises DataError naming `source` and the entry.
  """
  if not isinstance(entries, list) or not entries:
    raise errors.DataError(f'{source}: expected a non-empty JSON list of defect entries')
  out = {}
  for i, e in enumerate(entries):
    where = f'{source}: entry {i}'
    missing = [k for k in ('defect_name', 'pixel_value', 'saturation_threshold', 'relative_saturation')
               if not isinstance(e, dict) or k not in e]
    if missing:
      raise errors.DataError(f'{where} lacks {missing}')
    value, t, relative = e['pixel_value'], e['saturation_threshold'], e['relative_saturation']
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
      raise errors.DataError(f'{where}: pixel_value={value!r} must be an integer in 1..255')
    if not isinstance(relative, bool):
      raise errors.DataError(f'{where}: relative_saturation={relative!r} must be true or false')
    if relative and not (isinstance(t, float) and 0.0 < t <= 1.0):
      raise errors.DataError(f'{where}: a relative saturation_threshold must be a fraction in (0, 1], '
                             f'got {t!r}')
    if not relative and not (isinstance(t, int) and not isinstance(t, bool) and t >= 1):
      raise errors.DataError(f'{where}: an absolute saturation_threshold must be an integer >= 1 '
                             f'(pixels), got {t!r}')
    if value in out:
      raise errors.DataError(f'{where}: pixel_value {value} is listed twice')
    out[value] = DefectSpec(str(e['defect_name']), value, t, relative)
  return out


def saturation_area(spec: DefectSpec, area: int) -> int:
  """Pixels of a defect of `area` pixels that saturate its sPRO: int(t * area) (relative, truncated as
  the official evaluator does) or min(t, area) (absolute)."""
  return int(spec.saturation_threshold * area) if spec.relative else min(spec.saturation_threshold, area)


def loco_channels(pngs: Sequence[np.ndarray], config: Mapping[int, DefectSpec],
                  source: str = 'ground truth') -> list[DefectChannel]:
  """An anomalous image's defect PNGs (integer [H, W] each, 0 = no defect, one other value) -> channels.

  Raises DataError naming `source` for a PNG that is not 2-D, holds no defect pixel or several
  values, a value missing from the config, or a defect too small to saturate (int(t * area) == 0).
  """
  out = []
  for k, png in enumerate(pngs):
    png = np.asarray(png)
    where = f'{source} (defect PNG {k})'
    if png.ndim != 2 or not np.issubdtype(png.dtype, np.integer):
      raise errors.DataError(f'{where}: expected a single-channel integer image, got {png.dtype} '
                             f'{png.shape}')
    values = np.unique(png)
    positive = values[values != 0]
    if len(positive) != 1:
      raise errors.DataError(f'{where}: a defect PNG holds one non-zero value, found {positive.tolist()}')
    value = int(positive[0])
    if value not in config:
      raise errors.DataError(f'{where}: pixel value {value} is not in defects_config.json '
                             f'(values {sorted(config)})')
    mask = png != 0
    sat = saturation_area(config[value], int(np.count_nonzero(mask)))
    if sat < 1:
      raise errors.DataError(f'{where}: defect {config[value].name!r} of {np.count_nonzero(mask)} pixels '
                             f'saturates at {sat} pixels (relative threshold too small)')
    out.append(DefectChannel(mask, sat, config[value].name))
  return out


def _spro_split(maps: Sequence[np.ndarray], channels: Sequence[Sequence[DefectChannel]]):
  """Sorted normal scores [Nn], sorted defect-pixel entries [Nd], their weights [Nd], suffix [Nd + 1].

  sPRO(t) = (1/D) sum_d min(TP_d(t), S_d) / S_d, and at any threshold the pixels of defect d scoring
  >= t are its highest-scoring ones, so min(TP_d(t), S_d) counts those among its S_d highest: giving
  weight 1 / (D * S_d) to each of those S_d pixels (0 to the rest) makes sPRO(t) the weight scoring >= t,
  the shape `metrics._aupro` integrates. Pixels in two defects of an image count once per defect;
  a pixel is normal when it is in no defect of its image.
  """
  if len(maps) != len(channels):
    raise ValueError(f'{len(maps)} score maps but {len(channels)} ground-truth entries')
  neg, pos, weights = [], [], []
  num_defects = sum(len(c) for c in channels)
  if num_defects == 0:
    raise ValueError('sPRO needs at least one defect')
  for i, (score_map, chans) in enumerate(zip(maps, channels)):
    normal, defect, w = spro_pixels(metrics._scores_array(score_map, f'score map {i}', 2), chans,
                                    f'image {i}')
    neg.append(normal)
    pos.append(defect)
    weights.append(w / num_defects)
  neg_asc = np.sort(np.concatenate(neg))
  if len(neg_asc) == 0:
    raise ValueError('sPRO needs at least one defect-free pixel (the FPR is undefined)')
  pos = np.concatenate(pos)
  order = np.argsort(pos, kind='stable')
  pos_asc, w = pos[order], np.concatenate(weights)[order]
  suffix = np.empty(len(w) + 1)
  suffix[:-1] = np.cumsum(w[::-1])[::-1]
  suffix[-1] = 0.0
  w /= suffix[0]  # suffix[0] == 1 up to rounding; dividing keeps sPRO <= 1 and the sums monotone
  suffix /= suffix[0]
  return neg_asc, pos_asc, w, suffix


def spro_pixels(score_map: np.ndarray, channels: Sequence[DefectChannel], where: str = 'image'):
  """One image's pixels as sPRO counts them: (normal scores [n]: the pixels outside every defect,
  which make the FPR; defect scores [m]: each defect's saturation_area highest scores; their weights
  [m] float64: 1 / saturation_area). sPRO(t) is then the weight of the defect scores >= t over the
  number of defects (see `_spro_split`); a defect's pixels beyond its S highest carry no weight and are
  left out. A pixel in two defects counts once per defect. score_map [H, W]; ValueError naming `where`
  for a defect mask of another shape or a saturation area < 1."""
  defect = np.zeros(score_map.shape, bool)
  pos, weights = [np.zeros(0, score_map.dtype)], [np.zeros(0)]
  for ch in channels:
    if ch.mask.shape != score_map.shape:
      raise ValueError(f'{where}: defect {ch.name!r} mask has shape {ch.mask.shape}, its score map '
                       f'{score_map.shape}')
    if ch.saturation_area < 1:
      raise ValueError(f'{where}: defect {ch.name!r} has saturation area {ch.saturation_area} < 1')
    defect |= ch.mask
    top = np.sort(score_map[ch.mask])[::-1][:ch.saturation_area]   # ties: any S of them, same values
    pos.append(top)
    weights.append(np.full(len(top), 1.0 / ch.saturation_area))
  return score_map[~defect], np.concatenate(pos), np.concatenate(weights)


def au_spro(maps: Sequence[np.ndarray], channels: Sequence[Sequence[DefectChannel]],
            fpr_limits: Iterable[float] = LOCO_FPR_LIMITS) -> dict[float, float]:
  """Area under the sPRO curve up to each FPR limit, divided by the limit: {limit: value in [0, 1]}.

  maps: N score maps [H_i, W_i] (any sizes); channels: N lists of `DefectChannel` (the image's defects,
  [] for a good image). Exact: the curve through every distinct score, straight between them (tied
  scores form one straight piece, as the official evaluator's linear interpolation between thresholds
  does), cut at exactly each limit by linear interpolation (its `trapz(x_max=...)`).
  """
  neg_asc, pos_asc, w, suffix = _spro_split(maps, channels)
  return {float(lim): metrics._aupro(neg_asc, pos_asc, w, suffix, metrics._check_fpr_limit(lim))
          for lim in fpr_limits}


def loco_metrics(maps: Sequence[np.ndarray], channels: Sequence[Sequence[DefectChannel]],
                 image_types: Sequence[str], image_scores=None,
                 fpr_limits: Iterable[float] = LOCO_FPR_LIMITS) -> dict:
  """MVTec LOCO AD's report: image AUROC and AU-sPRO for logical and structural anomalies, and their mean.

  maps [H_i, W_i] x N, channels (see `au_spro`), image_types [N] each 'good' or one of LOCO_TYPES.
  As the official evaluator does, each anomaly type is scored against ALL good test images (its images
  plus the good ones) and 'mean' is the plain mean of the two types. image_scores [N]: the default is
  each map's maximum (the official image score). Returns
  {'image_auroc': {'logical_anomalies': a, 'structural_anomalies': b, 'mean': (a + b) / 2},
   'au_spro': {'logical_anomalies': {limit: v}, 'structural_anomalies': {...}, 'mean': {...}}}.
  """
  image_types = list(image_types)
  if not len(maps) == len(channels) == len(image_types):
    raise ValueError(f'{len(maps)} maps, {len(channels)} ground-truth entries, {len(image_types)} types')
  for i, (t, chans) in enumerate(zip(image_types, channels)):
    if t not in ('good',) + LOCO_TYPES:
      raise ValueError(f'image {i}: type {t!r} is not good or one of {LOCO_TYPES}')
    if (t == 'good') != (len(chans) == 0):
      raise ValueError(f'image {i}: a {t} image must have {"no" if t == "good" else "at least one"} defect')
  if image_scores is None:
    image_scores = [float(np.max(m)) for m in maps]
  image_scores = np.asarray(image_scores)
  fpr_limits = tuple(float(x) for x in fpr_limits)
  good = [i for i, t in enumerate(image_types) if t == 'good']
  out = {'image_auroc': {}, 'au_spro': {}}
  for kind in LOCO_TYPES:
    rows = good + [i for i, t in enumerate(image_types) if t == kind]
    labels = np.asarray([image_types[i] != 'good' for i in rows])
    out['image_auroc'][kind] = metrics.image_metrics(image_scores[rows], labels)['image_auroc']
    out['au_spro'][kind] = au_spro([maps[i] for i in rows], [channels[i] for i in rows], fpr_limits)
  out['image_auroc']['mean'] = 0.5 * sum(out['image_auroc'][k] for k in LOCO_TYPES)
  out['au_spro']['mean'] = {lim: 0.5 * sum(out['au_spro'][k][lim] for k in LOCO_TYPES)
                            for lim in fpr_limits}
  return out


# --------------------------------------------------------------------------------------- MVTec AD 2
AD2_FPR_LIMIT = 0.05  # AU-PRO@0.05: metrics.pixel_metrics(maps, masks, fpr_limit=AD2_FPR_LIMIT)
SEGF1_NUM_STD = 3.0


def segf1_threshold(validation_maps: Iterable[np.ndarray], num_std: float = SEGF1_NUM_STD) -> float:
  """The SegF1 binarisation threshold: mean + num_std * std of every pixel score of the validation/good
  maps (population std), MVTec AD 2's suggested baseline. Taken on the maps at the resolution they are
  binarised at. Accumulated map by map in float64 (`moments.Moments`, Chan et al.'s pairwise
  update), so the maps are never stacked."""
  acc = moments.Moments(1)
  for i, score_map in enumerate(validation_maps):
    acc.add(metrics._scores_array(score_map, f'validation map {i}', 2)[..., None])
  return threshold_of(acc, num_std)


def threshold_of(pixel_moments: moments.Moments, num_std: float = SEGF1_NUM_STD) -> float:
  """mean + num_std * std (population) of the pixel scores whose moments (one channel) are given."""
  if pixel_moments.count == 0:
    raise ValueError('segf1_threshold needs at least one validation map')
  return float(pixel_moments.mean[0] + num_std * pixel_moments.std[0])


def binarize(score_map: np.ndarray, threshold: float) -> np.ndarray:
  """uint8 [H, W]: 255 where the score is above the threshold (> as `predictions.decide`), else 0."""
  return np.where(np.asarray(score_map) > threshold, np.uint8(255), np.uint8(0))


def segf1(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> float:
  """Pixel F1 = 2TP / (2TP + FP + FN) of maps [H_i, W_i] binarised at `threshold` (score > threshold)
  against masks [H_i, W_i] (bool, or > 0 = anomalous), the counts summed over every pixel of the split.
  NaN with a warning when there is nothing to find and nothing found (the F1 is undefined)."""
  if len(maps) != len(masks):
    raise ValueError(f'{len(maps)} score maps but {len(masks)} masks')
  counts = np.zeros(3, np.int64)
  for i, (score_map, mask) in enumerate(zip(maps, masks)):
    counts += segf1_counts(metrics._scores_array(score_map, f'score map {i}', 2), mask, threshold,
                           f'image {i}')
  return f1_of_counts(*counts)


def segf1_counts(maps: np.ndarray, masks: np.ndarray, threshold: float, where: str = 'maps') -> np.ndarray:
  """int64 [3]: (TP, FP, FN) of maps [..., H, W] binarised at `threshold` (score > threshold) against
  masks of the same shape (bool, or > 0 = anomalous). ValueError naming `where` for other shapes."""
  masks = np.asarray(masks)
  if masks.shape != np.shape(maps):
    raise ValueError(f'{where}: mask shape {masks.shape} differs from its map {np.shape(maps)}')
  pred, truth = np.asarray(maps) > threshold, masks > 0
  return np.array([np.count_nonzero(pred & truth), np.count_nonzero(pred & ~truth),
                   np.count_nonzero(~pred & truth)], np.int64)


def f1_of_counts(tp: int, fp: int, fn: int) -> float:
  """SegF1 = 2TP / (2TP + FP + FN) from counts summed over a split; NaN with a warning when there is
  nothing to find and nothing found."""
  tp, fp, fn = int(tp), int(fp), int(fn)
  if 2 * tp + fp + fn == 0:
    warnings.warn('SegF1 is undefined: no anomalous pixel in the masks and none predicted', stacklevel=2)
    return float('nan')
  return 2.0 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------------------- Real-IAD
# ADEval's pattern for a Real-IAD sample id in an image path (README of PyPI adeval 1.1.0): the file
# name <category>_<4-digit id>_<status, e.g. OK or NG_AK>_C<view>_<time>: the id is everything before _C<view>_.
REALIAD_SAMPLE_PATTERN = r'([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_'
_REALIAD_SAMPLE_RE = re.compile(REALIAD_SAMPLE_PATTERN)


def realiad_sample_id(image_path: str) -> str:
  """The sample id of a Real-IAD view, e.g. '.../audiojack_0001_NG_AK_C1_20231021.jpg' ->
  'audiojack_0001_NG_AK' (first match of REALIAD_SAMPLE_PATTERN, as ADEval's --sample_key_pat)."""
  match = _REALIAD_SAMPLE_RE.search(str(image_path))
  if match is None:
    raise errors.DataError(f'{image_path}: not a Real-IAD view name (<category>_<NNNN>_<status>_C<view>_...)')
  return match.group(1)


def by_sample(scores, labels, sample_ids: Sequence[str], views_per_sample: int | None = None):
  """Views -> samples: (ids [S] sorted, scores [S], labels [S]), each the max over the sample's views.

  scores [N], labels [N] (0/1 or bool), sample_ids [N]. A defective sample whose defect is invisible in
  some views has label 1 from the others. views_per_sample: if given, every sample must have exactly
  that many views (ADEval's --expected_views_per_sample), else ValueError.
  """
  scores = metrics._scores_array(scores, 'view scores', 1)
  labels = metrics._binary_array(labels, 'view labels', scores.shape)
  if len(sample_ids) != len(scores):
    raise ValueError(f'{len(sample_ids)} sample ids for {len(scores)} views')
  ids, inverse, counts = np.unique(np.asarray(sample_ids, dtype=str), return_inverse=True,
                                   return_counts=True)
  if views_per_sample is not None and np.any(counts != views_per_sample):
    bad = ids[counts != views_per_sample][:4].tolist()
    raise ValueError(f'samples {bad} do not have {views_per_sample} views each')
  sample_scores = np.full(len(ids), -np.inf, scores.dtype)
  np.maximum.at(sample_scores, inverse, scores)
  sample_labels = np.zeros(len(ids), bool)
  np.logical_or.at(sample_labels, inverse, labels)
  return ids, sample_scores, sample_labels


def sample_metrics(scores, labels, sample_ids: Sequence[str], views_per_sample: int | None = None) -> dict:
  """Real-IAD's sample-level AUROC, AP and F1-max (views grouped by `by_sample`, then
  `metrics.image_metrics`): {'sample_auroc', 'sample_ap', 'sample_f1_max', 'num_samples'}."""
  ids, s, y = by_sample(scores, labels, sample_ids, views_per_sample)
  m = metrics.image_metrics(s, y)
  return {'sample_auroc': m['image_auroc'], 'sample_ap': m['image_ap'], 'sample_f1_max': m['image_f1_max'],
          'num_samples': int(len(ids))}
