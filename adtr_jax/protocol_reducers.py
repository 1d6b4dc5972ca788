"""The benchmarks' own metrics and map files as reducers (adtr_jax.reducers.Reducer): one pass over a
split, each process adding its own rows, process 0 merging the parts. Each equals its in-memory
function of adtr_jax/protocols.py on the same maps (tests/test_protocol_reducers.py); docs/protocols.md
says what each reports and at what resolution.

- `LocoReducer` (MVTec LOCO AD): image AUROC and AU-sPRO per anomaly type and their mean =
  protocols.loco_metrics, at each image's ORIGINAL size: the map is resized there (maps_io.resize_map,
  as the TIFFs of `MapWriter`) and each defect PNG is read as it is, because sPRO's saturation
  thresholds are areas in the original pixels (absolute ones are pixel counts in defects_config.json)
  and a small defect would shrink or vanish in a mask resized to the model's size. Each process streams
  its pixels per image type (good, logical, structural) as metric_stream runs; a type is then the
  merge of its runs and the good ones.
- `PixelAupro` (MVTec AD 2's AU-PRO at FPR 0.05), `SegF1Threshold` (validation pass: streamed moments
  -> mean + 3 std) and `SegF1` (test pass: TP/FP/FN counts), at the model's size.
- `SampleMetrics` (Real-IAD sample level): per-row score, label and sample number.
- `MapWriter` (eval.save_maps): each row's map as a float32 TIFF at its image's original size, at the
  image's path under the benchmark root (maps_io.map_path).
- `Ad2Submission`: MVTec AD 2's submission files of one private split (maps_io.write_ad2_files).

`validation_reducers`, `test_reducers` and `submission_reducers` say which of these a benchmark's
evaluation and --mode=predict run; `report_keys` names what they add to metrics.json.
"""
from __future__ import annotations

import array
import pathlib
import shutil
import warnings
from collections.abc import Sequence

import numpy as np

from adtr_jax import errors, maps_io, metric_stream, metrics, moments, protocols, reducers
from adtr_jax.data import mvtec

LOCO_IMAGE_TYPES = ('good',) + protocols.LOCO_TYPES   # type code = position
AD2_KEYS = ('ad2_aupro_05', 'ad2_segf1', 'ad2_segf1_threshold')
SAMPLE_KEYS = ('sample_auroc', 'sample_ap', 'sample_f1_max', 'num_samples')
MAP_KEYS = ('maps_dir', 'num_maps')


def _rows(rows: dict):
  """(index [b] int64, maps [b, S, S]) of a batch's rows as numpy."""
  return np.asarray(rows['index'], np.int64), np.asarray(rows['maps'])


