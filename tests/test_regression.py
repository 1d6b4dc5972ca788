"""Pinned behaviour: every training path ends where it ended before the one-driver refactor (issue 27).

For each path (one model from the device cache, the host cache and images; two stacked categories;
synthetic anomalies; labelled anomalies with pixel and with image labels) the tiny config is trained
and evaluated through `train.train_and_evaluate`, and its final logged loss, each parameter leaf's sum
and absolute sum, every metric and the calibrated threshold are compared with tests/regression_pins.json.

The pins are written by `python -m tests.test_regression --record` (the commit is in the file). First
recorded at 719855b, before the refactor; the one driver (37887fd) matched them on every path. Then
re-recorded once, on purpose, when dropout and the data order moved to split keys (b05e91f), which
changes every run's batches; re-record only for a change that is meant to alter results, and say so.
Tolerance: float32 and a few dozen steps; a restructured program may fuse and reduce in another order
(a vmap of one model, a scan instead of a loop of steps), which moves float32 results by ~1e-7
relative per step. Losses and thresholds: 1e-5 relative (+1e-6 absolute); a leaf's sum and absolute
sum: 1e-5 relative + 1e-5 absolute, except attention key biases, which are not compared: softmax
ignores a per-query constant, so their gradient is rounding noise that Adam turns into steps (measured
1e-5 apart on leaves whose absolute sum is 1.4e-4); metrics: 1e-4 absolute (ranks of near-tied test scores). A behaviour
change (a row order, a key, a learning rate, one step more or less) moves a trained leaf's sum by
~1e-3 x its size or more (the control below).
"""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO, make_toy_mvtec, tiny_config

pytestmark = pytest.mark.slow   # every test trains a path to its end

PINS = pathlib.Path(__file__).with_name('regression_pins.json')

# name -> (categories, config overrides). Holdout calibration stays on (0.1) where the training set
# keeps enough images, so the threshold is pinned too.
PATHS = {
    'device_cache': ('toy', {}),
    'host_cache': ('toy', {'train.feature_cache': 'host'}),
    'images': ('toy', {'train.feature_cache': 'off'}),
    'stacked': ('toy,toy2', {'train.stacked': True}),
    'synthetic': ('toy', {'anomalies.synthetic': 'confetti', 'loss.type': 'pixel'}),
    'pixel_labels': ('toy', {'anomalies.num_labelled': 1, 'loss.type': 'pixel'}),
    'image_labels': ('toy', {'anomalies.num_labelled': 1, 'loss.type': 'image'}),
}
SKIP_METRICS = ('heatmap_dir', 'curves', 'labelled_anomalies_removed_from_test', 'labelled_use')


def make_root(tmp: pathlib.Path) -> pathlib.Path:
  """toy (18 training images) and toy2 (26), as conftest draws them."""
  root = tmp / 'data'
  make_toy_mvtec(tmp / 'a')
  make_toy_mvtec(tmp / 'b', n_train=26, seed=1)
  shutil.copytree(tmp / 'a' / 'toy', root / 'toy')
  shutil.copytree(tmp / 'b' / 'toy', root / 'toy2')
  return root


def _config(root, cache, categories: str, overrides: dict):
  config = tiny_config(root, cache)
  config.dataset.category = categories
  for field, value in overrides.items():
    section, leaf = field.split('.')
    config[section][leaf] = value
  return config


def _model_record(model_dir: pathlib.Path) -> dict:
  """The final loss, parameter leaf sums and calibration of one model folder (read with orbax alone)."""
  log = (model_dir / 'train_log.jsonl').read_text().splitlines()
  mgr = ocp.CheckpointManager(model_dir.absolute() / 'checkpoints', item_names=('state', 'meta'))
  step = mgr.latest_step()
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                   meta=ocp.args.JsonRestore()))
  mgr.close()
  leaves = {}
  for path, x in _flatten(out.state['params']):
    x = np.asarray(x, np.float64)
    leaves[path] = [float(x.sum()), float(np.abs(x).sum())]
  return {'step': int(step), 'loss': json.loads(log[-1])['loss'], 'leaves': leaves,
          'threshold': out.meta.get('calibration', {}).get('threshold')}


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    for k in sorted(tree):
      yield from _flatten(tree[k], f'{prefix}/{k}')
  else:
    yield prefix, tree


