"""Reductions of one pass over a split (inference.reduce_split): each process adds its own rows batch by
batch, and process 0 merges what every process kept. Nothing here holds a split's maps or masks: what
grows with the split goes to files in a scratch folder shared by the processes (multihost.scratch),
or is a bounded reduction (a few candidate maps for the heatmaps, the per-row scalars).

- `Scores`: image scores, labels and source rows (per-row scalars), merged in the split's order;
  image metrics, the ROC curve, the calibrated threshold and predictions.csv come from them.
- `Pixels`: exact pixel AUROC, AP, F1-max, AUPRO, the PRO curve's drawn points and the maps'
  percentiles (the overlays' colour scale), from sorted runs on disk (metric_stream).
- `Heatmaps`: the rows evaluate.save_heatmaps shows, with their maps and masks (at most a few per
  process, whatever the split's size).
- `Overlays`: predict's overlay of each row, written by the process that scored it.

The benchmarks' protocol reducers (adtr_jax/protocol_reducers.py: LOCO sPRO, AU-PRO@0.05, SegF1,
Real-IAD's sample level, raw TIFF maps, the MVTec AD 2 submission) implement the same interface.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from adtr_jax import metric_stream, predictions, split_pass

# At most this many points of the PRO curve are drawn (evaluate.save_curves): pixel-level curves
# have millions of points.
CURVE_POINTS = 4000


class Reducer(Protocol):
  """Consumes one pass over a split batch by batch on every process; process 0 merges the parts."""

  def add(self, rows: dict) -> None:
    """rows: this process's valid rows of one batch: 'maps' float32 [b, S, S] (S = dataset.image_size),
    'scores' float32 [b], 'labels' int32 [b], 'masks' bool [b, S, S], 'index' int64 [b] (the split's
    row numbers: source.records[index[k]] describes row k); also 'images' uint8 [b, S, S, 3], the
    images as the model saw them (predict's overlays draw them without decoding them again). b may be 0."""

  def finish(self) -> object:
    """This process's part, once every batch was added: small and JSON-serialisable (large state goes
    to files under a folder the reducer was given, shared by the processes)."""

  def result(self, parts: list) -> dict:
    """On process 0: the metrics (or what was written) from every process's part, in process order."""


def _part_name(name: str, part: int, suffix: str) -> str:
  """A process's file in a shared folder, named for it (<name>-<part>.<suffix>)."""
  return f'{name}-{part:05d}.{suffix}'


def save_rows(folder: pathlib.Path, name: str, part: int, **columns) -> str:
  """One process's per-row scalars (columns [n] each) -> folder/<name>-<part>.npz; its file name."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  file = _part_name(name, part, 'npz')
  np.savez(folder / file, **{k: np.asarray(v) for k, v in columns.items()})
  return file


def load_rows(folder: pathlib.Path, files: Sequence[str]) -> dict[str, np.ndarray]:
  """The per-row scalars of every process (save_rows' files, in process order), concatenated."""
  loaded = []
  for file in files:
    with np.load(pathlib.Path(folder) / file) as f:
      loaded.append({k: f[k] for k in f.files})
  return {k: np.concatenate([d[k] for d in loaded]) for k in loaded[0]}


class Scores:
  """The per-row scalars of a split: result() -> {'scores' float32 [N], 'labels' int32 [N], 'index'
  int64 [N] (= arange(N)): entry i is source row i, placed by each row's index; 'rows_per_part':
  how many rows each process added}. A RuntimeError naming `what` when a row came twice or never.
  Each process keeps 16 bytes per row of its own, written to folder/scores-<part>.npz at the end."""

  def __init__(self, folder: pathlib.Path, num_rows: int, what: str, part: int | None = None):
    self.folder, self.num_rows, self.what = pathlib.Path(folder), num_rows, what
    self.part = jax.process_index() if part is None else part
    self.rows = {'scores': [], 'labels': [], 'index': []}

  def add(self, rows: dict) -> None:
    for key, dtype in (('scores', np.float32), ('labels', np.int32), ('index', np.int64)):
      self.rows[key].append(np.array(rows[key], dtype))

  def finish(self) -> dict:
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.float32 if k == 'scores' else np.int64)
              for k, v in self.rows.items()}
    return {'file': save_rows(self.folder, 'scores', self.part, **arrays), 'rows': int(len(arrays['index']))}

  def result(self, parts: list) -> dict:
    rows = load_rows(self.folder, [p['file'] for p in parts])
    out = split_pass.in_source_order({k: [v] for k, v in rows.items()}, self.num_rows, self.what)
    out['labels'] = out['labels'].astype(np.int32)
    out['rows_per_part'] = [int(p['rows']) for p in parts]
    return out


