"""experiments/sweep.py: runs that differ in numbers train stacked, shapes split the groups, one table."""
import json
import shutil
import subprocess
import sys

import pytest

from adtr_jax import errors
from adtr_jax.data import datasets

from tests.conftest import REPO

pytestmark = pytest.mark.slow   # each test runs a sweep end to end


def test_sweep_stacks_runs_by_shape_and_tabulates_seeds(toy_root, tmp_path):
  workdir = tmp_path / 'sweep'
  cmd = [sys.executable, 'experiments/sweep.py', f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "c"}',
         f'--workdir={workdir}', '--sweep=model.hidden_dim=32,16;train.learning_rate=1e-3,3e-4',
         '--seeds=0,1', '--noreference', '--set=calibration.holdout_fraction=0,train.num_epochs=3']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count('training 4 stacked models') == 2   # hidden 32 and hidden 16: two shapes
  names = ['model.hidden_dim=32,train.learning_rate=0.001', 'model.hidden_dim=32,train.learning_rate=0.0003',
           'model.hidden_dim=16,train.learning_rate=0.001', 'model.hidden_dim=16,train.learning_rate=0.0003']
  for name in names:
    for seed in (0, 1):
      report = json.loads((workdir / name / f'seed{seed}' / 'metrics.json').read_text())
      assert report['stacked_models'] == 4                 # 2 learning rates x 2 seeds per group
      assert report['categories']['toy']['checkpoint_step'] == 6
      assert (workdir / name / f'seed{seed}' / 'toy' / 'checkpoints' / '6').is_dir()
  table = (workdir / 'sweep.md').read_text()
  for name in names:
    assert f'| {name} | toy | 2 | ' in table
  # Resumable: a second invocation finds every metrics.json and trains nothing.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and 'stacked models' not in again.stdout
  assert (workdir / 'sweep.md').read_text() == table


def test_unified_against_separate_on_a_mixed_root(toy_root, tmp_path):
  """experiments/unified.py's pieces: a root joining a masked and an image-labelled category, swept over
  dataset.unified with the reference; a row per category and a mean per run, equal total steps."""
  from experiments import sweep, unified
  from tests import tiny_config
  plain = tmp_path / 'plain'
  shutil.copytree(toy_root / 'toy', plain, ignore=shutil.ignore_patterns('ground_truth'))
  root = unified.joint_root(tmp_path / 'root', {'toy': toy_root / 'toy', 'plain': plain})
  assert unified.joint_root(root, {'toy': toy_root / 'toy', 'plain': plain}) == root  # idempotent
  config = tiny_config.make(root, tmp_path / 'cache')
  config.dataset.category = 'toy,plain'
  with pytest.raises(errors.DataError, match='require_masks=False'):
    datasets.load_category(config, 'plain')
  config.dataset.require_masks = False
  workdir = tmp_path / 'sweep'
  table = sweep.run_sweep(config, workdir, sweep.grid('dataset.unified=False,True'),
                          {'calibration.holdout_fraction': 0}, [0])
  for run in ('nearest_neighbour', 'dataset.unified=False', 'dataset.unified=True'):
    for cat in ('toy', 'plain', 'mean'):
      assert f'| {run} | {cat} | 1 | ' in table
  separate = json.loads((workdir / 'dataset.unified=False/seed0/metrics.json').read_text())
  joint = json.loads((workdir / 'dataset.unified=True/seed0/metrics.json').read_text())
  assert 'pixel_auroc' in joint['categories']['toy'] and 'pixel_auroc' not in joint['categories']['plain']
  rows = {line.split('|')[1].strip(): line for line in (workdir / 'dataset.unified=True/seed0/metrics.md')
          .read_text().splitlines()[2:]}
  assert ' - |' not in rows['toy'] and ' - |' in rows['plain']   # its pixel columns only, shown as '-'
  one = workdir / 'dataset.unified=True/seed0'   # one model; the categories' folders hold heatmaps only
  assert (one / 'unified/checkpoints').is_dir()
  assert not any((one / c / 'checkpoints').exists() for c in ('toy', 'plain'))
  steps = [separate['categories'][c]['checkpoint_step'] for c in ('toy', 'plain')]
  # steps/epoch = floor(images / batch): the union's is the sum of the parts', or up to 1 more
  assert sum(steps) <= joint['categories']['toy']['checkpoint_step'] <= sum(steps) + config.train.num_epochs
