"""Anomalies for anomaly-aware training, mixed into the normal training images.

Three sources (any combination, from `config.anomalies`):
- real labelled anomalies: moved out of the test split (few-shot: `num_labelled` per defect type), or
  put into the training split by the benchmark's split file (VisA's 2cls splits, `dataset.visa_split`),
- synthetic ones generated on the fly from normal training images (`synthetic`: confetti, cutpaste,
  perlin; several separated by commas),
- external irrelevant images from a folder (`external_dir`), image-level anomalies.

`MixedSource` appends anomalous "slots" after the normal rows so that a shuffled epoch has the anomalous
fraction `anomalies.fraction` in expectation. A slot's content is a pure function of (seed, epoch, slot):
runs are reproducible and resumable, and every epoch sees fresh synthetic anomalies.
"""
from __future__ import annotations

import collections

import ml_collections
import numpy as np

from adtr_jax import errors
from adtr_jax.data import anomalies, visa
from adtr_jax.data.folder import FolderSource



def synthetic_names(cfg: ml_collections.ConfigDict) -> list[str]:
  """anomalies.synthetic ('none', a name, or names separated by commas) -> validated names."""
  names = [n.strip() for n in cfg.synthetic.split(',') if n.strip() and n.strip() != 'none']
  for name in names:
    if name not in anomalies.GENERATORS:
      raise errors.ConfigError(f'anomalies.synthetic={cfg.synthetic!r}: unknown {name!r}; valid: none, '
                               f'{", ".join(anomalies.GENERATORS)}')
  return names


def split_labels_anomalies(config: ml_collections.ConfigDict) -> bool:
  """The benchmark's split file puts labelled anomalies into the training split (VisA 2cls)."""
  return config.dataset.source == 'visa' and config.dataset.visa_split in visa.LABELLED_SPLITS


def trains_on_labelled(config: ml_collections.ConfigDict) -> bool:
  a = config.anomalies
  return (a.num_labelled > 0 or split_labels_anomalies(config)) and a.labelled_use == 'train'


def uses_anomalies(config: ml_collections.ConfigDict) -> bool:
  a = config.anomalies
  return bool(trains_on_labelled(config) or synthetic_names(a) or a.external_dir)


def check(config: ml_collections.ConfigDict, has_masks: bool) -> None:
  """Config combinations that cannot train meaningfully are errors, naming the fields."""
  loss, a = config.loss.type, config.anomalies
  if split_labels_anomalies(config) and a.num_labelled > 0:
    raise errors.ConfigError(f'dataset.visa_split={config.dataset.visa_split!r} already puts labelled '
                             'anomalies into training: leave anomalies.num_labelled=0')
  if uses_anomalies(config) and loss == 'mse':
    raise errors.ConfigError('anomalies are configured (anomalies.num_labelled / synthetic / external_dir, or a '
                             "split with labelled training anomalies) but loss.type='mse' would train to "
                             "reconstruct them: use loss.type='pixel' or 'image' (or anomalies.labelled_use="
                             "'exclude' to leave labelled ones out)")
  if loss != 'mse' and not uses_anomalies(config):
    raise errors.ConfigError(f'loss.type={loss!r} needs anomalies: set anomalies.num_labelled, anomalies.synthetic '
                             'or anomalies.external_dir')
  if loss == 'pixel' and trains_on_labelled(config) and not has_masks:
    raise errors.ConfigError("loss.type='pixel' with anomalies.num_labelled > 0 needs pixel masks, but this "
                             "category has image-level labels only: use loss.type='image'")


def take_labelled(test_records: list[dict], n: int, seed: int) -> tuple[list[int], list[int]]:
  """Few-shot protocol: n seeded-random anomalous test rows per defect type -> (labelled, remaining)."""
  by_type = collections.defaultdict(list)
  for i, r in enumerate(test_records):
    if r['label'] == 1:
      by_type[r['defect_type']].append(i)
  rng = np.random.default_rng(seed)
  taken = []
  for defect in sorted(by_type):
    rows = by_type[defect]
    if len(rows) <= n:
      raise errors.ConfigError(f'anomalies.num_labelled={n} leaves no {defect!r} test image to evaluate '
                               f'({len(rows)} in the test split)')
    taken += sorted(rng.choice(rows, n, replace=False).tolist())
  taken_set = set(taken)
  return taken, [i for i in range(len(test_records)) if i not in taken_set]


class MixedSource:
  """Normal rows [0, N) then anomalous slots [N, N + M). [i] -> {'image', 'mask', 'label', 'path'}.

  Args:
    normal: the normal training source. labelled: real anomalies (with masks if the category has them).
    external: image-only anomalies (their mask is the whole image: every position is anomalous).
    synthetic: generator names applied to seeded-random normal rows.
  """

  def __init__(self, normal, *, labelled=None, external=None, synthetic=(), fraction: float,
               seed: int, epoch: int = 0):
    self.normal, self.labelled, self.external = normal, labelled, external
    self.synthetic, self.fraction, self.seed, self.epoch = tuple(synthetic), fraction, seed, epoch
    self.kinds = ([('labelled', labelled)] if labelled is not None and len(labelled) else []) + \
        ([('external', external)] if external is not None and len(external) else []) + \
        [('synthetic', name) for name in self.synthetic]
    if not self.kinds:
      raise ValueError('MixedSource needs at least one anomaly source')
    self.num_slots = max(1, round(len(normal) * fraction / (1.0 - fraction)))

  def for_epoch(self, epoch: int) -> 'MixedSource':
    """The same mixture with epoch-specific synthetic anomalies."""
    return MixedSource(self.normal, labelled=self.labelled, external=self.external,
                       synthetic=self.synthetic, fraction=self.fraction, seed=self.seed, epoch=epoch)

  def __len__(self) -> int:
    return len(self.normal) + self.num_slots

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if i < len(self.normal):
      return self.normal[i]
    slot = i - len(self.normal)
    rng = np.random.default_rng([self.seed, self.epoch, slot])
    kind, what = self.kinds[slot % len(self.kinds)]
    if kind == 'synthetic':
      base = self.normal[int(rng.integers(len(self.normal)))]
      image, mask = anomalies.make_anomaly(what, base['image'], rng)
      return {'image': image, 'mask': mask, 'label': 1, 'path': f'{what}({base.get("path", "")})'}
    example = what[int(rng.integers(len(what)))]
    if kind == 'external':
      h, w = example['image'].shape[:2]
      example = dict(example, mask=np.ones((h, w), bool), label=1)
    return example


def build(config: ml_collections.ConfigDict, normal, labelled=None) -> MixedSource:
  """The training mixture that config.anomalies asks for."""
  a = config.anomalies
  external = FolderSource(a.external_dir) if a.external_dir else None
  return MixedSource(normal, labelled=labelled, external=external, synthetic=synthetic_names(a),
                     fraction=a.fraction, seed=config.seed)



def save_examples(source: MixedSource, out_dir, image_size: int, n: int = 8) -> list[str]:
  """The first n anomalous slots as PNGs (image | mask) for inspection. Returns the paths."""
  import pathlib

  from adtr_jax import visualize
  from adtr_jax.data import pipeline
  paths = []
  for slot in range(min(n, source.num_slots)):
    ex = pipeline.load_resized(source, len(source.normal) + slot, image_size)
    mask = np.repeat(ex['mask'][..., None], 3, axis=-1) * np.uint8(255)
    panel = np.concatenate([ex['image'], mask], axis=1)
    path = pathlib.Path(out_dir) / f'anomaly_{slot:02d}.png'
    visualize.save_png(panel, path)
    paths.append(str(path))
  return paths
