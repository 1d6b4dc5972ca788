"""experiments/anomaly_aware.py: every variant per seed on the same test images, mean ± std, resumable."""
import subprocess
import sys

from tests.conftest import REPO


def test_variants_over_seeds_share_test_images_and_resume(toy_root, tmp_path):
  workdir = tmp_path / 'aware'
  cmd = [sys.executable, 'experiments/anomaly_aware.py', f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "c"}',
         f'--workdir={workdir}', '--seeds=0,1', '--pretrain_epochs=1', '--finetune_epochs=1',
         '--num_labelled=1', '--synthetic=confetti']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  table = (workdir / 'anomaly_aware.md').read_text()
  for name in ('normal', 'synthetic', 'real_px', 'real_img'):
    # 2 seeds; 8 test images less the 1 labelled anomaly, for every variant (also those not using it)
    assert f'| {name} | 2 | ' in table and table.split(f'| {name} | 2 | ')[1].split('\n')[0].endswith('| 7 |')
    for seed in (0, 1):
      assert (workdir / f'seed{seed}' / name / 'metrics.json').is_file()
  assert (workdir / 'seed1' / 'pretrain' / 'toy' / 'checkpoints').is_dir()
  assert 'backbone.arch' in table and '97.5' in table   # the deviations and the paper's figures
  done = {p: p.stat().st_mtime_ns for p in workdir.glob('seed*/*/metrics.json')}
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in workdir.glob('seed*/*/metrics.json')} == done   # nothing retrained
  assert (workdir / 'anomaly_aware.md').read_text().split('\n')[2:] == table.split('\n')[2:]
