"""The ELPV solar-cell images (PyPI `elpv-dataset`) exported as an MVTec-layout category.

labels.csv gives each 300x300 greyscale cell a defect probability in {0, 1/3, 2/3, 1} and a cell type
(mono, poly). Normal = probability 0, anomalous = 2/3 or 1; 1/3 ("possibly defective") is left out
because it is neither. A seeded quarter of the normal cells is held out as test/good.
"""
from __future__ import annotations

import pathlib

import numpy as np

from adtr_jax import errors
from adtr_jax.data import export

CELL_TYPES = ('mono', 'poly')
HELD_OUT_FRACTION = 0.25
SEED = 0
DEFECTIVE = 'defective'
PACKAGE = 'elpv-dataset==1.0.0.post1'
# Bump when the split rule changes, so that old exports are redone.
EXPORT_VERSION = 1


def package_data_dir() -> pathlib.Path:
  """site-packages/elpv_dataset/data (holds labels.csv and images/)."""
  try:
    import elpv_dataset
  except ImportError as e:
    raise ModuleNotFoundError(f'the ELPV images come from a PyPI package: pip install {PACKAGE}') from e
  return pathlib.Path(elpv_dataset.__file__).parent / 'data'


def read_labels(labels_csv: pathlib.Path) -> list[tuple[str, float, str]]:
  """(relative image path, defect probability, cell type) per line of labels.csv."""
  rows = []
  for n, line in enumerate(labels_csv.read_text().splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    if len(fields) != 3 or fields[2] not in CELL_TYPES:
      raise errors.DataError(f'{labels_csv}:{n}: expected "<image> <probability> <mono|poly>", got {line!r}')
    rows.append((fields[0], float(fields[1]), fields[2]))
  return rows


def split_cells(rows: list[tuple[str, float, str]], cell_type: str) -> dict[str, list[str]]:
  """Image paths of one cell type: {'train/good', 'test/good', 'test/defective', 'excluded'}."""
  if cell_type not in CELL_TYPES:
    raise errors.ConfigError(f'ELPV cell type {cell_type!r} is not one of {", ".join(CELL_TYPES)} '
                             '(--config.dataset.elpv_cell_type)')
  rows = [r for r in rows if r[2] == cell_type]
  normal = sorted(p for p, prob, _ in rows if prob == 0.0)
  # 2/3 is stored as 0.6666666666666666; compare with a margin.
  defective = sorted(p for p, prob, _ in rows if prob >= 2 / 3 - 1e-6)
  excluded = sorted(p for p, prob, _ in rows if 0.0 < prob < 2 / 3 - 1e-6)
  picks = np.random.default_rng(SEED).permutation(len(normal))[:round(HELD_OUT_FRACTION * len(normal))]
  held = {normal[i] for i in picks}
  return {'train/good': [p for p in normal if p not in held],
          'test/good': [p for p in normal if p in held],
          f'test/{DEFECTIVE}': defective, 'excluded': excluded}


def export_elpv(out_root, cell_type: str) -> tuple[pathlib.Path, str]:
  """Exports the `cell_type` cells as <out_root>/elpv_<cell_type> (MVTec layout, no ground_truth).

  Returns (out_root, category). Does nothing when a complete export is already there.
  """
  data_dir = package_data_dir()
  splits = split_cells(read_labels(data_dir / 'labels.csv'), cell_type)
  excluded = splits.pop('excluded')
  manifest = {'version': EXPORT_VERSION, 'source': str(data_dir / 'labels.csv'),
              'cell_type': cell_type, 'seed': SEED, 'held_out_fraction': HELD_OUT_FRACTION,
              'rule': 'probability 0 -> good, >= 2/3 -> defective, 1/3 -> excluded (ambiguous)',
              'counts': {**{k: len(v) for k, v in splits.items()}, 'excluded': len(excluded)},
              'excluded': excluded, 'files': splits}
  root = pathlib.Path(out_root).expanduser()
  category = f'elpv_{cell_type}'
  export.ensure(root / category, data_dir, manifest)
  return root, category
