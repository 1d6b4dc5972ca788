"""adtr_jax.metric_stream against the in-memory metrics (adtr_jax.metrics) and np.percentile, on the
inputs of tests/test_metrics.py, fed in uneven batches through tiny chunks, blocks and fan-in so that
every case writes many runs, merges them in levels and splits tied scores across blocks."""
import tracemalloc
import warnings

import numpy as np
import pytest
from scipy import ndimage

from adtr_jax import metric_stream, metrics
from tests.test_metrics import blobby_case

TINY = dict(chunk_pixels=300, fan_in=4, block=40)   # many runs, merge levels, ties across blocks


def stream(folder, maps, masks, rows=None, part=0, seed=0, **kw):
  """Adds maps[rows] / masks[rows] to a PixelStream in batches of 1-3 rows; finish()es it."""
  rng = np.random.default_rng(seed)
  rows = np.arange(len(maps)) if rows is None else np.asarray(rows)
  s = metric_stream.PixelStream(folder, part, **{**TINY, **kw})
  i = 0
  while i < len(rows):
    b = int(rng.integers(1, 4))
    s.add(maps[rows[i:i + b]], masks[rows[i:i + b]])
    i += b
  s.finish()
  return s


def _cases():
  """(maps, masks, fpr_limit): every pixel input of tests/test_metrics.py."""
  for seed, levels, limit in [(0, None, 0.3), (1, 4, 0.3), (2, 2, 0.3), (3, None, 0.05), (4, 8, 1.0),
                              (5, 3, 0.3), (5, 1, 0.3), (7, 1, 0.3)]:
    yield f'blobby{seed}-{levels}-{limit}', (*blobby_case(np.random.default_rng(seed), levels=levels),
                                            limit)
  for seed, levels in [(0, None), (1, 3), (2, 1)]:
    yield f'sklearn{seed}-{levels}', (*blobby_case(np.random.default_rng(seed), n=6, size=32,
                                                   levels=levels), 0.3)
  _, masks = blobby_case(np.random.default_rng(0))
  yield 'perfect', (masks.astype(np.float32), masks, 0.3)
  yield 'inverse', (-masks.astype(np.float32), masks, 0.3)
  yield 'constant', (np.zeros(masks.shape, np.float32), masks, 0.3)
  yield 'constant-1', (np.zeros(masks.shape, np.float32), masks, 1.0)
  yield 'pinned-ties', (np.array([[[0.5, 0.5, 0.5, 0.0, 0.5, 1.0]]], np.float32),
                        np.array([[[0, 0, 0, 0, 1, 1]]], bool), 0.3)
  masks = np.zeros((1, 8, 8), bool)
  masks[0, 0, 0] = True
  masks[0, 4:7, 4:7] = True
  maps = np.zeros((1, 8, 8), np.float32)
  maps[0, 0, 0] = 2.0
  yield 'regions-equal', (maps, masks, 1.0)
  masks = np.zeros((2, 6, 6), bool)
  masks[:, 2:4, 2:4] = True
  maps = np.zeros((2, 6, 6), np.float32)
  maps[0][masks[0]] = 1.0
  maps[1][masks[1]] = -1.0
  yield 'regions-per-image', (maps, masks, 0.3)
  maps, masks = blobby_case(np.random.default_rng(3))
  yield 'float64', (maps.astype(np.float64) + masks * 1e-12, masks, 0.3)


CASES = dict(_cases())


def assert_equal_to_in_memory(runs, maps, masks, limit):
  """Bit-equal AUROC, F1-max and percentiles; AP, AUPRO and the PRO curve to 1e-12."""
  for ties in metrics.AUPRO_TIES:
    want = metrics.pixel_metrics(maps, masks, fpr_limit=limit, aupro_ties=ties)
    got = runs.metrics(ties)
    assert got['pixel_auroc'] == want['pixel_auroc'] and got['pixel_f1_max'] == want['pixel_f1_max']
    assert got['pixel_ap'] == pytest.approx(want['pixel_ap'], abs=1e-12)
    assert got['pixel_aupro'] == pytest.approx(want['pixel_aupro'], abs=1e-12), ties
  fpr, pro = metrics.pro_curve(maps, masks, limit)
  got_fpr, got_pro = runs.pro_curve()
  assert got_fpr.shape == fpr.shape
  np.testing.assert_allclose(got_fpr, fpr, rtol=0, atol=1e-12)
  np.testing.assert_allclose(got_pro, pro, rtol=0, atol=1e-12)
  keep = np.unique(np.linspace(0, len(fpr) - 1, 9).round().astype(int))   # PixelRuns.pro_curve(max_points=9)
  thin_fpr, thin_pro = runs.pro_curve(max_points=9)
  np.testing.assert_allclose(thin_fpr, fpr[keep], rtol=0, atol=1e-12)
  np.testing.assert_allclose(thin_pro, pro[keep], rtol=0, atol=1e-12)
  want_q = np.percentile(maps, metric_stream.PERCENTILES)
  got_q = runs.percentiles()
  assert got_q.dtype == want_q.dtype and np.array_equal(got_q, want_q)


