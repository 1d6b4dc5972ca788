"""Runs that cannot honour what they are asked refuse it, and runs that fail mid-way leave something
to resume from (issue 35): the resume contract, the best checkpoint's threshold, a diverging member,
a kill between two members' saves, one mesh rule, TensorBoard after a restart, config.json."""
import json

import pytest

from adtr_jax import checkpoint, errors, evaluate, export, paths, summaries, train, trained
from adtr_jax import validate
from tests import helpers
from tests.conftest import make_toy_mvtec, make_two_toys, tiny_config
from tests.test_summaries import read_events


@pytest.fixture(scope='module')
def two_categories(tmp_path_factory):
  return make_two_toys(tmp_path_factory.mktemp('resume'))


@pytest.mark.slow
def test_a_resume_refuses_every_changed_field_that_may_not_change(toy_root, tmp_path):
  """Item 1: trained with one config, resumed with a longer budget, another learning rate and 4
  heads: one error names the three fields with their old and new values before any data is prepared
  (a new cache folder stays absent); fields that may change (checkpoint cadence, eval.*, the cache
  folder) resume. Training longer goes through --config.init_from in a new workdir."""
  config = tiny_config(toy_root, tmp_path / 'cache', num_epochs=1)
  train.train_and_evaluate(config, tmp_path / 'w', evaluate_after=False)
  steps = helpers.steps(tmp_path / 'w' / 'toy')
  changed = config.copy_and_resolve_references()
  changed.train.num_epochs, changed.train.learning_rate, changed.model.num_heads = 2, 0.01, 2
  changed.dataset.cache_dir = str(tmp_path / 'new_cache')
  with pytest.raises(errors.ConfigError) as e:
    train.train_and_evaluate(changed, tmp_path / 'w', evaluate_after=False)
  message = str(e.value)
  for field in ('train.num_epochs 1 -> 2', 'train.learning_rate 0.001 -> 0.01', 'model.num_heads 4 -> 2'):
    assert field in message
  assert 'cache_dir' not in message and '--config.init_from=' in message and '\n' not in message
  assert not (tmp_path / 'new_cache').exists() and helpers.steps(tmp_path / 'w' / 'toy') == steps
  allowed = config.copy_and_resolve_references()
  allowed.train.checkpoint_every_steps, allowed.eval.checkpoint, allowed.eval.batch_size = 1, 'best', 16
  allowed.dataset.cache_dir = str(tmp_path / 'new_cache')
  validate.check(allowed, 'train', tmp_path / 'w')   # no error
  # Longer: a new workdir that starts from the trained weights.
  longer = changed.copy_and_resolve_references()
  longer.model.num_heads, longer.train.learning_rate = 4, 1e-3
  longer.init_from = str(tmp_path / 'w')
  done = train.train_and_evaluate(longer, tmp_path / 'longer', evaluate_after=False)
  assert done['train'][0]['steps'] == 2 * steps[-1]


def test_changed_on_resume_counts_missing_fields_at_their_default():
  """A checkpoint written before a field existed compares at the field's default."""
  config = tiny_config('/r', '/c')
  saved = json.loads(config.to_json_best_effort())
  del saved['model']['neighbour_mask']
  assert validate.changed_on_resume(saved, config) == []
  config.model.neighbour_mask = 3
  assert validate.changed_on_resume(saved, config) == ['model.neighbour_mask 0 -> 3']


def _best_not_last(toy_root, cache):
  """A run whose best checkpoint is not its last: the learning rate x500 for its last epoch (the
  'step' schedule) raises the training loss of the last checkpoint above an earlier one's (measured:
  losses 143.9, 141.8 at steps 5-6, then 134.1, 194.0)."""
  return tiny_config(toy_root, cache, num_epochs=4, checkpoint_every_steps=2, max_checkpoints=1,
                     lr_decay_epochs=(3,), lr_decay_factor=500.0)


