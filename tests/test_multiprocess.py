"""Multi-process runs of normal-only training (tests/multiprocess_runs.py has the set-up and the
tolerances): 2 processes x 2 devices train, evaluate, predict, write shared files once, decode their own
slices, resume after a kill and stack models, equal to 1 process x 4 devices; each process embeds,
writes, reduces and stores only its own rows (issue 36). All share one module fixture (normal_runs),
so that its runs serve every test."""
from __future__ import annotations

import csv
import json
import os
import pathlib
import re
import shutil
import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from adtr_jax import metrics, multihost, npy_rows, split_pass
from adtr_jax.moments import Moments
from adtr_jax.models.adtr import build_model
from tests import helpers
from tests.conftest import make_toy_mvtec, tiny_config
from tests.multiprocess_runs import (DISTRIBUTED_TIMEOUT_S, LAYOUTS, NORMAL, NORMAL_STEPS, RUN_TIMEOUT_S,
                                     assert_own_slices, assert_same_training, batched_reads, config_args,
                                     last_line, launch, params_and_losses, running)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
  """This file's toy (replaces conftest's): 18 training images and 9 test images (5 normal, 4 with a
  defect), so that the processes' shares of the test split differ (5 + 4 in one padded second batch of
  8) and so do those of the 5 images predicted (4 + 1, one padded batch)."""
  return make_toy_mvtec(tmp_path_factory.mktemp('toy_mvtec'), n_good=5)


BATCH = 8   # tests/tiny_config.py's eval.batch_size
PREDICTED = 'toy/test/good'


@pytest.fixture(scope='module')
def normal_runs(toy_root, tmp_path_factory):
  """(a): train_and_eval, then predict on the normal test images, as 1x4 and as 2x2, each with its own
  fresh cache and workdir (so the 2x2 run prepares the shared files and writes its feature cache
  itself); beside them 'host': the 2x2 training from the host feed (train.feature_cache=host), which
  draws any row on any process.
  -> {'1x4' | '2x2': (train Processes, predict Processes, run dir), 'host': (train Processes, None, run dir)}."""
  runs = {name: tmp_path_factory.mktemp(f'normal_{name}') for name in (*LAYOUTS, 'host')}
  args = {name: config_args(toy_root, tmp / 'run' / 'cache', tmp / 'run' / 'work', *NORMAL)
          for name, tmp in runs.items()}
  args['host'] += ['--config.train.feature_cache=host', '--mode=train']
  trained = {name: launch(tmp, name, '2x2' if name == 'host' else name, args[name], tmp / 'run')
             for name, tmp in runs.items()}
  with running(*trained.values()):
    for procs in trained.values():
      procs.check()
  predicted = {layout: launch(runs[layout], f'{layout}_predict', layout,
                              [*args[layout], '--mode=predict', f'--predict_dir={toy_root / PREDICTED}'],
                              runs[layout] / 'run') for layout in LAYOUTS}
  with running(*predicted.values()):
    for procs in predicted.values():
      procs.check()
  return {name: (trained[name], predicted.get(name), runs[name] / 'run') for name in runs}


