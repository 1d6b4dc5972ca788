"""MVTec-AD with the default recipe at the paper's resolution, on EfficientNet-Lite2 (the paper's B4 needs
user weights; configs/mvtec_paper.py has the paper's exact settings).

  python -m adtr_jax.main --config=configs/mvtec.py --workdir=workdirs/mvtec \
      --config.dataset.root=/data/mvtec_ad --config.dataset.category=bottle,cable
"""
from adtr_jax import defaults


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'mvtec'
  config.dataset.category = ('bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,screw,'
                             'tile,toothbrush,transistor,wood,zipper')
  config.dataset.image_size = 256   # 16 x 16 tokens at stride 16, as in the paper
  config.backbone.arch = 'efficientnet_lite2'
  config.train.num_epochs = 100   # the budget; the recipe completes its schedule for any value
  return config
