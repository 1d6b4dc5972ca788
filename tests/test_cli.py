"""The command line reports bad input as one line with exit status 2 (--traceback: the traceback)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run([sys.executable, '-m', 'adtr_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


def _config(root, cache):
  return f'--config=tests/tiny_config.py:{root}|{cache}'


@pytest.mark.parametrize('extra', [[], ['--traceback']])
def test_missing_root_is_one_line_unless_traceback(tmp_path, extra):
  missing = tmp_path / 'no_such_root'
  rc, out = _run(_config(missing, tmp_path / 'cache'), f'--workdir={tmp_path / "w"}', *extra)
  if extra:
    assert rc == 1 and 'Traceback' in out and 'DataError' in out
  else:
    assert rc == 2 and 'Traceback' not in out
    assert out.strip().splitlines()[-1] == (
        f"adtr_jax: error: dataset root {missing} does not exist (category 'toy')")


def test_undecodable_image_names_the_file(toy_root, tmp_path):
  root = tmp_path / 'data'
  shutil.copytree(toy_root, root)
  (root / 'toy' / 'train' / 'good' / '003.png').write_bytes(b'not a png at all')
  rc, out = _run(_config(root, tmp_path / 'cache'), f'--workdir={tmp_path / "w"}')
  last = out.strip().splitlines()[-1]
  assert rc == 2 and 'Traceback' not in out
  assert last.startswith('adtr_jax: error: ') and 'train/good/003.png' in last


def test_bad_config_value_names_the_field(toy_root, tmp_path):
  rc, out = _run(_config(toy_root, tmp_path / 'cache'), f'--workdir={tmp_path / "w"}',
                 '--config.train.schedule=linear')
  assert rc == 2 and 'Traceback' not in out
  assert out.strip().splitlines()[-1].startswith("adtr_jax: error: train.schedule='linear' must be one of")


ABSL_INFO = re.compile(r'^I\d{4} ')    # absl's INFO prefix: I<month><day> <time> <thread> <file:line>]


@pytest.mark.slow
def test_main_job_console_holds_no_library_log_lines(toy_root, tmp_path):
  """The README's main job (train_and_eval) prints progress bars, one-line events and the results; no
  INFO line and no orbax line. Those go to <workdir>/log.txt; --verbosity=0 shows them again."""
  work = tmp_path / 'w'
  config = _config(toy_root, tmp_path / 'cache')
  rc, out = _run(config, f'--workdir={work}', '--config.train.num_epochs=1')
  assert rc == 0, out[-3000:]
  lines = [line for line in re.split(r'[\r\n]', out) if line.strip()]     # tqdm redraws with \r
  noise = [line for line in lines if ABSL_INFO.match(line) or 'orbax' in line]
  assert not noise, noise[:5]
  assert "adtr_jax: training 1 model(s) ['toy']" in out
  assert f"adtr_jax: toy saved at step 2 in {work / 'toy' / 'checkpoints'}" in out
  assert '| toy |' in out and f'metrics: {work / "metrics.json"}' in out
  log = (work / 'log.txt').read_text()
  assert re.search(r'^I\d{4} .*checkpoint_manager\.py.*Saving checkpoint at step 2', log, re.M), log[-2000:]
  assert re.search(r'^I\d{4} .*JAX devices', log, re.M)
  # Control: the same workdir evaluated with --verbosity=0 shows the libraries' INFO lines.
  rc, out = _run(config, f'--workdir={work}', '--mode=eval', '--verbosity=0')
  assert rc == 0 and any(ABSL_INFO.match(line) and 'orbax' in line for line in out.splitlines()), out[-3000:]
