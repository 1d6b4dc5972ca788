"""Real-IAD's official setting: one unified model over the 30 categories, the 256 px images
(realiad_256) and the multi-view JSONs (realiad_jsons; realiad_jsons_sv for single view);
docs/benchmarks.md.

  python -m adtr_jax.main --config=configs/realiad.py --workdir=workdirs/realiad \
      --config.dataset.root=/data/Real-IAD
"""
from adtr_jax import defaults
from adtr_jax.data import realiad


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'realiad'
  config.dataset.category = ','.join(realiad.CATEGORIES)
  config.dataset.unified = True
  config.dataset.realiad_resolution = '256'
  config.dataset.realiad_json = 'realiad_jsons'
  config.dataset.image_size = 256
  config.backbone.arch = 'efficientnet_lite2'
  # About 1,250 training images a category in realiad_jsons: 37,000 in all, 2,300 steps an epoch.
  config.train.num_epochs = 20
  return config
