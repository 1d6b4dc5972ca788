"""ResNet / Wide-ResNet family: numerical parity with torchvision and timm, conversion and weight files.

Reference models get random weights and random BatchNorm statistics (torch_refs.randomize_batchnorm);
both sides see the same 64x64 image (torch: ImageNet-normalised NCHW, ours: [0, 1] NHWC). Tolerance:
max |ours - torch| <= RTOL * max |torch| + ATOL per output, float32 on CPU. With random He-initialised
weights the deep activations of the 34/50-layer nets reach O(1000) (resnet18: O(20)), where float32
summation-order noise alone exceeds an absolute 1e-4, hence the relative bound. Measured: at most
~2.6e-6 * max |torch| (e.g. resnet18 logits 7e-6 absolute); the differences are printed (pytest -s)
and recorded as test properties.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from adtr_jax.models import backbone, resnet, weights
from tests import torch_refs

RTOL, ATOL = 1e-5, 1e-5
SIZE = 64
# Our 'layerK' (stride 2^K) -> the torch module whose output it is (see resnet.py's docstring); the
# stem's ReLU is `relu` in torchvision and `act1` in timm.
TORCH_LAYER = {'layer1': ('relu', 'act1'), 'layer2': 'layer1', 'layer3': 'layer2', 'layer4': 'layer3',
               'layer5': 'layer4'}


@functools.lru_cache(maxsize=None)
def _reference(arch: str, source: str = 'torchvision'):
  """A torch ResNet with random weights and BN statistics, in eval mode, and its numpy state dict."""
  torch = torch_refs.require('torch')
  torch.manual_seed(0)
  if source == 'timm':
    _, timm = torch_refs.require('torchvision', 'timm')
    model = timm.create_model(arch, pretrained=False)
  else:
    model = getattr(torch_refs.require('torchvision').models, arch)(weights=None)
  torch_refs.randomize_batchnorm(model, seed=1)
  return model.eval(), torch_refs.state_dict_numpy(model)


def _images(batch=1, size=SIZE) -> np.ndarray:
  """[B, size, size, 3] float32 in [0, 1]."""
  return np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)


def _module(model, names):
  """The first of `names` (one name or a tuple of alternatives) that `model` has."""
  names = (names,) if isinstance(names, str) else names
  return next(getattr(model, n) for n in names if hasattr(model, n))


def _torch_outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
  """Per our layer name, the torch model's activation as NHWC, plus 'logits'."""
  import torch
  outs = {}
  hooks = [_module(model, TORCH_LAYER[name]).register_forward_hook(
      lambda m, i, o, name=name: outs.__setitem__(name, o.permute(0, 2, 3, 1).numpy().copy()))
      for name in backbone.LAYERS]
  mean, std = np.array(resnet.IMAGENET_MEAN, np.float32), np.array(resnet.IMAGENET_STD, np.float32)
  x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    outs['logits'] = model(x).numpy()
  for h in hooks:
    h.remove()
  return outs


def _flax_model(arch: str, fmt: str, params: dict) -> resnet.ResNet:
  """An abstractly built model filled with converted weights (every variable must be given)."""
  return weights.load_into(nnx.eval_shape(lambda: resnet.build(arch, fmt, rngs=nnx.Rngs(0))), params)


@nnx.jit
def _run(model, images):
  return dict(model.features(images), logits=model(images))


def _assert_parity(arch, fmt, ref_model, state, record_property):
  """Converts `state`, runs both models on the same image and compares every layer and the logits."""
  model = _flax_model(arch, fmt, weights.convert(state, arch, fmt))
  images = _images()
  ours = jax.tree.map(np.asarray, _run(model, jnp.asarray(images)))
  ref = _torch_outputs(ref_model, images)
  return torch_refs.assert_outputs_match(ours, ref, f'{arch} ({fmt})', record_property, RTOL, ATOL)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50', 'wide_resnet50_2'])
def test_matches_torchvision(arch, record_property):
  ref_model, state = _reference(arch)
  _assert_parity(arch, 'torchvision', ref_model, state, record_property)


def test_matches_timm_resnet18(record_property):
  ref_model, state = _reference('resnet18', 'timm')
  assert resnet.detect_format(set(state)) == 'torchvision'  # timm keys are torchvision's
  _assert_parity('resnet18', 'timm', ref_model, state, record_property)


