"""VisA (read where it lies: the extracted archive with the spot-diff split_csv/ copied into it) at
256 px, one model per class on the one-class split; docs/benchmarks.md.

  python -m adtr_jax.main --config=configs/visa.py --workdir=workdirs/visa \
      --config.dataset.root=/data/VisA_20220922
"""
from adtr_jax import defaults
from adtr_jax.data import visa


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'visa'
  config.dataset.category = ','.join(visa.CLASSES)
  config.dataset.visa_split = '1cls'
  config.dataset.image_size = 256   # 16 x 16 tokens at stride 16
  config.backbone.arch = 'efficientnet_lite2'
  config.train.num_epochs = 100
  return config
