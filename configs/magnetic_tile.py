"""Magnetic Tile Defects (MVTec layout, in ../shared/data) with the default recipe.

Only the data, the image size and the budget are set here: 224 px (14 x 14 tokens) and 16 epochs (640
steps at batch 16), about 14 minutes of training and evaluation on 2 CPU cores.
"""
import pathlib

from adtr_jax import defaults


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'mvtec'
  config.dataset.root = str(pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data')
  config.dataset.category = 'magnetic_tile'
  config.dataset.image_size = 224
  config.train.num_epochs = 16
  return config