def test_convert_lists_missing_unexpected_and_misshaped_keys():
  state = dict(_reference('resnet18')[1])
  del state['layer2.1.bn2.running_var']
  state['layer3.0.downsample.0.weight'] = state['layer3.0.downsample.0.weight'][:, :7]
  state['layer9.0.conv1.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    weights.convert(state, 'resnet18', 'torchvision')
  msg = str(err.value)
  assert "missing keys ['layer2.1.bn2.running_var']" in msg
  assert "unexpected keys ['layer9.0.conv1.weight']" in msg
  assert 'layer3.0.downsample.0.weight (256, 7, 1, 1)' in msg


def test_convert_layouts_and_format_detection():
  state = _reference('resnet18')[1]
  params = weights.convert(state, 'resnet18')  # 'auto' -> detected
  np.testing.assert_array_equal(params['stem_conv']['kernel'][1, 2, 0, 5],
                                state['conv1.weight'][5, 0, 1, 2])  # OIHW -> HWIO
  np.testing.assert_array_equal(params['stages'][1][0]['down_bn']['var'],
                                state['layer2.0.downsample.1.running_var'])
  np.testing.assert_array_equal(params['fc']['kernel'], state['fc.weight'].T)
  assert resnet.detect_format(set(state)) == 'torchvision'
  assert resnet.detect_format({'_conv_stem.weight', 'conv1.weight'}) is None
  with pytest.raises(ValueError, match='timm'):
    weights.convert(state, 'resnet18', 'efficientnet_pytorch')


def test_features_skip_stages_after_the_deepest_requested_layer():
  model = nnx.eval_shape(lambda: resnet.build('resnet18', 'torchvision', rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

  def convs(layers):
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).features(x, layers))(state, x)
    return str(jaxpr).count('conv_general_dilated')
  # stem 1; resnet18 stages: 4 convs each, plus a downsample conv in stages 2-4.
  assert convs(('layer1',)) == 1
  assert convs(('layer3', 'layer1')) == 1 + 4 + 5
  assert convs(backbone.LAYERS) == 1 + 4 + 3 * 5
  with pytest.raises(ValueError, match='layer6'):
    nnx.eval_shape(lambda m, x: m.features(x, ('layer6',)), model, x)


def _write(path, state_torch, kind):
  import torch
  if kind == 'safetensors':
    torch_refs.require('safetensors.torch').save_file(state_torch, str(path))
  else:
    torch.save(state_torch, path, _use_new_zipfile_serialization=(kind == 'zip'))


@pytest.mark.parametrize('kind', ['zip', 'legacy', 'safetensors'])
def test_weight_files_load_through_the_backbone(kind, tmp_path, monkeypatch):
  """torch.save (zip and legacy) and safetensors files -> load_params -> the directly converted params."""
  monkeypatch.setenv('ADTR_JAX_CACHE', str(tmp_path / 'cache'))
  ref_model, state = _reference('resnet18')
  path = tmp_path / f'resnet18.{"safetensors" if kind == "safetensors" else "pth"}'
  _write(path, {k: v.contiguous() for k, v in ref_model.state_dict().items()}, kind)
  params, info = weights.load_params('resnet18', str(path))
  assert info['format'] == 'torchvision' and info['weights_sha256'] == weights.sha256(path)
  assert len(list((tmp_path / 'cache' / 'weights').glob('*.npz'))) == 1
  expected = weights.flatten_tree(weights.convert(state, 'resnet18', 'torchvision'))
  got = weights.flatten_tree(params)
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))
  if kind == 'zip':  # and on through the Backbone module: shapes, channels, values of one layer
    cfg = ml_collections.ConfigDict(dict(arch='resnet18', layers=('layer4', 'layer2'), out_stride=16,
                                         weights=str(path)))
    model, info = backbone.build_backbone(cfg, rngs=nnx.Rngs(0))
    assert model.out_channels == 256 + 64 and info['format'] == 'torchvision'
    images = jnp.asarray(_images())
    out = nnx.jit(lambda m, x: m(x))(model, images)
    assert out.shape == (1, SIZE // 16, SIZE // 16, 320)
    ref = _torch_outputs(ref_model, _images())['layer4']
    np.testing.assert_allclose(out[..., :256], ref, rtol=0, atol=RTOL * np.abs(ref).max() + ATOL)
