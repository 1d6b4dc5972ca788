"""The training feature cache in a real two-process run (2 JAX processes x 2 fake CPU devices, as in
tests/test_multiprocess.py) against one process x 4 devices: each process embeds and writes only its
own block of rows (the rows its devices hold in the device feed), with no all-gather of features, and
the two processes train to the same parameters as one (tolerances: test_multiprocess.assert_same_training).
The host feed, which draws any row on any process, writes the same blocks and reads the other
process's block from the shared cache folder."""
import pathlib

import numpy as np
import pytest

from adtr_jax import npy_rows
from tests.multiprocess_runs import (_batched_reads, assert_same_training, config_args, launch,
                                     params_and_losses, running)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# 16 training rows (2 of the toy's 18 held out to calibrate), 2 steps of 8 an epoch, 4 steps.
FLAGS = ['--config.train.num_epochs=2', '--mode=train']
STEPS = 4
RUNS = {'1x4': ('1x4', []), '2x2': ('2x2', []), '2x2_host': ('2x2', ['--config.train.feature_cache=host'])}


@pytest.fixture(scope='module')
def runs(toy_root, tmp_path_factory):
  """{name: (Processes, run folder)}, each run with its own fresh cache (so it writes the features)."""
  out = {}
  for name, (layout, extra) in RUNS.items():
    run = tmp_path_factory.mktemp(name) / 'run'
    out[name] = (launch(run.parent, name, layout, config_args(toy_root, run / 'cache', run / 'work',
                                                               *FLAGS, *extra), run), run)
  with running(*(p for p, _ in out.values())):
    for procs, _ in out.values():
      procs.check()
  return out


def _feature_files(procs, process: int) -> list[str]:
  """Names of the feature cache files the process wrote (renamed into place), in order."""
  return [pathlib.Path(path).name for event, path in procs.audit(process)['writes']
          if '/features/' in path and event == 'os.rename' and not pathlib.Path(path).name.startswith('.')]


def _block(run: pathlib.Path, name: str) -> np.ndarray:
  [path] = (run / 'cache' / 'features').glob(f'*/{name}')
  return np.asarray(npy_rows.Rows(path, 'float32'))


def test_each_process_embeds_and_writes_only_its_own_rows(runs):
  """2x2: process 0 embeds rows [0, 8) of the training set and writes them, process 1 rows [8, 16);
  each decoded no other row for the feature pass. Their files hold the rows of the one-process cache
  bit for bit (each device embeds the same share of each batch as on 1x4)."""
  one, run1 = runs['1x4']
  for name in ('2x2', '2x2_host'):
    two, run2 = runs[name]
    assert _feature_files(two, 0) == ['moments-0-8.p0.npy', 'rows-0-8.p0.npy'], name
    assert _feature_files(two, 1) == ['moments-8-16.p1.npy', 'rows-8-16.p1.npy'], name
    assert _feature_files(one, 0) == ['moments-0-16.p0.npy', 'rows-0-16.p0.npy']
    whole = _block(run1, 'rows-0-16.p0.npy')
    np.testing.assert_array_equal(_block(run2, 'rows-0-8.p0.npy'), whole[:8])
    np.testing.assert_array_equal(_block(run2, 'rows-8-16.p1.npy'), whole[8:])
    feature_pass = [{r[-1] for r in _batched_reads(two, p, ('Subset', 16)) if r[0] == 0} for p in (0, 1)]
    assert feature_pass == [set(range(8)), set(range(8, 16))], name


def test_each_process_keeps_the_moments_of_its_rows_and_all_merge_to_one_process(runs):
  """Each block's moments file counts its own rows; process 0's and 1's merged give the one-process
  statistics (FeatureNorm's mean and std are compared with the parameters below)."""
  from adtr_jax.moments import Moments
  one, run1 = runs['1x4']
  two, run2 = runs['2x2']
  part = lambda run, name: Moments.from_array(np.load(next((run / 'cache' / 'features').glob(f'*/{name}'))))
  a, b = part(run2, 'moments-0-8.p0.npy'), part(run2, 'moments-8-16.p1.npy')
  whole = part(run1, 'moments-0-16.p0.npy')
  assert a.count == b.count == whole.count // 2
  merged = Moments.combine([a, b])
  np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(merged.std, whole.std, rtol=1e-10)


def test_two_processes_train_as_one_from_the_device_and_the_host_feed(runs, toy_root):
  one, run1 = runs['1x4']
  want = params_and_losses(run1 / 'work' / 'toy', toy_root, run1 / 'cache')
  for name in ('2x2', '2x2_host'):
    _, run2 = runs[name]
    assert_same_training(params_and_losses(run2 / 'work' / 'toy', toy_root, run2 / 'cache'), want, STEPS)
  # What each process was told the run needs (preflight), before any work.
  for name, (procs, _) in runs.items():
    out = procs.output(0)
    assert 'adtr_jax: this run will need, per process:' in out and 'feature cache:' in out, name
    assert out.index('this run will need') < out.index('preparing'), name
