"""Magnetic Tile Defects (MVTec layout, in ../shared/data) with the paper's model and optimiser settings.

The paper trains 500 epochs; on 2 CPU cores that takes days, so `train.num_epochs` is the budget knob.
"""
import pathlib

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.source = 'mvtec'
  config.dataset.root = str(pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data')
  config.dataset.category = 'magnetic_tile'
  config.dataset.image_size = 256
  config.backbone.arch = 'efficientnet_lite0'
  config.train.batch_size = 16
  config.train.num_epochs = 500
  config.train.lr_decay_epochs = (400,)
  return config
