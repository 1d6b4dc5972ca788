"""The embedded default demo: real ELPV solar-cell images (PyPI `elpv-dataset`), image-level labels.

Trains on defect-free monocrystalline cells, tests held-out normal cells against defective ones. The
default recipe; only the data, the image size (224 px, 14 x 14 tokens) and the budget (20 epochs, 480
steps) are set here; it finishes in about 10 minutes on 2 CPU cores.
"""
from adtr_jax import defaults


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'elpv'
  config.dataset.category = 'elpv_mono'
  config.dataset.elpv_cell_type = 'mono'
  config.dataset.image_size = 224
  config.train.num_epochs = 20
  return config
