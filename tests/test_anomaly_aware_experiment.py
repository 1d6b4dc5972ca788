"""experiments/anomaly_aware.py: every variant per seed on the same test images, mean ± std, resumable;
external anomalies, several categories and stage-1 runs reused from elsewhere."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adtr_jax.metrics import METRIC_KEYS
from tests.conftest import REPO

pytestmark = pytest.mark.slow   # each test runs the experiment's CLI end to end


def _run(args, toy_root, cache):
  cmd = [sys.executable, 'experiments/anomaly_aware.py', f'--config=tests/tiny_config.py:{toy_root}|{cache}', *args]
  return cmd, subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_variants_over_seeds_share_test_images_and_resume(toy_root, tmp_path):
  workdir = tmp_path / 'aware'
  cmd, out = _run([f'--workdir={workdir}', '--seeds=0,1', '--pretrain_epochs=1', '--finetune_epochs=1',
                   '--num_labelled=1', '--synthetic=confetti'], toy_root, tmp_path / 'c')
  assert out.returncode == 0, out.stderr[-3000:]
  table = (workdir / 'anomaly_aware.md').read_text()
  for name in ('normal', 'synthetic', 'real_px', 'real_img'):
    # 2 seeds; 8 test images less the 1 labelled anomaly, for every variant (also those not using it)
    row = f'| toy | {name} | 2 | '
    assert row in table and table.split(row)[1].split('\n')[0].endswith('| 7 |')
    for seed in (0, 1):
      assert (workdir / f'seed{seed}' / name / 'metrics.json').is_file()
  assert '| mean |' not in table   # one category: no mean rows
  assert (workdir / 'seed1' / 'pretrain' / 'toy' / 'checkpoints').is_dir()
  assert 'backbone.arch' in table and '97.5' in table   # the deviations and the paper's figures
  done = {p: p.stat().st_mtime_ns for p in workdir.glob('seed*/*/metrics.json')}
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in workdir.glob('seed*/*/metrics.json')} == done   # nothing retrained
  assert (workdir / 'anomaly_aware.md').read_text().split('\n')[2:] == table.split('\n')[2:]


def test_external_variant_on_two_categories_from_given_stage_one(toy_root, tmp_path):
  root = tmp_path / 'data'   # two categories: the toy one and a copy of it
  shutil.copytree(toy_root / 'toy', root / 'toy')
  shutil.copytree(toy_root / 'toy', root / 'toy2')
  external = tmp_path / 'external'   # irrelevant images: uniform noise
  external.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(external / f'{i}.png')
  common = ['--seeds=0', '--pretrain_epochs=1', '--finetune_epochs=1', '--num_labelled=0',
            '--config.dataset.category=toy,toy2']

  _, out = _run([f'--workdir={tmp_path / "bad"}', '--variants=normal,external', *common], root, tmp_path / 'c')
  assert out.returncode != 0 and '--external_dir' in out.stderr   # named, before any training
  assert not (tmp_path / 'bad').exists()

  first = tmp_path / 'first'   # trains its own stage 1
  _, out = _run([f'--workdir={first}', '--variants=normal', *common], root, tmp_path / 'c')
  assert out.returncode == 0, out.stderr[-3000:]
  second = tmp_path / 'second'   # starts from the first one's stage 1
  _, out = _run([f'--workdir={second}', '--variants=normal,external', f'--external_dir={external}',
                 f'--pretrained={first}/seed{{seed}}/pretrain', *common], root, tmp_path / 'c')
  assert out.returncode == 0, out.stderr[-3000:]
  assert not (second / 'seed0' / 'pretrain').exists()
  # the same stage 1, seed and budget give the same normal variant
  metrics = {w: json.loads((w / 'seed0' / 'normal' / 'metrics.json').read_text())['categories']
             for w in (first, second)}
  for category, m in metrics[first].items():
    assert {k: m[k] for k in METRIC_KEYS} == {k: metrics[second][category][k] for k in METRIC_KEYS}
  ext = json.loads((second / 'seed0' / 'external' / 'metrics.json').read_text())['categories']
  assert set(ext) == {'toy', 'toy2'} and all(0.0 <= m['image_auroc'] <= 1.0 for m in ext.values())
  table = (second / 'anomaly_aware.md').read_text()
  for category in ('toy', 'toy2', 'mean'):
    for name in ('normal', 'external'):
      assert f'| {category} | {name} | 1 | ' in table
  # the mean row: per seed over the two categories
  mean_row = table.split('| mean | external | 1 | ')[1].split(' |')[0]
  assert float(mean_row.split(' ± ')[0]) == round(50 * (ext['toy']['image_auroc'] + ext['toy2']['image_auroc']), 1)
  # the header names what the chosen variants use, and stage 1's budget as the given runs'
  assert f'external = {external}' in table and 'synthetic =' not in table and 'N = ' not in table
  assert "the --pretrained runs' own" in table and 'train.num_epochs' not in table

  _, out = _run([f'--workdir={tmp_path / "none"}', '--variants=normal', '--pretrained=/nonexistent/{seed}',
                 *common], root, tmp_path / 'c')
  assert out.returncode != 0 and '/nonexistent/0 has no run of toy, toy2' in out.stderr