@pytest.mark.parametrize('name', list(CASES))
def test_streamed_metrics_equal_in_memory(name, tmp_path):
  maps, masks, limit = CASES[name]
  stream(tmp_path, maps, masks)
  runs = metric_stream.PixelRuns(tmp_path, fpr_limit=limit, fan_in=TINY['fan_in'], block=TINY['block'])
  assert (runs.n_neg, runs.n_pos) == (np.count_nonzero(~masks), np.count_nonzero(masks))
  assert_equal_to_in_memory(runs, maps, masks, limit)


def test_two_processes_merge_to_the_one_process_result(tmp_path):
  """Each 'process' adds only its rows (dealt in turn, as split_pass deals them) into one shared
  folder; the merge of both parts equals one stream of every row and the in-memory metrics."""
  maps, masks = blobby_case(np.random.default_rng(11), n=9, size=20, levels=5)
  rows = np.arange(len(maps))
  stream(tmp_path / 'shared', maps, masks, rows[0::2], part=0)
  stream(tmp_path / 'shared', maps, masks, rows[1::2], part=1, seed=1)
  stream(tmp_path / 'one', maps, masks)
  both = metric_stream.PixelRuns(tmp_path / 'shared', num_parts=2, fan_in=4, block=40)
  one = metric_stream.PixelRuns(tmp_path / 'one', fan_in=4, block=40)
  assert (both.n_neg, both.n_pos, both.num_regions, both.num_images) == \
         (one.n_neg, one.n_pos, one.num_regions, one.num_images)
  for ties in metrics.AUPRO_TIES:
    a, b = both.metrics(ties), one.metrics(ties)
    assert a == pytest.approx(b, abs=1e-12, rel=0)
  assert np.array_equal(both.percentiles(), one.percentiles())
  assert_equal_to_in_memory(both, maps, masks, 0.3)
  with pytest.raises(RuntimeError, match='expected 3'):
    metric_stream.PixelRuns(tmp_path / 'shared', num_parts=3)


def test_several_limits_and_some_parts_from_one_pass(tmp_path):
  """aupro_at gives metrics.pixel_metrics' merged AUPRO at every limit asked, from one pass; parts=
  merges only the parts named (as MVTec LOCO merges the good images' part with one anomaly type's);
  two PixelRuns alive on one folder keep their merged runs apart (scratch)."""
  maps, masks = blobby_case(np.random.default_rng(5), n=12, size=20, levels=5)
  rows = np.arange(len(maps))
  for p in range(3):
    stream(tmp_path, maps, masks, rows[p::3], part=p, seed=p)
  limits = (0.01, 0.05, 0.3, 1.0)
  a = metric_stream.PixelRuns(tmp_path, parts=[0, 2], fpr_limit=0.3, aupro_limits=limits, scratch='a',
                              fan_in=4, block=40)
  b = metric_stream.PixelRuns(tmp_path, parts=[1, 2], fpr_limit=0.05, scratch='b', fan_in=4, block=40)
  assert all(r.startswith('a/') for r in a.neg_runs + a.pos_runs)   # a's runs were merged into a/
  keep = np.sort(np.r_[rows[0::3], rows[2::3]])
  for lim in limits:
    want = metrics.pixel_metrics(maps[keep], masks[keep], fpr_limit=lim)['pixel_aupro']
    assert a.aupro_at(lim) == pytest.approx(want, abs=1e-12), lim
  assert_equal_to_in_memory(a, maps[keep], masks[keep], 0.3)
  keep = np.sort(np.r_[rows[1::3], rows[2::3]])
  want = metrics.pixel_metrics(maps[keep], masks[keep], fpr_limit=0.05)['pixel_aupro']
  assert b.aupro_at(0.05) == pytest.approx(want, abs=1e-12)
  with pytest.raises(ValueError, match='not among the limits'):
    a.aupro_at(0.2)
  with pytest.raises(RuntimeError, match='lacks the finished parts'):
    metric_stream.PixelRuns(tmp_path, parts=[1, 3])


