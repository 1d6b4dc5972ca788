"""Reference PyTorch models for the backbone parity tests (torch, torchvision, timm, efficientnet_pytorch).

They are optional test dependencies (`requirements-parity.txt`, installed by `.ci/run`); tests that need
them call `require()` and skip, saying what to install, when they are missing.

The CPU build of torch here has no torchvision C++ ops, and torchvision's import registers fake kernels
for them (nms, roi_align, ...), which fails. The model definitions we compare against are pure Python,
so those registrations are skipped during the import.
"""
import importlib

import pytest

INSTALL = 'pip install -r requirements-parity.txt && pip install --no-deps -r requirements-parity-nodeps.txt'


def require(*modules: str):
  """Imports the named modules (torchvision via the shim below) or skips the test."""
  try:
    import torch  # noqa: F401
  except ModuleNotFoundError:
    pytest.skip(f'parity test needs torch: {INSTALL}')
  out = []
  for name in modules:
    try:
      out.append(_import_torchvision() if name == 'torchvision' else importlib.import_module(name))
    except ModuleNotFoundError as e:
      pytest.skip(f'parity test needs {e.name}: {INSTALL}')
  return out[0] if len(out) == 1 else out


def _import_torchvision():
  import sys

  import torch.library
  if 'torchvision' in sys.modules:
    return sys.modules['torchvision']
  original = torch.library.register_fake

  def register_fake(name, *args, **kwargs):
    if isinstance(name, str) and name.startswith('torchvision::'):
      return lambda fn: fn
    return original(name, *args, **kwargs)
  torch.library.register_fake = register_fake
  try:
    import torchvision
  finally:
    torch.library.register_fake = original
  return torchvision


def randomize_batchnorm(model, seed: int = 0) -> None:
  """Random BN statistics and affine parameters, so parity also checks how BN is folded in."""
  import torch
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
      n = m.num_features
      m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
      m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
      m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def assert_outputs_match(ours: dict, ref: dict, label: str, record_property, rtol: float = 1e-5,
                         atol: float = 1e-5) -> dict:
  """Per output (layer1..layer5, logits): max|ours - ref| <= rtol * max|ref| + atol; prints and records
  the measured differences. Returns {name: (max abs diff, max |ref|)}."""
  import numpy as np

  from adtr_jax.models import backbone
  diffs = {}
  for name in (*backbone.LAYERS, 'logits'):  # every output must be there, on both sides
    assert ours[name].shape == ref[name].shape, (name, ours[name].shape, ref[name].shape)
    diff, scale = float(np.max(np.abs(ours[name] - ref[name]))), float(np.max(np.abs(ref[name])))
    diffs[name] = (diff, scale)
    assert diff <= rtol * scale + atol, f'{label} {name}: max abs diff {diff:.3g}, max |ref| {scale:.3g}'
  print(f'\n{label} max abs diff (max |ref|): '
        + ', '.join(f'{k} {d:.2e} ({s:.1f})' for k, (d, s) in diffs.items()))
  record_property('max_abs_diff', {k: d for k, (d, _) in diffs.items()})
  return diffs


def state_dict_numpy(model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
