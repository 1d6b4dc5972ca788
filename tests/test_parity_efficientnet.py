"""EfficientNet-B family: numerical parity with efficientnet_pytorch (lukemelas), torchvision and timm.

Reference models get random weights and random BatchNorm statistics (torch_refs.randomize_batchnorm);
both sides see the same 64x80 image (torch: normalised NCHW, normalised here with the constants each
library documents; ours: [0, 1] NHWC, normalised by the model as its format says). The size is
non-square and reaches odd feature sizes (W: 80 -> 40 -> 20 -> 10 -> 5 -> 3), so TF SAME and symmetric
padding are both exercised where they differ (even sizes) and agree (odd sizes). Tolerance: max |ours -
torch| <= RTOL * max |torch| + ATOL per output, float32 on CPU; the measured differences are printed
(pytest -s) and recorded as test properties.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adtr_jax.models import backbone, efficientnet, efficientnet_formats, weights
from tests import torch_refs

RTOL, ATOL = 1e-5, 1e-5
SIZE = (64, 80)  # H, W
# Normalisation each reference library documents for these weights (independent of our tables).
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Our 'layerK' -> index of the torch stage whose output it is (torchvision: features[i], timm:
# blocks[i]); for lukemelas, extract_endpoints()['reduction_K'].
TORCHVISION_STAGE = {'layer1': 1, 'layer2': 2, 'layer3': 3, 'layer4': 5, 'layer5': 7}
TIMM_STAGE = {'layer1': 0, 'layer2': 1, 'layer3': 2, 'layer4': 4, 'layer5': 6}


def _construct(source: str, arch: str):
  """The reference torch model for our `arch` ('efficientnet_b0') from `source`, default init."""
  i = arch.removeprefix('efficientnet_b')
  if source == 'efficientnet_pytorch':
    ep = torch_refs.require('efficientnet_pytorch')
    return ep.EfficientNet.from_name(f'efficientnet-b{i}', image_size=SIZE)  # static SAME pads for SIZE
  if source == 'torchvision':
    return getattr(torch_refs.require('torchvision').models, arch)(weights=None)
  _, timm = torch_refs.require('torchvision', 'timm')
  return timm.create_model(f'tf_efficientnet_b{i}' if source == 'timm_tf' else arch, pretrained=False)


@functools.lru_cache(maxsize=None)
def _reference(source: str, arch: str):
  """A torch model with random weights and BN statistics, in eval mode, and its numpy state dict."""
  import torch
  torch.manual_seed(0)
  model = _construct(source, arch)
  torch_refs.randomize_batchnorm(model, seed=1)
  return model.eval(), torch_refs.state_dict_numpy(model)


def _images(batch=1) -> np.ndarray:
  """[B, H, W, 3] float32 in [0, 1]."""
  return np.random.default_rng(0).uniform(0, 1, (batch, *SIZE, 3)).astype(np.float32)


def _torch_outputs(source: str, model, x) -> dict[str, np.ndarray]:
  """Per our layer name, the torch model's activation as NHWC, plus 'logits'."""
  import torch
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy().copy()  # noqa: E731
  outs, threads = {}, torch.get_num_threads()
  torch.set_num_threads(1)  # these tiny inputs run ~40x slower multi-threaded on a busy 2-core CPU
  with torch.no_grad():
    if source == 'efficientnet_pytorch':
      ends = model.extract_endpoints(x)
      outs = {name: nhwc(ends[f'reduction_{k + 1}']) for k, name in enumerate(backbone.LAYERS)}
    else:
      stages, index = ((model.features, TORCHVISION_STAGE) if source == 'torchvision'
                       else (model.blocks, TIMM_STAGE))
      hooks = [stages[index[name]].register_forward_hook(
          lambda m, i, o, name=name: outs.__setitem__(name, nhwc(o))) for name in backbone.LAYERS]
    outs['logits'] = model(x).numpy()
  torch.set_num_threads(threads)
  if source != 'efficientnet_pytorch':
    for h in hooks:
      h.remove()
  return outs


def _flax_model(arch: str, fmt: str, params: dict) -> efficientnet.EfficientNet:
  """An abstractly built model filled with converted weights (every variable must be given)."""
  return weights.load_into(nnx.eval_shape(lambda: efficientnet.build(arch, fmt, rngs=nnx.Rngs(0))), params)


@nnx.jit
def _run(model, images):
  feats = model.features(images)  # one trunk for both: model(x) is model.head(features(x)['layer5'])
  return dict(feats, logits=model.head(feats['layer5']))


