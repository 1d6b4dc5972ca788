"""Every field at its default (adtr_jax/defaults.py, where each field is documented), as a config file.

  python -m adtr_jax.main --config=configs/default.py --workdir=W --config.dataset.root=/data \
      --config.dataset.category=bottle
"""
from adtr_jax import defaults


def get_config():
  return defaults.get_config()
