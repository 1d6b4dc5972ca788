"""MVTec AD 2 at 256 px, one model per object; validation/ calibrates the decision threshold, and the
private test sets are scored with --mode=predict; docs/benchmarks.md.

  python -m adtr_jax.main --config=configs/mvtec_ad2.py --workdir=workdirs/mvtec_ad2 \
      --config.dataset.root=/data/mvtec_ad_2
"""
from adtr_jax import defaults
from adtr_jax.data import mvtec_ad2


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'mvtec_ad2'
  config.dataset.category = ','.join(mvtec_ad2.OBJECTS)
  config.dataset.image_size = 256
  config.backbone.arch = 'efficientnet_lite2'
  config.train.num_epochs = 100
  return config
