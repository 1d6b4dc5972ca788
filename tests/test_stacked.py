"""Stacked models (adtr_jax/stacked.py): model i of a stacked run == the same model trained alone, on one
device and on a 4 x 2 ('model', 'data') mesh; vmapped scoring == scoring each model; grouping; a killed
stacked CLI run resumes exactly."""
import json
import shutil

import jax
import numpy as np
import pytest

from adtr_jax import errors, evaluate, inference, sharding, stacked, train
from tests.conftest import make_toy_mvtec, tiny_config
from tests.test_summaries import read_events
from tests.test_train import _cli, _kill_after_first_checkpoint

# (category, seed, learning rate, model init): two categories of different sizes (18 and 26 training
# images: 2 and 3 steps per epoch, budgets of 4 and 6 steps), several seeds, learning rates and
# initialisations (init-only fields are stackable too).
MEMBERS = [('toy', 0, 1e-3, {}), ('toy', 1, 3e-4, {'tie_qk_init': False}),
           ('toy2', 0, 1e-3, {'pos_init': 'normal'}),
           ('toy2', 2, 2e-3, {'embed_init_std': 0.02})]


@pytest.fixture(scope='module')
def root(toy_root, tmp_path_factory):
  root = tmp_path_factory.mktemp('stacked_data')
  shutil.copytree(toy_root / 'toy', root / 'toy')
  other = make_toy_mvtec(tmp_path_factory.mktemp('toy2'), n_train=26, seed=1)
  shutil.copytree(other / 'toy', root / 'toy2')
  return root


def _config(root, cache, category, seed, lr, model=None):
  config = tiny_config(root, cache, schedule='warmup_cosine', learning_rate=lr, num_epochs=2)
  config.dataset.category, config.seed = category, seed
  config.model.update(**(model or {}))
  config.calibration.holdout_fraction = 0.0
  return config


def _result(config, workdir):
  """(final step, parameter leaves, logged losses) of the model in workdir."""
  _, params, _, meta = evaluate.restore_model(config, workdir, sharding.make_mesh())
  losses = [json.loads(line)['loss'] for line in (workdir / 'train_log.jsonl').read_text().splitlines()]
  return meta['step'], [np.asarray(x) for x in jax.tree.leaves(params)], np.asarray(losses)


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.fixture(scope='module')
def alone(root, tmp_path_factory):
  """Each member trained on its own (train.train) on one device."""
  tmp = tmp_path_factory.mktemp('alone')
  mesh = sharding.make_mesh(jax.devices()[:1])
  out = []
  for i, spec in enumerate(MEMBERS):
    config = _config(root, tmp / 'cache', *spec)
    train.train(config, spec[0], tmp / str(i), mesh=mesh)
    out.append(_result(config, tmp / str(i)))
  return out


