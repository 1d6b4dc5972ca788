"""`python -m adtr_jax.convert` and loading its .npz output through the config."""
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from adtr_jax import convert
from adtr_jax.models import backbone, weights
from tests.conftest import REPO


def test_cli_converts_and_config_loads_the_npz(tmp_path, monkeypatch):
  monkeypatch.setenv('ADTR_JAX_CACHE', str(tmp_path / 'cache'))
  src = weights.find_weight_file('efficientnet_lite0')
  dst = tmp_path / 'lite0.npz'
  out = subprocess.run([sys.executable, '-m', 'adtr_jax.convert', '--arch=efficientnet_lite0',
                        f'--src={src}', f'--dst={dst}'], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"format": "efficientnet_pytorch"' in out.stdout
  params, info = weights.load_params('efficientnet_lite0', str(dst))
  direct = weights.convert(weights.read_state_dict(src), 'efficientnet_lite0')
  assert info['format'] == 'efficientnet_pytorch'
  flat, flat_direct = weights.flatten_tree(params), weights.flatten_tree(direct)
  assert flat.keys() == flat_direct.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_direct[key])
  cfg = ml_collections.ConfigDict(dict(arch='efficientnet_lite0', layers=('layer2',), out_stride=4,
                                       weights=str(dst), weights_format='auto'))
  model, info = backbone.build_backbone(cfg, rngs=nnx.Rngs(0))
  assert model.out_channels == 24 and info['weights_file'] == str(dst.resolve())


def test_npz_for_another_arch_is_refused(tmp_path):
  dst = tmp_path / 'lite0.npz'
  convert.convert_file('efficientnet_lite0', weights.find_weight_file('efficientnet_lite0'), dst)
  with pytest.raises(ValueError, match="converted for arch 'efficientnet_lite0', not backbone.arch="):
    weights.load_params('efficientnet_lite1', str(dst))


def test_cli_errors_are_one_clear_line(tmp_path):
  bad = tmp_path / 'junk.pth'
  bad.write_bytes(b'not a checkpoint at all')
  cases = [
      ([f'--src={bad}', '--arch=efficientnet_lite0'], 'cannot read PyTorch weights from'),
      ([f'--src={tmp_path / "missing.pth"}', '--arch=efficientnet_lite0'], 'missing.pth'),
      ([f'--src={bad}', '--arch=efficientnet_b99'], "unknown backbone.arch='efficientnet_b99'"),
  ]
  for args, message in cases:
    out = subprocess.run([sys.executable, '-m', 'adtr_jax.convert', *args, f'--dst={tmp_path / "o.npz"}'],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1 and message in out.stderr and 'Traceback' not in out.stderr, out.stderr


def test_unknown_format_is_named():
  state = weights.read_state_dict(weights.find_weight_file('efficientnet_lite0'))
  with pytest.raises(ValueError, match="'torchvision' is not one of"):
    weights.convert(state, 'efficientnet_lite0', 'torchvision')
  with pytest.raises(ValueError, match='cannot tell the checkpoint format'):
    weights.convert({'foo.weight': np.zeros(3)}, 'efficientnet_lite0')


def test_paper_config_is_b4_layers_1_to_5_and_asks_for_weights():
  from configs import mvtec_paper
  from adtr_jax.models import adtr, efficientnet
  config = mvtec_paper.get_config()
  assert (config.backbone.arch, config.dataset.image_size, config.backbone.out_stride) == (
      'efficientnet_b4', 256, 16)
  assert adtr.feature_grid(config) == (16, 16)
  channels = efficientnet.layer_channels(config.backbone.arch)
  assert sum(channels[name] for name in config.backbone.layers) == 720   # the paper's C
  with pytest.raises(ValueError, match='set backbone.weights'):
    adtr.build_model(config)
