"""Multi-host logic, by simulating process indices: shared preparation order and index-paired scores."""
import jax
import numpy as np
import pytest

from adtr_jax import multihost, sharding, split_pass, train_state
from adtr_jax.data import datasets
from adtr_jax.models.adtr import SplitModel, build_model
from tests import helpers
from tests.conftest import tiny_config


@pytest.mark.parametrize('index,count,want', [(0, 1, ['fn']), (0, 4, ['fn', 'sync']),
                                              (3, 4, ['sync', 'fn'])])
def test_process_zero_prepares_before_the_others_read(monkeypatch, index, count, want):
  events = []
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  from jax.experimental import multihost_utils
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', lambda name: events.append('sync'))
  assert multihost.first_then_others(lambda: events.append('fn') or 'data', 'test') == 'data'
  assert events == want


def test_scores_are_paired_with_their_rows_by_index(toy_root, tmp_path, monkeypatch):
  """Feed the test split in a scrambled row order (as a different process layout would): every map
  and score still lands on its own row, so the results equal those of the ordered pass."""
  config = tiny_config(toy_root, tmp_path / 'cache')
  mesh = sharding.make_mesh()
  test = datasets.load_category(config, 'toy').test
  model, _ = build_model(config)  # untrained: its scores still differ from image to image
  graphdef, state, frozen = train_state.init_state(model, config.train)
  model = SplitModel(graphdef, state.params, frozen)
  ordered = helpers.score_rows(config, test, model, mesh, 'ordered')
  scrambled_order = np.random.default_rng(0).permutation(len(test))
  monkeypatch.setattr(split_pass, 'pass_order', lambda n, batch_size, parts: scrambled_order)
  scrambled = helpers.score_rows(config, test, model, mesh, 'scrambled')
  assert not np.array_equal(scrambled_order, np.arange(len(test)))
  for key in ('scores', 'labels', 'index', 'masks'):
    np.testing.assert_array_equal(scrambled[key], ordered[key])
  np.testing.assert_allclose(scrambled['maps'], ordered['maps'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('n,batch_size,parts,want', [
    (8, 8, 1, [0, 1, 2, 3, 4, 5, 6, 7]),
    (8, 4, 2, [0, 2, 1, 3, 4, 6, 5, 7]),
    (7, 4, 2, [0, 2, 1, 3, 4, 6, 5]),          # the last batch is padded after row 5
    (8, 8, 4, [0, 4, 1, 5, 2, 6, 3, 7])])
def test_a_pass_deals_each_batch_s_rows_to_the_slices_in_turn(n, batch_size, parts, want):
  """Slice p of a batch (positions [p*b, (p+1)*b)) gets its rows p, p + parts, ...: on several
  processes, a result's gathered position is not its row, so pairing must go by the index."""
  assert split_pass.pass_order(n, batch_size, parts).tolist() == want


def _watchdog(monkeypatch, count: int):
  """A watchdog of process 0 with --distributed_timeout_s=15 (a peer is lost after 5 s), its verdicts
  recorded instead of ending the process; -> (watchdog, its start time, key prefix, verdicts)."""
  verdicts = []
  monkeypatch.setattr(multihost, '_lost', lambda message, watchdog: verdicts.append(message))
  watchdog = multihost._Watchdog(client=None, me=0, count=count, timeout_s=15)
  return watchdog, watchdog.beats[1][1], multihost._KEY, verdicts


def test_the_watchdog_names_a_silent_peer_not_one_that_finished(monkeypatch):
  watchdog, t, key, verdicts = _watchdog(monkeypatch, 3)
  watchdog.check({f'{key}/beat/1': '1', f'{key}/beat/2': '1'}, t + 1)
  watchdog.check({f'{key}/beat/1': '1', f'{key}/beat/2': '2', f'{key}/left/1': 'ok'}, t + 2)
  assert watchdog.all_well_since(t + 1.5) and not watchdog.all_well_since(t + 2.5)
  watchdog.check({f'{key}/beat/1': '1', f'{key}/beat/2': '2', f'{key}/left/1': 'ok'}, t + 6.9)
  assert verdicts == []   # process 2 silent for 4.9 s, process 1 finished
  watchdog.check({f'{key}/beat/1': '1', f'{key}/beat/2': '2', f'{key}/left/1': 'ok'}, t + 7.5)
  assert verdicts == ['lost process 2 of 3: no heartbeat for 6 s (a process silent for '
                      '--distributed_timeout_s/3 = 5 s was killed, crashed or hung; see its own output)']
  assert multihost.lost_peer_bound_s(15) == 7


def test_the_watchdog_names_a_peer_that_failed_if_this_process_still_runs(monkeypatch):
  watchdog, t, key, verdicts = _watchdog(monkeypatch, 2)
  watchdog.check({f'{key}/beat/1': '1', f'{key}/left/1': 'error'}, t + 1)
  watchdog.check({f'{key}/beat/1': '1', f'{key}/left/1': 'error'}, t + 5.9)
  assert verdicts == [] and not watchdog.all_well_since(t)
  watchdog.check({f'{key}/beat/1': '1', f'{key}/left/1': 'error'}, t + 6.5)
  assert verdicts == ['process 1 of 2 failed and left the run 6 s ago (see its own output)']
