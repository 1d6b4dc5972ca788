"""Real multi-process runs: 2 JAX processes x 2 fake CPU devices on this machine (joined through
jax.distributed on 127.0.0.1, gloo collectives), compared with 1 process x 4 fake CPU devices on the
same global batch. Each process is the command a user runs, `python -m adtr_jax.main ...
--coordinator_address=127.0.0.1:<port> --num_processes=2 --process_id=<i>`;
tests/multiprocess_audit/sitecustomize.py records which files each process wrote and which rows it
decoded.

Tolerances: both layouts run the same XLA program on a 4-device ('model', 'data') mesh, but the
cross-device sums go through gloo (between processes) instead of in-process collectives, so they may
round differently: losses agree to 1e-5 relative and parameters to 1e-5 absolute after the whole run
(tests/test_train.py holds 8-way vs 1 device to the same), attention key biases to 1e-4
(assert_same_training says why), image scores to 1e-5 relative, overlays to 1/255, metrics to 1e-6.
Measured: losses 1e-7 relative, parameters < 1e-6 (key biases 3.5e-5), metrics identical. Control:
training moves the parameters by > 1e-2, so other batches or another seed would be far outside.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from adtr_jax import metrics, multihost, sharding
from adtr_jax.models.adtr import build_model
from tests import helpers
from tests.conftest import REPO, make_toy_mvtec, tiny_config

AUDIT = REPO / 'tests' / 'multiprocess_audit'
RUN_TIMEOUT_S = 400       # one CLI run on 2 busy cores, compilation included
DISTRIBUTED_TIMEOUT_S = 15   # --distributed_timeout_s: start-up wait and lost-peer detection


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Processes:
  """The processes of one run, each in its own process group (killed with it), output in files."""

  def __init__(self, tmp: pathlib.Path, tag: str):
    self.tmp, self.tag, self.procs, self.logs = tmp, tag, [], []

  def start(self, args: list[str], devices: int, process: int, audit_root: pathlib.Path):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               PYTHONPATH=os.pathsep.join([str(AUDIT), str(REPO)]),
               ADTR_TEST_AUDIT=str(self.audit_file(process)), ADTR_TEST_AUDIT_ROOT=str(audit_root))
    log = self.tmp / f'{self.tag}.{process}.log'
    self.logs.append(log)
    with log.open('w') as out:
      self.procs.append(subprocess.Popen([sys.executable, '-m', 'adtr_jax.main', *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

  def audit_file(self, process: int) -> pathlib.Path:
    return self.tmp / f'{self.tag}.{process}.audit.json'

  def audit(self, process: int) -> dict:
    return json.loads(self.audit_file(process).read_text())

  def output(self, process: int) -> str:
    return self.logs[process].read_text()

  def kill(self, process: int | None = None) -> None:
    for i, p in enumerate(self.procs):
      if process in (None, i) and p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Exit codes of all; the group is killed and the test fails when one runs past `timeout`."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'{self.tag} ran past {timeout} s:\n' + '\n'.join(
          self.output(i)[-3000:] for i in range(len(self.procs))))

  def check(self, timeout: float = RUN_TIMEOUT_S) -> None:
    codes = self.wait(timeout)
    assert codes == [0] * len(codes), '\n'.join(f'process {i} exit {c}:\n{self.output(i)[-4000:]}'
                                                 for i, c in enumerate(codes))


def launch(tmp: pathlib.Path, tag: str, layout: str, args: list[str], audit_root: pathlib.Path,
           per_process=lambda i: []) -> Processes:
  """Starts the CLI with `args` as `layout` ('1x4' or '2x2': processes x fake CPU devices each)."""
  n, devices = LAYOUTS[layout]
  procs = Processes(tmp, tag)
  port = _free_port()
  for i in range(n):
    dist = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}', f'--process_id={i}',
             f'--distributed_timeout_s={DISTRIBUTED_TIMEOUT_S}'] if n > 1 else [])
    procs.start([*args, *dist, *per_process(i)], devices, i, audit_root)
  return procs


@contextlib.contextmanager
def running(*started: Processes):
  """Kills whatever is still running when the block ends (a failed assertion included)."""
  try:
    yield started
  finally:
    for p in started:
      p.kill()


LAYOUTS = {'1x4': (1, 4), '2x2': (2, 2)}   # processes x fake CPU devices per process


def _config_args(root, cache, workdir, *extra) -> list[str]:
  return [f'--config=tests/tiny_config.py:{root}|{cache}', f'--workdir={workdir}', *extra]


# Normal-only training from the device feature cache: 16 training images (2 held out to calibrate),
# 2 steps of 8 per epoch, 30 steps; checkpoints every 4 (for the kill-and-resume test).
NORMAL = ['--config.train.num_epochs=15', '--config.train.checkpoint_every_steps=4']
NORMAL_STEPS = 30


@pytest.fixture(scope='module')
def normal_runs(toy_root, tmp_path_factory):
  """(a): train_and_eval, then predict on the anomalous test images, as 1x4 and as 2x2, each with its
  own fresh cache and workdir (so the 2x2 run prepares the shared files itself).
  -> {layout: (train Processes, predict Processes, run dir)}."""
  runs = {layout: tmp_path_factory.mktemp(f'normal_{layout}') for layout in LAYOUTS}
  args = {layout: _config_args(toy_root, tmp / 'run' / 'cache', tmp / 'run' / 'work', *NORMAL)
          for layout, tmp in runs.items()}
  trained = [launch(tmp, layout, layout, args[layout], tmp / 'run') for layout, tmp in runs.items()]
  with running(*trained):
    for procs in trained:
      procs.check()
  predicted = [launch(tmp, f'{layout}_predict', layout,
                      [*args[layout], '--mode=predict', f'--predict_dir={toy_root / "toy/test/square"}'],
                      tmp / 'run') for layout, tmp in runs.items()]
  with running(*predicted):
    for procs in predicted:
      procs.check()
  return {layout: (t, p, runs[layout] / 'run') for (layout, t, p) in zip(runs, trained, predicted)}


def _params_and_losses(workdir: pathlib.Path, root, cache):
  """(final step, parameter leaves by name, {step: last logged loss})."""
  config = tiny_config(root, cache)
  step, leaves, _ = helpers.params(config, workdir, sharding.make_mesh(jax.devices()[:1]))
  losses = {}
  for line in (workdir / 'train_log.jsonl').read_text().splitlines():
    record = json.loads(line)
    losses[record['step']] = record['loss']   # a resumed run logs its replayed steps again
  return step, leaves, losses


def assert_same_training(got, want, steps: int):
  """Same final step and loss curve (rtol 1e-5); parameters within 1e-5, but attention key biases
  within 1e-4: their true gradient is zero (softmax ignores a shift shared by all keys), so Adam's
  normalised steps follow the rounding noise of the sums (measured 1x4 vs 2x2: 3.5e-5 there, < 1e-6
  everywhere else)."""
  (step1, params1, losses1), (step2, params2, losses2) = got, want
  assert step1 == step2 == steps and sorted(losses1) == sorted(losses2) == list(range(1, steps + 1))
  np.testing.assert_allclose([losses1[s] for s in losses2], list(losses2.values()), rtol=1e-5)
  assert params1.keys() == params2.keys()
  for name, value in params1.items():
    np.testing.assert_allclose(value, params2[name], atol=1e-4 if "['key']['bias']" in name else 1e-5,
                               err_msg=name)


def test_two_processes_train_and_evaluate_as_one(normal_runs, toy_root):
  """(a) Final parameters, the loss curve and metrics.json of 2x2 equal 1x4's. Control: training moved
  the parameters by far more than the tolerance."""
  one, two = normal_runs['1x4'][2], normal_runs['2x2'][2]
  want = _params_and_losses(one / 'work' / 'toy', toy_root, one / 'cache')
  assert_same_training(_params_and_losses(two / 'work' / 'toy', toy_root, two / 'cache'), want, NORMAL_STEPS)
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


def _panels(heatmap_dir: pathlib.Path, images: dict) -> dict:
  """{image its first panel shows (found by content): (file name, overlay panel)}. Asserts that the
  file name names that same image."""
  out = {}
  for path in sorted(heatmap_dir.glob('*.png')):
    panel = np.asarray(Image.open(path))
    size = panel.shape[0]
    shown = [name for name, image in images.items() if np.array_equal(panel[:, :size], image)]
    assert len(shown) == 1, (path.name, shown)
    assert path.stem.endswith('_' + shown[0].split('/')[1]), (path.name, shown)
    assert ('normal' in path.name) == shown[0].startswith('good/'), (path.name, shown)
    out[shown[0]] = (path.name, panel[:, -size:].astype(int))
  return out


def test_heatmaps_and_predictions_pair_each_image_with_its_own_map(normal_runs, toy_root):
  """Evaluation's heatmaps and predict's overlays show, beside each image, the same score map as the
  1x4 run's panel of that image (images matched by content, not by position or rank; overlays within
  1 of 255 per pixel, from rounding). predictions.csv: same files, decisions and scores (rtol 1e-5)."""
  images = _test_images(toy_root)
  for sub in ('work/toy/heatmaps', 'work/toy/predict/heatmaps'):
    one = _panels(normal_runs['1x4'][2] / sub, images)
    two = _panels(normal_runs['2x2'][2] / sub, images)
    assert one.keys() == two.keys() and len(one) >= 4
    for name in one:
      assert np.abs(one[name][1] - two[name][1]).max() <= 1, name
  rows = {layout: list(csv.DictReader((run[2] / 'work/toy/predict/predictions.csv').open()))
          for layout, run in normal_runs.items()}
  assert [r['path'] for r in rows['2x2']] == [r['path'] for r in rows['1x4']] and len(rows['1x4']) == 4
  assert [r['decision'] for r in rows['2x2']] == [r['decision'] for r in rows['1x4']]
  np.testing.assert_allclose([float(r['image_score']) for r in rows['2x2']],
                             [float(r['image_score']) for r in rows['1x4']], rtol=1e-5)


def _own_files(path: str, process: int) -> bool:
  """Orbax's per-process parts of a checkpoint (array metadata, OCDBT shards) are named for the
  process that writes them; a process writes its share of the resized images into the image cache's
  temporary folder (<split>-<token>), and their paths into paths-<process>.json there; and its block
  of the feature cache (rows and moments files named for it, written under hidden names first)."""
  return f'process_{process}' in path or bool(re.search(
      rf'/resized_\d+/\.(train|test)-[0-9a-f]{{8}}/((images|masks|labels)\.npy|paths-{process}\.json)$', path)
      or re.search(rf'/features/[^/]+/\.?(rows|moments)-\d+-\d+\.p{process}\.npy(\.partial-[0-9a-f]+)?$', path))


def test_only_process_zero_writes_shared_files(normal_runs):
  """(e) Process 0 wrote the tfds data, config.json, metrics.json, heatmaps, curves, predictions and
  checkpoints' shared metadata, each once, and made the resized-image cache; process 1 wrote nothing
  but orbax's files named for it and its share of the resized images (and still read the shared
  files: its run ended like process 0's)."""
  train, predict, run = normal_runs['2x2']
  writes = {p: [path for procs in (train, predict) for _, path in procs.audit(p)['writes']] for p in (0, 1)}
  assert all(_own_files(path, 1) for path in writes[1]), [w for w in writes[1] if not _own_files(w, 1)]
  assert any('ocdbt' in w or 'array_metadatas' in w for w in writes[1])  # the audit does see process 1
  assert sum(w.endswith('images.npy') for w in writes[1]) == 2           # its rows of train and test
  mine = [os.path.relpath(w, run) for w in writes[0]]
  for expected in ('work/config.json', 'work/metrics.json', 'work/metrics.md', 'work/toy/image_roc.png',
                   'work/toy/predict/predictions.csv'):
    assert mine.count(expected) == (2 if expected == 'work/config.json' else 1), expected  # 2 commands
  assert sum('/heatmaps/' in w for w in mine) == 4 + 4            # evaluation's 4, predict's 4 images
  assert any(w.startswith('cache/tfds/') and w.endswith('dataset_info.json') for w in mine)
  assert sum(w.startswith('cache/tfds/') and w.endswith('images.npy') for w in mine) == 4  # made, its rows
  assert any(w.startswith('work/toy/checkpoints/') and '_CHECKPOINT_METADATA' in w for w in mine)
  # The training log and its TensorBoard events (training's, then evaluation's) are process 0's too.
  assert mine.count('work/toy/train_log.jsonl') > 0
  assert sum(w.startswith('work/toy/events.out.tfevents.') for w in mine) == 2
  # Every file the run left is one that a process wrote.
  assert (run / 'work/toy/checkpoints' / str(NORMAL_STEPS) / 'state' / 'ocdbt.process_1').is_dir()


