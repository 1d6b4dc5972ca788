"""The embedded default demo: real ELPV solar-cell images (PyPI `elpv-dataset`), image-level labels.

Trains on defect-free monocrystalline cells, tests held-out normal cells against defective ones.
Sized to finish in about 15 minutes on 2 CPU cores.
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.source = 'elpv'
  config.dataset.category = 'elpv_mono'
  config.dataset.elpv_cell_type = 'mono'
  config.dataset.image_size = 224   # 14 x 14 tokens
  config.backbone.arch = 'efficientnet_lite0'
  config.train.batch_size = 16
  config.train.num_epochs = 8
  config.train.lr_decay_epochs = (6,)
  config.scoring.avgpool_size = 14
  return config
