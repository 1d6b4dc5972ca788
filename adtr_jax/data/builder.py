"""A tensorflow-datasets builder that prepares one MVTec-layout category into array_record files.

Images and masks are stored as encoded bytes in tfds.features.Image (the image file's own bytes; the
mask's PNG, or an all-zero PNG made with PIL) and read back with `as_data_source` and PIL: encoding
or decoding arrays inside tfds would need TensorFlow, which is not a dependency.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from adtr_jax import errors
from adtr_jax.data import mvtec, pipeline

NAME = 'adtr_mvtec_layout'
SPLITS = ('train', 'test')
LABELS = ('good', 'anomalous')
# Bump when what is stored changes: the version is part of every prepared dataset's path.
FORMAT_VERSION = '1.0.0'


@dataclasses.dataclass(eq=False)
class CategoryConfig(tfds.core.BuilderConfig):
  """One category folder (the manual_dir); `fingerprint` names its content (see fingerprint())."""
  require_masks: bool = True
  fingerprint: str = ''


def fingerprint(cat_dir: pathlib.Path, records: dict, require_masks: bool) -> str:
  """sha256 of the absolute folder and every listed file's relative path, size and mtime.

  A changed, added or removed image or mask gives a new fingerprint and so a new dataset.
  """
  h = hashlib.sha256(json.dumps([str(cat_dir), require_masks, FORMAT_VERSION]).encode())
  for split in SPLITS:
    for r in records[split]:
      for path in filter(None, (r['path'], r['mask_path'])):
        st = os.stat(path)
        rel = os.path.relpath(path, cat_dir)
        h.update(json.dumps([split, rel, r['label'], st.st_size, st.st_mtime_ns]).encode())
  return h.hexdigest()


def config_for(cat_dir: pathlib.Path, records: dict, require_masks: bool) -> CategoryConfig:
  """A config named '<category>_<fingerprint prefix>' (tfds config names allow [\\w+.-] only)."""
  fp = fingerprint(cat_dir, records, require_masks)
  safe = re.sub(r'[^\w.+-]', '_', cat_dir.name)
  return CategoryConfig(name=f'{safe}_{fp[:16]}', version=FORMAT_VERSION,
                        description=f'{cat_dir} (require_masks={require_masks})',
                        require_masks=require_masks, fingerprint=fp)


def _zero_png(height: int, width: int) -> bytes:
  """An all-zero greyscale PNG: the mask of normal images (and of categories without masks)."""
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((height, width), np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def _read(path: str) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise errors.DataError(f'cannot read {path}: {e}') from e


def encode_record(record: dict) -> dict:
  """A scan record -> a tfds example. Decodes the image and mask once so that bad files fail now,
  naming the path, rather than mid-training."""
  image_bytes = _read(record['path'])
  height, width = mvtec.decode_image(image_bytes, record['path']).shape[:2]
  if record['mask_path']:
    mask_bytes = _read(record['mask_path'])
    shape = mvtec.decode_mask(mask_bytes, record['mask_path']).shape
    if shape != (height, width):
      raise errors.DataError(f'mask {record["mask_path"]} is {shape[1]}x{shape[0]} but image '
                             f'{record["path"]} is {width}x{height} (width x height)')
  else:
    mask_bytes = _zero_png(height, width)
  return {'image': image_bytes, 'mask': mask_bytes, 'label': record['label'],
          'defect_type': record['defect_type'], 'path': record['path']}


class AdtrMvtecLayout(tfds.core.GeneratorBasedBuilder):
  """Splits 'train' and 'test' of one MVTec-layout category, passed as DownloadConfig.manual_dir."""

  name = NAME
  VERSION = tfds.core.Version(FORMAT_VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'manual_dir is the category folder <root>/<category>.'
  # tfds 4.9.10 works this out with `importlib_resources`, which it does not install on Python 3.11;
  # it only uses it to look for a (here nonexistent) checksums file beside the code.
  code_path = epath.Path(__file__)

  # tfds prints two lines of its own around a preparation ("Downloading and preparing dataset Unknown
  # size ...", "... Subsequent calls will reuse this data."); prepare() prints our one line instead, so
  # theirs go to the log.
  def _log_download_bytes(self) -> None:
    logging.info('tfds: preparing %s in %s', self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('tfds: prepared %s in %s', self.name, self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'mask': tfds.features.Image(shape=(None, None, 1)),
            'label': tfds.features.ClassLabel(names=LABELS),
            'defect_type': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        # Keep the scan's sorted order: row i of a split is then the same file on every prepare.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    cat_dir = pathlib.Path(dl_manager.manual_dir)
    config = self.builder_config
    records = mvtec.scan_category(cat_dir.parent, cat_dir.name, config.require_masks)
    if fingerprint(cat_dir, records, config.require_masks) != config.fingerprint:
      raise errors.DataError(f'{cat_dir} changed while it was being prepared; run again')
    return {split: self._generate_examples(records[split]) for split in SPLITS}

  def _generate_examples(self, records: list[dict]):
    # Decoding for validation dominates preparation; PIL releases the GIL, so threads help.
    groups = (records[i:i + 16] for i in range(0, len(records), 16))
    rows = (row for group in pipeline.parallel_map(encode_record, groups, os.cpu_count() or 1)
            for row in group)
    for record, example in zip(records, rows):
      yield record['path'], example


class ExampleSource:
  """Random access to a prepared split. source[i] -> {'image': uint8 [H, W, 3], 'mask': bool
  [H, W], 'label': int (1 = anomalous), 'defect_type': str, 'path': str}.

  has_masks: the category's anomalous images have pixel masks (else every mask is all False).
  """

  def __init__(self, records, split: str, data_dir: str, has_masks: bool):
    self._records = records  # tfds ArrayRecordDataSource yielding undecoded image/mask bytes
    self.split = split
    self.data_dir = data_dir
    self.has_masks = has_masks

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    if not -len(self) <= i < len(self):
      raise IndexError(f'row {i} is out of range for the {len(self)} rows of {self}')
    raw = self._records[int(i) % len(self)]
    path, defect = raw['path'].decode(), raw['defect_type'].decode()
    return {'image': mvtec.decode_image(raw['image'], path),
            'mask': mvtec.decode_mask(raw['mask'], f'mask of {path}'),
            'label': int(raw['label']), 'defect_type': defect, 'path': path}

  def __repr__(self) -> str:
    return f'ExampleSource({self.split!r}, {self.data_dir})'


def _load(builder: AdtrMvtecLayout, has_masks: bool) -> dict[str, ExampleSource]:
  skip = tfds.decode.SkipDecoding()
  return {split: ExampleSource(builder.as_data_source(split, decoders={'image': skip, 'mask': skip}),
                               split, os.fspath(builder.data_path), has_masks)
          for split in SPLITS}


def prepare(root, category: str, data_dir, require_masks: bool = True) -> dict[str, ExampleSource]:
  """Prepares <root>/<category> into `data_dir` (reused while its files are unchanged).

  Returns {'train': ExampleSource, 'test': ExampleSource}, rows in the scan's sorted order.
  """
  cat_dir = pathlib.Path(root).expanduser().resolve() / category
  records = mvtec.scan_category(cat_dir.parent, category, require_masks)
  builder = AdtrMvtecLayout(data_dir=os.fspath(data_dir),
                            config=config_for(cat_dir, records, require_masks))
  if not builder.is_prepared():
    counts = ', '.join(f'{len(records[s])} {s}' for s in SPLITS)
    print(f'adtr_jax: preparing {cat_dir} ({counts} images) into {builder.data_path}', flush=True)
    # tfds's nested per-split bars are noise next to our one line (preparing takes seconds).
    tfds.display_progress_bar(False)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(cat_dir),
                                                     try_download_gcs=False))
    _remove_stale(builder)
  return _load(builder, any(r['mask_path'] for r in records['test']))


def _remove_stale(builder: AdtrMvtecLayout) -> None:
  """Deletes datasets prepared earlier from the same folder (same description, older content):
  a full MVTec category is hundreds of MB, and a changed folder never needs its old copy again."""
  current = pathlib.Path(builder.data_path).parent
  for old in current.parent.glob(f'{builder.builder_config.name.rsplit("_", 1)[0]}_*'):
    info = old / FORMAT_VERSION / 'dataset_info.json'
    if old != current and info.is_file() and (
        json.loads(info.read_text()).get('configDescription') == builder.builder_config.description):
      logging.info('removing %s, prepared from an older state of the same folder', old)
      shutil.rmtree(old, ignore_errors=True)