# ----------------------------------------------------------------------------------- MVTec LOCO AD
class LocoReducer:
  """MVTec LOCO AD's report (protocols.loco_metrics) from one pass over its test split.

  records: the split's records (mvtec_loco.py: 'path', 'defect_type', 'defects'); folder: a scratch
  folder shared by the processes; part: this process's number; fpr_limits: AU-sPRO's limits;
  stream_kw: PixelStream's chunk_pixels, fan_in, block. Per row it keeps the image score (the maximum
  of the map at the original size, the official image score) and the image type; the pixels go to
  three PixelStreams (parts 3 * part + type code: good, logical, structural). Disk: 4 bytes per
  defect-free pixel at the original size, plus 20 per distinct saturated defect score.
  """

  def __init__(self, records: Sequence[dict], folder, part: int = 0,
               fpr_limits=protocols.LOCO_FPR_LIMITS, **stream_kw):
    self.records, self.folder, self.part = records, pathlib.Path(folder), int(part)
    self.limits = tuple(float(x) for x in fpr_limits)
    self.merge_kw = {k: v for k, v in stream_kw.items() if k in ('fan_in', 'block')}
    self.streams = [metric_stream.PixelStream(self.folder, 3 * self.part + t, **stream_kw)
                    for t in range(len(LOCO_IMAGE_TYPES))]
    self.scores = array.array('d')   # 9 bytes a row, not a Python object each
    self.types = array.array('b')

  def add(self, rows: dict) -> None:
    index, maps = _rows(rows)
    for k, i in enumerate(index):
      record = self.records[int(i)]
      kind = record['defect_type']
      if kind not in LOCO_IMAGE_TYPES:
        raise errors.DataError(f'{record["path"]}: test image type {kind!r} is not one of '
                               f'{LOCO_IMAGE_TYPES} (an MVTec LOCO AD test folder)')
      score_map = maps_io.resize_map(maps[k], mvtec.image_hw(record['path']))
      normal, defect, weights = protocols.spro_pixels(score_map, _channels(record), record['path'])
      t = LOCO_IMAGE_TYPES.index(kind)
      self.streams[t].add_pixels(normal, defect, weights, len(record['defects']), 1)
      self.scores.append(float(score_map.max()))
      self.types.append(t)

  def finish(self) -> dict:
    for s in self.streams:
      s.finish()
    return {'part': self.part, 'rows': reducers.save_rows(self.folder, 'loco-rows', self.part,
                                                  scores=np.frombuffer(self.scores, np.float64),
                                                  types=np.frombuffer(self.types, np.int8))}

  def result(self, parts: list) -> dict:
    """{'loco': protocols.loco_metrics' dict}; a type with no image gives NaN (with a warning)."""
    rows = reducers.load_rows(self.folder, [p['rows'] for p in parts])
    numbers = [int(p['part']) for p in parts]
    out = {'image_auroc': {}, 'au_spro': {}}
    for t, kind in enumerate(protocols.LOCO_TYPES, 1):
      keep = (rows['types'] == 0) | (rows['types'] == t)
      labels = rows['types'][keep] == t
      if labels.all() or not labels.any():
        warnings.warn(f'MVTec LOCO AD: no good or no {kind} test image; its metrics are NaN', stacklevel=2)
        out['image_auroc'][kind] = float('nan')
      else:
        out['image_auroc'][kind] = metrics.image_metrics(rows['scores'][keep], labels)['image_auroc']
      runs = metric_stream.PixelRuns(
          self.folder, parts=[3 * p for p in numbers] + [3 * p + t for p in numbers], q=(),
          fpr_limit=self.limits[0], aupro_limits=self.limits, scratch=f'merged-{kind}', **self.merge_kw)
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # one warning above says why a type is NaN
        out['au_spro'][kind] = {lim: runs.aupro_at(lim) for lim in self.limits}
    out['image_auroc']['mean'] = 0.5 * sum(out['image_auroc'][k] for k in protocols.LOCO_TYPES)
    out['au_spro']['mean'] = {lim: 0.5 * sum(out['au_spro'][k][lim] for k in protocols.LOCO_TYPES)
                              for lim in self.limits}
    shutil.rmtree(self.folder, ignore_errors=True)   # the runs: 4 bytes a pixel at the original size
    return {'loco': out}


def _channels(record: dict) -> list[protocols.DefectChannel]:
  """A LOCO test record's defects, each PNG read at its own (the image's original) size."""
  defects = record.get('defects')
  if defects is None:
    raise errors.DataError(f'{record["path"]}: the record lists no defects (not an MVTec LOCO AD source)')
  if (record['defect_type'] == 'good') != (not defects):
    raise errors.DataError(f'{record["path"]}: a {record["defect_type"]} test image must have '
                           f'{"no" if record["defect_type"] == "good" else "at least one"} defect PNG')
  # One spec per pixel value (two defects of an image may share a value); the scan checked them all.
  config = protocols.parse_defects_config(list({d['pixel_value']: d for d in defects}.values()),
                                          f'defects of {record["path"]}') if defects else {}
  return protocols.loco_channels([mvtec.load_grey(d['mask_path']) for d in defects], config,
                                 record['path'])