@pytest.mark.slow
def test_best_checkpoint_is_calibrated_and_exported_with_its_own_metrics(toy_root, tmp_path):
  """Item 2: with eval.checkpoint='best' (not the last step), evaluation, predict and export use the
  best step, which has its own threshold; model.json names that step and copies test metrics only
  when metrics.json describes the same step."""
  config = _best_not_last(toy_root, tmp_path / 'cache')
  train.train_and_evaluate(config, tmp_path / 'w', evaluate_after=False)
  model = tmp_path / 'w' / 'toy'
  mgr = checkpoint.manager(paths.checkpoints(model))
  best, last = mgr.best_step(), mgr.latest_step()
  mgr.close()
  assert best != last, 'precondition: the best checkpoint is not the last'
  assert helpers.steps(model) == sorted({best, last})   # max_checkpoints=1 keeps the last and the best
  calibration = trained.calibration(model, best)
  assert calibration and calibration['num_images'] == 2   # round(0.1 * 18) held-out normals
  best_config = config.copy_and_resolve_references()
  best_config.eval.checkpoint = 'best'
  report = evaluate.evaluate(best_config, tmp_path / 'w')
  assert report['categories']['toy']['checkpoint_step'] == best
  folder = make_toy_mvtec(tmp_path / 'new', n_train=1, n_good=2, n_bad=2) / 'toy' / 'test' / 'square'
  csv_path = evaluate.predict(best_config, tmp_path / 'w', folder)
  scores = [float(line.split(',')[1]) for line in csv_path.read_text().splitlines()[1:]]
  decisions = [line.split(',')[2] for line in csv_path.read_text().splitlines()[1:]]
  assert decisions == ['anomalous' if s > calibration['threshold'] else 'normal' for s in scores]
  # The last step's own threshold differs: predict really used the best step's.
  assert trained.restore(config, model, _mesh()).meta['calibration']['threshold'] != calibration['threshold']
  assert export.metrics_at_export(tmp_path / 'w', 'toy', False, best)['checkpoint_step'] == best
  assert export.metrics_at_export(tmp_path / 'w', 'toy', False, last) is None


def _mesh():
  from adtr_jax import sharding
  return sharding.make_mesh()


def _sweep(root, tmp, rates):
  runs = []
  for i, rate in enumerate(rates):
    config = tiny_config(root, tmp / 'cache', num_epochs=2, learning_rate=rate, checkpoint_every_steps=1)
    config.dataset.category = 'toy'
    config.seed = i
    runs.append((tmp / f'run{i}', config))
  return runs


@pytest.mark.slow
def test_a_diverging_member_stops_alone(two_categories, tmp_path):
  """Item 3: a stacked sweep of 3 where one learning rate is absurd: that member stops at the step its
  loss stopped being finite, keeps its last finite checkpoint and says so (diverged.json,
  metrics.json, one line per model in the error); the two others train to the end and are
  evaluated as they would be alone."""
  runs = _sweep(two_categories, tmp_path, [1e-3, 1e12, 3e-4])
  with pytest.raises(errors.Diverged) as e:
    train.train_runs(runs, stack=True)
  assert len(e.value.lines) == 1 and 'run1/toy diverged at step' in e.value.lines[0]
  record = json.loads(paths.diverged(tmp_path / 'run1' / 'toy').read_text())
  assert helpers.steps(tmp_path / 'run1' / 'toy') == list(range(1, record['step']))
  assert record['checkpoint'] == record['step'] - 1 or record['checkpoint'] is None
  metrics = json.loads((tmp_path / 'run1' / 'metrics.json').read_text())['categories']['toy']
  assert metrics == {'diverged_at_step': record['step']}
  alone = tmp_path / 'alone'
  train.train_runs([(alone, runs[2][1])], stack=False)
  for i in (0, 2):
    report = json.loads((tmp_path / f'run{i}' / 'metrics.json').read_text())['categories']['toy']
    assert report['checkpoint_step'] == 4 and 'image_auroc' in report
  step_s, p_stacked, _ = helpers.params(runs[2][1], tmp_path / 'run2' / 'toy')
  step_a, p_alone, _ = helpers.params(runs[2][1], alone / 'toy')
  assert step_s == step_a and helpers.max_diff(p_stacked, p_alone) <= 1e-4
  # Run again: the diverged member is not trained again (its config may not change), and says so.
  with pytest.raises(errors.Diverged):
    train.train_runs(runs, stack=True)


@pytest.mark.slow
def test_a_single_model_that_diverges_ends_with_one_line(toy_root, tmp_path):
  proc = helpers.cli([f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "cache"}',
                      f'--workdir={tmp_path / "w"}', '--config.train.learning_rate=1e12'])
  out, _ = proc.communicate(timeout=600)
  lines = [line for line in out.splitlines() if line.startswith('adtr_jax: error:')]
  assert proc.returncode == 1 and 'Traceback' not in out, out[-3000:]
  assert len(lines) == 1 and 'diverged at step' in lines[0] and 'train.learning_rate' in lines[0]


