"""Heatmap overlays as PNG: input | ground truth | score map over the input."""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def jet(x: np.ndarray) -> np.ndarray:
  """The 'jet' colour map: [H, W] in [0, 1] -> [H, W, 3] float in [0, 1]."""
  x = np.clip(x, 0.0, 1.0)[..., None]
  return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay_panel(image: np.ndarray, mask: np.ndarray | None, score_map: np.ndarray,
                  vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
  """image [S, S, 3] in [0,1], mask [S, S] or None, score_map [S, S] -> uint8 [S, 3S (or 2S), 3].

  vmin/vmax are shared by all panels of a run so colours compare across images.
  """
  heat = jet((score_map - vmin) / max(vmax - vmin, 1e-12))
  panels = [image]
  if mask is not None:
    panels.append(np.repeat(mask[..., None], 3, axis=-1).astype(np.float32))
  panels.append((1 - alpha) * image + alpha * heat)
  return (np.concatenate(panels, axis=1) * 255).round().astype(np.uint8)


def save_png(array: np.ndarray, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
