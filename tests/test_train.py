"""Training end to end on a toy category: sharding equivalence, learning, detection, kill-and-resume, CLI."""
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adtr_jax import checkpoint, evaluate, members, sharding, step, train, train_state
from adtr_jax import trained as trained_lib
from adtr_jax.models.adtr import build_model
from tests import helpers
from tests.conftest import tiny_config
from tests.test_summaries import read_events


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


def _one_step_twice(config, devices, batch):
  """Two train steps on a mesh over `devices`; returns (losses, params as numpy)."""
  mesh = sharding.make_mesh(devices)
  model, _ = build_model(config)
  hyper = train_state.hyperparameters(config.train, 1, 2)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  state, frozen, hyper = sharding.put_replicated((state, frozen, hyper), mesh)
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  fn = jax.jit(functools.partial(step.train_step, graphdef=graphdef, loss=step.make_loss(config.loss),
                                 schedule='step'),
               in_shardings=(rep, rep, dat, rep, rep), out_shardings=(rep, rep))
  key = sharding.put_replicated(jax.random.key(3), mesh)
  losses = []
  for _ in range(2):
    state, m = fn(state, frozen, sharding.put_batch(batch, mesh), key, hyper)
    losses.append(float(m['loss']))
  return losses, jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.mark.slow
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
  loss = step.make_loss(ml_collections.ConfigDict({'type': 'mse'}))
  full = loss(f[:2], g[:2], {'valid': jnp.array([True, True])})
  np.testing.assert_allclose(loss(f, g, batch), full, rtol=1e-6)


