"""The package builds as a wheel, installs, and its `adtr-jax` command finds the shipped configs."""
import os
import pathlib
import subprocess
import sys

from adtr_jax import config_files
from tests.conftest import REPO


def test_config_names_resolve_to_shipped_files(tmp_path):
  shipped = config_files.shipped_dir()
  assert config_files.resolve('elpv') == str(shipped / 'elpv.py')
  assert config_files.resolve('mvtec.py:arg') == f'{shipped / "mvtec.py"}:arg'
  own = tmp_path / 'elpv'          # an existing path wins over a shipped name
  own.write_text('')
  assert config_files.resolve(str(own)) == str(own)
  assert config_files.resolve('no_such_config') == 'no_such_config'   # left for config_flags to report
  assert config_files.resolve_argv(['prog', '--config=default', '--workdir=w']) == [
      'prog', f'--config={shipped / "default.py"}', '--workdir=w']


def test_wheel_installs_with_console_script_and_configs(tmp_path):
  wheels, target = tmp_path / 'wheels', tmp_path / 'site'
  pip = [sys.executable, '-m', 'pip', '-q', '--disable-pip-version-check']
  subprocess.run([*pip, 'wheel', '--no-deps', str(REPO), '-w', str(wheels)], check=True)
  [wheel] = wheels.glob('adtr_jax-*.whl')
  subprocess.run([*pip, 'install', '--no-deps', '--target', str(target), str(wheel)], check=True)
  # Run outside the repo, so only the installed copy can be imported.
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS='cpu', XLA_FLAGS='')
  run = lambda *a: subprocess.run(a, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  where = run(sys.executable, '-c', 'import adtr_jax.configs as c, adtr_jax.config_files as f; '
              'print(c.__file__); print(f.shipped_dir())')
  assert where.returncode == 0, where.stderr
  assert all(pathlib.Path(line).is_relative_to(target) for line in where.stdout.split())
  script = target / 'bin' / 'adtr-jax'
  helped = run(str(script), '--help')
  # (absl's --help exits with status 1)
  assert all(f in helped.stdout for f in ('--config:', '--workdir:', '--mode:', '--[no]traceback:')), helped
  missing = tmp_path / 'no_data'
  failed = run(str(script), '--config=magnetic_tile', f'--workdir={tmp_path / "w"}',
               f'--config.dataset.root={missing}')
  assert failed.returncode == 2
  assert failed.stderr.strip().splitlines()[-1] == (
      f"adtr_jax: error: dataset root {missing} does not exist (category 'magnetic_tile')")
