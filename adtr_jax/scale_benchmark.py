r"""How peak memory and time grow with the size of a split: the CLI's stages on N images, N = 1k..16k.

  python -m adtr_jax.scale_benchmark --scale_source=../shared/data/magnetic_tile \
      --scale_n=1000,4000,16000 --image_size=256 --config=magnetic_tile --scale_dir=/tmp/scale

For each N, builds an MVTec-layout category of N training and N test images from the real category
--scale_source: its training images, and its test images (normal and defective, with their masks),
taken in turn (the test images in a fixed shuffled order, so that any N holds both classes) until
there are N of each. Each copy is made unique (the least significant bits of the
first 24 pixels of its first row hold the copy's number), so the backbone's feature memo never finds
an image it saw; images and masks are written at --image_size (PNG), so the build stays cheap and the
stages' own costs are measured. Then runs the stages, each as a child process of the real CLI
(`python -m adtr_jax.main`): --mode=train (data preparation, feature cache, --scale_epochs epochs,
calibration), --mode=eval, and --mode=predict on the folder of the N training images. Records each
stage's seconds and peak resident memory (the child's own ru_maxrss, from wait4) and prints one JSON
line per N, then one line with each stage's slope in bytes of peak RSS per image (between the
smallest and the largest N). --scale_out also appends the lines to a file.

--scale_repo runs the stages of another checkout of adtr_jax (e.g. the main branch's, to compare).
Extra --config fields go through --scale_override (repeatable), e.g.
--scale_override=--config.train.batch_size=8. On a CPU the device feed's features and the feature memo
lie in host memory and grow with N (up to backbone.feature_memo_mb for the memo): to measure what
is bounded by the batch, add --scale_override=--config.train.feature_cache=host and
--scale_override=--config.backbone.feature_memo_mb=0 (BENCHMARKS.md). Timings on a shared machine
are not measurements.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

STAGES = ('train', 'eval', 'predict')
MARK_PIXELS = 24   # pixels whose lowest bit carries the copy number (2**24 copies of an image)

_N = flags.DEFINE_list('scale_n', ['1000', '4000', '16000'], 'Sizes N: N training and N test images.')
_SOURCE = flags.DEFINE_string('scale_source', None, 'A real MVTec-layout category folder (train/good, '
                              'test/<type>, ground_truth/<type>) to copy from.')
_DIR = flags.DEFINE_string('scale_dir', None, 'Scratch folder for the built categories, caches and runs.')
_SIZE = flags.DEFINE_integer('image_size', 256, 'Image size (--config.dataset.image_size).')
_CONFIG = flags.DEFINE_string('config', 'magnetic_tile', 'The CLI\'s --config (a file or a shipped name).')
_EPOCHS = flags.DEFINE_integer('scale_epochs', 1, 'Training budget in epochs (train.min_steps is 0).')
_STAGES = flags.DEFINE_list('scale_stages', list(STAGES), f'Stages to run, of {",".join(STAGES)}.')
_OVERRIDE = flags.DEFINE_multi_string('scale_override', [], 'An extra CLI flag for every stage, e.g. '
                                      '--scale_override=--config.train.batch_size=8.')
_REPO = flags.DEFINE_string('scale_repo', None, 'The adtr_jax checkout whose CLI runs the stages '
                            '(default: this one).')
_OUT = flags.DEFINE_string('scale_out', None, 'Also append the JSON lines to this file.')
_KEEP = flags.DEFINE_bool('scale_keep', False, 'Keep each N\'s data, cache and runs (default: deleted).')


def _rgb(path: pathlib.Path, size: int) -> np.ndarray:
  """An image file -> uint8 [size, size, 3] (bilinear)."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB').resize((size, size), Image.BILINEAR))


def _mask(path: pathlib.Path, size: int) -> np.ndarray:
  """A mask file -> uint8 [size, size] in {0, 255} (nearest, so it stays binary)."""
  with Image.open(path) as im:
    return np.where(np.asarray(im.convert('L').resize((size, size), Image.NEAREST)) >= 128, 255, 0
                    ).astype(np.uint8)


def mark(image: np.ndarray, copy: int) -> np.ndarray:
  """image uint8 [S, S, 3] with `copy`'s bits in the lowest bit of the first MARK_PIXELS pixels of its
  first row (channel 0): copies of one source image all differ, by at most 1 in 24 pixel values."""
  if not 0 <= copy < 2**MARK_PIXELS or image.shape[1] < MARK_PIXELS:
    raise ValueError(f'copy {copy} of an image {image.shape[1]} px wide cannot be marked')
  out = image.copy()
  bits = (copy >> np.arange(MARK_PIXELS)) & 1
  out[0, :MARK_PIXELS, 0] = (out[0, :MARK_PIXELS, 0] & 0xFE) | bits
  return out


def _sources(category: pathlib.Path) -> tuple[list[pathlib.Path], list[tuple[str, pathlib.Path, pathlib.Path | None]]]:
  """(training images, test images as (type, image, mask or None)), sorted, from an MVTec-layout
  category (the layout adtr_jax.data.mvtec reads)."""
  from adtr_jax.data import mvtec
  train = mvtec.images_in(category / 'train' / mvtec.GOOD)
  test = []
  for kind in sorted(p.name for p in (category / 'test').iterdir() if p.is_dir()):
    for image in mvtec.images_in(category / 'test' / kind):
      mask = category / 'ground_truth' / kind / f'{image.stem}{mvtec.MASK_SUFFIX}.png'
      test.append((kind, image, None if kind == mvtec.GOOD else mask))
  if not train or not test:
    raise ValueError(f'{category} has no train/good or test images')
  return train, test


