"""Multi-process anomaly-aware training from images (tests/multiprocess_runs.py has the set-up and the
tolerances): each process decodes its own half of every batch of normal and synthetic-anomaly rows, and
2 processes x 2 devices train as 1 process x 4 devices."""
from __future__ import annotations

import pytest

from tests.multiprocess_runs import (LAYOUTS, assert_own_slices, assert_same_training, config_args, launch,
                                     params_and_losses, running)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


ANOMALIES = ['--config.anomalies.synthetic=cutpaste', '--config.loss.type=pixel', '--mode=train']
ANOMALY_STEPS = 4


@pytest.fixture(scope='module')
def anomaly_runs(toy_root, tmp_path_factory):
  """(b): training from images with synthetic anomalies, as 1x4 and as 2x2. -> {layout: (Processes, run dir)}."""
  runs = {layout: tmp_path_factory.mktemp(f'anomalies_{layout}') / 'run' for layout in LAYOUTS}
  procs = {layout: launch(run.parent, layout, layout,
                          config_args(toy_root, run / 'cache', run / 'work', *ANOMALIES), run)
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
  assert_same_training(params_and_losses(run2 / 'work' / 'toy', toy_root, run2 / 'cache'),
                       params_and_losses(run1 / 'work' / 'toy', toy_root, run1 / 'cache'), ANOMALY_STEPS)