def _assert_parity(source, arch, fmt, norm, record_property):
  """Converts the reference's state dict, runs both models on one image, compares layers and logits."""
  import torch
  ref_model, state = _reference(source, arch)
  model = _flax_model(arch, fmt, weights.convert(state, arch, fmt))
  images = _images()
  mean, std = (np.array(v, np.float32) for v in norm)
  ref = _torch_outputs(source, ref_model,
                       torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy()))
  ours = jax.tree.map(np.asarray, _run(model, jnp.asarray(images)))
  torch_refs.assert_outputs_match(ours, ref, f'{arch} ({fmt})', record_property, RTOL, ATOL)


@pytest.mark.parametrize('arch', ['efficientnet_b0', 'efficientnet_b4'])
def test_matches_efficientnet_pytorch(arch, record_property):
  _assert_parity('efficientnet_pytorch', arch, 'efficientnet_pytorch', IMAGENET, record_property)


def test_matches_torchvision(record_property):
  _assert_parity('torchvision', 'efficientnet_b0', 'torchvision', IMAGENET, record_property)


def test_matches_timm(record_property):
  _assert_parity('timm', 'efficientnet_b0', 'timm', IMAGENET, record_property)


def test_matches_timm_tf(record_property):
  _assert_parity('timm_tf', 'efficientnet_b0', 'timm_tf', IMAGENET, record_property)


@pytest.mark.parametrize('arch', [f'efficientnet_b{i}' for i in range(8)])
def test_every_arch_matches_the_references_key_for_key(arch):
  """Structure only, for all B archs (the parity tests convert and run B0/B4 for real), cheaply: the
  reference models are built on torch's meta device, and no Flax model is built.

  Each library's keys must be exactly those our table names, the libraries' tensors that feed one Flax
  variable must agree in shape, their BatchNorm epsilon must be the format's, and lukemelas' block
  geometry must be ours.
  """
  import torch
  shapes, refs = {}, {}
  for source in ('efficientnet_pytorch', 'torchvision', 'timm', 'timm_tf'):
    with torch.device('meta'):
      refs[source] = _construct(source, arch)
    eps = {m.eps for m in refs[source].modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {efficientnet_formats.flavour(source, efficientnet.ARCHS[arch]).bn_eps}, source
    state = {k: tuple(v.shape) for k, v in refs[source].state_dict().items()
             if not k.endswith('num_batches_tracked')}
    table = {f'{prefix}.{tname}': tuple(path) + (fname,)
             for prefix, path, kind in efficientnet.torch_modules(arch, source)
             for tname, (fname, _) in weights.KINDS[kind].items()}
    assert sorted(table) == sorted(state), source
    for key, path in table.items():
      shapes.setdefault(path, set()).add(state[key])
  assert {p: s for p, s in shapes.items() if len(s) > 1} == {}
  ref = refs['efficientnet_pytorch']
  stride = lambda s: s[0] if isinstance(s, (list, tuple)) else s  # noqa: E731
  theirs = [(b._block_args.input_filters, b._block_args.output_filters, b._block_args.kernel_size,
             stride(b._block_args.stride), b._block_args.expand_ratio, b._se_reduce.out_channels)
            for b in ref._blocks]
  ours = [(b.in_channels, b.out_channels, b.kernel, b.stride, b.expand, b.se_channels)
          for b in efficientnet.blocks(efficientnet.ARCHS[arch])]
  assert ours == theirs
  spec = efficientnet.VARIANTS[efficientnet.ARCHS[arch]]
  assert (spec.stem, spec.head) == (ref._conv_stem.out_channels, ref._conv_head.out_channels)


def test_format_fixes_padding_epsilon_and_normalisation():
  def flavour(fmt, variant):
    return dataclasses.astuple(efficientnet_formats.flavour(fmt, variant))
  assert flavour('efficientnet_pytorch', 'b0') == ('same', 1e-3, *IMAGENET)
  assert flavour('efficientnet_pytorch_inception', 'b0') == ('same', 1e-3, *INCEPTION)
  assert flavour('torchvision', 'b4') == ('symmetric', 1e-5, *IMAGENET)
  assert flavour('torchvision', 'b5') == ('symmetric', 1e-3, *IMAGENET)  # TF-ported B5..B7
  assert flavour('timm', 'b0') == ('symmetric', 1e-5, *IMAGENET)
  assert flavour('timm_inception', 'b0') == ('symmetric', 1e-5, *INCEPTION)
  assert flavour('timm_tf', 'b0') == ('same', 1e-3, *IMAGENET)
  assert flavour('timm_tf_inception', 'b0') == ('same', 1e-3, *INCEPTION)
  # ... and build() passes it on to every layer.
  model = nnx.eval_shape(lambda: efficientnet.build('efficientnet_b0', 'torchvision', rngs=nnx.Rngs(0)))
  assert model.stem_conv.padding == [(1, 1), (1, 1)] and model.blocks[3].depthwise_conv.padding == 'symmetric'
  assert {m.epsilon for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)} == {1e-5}
  # Lite: only the lukemelas-style format, with its own (x*255 - 127) / 128 normalisation.
  x = jnp.array([[0.0, 127 / 255, 1.0], [0.25, 0.5, 0.75]])
  lite = efficientnet_formats.flavour('efficientnet_pytorch', 'lite0')
  assert (lite.padding, lite.bn_eps) == ('same', 1e-3)
  np.testing.assert_allclose(efficientnet.normalize(x, lite), (x * 255 - 127) / 128, atol=1e-6)
  with pytest.raises(ValueError, match='torchvision'):
    efficientnet.build('efficientnet_lite0', 'torchvision', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='torchvision'):
    list(efficientnet.torch_modules('efficientnet_lite0', 'torchvision'))
  assert efficientnet.packaged_weights('efficientnet_lite0') is not None