class Pixels:
  """Every map's pixels (and masks), streamed to sorted runs under `folder` (metric_stream). result()
  -> {'percentiles': float64 [len(q)] (np.percentile of all maps, bit-equal), 'num_pixels'}, and with
  with_metrics: 'metrics' (metrics.pixel_metrics(maps, masks, fpr_limit, aupro_ties): NaN, with a
  warning, for a single pixel class), 'pro_curve' ((fpr, pro) at most CURVE_POINTS of
  metrics.pro_curve's points, evenly spaced (PixelRuns.pro_curve); None for a single pixel class) and
  'aupro_merged' (the area under that curve, the 'merged' ties AUPRO)."""

  def __init__(self, folder: pathlib.Path, *, with_metrics: bool, fpr_limit: float = 0.3,
               aupro_ties: str = 'merged', q=metric_stream.PERCENTILES, part: int | None = None):
    self.folder, self.with_metrics, self.fpr_limit = pathlib.Path(folder), with_metrics, fpr_limit
    self.aupro_ties, self.q = aupro_ties, q
    self.stream = metric_stream.PixelStream(folder, jax.process_index() if part is None else part)

  def add(self, rows: dict) -> None:
    self.stream.add(rows['maps'], rows['masks'])

  def finish(self) -> dict:
    self.stream.finish()
    return {'pixels': int(self.stream.n_neg + self.stream.n_pos)}

  def result(self, parts: list) -> dict:
    runs = metric_stream.PixelRuns(self.folder, fpr_limit=self.fpr_limit, q=self.q, num_parts=len(parts))
    out = {'percentiles': runs.percentiles(), 'num_pixels': runs.n_neg + runs.n_pos}
    if self.with_metrics:
      out['metrics'] = runs.metrics(self.aupro_ties)
      both = runs.n_neg > 0 and runs.n_pos > 0
      out['pro_curve'] = runs.pro_curve(CURVE_POINTS) if both else None
      out['aupro_merged'] = runs.metrics('merged')['pixel_aupro'] if both else None
    return out


def heatmap_counts(num_heatmaps: int) -> dict[str, int]:
  """How many rows of each kind the heatmaps show (eval.num_heatmaps): half the highest-scoring
  anomalous rows, a quarter each the lowest-scoring anomalous and the highest-scoring normal ones."""
  return {'top_anomalous': max(num_heatmaps // 2, 1), 'low_anomalous': max(num_heatmaps // 4, 1),
          'top_normal': max(num_heatmaps // 4, 1)}


def _ranked(kind: str, scores: np.ndarray, index: np.ndarray) -> np.ndarray:
  """The order in which `kind` picks rows: highest score first, ties by lower source row (an argsort
  of -scores, stable over the split's order) or, for 'low_anomalous', that order reversed."""
  if kind == 'low_anomalous':
    return np.lexsort((-index, scores))
  return np.lexsort((index, -scores))


class Heatmaps:
  """The rows evaluate.save_heatmaps shows (heatmap_counts(num_heatmaps) of each kind), chosen from
  every process's rows as one sorted split would choose them. Each process keeps only its best
  candidates of each kind (with their maps and masks) and writes them to folder/heatmaps-<part>.npz.
  result() -> {kind: [{'score', 'index', 'map' [S, S], 'mask' [S, S]}, ...] in show order}."""

  LABEL = {'top_anomalous': 1, 'low_anomalous': 1, 'top_normal': 0}

  def __init__(self, folder: pathlib.Path, num_heatmaps: int, part: int | None = None):
    self.folder, self.counts = pathlib.Path(folder), heatmap_counts(num_heatmaps)
    self.part = jax.process_index() if part is None else part
    self.kept = {kind: None for kind in self.counts}   # kind -> (scores, index, maps, masks)

  def add(self, rows: dict) -> None:
    for kind, count in self.counts.items():
      sel = np.asarray(rows['labels']) == self.LABEL[kind]
      new = (np.asarray(rows['scores'], np.float32)[sel], np.asarray(rows['index'], np.int64)[sel],
             np.asarray(rows['maps'])[sel], np.asarray(rows['masks'], bool)[sel])
      both = new if self.kept[kind] is None else tuple(
          np.concatenate([a, b]) for a, b in zip(self.kept[kind], new))
      keep = _ranked(kind, both[0], both[1])[:count]
      self.kept[kind] = tuple(a[keep].copy() for a in both)   # copies: not views of the batch

  def finish(self) -> dict:
    name = _part_name('heatmaps', self.part, 'npz')
    self.folder.mkdir(parents=True, exist_ok=True)
    arrays = {f'{kind}_{field}': a for kind, kept in self.kept.items() if kept is not None
              for field, a in zip(('scores', 'index', 'maps', 'masks'), kept)}
    np.savez(self.folder / name, **arrays)
    return {'file': name}

  def result(self, parts: list) -> dict:
    out = {}
    for kind, count in self.counts.items():
      found = []
      for part in parts:
        with np.load(self.folder / part['file']) as f:
          if f'{kind}_scores' in f:
            found.append(tuple(f[f'{kind}_{field}'] for field in ('scores', 'index', 'maps', 'masks')))
      if not found:
        out[kind] = []
        continue
      scores, index, maps, masks = (np.concatenate(a) for a in zip(*found))
      out[kind] = [{'score': scores[i], 'index': int(index[i]), 'map': maps[i], 'mask': masks[i]}
                   for i in _ranked(kind, scores, index)[:count]]
    return out


class Overlays:
  """predict's overlay of every row (predictions.write_overlay), written by the process that scored
  it as its batch comes, on the fixed colour scale `scale` (vmin, vmax). path_of(row) -> the row's
  file. result() -> {'written': overlays written by all processes}."""

  def __init__(self, out_dir: pathlib.Path, path_of: Callable[[int], object], threshold: float,
               scale: Sequence[float]):
    self.out_dir, self.path_of, self.threshold, self.scale = pathlib.Path(out_dir), path_of, threshold, scale
    self.written = 0

  def add(self, rows: dict) -> None:
    for k, row in enumerate(rows['index']):
      predictions.write_overlay(self.out_dir, self.path_of(int(row)), float(rows['scores'][k]),
                                rows['maps'][k], self.threshold, rows['images'][k], self.scale)
      self.written += 1

  def finish(self) -> dict:
    return {'written': self.written}

  def result(self, parts: list) -> dict:
    return {'written': sum(int(p['written']) for p in parts)}