# --------------------------------------------------------------------------------------- MVTec AD 2
class PixelAupro:
  """AU-PRO up to fpr_limit (merged ties, MVTec's compute_pro) of the rows' maps and masks at the
  model's size: metrics.pixel_metrics(maps, masks, fpr_limit)['pixel_aupro'] out of core.
  folder: a scratch folder shared by the processes; stream_kw: PixelStream's settings."""

  def __init__(self, folder, part: int = 0, fpr_limit: float = protocols.AD2_FPR_LIMIT,
               key: str = 'ad2_aupro_05', **stream_kw):
    self.folder, self.part, self.fpr_limit, self.key = pathlib.Path(folder), int(part), fpr_limit, key
    self.merge_kw = {k: v for k, v in stream_kw.items() if k in ('fan_in', 'block')}
    self.stream = metric_stream.PixelStream(self.folder, self.part, **stream_kw)

  def add(self, rows: dict) -> None:
    self.stream.add(np.asarray(rows['maps']), np.asarray(rows['masks']))

  def finish(self) -> dict:
    self.stream.finish()
    return {'part': self.part}

  def result(self, parts: list) -> dict:
    runs = metric_stream.PixelRuns(self.folder, parts=[int(p['part']) for p in parts], q=(),
                                   fpr_limit=self.fpr_limit, **self.merge_kw)
    value = runs.aupro_at(self.fpr_limit)
    shutil.rmtree(self.folder, ignore_errors=True)
    return {self.key: value}


class SegF1Threshold:
  """The SegF1 threshold (protocols.segf1_threshold: mean + num_std * std of every pixel) from a pass
  over validation/good: streamed moments, merged across processes (Chan's formula).

  paths: the split's image paths: when given, each map is first resized to its image's original size
  (the submission binarises there; the threshold is taken at the resolution it is applied at); None:
  at the model's size (the SegF1 of metrics.json)."""

  def __init__(self, paths: Sequence[str] | None = None, num_std: float = protocols.SEGF1_NUM_STD,
               key: str = 'ad2_segf1_threshold'):
    self.paths, self.num_std, self.key = paths, num_std, key
    self.moments = moments.Moments(1)

  def add(self, rows: dict) -> None:
    index, maps = _rows(rows)
    for k, i in enumerate(index):
      score_map = maps[k] if self.paths is None else maps_io.resize_map(
          maps[k], mvtec.image_hw(self.paths[int(i)]))
      self.moments.add(metrics._scores_array(score_map, f'validation map {int(i)}', 2)[..., None])

  def finish(self) -> list:
    return self.moments.to_array().tolist()

  def result(self, parts: list) -> dict:
    merged = moments.Moments(1)
    for p in parts:
      merged.merge(moments.Moments.from_array(p))
    return {self.key: protocols.threshold_of(merged, self.num_std)}


class SegF1:
  """SegF1 (protocols.segf1) at a threshold fixed before the pass: TP/FP/FN counted over the rows'
  maps and masks at the model's size. Reports the threshold beside it (key + '_threshold')."""

  def __init__(self, threshold: float, key: str = 'ad2_segf1'):
    self.threshold, self.key = float(threshold), key
    self.counts = np.zeros(3, np.int64)

  def add(self, rows: dict) -> None:
    self.counts += protocols.segf1_counts(np.asarray(rows['maps']), np.asarray(rows['masks']),
                                          self.threshold)

  def finish(self) -> list:
    return self.counts.tolist()

  def result(self, parts: list) -> dict:
    tp, fp, fn = np.sum(np.asarray(parts, np.int64).reshape(-1, 3), axis=0)
    return {self.key: protocols.f1_of_counts(tp, fp, fn), f'{self.key}_threshold': self.threshold}


