"""adtr_jax.scale_benchmark: the built category (N unique copies, masks aligned) and one real run of the
CLI's stages on it."""
import csv
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from adtr_jax import scale_benchmark as sb
from adtr_jax.data import mvtec
from tests.conftest import make_toy_mvtec


def test_built_category_holds_n_unique_copies_with_their_masks(toy_root, tmp_path):
  """40 training images from the toy's 18 and 40 test images from its 8 (4 defective): every image
  unique, each within 1 of its source in at most 24 values, each defect's mask its source's."""
  cat = sb.build_category(toy_root / 'toy', tmp_path, 'big', 40, 64)
  train = mvtec.images_in(cat / 'train' / 'good')
  test = [p for kind in sorted((cat / 'test').iterdir()) for p in mvtec.images_in(kind)]
  assert len(train) == len(test) == 40
  digests = {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in train + test}
  assert len(digests) == 80
  src_train = mvtec.images_in(toy_root / 'toy' / 'train' / 'good')
  for i in (0, 18, 39):   # copies 0, 1, 2 of their source
    got = np.asarray(Image.open(train[i])).astype(int)
    want = np.asarray(Image.open(src_train[i % 18]).convert('RGB')).astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= sb.MARK_PIXELS
  masks = sorted((cat / 'ground_truth' / 'square').iterdir())
  assert len(masks) == len(mvtec.images_in(cat / 'test' / 'square')) == 20
  src = mvtec.images_in(toy_root / 'toy' / 'ground_truth' / 'square')
  order = sb.test_order(8)
  for m in masks:   # test row i copies source test row order[i % 8]; its defects are rows 4..7
    i = int(m.name[:6])
    np.testing.assert_array_equal(np.asarray(Image.open(m)), np.asarray(Image.open(src[order[i % 8] - 4])))
  assert sb.slopes([{'n': 10, 'train': {'peak_rss_mib': 100.0, 'peak_anon_mib': 50.0}},
                    {'n': 30, 'train': {'peak_rss_mib': 101.0, 'peak_anon_mib': 48.0}}]) \
      == {'train_bytes_per_image': round(2**20 / 20), 'train_anon_bytes_per_image': round(-2 * 2**20 / 20)}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_stages_run_and_are_measured(tmp_path):
  """N = 12 on the toy category with the tiny config: train, eval and predict each ran as a child of
  the CLI and left its outputs; each has its own peak RSS (a JAX process: over 100 MiB); each ran
  again as 2 processes of one run, each process's peak recorded (training afresh in its own workdir)."""
  root = make_toy_mvtec(tmp_path / 'toy_source')
  out = sb.measure(12, source=root / 'toy', scratch=tmp_path / 'scale', image_size=32,
                   config=f'tests/tiny_config.py:{root}|{tmp_path / "unused"}', processes=(1, 2))
  assert 'error' not in out, out.get('error')
  for stage in (*sb.STAGES, *(f'{s}_x2' for s in sb.STAGES)):
    assert out[stage]['exit'] == 0 and out[stage]['seconds'] > 0 and out[stage]['peak_rss_mib'] > 100
    assert 100 < out[stage]['peak_anon_mib'] <= out[stage]['peak_rss_mib']   # a sample of a part of it
  for stage in sb.STAGES:
    peaks = out[f'{stage}_x2']['peak_rss_mib_per_process']
    assert len(peaks) == 2 and max(peaks) == out[f'{stage}_x2']['peak_rss_mib'] and min(peaks) > 100
    assert out[f'{stage}_x2_peak_ratio'] == round(max(peaks) / out[stage]['peak_rss_mib'], 3)
  assert set(sb.slopes([out, dict(out, n=24)])) == {
      f'{k}{x}{a}_bytes_per_image' for k in sb.STAGES for x in ('', '_x2') for a in ('', '_anon')}
  work = tmp_path / 'scale' / 'n12' / 'work'
  assert json.loads((work / 'metrics.json').read_text())['categories']['scale12']['num_test_images'] == 12
  for suffix in ('', '_x2'):   # each training run made its own checkpoint and feature cache
    assert list((tmp_path / 'scale' / 'n12' / f'work{suffix}' / 'scale12' / 'checkpoints').iterdir())
    assert list((tmp_path / 'scale' / 'n12' / f'cache{suffix}' / 'features').rglob('rows-*.npy'))
  rows = list(csv.DictReader((work / 'scale12' / 'predict' / 'predictions.csv').open()))
  assert len(rows) == 12
