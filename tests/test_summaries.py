"""TensorBoard event files beside train_log.jsonl: the tags and steps TensorBoard shows, after a resume
too, and evaluation's metrics and images."""
import json

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from adtr_jax import summaries, train
from tests.conftest import tiny_config


def read_events(logdir):
  """What TensorBoard shows for one run folder: {tag: [(step, value)]} and the image tags."""
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={'scalars': 0, 'images': 0})
  acc.Reload()
  tags = acc.Tags()
  scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags['scalars']}
  return scalars, {t: [e.step for e in acc.Images(t)] for t in tags['images']}


def test_resumed_log_replaces_the_steps_after_its_checkpoint(tmp_path):
  log = summaries.ModelLog(tmp_path)
  for step in range(1, 6):
    log.write(step, loss=float(step), lr=0.1, stacked=True)
  log.close()
  # Killed after step 5 with its last checkpoint at step 3: steps 4 and 5 are trained again.
  log = summaries.ModelLog(tmp_path, start_step=3)
  for step in range(4, 7):
    log.write(step, loss=10.0 * step, lr=0.1)
  log.close()
  records = [json.loads(line) for line in (tmp_path / summaries.JSONL).read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r['loss'] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
  scalars, _ = read_events(tmp_path)
  assert sorted(scalars) == ['train/loss', 'train/lr']         # booleans are not scalars
  assert scalars['train/loss'] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_training_and_evaluation_write_tensorboard_runs(toy_root, tmp_path):
  config = tiny_config(toy_root, tmp_path / 'cache', num_epochs=3, log_every_steps=2)
  train.train_and_evaluate(config, tmp_path / 'w')
  run = tmp_path / 'w' / 'toy'
  records = [json.loads(line) for line in (run / summaries.JSONL).read_text().splitlines()]
  scalars, images = read_events(run)
  for name in ('loss', 'grad_norm', 'lr', 'images_per_s'):
    assert [s for s, _ in scalars[f'train/{name}']] == [r['step'] for r in records]
    np.testing.assert_allclose([v for _, v in scalars[f'train/{name}']], [r[name] for r in records],
                               rtol=1e-6)
  metrics = json.loads((tmp_path / 'w' / 'metrics.json').read_text())['categories']['toy']
  last = records[-1]['step']
  for name in ('image_auroc', 'pixel_auroc', 'pixel_aupro'):
    assert scalars[f'eval/{name}'] == [(last, np.float32(metrics[name]))]
  assert images['eval/image_roc'] == images['eval/pixel_pro'] == [last]
  assert len([t for t in images if t.startswith('eval/heatmaps/')]) == min(
      4, metrics['num_heatmaps'])