@pytest.mark.slow
def test_a_kill_between_two_members_saves_resumes(two_categories, tmp_path, monkeypatch):
  """Item 4: with max_checkpoints=1, a stacked pair killed after the first member saved a step and
  before the second did still resumes (from the step before, which the first kept until both had
  saved) and ends where an uninterrupted run ends."""
  def config(workdir_cache):
    c = tiny_config(two_categories, workdir_cache, num_epochs=4, checkpoint_every_steps=2,
                    max_checkpoints=1, stacked=True)
    c.dataset.category = 'toy,toy2'
    c.calibration.holdout_fraction = 0.0
    return c

  straight = tmp_path / 'straight'
  train.train_and_evaluate(config(tmp_path / 'cache'), straight, evaluate_after=False)
  killed = tmp_path / 'killed'

  class Killed(Exception):
    pass

  saves = []
  real_save = checkpoint.save

  def save_then_die(mgr, step, *args):
    real_save(mgr, step, *args)
    saves.append(step)
    if len(saves) == 3:   # toy saved step 4; toy2 has not
      mgr.wait_until_finished()
      raise Killed

  monkeypatch.setattr(checkpoint, 'save', save_then_die)
  with pytest.raises(Killed):
    train.train_and_evaluate(config(tmp_path / 'cache'), killed, evaluate_after=False)
  monkeypatch.setattr(checkpoint, 'save', real_save)
  assert helpers.steps(killed / 'toy') == [2, 4] and helpers.steps(killed / 'toy2') == [2]
  train.train_and_evaluate(config(tmp_path / 'cache'), killed, evaluate_after=False)
  for cat in ('toy', 'toy2'):
    c = config(tmp_path / 'cache')
    _, p_killed, _ = helpers.params(c, killed / cat)
    _, p_straight, _ = helpers.params(c, straight / cat)
    assert helpers.max_diff(p_killed, p_straight) == 0.0


@pytest.mark.slow
def test_validation_checks_the_mesh_each_group_trains_on(two_categories, tmp_path):
  """Item 5: three stacked members with train.model_axis=2 train on a 1 x 8 mesh (2 does not divide
  3), where batch 4 does not split over 8 devices: refused before anything trains, naming
  train.batch_size, although an image-fed run comes first in the sweep and the 2 x 4 mesh would
  take batch 4."""
  first = tiny_config(two_categories, tmp_path / 'cache', num_epochs=1, feature_cache='off')
  runs = [(tmp_path / 'images', first)]
  for i in range(3):
    c = tiny_config(two_categories, tmp_path / 'cache', num_epochs=1, batch_size=4, model_axis=2)
    c.eval.batch_size, c.seed = 8, i
    runs.append((tmp_path / f's{i}', c))
  with pytest.raises(errors.ConfigError, match=r'train.batch_size=4 must be divisible .* \(8\)'):
    train.train_runs(runs, stack=True)
  assert not any(helpers.steps(run_dir / 'toy') for run_dir, _ in runs)


def test_a_run_started_again_from_step_0_shows_each_step_once(tmp_path):
  """Item 6: killed before its first checkpoint after logging steps 1-3 (events on disk), the run
  starts again from step 0: TensorBoard and the JSONL show steps 1-4 once, with the new values."""
  log = summaries.ModelLog(tmp_path, 0)
  for step in (1, 2, 3):
    log.write(step, loss=float(step))
  log.close()
  log = summaries.ModelLog(tmp_path, 0)
  for step in (1, 2, 3, 4):
    log.write(step, loss=10.0 * step)
  log.close()
  scalars, _ = read_events(tmp_path)
  assert scalars['train/loss'] == [(s, 10.0 * s) for s in (1, 2, 3, 4)]
  assert [json.loads(r)['step'] for r in (tmp_path / summaries.JSONL).read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_config_json_records_the_training_config_only(toy_root, tmp_path):
  """Item 7: --mode=eval with other (allowed) eval fields leaves config.json as training wrote it."""
  common = [f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "cache"}', f'--workdir={tmp_path / "w"}']
  proc = helpers.cli([*common, '--mode=train', '--config.train.num_epochs=1'])
  assert proc.communicate(timeout=600)[0] is not None and proc.returncode == 0
  written = (tmp_path / 'w' / 'config.json').read_text()
  proc = helpers.cli([*common, '--mode=eval', '--config.train.num_epochs=1', '--config.eval.batch_size=4'])
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert (tmp_path / 'w' / 'config.json').read_text() == written
  assert json.loads(written)['eval']['batch_size'] == 8
