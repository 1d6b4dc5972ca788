"""Evaluation and predict on 2 real processes (2 x 2 fake CPU devices, the CLI a user runs, as in
tests/test_multiprocess.py) against 1 process x 4 devices, on one trained checkpoint: each process
hands only its own rows to the reductions (tests/multiprocess_audit counts the rows each process adds
in each pass of inference.reduce_split) and writes only its own rows' overlays, and the results equal
the one-process run's. The toy test split has 9 images (a padded second batch of 8) and predict's
folder 5 (one padded batch), so the processes' shares differ.

Each process's peak RSS (ru_maxrss at exit) is printed, not asserted: at this size JAX and compilation
are nearly all of it (adtr_jax.scale_benchmark --scale_processes=2 measures it at larger N)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from adtr_jax import metrics, split_pass
from tests.conftest import make_toy_mvtec
from tests.multiprocess_runs import LAYOUTS, config_args, launch, running
from tests.test_multiprocess import _panels, _test_images

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

BATCH = 8   # tests/tiny_config.py's eval.batch_size


def rows_per_process(n: int, processes: int) -> list[int]:
  """How many of n rows each process scores in a pass (split_pass deals each batch's rows in turn)."""
  order = split_pass.pass_order(n, BATCH, processes)
  b = BATCH // processes
  return [sum(len(order[start + p * b:start + (p + 1) * b]) for start in range(0, n, BATCH))
          for p in range(processes)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A model trained once (1 x 4); its workdir copied for each layout, which evaluates it and predicts
  the 5 normal test images. -> (toy root, {layout: (eval Processes, predict Processes, workdir)})."""
  tmp = tmp_path_factory.mktemp('memory')
  root = make_toy_mvtec(tmp / 'data', n_good=5)
  cache = tmp / 'cache'
  trained = launch(tmp, 'train', '1x4', config_args(root, cache, tmp / 'trained', '--mode=train'), tmp)
  with running(trained):
    trained.check()
  out = {}
  for layout in LAYOUTS:
    work = tmp / layout
    shutil.copytree(tmp / 'trained', work)
    evaluated = launch(tmp, f'{layout}_eval', layout, config_args(root, cache, work, '--mode=eval'), tmp)
    with running(evaluated):
      evaluated.check()
    predicted = launch(tmp, f'{layout}_predict', layout, config_args(
        root, cache, work, '--mode=predict', f'--predict_dir={root / "toy/test/good"}'), tmp)
    with running(predicted):
      predicted.check()
    out[layout] = (evaluated, predicted, work)
  return root, out


def _overlays(folder, images) -> dict:
  """{overlay file name: its score-map panel}, asserting that its first panel shows the image its name
  names (<decision>_<stem>.png: pairs each image with its own map)."""
  out = {}
  for path in sorted(folder.glob('*.png')):
    panel = np.asarray(Image.open(path)).astype(int)
    image = np.asarray(Image.open(images / f'{path.stem.split("_", 1)[1]}.png').convert('RGB'))
    size = image.shape[0]
    assert np.array_equal(panel[:, :size], image), path.name
    out[path.name] = panel[:, -size:]
  return out


def test_each_process_reduces_only_its_own_rows(runs):
  """Rows added to the reducers per process: 2 x 2 splits each pass between the processes (5 + 4 of
  the 9 test images; 4 + 1 of the 5 predicted, one padded batch), 1 x 4 adds them all; peak RSS
  printed."""
  _, out = runs
  for stage, desc, n in ((0, 'eval toy', 9), (1, 'predict toy', 5)):
    for layout, (processes, _) in LAYOUTS.items():
      got = [out[layout][stage].audit(p)['reduced'] for p in range(processes)]
      assert got == [[[desc, rows]] for rows in rows_per_process(n, processes)], (layout, got)
  assert rows_per_process(9, 2) == [5, 4] and rows_per_process(5, 2) == [4, 1]
  peaks = {layout: [round(out[layout][0].audit(p)['peak_rss_kib'] / 1024) for p in range(processes)]
           for layout, (processes, _) in LAYOUTS.items()}
  print(f'evaluation peak RSS per process (MiB): {peaks}')


def test_two_processes_evaluate_and_predict_as_one(runs):
  """metrics.json within 1e-6; the same heatmaps, each pairing an image with its own map (within
  1/255); predictions.csv with the same files and decisions; no scratch folder left."""
  root, out = runs
  (_, _, one), (_, _, two) = out['1x4'], out['2x2']
  m1 = json.loads((one / 'metrics.json').read_text())['categories']['toy']
  m2 = json.loads((two / 'metrics.json').read_text())['categories']['toy']
  assert m1['num_test_images'] == m2['num_test_images'] == 9
  for key in metrics.METRIC_KEYS:
    assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
  a, b = _panels(one / 'toy/heatmaps', _test_images(root)), _panels(two / 'toy/heatmaps', _test_images(root))
  assert a.keys() == b.keys() and len(a) >= 4
  for name in a:
    assert a[name][0] == b[name][0] and np.abs(a[name][1] - b[name][1]).max() <= 1, name
  a, b = (_overlays(w / 'toy/predict/heatmaps', root / 'toy/test/good') for w in (one, two))
  assert a.keys() == b.keys() and len(a) == 5
  for name in a:
    assert np.abs(a[name] - b[name]).max() <= 1, name
  rows = [list(csv.DictReader((w / 'toy/predict/predictions.csv').open())) for w in (one, two)]
  assert [r['path'] for r in rows[1]] == [r['path'] for r in rows[0]] and len(rows[0]) == 5
  assert [r['decision'] for r in rows[1]] == [r['decision'] for r in rows[0]]
  np.testing.assert_allclose([float(r['image_score']) for r in rows[1]],
                             [float(r['image_score']) for r in rows[0]], rtol=1e-5)
  assert not list(two.rglob('scratch-*')) and not list(one.rglob('scratch-*'))


def test_each_process_writes_its_own_rows_overlays(runs):
  """predict's overlays of 2 x 2: each process wrote those of the rows it scored (dealt in turn), and
  process 0 alone wrote predictions.csv."""
  root, out = runs
  predicted, work = out['2x2'][1], out['2x2'][2]
  names = sorted(p.stem for p in (root / 'toy/test/good').iterdir())
  order = split_pass.pass_order(len(names), BATCH, 2)
  mine = {0: {names[i] for i in order[:BATCH // 2]}, 1: {names[i] for i in order[BATCH // 2:BATCH]}}
  for p in (0, 1):
    writes = [w for _, w in predicted.audit(p)['writes']]
    overlays = {w.rsplit('/', 1)[1].split('_', 1)[1].removesuffix('.png') for w in writes
                if '/toy/predict/heatmaps/' in w}
    assert overlays == mine[p], p
    assert any(w.endswith('/toy/predict/predictions.csv') for w in writes) == (p == 0)
  assert len(list((work / 'toy/predict/heatmaps').iterdir())) == len(names)
