"""A small, fast ADTR on the toy MVTec-layout category: 64 px, stride 8 (8x8 tokens), 1+1 layers.
It trains from the device feed (train.feature_cache='device'), which the default 'auto' picks on
accelerators, so that the tests on CPU cover it (tests/test_preflight.py covers 'auto').

Also a config file for the CLI: `--config=tests/tiny_config.py:<root>|<cache_dir>`.
"""
from adtr_jax import defaults


def make(root, cache_dir, **train):
  config = defaults.get_config()
  config.dataset.root = str(root)
  config.dataset.category = 'toy'
  config.dataset.image_size = 64
  config.dataset.cache_dir = str(cache_dir)
  config.dataset.num_workers = 1
  config.backbone.layers = ('layer1', 'layer2', 'layer3')
  config.backbone.out_stride = 8
  config.model.update(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4,
                      ffn_dim=64, dropout=0.1)
  config.train.update(batch_size=8, num_epochs=2, lr_decay_epochs=(), log_every_steps=1,
                      learning_rate=1e-3, schedule='step', feature_cache='device', feature_cache_dtype='float32',
                      min_steps=0)
  config.train.update(**train)
  config.scoring.update(avgpool_size=8, gaussian_sigma=1.0)
  config.eval.update(batch_size=8, num_heatmaps=4)
  return config


def get_config(arg: str):
  root, cache_dir = arg.split('|')
  return make(root, cache_dir)