def test_two_processes_train_and_evaluate_as_one(normal_runs, toy_root):
  """(a) Final parameters, the loss curve and metrics.json of 2x2 equal 1x4's. Control: training moved
  the parameters by far more than the tolerance."""
  one, two = normal_runs['1x4'][2], normal_runs['2x2'][2]
  want = params_and_losses(one / 'work' / 'toy', toy_root, one / 'cache')
  assert_same_training(params_and_losses(two / 'work' / 'toy', toy_root, two / 'cache'), want, NORMAL_STEPS)
  config = tiny_config(toy_root, one / 'cache')
  model, _ = build_model(config)
  initial = {jax.tree_util.keystr(k): np.asarray(v)
             for k, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  moved = max(float(np.max(np.abs(v - initial[k]))) for k, v in want[1].items() if k in initial)
  assert moved > 1e-2
  m1 = json.loads((one / 'work' / 'metrics.json').read_text())['categories']['toy']
  m2 = json.loads((two / 'work' / 'metrics.json').read_text())['categories']['toy']
  assert m1.keys() == m2.keys()
  for key in metrics.METRIC_KEYS:
    assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
  for key in ('num_test_images', 'num_anomalous', 'checkpoint_step', 'num_heatmaps'):
    assert m2[key] == m1[key]

def _test_images(root: pathlib.Path) -> dict[str, np.ndarray]:
  """'<defect folder>/<stem>' -> the test image uint8 [S, S, 3] as the heatmap panels show it."""
  out = {}
  for path in sorted((root / 'toy' / 'test').glob('*/*.png')):
    image = np.asarray(Image.open(path).convert('RGB'))
    out[f'{path.parent.name}/{path.stem}'] = image
  return out


def _panels(heatmap_dir: pathlib.Path, images: dict, labelled: bool = True) -> dict:
  """{image its first panel shows (found by content): (file name, overlay panel)}. Asserts that the
  file name names that same image, and (labelled: evaluation's heatmaps) its ground truth."""
  out = {}
  for path in sorted(heatmap_dir.glob('*.png')):
    panel = np.asarray(Image.open(path))
    size = panel.shape[0]
    shown = [name for name, image in images.items() if np.array_equal(panel[:, :size], image)]
    assert len(shown) == 1, (path.name, shown)
    assert path.stem.endswith('_' + shown[0].split('/')[1]), (path.name, shown)
    assert not labelled or ('normal' in path.name) == shown[0].startswith('good/'), (path.name, shown)
    out[shown[0]] = (path.name, panel[:, -size:].astype(int))
  return out

def test_heatmaps_and_predictions_pair_each_image_with_its_own_map(normal_runs, toy_root):
  """Evaluation's heatmaps and predict's overlays show, beside each image, the same score map as the
  1x4 run's panel of that image (images matched by content, not by position or rank; overlays within
  1 of 255 per pixel, from rounding). predictions.csv: same files, decisions and scores (rtol 1e-5)."""
  images = _test_images(toy_root)
  for sub, labelled, n in (('work/toy/heatmaps', True, 4), ('work/toy/predict/heatmaps', False, 5)):
    one = _panels(normal_runs['1x4'][2] / sub, images, labelled)
    two = _panels(normal_runs['2x2'][2] / sub, images, labelled)
    assert one.keys() == two.keys() and len(one) == n
    for name in one:
      assert np.abs(one[name][1] - two[name][1]).max() <= 1, name
  rows = {layout: list(csv.DictReader((normal_runs[layout][2] / 'work/toy/predict/predictions.csv').open()))
          for layout in LAYOUTS}
  assert [r['path'] for r in rows['2x2']] == [r['path'] for r in rows['1x4']] and len(rows['1x4']) == 5
  assert [r['decision'] for r in rows['2x2']] == [r['decision'] for r in rows['1x4']]
  np.testing.assert_allclose([float(r['image_score']) for r in rows['2x2']],
                             [float(r['image_score']) for r in rows['1x4']], rtol=1e-5)


def _own_files(path: str, process: int) -> bool:
  """Orbax's per-process parts of a checkpoint (array metadata, OCDBT shards) are named for the
  process that writes them; a process writes its share of the resized images into the image cache's
  temporary folder (<split>-<token>), and their paths into paths-<process>.json there; its parts of a
  reduced pass into the pass's scratch folder, named for it (calibration, evaluation, predict); and
  its block of the feature cache (rows and moments files named for it, written under hidden names
  first). (Each process also writes predict's overlays of its rows:
  test_each_process_writes_its_own_rows_overlays.)"""
  return f'process_{process}' in path or bool(re.search(
      rf'/resized_\d+/\.(train|test)-[0-9a-f]{{8}}/((images|masks|labels)\.npy|paths-{process}\.json)$', path)
      or re.search(rf'/scratch-[a-z]+-[0-9a-f]{{8}}/(.*/)?[^/]*{process:05d}[^/]*(/[^/]+)?$', path)
      or re.search(rf'/features/[^/]+/\.?(rows|moments)-\d+-\d+\.p{process}\.npy(\.partial-[0-9a-f]+)?$', path))


def test_only_process_zero_writes_shared_files(normal_runs):
  """(e) Process 0 wrote the tfds data, config.json, metrics.json, heatmaps, curves, predictions and
  checkpoints' shared metadata, each once, and made the resized-image cache; process 1 wrote nothing
  but orbax's files named for it, its share of the resized images and its parts of the reduced
  passes (and still read the shared files: its run ended like process 0's)."""
  train, predict, run = normal_runs['2x2']
  writes = {p: [path for procs in (train, predict) for _, path in procs.audit(p)['writes']
               if '/toy/predict/heatmaps/' not in path] for p in (0, 1)}
  assert all(_own_files(path, 1) for path in writes[1]), [w for w in writes[1] if not _own_files(w, 1)]
  assert any('ocdbt' in w or 'array_metadatas' in w for w in writes[1])  # the audit does see process 1
  assert sum(w.endswith('images.npy') for w in writes[1]) == 2           # its rows of train and test
  mine = [os.path.relpath(w, run) for w in writes[0]]
  for expected in ('work/config.json', 'work/metrics.json', 'work/metrics.md', 'work/toy/image_roc.png',
                   'work/toy/predict/predictions.csv'):
    assert mine.count(expected) == 1, expected   # config.json: by the training command only
  assert sum('/heatmaps/' in w for w in mine) == 4               # evaluation's 4 (predict's: below)
  assert any(w.startswith('cache/tfds/') and w.endswith('dataset_info.json') for w in mine)
  assert sum(w.startswith('cache/tfds/') and w.endswith('images.npy') for w in mine) == 4  # made, its rows
  assert any(w.startswith('work/toy/checkpoints/') and '_CHECKPOINT_METADATA' in w for w in mine)
  # The training log and its TensorBoard events (training's, then evaluation's) are process 0's too.
  assert mine.count('work/toy/train_log.jsonl') > 0
  assert sum(w.startswith('work/toy/events.out.tfevents.') for w in mine) == 2
  # Every file the run left is one that a process wrote.
  assert (run / 'work/toy/checkpoints' / str(NORMAL_STEPS) / 'state' / 'ocdbt.process_1').is_dir()

def test_each_process_decodes_its_own_slice_and_no_feature_memo(normal_runs):
  """The feature cache's pass over the training images is split between the processes; the feature
  memo stays off on the 2x2 run (empty at the end) and is used by the 1x4 run."""
  (one, _, _), (two, _, _) = normal_runs['1x4'], normal_runs['2x2']
  assert_own_slices(two, one, ('Subset', 16))      # the feature cache's pass over the training split
  # Evaluation's pass over the test split: 5 + 4 rows, process 1's slice of the second batch all
  # padding (it decodes row 8 as a filler).
  assert assert_own_slices(two, one, ('ArraySource', 9)) == [5, 5]
  assert one.audit(0)['memo_bytes'] > 0
  assert two.audit(0)['memo_bytes'] == two.audit(1)['memo_bytes'] == 0


# Anomaly-aware training from images (synthetic cut-paste anomalies change every epoch, so the backbone
def test_killed_two_process_run_resumes_to_the_same_end(normal_runs, toy_root, tmp_path):
  """(d) Process 1 killed after a checkpoint: process 0 does not hang; it ends (exit 1) with one line
  naming the lost process, within multihost.lost_peer_bound_s (--distributed_timeout_s/3 + 2 beats:
  7 s here; + 5 s of slack for polling on a busy machine), well before JAX's own abort (2x the
  timeout). Process 1 restarted with another seed is refused by both (exit 2, nothing trained); both
  restarted: they resume at the step they name and end equal to the uninterrupted 2x2 run."""
  cache = normal_runs['2x2'][2] / 'cache'
  work = tmp_path / 'work'
  args = config_args(toy_root, cache, work, *NORMAL, '--mode=train')
  model_dir = work / 'toy'
  first = launch(tmp_path, 'killed', '2x2', args, tmp_path)
  with running(first):
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (not helpers.steps(model_dir) and time.monotonic() < deadline
           and all(p.poll() is None for p in first.procs)):
      time.sleep(0.02)
    first.kill(1)
    t0 = time.monotonic()
    code = first.procs[0].wait(DISTRIBUTED_TIMEOUT_S + 60)
    elapsed = time.monotonic() - t0
  output = first.output(0)
  assert code == 1 and elapsed < multihost.lost_peer_bound_s(DISTRIBUTED_TIMEOUT_S) + 5, \
      (code, elapsed, output[-3000:])
  assert last_line(output).startswith('adtr_jax: error: lost process 1 of 2: no heartbeat for '), \
      output[-3000:]
  assert 'Traceback' not in output and 'another task died' not in output, output[-3000:]
  steps = helpers.steps(model_dir)
  assert steps and steps[-1] < NORMAL_STEPS, (steps, output[-3000:])
  killed_at = steps[-1]

  mismatched = launch(tmp_path, 'mismatched', '2x2', args, tmp_path,
                      per_process=lambda i: ['--config.seed=1'] if i else [])
  with running(mismatched):
    assert mismatched.wait(RUN_TIMEOUT_S) == [2, 2]
  for i in (0, 1):
    assert last_line(mismatched.output(i)).startswith(
        'adtr_jax: error: processes [1] were started with another config, --workdir or --mode'), i
  assert helpers.steps(model_dir) == steps

  resumed = launch(tmp_path, 'resumed', '2x2', args, tmp_path)
  with running(resumed):
    resumed.check()
  for i in (0, 1):
    assert f'adtr_jax: resumed toy from step {killed_at}' in resumed.output(i), i
  uninterrupted = normal_runs['2x2'][2]
  assert_same_training(params_and_losses(work / 'toy', toy_root, cache),
                       params_and_losses(uninterrupted / 'work' / 'toy', toy_root, cache), NORMAL_STEPS)

def test_stacked_models_across_processes_train_as_they_would_alone(normal_runs, toy_root, tmp_path):
  """(c) Two stacked members (categories toy and toy2) on a 2 x 2 ('model', 'data') mesh, one model per
  process, each trained data-parallel on its process's 2 devices, equal the same models trained alone
  (toy: the 1x4 run of (a); toy2: a 1x4 run here). Parameters within 1e-4 (vmapped matmuls and another
  data-parallel width round differently: tests/test_stacked.py), losses within 1e-5 relative."""
  root = tmp_path / 'data'
  shutil.copytree(toy_root / 'toy', root / 'toy')
  make_toy_mvtec(tmp_path / 'toy2', n_train=26, seed=1)
  shutil.copytree(tmp_path / 'toy2' / 'toy', root / 'toy2')
  cache = tmp_path / 'cache'
  stacked = launch(tmp_path, 'stacked', '2x2', config_args(
      root, cache, tmp_path / 'stacked', *NORMAL, '--config.dataset.category=toy,toy2',
      '--config.train.stacked=True', '--config.train.model_axis=2', '--mode=train'), tmp_path)
  alone = launch(tmp_path, 'alone', '1x4', config_args(
      root, tmp_path / 'cache_alone', tmp_path / 'alone', *NORMAL, '--config.dataset.category=toy2',
      '--mode=train'), tmp_path)
  with running(stacked, alone):
    stacked.check()
    alone.check()
  one = normal_runs['1x4'][2]
  pairs = {'toy': params_and_losses(one / 'work' / 'toy', toy_root, one / 'cache'),
           'toy2': params_and_losses(tmp_path / 'alone' / 'toy2', root, cache)}
  for category, want in pairs.items():
    step, params, losses = params_and_losses(tmp_path / 'stacked' / category, root, cache)
    assert step == want[0] == NORMAL_STEPS and sorted(losses) == sorted(want[2])
    np.testing.assert_allclose([losses[s] for s in want[2]], list(want[2].values()), rtol=1e-5)
    for name, value in params.items():
      np.testing.assert_allclose(value, want[1][name], atol=1e-4, err_msg=f'{category} {name}')


# Each process computes, writes, reduces and stores only its own rows (issue 36).

def _feature_files(procs, process: int) -> list[str]:
  """Names of the feature cache files the process wrote (renamed into place), in order."""
  return [pathlib.Path(path).name for event, path in procs.audit(process)['writes']
          if '/features/' in path and event == 'os.rename' and not pathlib.Path(path).name.startswith('.')]


def _block(run: pathlib.Path, name: str) -> np.ndarray:
  [path] = (run / 'cache' / 'features').glob(f'*/{name}')
  return np.asarray(npy_rows.Rows(path, 'float32'))


def test_each_process_embeds_and_writes_only_its_own_feature_rows(normal_runs):
  """2x2 (device feed) and host (host feed): process 0 embeds rows [0, 8) of the training set and
  writes them, process 1 rows [8, 16); each decoded no other row for the feature pass, with no
  all-gather of features. Their files hold the rows of the one-process cache bit for bit (each device
  embeds the same share of each batch as on 1x4)."""
  one, _, run1 = normal_runs['1x4']
  assert _feature_files(one, 0) == ['moments-0-16.p0.npy', 'rows-0-16.p0.npy']
  whole = _block(run1, 'rows-0-16.p0.npy')
  for name in ('2x2', 'host'):
    two, _, run2 = normal_runs[name]
    assert _feature_files(two, 0) == ['moments-0-8.p0.npy', 'rows-0-8.p0.npy'], name
    assert _feature_files(two, 1) == ['moments-8-16.p1.npy', 'rows-8-16.p1.npy'], name
    np.testing.assert_array_equal(_block(run2, 'rows-0-8.p0.npy'), whole[:8])
    np.testing.assert_array_equal(_block(run2, 'rows-8-16.p1.npy'), whole[8:])
    feature_pass = [{r[-1] for r in batched_reads(two, p, ('Subset', 16)) if r[0] == 0} for p in (0, 1)]
    assert feature_pass == [set(range(8)), set(range(8, 16))], name


def test_each_process_keeps_the_moments_of_its_rows_and_all_merge_to_one_process(normal_runs):
  """Each block's moments file counts its own rows; process 0's and 1's merged give the one-process
  statistics (FeatureNorm's mean and std follow from them: the parameters are compared above)."""
  run1, run2 = normal_runs['1x4'][2], normal_runs['2x2'][2]
  part = lambda run, name: Moments.from_array(np.load(next((run / 'cache' / 'features').glob(f'*/{name}'))))
  a, b = part(run2, 'moments-0-8.p0.npy'), part(run2, 'moments-8-16.p1.npy')
  whole = part(run1, 'moments-0-16.p0.npy')
  assert a.count == b.count == whole.count // 2
  merged = Moments.combine([a, b])
  np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(merged.std, whole.std, rtol=1e-10)


def test_two_processes_train_from_the_host_feed_as_one_and_were_told_the_needs(normal_runs, toy_root):
  """The host feed, which reads the other process's block from the shared cache folder, trains 2x2
  as 1x4 (device feed) does; every run printed what it will need (preflight) before any work."""
  run1, run2 = normal_runs['1x4'][2], normal_runs['host'][2]
  assert_same_training(params_and_losses(run2 / 'work' / 'toy', toy_root, run2 / 'cache'),
                       params_and_losses(run1 / 'work' / 'toy', toy_root, run1 / 'cache'), NORMAL_STEPS)
  for name, (procs, _, _) in normal_runs.items():
    out = procs.output(0)
    assert 'adtr_jax: this run will need, per process:' in out and 'feature cache:' in out, name
    assert out.index('this run will need') < out.index('preparing'), name


def rows_per_process(n: int, processes: int) -> list[int]:
  """How many of n rows each process scores in a pass (split_pass deals each batch's rows in turn)."""
  order = split_pass.pass_order(n, BATCH, processes)
  b = BATCH // processes
  return [sum(len(order[start + p * b:start + (p + 1) * b]) for start in range(0, n, BATCH))
          for p in range(processes)]


def test_each_process_reduces_only_its_own_rows(normal_runs):
  """Rows added to the reducers (tests/multiprocess_audit counts them in each pass of
  inference.reduce_split) per process: 2x2 splits each pass between the processes (5 + 4 of the 9
  test images; 4 + 1 of the 5 predicted, one padded batch), 1x4 adds them all; no scratch folder is
  left. Each process's peak RSS is printed, not asserted: at this size JAX and compilation are nearly
  all of it (adtr_jax.scale_benchmark --scale_processes=2 measures it at larger N)."""
  assert rows_per_process(9, 2) == [5, 4] and rows_per_process(5, 2) == [4, 1]
  for stage, desc, n in ((0, 'eval toy', 9), (1, 'predict toy', 5)):
    for layout, (processes, _) in LAYOUTS.items():
      audits = [normal_runs[layout][stage].audit(p)['reduced'] for p in range(processes)]
      got = [[rows for d, rows in reduced if d == desc] for reduced in audits]
      assert got == [[rows] for rows in rows_per_process(n, processes)], (layout, desc, audits)
  for layout in LAYOUTS:
    assert not list(normal_runs[layout][2].rglob('scratch-*')), layout
  peaks = {layout: [round(normal_runs[layout][stage].audit(p)['peak_rss_kib'] / 1024)
                    for stage in (0, 1) for p in range(processes)]
           for layout, (processes, _) in LAYOUTS.items()}
  print(f'train_and_eval, then predict: peak RSS per process (MiB): {peaks}')


def test_each_process_writes_its_own_rows_overlays(normal_runs, toy_root):
  """predict's overlays of 2x2: each process wrote those of the rows it scored (dealt in turn), and
  process 0 alone wrote predictions.csv."""
  _, predicted, run = normal_runs['2x2']
  names = sorted(p.stem for p in (toy_root / PREDICTED).iterdir())
  order = split_pass.pass_order(len(names), BATCH, 2)
  mine = {0: {names[i] for i in order[:BATCH // 2]}, 1: {names[i] for i in order[BATCH // 2:BATCH]}}
  assert [len(mine[p]) for p in (0, 1)] == [4, 1]
  for p in (0, 1):
    writes = [w for _, w in predicted.audit(p)['writes']]
    overlays = {w.rsplit('/', 1)[1].split('_', 1)[1].removesuffix('.png') for w in writes
                if '/toy/predict/heatmaps/' in w}
    assert overlays == mine[p], p
    assert any(w.endswith('/toy/predict/predictions.csv') for w in writes) == (p == 0)
  assert len(list((run / 'work/toy/predict/heatmaps').iterdir())) == len(names)
