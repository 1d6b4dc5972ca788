"""What a run's config asks for: its categories, each prepared and ready for the input pipeline."""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Callable

import ml_collections

import numpy as np

from adtr_jax import errors, multihost
from adtr_jax.data import (builder, classes, elpv, image_cache, mixing, mvtec, mvtec_ad2, mvtec_loco,
                           pipeline, realiad, records, visa)
from adtr_jax.data.folder import FolderSource

SOURCES = ('mvtec', 'elpv', 'classes', 'visa', 'realiad', 'mvtec_ad2', 'mvtec_loco')
# What dataset.root holds, per source that needs one.
ROOTS = {
    'mvtec': '<category>/train, <category>/test and <category>/ground_truth',
    'classes': 'train/<class>/ and test/<class>/ (or an archive of them)',
    'visa': 'split_csv/ and <class>/Data/ (VisA)',
    'realiad': 'realiad_<resolution>/ and realiad_jsons*/ (Real-IAD)',
    'mvtec_ad2': '<object>/train, validation, test_public (MVTec AD 2)',
    'mvtec_loco': '<object>/train, validation, test, ground_truth, defects_config.json (MVTec LOCO AD)',
}


@dataclasses.dataclass(frozen=True)
class CategoryData:
  """One category's splits: random-access sources (len(), [i] -> builder.ExampleSource's dict) whose
  `records` (records.py) describe their rows."""
  train: Any
  test: Any
  has_masks: bool        # pixel-level ground truth for the anomalous test images
  root: pathlib.Path     # the folder the source read (for elpv / classes: their MVTec-layout export)
  calib: Any = None      # normal images held out to calibrate the decision threshold
  labelled_files: tuple = ()  # real anomalies moved from test into training (few-shot protocol)
  validation: Any = None  # the benchmark's own normal hold-out (MVTec AD 2, LOCO); it is also `calib`
  unlabelled: dict = dataclasses.field(default_factory=dict)  # {split: FolderSource} (AD 2's private)


class Subset:
  """Rows `indices` of `source` (a random-access source), in that order."""

  def __init__(self, source, indices):
    self.source, self.indices = source, [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[self.indices[i]]

  @property
  def records(self) -> list[dict]:
    return [self.source.records[i] for i in self.indices]


class Concat:
  """The rows of several random-access sources, one after the other."""

  def __init__(self, sources):
    self.sources = list(sources)
    self.starts = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'row {i} of {len(self)}')
    k = int(np.searchsorted(self.starts, i, 'right')) - 1
    return self.sources[k][i - int(self.starts[k])]

  @property
  def records(self) -> list[dict]:
    return [r for s in self.sources for r in s.records]


def held_out(n: int, fraction: float) -> int:
  """How many of n normal training rows split_calibration holds out: round(fraction * n), at least 1
  (0 when fraction is 0)."""
  return max(1, round(fraction * n)) if fraction else 0


def split_calibration(train, fraction: float, seed: int):
  """Holds out round(fraction * N) (at least 1) seeded-random normal training rows -> (train, calib).

  fraction 0 -> (train, None): everything trains and no decision threshold is calibrated.
  """
  if fraction == 0.0:
    return train, None
  n = len(train)
  held = held_out(n, fraction)
  order = np.random.default_rng(seed).permutation(n)
  return Subset(train, np.sort(order[held:])), Subset(train, np.sort(order[:held]))


def categories(config: ml_collections.ConfigDict) -> list[str]:
  """config.dataset.category split on commas, e.g. 'bottle, cable' -> ['bottle', 'cable']."""
  names = [c.strip() for c in config.dataset.category.split(',') if c.strip()]
  if not names:
    raise errors.ConfigError('no category given: pass --config.dataset.category=<name>[,<name>...]')
  if len(set(names)) != len(names):
    raise errors.ConfigError(f'--config.dataset.category={config.dataset.category!r} repeats a category')
  return names


def cache_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """config.dataset.cache_dir, else $ADTR_JAX_CACHE, else ~/.cache/adtr_jax."""
  path = config.dataset.cache_dir or os.environ.get('ADTR_JAX_CACHE') or '~/.cache/adtr_jax'
  return pathlib.Path(path).expanduser()


def _scanner(config: ml_collections.ConfigDict, root, category: str) -> Callable[[], records.Scan]:
  """What lists `category` of the MVTec-layout folder or the benchmark folder `root`."""
  d = config.dataset
  return {'visa': functools.partial(visa.scan_category, root, category, d.visa_split),
          'realiad': functools.partial(realiad.scan_category, root, category, d.realiad_resolution,
                                       d.realiad_json),
          'mvtec_ad2': functools.partial(mvtec_ad2.scan_category, root, category),
          'mvtec_loco': functools.partial(mvtec_loco.scan_category, root, category),
          }.get(d.source, functools.partial(mvtec.scan_category, root, category, d.require_masks))


def check_source(config: ml_collections.ConfigDict, category: str) -> records.Scan | None:
  """What can be checked of `category`'s data before any work: the source is known, its root is given
  and exists (for MVTec, the category folder too), an ELPV category matches its cell type; the
  benchmark sources (visa, realiad, mvtec_ad2, mvtec_loco) list the category (returning its scan), so
  that a missing split file, category, listed image or mask, or an unknown LOCO defect value is named
  now."""
  source, root = config.dataset.source, config.dataset.root
  if source not in SOURCES:
    raise errors.ConfigError(f'--config.dataset.source={source!r} is not one of {", ".join(SOURCES)}')
  if source == 'elpv':
    cell_type = config.dataset.elpv_cell_type
    if category != f'elpv_{cell_type}':
      raise errors.ConfigError(f'--config.dataset.category={category!r} does not match '
                               f'--config.dataset.elpv_cell_type={cell_type!r}: that category is '
                               f'"elpv_{cell_type}"')
  elif not root:
    raise errors.ConfigError(f'config.dataset.root is empty: pass --config.dataset.root=/path to the folder '
                             f'that holds {ROOTS[source]}'.replace('<category>', category))
  elif source == 'mvtec':
    mvtec.check_category(pathlib.Path(root).expanduser(), category)
  elif source == 'classes':
    classes.check_root(root)
  else:
    return _scanner(config, root, category)()
  return None


