"""A plain folder of images (no labels): what --mode=predict scores, and external anomalies."""
from __future__ import annotations

import pathlib

from adtr_jax import errors
from adtr_jax.data import mvtec


class FolderSource:
  """The images of a folder (sorted, no labels), for --mode=predict: [i] -> {'image', 'label': 0, 'path'}."""

  def __init__(self, folder):
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
      raise errors.DataError(f'{folder} is not a folder of images')
    self.paths = mvtec.images_in(folder)
    if not self.paths:
      raise errors.DataError(f'{folder} has no images ({", ".join(mvtec.IMAGE_EXTENSIONS)})')

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    return {'image': mvtec.load_image(self.paths[i]), 'label': 0, 'path': str(self.paths[i])}
