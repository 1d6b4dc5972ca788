"""Training end to end on a toy category: sharding equivalence, learning, detection, kill-and-resume, CLI."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adtr_jax import checkpoint, evaluate, sharding, train
from adtr_jax.models.adtr import build_model
from tests.conftest import REPO, tiny_config


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def _one_step_twice(config, devices, batch):
  """Two train steps on a mesh over `devices`; returns (losses, params as numpy)."""
  mesh = sharding.make_mesh(devices)
  model, _ = build_model(config)
  tx, _ = train.make_optimizer(config.train, 1)
  graphdef, state, frozen = train.init_state(model, tx)
  state, frozen = sharding.put_replicated((state, frozen), mesh)
  step = train.jit_train_step(mesh, graphdef, tx)
  key = sharding.put_replicated(jax.random.key(3), mesh)
  losses = []
  for _ in range(2):
    state, m = step(state, frozen, sharding.put_batch(batch, mesh), key)
    losses.append(float(m['loss']))
  return losses, jax.tree.map(np.asarray, jax.device_get(state.params))


def test_sharded_step_matches_single_device(toy_root, cache_dir):
  """8-way data parallel == 1 device: same loss and parameters (float32; atol 1e-5 after 2 AdamW steps)."""
  assert jax.device_count() == 8
  config = tiny_config(toy_root, cache_dir)
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((8, 64, 64, 3), dtype=np.float32),
           'mask': np.zeros((8, 64, 64), np.float32), 'label': np.zeros(8, np.int32),
           'valid': np.array([True] * 7 + [False])}  # a padding row must not count on either mesh
  loss8, params8 = _one_step_twice(config, jax.devices(), batch)
  loss1, params1 = _one_step_twice(config, jax.devices()[:1], batch)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  assert loss8[1] < loss8[0]
  flat8, flat1 = jax.tree.leaves(params8), jax.tree.leaves(params1)
  assert len(flat8) == len(flat1) > 10
  for a, b in zip(flat8, flat1):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_padding_rows_do_not_change_the_loss():
  f = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
  g = jnp.zeros_like(f)
  batch = {'valid': jnp.array([True, True, False, False])}
  full = train.loss_fn(f[:2], g[:2], {'valid': jnp.array([True, True])})
  np.testing.assert_allclose(train.loss_fn(f, g, batch), full, rtol=1e-6)


@pytest.fixture(scope='module')
def trained(toy_root, cache_dir, tmp_path_factory):
  """The tiny model trained 40 epochs (80 steps) on the toy normals, then evaluated."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny_config(toy_root, cache_dir, num_epochs=40, checkpoint_every_epochs=20)
  report = train.train_and_evaluate(config, workdir)
  return config, workdir, report


def test_loss_decreases(trained):
  _, workdir, _ = trained
  records = [json.loads(line) for line in (workdir / 'toy' / 'train_log.jsonl').read_text().splitlines()]
  epochs = [r['epoch_mean_loss'] for r in records if 'epoch_mean_loss' in r]
  assert len(epochs) == 40
  assert np.mean(epochs[-3:]) < 0.75 * np.mean(epochs[:3])
  rates = [r['images_per_s'] for r in records if 'images_per_s' in r]
  assert rates and all(r > 0 for r in rates)


def test_injected_defects_score_above_normals(trained):
  """Dark squares pasted on the striped texture: never seen in training, they must stand out."""
  _, workdir, report = trained
  toy = report['eval']['categories']['toy']
  assert toy['image_auroc'] >= 0.9
  assert toy['pixel_auroc'] >= 0.9
  saved = json.loads((workdir / 'metrics.json').read_text())
  assert saved['mean']['image_auroc'] == pytest.approx(toy['image_auroc'])
  assert (workdir / 'metrics.md').is_file()
  pngs = list((workdir / 'toy' / 'heatmaps').glob('*.png'))
  assert len(pngs) == toy['num_heatmaps'] >= 3
  assert sorted(pathlib.Path(p).name for p in toy['curves']) == ['image_roc.png', 'pixel_pro.png']
  assert all(pathlib.Path(p).stat().st_size > 1000 for p in toy['curves'])


