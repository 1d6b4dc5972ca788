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


def line_plot(x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str,
              xmax: float = 1.0, size: int = 360) -> np.ndarray:
  """A curve y(x) on [0, xmax] x [0, 1] with axes, ticks and labels -> uint8 [size, size, 3].

  Drawn with PIL so that plotting needs no extra dependency.
  """
  from PIL import ImageDraw
  img = Image.new('RGB', (size, size), 'white')
  draw = ImageDraw.Draw(img)
  left, top, right, bottom = 48, 28, size - 14, size - 40
  def to_px(xv, yv):
    return (left + (right - left) * np.clip(xv / xmax, 0, 1), bottom - (bottom - top) * np.clip(yv, 0, 1))
  draw.rectangle([left, top, right, bottom], outline='black')
  for t in (0.0, 0.25, 0.5, 0.75, 1.0):
    px, _ = to_px(t * xmax, 0)
    _, py = to_px(0, t)
    draw.line([(px, bottom), (px, bottom + 4)], fill='black')
    draw.text((px - 10, bottom + 6), f'{t * xmax:.2g}', fill='black')
    draw.line([(left - 4, py), (left, py)], fill='black')
    draw.text((left - 30, py - 6), f'{t:.2g}', fill='black')
  draw.text((left, 8), title, fill='black')
  draw.text(((left + right) // 2 - 3 * len(xlabel), size - 18), xlabel, fill='black')
  draw.text((4, top - 16), ylabel, fill='black')
  keep = x <= xmax
  points = [tuple(map(float, to_px(a, b))) for a, b in zip(x[keep], y[keep])]
  if len(points) >= 2:
    draw.line(points, fill=(200, 30, 30), width=2)
  return np.asarray(img)
