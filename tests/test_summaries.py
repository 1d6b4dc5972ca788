"""TensorBoard event files beside train_log.jsonl: the tags and steps TensorBoard shows, after a resume
too, and evaluation's metrics and images."""
import json

import jax
import numpy as np
import pytest
from sklearn import metrics as skm
from tensorboard.backend.event_processing import event_accumulator

from adtr_jax import inference, loop, sharding, summaries, train
from adtr_jax.data import datasets
from tests import helpers
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


@pytest.mark.slow
def test_training_and_evaluation_write_tensorboard_runs(toy_root, tmp_path, monkeypatch):
  """TensorBoard shows, at each logged step, the mean loss and gradient norm of the steps the training
  loop returned since the last one (recorded from the runner itself, not from the log) and the
  configured learning rate; its evaluation scalars are the AUROCs of the saved model's scores,
  recomputed here from the model applied directly to the test images."""
  returned = []   # (first step, steps, metrics [n, M]) of every runner call
  make_runner = loop.make_runner

  def recording(*args, **kwargs):
    runner = make_runner(*args, **kwargs)

    def run(state, frozen, keys, hyper, start, num_steps):
      state, metrics = runner(state, frozen, keys, hyper, start, num_steps)
      returned.append((start, num_steps, jax.device_get(metrics)))
      return state, metrics
    return run

  monkeypatch.setattr(loop, 'make_runner', recording)
  config = tiny_config(toy_root, tmp_path / 'cache', num_epochs=3, log_every_steps=2)
  train.train_and_evaluate(config, tmp_path / 'w')
  run = tmp_path / 'w' / 'toy'
  scalars, images = read_events(run)
  assert [(start, n) for start, n, _ in returned] == [(0, 2), (2, 2), (4, 2)]   # 16 images, batch 8
  for name in ('loss', 'grad_norm'):
    want = [(start + n, np.float32(np.mean(m[name][:, 0]))) for start, n, m in returned]
    assert [s for s, _ in scalars[f'train/{name}']] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in scalars[f'train/{name}']], [v for _, v in want], rtol=1e-6)
  assert [v for _, v in scalars['train/lr']] == [np.float32(config.train.learning_rate)] * 3
  assert all(v > 0 for _, v in scalars['train/images_per_s'])

  data = datasets.load_category(config, 'toy')
  step, _, restored = helpers.params(config, run, sharding.make_mesh(jax.devices()[:1]))
  graphdef, params, frozen = restored.model.graphdef, restored.model.params, restored.model.frozen
  maps, scores = inference.score_fn(params, frozen, np.asarray(data.test.arrays['images']),
                                    graphdef=graphdef, scoring_cfg=config.scoring, image_size=64)
  labels, masks = np.asarray(data.test.arrays['labels']), np.asarray(data.test.arrays['masks']) > 0
  assert step == 6 and 0 < labels.sum() < len(labels)
  [(step, image_auroc)] = scalars['eval/image_auroc']
  [(_, pixel_auroc)] = scalars['eval/pixel_auroc']
  assert step == 6
  assert image_auroc == pytest.approx(skm.roc_auc_score(labels, np.asarray(scores)), abs=1e-6)
  # Pixel ranks of maps scored in batches of 8 on 8 devices vs one call may differ by float32 rounding.
  assert pixel_auroc == pytest.approx(skm.roc_auc_score(masks.ravel(), np.asarray(maps).ravel()), abs=1e-4)
  assert 'eval/pixel_aupro' in scalars
  assert images['eval/image_roc'] == images['eval/pixel_pro'] == [6]
  metrics = json.loads((tmp_path / 'w' / 'metrics.json').read_text())['categories']['toy']
  assert len([t for t in images if t.startswith('eval/heatmaps/')]) == min(4, metrics['num_heatmaps'])