def run_path(name: str, tmp: pathlib.Path, root: pathlib.Path) -> dict:
  from adtr_jax import train
  categories, overrides = PATHS[name]
  workdir = tmp / name
  config = _config(root, tmp / 'cache', categories, overrides)
  report = train.train_and_evaluate(config, workdir)['eval']
  record = {}
  for cat, values in report['categories'].items():
    metrics = {k: v for k, v in values.items() if k not in SKIP_METRICS}
    record[cat] = dict(_model_record(workdir / cat), metrics=metrics)
  return record


def _close(a, b, rtol, atol, where):
  if a is None or b is None:
    assert a == b, where
    return
  assert abs(a - b) <= atol + rtol * abs(b), f'{where}: {a!r} != pinned {b!r}'


def compare(got: dict, pinned: dict, name: str) -> None:
  assert got.keys() == pinned.keys(), name
  for cat, want in pinned.items():
    have, where = got[cat], f'{name}/{cat}'
    assert have['step'] == want['step'], where
    _close(have['loss'], want['loss'], 1e-5, 1e-6, f'{where} loss')
    _close(have['threshold'], want['threshold'], 1e-5, 1e-6, f'{where} threshold')
    assert have['leaves'].keys() == want['leaves'].keys(), where
    for leaf, (s, a) in want['leaves'].items():
      if leaf.endswith('/key/bias/value'):
        continue   # no gradient (softmax ignores a per-query constant): rounding noise, ~1e-5
      _close(have['leaves'][leaf][0], s, 1e-5, 1e-5 + 1e-5 * a, f'{where} {leaf} sum')
      _close(have['leaves'][leaf][1], a, 1e-5, 1e-5, f'{where} {leaf} abs sum')
    assert have['metrics'].keys() == want['metrics'].keys(), where
    for key, value in want['metrics'].items():
      _close(have['metrics'][key], value, 0.0, 1e-4, f'{where} {key}')


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return make_root(tmp_path_factory.mktemp('regression'))


@pytest.mark.parametrize('name', list(PATHS))
def test_path_ends_where_it_was_pinned(name, root, tmp_path):
  pinned = json.loads(PINS.read_text())['paths'][name]
  compare(run_path(name, tmp_path, root), pinned, name)


def test_the_comparison_fails_on_a_changed_run(root, tmp_path):
  """Control: the same path with one more training step does not pass the comparison."""
  pinned = json.loads(PINS.read_text())['paths']['device_cache']
  categories, overrides = PATHS['device_cache']
  from adtr_jax import train
  config = _config(root, tmp_path / 'cache', categories, overrides)
  config.train.min_steps = 5   # 18 images at batch 8 with the holdout: 4 steps; now 5
  report = train.train_and_evaluate(config, tmp_path / 'w')['eval']
  got = {'toy': dict(_model_record(tmp_path / 'w' / 'toy'),
                     metrics={k: v for k, v in report['categories']['toy'].items()
                              if k not in SKIP_METRICS})}
  with pytest.raises(AssertionError):
    compare(got, pinned, 'control')


def record(out: pathlib.Path = PINS) -> None:
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    root = make_root(tmp)
    paths = {name: run_path(name, tmp, root) for name in PATHS}
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
  out.write_text(json.dumps({'commit': commit, 'paths': paths}, indent=1) + '\n')
  print(f'wrote {out} at {commit}')


if __name__ == '__main__':
  if sys.argv[1:] != ['--record']:
    sys.exit('usage: python -m tests.test_regression --record')
  import tests.conftest  # noqa: F401  (8 fake devices, as under pytest)
  record()
