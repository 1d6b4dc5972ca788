"""The fault campaign (issue 35): runs SIGKILLed at many moments, each resumed by the same command, end
with the parameters, threshold and metrics of the uninterrupted run, and log every step once.

The moments are adtr_jax.faults' failpoints: data preparation ('prepare': tfds writing; 'resize': the
image cache), the feature cache ('feature'), a chunk of training steps ('chunk'), a checkpoint save in
flight ('save'; for a stacked pair, after the first member's save and before the second's),
calibration ('calibrate') and evaluation ('eval'). Which occurrence of each moment is hit is drawn
from a seeded generator (SEED), and the test prints the moments it hit. One model, a stacked pair, and
two processes (process 1 killed during a save) are covered.
"""
import json

import numpy as np
import pytest

from tests import helpers
from tests.conftest import make_two_toys, tiny_config
from tests.multiprocess_runs import config_args, launch, running
from tests.test_summaries import read_events

SEED = 35
# moment -> the largest occurrence to draw (each is reached at least that often in one life here).
SINGLE = {'prepare': 20, 'resize': 2, 'feature': 2, 'chunk': 3, 'save': 1, 'calibrate': 1, 'eval': 1}
STACKED = {'feature': 2, 'chunk': 3, 'save': 1, 'calibrate': 1}
FLAGS = ['--config.train.num_epochs=4', '--config.train.checkpoint_every_steps=2',
         '--config.train.max_checkpoints=1', '--mode=train_and_eval']


def _life(args, moment: str, n: int, monkeypatch) -> str:
  """One run of the CLI killed at the n-th `moment`; returns what it printed."""
  monkeypatch.setenv('ADTR_JAX_KILL_AT', f'{moment}:{n}')
  proc = helpers.cli(args)
  out, _ = proc.communicate(timeout=600)
  monkeypatch.delenv('ADTR_JAX_KILL_AT')
  assert proc.returncode == -9 and f'adtr_jax: fault: killed at {moment}:{n}' in out, (
      f'not killed at {moment}:{n} (exit {proc.returncode}):\n{out[-3000:]}')
  return out


def _complete(args) -> str:
  proc = helpers.cli(args)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


def _assert_same_end(config, run, straight, categories):
  """Same parameters (same process layout: same arithmetic), threshold and metrics; every step logged
  once in the JSONL and in TensorBoard."""
  for cat in categories:
    step_r, p_run, r_run = helpers.params(config, run / cat)
    step_s, p_straight, r_straight = helpers.params(config, straight / cat)
    assert step_r == step_s and helpers.max_diff(p_run, p_straight) <= 1e-6, cat
    assert r_run.meta.get('calibration') == r_straight.meta.get('calibration'), cat
    steps = [json.loads(line)['step'] for line in (run / cat / 'train_log.jsonl').read_text().splitlines()]
    assert steps == list(range(1, step_r + 1)), (cat, steps)
    scalars, _ = read_events(run / cat)
    assert [s for s, _ in scalars['train/loss']] == steps, cat
  got, want = (json.loads((w / 'metrics.json').read_text())['categories'] for w in (run, straight))
  for cat in categories:
    for key, value in want[cat].items():
      if isinstance(value, float):
        assert got[cat][key] == pytest.approx(value, abs=1e-6), (cat, key)


@pytest.mark.slow
def test_one_model_survives_a_kill_at_every_moment(toy_root, tmp_path, monkeypatch, capsys):
  rng = np.random.default_rng(SEED)
  args = [f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "cache"}', f'--workdir={tmp_path / "run"}',
          *FLAGS]
  hit = []
  for moment, most in SINGLE.items():
    n = int(rng.integers(1, most + 1))
    _life(args, moment, n, monkeypatch)
    hit.append(f'{moment}:{n}')
  _complete(args)
  _complete([f'--config=tests/tiny_config.py:{toy_root}|{tmp_path / "cache"}',
             f'--workdir={tmp_path / "straight"}', *FLAGS])
  config = tiny_config(toy_root, tmp_path / 'cache')
  _assert_same_end(config, tmp_path / 'run', tmp_path / 'straight', ['toy'])
  with capsys.disabled():
    print(f'\nfault campaign, one model: killed at {", ".join(hit)}')


@pytest.mark.slow
def test_a_stacked_pair_survives_a_kill_at_every_moment(tmp_path, monkeypatch, capsys):
  root = make_two_toys(tmp_path)
  stacked = ['--config.dataset.category=toy,toy2', '--config.train.stacked=True']
  args = [f'--config=tests/tiny_config.py:{root}|{tmp_path / "cache"}', f'--workdir={tmp_path / "run"}',
          *FLAGS, *stacked]
  rng = np.random.default_rng(SEED + 1)
  hit = []
  for moment, most in STACKED.items():
    n = int(rng.integers(1, most + 1))
    _life(args, moment, n, monkeypatch)
    hit.append(f'{moment}:{n}')
    if moment == 'save':   # killed with the first member's save in flight, the second's not started
      hit[-1] += f' (saved steps then: toy {helpers.steps(tmp_path / "run" / "toy")}, toy2 ' \
                 f'{helpers.steps(tmp_path / "run" / "toy2")})'
  _complete(args)
  _complete([f'--config=tests/tiny_config.py:{root}|{tmp_path / "cache"}', f'--workdir={tmp_path / "straight"}',
             *FLAGS, *stacked])
  config = tiny_config(root, tmp_path / 'cache')
  _assert_same_end(config, tmp_path / 'run', tmp_path / 'straight', ['toy', 'toy2'])
  with capsys.disabled():
    print(f'\nfault campaign, stacked pair: killed at {", ".join(hit)}')


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_survive_a_kill_of_one_during_a_save(toy_root, tmp_path, monkeypatch, capsys):
  """Process 1 is killed inside its second checkpoint save (step 4; step 2 is complete); process 0
  ends with the one-line lost-peer error; both started again resume from step 2 and end as the
  uninterrupted two-process run."""
  args = lambda work: config_args(toy_root, tmp_path / 'cache', work, *FLAGS)
  straight = launch(tmp_path, 'straight', '2x2', args(tmp_path / 'straight'), tmp_path)
  with running(straight):
    straight.check()
  monkeypatch.setenv('ADTR_JAX_KILL_AT', 'save:2@1')
  killed = launch(tmp_path, 'killed', '2x2', args(tmp_path / 'run'), tmp_path)
  with running(killed):
    codes = killed.wait()
  monkeypatch.delenv('ADTR_JAX_KILL_AT')
  assert codes[1] == -9 and 'adtr_jax: fault: killed at save:2' in killed.output(1), killed.output(1)[-3000:]
  assert codes[0] == 1 and 'lost process 1 of 2' in killed.output(0), killed.output(0)[-3000:]
  resumed = launch(tmp_path, 'resumed', '2x2', args(tmp_path / 'run'), tmp_path)
  with running(resumed):
    resumed.check()
  assert 'resumed toy from step 2' in resumed.output(0)
  config = tiny_config(toy_root, tmp_path / 'cache')
  _assert_same_end(config, tmp_path / 'run', tmp_path / 'straight', ['toy'])
  with capsys.disabled():
    print('\nfault campaign, two processes: process 1 killed at save:2')
