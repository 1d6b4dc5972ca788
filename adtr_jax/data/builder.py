"""A tensorflow-datasets builder that prepares one category (a records.Scan of any source) into
array_record files.

Images and masks are stored as encoded bytes in tfds.features.Image (the image file's own bytes; the
mask as a 0/255 PNG: the union of the record's mask files binarised at the source's threshold, or all
zero) and read back with `as_data_source` and PIL: encoding or decoding arrays inside tfds would need
TensorFlow, which is not a dependency.
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
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from adtr_jax import errors, faults
from adtr_jax.data import mvtec, pipeline, records

NAME = 'adtr_mvtec_layout'
LABELS = ('good', 'anomalous')
# Bump when what is stored changes: the version is part of every prepared dataset's path.
FORMAT_VERSION = '2.0.0'


@dataclasses.dataclass(eq=False)
class CategoryConfig(tfds.core.BuilderConfig):
  """One scanned category; `fingerprint` names its content (see fingerprint())."""
  fingerprint: str = ''


def fingerprint(scan: records.Scan) -> str:
  """sha256 of the scan's origin and mask threshold and of every listed file's split, path, label, size
  and mtime. A changed, added or removed image or mask gives a new fingerprint and so a new dataset."""
  h = hashlib.sha256(json.dumps([scan.origin, scan.mask_threshold, FORMAT_VERSION]).encode())
  for split, rows in scan.splits.items():
    for r in rows:
      for path in (r['path'], *r['mask_paths']):
        st = os.stat(path)
        h.update(json.dumps([split, path, r['label'], st.st_size, st.st_mtime_ns]).encode())
  return h.hexdigest()


def config_for(scan: records.Scan) -> CategoryConfig:
  """A config named '<category>_<fingerprint prefix>' (tfds config names allow [\\w+.-] only)."""
  fp = fingerprint(scan)
  safe = re.sub(r'[^\w.+-]', '_', scan.name)
  return CategoryConfig(name=f'{safe}_{fp[:16]}', version=FORMAT_VERSION, description=scan.origin,
                        fingerprint=fp)


def _png(mask: np.ndarray) -> bytes:
  """bool [H, W] -> a greyscale 0/255 PNG."""
  buffer = io.BytesIO()
  Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(buffer, format='PNG')
  return buffer.getvalue()


def _read(path: str) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise errors.DataError(f'cannot read {path}: {e}') from e


def encode_record(record: dict, mask_threshold: int = records.HALF) -> dict:
  """A scan record -> a tfds example. Decodes the image and masks once so that bad files fail now,
  naming the path, rather than mid-training."""
  image_bytes = _read(record['path'])
  height, width = mvtec.decode_image(image_bytes, record['path']).shape[:2]
  mask = np.zeros((height, width), bool)
  for path in record['mask_paths']:
    part = mvtec.decode_mask(_read(path), path, mask_threshold)
    if part.shape != (height, width):
      raise errors.DataError(f'mask {path} is {part.shape[1]}x{part.shape[0]} but image '
                             f'{record["path"]} is {width}x{height} (width x height)')
    mask |= part
  return {'image': image_bytes, 'mask': _png(mask), 'label': record['label'],
          'defect_type': record['defect_type'], 'path': record['path']}


class AdtrMvtecLayout(tfds.core.GeneratorBasedBuilder):
  """The labelled splits of one scanned category. `rescan` (set before download_and_prepare) lists the
  category again: what is stored is what the files hold while they are read."""

  name = NAME
  VERSION = tfds.core.Version(FORMAT_VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'nothing to download: the category is read where it lies.'
  rescan: Callable[[], records.Scan] | None = None
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
    scan = self.rescan()
    if fingerprint(scan) != self.builder_config.fingerprint:
      raise errors.DataError(f'{scan.origin} changed while it was being prepared; run again')
    return {split: self._generate_examples(rows, scan.mask_threshold)
            for split, rows in scan.splits.items()}

  def _generate_examples(self, rows: list[dict], mask_threshold: int):
    # Decoding for validation dominates preparation; PIL releases the GIL, so threads help.
    groups = (rows[i:i + 16] for i in range(0, len(rows), 16))
    encoded = (example for group in pipeline.parallel_map(lambda r: encode_record(r, mask_threshold),
                                                          groups, os.cpu_count() or 1)
               for example in group)
    for record, example in zip(rows, encoded):
      faults.point('prepare')
      yield record['path'], example


class ExampleSource:
  """Random access to a prepared split. source[i] -> {'image': uint8 [H, W, 3], 'mask': bool
  [H, W], 'label': int (1 = anomalous), 'defect_type': str, 'path': str}.

  has_masks: the category's anomalous images have pixel masks (else every mask is all False).
  records: the scan's records of the split (records.py), records[i] describing row i.
  """

  def __init__(self, rows, split: str, data_dir: str, has_masks: bool, records: list[dict]):
    if len(rows) != len(records):
      raise errors.DataError(f'{data_dir} holds {len(rows)} {split} rows but the scan lists '
                             f'{len(records)}: delete {data_dir} and run again')
    self._records = rows  # tfds ArrayRecordDataSource yielding undecoded image/mask bytes
    self.split = split
    self.data_dir = data_dir
    self.has_masks = has_masks
    self.records = records

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


def _load(builder: AdtrMvtecLayout, scan: records.Scan) -> dict[str, ExampleSource]:
  skip = tfds.decode.SkipDecoding()
  has_masks = any(r['mask_paths'] for r in scan.splits['test'])
  return {split: ExampleSource(builder.as_data_source(split, decoders={'image': skip, 'mask': skip}),
                               split, os.fspath(builder.data_path), has_masks, rows)
          for split, rows in scan.splits.items()}


def builder_for(data_dir, scan: records.Scan) -> AdtrMvtecLayout:
  """The builder of `scan`'s content in data_dir (its data_path: where it is, or will be, prepared)."""
  return AdtrMvtecLayout(data_dir=os.fspath(data_dir), config=config_for(scan))


def prepare(scan: Callable[[], records.Scan], data_dir, listed: records.Scan | None = None
            ) -> dict[str, ExampleSource]:
  """Prepares the category that `scan()` lists into `data_dir` (reused while its files are unchanged).
  `listed`: scan()'s result, when the caller has it already.

  Returns {split: ExampleSource} for the scan's labelled splits, rows in the scan's order.
  """
  listed = listed or scan()
  builder = builder_for(data_dir, listed)
  if not builder.is_prepared():
    counts = ', '.join(f'{len(rows)} {split}' for split, rows in listed.splits.items())
    print(f'adtr_jax: preparing {listed.origin} ({counts} images) into {builder.data_path}', flush=True)
    # tfds's nested per-split bars are noise next to our one line (preparing takes seconds).
    tfds.display_progress_bar(False)
    builder.rescan = scan
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    _remove_stale(builder)
  return _load(builder, listed)


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
