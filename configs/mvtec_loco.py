"""MVTec LOCO AD at 256 px, one model per object; validation/ calibrates the decision threshold;
docs/benchmarks.md.

  python -m adtr_jax.main --config=configs/mvtec_loco.py --workdir=workdirs/mvtec_loco \
      --config.dataset.root=/data/mvtec_loco_anomaly_detection
"""
from adtr_jax import defaults
from adtr_jax.data import mvtec_loco


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'mvtec_loco'
  config.dataset.category = ','.join(mvtec_loco.OBJECTS)
  config.dataset.image_size = 256
  config.backbone.arch = 'efficientnet_lite2'
  config.train.num_epochs = 100
  return config
