"""predictions.csv and heatmap overlays of a scored folder: written alike by --mode=predict (JAX) and by
the JAX-free scorer (adtr_jax.deploy), so the two outputs compare line by line. numpy and pillow only."""
from __future__ import annotations

import csv
import pathlib
from typing import Sequence

import numpy as np

from adtr_jax import visualize

COLUMNS = ('path', 'image_score', 'decision')
UNREADABLE = 'unreadable'


def decide(score: float, threshold: float) -> str:
  """'anomalous' above the calibrated threshold, else 'normal'."""
  return 'anomalous' if score > threshold else 'normal'


def write_overlay(out_dir: pathlib.Path, path, score: float, score_map: np.ndarray, threshold: float,
                  image: np.ndarray, scale: Sequence[float]) -> pathlib.Path:
  """out_dir/heatmaps/<decision>_<stem>.png: image uint8 [S, S, 3] as the model saw it, and its score
  map [S, S] over it, coloured on the fixed scale (vmin, vmax) = the model's calibration 'map_scale'
  (the 1st and 99.9th percentile of its held-out normal images' maps), so that overlays compare
  across images and across runs, and each can be drawn as soon as its image is scored."""
  vmin, vmax = scale
  panel = visualize.overlay_panel(np.asarray(image, np.float32) / 255.0, None, score_map, vmin, vmax)
  out = pathlib.Path(out_dir) / 'heatmaps' / f'{decide(score, threshold)}_{pathlib.Path(path).stem}.png'
  visualize.save_png(panel, out)
  return out


def write_csv(out_dir: pathlib.Path, paths: Sequence, scores: np.ndarray, threshold: float,
              extra: dict[str, Sequence] | None = None, unreadable: Sequence = ()) -> pathlib.Path:
  """out_dir/predictions.csv: path, image_score, decision, then the `extra` columns, one row per
  scored image (paths [N], scores [N], in the CSV's order); `unreadable` files get a row with no score
  and decision 'unreadable'. Returns the CSV's path."""
  out_dir = pathlib.Path(out_dir)
  extra = extra or {}
  rows = [{'path': str(path), 'image_score': float(scores[i]), 'decision': decide(scores[i], threshold),
           **{k: float(v[i]) for k, v in extra.items()}} for i, path in enumerate(paths)]
  rows += [{'path': str(p), 'decision': UNREADABLE} for p in unreadable]
  csv_path = out_dir / 'predictions.csv'
  out_dir.mkdir(parents=True, exist_ok=True)
  with csv_path.open('w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *extra], restval='')
    writer.writeheader()
    writer.writerows(rows)
  return csv_path