def listed(config: ml_collections.ConfigDict, category: str) -> records.Scan | None:
  """The category's files as its source lists them, without preparing or exporting anything (what
  the pre-flight counts); None for 'elpv' and 'classes', whose listing is their export."""
  scan = check_source(config, category)
  if scan is None and config.dataset.source not in ('elpv', 'classes'):
    scan = _scanner(config, pathlib.Path(config.dataset.root).expanduser(), category)()
  return scan


def check_unified(config: ml_collections.ConfigDict) -> None:
  if mixing.uses_anomalies(config):
    raise errors.ConfigError('dataset.unified=True trains on normal images only: unset anomalies.* '
                             "(num_labelled, synthetic, external_dir), keep loss.type='mse' (and, for a "
                             "VisA 2cls split, set anomalies.labelled_use='exclude')")


def _prepare(config: ml_collections.ConfigDict, category: str) -> tuple[pathlib.Path, records.Scan, dict]:
  """(the folder read, the category's scan, {split: builder.ExampleSource}), exporting and preparing
  whatever the cache does not hold yet (the tfds data, not the resized images)."""
  listed = check_source(config, category)
  source = config.dataset.source
  if source == 'elpv':
    root, category = elpv.export_elpv(cache_dir(config) / 'elpv', config.dataset.elpv_cell_type)
    scan = functools.partial(mvtec.scan_category, root, category, False)
  elif source == 'classes':
    root, category = classes.export_class(config.dataset.root, category, cache_dir(config) / 'classes')
    scan = functools.partial(mvtec.scan_category, root, category, False)
  else:
    root = pathlib.Path(config.dataset.root).expanduser()
    scan = _scanner(config, root, category)
  listed = listed or scan()
  return root, listed, builder.prepare(scan, cache_dir(config) / 'tfds', listed)


def load_category(config: ml_collections.ConfigDict, category: str) -> CategoryData:
  """Prepares (or reuses) `category` of config.dataset.source in the cache's tfds data_dir.

  Calibration hold-out: the benchmark's validation split where it has one (MVTec AD 2, LOCO: every
  training image trains), else calibration.holdout_fraction of the normal training images. Anomalies
  that the split itself puts into training (VisA's 2cls splits) are labelled anomalies for the
  anomaly-aware losses (data/mixing.py), never normal training images.

  On multi-host runs process 0 prepares the shared files (export, tfds data) while the others wait;
  then every process resizes its share of each split's images into the image cache (all of them when
  its host does not share process 0's disk; see image_cache.cached).
  """
  root, scan, prepared = multihost.first_then_others(lambda: _prepare(config, category),
                                                     f'prepare {category}')
  splits = {name: image_cache.cached(split, config.dataset.image_size, config.dataset.num_workers)
            for name, split in prepared.items()}
  train_rows = splits['train'].records
  normal = [i for i, r in enumerate(train_rows) if r['label'] == 0]
  split_labelled = [i for i, r in enumerate(train_rows) if r['label'] == 1]
  train = Subset(splits['train'], normal) if split_labelled else splits['train']
  validation = splits.get('validation')
  if validation is not None:
    calib = validation
  else:
    train, calib = split_calibration(train, config.calibration.holdout_fraction, config.seed)
  test, has_masks = splits['test'], splits['test'].has_masks
  mixing.check(config, has_masks)
  labelled, files = None, ()
  if mixing.split_labels_anomalies(config):
    if not split_labelled:
      raise errors.DataError(f'{scan.origin}: the split lists no anomalous training images')
    if mixing.trains_on_labelled(config):
      labelled = Subset(splits['train'], split_labelled)
  elif config.anomalies.num_labelled > 0:
    taken, rest = mixing.take_labelled(test.records, config.anomalies.num_labelled, config.seed)
    test, files = Subset(test, rest), tuple(test.records[i]['path'] for i in taken)
    if mixing.trains_on_labelled(config):
      labelled = Subset(splits['test'], taken)
  if mixing.uses_anomalies(config):
    train = mixing.build(config, train, labelled)
  return CategoryData(train=train, test=test, has_masks=has_masks, root=root, calib=calib,
                      labelled_files=files, validation=validation,
                      unlabelled={name: FolderSource(folder) for name, folder in scan.unlabelled.items()})


def load_unified(config: ml_collections.ConfigDict) -> CategoryData:
  """The training data of the unified setting: the normal training images (and calibration hold-outs)
  of every configured category together, in one model. Test splits stay per category (`test` is None:
  each category is evaluated on its own)."""
  check_unified(config)
  parts = [load_category(config, c) for c in categories(config)]
  calibs = [p.calib for p in parts if p.calib is not None]
  return CategoryData(train=Concat(p.train for p in parts), test=None,
                      has_masks=all(p.has_masks for p in parts), root=parts[0].root,
                      calib=Concat(calibs) if calibs else None)


def load_example(source, index: int, size: int) -> dict:
  """Row `index` of `source` as the model sees it: {'image': float32 [size, size, 3] in [0, 1], 'path'}."""
  example = pipeline.load_resized(source, index, size)
  return {'image': example['image'].astype(np.float32) / 255.0, 'path': example['path']}