@pytest.fixture(scope='module')
def trained(toy_root, cache_dir, tmp_path_factory):
  """The tiny model trained 40 epochs (80 steps) on the toy normals, then evaluated."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny_config(toy_root, cache_dir, num_epochs=40, checkpoint_every_steps=40)
  report = train.train_and_evaluate(config, workdir)
  return config, workdir, report


@pytest.mark.slow
def test_loss_decreases(trained):
  _, workdir, _ = trained
  records = [json.loads(line) for line in (workdir / 'toy' / 'train_log.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in records]
  assert [r['step'] for r in records] == list(range(1, 81))   # log_every_steps=1: one per step
  assert np.mean(losses[-6:]) < 0.75 * np.mean(losses[:6])
  assert sorted(int(p.name) for p in (workdir / 'toy' / 'checkpoints').glob('[0-9]*')) == [40, 80]
  rates = [r['images_per_s'] for r in records if 'images_per_s' in r]
  assert rates and all(r > 0 for r in rates)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_calibration_without_map_scale_gets_it_from_the_held_out_images(trained, monkeypatch):
  """A model calibrated before overlays had a fixed colour scale: predict and export compute it on
  the held-out images, equal to the one calibration saved (same images, same model); the threshold
  stays the saved one."""
  config, workdir, _ = trained
  mesh = sharding.make_mesh()
  saved = trained_lib.for_scoring(config, workdir, mesh, 'predict').meta['calibration']
  vmin, vmax = saved['map_scale']
  assert vmin < vmax
  restore = trained_lib.restore

  def old_calibration(*args, **kw):
    restored = restore(*args, **kw)
    del restored.meta['calibration']['map_scale']
    return restored

  monkeypatch.setattr(trained_lib, 'restore', old_calibration)
  again = trained_lib.for_scoring(config, workdir, mesh, 'predict').meta['calibration']
  assert again == saved


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(toy_root, cache_dir, tmp_path):
  """A run restarted from its step-3 checkpoint (mid-epoch: 2 steps per epoch) ends bit-identical to
  the uninterrupted run (same process, same devices: the same arithmetic). Negative controls: the
  same restart with the optimizer state reset, or with another data order, ends elsewhere."""
  config = tiny_config(toy_root, cache_dir, num_epochs=6, checkpoint_every_steps=3, max_checkpoints=10)
  straight = tmp_path / 'straight' / 'toy'
  train.train_and_evaluate(config, straight.parent, evaluate_after=False)
  assert helpers.steps(straight) == [3, 6, 9, 12]
  end, p_straight, _ = helpers.params(config, straight)
  assert end == 12

  def restart(name, edit=None, **changes):
    workdir = tmp_path / name / 'toy'
    shutil.copytree(straight / 'checkpoints' / '3', workdir / 'checkpoints' / '3')
    if edit:
      edit(workdir)
    cfg = config.copy_and_resolve_references()
    cfg.update(**changes)
    train.train_and_evaluate(cfg, workdir.parent, evaluate_after=False)
    log = [json.loads(line) for line in (workdir / 'train_log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in log] == list(range(4, 13))    # resumed at step 3, not from scratch
    return helpers.params(config, workdir)[1]

  assert helpers.max_diff(restart('resumed'), p_straight) == 0.0

  def reset_optimizer(workdir):
    mgr = checkpoint.manager(workdir / 'checkpoints')
    model, _ = build_model(config)
    _, fresh, _ = train_state.init_state(model, config.train)
    saved, meta = checkpoint.restore(mgr, 3, fresh)
    mgr.close()
    shutil.rmtree(workdir / 'checkpoints' / '3')
    mgr = checkpoint.manager(workdir / 'checkpoints')
    checkpoint.save(mgr, 3, saved.replace(opt_state=fresh.opt_state), meta, 0.0)
    mgr.wait_until_finished()
    mgr.close()

  # A wrong resume moves parameters by about the learning rate (1e-3) per step.
  assert helpers.max_diff(restart('fresh_optimizer', reset_optimizer), p_straight) > 1e-3
  # Another data order and dropout after the checkpoint (the member's key of another seed; the config,
  # which may not change on resume, stays the same).
  keys = members.member_keys

  def next_seed_keys(configs):
    shifted = [c.copy_and_resolve_references() for c in configs]
    for c in shifted:
      c.seed += 1
    return keys(shifted)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(members, 'member_keys', next_seed_keys)
    assert helpers.max_diff(restart('other_order'), p_straight) > 1e-3


@pytest.mark.slow
def test_killed_cli_run_resumes_from_its_checkpoint(toy_root, cache_dir, tmp_path):
  """SIGKILL a CLI training run (images, checkpoint every 3 steps) after its first checkpoint; the
  same command says which step it resumed from (the last checkpoint), logs from the step after it, and
  ends with the parameters of an uninterrupted CLI run."""
  common = [f'--config=tests/tiny_config.py:{toy_root}|{cache_dir}', '--mode=train',
            '--config.train.num_epochs=12', '--config.train.feature_cache=off',
            '--config.train.checkpoint_every_steps=3']
  workdir = tmp_path / 'run'
  args = [*common, f'--workdir={workdir}']
  killed_at = helpers.kill_after_first_checkpoint(args, workdir / 'toy', 24)
  shutil.copytree(workdir, tmp_path / 'wrong')   # the killed run, for the control below
  shutil.copytree(workdir / 'toy', tmp_path / 'killed_copy')

  resumed = helpers.cli(args)
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert f'resumed toy from step {killed_at}' in out
  # The steps logged after the checkpoint and before the kill were trained again: each step is in the
  # JSONL and in TensorBoard once, with the resumed run's value.
  log = [json.loads(line) for line in (workdir / 'toy' / 'train_log.jsonl').read_text().splitlines()]
  assert [r['step'] for r in log] == list(range(1, 25))
  scalars, _ = read_events(workdir / 'toy')
  assert scalars['train/loss'] == [(r['step'], np.float32(r['loss'])) for r in log]

  straight = helpers.cli([*common, f'--workdir={tmp_path / "straight"}'])
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]
  config = tiny_config(toy_root, cache_dir)
  end_r, p_resumed, _ = helpers.params(config, workdir / 'toy')
  end_s, p_straight, _ = helpers.params(config, tmp_path / 'straight' / 'toy')
  assert end_r == end_s == 24
  # Separate processes with the same flags and device count compute the same arithmetic: the
  # measured difference is 0; 1e-6 leaves room for thread scheduling in XLA's CPU reductions, far
  # below the 1e-3 a wrong resume causes (test_resume_mid_epoch_is_exact's controls).
  assert helpers.max_diff(p_resumed, p_straight) <= 1e-6
  # The same killed run resumed with another seed is refused (the resume contract: one line, exit 2,
  # nothing trained); the control for the comparison is that seed's uninterrupted run, which ends
  # far away (measured 2.1e-2 for the resumed one before the contract).
  wrong = helpers.cli([*common, f'--workdir={tmp_path / "wrong"}', '--config.seed=1'])
  out, _ = wrong.communicate(timeout=600)
  assert wrong.returncode == 2 and 'seed 0 -> 1' in out and 'Traceback' not in out, out[-3000:]
  assert helpers.steps(tmp_path / 'wrong' / 'toy') == helpers.steps(tmp_path / 'killed_copy')
  other = helpers.cli([*common, f'--workdir={tmp_path / "other_seed"}', '--config.seed=1'])
  out, _ = other.communicate(timeout=600)
  assert other.returncode == 0, out[-3000:]
  _, p_other, _ = helpers.params(config, tmp_path / 'other_seed' / 'toy')
  assert helpers.max_diff(p_other, p_straight) > 1e-3, helpers.max_diff(p_other, p_straight)

  ev = helpers.cli([args[0], args[-1], '--mode=eval'])
  out, _ = ev.communicate(timeout=600)
  assert ev.returncode == 0, out[-3000:]
  toy = json.loads((workdir / 'metrics.json').read_text())['categories']['toy']
  # Dark 16 px squares (grey 20) on a bright striped texture (grey 64-191): the resumed model ranks
  # every defective image above every normal one and nearly every defect pixel above the normal
  # ones (measured 1.0 and 0.999 after 4 steps already), as test_injected_defects_score_above_normals.
  assert toy['image_auroc'] >= 0.9 and toy['pixel_auroc'] >= 0.9, toy
  assert toy['checkpoint_step'] == 24


def test_eval_without_checkpoint_is_a_clear_error(toy_root, cache_dir, tmp_path):
  config = tiny_config(toy_root, cache_dir)
  with pytest.raises(FileNotFoundError, match='train first'):
    evaluate.evaluate(config, tmp_path)


def test_batch_size_not_divisible_names_the_field(toy_root, cache_dir, tmp_path):
  config = tiny_config(toy_root, cache_dir, batch_size=6)
  with pytest.raises(ValueError, match='train.batch_size=6'):
    train.train_and_evaluate(config, tmp_path, evaluate_after=False)