# (mesh, train.models_per_call): on one device the four models in sequence (0: CPU's default) or in one
# vmapped call (4); on a 2 x 4 mesh two models per 'model' device, in sequence on each; on 4 x 2 one each.
LAYOUTS = {'one_device': (1, 0), 'one_device_vmap': (1, 4), 'mesh_2x4': (2, 0), 'mesh_4x2': (4, 0)}


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_stacked_models_train_as_they_would_alone(root, alone, tmp_path, layout):
  """Same seeds, float32 features and parameters. Losses agree to 1e-6 relative and parameters to
  1e-4 absolute (measured: 2e-5; vmapped matmuls round differently, and Adam turns a ~1e-9 gradient
  difference on a near-zero gradient into a visible step). Control: a model compared with another
  seed's on the same data differs by > 1e-3 (the learning rate)."""
  model_axis, per_call = LAYOUTS[layout]
  mesh = (sharding.make_mesh(jax.devices()[:1]) if model_axis == 1
          else sharding.make_mesh(model_axis=model_axis))
  assert dict(mesh.shape) == {'model': model_axis, 'data': 1 if model_axis == 1 else 8 // model_axis}
  members = [stacked.Member(_config(root, tmp_path / 'cache', *spec), tmp_path / str(i))
             for i, spec in enumerate(MEMBERS)]
  for m in members:
    m.config.train.models_per_call = per_call
  group, *_ = stacked.train_members(members, tmp_path / 'group', mesh=mesh)
  assert group.last_steps == [4, 4, 6, 6]   # the shorter runs are masked for their last 2 steps
  for i, m in enumerate(members):
    step, params, losses = _result(m.config, m.workdir)
    a_step, a_params, a_losses = alone[i]
    assert step == a_step and len(losses) == len(a_losses) == step
    np.testing.assert_allclose(losses, a_losses, rtol=1e-6)
    assert _max_diff(params, a_params) <= 1e-4, m.workdir
    # Each member is its own TensorBoard run, with its own steps and losses.
    scalars, _ = read_events(m.workdir)
    assert [s for s, _ in scalars['train/loss']] == list(range(1, step + 1))
    np.testing.assert_allclose([v for _, v in scalars['train/loss']], losses, rtol=1e-6)
  step, params, _ = _result(members[0].config, members[0].workdir)
  assert _max_diff(params, alone[1][1]) > 1e-3     # control: model 0 vs model 1 (another seed)


def test_vmapped_scoring_equals_scoring_each_model(root, tmp_path):
  members = [stacked.Member(_config(root, tmp_path / 'cache', *spec), tmp_path / str(i))
             for i, spec in enumerate(MEMBERS[:2])]
  trained = stacked.train_members(members, tmp_path / 'group')
  group, graphdef, state, frozen, mesh = trained
  reports = stacked.evaluate_members(*trained)
  test = group.data['toy'].test
  both = inference.score_split(members[0].config, test, graphdef, stacked.take(state.params, [0, 1], mesh),
                               frozen, mesh, 'both', stacked=True)
  assert both['maps'].shape[:2] == both['scores'].shape == (2, len(test))
  for i, m in enumerate(members):
    params = jax.tree.map(lambda x: x[0], stacked.take(state.params, [i], mesh))
    alone = inference.score_split(m.config, test, graphdef, params, frozen, mesh, 'one')
    np.testing.assert_allclose(both['scores'][i], alone['scores'], rtol=1e-5)
    np.testing.assert_allclose(both['maps'][i], alone['maps'], rtol=1e-4, atol=1e-6)
    saved = json.loads((m.workdir / 'metrics.json').read_text())
    assert saved == json.loads(json.dumps(reports[i]))
    assert saved['categories']['toy']['checkpoint_step'] == 4
  assert not np.allclose(both['scores'][0], both['scores'][1])   # two different models


def test_groups_split_on_shapes_not_numbers(root, tmp_path):
  def member(name, **changes):
    config = _config(root, tmp_path, 'toy', 0, 1e-3)
    for field, value in changes.items():
      section, leaf = field.split('__')
      config[section][leaf] = value
    return stacked.Member(config, tmp_path / name)
  members = [member('base'), member('lr', train__learning_rate=3e-4), member('cat', dataset__category='toy2'),
             member('wide', model__hidden_dim=64), member('epochs', train__num_epochs=5),
             member('dropout', model__dropout=0.0), member('embed', model__embed_init_std=0.1),
             member('untied', model__tie_qk_init=False), member('normal_pos', model__pos_init='normal')]
  members[1].config.seed = 7
  assert [[m.workdir.name for m in g] for g in stacked.groups(members)] == [
      ['base', 'lr', 'cat', 'epochs', 'embed', 'untied', 'normal_pos'], ['wide'], ['dropout']]


def test_anomaly_training_is_not_stacked(root, tmp_path):
  config = _config(root, tmp_path, 'toy', 0, 1e-3)
  config.anomalies.synthetic, config.loss.type = 'confetti', 'pixel'
  with pytest.raises(errors.ConfigError, match='stacked training trains from cached features'):
    stacked.check(config)
  config = _config(root, tmp_path, 'toy', 0, 1e-3)
  config.train.feature_cache = 'host'
  with pytest.raises(errors.ConfigError, match='train.feature_cache=.host. must be "device"'):
    stacked.check(config)


def test_killed_stacked_cli_run_resumes_exactly(root, tmp_path):
  """SIGKILL `--config.train.stacked=True` on two categories after its first stacked checkpoint; the
  same command resumes both models from it and ends where an uninterrupted run ends (<= 1e-6,
  measured 0: same process layout, same arithmetic)."""
  common = [f'--config=tests/tiny_config.py:{root}|{tmp_path / "cache"}', '--mode=train',
            '--config.dataset.category=toy,toy2', '--config.train.stacked=True',
            '--config.train.num_epochs=12', '--config.train.checkpoint_every_steps=3',
            '--config.calibration.holdout_fraction=0']
  workdir = tmp_path / 'run'
  killed_at = _kill_after_first_checkpoint([*common, f'--workdir={workdir}'],
                                           workdir / 'stacked' / 'checkpoints', 36)
  assert not (workdir / 'toy' / 'checkpoints').exists()   # exported only at the end

  resumed = _cli([*common, f'--workdir={workdir}'])
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert f'resumed 2 stacked models from step {killed_at}' in out
  straight = _cli([*common, f'--workdir={tmp_path / "straight"}'])
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]
  for cat, last in (('toy', 24), ('toy2', 36)):
    config = _config(root, tmp_path / 'cache', cat, 0, 1e-3)
    step_r, p_resumed, _ = _result(config, workdir / cat)
    step_s, p_straight, _ = _result(config, tmp_path / 'straight' / cat)
    assert step_r == step_s == last
    assert _max_diff(p_resumed, p_straight) <= 1e-6


def test_models_per_call_default_is_sequential_on_cpu_only():
  from adtr_jax import loop
  assert loop.models_per_call_for(0, 'cpu') == 1
  assert loop.models_per_call_for(0, 'gpu') == loop.models_per_call_for(0, 'tpu') == 0   # 0: all at once
  assert loop.models_per_call_for(3, 'cpu') == loop.models_per_call_for(3, 'gpu') == 3
  with pytest.raises(errors.ConfigError, match='train.models_per_call'):
    loop.models_per_call_for(-1, 'cpu')
