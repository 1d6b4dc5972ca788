"""MVTec-AD with the paper's settings, on an EfficientNet-Lite backbone (the paper's B4 needs user weights).

  python -m adtr_jax.main --config=configs/mvtec.py --workdir=workdirs/mvtec \
      --config.dataset.root=/data/mvtec_ad --config.dataset.category=bottle,cable
"""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset.source = 'mvtec'
  config.dataset.category = ('bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,screw,'
                             'tile,toothbrush,transistor,wood,zipper')
  config.dataset.image_size = 256   # 16 x 16 tokens at stride 16, as in the paper
  config.backbone.arch = 'efficientnet_lite2'
  config.train.batch_size = 16
  config.train.num_epochs = 500
  config.train.lr_decay_epochs = (400,)
  return config