def _batched_reads(procs: Processes, process: int, kind: tuple) -> list[tuple]:
  return [tuple(r) for r in procs.audit(process)['reads'] if tuple(r[1:3]) == kind]


def assert_own_slices(two: Processes, one: Processes, kind: tuple) -> list[int]:
  """Each process decoded only its own slice of every batch: the two processes' reads from sources
  `kind` (type name, length) are disjoint within each pass over the data (one call of
  pipeline.batches) and together they are the 1x4 process's reads.
  Returns each process's number of reads."""
  got = [_batched_reads(two, p, kind) for p in (0, 1)]
  assert sorted(got[0] + got[1]) == sorted(_batched_reads(one, 0, kind)) and got[0] and got[1]
  assert not {r for r in got[0]} & {r for r in got[1]}
  return [len(g) for g in got]


def test_each_process_decodes_its_own_slice_and_no_feature_memo(normal_runs):
  """The feature cache's pass over the training images is split between the processes; the feature
  memo stays off on the 2x2 run (empty at the end) and is used by the 1x4 run."""
  (one, _, _), (two, _, _) = normal_runs['1x4'], normal_runs['2x2']
  assert_own_slices(two, one, ('Subset', 16))      # the feature cache's pass over the training split
  assert_own_slices(two, one, ('ArraySource', 8))  # evaluation's pass over the test split
  assert one.audit(0)['memo_bytes'] > 0
  assert two.audit(0)['memo_bytes'] == two.audit(1)['memo_bytes'] == 0


