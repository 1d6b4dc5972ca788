"""adtr_jax.data.image_cache: resized rows written in place on disk (memory bounded by the decode
queue), the same files as np.save of the whole split, and the work split over the processes of a run
(tests/image_cache_worker.py: two real processes joined on 127.0.0.1)."""
import functools
import json
import os
import socket
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from adtr_jax import errors
from adtr_jax.data import builder, image_cache, mvtec, pipeline
from tests.conftest import REPO


class Synthetic:
  """A source of n deterministic 64 px images (and masks) at data_dir; row `bad` fails to decode."""

  has_masks = True

  def __init__(self, data_dir, n: int, split: str = 'test', bad: int = -1):
    self.data_dir, self.n, self.split, self.bad = str(data_dir), n, split, bad
    self.records = [{'path': f'/data/{i:05d}.png', 'label': i % 2} for i in range(n)]   # as a scan's

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i == self.bad:
      raise errors.DataError(f'row {i} is broken')
    rng = np.random.default_rng(i)
    return {'image': rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), 'mask': rng.random((64, 64)) < 0.1,
            'label': i % 2, 'path': f'/data/{i:05d}.png'}


def test_same_files_as_saving_the_whole_split(tmp_path):
  """The cache holds what np.save wrote before (byte for byte), and reads back row by row."""
  source = Synthetic(tmp_path, 45)
  cache = image_cache.cached(source, 32, num_workers=2)
  rows = [pipeline.load_resized(source, i, 32) for i in range(45)]
  want = {'images': np.stack([r['image'] for r in rows]), 'masks': np.stack([r['mask'] for r in rows]),
          'labels': np.asarray([r['label'] for r in rows], np.int32)}
  folder = tmp_path / 'resized_32' / 'test'
  for key, value in want.items():
    np.save(tmp_path / f'{key}.npy', value)
    assert (folder / f'{key}.npy').read_bytes() == (tmp_path / f'{key}.npy').read_bytes(), key
  assert json.loads((folder / 'paths.json').read_text()) == [r['path'] for r in rows]
  assert sorted(p.name for p in (tmp_path / 'resized_32').iterdir()) == ['test']   # no temporary left
  ex = cache[7]
  np.testing.assert_array_equal(ex['image'], want['images'][7])
  assert ex['mask'].dtype == bool and ex['label'] == 1 and ex['path'] == '/data/00007.png'


def test_a_failed_resize_leaves_no_cache(tmp_path):
  with pytest.raises(errors.DataError, match='row 40 is broken'):
    image_cache.cached(Synthetic(tmp_path, 45, bad=40), 32)
  assert list((tmp_path / 'resized_32').iterdir()) == []


def _peak(folder, n: int) -> int:
  tracemalloc.start()
  try:
    image_cache.cached(Synthetic(folder, n), 64, num_workers=2)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_is_the_decode_queue_not_the_split(tmp_path):
  """The peak stays under what the decode queue can hold (PREFETCH_BATCHES + 2 groups of GROUP rows,
  each row twice: as decoded and as resized), at 300 rows as at 1500, whose rows are 4.6x that bound.
  (How full the queue gets depends on the threads' timing, so the two peaks are not compared with each
  other; measured 2.0-3.1 MB against a bound of 5.2 MB.)"""
  row = 64 * 64 * 3 + 64 * 64
  bound = (pipeline.PREFETCH_BATCHES + 2) * image_cache.GROUP * 2 * row
  assert 1500 * row > 4 * bound
  for n in (300, 1500):
    assert _peak(tmp_path / str(n), n) < bound, n


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize('disks', ['shared', 'own'])
def test_two_processes_resize_into_the_one_process_cache(toy_root, tmp_path, disks):
  """shared: the two processes' cache folder is one; process p of 2 decodes exactly rows p, p + 2, ...
  of each split (each row once in all). own: each process has its own cache folder (as hosts with
  their own disks do) and decodes every row into it. Either way each cache equals, byte for byte, the
  cache one process writes alone."""
  port, procs, outs = _free_port(), [], []
  caches = [tmp_path / 'two'] * 2 if disks == 'shared' else [tmp_path / 'two0', tmp_path / 'two1']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=str(REPO))
  for p in range(2):
    outs.append(tmp_path / f'process{p}.json')
    log = (tmp_path / f'process{p}.log').open('w')
    procs.append(subprocess.Popen([sys.executable, '-m', 'tests.image_cache_worker', str(port), str(p),
                                   str(toy_root), str(caches[p]), str(outs[p])], cwd=REPO, env=env,
                                  stdout=log, stderr=subprocess.STDOUT))
  try:
    codes = [proc.wait(300) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  assert codes == [0, 0], '\n'.join((tmp_path / f'process{p}.log').read_text()[-3000:] for p in range(2))
  splits = builder.prepare(functools.partial(mvtec.scan_category, toy_root, 'toy'), tmp_path / 'one' / 'tfds')
  for split in splits.values():
    image_cache.cached(split, 64, num_workers=1)
  decoded = [json.loads(out.read_text())['decoded'] for out in outs]
  for name, split in splits.items():
    rows = [sorted(i for s, i in decoded[p] if s == name) for p in range(2)]
    n = len(split)
    want = ([list(range(0, n, 2)), list(range(1, n, 2))] if disks == 'shared' else [list(range(n))] * 2)
    assert rows == want, name
  one = _files(tmp_path / 'one')
  assert len(one) == 2 * 4   # train and test: images, masks, labels, paths.json
  for cache in set(caches):
    assert _files(cache) == one
    for path in one:
      assert (tmp_path / 'one' / path).read_bytes() == (cache / path).read_bytes(), (cache, path)


def _files(cache) -> list:
  """The image cache's files under a cache folder, relative to it."""
  return sorted(p.relative_to(cache) for p in cache.rglob('resized_64/**/*') if p.is_file())