# --------------------------------------------------------------------------------------- Real-IAD
class SampleMetrics:
  """Real-IAD's sample-level metrics (protocols.sample_metrics): per row the image score, label and
  the number of its sample (records' 'sample_id', numbered alike on every process)."""

  def __init__(self, records: Sequence[dict], folder, part: int = 0):
    self.folder, self.part = pathlib.Path(folder), int(part)
    missing = [r['path'] for r in records if 'sample_id' not in r][:1]
    if missing:
      raise errors.DataError(f'{missing[0]}: the record has no sample_id (not a Real-IAD source)')
    self.names = sorted({r['sample_id'] for r in records})
    number = {name: n for n, name in enumerate(self.names)}
    self.sample_of = np.array([number[r['sample_id']] for r in records], np.int64)
    self.scores: list[np.ndarray] = []
    self.labels: list[np.ndarray] = []
    self.samples: list[np.ndarray] = []

  def add(self, rows: dict) -> None:
    index = np.asarray(rows['index'], np.int64)
    self.scores.append(np.asarray(rows['scores'], np.float64))
    self.labels.append(np.asarray(rows['labels'], np.int8))
    self.samples.append(self.sample_of[index])

  def finish(self) -> dict:
    def cat(x, dtype):
      return np.concatenate(x) if x else np.zeros(0, dtype)
    return {'part': self.part, 'rows': reducers.save_rows(
        self.folder, 'samples-rows', self.part, scores=cat(self.scores, np.float64),
        labels=cat(self.labels, np.int8), samples=cat(self.samples, np.int64))}

  def result(self, parts: list) -> dict:
    rows = reducers.load_rows(self.folder, [p['rows'] for p in parts])
    out = protocols.sample_metrics(rows['scores'], rows['labels'],
                                   [self.names[s] for s in rows['samples']])
    shutil.rmtree(self.folder, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- map files
def _relative(path: str, root: pathlib.Path) -> pathlib.PurePath:
  try:
    return pathlib.Path(path).resolve().relative_to(root)
  except ValueError:
    raise errors.DataError(f'{path} is not under the benchmark root {root}: its map has no place in '
                           'the evaluators\' layout') from None


class MapWriter:
  """eval.save_maps: each row's map resized to its image's original size and written as a
  single-channel float32 TIFF at maps_io.map_path(out_dir, the image's path relative to root), the
  layout the official evaluators read. Each process writes its own rows; result() checks that every
  row of the split was written once."""

  def __init__(self, records: Sequence[dict], root, out_dir):
    self.records, self.out_dir = records, pathlib.Path(out_dir)
    self.root = pathlib.Path(root).expanduser().resolve()
    self.written = 0

  def add(self, rows: dict) -> None:
    index, maps = _rows(rows)
    for k, i in enumerate(index):
      path = self.records[int(i)]['path']
      maps_io.write_tiff(maps_io.map_path(self.out_dir, _relative(path, self.root)),
                         maps_io.resize_map(maps[k], mvtec.image_hw(path)))
      self.written += 1

  def finish(self) -> int:
    return self.written

  def result(self, parts: list) -> dict:
    total = int(sum(parts))
    if total != len(self.records):
      raise RuntimeError(f'{total} maps were written for the {len(self.records)} rows of the split')
    return {'maps_dir': str(self.out_dir), 'num_maps': total}


def submission_names(paths: Sequence[str], obj: str, split: str) -> list[str]:
  """The stems of a private split's images, which must be exactly those MVTec's checker wants for
  obj/split; else a DataError naming the folder."""
  if obj not in maps_io.AD2_PRIVATE_COUNTS or split not in maps_io.AD2_PRIVATE_SPLITS:
    raise errors.DataError(f'{obj}/{split}: the MVTec AD 2 submission holds the objects '
                           f'{sorted(maps_io.AD2_PRIVATE_COUNTS)} and the splits '
                           f'{sorted(maps_io.AD2_PRIVATE_SPLITS)}')
  names = [pathlib.Path(p).stem for p in paths]
  wanted = maps_io.ad2_names(obj, split)
  if sorted(names) != wanted:
    odd = sorted(set(names) ^ set(wanted))
    raise errors.DataError(f'{pathlib.Path(paths[0]).parent if len(paths) else split}: MVTec\'s '
                           f'checker wants exactly the {len(wanted)} images {wanted[0]}..{wanted[-1]}, '
                           f'found {len(names)} (differing: {odd[:4]})')
  return names


class Ad2Submission:
  """One private split of MVTec AD 2's submission tree under out_dir (maps_io.write_ad2_files: the
  float16 TIFF at the original size and its 0/255 PNG at `threshold`). paths: the split's images
  (a FolderSource's paths); their names must be exactly those MVTec's checker wants for obj/split,
  else DataError here, before any work. result() checks the split's folders as the checker does."""

  def __init__(self, paths: Sequence[str], obj: str, split: str, out_dir, threshold: float):
    self.names = submission_names(paths, obj, split)
    self.paths, self.obj, self.split = paths, obj, split
    self.out_dir, self.threshold = pathlib.Path(out_dir), float(threshold)
    self.written = 0

  def add(self, rows: dict) -> None:
    index, maps = _rows(rows)
    for k, i in enumerate(index):
      maps_io.write_ad2_files(self.out_dir, self.obj, self.split, self.names[int(i)], maps[k],
                              mvtec.image_hw(self.paths[int(i)]), self.threshold)
      self.written += 1

  def finish(self) -> int:
    return self.written

  def result(self, parts: list) -> dict:
    maps_io.check_ad2_split(self.out_dir, self.obj, self.split)
    return {f'ad2_submission_{self.split}': int(sum(parts))}


# ------------------------------------------------------------------------------- what runs where
def validation_reducers(source: str) -> list:
  """The reducers of the pass over data.validation that runs before the test pass (MVTec AD 2: the
  SegF1 threshold at the model's size); [] for the other benchmarks. Their result() is cheap and
  reads no file: every process can merge the all-gathered parts itself."""
  return [SegF1Threshold()] if source == 'mvtec_ad2' else []


def test_reducers(source: str, data, scratch, part: int = 0, validation: dict | None = None,
                  maps_dir=None) -> list:
  """The protocol reducers of the pass over data.test for config.dataset.source `source` (the standard
  metrics' reducers are not among them).

  data: datasets.CategoryData; scratch: a folder for this category's pass, shared by the processes
  (each reducer takes a subfolder and removes it in result()); part: jax.process_index();
  validation: the merged results of validation_reducers' pass (MVTec AD 2 needs its threshold);
  maps_dir: paths.maps_dir(workdir) when eval.save_maps, else None.
  """
  scratch = pathlib.Path(scratch)
  records = data.test.records
  out: list = []
  if source == 'mvtec_loco':
    out.append(LocoReducer(records, scratch / 'loco', part))
  elif source == 'mvtec_ad2':
    if not validation or 'ad2_segf1_threshold' not in validation:
      raise ValueError('MVTec AD 2 test reducers need the validation pass\'s ad2_segf1_threshold')
    out += [PixelAupro(scratch / 'ad2_aupro', part), SegF1(validation['ad2_segf1_threshold'])]
  elif source == 'realiad':
    out.append(SampleMetrics(records, scratch / 'samples', part))
  if maps_dir is not None:
    out.append(MapWriter(records, data.root, maps_dir))
  return out


def submission_threshold_reducer(data) -> SegF1Threshold:
  """--mode=predict for MVTec AD 2: the pass over data.validation that gives the submission's
  threshold, at the images' original size (where the PNGs are binarised)."""
  return SegF1Threshold(paths=[r['path'] for r in data.validation.records])


def check_submission(data, category: str) -> None:
  """--mode=predict for MVTec AD 2, before any scoring: DataError when a private split's files
  (data.unlabelled) are not those MVTec's checker wants."""
  for split, source in data.unlabelled.items():
    submission_names(source.paths, category, split)


def submission_reducers(data, category: str, out_dir, threshold: float) -> dict[str, list]:
  """--mode=predict for MVTec AD 2: {private split: [its Ad2Submission]} for each of data.unlabelled
  (FolderSources), writing under out_dir (paths.ad2_submission_dir(workdir)); their names checked as
  check_submission does."""
  return {split: [Ad2Submission(source.paths, category, split, out_dir, threshold)]
          for split, source in data.unlabelled.items()}


def report_keys(source: str, save_maps: bool = False) -> tuple[str, ...]:
  """The keys test_reducers add to a category's entry of metrics.json (docs/protocols.md)."""
  keys = {'mvtec_loco': ('loco',), 'mvtec_ad2': AD2_KEYS, 'realiad': SAMPLE_KEYS}.get(source, ())
  return keys + (MAP_KEYS if save_maps else ())
