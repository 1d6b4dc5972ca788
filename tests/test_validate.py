"""A bad config, or a mode without the checkpoint it reads, fails in about a second, before any data is
prepared: one line naming the field or folder, exit status 2, nothing written under the cache or the
workdir. The cases run through the CLI's main() in one process (tests/main_in_process.py: absl parses
the same flags); two of them run the command itself."""
import json
import os
import subprocess
import sys

import pytest

from adtr_jax import errors, validate
from tests.conftest import REPO, tiny_config

# (command-line overrides, what the one line must say)
BAD = [
    (['--config.model.hidden_dim=-3'], 'model.hidden_dim=-3 must be in [1, inf)'),
    (['--config.model.num_heads=5'], 'model.hidden_dim=32 must be divisible by model.num_heads=5'),
    (["--config.backbone.layers=('layer1','layer9')"], 'backbone.layers='),
    (['--config.backbone.arch=efficientnet_b9'], "unknown backbone.arch='efficientnet_b9'"),
    (['--config.dataset.image_size=60'], 'dataset.image_size=60 must be a multiple of backbone.out_stride=8'),
    (['--config.dataset.category=nope'], 'category folder'),
    (['--config.train.batch_size=6'], 'train.batch_size=6 must be divisible by the number of devices'),
    (['--config.train.learning_rate=0'], 'train.learning_rate=0.0 must be in (0, inf)'),
    (['--config.train.schedule=linear'], "train.schedule='linear' must be one of"),
    (['--config.calibration.target_fpr=1.5'], 'calibration.target_fpr=1.5 must be in (0, 1)'),
    (['--config.loss.type=pixel'], "loss.type='pixel' needs anomalies"),
    (['--config.anomalies.synthetic=confetti'], "loss.type='mse' would train to reconstruct them"),
    (['--mode=eval'], '--mode=eval needs a trained model, but there is no checkpoint in'),
    (['--config.init_from=/no/such/run'], "init_from='/no/such/run' needs a trained model"),
]


def _subprocess(args) -> tuple[int, str]:
  """`python -m adtr_jax.main <args>` on 4 fake CPU devices -> (exit status, stdout + stderr)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, '-m', 'adtr_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout + proc.stderr


TYPOS = [
    ('config.train.num_epoch = 3', 'unknown config field train.num_epoch'),
    # ConfigDict keeps a field's type, except that None replaces anything.
    ('config.train.schedule = None', 'train.schedule=None must be of type str'),
]


@pytest.fixture(scope='module')
def refused(toy_root, tmp_path_factory):
  """Every case of BAD and TYPOS through main() in one process (tests/main_in_process.py), each with its
  own cache and workdir -> [(folder, (exit status, stderr))], BAD's then TYPOS'."""
  folders, cases = [], []
  for overrides, _ in BAD:
    folders.append(tmp_path_factory.mktemp('bad'))
    cases.append([_tiny(toy_root, folders[-1]), *overrides, f'--workdir={folders[-1] / "w"}'])
  for line, _ in TYPOS:
    # A config file may add fields (ConfigDicts are open there): a misspelt one is an error, not ignored.
    folders.append(tmp_path_factory.mktemp('typo'))
    path = folders[-1] / 'my_config.py'
    path.write_text('from tests import tiny_config\n\n\ndef get_config():\n'
                    f'  config = tiny_config.make({str(toy_root)!r}, {str(folders[-1] / "cache")!r})\n'
                    f'  {line}\n  return config\n')
    cases.append([f'--config={path}', f'--workdir={folders[-1] / "w"}'])
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, '-m', 'tests.main_in_process'], input=json.dumps(cases), cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return list(zip(folders, json.loads(proc.stdout.splitlines()[-1])))


def _assert_refused_before_work(result, expected, folder):
  rc, out = result
  lines = out.strip().splitlines()
  assert rc == 2 and len(lines) == 1, out[-2000:]               # one line, no traceback
  assert lines[0].startswith('adtr_jax: error: ') and expected in lines[0], lines[0]
  assert not (folder / 'cache').exists() and not (folder / 'w').exists()   # nothing prepared or written


def _tiny(toy_root, folder) -> str:
  return f'--config=tests/tiny_config.py:{toy_root}|{folder / "cache"}'


@pytest.mark.parametrize('case', range(len(BAD)), ids=[b[1][:40] for b in BAD])
def test_bad_config_is_refused_before_any_work(refused, case):
  folder, result = refused[case]
  _assert_refused_before_work(result, BAD[case][1], folder)


@pytest.mark.parametrize('case', range(len(TYPOS)), ids=[t[1] for t in TYPOS])
def test_config_file_typos_are_refused(refused, case):
  folder, result = refused[len(BAD) + case]
  _assert_refused_before_work(result, TYPOS[case][1], folder)


@pytest.mark.parametrize('overrides,expected', [BAD[0], BAD[-2]], ids=['field', 'missing checkpoint'])
def test_the_command_exits_with_status_2_and_one_line(toy_root, tmp_path, overrides, expected):
  """The same through the real command (absl's app.run, the interpreter's exit status), for a config
  field and for a mode without its checkpoint."""
  result = _subprocess([_tiny(toy_root, tmp_path), *overrides, f'--workdir={tmp_path / "w"}'])
  _assert_refused_before_work(result, expected, tmp_path)


def test_good_configs_pass(toy_root, tmp_path):
  """The control: the base config of the cases above, and the shipped dataset configs, pass."""
  validate.check(tiny_config(toy_root, tmp_path / 'cache'))
  from configs import cifar10, elpv, magnetic_tile
  for module in (elpv, magnetic_tile, cifar10):
    validate.check(module.get_config())


def test_the_training_api_checks_the_config_before_any_work(toy_root, tmp_path):
  """train.train_and_evaluate and train.train_runs (what experiments call) refuse a bad config as the
  CLI does, before a dataset is prepared or a workdir made."""
  from adtr_jax import train
  config = tiny_config(toy_root, tmp_path / 'cache', feature_cache='gpu')
  with pytest.raises(errors.ConfigError, match="train.feature_cache='gpu' must be one of"):
    train.train_and_evaluate(config, tmp_path / 'w')
  config.train.feature_cache, config.anomalies.fraction = 'device', 1.0
  with pytest.raises(errors.ConfigError, match='anomalies.fraction=1.0 must be in'):
    train.train_runs([(tmp_path / 'r', config)])
  assert not (tmp_path / 'cache').exists() and not (tmp_path / 'w').exists()
  assert not (tmp_path / 'r').exists()
