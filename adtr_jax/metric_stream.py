"""Exact pixel metrics of a split of any size, in memory bounded by a chunk: sorted runs on disk.

`metrics.pixel_metrics` needs every score map at once. Here each process adds its own batches to a
`PixelStream`, which keeps at most `chunk_pixels` scores in memory and writes them to a scratch folder
as sorted runs: the normal pixels' scores ([n] ascending), and the anomalous pixels' distinct scores
with their count and the sum of their pixels' 1 / (area of their ground-truth region) ([m] records
(v, n, w)). A region's weight in PRO is 1 / (number of regions * area), and the number of regions is
known only at the end, so the runs hold 1 / area and the sums are divided by their total at the end
(PRO is a ratio). `PixelRuns` (process 0, once every process has called `finish`) merges the runs of
all processes in one ascending pass of bounded blocks, grouped by distinct score, and takes what
`metrics.pixel_metrics` takes from its sorted arrays at the same positions: counts of normal and
anomalous pixels below each score (AUROC, AP, F1-max), the normal score at the FPR limit and the
anomalous weight above it (AUPRO, both tie conventions), the PRO curve's points, and the order
statistics that `np.percentile` interpolates. `PixelStream.add_pixels` takes pixels already split and
weighted (MVTec LOCO's sPRO weighs each defect's saturated pixels), and `PixelRuns` can merge a chosen
set of parts (`parts`) and give the merged AUPRO at several FPR limits from its one pass
(`aupro_limits`, `aupro_at`).

Exactness against metrics.pixel_metrics / pro_curve / np.percentile (tests/test_metric_stream.py):
- pixel_auroc (an integer sum), pixel_f1_max (the max of the same float expressions) and the
  percentiles (the same order statistics, numpy's interpolation) are bit-equal;
- pixel_ap, pixel_aupro and the PRO curve's values agree to 1e-12: they are the same sums, added
  in another order (per distinct score and per block instead of per pixel; the in-memory code's own
  order depends on its unstable argsort of tied scores).

Memory: add() holds one batch plus at most `chunk_pixels` buffered scores; merging holds one block of
`block` records per run read at once, and runs are merged `fan_in` at a time (into longer runs on disk)
until at most `fan_in` remain, so no step holds more than about fan_in * block * 40 bytes, whatever
the number of batches or processes. Disk: 4 bytes per normal pixel (float32 maps) plus 20 per distinct
anomalous score, written once per merge level (log_fan_in(runs) levels).
"""
from __future__ import annotations

import bisect
import json
import os
import pathlib
import shutil
import warnings

import numpy as np
from scipy import ndimage

from adtr_jax import metrics

CHUNK_PIXELS = 1 << 24     # scores buffered before a run is written (64 MiB of float32)
BLOCK = 1 << 16            # records read from a run at a time
FAN_IN = 16                # runs merged at once
PERCENTILES = (1.0, 99.9)  # the overlays' colour scale (evaluate.save_heatmaps, calibration's map_scale)


def _pos_dtype(values: np.dtype) -> np.dtype:
  """Records of the anomalous runs: a distinct score v, its pixel count n, the sum w of their 1/area."""
  return np.dtype([('v', values), ('n', '<i8'), ('w', '<f8')])


def _manifest(folder: pathlib.Path, part: int) -> pathlib.Path:
  return folder / f'part-{part:05d}.json'


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


class _Reader:
  """Blocks of one sorted run file, read sequentially from its first record >= `start`."""

  def __init__(self, path: pathlib.Path, dtype: np.dtype, block: int, start=None):
    self.dtype, self.block = dtype, block
    self.size = os.path.getsize(path) // dtype.itemsize
    first = 0
    if start is not None and self.size:
      # A binary search on the mapped file touches ~log2(n) pages, not the run.
      keys = np.memmap(path, dtype, mode='r', shape=(self.size,))
      keys = keys['v'] if dtype.names else keys
      first = bisect.bisect_left(_Keys(keys), start)
      del keys
    self.left = self.size - first
    self.file = open(path, 'rb')   # noqa: SIM115  closed when the run is read to its end
    self.file.seek(first * dtype.itemsize)

  def read(self) -> np.ndarray:
    """The next block (empty at the end)."""
    count = min(self.block, self.left)
    if not count:
      return np.zeros(0, self.dtype)
    out = np.fromfile(self.file, self.dtype, count=count)
    if len(out) != count:
      raise RuntimeError(f'{self.file.name} ended early: a scratch run was changed while it was read')
    self.left -= count
    if not self.left:
      self.file.close()
    return out