# Anomaly-aware training from images (synthetic cut-paste anomalies change every epoch, so the backbone
# runs on every batch): 16 normal rows + 5 anomalous slots, 2 steps of 8 per epoch, 4 steps.
ANOMALIES = ['--config.anomalies.synthetic=cutpaste', '--config.loss.type=pixel', '--mode=train']
ANOMALY_STEPS = 4


@pytest.fixture(scope='module')
def anomaly_runs(toy_root, tmp_path_factory):
  """(b): training from images with synthetic anomalies, as 1x4 and as 2x2. -> {layout: (Processes, run dir)}."""
  runs = {layout: tmp_path_factory.mktemp(f'anomalies_{layout}') / 'run' for layout in LAYOUTS}
  procs = {layout: launch(run.parent, layout, layout,
                          _config_args(toy_root, run / 'cache', run / 'work', *ANOMALIES), run)
           for layout, run in runs.items()}
  with running(*procs.values()):
    for p in procs.values():
      p.check()
  return {layout: (procs[layout], runs[layout]) for layout in LAYOUTS}


def test_anomaly_training_reads_own_slices_and_equals_one_process(anomaly_runs, toy_root):
  """(b) Each process decoded only its half of every global batch of the mixed (normal + synthetic)
  training set, and the result equals 1x4's (tolerances: assert_same_training)."""
  (one, run1), (two, run2) = anomaly_runs['1x4'], anomaly_runs['2x2']
  # The feature-statistics pass (21 rows in batches of 8: process 1's part of the last batch is one
  # row and padding) and 4 training steps of 4 rows each.
  assert assert_own_slices(two, one, ('MixedSource', 21)) == [12 + 16, 9 + 16]
  assert_same_training(_params_and_losses(run2 / 'work' / 'toy', toy_root, run2 / 'cache'),
                       _params_and_losses(run1 / 'work' / 'toy', toy_root, run1 / 'cache'), ANOMALY_STEPS)


