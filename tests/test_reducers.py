"""adtr_jax.reducers against what evaluation computed with every map in memory (metrics.compute_all,
np.percentile, metrics.pro_curve and the heatmap choice by a stable argsort of the scores), on the
inputs of tests/test_metrics.py: each split's rows dealt to 1 or 2 'processes' batch by batch, as
split_pass deals them, each process's part merged on process 0. And the local rows a process hands on."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from adtr_jax import metric_stream, metrics, reducers, sharding, split_pass
from tests.test_metrics import blobby_case

BATCH = 4   # global batch of the simulated pass


def _case(name: str):
  """(maps float32 [N, S, S], masks bool [N, S, S], image scores float32 [N] with ties, labels [N])."""
  if name == 'synthetic':
    scores, labels, maps, masks = metrics.synthetic_case(n=13, size=24, seed=3)
    return maps, masks, np.round(np.asarray(scores, np.float32) * 4) / 4, labels.astype(np.int32)
  seed, levels = {'blobby': (0, None), 'blobby-ties': (1, 3), 'blobby-coarse': (2, 1)}[name]
  maps, masks = blobby_case(np.random.default_rng(seed), n=11, size=16, levels=levels)
  masks[5] = False   # more normal images
  scores = np.round(maps.max(axis=(1, 2)) * 2) / 2   # few distinct values: ties across the split
  return maps, masks, scores.astype(np.float32), masks.any(axis=(1, 2)).astype(np.int32)


def run_pass(make, maps, masks, scores, labels, parts: int) -> list:
  """Each part's reducers (make(part)) get its rows of every global batch of BATCH rows, visited in
  split_pass.pass_order; -> the results of part 0's reducers from every part's finish()."""
  order = split_pass.pass_order(len(maps), BATCH, parts)
  per_part = [make(p) for p in range(parts)]
  b = BATCH // parts
  for start in range(0, len(order), BATCH):
    batch = order[start:start + BATCH]
    for p, rs in enumerate(per_part):
      rows = batch[p * b:(p + 1) * b]
      rows_dict = {'maps': maps[rows], 'scores': scores[rows], 'labels': labels[rows], 'masks': masks[rows],
                   'index': rows.astype(np.int64), 'images': np.zeros((len(rows), 2, 2, 3), np.uint8)}
      for r in rs:
        r.add(rows_dict)
  finished = [[r.finish() for r in rs] for rs in per_part]
  return [r.result([f[i] for f in finished]) for i, r in enumerate(per_part[0])]


def old_picks(scores, labels, num_heatmaps: int) -> dict:
  """evaluate.save_heatmaps' choice before the reducers, on every row in memory."""
  n = num_heatmaps
  order = np.argsort(-scores, kind='stable')
  anomalous = [i for i in order if labels[i] == 1]
  normal = [i for i in order if labels[i] == 0]
  return {'top_anomalous': anomalous[:max(n // 2, 1)], 'low_anomalous': anomalous[::-1][:max(n // 4, 1)],
          'top_normal': normal[:max(n // 4, 1)]}


def thin(x, y, n):
  """evaluate.save_curves' choice of the curve points it drew before the reducers."""
  if len(x) <= n:
    return x, y
  keep = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
  return x[keep], y[keep]


@pytest.mark.parametrize('parts', [1, 2])
@pytest.mark.parametrize('name', ['blobby', 'blobby-ties', 'blobby-coarse', 'synthetic'])
@pytest.mark.parametrize('ties', metrics.AUPRO_TIES)
def test_reduced_evaluation_equals_the_in_memory_one(name, ties, parts, tmp_path):
  maps, masks, scores, labels = _case(name)
  assert 0 < labels.sum() < len(labels) and len(np.unique(scores)) < len(scores)   # ties in the scores

  def make(part):
    return [reducers.Scores(tmp_path, len(maps), 'test', part=part),
            reducers.Pixels(tmp_path / 'pixels', with_metrics=True, aupro_ties=ties, part=part),
            reducers.Heatmaps(tmp_path, 8, part=part)]

  got_scores, pixels, picks = run_pass(make, maps, masks, scores, labels, parts)
  want = metrics.compute_all(scores, labels, maps, masks, aupro_ties=ties)
  got = {**metrics.image_metrics(got_scores['scores'], got_scores['labels']), **pixels['metrics']}
  assert got.keys() == want.keys()
  for key in ('image_auroc', 'image_ap', 'image_f1_max', 'pixel_auroc', 'pixel_f1_max'):
    assert got[key] == want[key], key
  for key in ('pixel_ap', 'pixel_aupro'):
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
  np.testing.assert_array_equal(got_scores['scores'], scores)
  np.testing.assert_array_equal(got_scores['index'], np.arange(len(maps)))
  assert sum(got_scores['rows_per_part']) == len(maps) and len(got_scores['rows_per_part']) == parts
  assert np.array_equal(pixels['percentiles'], np.percentile(maps, metric_stream.PERCENTILES))
  fpr, pro = metrics.pro_curve(maps, masks, 0.3)
  assert pixels['aupro_merged'] == pytest.approx(np.trapezoid(pro, fpr) / 0.3, abs=1e-12)
  drawn = thin(fpr, pro, reducers.CURVE_POINTS)
  np.testing.assert_allclose(pixels['pro_curve'][0], drawn[0], rtol=0, atol=1e-12)
  np.testing.assert_allclose(pixels['pro_curve'][1], drawn[1], rtol=0, atol=1e-12)
  for kind, rows in old_picks(scores, labels, 8).items():
    assert [p['index'] for p in picks[kind]] == [int(i) for i in rows], kind
    for p, i in zip(picks[kind], rows):
      assert p['score'] == scores[i]
      np.testing.assert_array_equal(p['map'], maps[i])
      np.testing.assert_array_equal(p['mask'], masks[i])


def test_heatmaps_keep_only_their_candidates_and_tolerate_a_missing_class(tmp_path):
  """Each process keeps at most heatmap_counts rows of each kind, whatever the split's size; with no
  anomalous row, the anomalous kinds are empty (as the in-memory choice)."""
  maps, masks, scores, labels = _case('blobby-ties')
  heat = reducers.Heatmaps(tmp_path, 8, part=0)
  for i in range(len(maps)):
    heat.add({'maps': maps[i:i + 1], 'scores': scores[i:i + 1], 'labels': labels[i:i + 1],
              'masks': masks[i:i + 1], 'index': np.array([i])})
  counts = reducers.heatmap_counts(8)
  assert {k: len(v[0]) for k, v in heat.kept.items()} == counts == {'top_anomalous': 4, 'low_anomalous': 2,
                                                                     'top_normal': 2}
  normal = labels == 0
  (_, _, picks), = [run_pass(lambda p: [reducers.Scores(tmp_path / 'n', int(normal.sum()), 't', part=p),
                                        reducers.Pixels(tmp_path / 'n' / 'px', with_metrics=False, part=p),
                                        reducers.Heatmaps(tmp_path / 'n', 8, part=p)],
                             maps[normal], masks[normal], scores[normal], labels[normal], 2)]
  assert picks['top_anomalous'] == picks['low_anomalous'] == [] and len(picks['top_normal']) == 2


def test_scores_refuse_a_row_twice_or_never(tmp_path):
  row = {'scores': np.ones(2, np.float32), 'labels': np.zeros(2, np.int32), 'index': np.array([0, 1])}
  twice = [reducers.Scores(tmp_path, 3, 'eval toy', part=p) for p in (0, 1)]
  twice[0].add(row)
  twice[1].add(dict(row, index=np.array([1, 2])))
  with pytest.raises(RuntimeError, match='eval toy: got 4 rows, not each of the 3 rows'):
    twice[0].result([s.finish() for s in twice])
  never = reducers.Scores(tmp_path / 'never', 3, 'eval toy', part=0)
  never.add(row)
  with pytest.raises(RuntimeError, match='got 2 rows'):
    never.result([never.finish()])


@pytest.mark.parametrize('model_axis', [1, 2])
def test_local_rows_are_the_rows_this_process_fed_once_each(model_axis):
  """On one process every row is local: local_rows gives the batch in order, once even where a
  'model' axis replicates it over two rows of devices; this process reduces the rows."""
  mesh = sharding.make_mesh(model_axis=model_axis)
  batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  x = sharding.put_batch({'x': batch}, mesh)['x']
  assert len(x.addressable_shards) == len(jax.devices()) == 8
  np.testing.assert_array_equal(sharding.local_rows(x), batch)
  y = jax.device_put(batch[:, 0], NamedSharding(mesh, P('data')))
  np.testing.assert_array_equal(sharding.local_rows(y), batch[:, 0])
  assert sharding.reduces_rows(mesh)
