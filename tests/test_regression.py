"""Pinned behaviour: every training path ends where it ended before the one-driver refactor (issue 27).

For each path (one model from the device cache, the host cache and images; two stacked categories;
synthetic anomalies; labelled anomalies with pixel and with image labels) the tiny config is trained
and evaluated through `train.train_and_evaluate`, and its final logged loss, each parameter leaf's sum
and absolute sum, every metric and the calibrated threshold are compared with tests/regression_pins.json.

The pins are written by `python -m tests.test_regression --record` (the commit is in the file). First
recorded at 719855b, before the refactor; the one driver (37887fd) matched them on every path. Then
re-recorded once, on purpose, when dropout and the data order moved to split keys (b05e91f), which
changes every run's batches; re-record only for a change that is meant to alter results, and say so.
Tolerances (TOLERANCE) follow what reproduces across processors. The pins were recorded on an Intel
Xeon; XLA's CPU kernels round differently on other processors (vector widths, reduction order), and a
few dozen float32 Adam steps amplify that. Measured on an AMD EPYC (Zen 4, AVX-512) against the Intel
pins, the largest deviation of each kind over the 7 paths, beside the control (the device-cache path
with one more step):
  quantity                                 tolerance   AMD vs Intel pins      one more step
  loss, relative                           1e-4        1.2e-6 (pixel_labels)  4.8e-2
  threshold, relative                      1e-4        2.1e-6 (pixel_labels)  8.5e-3
  leaf sum, over the leaf's abs sum        3e-3        3.0e-4 (pixel_labels)  9.2e-2
  leaf abs sum, over the leaf's abs sum    3e-3        2.5e-4 (pixel_labels)  2.4e-1
  metrics, absolute                        1e-4        9.1e-7                 -
So every path passes within 0.1 of its tolerance on both processors, and the control misses by 30x
or more (test_the_comparison_fails_on_a_changed_run asserts > 10x). A leaf's signed sum is compared
relative to its absolute sum: a leaf whose entries cancel (a bias summing to 0.007 from entries of
absolute sum 0.108) measures rounding in its sum, not behaviour. Attention key biases are not
compared: softmax ignores a per-query constant, so their gradient is rounding noise that Adam turns
into steps. Steps and image counts must be equal.
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import REPO, make_two_toys, tiny_config

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


# Each pinned quantity's tolerance, as a fraction of its scale: losses and thresholds relative to
# themselves, a leaf's sum and absolute sum relative to the leaf's absolute sum (a signed sum whose
# entries cancel measures only rounding), metrics absolute. The module docstring gives the margins.
TOLERANCE = {'loss': 1e-4, 'threshold': 1e-4, 'leaf': 3e-3, 'metric': 1e-4}
COUNTS = ('checkpoint_step', 'num_test_images', 'num_anomalous', 'num_heatmaps')   # compared exactly


def deviations(got: dict, pinned: dict, name: str):
  """Yields (deviation / tolerance, what) for every pinned number (<= 1 passes); asserts that the
  counts (steps, images) are equal."""
  assert got.keys() == pinned.keys(), name
  for cat, want in pinned.items():
    have, where = got[cat], f'{name}/{cat}'
    for key in ('loss', 'threshold'):
      a, b = have[key], want[key]
      if a is None or b is None:
        assert a == b, f'{where} {key}'
        continue
      yield abs(a - b) / (TOLERANCE[key] * abs(b) + 1e-7), f'{where} {key}: {a!r}, pinned {b!r}'
    assert have['leaves'].keys() == want['leaves'].keys(), where
    for leaf, (s, a) in want['leaves'].items():
      if leaf.endswith('/key/bias/value'):
        continue   # no gradient (softmax ignores a per-query constant): rounding noise, ~1e-5
      scale = TOLERANCE['leaf'] * a + 1e-6
      got_sum, got_abs = have['leaves'][leaf]
      yield abs(got_sum - s) / scale, f'{where} {leaf} sum: {got_sum!r}, pinned {s!r} (abs sum {a!r})'
      yield abs(got_abs - a) / scale, f'{where} {leaf} abs sum: {got_abs!r}, pinned {a!r}'
    assert have['metrics'].keys() == want['metrics'].keys(), where
    for key, value in want['metrics'].items():
      if key not in COUNTS:
        yield (abs(have['metrics'][key] - value) / TOLERANCE['metric'],
               f'{where} {key}: {have["metrics"][key]!r}, pinned {value!r}')


def worst(got: dict, pinned: dict, name: str) -> tuple[float, str]:
  """The largest deviation / tolerance of a run's numbers against their pins, and what it is."""
  return max(deviations(got, pinned, name), key=lambda d: d[0])


def same_counts(got: dict, pinned: dict, name: str) -> None:
  for cat, want in pinned.items():
    counts = lambda r: [r['step']] + [r['metrics'][k] for k in COUNTS if k in r['metrics']]
    assert counts(got[cat]) == counts(want), f'{name}/{cat}: steps and counts {counts(got[cat])}, pinned {counts(want)}'


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return make_two_toys(tmp_path_factory.mktemp('regression'))


@pytest.mark.parametrize('name', list(PATHS))
def test_path_ends_where_it_was_pinned(name, root, tmp_path):
  pinned = json.loads(PINS.read_text())['paths'][name]
  got = run_path(name, tmp_path, root)
  same_counts(got, pinned, name)
  ratio, what = worst(got, pinned, name)
  assert ratio <= 1.0, f'{what}: {ratio:.3g} x its tolerance'


def test_the_comparison_fails_on_a_changed_run(root, tmp_path):
  """Control: the same path with one more training step misses its pinned numbers (the step count
  aside) by at least 10x their tolerance (measured: 300x, see the module docstring)."""
  pinned = json.loads(PINS.read_text())['paths']['device_cache']
  categories, overrides = PATHS['device_cache']
  from adtr_jax import train
  config = _config(root, tmp_path / 'cache', categories, overrides)
  config.train.min_steps = 5   # 18 images at batch 8 with the holdout: 4 steps; now 5
  report = train.train_and_evaluate(config, tmp_path / 'w')['eval']
  got = {'toy': dict(_model_record(tmp_path / 'w' / 'toy'),
                     metrics={k: v for k, v in report['categories']['toy'].items()
                              if k not in SKIP_METRICS})}
  ratio, what = worst(got, pinned, 'control')
  assert ratio > 10.0, f'one more step moved no pinned number by 10x its tolerance; the most: {what}'


def record(out: pathlib.Path = PINS) -> None:
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    root = make_two_toys(tmp)
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
