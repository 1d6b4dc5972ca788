"""predictions.csv and heatmap overlays of a scored folder: written alike by --mode=predict (JAX) and by
the JAX-free scorer (adtr_jax.deploy), so the two outputs compare line by line. numpy and pillow only."""
from __future__ import annotations

import csv
import pathlib
from typing import Callable, Sequence

import numpy as np

from adtr_jax import visualize

COLUMNS = ('path', 'image_score', 'decision')
UNREADABLE = 'unreadable'


def decide(score: float, threshold: float) -> str:
  """'anomalous' above the calibrated threshold, else 'normal'."""
  return 'anomalous' if score > threshold else 'normal'


def write(out_dir: pathlib.Path, paths: Sequence, scores: np.ndarray, maps: np.ndarray, threshold: float,
          image_of: Callable[[int], np.ndarray], extra: dict[str, Sequence] | None = None,
          unreadable: Sequence = ()) -> pathlib.Path:
  """out_dir/predictions.csv (path, image_score, decision, then the `extra` columns) and
  out_dir/heatmaps/<decision>_<stem>.png for each scored image. Returns the CSV's path.

  paths [N], scores [N], maps [N, S, S]: the scored images; image_of(i) -> float [S, S, 3] in [0, 1],
  image i as the model saw it. Colours share one scale (the 1st-99.9th percentile of all maps), so
  overlays compare across images. `unreadable` files get a row with no score and decision 'unreadable'.
  """
  out_dir = pathlib.Path(out_dir)
  extra = extra or {}
  rows = []
  if len(paths):
    vmin, vmax = np.percentile(maps, [1.0, 99.9])
  for i, path in enumerate(paths):
    decision = decide(scores[i], threshold)
    rows.append({'path': str(path), 'image_score': float(scores[i]), 'decision': decision,
                 **{k: float(v[i]) for k, v in extra.items()}})
    panel = visualize.overlay_panel(image_of(i), None, maps[i], vmin, vmax)
    visualize.save_png(panel, out_dir / 'heatmaps' / f'{decision}_{pathlib.Path(path).stem}.png')
  rows += [{'path': str(p), 'decision': UNREADABLE} for p in unreadable]
  csv_path = out_dir / 'predictions.csv'
  out_dir.mkdir(parents=True, exist_ok=True)
  with csv_path.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra], restval='')
    writer.writeheader()
    writer.writerows(rows)
  return csv_path
