"""Test set-up: 8 fake CPU devices (set before JAX starts) and a shared weight cache."""
import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
  """../shared/data beside the repo, or $ADTR_SHARED_DATA."""
  return pathlib.Path(os.environ.get('ADTR_SHARED_DATA', REPO.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data():
  path = shared_data_dir()
  if not path.is_dir():
    pytest.skip(f'real data folder {path} is missing (set ADTR_SHARED_DATA)')
  return path