def _last_line(text: str) -> str:
  """The last line the program printed; gloo's C++ logging ('[Gloo] ...') can come after it, from the
  collectives' own thread as the process shuts down."""
  lines = [line for line in text.splitlines() if line.strip() and not line.startswith('[Gloo]')]
  return lines[-1] if lines else ''


def test_killed_two_process_run_resumes_to_the_same_end(normal_runs, toy_root, tmp_path):
  """(d) Process 1 killed after a checkpoint: process 0 does not hang; it ends (exit 1) with one line
  naming the lost process, within multihost.lost_peer_bound_s (--distributed_timeout_s/3 + 2 beats:
  7 s here; + 5 s of slack for polling on a busy machine), well before JAX's own abort (2x the
  timeout). Process 1 restarted with another seed is refused by both (exit 2, nothing trained); both
  restarted: they resume at the step they name and end equal to the uninterrupted 2x2 run."""
  cache = normal_runs['2x2'][2] / 'cache'
  work = tmp_path / 'work'
  args = _config_args(toy_root, cache, work, *NORMAL, '--mode=train')
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
  assert _last_line(output).startswith('adtr_jax: error: lost process 1 of 2: no heartbeat for '), \
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
    assert _last_line(mismatched.output(i)).startswith(
        'adtr_jax: error: processes [1] were started with another config, --workdir or --mode'), i
  assert helpers.steps(model_dir) == steps

  resumed = launch(tmp_path, 'resumed', '2x2', args, tmp_path)
  with running(resumed):
    resumed.check()
  for i in (0, 1):
    assert f'adtr_jax: resumed toy from step {killed_at}' in resumed.output(i), i
  uninterrupted = normal_runs['2x2'][2]
  assert_same_training(_params_and_losses(work / 'toy', toy_root, cache),
                       _params_and_losses(uninterrupted / 'work' / 'toy', toy_root, cache), NORMAL_STEPS)


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
  stacked = launch(tmp_path, 'stacked', '2x2', _config_args(
      root, cache, tmp_path / 'stacked', *NORMAL, '--config.dataset.category=toy,toy2',
      '--config.train.stacked=True', '--config.train.model_axis=2', '--mode=train'), tmp_path)
  alone = launch(tmp_path, 'alone', '1x4', _config_args(
      root, tmp_path / 'cache_alone', tmp_path / 'alone', *NORMAL, '--config.dataset.category=toy2',
      '--mode=train'), tmp_path)
  with running(stacked, alone):
    stacked.check()
    alone.check()
  one = normal_runs['1x4'][2]
  pairs = {'toy': _params_and_losses(one / 'work' / 'toy', toy_root, one / 'cache'),
           'toy2': _params_and_losses(tmp_path / 'alone' / 'toy2', root, cache)}
  for category, want in pairs.items():
    step, params, losses = _params_and_losses(tmp_path / 'stacked' / category, root, cache)
    assert step == want[0] == NORMAL_STEPS and sorted(losses) == sorted(want[2])
    np.testing.assert_allclose([losses[s] for s in want[2]], list(want[2].values()), rtol=1e-5)
    for name, value in params.items():
      np.testing.assert_allclose(value, want[1][name], atol=1e-4, err_msg=f'{category} {name}')


@pytest.mark.parametrize('flags,message', [
    (['--coordinator_address=127.0.0.1:9', '--num_processes=2', '--process_id=2'],
     '--process_id=2 must be in [0, --num_processes=2)'),
    (['--num_processes=2'], '--coordinator_address, --num_processes and --process_id go together'),
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=1'],
     "--coordinator_address='localhost' must be host:port"),
    (['--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
      '--distributed_timeout_s=2'],
     'the coordinator --coordinator_address=127.0.0.1:{port} did not answer within 2 s'),
])
def test_bad_distributed_flags_are_one_line_errors(toy_root, tmp_path, flags, message):
  """Exit status 2 and one line naming the flag; a coordinator that never answers (nothing listens on
  the port) is reported after --distributed_timeout_s, not by an abort of the interpreter."""
  port = _free_port()
  flags = [f.format(port=port) for f in flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, '-m', 'adtr_jax.main',
                         *_config_args(toy_root, tmp_path / 'cache', tmp_path / 'work'), *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert _last_line(proc.stderr).startswith('adtr_jax: error: ' + message.format(port=port))
  assert time.monotonic() - t0 < 60