class _Keys:
  """A run's scores for bisect, one element read at a time."""

  def __init__(self, keys):
    self.keys = keys

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, i):
    return self.keys[i]


def _groups(neg_paths, pos_paths, dtype: np.dtype, block: int, start=None):
  """The merged runs, ascending, grouped by distinct score: yields chunks (values [k], normal counts
  int64 [k], anomalous counts int64 [k], anomalous 1/area sums float64 [k]). Values are distinct and
  increase across chunks (a score's group is never split). Only scores >= `start` when given.

  Each step takes, from every run's current block, the records up to the smallest block end (every
  record of the merge below it is then in hand) and groups them; a run whose block is used up reads
  its next one. The group of that smallest end is held back a step: the next block of its run may
  continue it.
  """
  pdt = _pos_dtype(dtype)
  readers = ([(False, _Reader(p, dtype, block, start)) for p in neg_paths] +
             [(True, _Reader(p, pdt, block, start)) for p in pos_paths])
  live = [(anomalous, r, r.read()) for anomalous, r in readers]
  live = [x for x in live if len(x[2])]
  held = None
  while live:
    bound = min((b['v'] if anomalous else b)[-1] for anomalous, _, b in live)
    negs, poss, rest = [], [], []
    for anomalous, r, b in live:
      cut = int(np.searchsorted(b['v'] if anomalous else b, bound, 'right'))
      (poss if anomalous else negs).append(b[:cut])
      b = b[cut:] if cut < len(b) else r.read()
      if len(b):
        rest.append((anomalous, r, b))
    live = rest
    neg = np.concatenate(negs) if negs else np.zeros(0, dtype)
    pos = np.concatenate(poss) if poss else np.zeros(0, pdt)
    del negs, poss
    values = np.concatenate([neg, pos['v']])
    order = np.argsort(values, kind='stable')   # the parts are sorted runs: timsort merges them
    values = values[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    k = len(neg)
    is_neg = order < k
    n_pos = np.where(is_neg, 0, np.r_[np.zeros(k, np.int64), pos['n']][order])
    w_pos = np.where(is_neg, 0.0, np.r_[np.zeros(k), pos['w']][order])
    group = [values[starts], np.add.reduceat(is_neg.astype(np.int64), starts),
             np.add.reduceat(n_pos, starts), np.add.reduceat(w_pos, starts)]
    del order, values, is_neg, n_pos, w_pos, neg, pos
    if held is not None:
      if group[0][0] == held[0][0]:   # the held group goes on in this step
        group[1][0] += held[1][0]
        group[2][0] += held[2][0]
        group[3][0] = held[3][0] + group[3][0]
      else:
        yield held
    if len(group[0]) > 1:
      yield [g[:-1] for g in group]
    held = [g[-1:] for g in group]
  if held is not None:
    yield held


def _write_groups(groups, path: pathlib.Path, anomalous: bool) -> None:
  """Merged groups -> one run file: normal scores repeated by their counts, or anomalous records."""
  with open(path, 'wb') as f:
    for values, neg, pos, w in groups:
      if anomalous:
        keep = pos > 0
        out = np.empty(int(keep.sum()), _pos_dtype(values.dtype))
        out['v'], out['n'], out['w'] = values[keep], pos[keep], w[keep]
      else:
        out = np.repeat(values, neg)
      out.tofile(f)


def _reduce_runs(runs: list[str], folder: pathlib.Path, out_dir: pathlib.Path, dtype: np.dtype,
                 anomalous: bool, fan_in: int, block: int, prefix: str) -> list[str]:
  """Merges runs (names relative to `folder`) `fan_in` at a time into new runs in out_dir until at
  most fan_in remain; the merged inputs written in out_dir are deleted. Returns the remaining names."""
  runs, made = list(runs), 0
  while len(runs) > fan_in:
    first, runs = runs[:fan_in], runs[fan_in:]
    name = f'{out_dir.relative_to(folder)}/{prefix}-m{made:05d}.bin'
    made += 1
    paths = [folder / r for r in first]
    groups = _groups([] if anomalous else paths, paths if anomalous else [], dtype, block)
    _write_groups(groups, folder / name, anomalous)
    for r in first:
      if (folder / r).parent == out_dir:
        (folder / r).unlink()
    runs.append(name)
  return runs


class PixelStream:
  """One process's share of a split's pixel metrics: its batches of score maps and masks, written as
  sorted runs under folder/part-<part>/; finish() records them in folder/part-<part>.json.

  folder: a scratch folder shared by the processes of a run (each `part` writes only its own files);
  part: this process's number (jax.process_index()); chunk_pixels: scores buffered in memory before a
  run is written; fan_in, block: see the module docstring. A part's old files are removed first.
  """

  def __init__(self, folder, part: int = 0, *, chunk_pixels: int = CHUNK_PIXELS, fan_in: int = FAN_IN,
               block: int = BLOCK):
    if chunk_pixels < 1 or block < 1 or fan_in < 2:
      raise ValueError(f'chunk_pixels={chunk_pixels} and block={block} must be >= 1, fan_in={fan_in} >= 2')
    self.folder = pathlib.Path(folder)
    self.part, self.chunk_pixels, self.fan_in, self.block = part, chunk_pixels, fan_in, block
    self.dir = self.folder / f'part-{part:05d}'
    shutil.rmtree(self.dir, ignore_errors=True)
    _manifest(self.folder, part).unlink(missing_ok=True)
    self.dir.mkdir(parents=True)
    self.dtype: np.dtype | None = None
    self.n_neg = self.n_pos = self.num_regions = self.num_images = 0
    self.neg_runs: list[str] = []
    self.pos_runs: list[str] = []
    self._neg: list[np.ndarray] = []
    self._pos: list[tuple[np.ndarray, np.ndarray]] = []
    self._buffered = 0
    self.finished = False

  def add(self, maps, masks) -> None:
    """maps [b, H, W] float32 (float64 is kept as float64, as metrics.pixel_metrics does; every batch
    must then be float64), masks [b, H, W] bool or 0/1: this process's rows of one batch. Ground-truth
    regions are 8-connected within each image. b = 0 is allowed (a process with no valid row)."""
    if self.finished:
      raise RuntimeError('PixelStream.add after finish()')
    if np.shape(maps)[:1] == (0,) and np.ndim(maps) == 3 and np.shape(masks) == np.shape(maps):
      return
    maps = metrics._scores_array(maps, 'score maps', 3)
    masks = metrics._binary_array(masks, 'masks', maps.shape)
    inv_area, num_regions = [np.zeros(0)], 0
    for m in masks[masks.any(axis=(1, 2))]:
      labels, num = ndimage.label(m, structure=np.ones((3, 3), bool))   # 8-connectivity
      ids = labels[m] - 1
      inv_area.append((1.0 / np.bincount(ids, minlength=num))[ids])   # as metrics._split_pixels
      num_regions += num
    self.add_pixels(maps[~masks], maps[masks], np.concatenate(inv_area), num_regions, len(maps))

  def add_pixels(self, normal, anomalous, weights, num_regions: int, num_images: int) -> None:
    """Pixels already split and weighted: normal scores [n] (they make the FPR), anomalous scores [m]
    and their weights [m] >= 0, from `num_images` images holding `num_regions` ground-truth regions.
    PRO(t) is the weight of the anomalous pixels scoring >= t over the weight of all of them: `add`
    gives each pixel 1 / (area of its region); MVTec LOCO's sPRO gives each defect's S highest pixels
    1 / S and the rest nothing (protocol_reducers.LocoReducer). Scores are one dtype, as in `add`."""
    if self.finished:
      raise RuntimeError('PixelStream.add_pixels after finish()')
    normal, anomalous = np.asarray(normal).ravel(), np.asarray(anomalous).ravel()
    weights = np.asarray(weights, np.float64).ravel()
    if weights.shape != anomalous.shape or (len(weights) and weights.min() < 0):
      raise ValueError(f'{len(anomalous)} anomalous scores need as many weights >= 0, got {weights.shape}')
    for scores in (normal, anomalous):
      if len(scores) and self.dtype is None:
        self.dtype = scores.dtype.newbyteorder('<')
      elif len(scores) and scores.dtype != self.dtype:
        raise ValueError(f'scores of dtype {scores.dtype} after batches of {self.dtype}: give one dtype')
    self.num_images += int(num_images)
    self.num_regions += int(num_regions)
    self.n_neg += len(normal)
    self.n_pos += len(anomalous)
    self._neg.append(normal)
    if len(anomalous):
      self._pos.append((anomalous, weights))
    self._buffered += len(normal) + len(anomalous)
    if self._buffered >= self.chunk_pixels:
      self._flush()

  def _flush(self) -> None:
    """The buffered scores -> one sorted normal run and one anomalous run."""
    if self._neg:
      neg = np.concatenate(self._neg)
      self._neg = []
      if len(neg):
        neg.sort()
        name = f'{self.dir.name}/neg-{len(self.neg_runs):05d}.bin'
        neg.astype(self.dtype, copy=False).tofile(self.folder / name)
        self.neg_runs.append(name)
      del neg
    if self._pos:
      pos = np.concatenate([p for p, _ in self._pos])
      w = np.concatenate([w for _, w in self._pos])
      self._pos = []
      order = np.argsort(pos, kind='stable')
      pos, w = pos[order], w[order]
      starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
      out = np.empty(len(starts), _pos_dtype(self.dtype))
      out['v'], out['n'] = pos[starts], np.diff(np.r_[starts, len(pos)])
      out['w'] = np.add.reduceat(w, starts)
      name = f'{self.dir.name}/pos-{len(self.pos_runs):05d}.bin'
      out.tofile(self.folder / name)
      self.pos_runs.append(name)
    self._buffered = 0

  def finish(self) -> pathlib.Path:
    """Writes the last run, merges this part's runs down to fan_in / 2 of each kind, and records them
    in folder/part-<part>.json (written last and atomically: a part without it is not finished)."""
    if self.finished:
      return _manifest(self.folder, self.part)
    self._flush()
    dtype = self.dtype or np.dtype('<f4')
    half = max(self.fan_in // 2, 1)
    self.neg_runs = _reduce_runs(self.neg_runs, self.folder, self.dir, dtype, False, half, self.block, 'neg')
    self.pos_runs = _reduce_runs(self.pos_runs, self.folder, self.dir, dtype, True, half, self.block, 'pos')
    self.finished = True
    path = _manifest(self.folder, self.part)
    _write_atomic(path, json.dumps({
        'dtype': dtype.str, 'typed': self.dtype is not None, 'neg_runs': self.neg_runs,
        'pos_runs': self.pos_runs, 'n_neg': self.n_neg, 'n_pos': self.n_pos,
        'num_regions': self.num_regions, 'num_images': self.num_images}))
    return path


def _percentile_like_numpy(n: int, q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """np.percentile(x, q)'s 'linear' method for len(x) = n: (lower index [Q], upper index [Q],
  gamma [Q]) as numpy computes them (virtual index (n - 1) * q / 100, clipped at the ends)."""
  virtual = (n - 1) * np.true_divide(np.asarray(q, np.float64), 100)
  lower = np.floor(virtual)
  upper = lower + 1
  above = virtual >= n - 1
  lower[above] = upper[above] = -1
  below = virtual < 0
  lower[below] = upper[below] = 0
  lower, upper = lower.astype(np.intp), upper.astype(np.intp)
  gamma = np.asarray(virtual - lower, np.float64)
  return lower % n, upper % n, gamma


def _lerp_like_numpy(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
  """numpy's own interpolation between the order statistics a and b (so the rounding is numpy's)."""
  diff = b - a
  out = np.add(a, diff * t)
  np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5, casting='unsafe', dtype=type(out.dtype))
  return out


def _positional_last(n: int, fpr_limit: float) -> tuple[int, int]:
  """metrics._aupro_positional's curve over n normals: (L, k), the number of its points (FPR j / n at
  position j, and (1, 1) closing it when every position is a point) and how many have FPR <= limit."""
  last = min(int(np.floor(fpr_limit * n)) + 1, n)
  points = min(last + 1, n)
  length = points + 1 if points == n else points
  k = min(int(fpr_limit * n), length)
  while k < length and k / n <= fpr_limit:   # j / n as numpy rounds np.arange(L) / n
    k += 1
  while k > 0 and (k - 1) / n > fpr_limit:
    k -= 1
  return length, k


class PixelRuns:
  """Every part's runs in `folder` (process 0, after every process's PixelStream.finish()), merged.

  num_parts: how many parts must be there (None: those found). parts: merge only these part numbers
  (each must be finished), e.g. the good and one anomaly type's images of MVTec LOCO, each type
  streamed as its own part. fpr_limit: AUPRO's and the PRO curve's limit; aupro_limits: more limits
  whose merged-ties AUPRO `aupro_at` gives from the same pass; q: the percentiles asked of
  percentiles(). The one pass over the runs happens on the first call and serves metrics(),
  aupro_at() and percentiles(); pro_curve() reads the runs' top again. When more than fan_in runs are
  found, they are first merged fan_in at a time into folder/<scratch>/ (one scratch name per
  PixelRuns alive on a folder).
  """

  def __init__(self, folder, *, fpr_limit: float = 0.3, q=PERCENTILES, num_parts: int | None = None,
               parts=None, aupro_limits=(), scratch: str = 'merged', fan_in: int = FAN_IN,
               block: int = BLOCK):
    self.folder = pathlib.Path(folder)
    self.fpr_limit = metrics._check_fpr_limit(fpr_limit)
    self.aupro_limits = tuple(dict.fromkeys([self.fpr_limit] + [metrics._check_fpr_limit(x)
                                                                for x in aupro_limits]))
    self.q = tuple(float(x) for x in np.atleast_1d(q))
    self.block = block
    if parts is None:
      parts = sorted(self.folder.glob('part-*.json'))
      if num_parts is not None and len(parts) != num_parts:
        raise RuntimeError(f'{self.folder} holds {len(parts)} finished parts of pixel scores, expected '
                           f'{num_parts}: a process did not finish its PixelStream')
    else:
      parts = [_manifest(self.folder, int(p)) for p in parts]
      missing = [p.name for p in parts if not p.is_file()]
      if missing:
        raise RuntimeError(f'{self.folder} lacks the finished parts {missing[:4]}: a process did not '
                           'finish its PixelStream')
    if not parts:
      raise RuntimeError(f'{self.folder} holds no finished part of pixel scores')
    infos = [json.loads(p.read_text()) for p in parts]
    dtypes = {i['dtype'] for i in infos if i['typed']}
    if len(dtypes) > 1:
      raise ValueError(f'the parts in {self.folder} hold scores of different dtypes {sorted(dtypes)}')
    self.dtype = np.dtype(dtypes.pop() if dtypes else '<f4')
    for key in ('n_neg', 'n_pos', 'num_regions', 'num_images'):
      setattr(self, key, sum(int(i[key]) for i in infos))
    half = max(fan_in // 2, 1)
    merged = self.folder / scratch
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()
    self.neg_runs = _reduce_runs([r for i in infos for r in i['neg_runs']], self.folder, merged,
                                 self.dtype, False, half, block, 'neg')
    self.pos_runs = _reduce_runs([r for i in infos for r in i['pos_runs']], self.folder, merged,
                                 self.dtype, True, half, block, 'pos')
    self._pass: dict | None = None

  def _groups(self, start=None):
    return _groups([self.folder / r for r in self.neg_runs], [self.folder / r for r in self.pos_runs],
                   self.dtype, self.block, start)

  def _walk(self) -> dict:
    """The one ascending pass: every sum and position the metrics and percentiles need."""
    if self._pass is not None:
      return self._pass
    n_neg, n_pos, total = self.n_neg, self.n_pos, self.n_neg + self.n_pos
    if total == 0:
      raise ValueError(f'no pixel scores were added to {self.folder}')
    two_classes = n_neg > 0 and n_pos > 0
    # Positions wanted, all in ascending order: the percentiles' order statistics among all pixels,
    # the normal pixel at the FPR limit (merged AUPRO), the normals at the positional curve's points.
    lower, upper, gamma = _percentile_like_numpy(total, self.q)
    wanted_total = np.unique(np.r_[lower, upper])
    found_total = {}
    s = dict(auroc2=0, ap=0.0, f1=-np.inf, area=0.0, pos_sum=0.0, cut=None, top_groups=0)
    # Merged AUPRO per limit: the normal value whose piece holds the limit, and the area above it.
    cuts = {lim: dict(i_cut=n_neg - metrics._normals_reaching(n_neg, lim), cut=None, area=0.0)
            for lim in self.aupro_limits} if two_classes else {}
    if two_classes:
      length, k = _positional_last(n_neg, self.fpr_limit)
      # Positions j from the top (j < n_neg) whose PRO the positional area needs; j = n_neg is (1, 1).
      wanted_top = sorted({j for j in (0, k - 1, k) if 0 <= j < min(length, n_neg)})
      wanted_neg = np.array([n_neg - 1 - j for j in wanted_top][::-1], np.int64)   # ascending
      found_neg, lo = {}, n_neg - min(k, n_neg)   # ascending normals [lo, n_neg) are positions j < k
      s.update(length=length, k=k, wanted_top=wanted_top, found_neg=found_neg)
    neg_below = pos_below = 0
    w_below = 0.0
    for values, neg, pos, w in self._groups():
      nb = neg_below + np.cumsum(neg) - neg                  # normals below each value
      tb = nb + pos_below + np.cumsum(pos) - pos             # all pixels below each value
      cum_w = np.cumsum(np.r_[w_below, w])                   # sequential, whatever the chunking
      w_lt, w_le = cum_w[:-1], cum_w[1:]
      for t in wanted_total[(wanted_total >= tb[0]) & (wanted_total < tb[-1] + neg[-1] + pos[-1])]:
        found_total[int(t)] = values[np.searchsorted(tb, t, 'right') - 1]
      if two_classes:
        pb = tb - nb
        # AUROC: each anomalous pixel counts the normals below it, ties 1/2 (x2, in integers).
        s['auroc2'] += int(np.sum(pos * (2 * nb + neg)))
        has = pos > 0
        tp = (n_pos - pb[has]).astype(np.float64)
        fp = (n_neg - nb[has]).astype(np.float64)
        if len(tp):
          s['ap'] += float(np.sum(pos[has] * (tp / (tp + fp))))
          s['f1'] = max(s['f1'], float(np.max(2.0 * tp / (tp + fp + n_pos))))
        for lim, c in cuts.items():
          if c['cut'] is None:
            at = np.flatnonzero((nb <= c['i_cut']) & (c['i_cut'] < nb + neg))
            if len(at):
              g = int(at[0])
              c['cut'] = dict(v=values[g], lo=int(nb[g]), hi=int(nb[g] + neg[g]), w_lt=float(w_lt[g]),
                              w_le=float(w_le[g]), pos_below=int(pb[g]))
          if c['cut'] is not None:
            hi, v_cut = c['cut']['hi'], c['cut']['v']
            lt = np.maximum(nb - hi, 0)
            le = np.maximum(nb + neg - hi, 0)
            c['area'] += float(np.sum(w * (lt + le)))
            if lim == self.fpr_limit:
              s['top_groups'] += int(np.count_nonzero((values >= v_cut) & (neg > 0)))
        # Positional: positions j < k are the ascending normals [lo, n_neg); each scores PRO (> v).
        inside = np.maximum(nb + neg - np.maximum(nb, lo), 0)
        s['pos_sum'] += float(np.sum(inside * w_le))
        for a in wanted_neg[(wanted_neg >= nb[0]) & (wanted_neg < nb[-1] + neg[-1])]:
          found_neg[int(a)] = float(w_le[np.searchsorted(nb, a, 'right') - 1])
      neg_below += int(neg.sum())
      pos_below += int(pos.sum())
      w_below = float(cum_w[-1])
    s['w_total'] = w_below
    s['cuts'] = cuts
    s['cut'] = cuts[self.fpr_limit]['cut'] if two_classes else None
    a = np.array([found_total[int(i)] for i in lower], self.dtype)
    b = np.array([found_total[int(i)] for i in upper], self.dtype)
    s['percentiles'] = _lerp_like_numpy(a, b, gamma)
    self._pass = s
    return s

  def percentiles(self) -> np.ndarray:
    """np.percentile(all added maps, q) (method 'linear'), bit-equal: [len(q)] float64 for float32
    maps. The normal and anomalous pixels of every part count alike."""
    return self._walk()['percentiles']

  def metrics(self, aupro_ties: str = 'merged') -> dict:
    """metrics.pixel_metrics(all maps, all masks, fpr_limit, aupro_ties): {'pixel_auroc', 'pixel_ap',
    'pixel_f1_max', 'pixel_aupro'}; NaN for every key, with a warning, for a single pixel class."""
    if aupro_ties not in metrics.AUPRO_TIES:
      raise ValueError(f'aupro_ties={aupro_ties!r} must be one of {metrics.AUPRO_TIES} '
                       '(config field eval.aupro_ties)')
    if self.n_neg == 0 or self.n_pos == 0:
      warnings.warn('pixel metrics are undefined: the masks hold a single pixel class '
                    '(no anomalous or no normal pixel); returning NaN', stacklevel=2)
      return {k: float('nan') for k in metrics.PIXEL_KEYS}
    s = self._walk()
    n_neg, n_pos, w_total, limit = self.n_neg, self.n_pos, s['w_total'], self.fpr_limit
    out = {'pixel_auroc': s['auroc2'] / (2.0 * n_pos * n_neg), 'pixel_ap': s['ap'] / n_pos,
           'pixel_f1_max': s['f1']}
    if aupro_ties == 'merged':
      out['pixel_aupro'] = self._merged_aupro(limit)
    else:   # trapezoids of width 1 / n_neg through PRO(> j-th highest normal), j < k, then the limit
      k = s['k']

      def pro(j):
        return 1.0 if j == n_neg else (w_total - s['found_neg'][n_neg - 1 - j]) / w_total
      inside = min(k, n_neg)
      total = (inside * w_total - s['pos_sum']) / w_total + (1.0 if k > n_neg else 0.0)
      area = (2.0 * total - pro(0) - pro(k - 1)) / (2.0 * n_neg)
      f_prev = (k - 1) / n_neg
      if f_prev < limit:
        p_limit = pro(k - 1) + (pro(k) - pro(k - 1)) * (limit - f_prev) / (k / n_neg - f_prev)
        area += (limit - f_prev) * (pro(k - 1) + p_limit) / 2.0
      out['pixel_aupro'] = float(min(area / limit, 1.0))
    return out

  def aupro_at(self, fpr_limit: float) -> float:
    """The merged-ties AUPRO (metrics.pixel_metrics' 'merged') up to fpr_limit, one of fpr_limit and
    aupro_limits; NaN, with a warning, for a single pixel class."""
    if fpr_limit not in self.aupro_limits:
      raise ValueError(f'fpr_limit={fpr_limit} is not among the limits of this pass {self.aupro_limits}')
    if self.n_neg == 0 or self.n_pos == 0:
      warnings.warn('AUPRO is undefined: no anomalous or no normal pixel; returning NaN', stacklevel=2)
      return float('nan')
    return self._merged_aupro(fpr_limit)

  def _merged_aupro(self, limit: float) -> float:
    """metrics._aupro from the pass's sums: the area above the cut, then the cut's piece to the limit."""
    s = self._walk()
    cut, area, n_neg, w_total = s['cuts'][limit]['cut'], s['cuts'][limit]['area'], self.n_neg, s['w_total']
    area = area / w_total / (2.0 * n_neg)
    f0, f1 = (n_neg - cut['hi']) / n_neg, (n_neg - cut['lo']) / n_neg
    p0, p1 = (w_total - cut['w_le']) / w_total, (w_total - cut['w_lt']) / w_total
    p_limit = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
    area += (limit - f0) * (p0 + p_limit) / 2.0
    return float(min(area / limit, 1.0))

  def pro_curve(self, max_points: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """metrics.pro_curve(all maps, all masks, fpr_limit): (fpr [K], pro [K]) float64. max_points:
    only the points evaluate.save_curves draws of it (the K points' indices
    linspace(0, K - 1, max_points) rounded, when K > max_points). Reads the runs from the normal
    score at the FPR limit up."""
    if self.n_neg == 0 or self.n_pos == 0:
      raise ValueError('no PRO curve: the masks hold a single pixel class')
    s = self._walk()
    cut, n_neg, w_total, limit = s['cut'], self.n_neg, s['w_total'], self.fpr_limit
    groups = s['top_groups']   # G straight pieces, highest score first; points 0, then 2 per piece
    size = 1 + 2 * groups + (limit == 1.0)
    if max_points is not None and size > max_points:
      keep = np.unique(np.linspace(0, size - 1, max_points).round().astype(int))
    else:
      keep = np.arange(size)
    fpr, pro = np.zeros(len(keep)), np.zeros(len(keep))
    if limit == 1.0:
      fpr[keep == size - 1] = pro[keep == size - 1] = 1.0
    # Piece g (0 = highest) has points 1 + 2g (its start) and 2 + 2g (its end); the pass below goes
    # up from v_cut, i.e. from piece G - 1 down to 0.
    piece_of = (keep - 1) // 2
    neg_below, w_below, seen = cut['lo'], cut['w_lt'], 0
    for values, neg, _, w in self._groups(start=cut['v']):
      nb = neg_below + np.cumsum(neg) - neg
      cum_w = np.cumsum(np.r_[w_below, w])
      has = neg > 0
      g = groups - 1 - (seen + np.cumsum(has) - 1)   # the piece of each normal value
      sel = (keep >= 1) & (keep < 1 + 2 * groups)
      sel &= np.isin(piece_of, g[has])
      if sel.any():
        idx = np.flatnonzero(has)[np.searchsorted(-g[has], -piece_of[sel])]
        end = (keep[sel] - 1) % 2 == 1
        f0 = (n_neg - nb[idx] - neg[idx]) / n_neg
        f1 = (n_neg - nb[idx]) / n_neg
        p0 = (w_total - cum_w[1:][idx]) / w_total
        p1 = (w_total - cum_w[:-1][idx]) / w_total
        last = piece_of[sel] == groups - 1
        # The last piece (v_cut's) stops at fpr_limit, its PRO interpolated there.
        p_cut = p0 + (p1 - p0) * (limit - f0) / (f1 - f0)
        fpr[sel] = np.where(end, np.where(last, limit, f1), f0)
        pro[sel] = np.where(end, np.where(last, p_cut, p1), p0)
      seen += int(has.sum())
      neg_below = int(nb[-1] + neg[-1])
      w_below = float(cum_w[-1])
      if seen >= groups:
        break
    return fpr, pro
