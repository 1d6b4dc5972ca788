"""experiments/sweep.py: runs that differ in numbers train stacked, shapes split the groups, one table."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_sweep_stacks_runs_by_shape_and_tabulates_seeds(toy_root, tmp_path):
  workdir = tmp_path / 'sweep'
  cmd = [sys.executable, 'experiments/sweep.py', f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "c"}',
         f'--workdir={workdir}', '--sweep=model.hidden_dim=32,16;train.learning_rate=1e-3,3e-4',
         '--seeds=0,1', '--noreference', '--set=calibration.holdout_fraction=0,train.num_epochs=3']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  groups = sorted(p.name for p in (workdir / '_stacked').iterdir())
  assert len(groups) == 2                                  # hidden 32 and hidden 16: two shapes
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
    assert f'| {name} | 2 | ' in table
  # Resumable: a second invocation finds every metrics.json and trains nothing.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and 'stacked models in' not in again.stdout
  assert (workdir / 'sweep.md').read_text() == table
