r"""The paper's exact MVTec-AD settings: EfficientNet-B4 layers 1-5 (C = 720), 256 px, 16 x 16 tokens.

EfficientNet-B4 ImageNet weights cannot be downloaded here; bring your own checkpoint (torchvision,
timm or efficientnet_pytorch) and name it, converted or not:

  python -m adtr_jax.main --config=configs/mvtec_paper.py --workdir=workdirs/mvtec_paper \
      --config.dataset.root=/data/mvtec_ad --config.backbone.weights=/weights/efficientnet_b4.pth

(`python -m adtr_jax.convert --arch=efficientnet_b4 --src=... --dst=b4.npz` converts once up front.)

What the paper does not state and this config takes from adtr_jax/defaults.py: the initial scale of the
learned position/query embeddings (model.embed_init_std) and the avg-pool size of the image score. The
default recipe's additions (feature_norm, tie_qk_init, pos_init, warmup-cosine schedule, min_steps) are off.
Known deviation: attention goes through jax.nn.dot_product_attention, which has no dropout on the
attention weights (PyTorch's nn.MultiheadAttention drops them at 0.1); residual-branch dropout is kept.
"""
from adtr_jax import defaults


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'mvtec'
  config.dataset.category = ('bottle,cable,capsule,carpet,grid,hazelnut,leather,metal_nut,pill,screw,'
                             'tile,toothbrush,transistor,wood,zipper')
  config.dataset.image_size = 256
  config.backbone.arch = 'efficientnet_b4'
  config.backbone.layers = ('layer1', 'layer2', 'layer3', 'layer4', 'layer5')
  config.backbone.out_stride = 16          # 256 / 16 = 16 x 16 tokens
  config.backbone.weights = ''             # required: --config.backbone.weights=FILE
  # The paper's transformer, pinned here so that a change of the defaults cannot move it.
  config.model.update(hidden_dim=256, num_encoder_layers=4, num_decoder_layers=4, num_heads=8,
                      ffn_dim=1024, dropout=0.1)
  config.model.feature_norm = 'none'       # raw features in the loss and the score
  config.model.tie_qk_init = False         # independent key/query projections
  config.model.pos_init = 'normal'         # independently drawn position embeddings
  config.train.batch_size = 16
  config.train.learning_rate = 1e-4
  config.train.weight_decay = 1e-4
  config.train.grad_clip_norm = 0.1
  config.train.num_epochs = 500
  config.train.min_steps = 0
  config.train.schedule = 'step'           # constant, then x0.1 at epoch 400
  config.train.lr_decay_epochs = (400,)
  config.train.lr_decay_factor = 0.1
  config.train.feature_cache_dtype = 'float32'   # the cache then changes nothing but speed
  config.scoring.image_score = 'max_avgpool'
  config.scoring.gaussian_sigma = 0.0      # the paper upsamples the map and does not smooth it
  config.calibration.holdout_fraction = 0.0   # the paper trains on every normal training image
  return config
