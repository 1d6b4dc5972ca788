"""CIFAR-10, one-class protocol (the paper: ADTR 94.7 mean image AUROC over the 10 classes).

Category <class> trains on that class's 5,000 training images and tests on all 10,000 test images (its
own 1,000 normal, the other 9,000 anomalous), with the image score = the mean of the score map, as in
the paper. The default recipe; only the data, the image size and the budget are set here (plus that
image score, which is the protocol's): 128 px (the 32 px images upsampled 4x; 8 x 8 tokens) and 1 epoch
(312 steps at batch 16), sized for a CPU (README "Results"). `dataset.root` is the folder-per-class
archive in ../shared/data (extracted once into the cache); any folder with train/<class>/ and
test/<class>/ works the same way.

  python -m adtr_jax.main --config=configs/cifar10.py --workdir=W --config.dataset.category=airplane
  python -m adtr_jax.main --config=configs/cifar10.py --workdir=W      # all 10 classes, one model each
"""
import pathlib

from adtr_jax import defaults

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def get_config():
  config = defaults.get_config()
  config.dataset.source = 'classes'
  config.dataset.root = str(pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' /
                            'cifar10_jpeg.tar.gz')
  config.dataset.category = ','.join(CLASSES)
  config.dataset.image_size = 128
  config.scoring.image_score = 'mean'
  config.train.num_epochs = 1
  return config