def test_predict_uses_the_threshold_calibrated_on_held_out_normals(trained, toy_root):
  config, workdir, _ = trained
  mgr = checkpoint.manager(workdir / 'toy' / 'checkpoints')
  calib = checkpoint.read_meta(mgr, mgr.latest_step())['calibration']
  assert calib['num_images'] == 2 and calib['target_fpr'] == config.calibration.target_fpr
  csv_path = evaluate.predict(config, workdir, toy_root / 'toy' / 'test' / 'square')
  rows = csv_path.read_text().splitlines()
  assert rows[0] == 'path,image_score,decision' and len(rows) == 1 + 4
  scores = [float(r.split(',')[1]) for r in rows[1:]]
  decisions = [r.split(',')[2] for r in rows[1:]]
  assert decisions == ['anomalous' if v > calib['threshold'] else 'normal' for v in scores]
  assert decisions.count('anomalous') >= 3
  assert len(list((csv_path.parent / 'heatmaps').glob('*.png'))) == 4


def test_checkpoint_excludes_frozen_backbone_and_records_its_hash(trained):
  config, workdir, _ = trained
  mgr = checkpoint.manager(workdir / 'toy' / 'checkpoints')
  meta = checkpoint.read_meta(mgr, mgr.latest_step())
  assert meta['backbone']['arch'] == config.backbone.arch
  assert len(meta['backbone']['weights_sha256']) == 64
  state_dir = pathlib.Path(mgr.directory) / str(mgr.latest_step()) / 'state'
  saved = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(saved)]
  assert any("['params']['reconstructor']" in p for p in paths)
  assert not any('backbone' in p or 'cnn' in p for p in paths)


def _cli(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.Popen([sys.executable, '-m', 'adtr_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _latest_step(ckpt_dir: pathlib.Path):
  steps = [int(p.name) for p in ckpt_dir.glob('[0-9]*') if p.is_dir() and p.name.isdigit()]
  return max(steps, default=None)


def test_killed_run_resumes_from_its_checkpoint(toy_root, cache_dir, tmp_path):
  """SIGKILL a CLI training run after its first checkpoint; the same command resumes and ends with the
  same parameters as an uninterrupted run (data order and dropout are functions of seed and step)."""
  workdir = tmp_path / 'run'
  args = [f'--config=tests/tiny_config.py:{toy_root}|{cache_dir}', f'--workdir={workdir}',
          '--mode=train', '--config.train.num_epochs=12', f'--config.dataset.root={toy_root}',
          '--config.dataset.category=toy', '--config.eval.checkpoint=latest']
  proc = _cli(args)
  ckpt = workdir / 'toy' / 'checkpoints'
  deadline = time.time() + 300
  while _latest_step(ckpt) is None and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _latest_step(ckpt)
  assert killed_at is not None and killed_at < 24, proc.stdout.read()[-3000:]

  resumed = _cli(args)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert 'resumed toy from step' in out
  log = [json.loads(line) for line in (workdir / 'toy' / 'train_log.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in log if 'loss' in r]
  assert steps.count(killed_at + 1) >= 1 and steps[-1] == 24

  straight = tmp_path / 'straight'
  config = tiny_config(toy_root, cache_dir, num_epochs=12)
  train.train(config, 'toy', straight / 'toy')
  mesh = sharding.make_mesh()
  _, p_resumed, _, _ = evaluate.restore_model(config, workdir / 'toy', mesh)
  _, p_straight, _, _ = evaluate.restore_model(config, straight / 'toy', mesh)
  # Two processes may round differently (XLA CPU splits reductions by thread count), and Adam amplifies
  # that over 24 steps to ~1e-5 on a few entries; a wrong resume (fresh optimizer moments, another data
  # order or dropout stream) moves parameters by about the learning rate, 1e-3, per step.
  for a, b in zip(jax.tree.leaves(p_resumed), jax.tree.leaves(p_straight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-5)

  ev = _cli([*args[:2], '--mode=eval', f'--config.dataset.root={toy_root}'])
  out, _ = ev.communicate(timeout=600)
  assert ev.returncode == 0, out[-3000:]
  report = json.loads((workdir / 'metrics.json').read_text())
  assert 0.0 <= report['categories']['toy']['image_auroc'] <= 1.0
  assert report['categories']['toy']['checkpoint_step'] == 24


def test_eval_without_checkpoint_is_a_clear_error(toy_root, cache_dir, tmp_path):
  config = tiny_config(toy_root, cache_dir)
  with pytest.raises(FileNotFoundError, match='train first'):
    evaluate.evaluate(config, tmp_path)


def test_batch_size_not_divisible_names_the_field(toy_root, cache_dir, tmp_path):
  config = tiny_config(toy_root, cache_dir, batch_size=6)
  with pytest.raises(ValueError, match='train.batch_size=6'):
    train.train(config, 'toy', tmp_path)
