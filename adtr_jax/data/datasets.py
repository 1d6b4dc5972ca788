"""What a run's config asks for: its categories, each prepared and ready for the input pipeline."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import ml_collections

import numpy as np

from adtr_jax import errors, multihost
from adtr_jax.data import builder, classes, elpv, image_cache, mixing, mvtec, pipeline

SOURCES = ('mvtec', 'elpv', 'classes')


@dataclasses.dataclass(frozen=True)
class CategoryData:
  """One category's splits: random-access sources (len(), [i] -> builder.ExampleSource's dict)."""
  train: Any
  test: Any
  has_masks: bool        # pixel-level ground truth for the anomalous test images
  root: pathlib.Path     # the MVTec-layout folder that holds <category>/
  calib: Any = None      # normal training images held out to calibrate the decision threshold
  labelled_files: tuple = ()  # real anomalies moved from test into training (few-shot protocol)


class Subset:
  """Rows `indices` of `source` (a random-access source), in that order."""

  def __init__(self, source, indices):
    self.source, self.indices = source, [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.source[self.indices[i]]


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


def split_calibration(train, fraction: float, seed: int):
  """Holds out round(fraction * N) (at least 1) seeded-random normal training rows -> (train, calib).

  fraction 0 -> (train, None): everything trains and no decision threshold is calibrated.
  """
  if fraction == 0.0:
    return train, None
  n = len(train)
  held = max(1, round(fraction * n))
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


def check_source(config: ml_collections.ConfigDict, category: str) -> None:
  """What can be checked of `category`'s data without reading it: the source is known, its root is
  given and exists (for MVTec, the category folder too), an ELPV category matches its cell type."""
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
    raise errors.ConfigError(
        'config.dataset.root is empty: pass --config.dataset.root=' +
        (f'/path to the folder that holds {category}/train, {category}/test and {category}/ground_truth'
         if source == 'mvtec' else ' a folder with train/<class>/ and test/<class>/, or an archive of one'))
  elif source == 'mvtec':
    mvtec.check_category(pathlib.Path(root).expanduser(), category)
  else:
    classes.check_root(root)


def check_unified(config: ml_collections.ConfigDict) -> None:
  if mixing.uses_anomalies(config):
    raise errors.ConfigError('dataset.unified=True trains on normal images only: unset anomalies.* '
                             "(num_labelled, synthetic, external_dir) and keep loss.type='mse'")


def _prepare(config: ml_collections.ConfigDict, category: str) -> tuple[pathlib.Path, str, bool, dict]:
  """(folder root, category folder name, whether masks are required, {split: builder.ExampleSource}),
  exporting and preparing whatever the cache does not hold yet (the tfds data, not the resized
  images)."""
  check_source(config, category)
  source = config.dataset.source
  if source == 'mvtec':
    root = pathlib.Path(config.dataset.root).expanduser()
    require_masks = config.dataset.require_masks
  elif source == 'elpv':
    root, category = elpv.export_elpv(cache_dir(config) / 'elpv', config.dataset.elpv_cell_type)
    require_masks = False
  else:
    root, category = classes.export_class(config.dataset.root, category, cache_dir(config) / 'classes')
    require_masks = False
  return root, category, require_masks, builder.prepare(root, category, cache_dir(config) / 'tfds',
                                                        require_masks)


def load_category(config: ml_collections.ConfigDict, category: str) -> CategoryData:
  """Prepares (or reuses) `category` of config.dataset.source in the cache's tfds data_dir.

  On multi-host runs process 0 prepares the shared files (export, tfds data) while the others wait;
  then every process resizes its share of each split's images into the image cache (all of them when
  its host does not share process 0's disk; see image_cache.cached).
  """
  root, category, require_masks, prepared = multihost.first_then_others(
      lambda: _prepare(config, category), f'prepare {category}')
  splits = {name: image_cache.cached(split, config.dataset.image_size, config.dataset.num_workers)
            for name, split in prepared.items()}
  train, calib = split_calibration(splits['train'], config.calibration.holdout_fraction, config.seed)
  test, has_masks = splits['test'], splits['test'].has_masks
  mixing.check(config, has_masks)
  labelled, files = None, ()
  if config.anomalies.num_labelled > 0:
    records = mvtec.scan_category(root, category, require_masks)['test']  # the rows' order
    taken, rest = mixing.take_labelled(records, config.anomalies.num_labelled, config.seed)
    test, files = Subset(test, rest), tuple(records[i]['path'] for i in taken)
    if mixing.trains_on_labelled(config):
      labelled = Subset(splits['test'], taken)
  if mixing.uses_anomalies(config):
    train = mixing.build(config, train, labelled)
  return CategoryData(train=train, test=test, has_masks=has_masks, root=root, calib=calib,
                      labelled_files=files)


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