def test_add_pixels_with_region_weights_is_add(tmp_path):
  """add_pixels, given each anomalous pixel's 1 / (area of its 8-connected region), is add."""
  maps, masks = blobby_case(np.random.default_rng(6), n=7, size=20, levels=7)
  stream(tmp_path / 'add', maps, masks)
  s = metric_stream.PixelStream(tmp_path / 'pixels', **TINY)
  regions = 0
  for m, mask in zip(maps, masks):
    labels, num = ndimage.label(mask, structure=np.ones((3, 3), bool))
    ids = labels[mask] - 1
    s.add_pixels(m[~mask], m[mask], 1.0 / np.bincount(ids, minlength=num)[ids], num, 1)
    regions += num
  s.finish()
  want = metric_stream.PixelRuns(tmp_path / 'add', fan_in=4, block=40)
  got = metric_stream.PixelRuns(tmp_path / 'pixels', fan_in=4, block=40)
  assert (got.n_neg, got.n_pos, got.num_regions, got.num_images) == \
         (want.n_neg, want.n_pos, want.num_regions, want.num_images) == \
         (np.count_nonzero(~masks), np.count_nonzero(masks), regions, len(maps))
  assert regions > 0
  for ties in metrics.AUPRO_TIES:
    assert got.metrics(ties) == pytest.approx(want.metrics(ties), abs=1e-12, rel=0)
  bad = metric_stream.PixelStream(tmp_path / 'bad')
  with pytest.raises(ValueError, match='as many weights >= 0'):
    bad.add_pixels(maps[0].ravel(), maps[1].ravel()[:3], np.ones(2), 1, 1)
  with pytest.raises(ValueError, match='as many weights >= 0'):
    bad.add_pixels(maps[0].ravel(), maps[1].ravel()[:2], -np.ones(2), 1, 1)


def test_single_class_and_bad_input(tmp_path):
  maps, masks = blobby_case(np.random.default_rng(0))
  stream(tmp_path / 'normal', maps, np.zeros_like(masks))   # predict: no masks at all
  runs = metric_stream.PixelRuns(tmp_path / 'normal')
  with pytest.warns(UserWarning, match='single pixel class'):
    out = runs.metrics()
  assert set(out) == set(metrics.PIXEL_KEYS) and all(np.isnan(v) for v in out.values())
  with pytest.raises(ValueError, match='single pixel class'):
    runs.pro_curve()
  assert np.array_equal(runs.percentiles(), np.percentile(maps, metric_stream.PERCENTILES))
  s = metric_stream.PixelStream(tmp_path / 'bad')
  s.add(maps[:0], masks[:0])            # a process with no valid row in a batch
  bad = maps[:1].copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    s.add(bad, masks[:1])
  with pytest.raises(ValueError, match='masks has shape'):
    s.add(maps[:1], masks[:1, :-1])
  s.add(maps[:1], masks[:1])
  with pytest.raises(ValueError, match='dtype'):
    s.add(maps[1:2].astype(np.float64), masks[1:2])
  with pytest.raises(ValueError, match='eval.aupro_ties'):
    metric_stream.PixelRuns(tmp_path / 'normal').metrics('official')


@pytest.mark.parametrize('seed', range(6))
def test_percentiles_bit_equal_numpy(seed, tmp_path):
  """Any size (1 pixel included), many ties, any q in [0, 100]: numpy's interpolation, bit for bit."""
  rng = np.random.default_rng(seed)
  n, size = int(rng.integers(1, 5)), int(rng.integers(1, 12))
  maps = (rng.standard_normal((n, size, size)) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
  if seed % 2:
    maps = np.round(maps * 3) / 3
  masks = rng.random(maps.shape) < 0.2
  q = (0.0, 1.0, 37.5, 50.0, 99.9, 100.0, float(rng.uniform(0, 100)))
  stream(tmp_path, maps, masks, chunk_pixels=7, block=5)
  got = metric_stream.PixelRuns(tmp_path, q=q, fan_in=4, block=5).percentiles()
  want = np.percentile(maps, q)
  assert got.dtype == want.dtype and np.array_equal(got, want), (got, want)


def _peak_bytes(folder, num_batches: int) -> int:
  """tracemalloc's peak over finish() and every PixelRuns query, for num_batches batches [2, 32, 32]."""
  rng = np.random.default_rng(0)
  s = metric_stream.PixelStream(folder, chunk_pixels=2048, fan_in=4, block=1024)
  for _ in range(num_batches):
    masks = np.zeros((2, 32, 32), bool)
    masks[1, 4:12, 4:12] = True
    s.add(rng.standard_normal((2, 32, 32)).astype(np.float32) + masks, masks)
  tracemalloc.start()
  try:
    s.finish()
    runs = metric_stream.PixelRuns(folder, fan_in=4, block=1024)
    runs.metrics()
    runs.metrics('positional')
    runs.percentiles()
    runs.pro_curve(max_points=100)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_batches(tmp_path):
  """Ten times the batches (10x the runs, one more merge level): the peak stays within 1.25x (measured
  315 KB vs 354 KB, the run lists) and far below the scores' own bytes (1.6 MB at 200 batches)."""
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    few, many = _peak_bytes(tmp_path / 'few', 20), _peak_bytes(tmp_path / 'many', 200)
  assert many < 1.25 * few, (few, many)
  assert many < 0.25 * 200 * 2 * 32 * 32 * 4, many