def test_convert_lists_missing_unexpected_and_misshaped_keys():
  state = dict(_reference('efficientnet_pytorch', 'efficientnet_b0')[1])
  del state['_blocks.3._se_expand.bias']
  state['_blocks.5._se_reduce.weight'] = state['_blocks.5._se_reduce.weight'][:, :7]
  state['_blocks.16._bn0.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    weights.convert(state, 'efficientnet_b0')
  msg = str(err.value)
  assert "missing keys ['_blocks.3._se_expand.bias']" in msg
  assert "unexpected keys ['_blocks.16._bn0.weight']" in msg
  assert '_blocks.5._se_reduce.weight (10, 7, 1, 1)' in msg


def test_format_detection_and_timm_ambiguity():
  ep_keys = set(_reference('efficientnet_pytorch', 'efficientnet_b0')[1])
  assert efficientnet.detect_format(ep_keys) == 'efficientnet_pytorch'
  tv_state = _reference('torchvision', 'efficientnet_b0')[1]
  assert efficientnet.detect_format(set(tv_state)) == 'torchvision'
  params = weights.convert(tv_state, 'efficientnet_b0')  # 'auto' -> torchvision
  np.testing.assert_array_equal(params['blocks'][1]['se_reduce']['kernel'][0, 0, 5, 2],
                                tv_state['features.2.0.block.2.fc1.weight'][2, 5, 0, 0])  # OIHW -> HWIO
  np.testing.assert_array_equal(params['blocks'][1]['depthwise_conv']['kernel'],
                                tv_state['features.2.0.block.1.0.weight'].transpose(2, 3, 1, 0))
  # timm and tf_ (timm_tf) checkpoints have the same keys but need different padding/epsilon.
  timm_state = _reference('timm', 'efficientnet_b0')[1]
  assert set(timm_state) == set(_reference('timm_tf', 'efficientnet_b0')[1])
  assert efficientnet.detect_format(set(timm_state)) is None
  for call in (weights.resolve_format, weights.convert):
    with pytest.raises(ValueError, match="weights_format.*'timm'.*'timm_tf'"):
      call(timm_state, 'efficientnet_b0')
  assert weights.resolve_format(timm_state, 'efficientnet_b0', 'timm_tf') == 'timm_tf'


def test_depthwise_conv_symmetric_padding_matches_grouped_convolution():
  """Symmetric padding ((k-1)//2 each side, PyTorch's) on odd and even sizes, strides 1 and 2."""
  @jax.jit
  def compare(x, w):
    out = {}
    for stride in (1, 2):
      conv = efficientnet.DepthwiseConv(6, w.shape[0], stride, 'symmetric', rngs=nnx.Rngs(0))
      conv.kernel[...] = w
      p = (w.shape[0] - 1) // 2
      out[stride] = conv(x), jax.lax.conv_general_dilated(
          x, w, (stride, stride), [(p, p), (p, p)], dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=6)
    return out
  for kernel in (3, 5):
    x = jax.random.normal(jax.random.key(1), (2, 8, 9, 6))
    w = jax.random.normal(jax.random.key(2), (kernel, kernel, 1, 6))
    for stride, (ours, ref) in compare(x, w).items():
      assert ours.shape == ref.shape, (kernel, stride)
      np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f'kernel {kernel}, stride {stride}')