def test_order(count: int) -> np.ndarray:
  """The order in which the source's `count` test images are copied: a fixed permutation, so that the
  first N hold normal and defective images alike (the source lists them by type)."""
  return np.random.default_rng(0).permutation(count)


def build_category(source: pathlib.Path, root: pathlib.Path, name: str, n: int, size: int) -> pathlib.Path:
  """root/name: n training and n test images (with masks) copied from the category `source` in turn
  (the test images in test_order), each made unique by `mark` (copy number = index // number of
  source images), at size x size.
  Memory: one image at a time."""
  train, test = _sources(pathlib.Path(source))
  cat = pathlib.Path(root) / name
  (cat / 'train' / 'good').mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray(mark(_rgb(train[i % len(train)], size), i // len(train))).save(
        cat / 'train' / 'good' / f'{i:06d}.png')
  order = test_order(len(test))
  for i in range(n):
    kind, image, mask = test[order[i % len(test)]]
    (cat / 'test' / kind).mkdir(parents=True, exist_ok=True)
    Image.fromarray(mark(_rgb(image, size), i // len(test))).save(cat / 'test' / kind / f'{i:06d}.png')
    if mask is not None:
      (cat / 'ground_truth' / kind).mkdir(parents=True, exist_ok=True)
      Image.fromarray(_mask(mask, size)).save(cat / 'ground_truth' / kind / f'{i:06d}_mask.png')
  return cat


def run_stage(args: list[str], cwd: pathlib.Path, log: pathlib.Path) -> dict:
  """`python -m adtr_jax.main *args` in cwd -> {'seconds', 'peak_rss_mib' (the child's ru_maxrss),
  'exit'}; its output goes to `log`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get('PYTHONPATH', '')]))
  start = time.perf_counter()
  with log.open('w') as out:
    child = subprocess.Popen([sys.executable, '-m', 'adtr_jax.main', *args], cwd=cwd, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)   # this child's own peak, not all children's
    child.returncode = os.waitstatus_to_exitcode(status)
  return {'seconds': round(time.perf_counter() - start, 2), 'peak_rss_mib': round(usage.ru_maxrss / 1024, 1),
          'exit': child.returncode}


def measure(n: int, *, source, scratch, image_size: int, config: str, epochs: int = 1,
            stages=STAGES, overrides=(), repo=None) -> dict:
  """One N: builds the category under scratch/n<N>/ and runs the stages. Returns the JSON line's dict:
  {'n', 'image_size', 'config', 'build_seconds', '<stage>': run_stage's dict, ...}; a stage that
  fails (exit != 0) ends the line with its output's last lines under 'error'."""
  repo = pathlib.Path(repo or pathlib.Path(__file__).resolve().parents[1])
  base = pathlib.Path(scratch).resolve() / f'n{n}'
  shutil.rmtree(base, ignore_errors=True)
  start = time.perf_counter()
  cat = build_category(source, base / 'data', f'scale{n}', n, image_size)
  out = {'n': n, 'image_size': image_size, 'config': config, 'build_seconds': round(time.perf_counter() - start, 2)}
  common = [f'--config={config}', f'--workdir={base / "work"}', f'--config.dataset.root={base / "data"}',
            f'--config.dataset.category={cat.name}', f'--config.dataset.image_size={image_size}',
            f'--config.dataset.cache_dir={base / "cache"}', f'--config.train.num_epochs={epochs}',
            '--config.train.min_steps=0', *overrides]
  extra = {'train': ['--mode=train'], 'eval': ['--mode=eval'],
           'predict': ['--mode=predict', f'--predict_dir={cat / "train" / "good"}']}
  for stage in stages:
    out[stage] = run_stage([*common, *extra[stage]], repo, base / f'{stage}.log')
    if out[stage]['exit']:
      out['error'] = (base / f'{stage}.log').read_text()[-2000:]
      break
  return out


def slopes(lines: list[dict]) -> dict:
  """Each stage's peak RSS slope, bytes per image, between the smallest and the largest N."""
  done = [x for x in lines if 'error' not in x]
  if len(done) < 2:
    return {}
  lo, hi = min(done, key=lambda x: x['n']), max(done, key=lambda x: x['n'])
  return {f'{stage}_bytes_per_image': round((hi[stage]['peak_rss_mib'] - lo[stage]['peak_rss_mib']) * 2**20
                                            / (hi['n'] - lo['n']))
          for stage in STAGES if stage in lo and stage in hi}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _SOURCE.value or not _DIR.value:
    raise app.UsageError('give --scale_source=<an MVTec-layout category folder> and --scale_dir=<scratch>')
  unknown = set(_STAGES.value) - set(STAGES)
  if unknown:
    raise app.UsageError(f'--scale_stages: {sorted(unknown)} not among {STAGES}')
  lines = []
  for n in sorted(int(x) for x in _N.value):
    lines.append(measure(n, source=_SOURCE.value, scratch=_DIR.value, image_size=_SIZE.value,
                         config=_CONFIG.value, epochs=_EPOCHS.value, stages=_STAGES.value,
                         overrides=_OVERRIDE.value, repo=_REPO.value))
    _emit(lines[-1])
    if not _KEEP.value:
      shutil.rmtree(pathlib.Path(_DIR.value) / f'n{n}', ignore_errors=True)
  _emit({'slopes': slopes(lines), 'n': [x['n'] for x in lines]})


def _emit(line: dict) -> None:
  text = json.dumps(line)
  print(text, flush=True)
  if _OUT.value:
    with open(_OUT.value, 'a') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  app.run(main)
