"""What a run's config asks for: its categories, each prepared and ready for the input pipeline."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import ml_collections

from adtr_jax.data import builder, elpv, pipeline

SOURCES = ('mvtec', 'elpv')


@dataclasses.dataclass(frozen=True)
class CategoryData:
  """One category's splits: random-access sources (len(), [i] -> builder.ExampleSource's dict)."""
  train: Any
  test: Any
  has_masks: bool        # pixel-level ground truth for the anomalous test images
  root: pathlib.Path     # the MVTec-layout folder that holds <category>/


def categories(config: ml_collections.ConfigDict) -> list[str]:
  """config.dataset.category split on commas, e.g. 'bottle, cable' -> ['bottle', 'cable']."""
  names = [c.strip() for c in config.dataset.category.split(',') if c.strip()]
  if not names:
    raise ValueError('no category given: pass --config.dataset.category=<name>[,<name>...]')
  if len(set(names)) != len(names):
    raise ValueError(f'--config.dataset.category={config.dataset.category!r} repeats a category')
  return names


def cache_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
  """config.dataset.cache_dir, else $ADTR_JAX_CACHE, else ~/.cache/adtr_jax."""
  path = config.dataset.cache_dir or os.environ.get('ADTR_JAX_CACHE') or '~/.cache/adtr_jax'
  return pathlib.Path(path).expanduser()


def _elpv_folder(config: ml_collections.ConfigDict, category: str) -> tuple[pathlib.Path, str]:
  cell_type = config.dataset.elpv_cell_type
  if category != f'elpv_{cell_type}':
    raise ValueError(f'--config.dataset.category={category!r} does not match '
                     f'--config.dataset.elpv_cell_type={cell_type!r}: that category is '
                     f'"elpv_{cell_type}"')
  return elpv.export_elpv(cache_dir(config) / 'elpv', cell_type)


def load_category(config: ml_collections.ConfigDict, category: str) -> CategoryData:
  """Prepares (or reuses) `category` of config.dataset.source in the cache's tfds data_dir."""
  source = config.dataset.source
  if source == 'mvtec':
    if not config.dataset.root:
      raise ValueError('config.dataset.root is empty: pass --config.dataset.root=/path to the folder '
                       f'that holds {category}/train, {category}/test and {category}/ground_truth')
    root, require_masks = pathlib.Path(config.dataset.root).expanduser(), True
  elif source == 'elpv':
    (root, category), require_masks = _elpv_folder(config, category), False
  else:
    raise ValueError(f'--config.dataset.source={source!r} is not one of {", ".join(SOURCES)}')
  splits = builder.prepare(root, category, cache_dir(config) / 'tfds', require_masks)
  return CategoryData(train=splits['train'], test=splits['test'],
                      has_masks=splits['test'].has_masks, root=root)


def load_example(source, index: int, size: int) -> dict:
  """Row `index` of `source` as the model sees it: {'image': float32 [size, size, 3] in [0, 1], 'path'}."""
  example = pipeline.load_resized(source, index, size)
  return {'image': example['image'], 'path': example['path']}
