r"""How peak memory and time grow with the size of a split: the CLI's stages on N images, N = 1k..16k.

  python -m adtr_jax.scale_benchmark --scale_source=../shared/data/magnetic_tile \
      --scale_n=1000,4000,16000 --scale_image_size=256 --scale_config=magnetic_tile --scale_dir=/tmp/scale

For each N, builds an MVTec-layout category of N training and N test images from the real category
--scale_source: its training images, and its test images (normal and defective, with their masks),
taken in turn (the test images in a fixed shuffled order, so that any N holds both classes) until
there are N of each. Each copy is made unique (the least significant bits of the
first 24 pixels of its first row hold the copy's number), so the backbone's feature memo never finds
an image it saw; images and masks are written at --scale_image_size (PNG), so the build stays cheap and the
stages' own costs are measured. Then runs the stages, each as a child process of the real CLI
(`python -m adtr_jax.main`): --mode=train (data preparation, feature cache, --scale_epochs epochs,
calibration), --mode=eval, and --mode=predict on the folder of the N training images. Records each
stage's seconds and peak resident memory (the child's own ru_maxrss, from wait4) and prints one JSON
line per N, then one line with each stage's slope in bytes of peak RSS per image (between the
smallest and the largest N). --scale_out also appends the lines to a file.

--scale_processes=1,2 runs each stage once more as 2 processes of one run (jax.distributed on
127.0.0.1, one CPU device each; --config.train.batch_size and --config.eval.batch_size must divide
by 2): 'eval_x2' gives each process's peak and 'eval_x2_peak_ratio' the largest of them over the
one-process peak. 'train_x2' trains afresh in its own workdir and cache (data preparation and the
feature cache included).

--scale_repo runs the stages of another checkout of adtr_jax (e.g. the main branch's, to compare).
Extra --config fields go through --scale_override (repeatable), e.g.
--scale_override=--config.train.batch_size=8. On a CPU the default feed ('auto') is the host feed,
bounded by a chunk of steps; the feature memo holds up to backbone.feature_memo_mb of rows, so it grows
with N until that budget: to measure what is bounded by the batch, add
--scale_override=--config.backbone.feature_memo_mb=0 (BENCHMARKS.md). Timings on a shared machine
are not measurements.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
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
_SIZE = flags.DEFINE_integer('scale_image_size', 256, 'Image size (--config.dataset.image_size).')
_CONFIG = flags.DEFINE_string('scale_config', 'magnetic_tile', 'The CLI\'s --config (a file or a shipped name).')
_EPOCHS = flags.DEFINE_integer('scale_epochs', 1, 'Training budget in epochs (train.min_steps is 0).')
_STAGES = flags.DEFINE_list('scale_stages', list(STAGES), f'Stages to run, of {",".join(STAGES)}.')
_OVERRIDE = flags.DEFINE_multi_string('scale_override', [], 'An extra CLI flag for every stage, e.g. '
                                      '--scale_override=--config.train.batch_size=8.')
_REPO = flags.DEFINE_string('scale_repo', None, 'The adtr_jax checkout whose CLI runs the stages '
                            '(default: this one).')
_OUT = flags.DEFINE_string('scale_out', None, 'Also append the JSON lines to this file.')
_KEEP = flags.DEFINE_bool('scale_keep', False, 'Keep each N\'s data, cache and runs (default: deleted).')
_PROCESSES = flags.DEFINE_list('scale_processes', ['1'], 'Numbers of processes that run each stage '
                               '(each one run; e.g. 1,2: the per-process peaks of 2 processes beside 1).')


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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_stage(args: list[str], cwd: pathlib.Path, log: pathlib.Path, processes: int = 1) -> dict:
  """`python -m adtr_jax.main *args` in cwd, as `processes` processes of one run (jax.distributed on
  127.0.0.1, one CPU device each) -> {'seconds', 'peak_rss_mib' (the largest child's ru_maxrss),
  'peak_anon_mib' (the largest child's RssAnon, sampled: _Sampler), 'exit' (the first non-zero exit
  status, else 0)}, and with several processes 'peak_rss_mib_per_process' and
  'peak_anon_mib_per_process'; the output of process i goes to `log` (i = 0) or log.<i>."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get('PYTHONPATH', '')]))
  if processes > 1:   # one CPU device each (not the fake devices a test may have asked for)
    env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                                if not f.startswith('--xla_force_host_platform_device_count'))
  port = _free_port()
  start = time.perf_counter()
  children, outs = [], []
  for i in range(processes):
    dist = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}', f'--process_id={i}']
            if processes > 1 else [])
    outs.append((log if i == 0 else log.with_name(f'{log.name}.{i}')).open('w'))
    children.append(subprocess.Popen([sys.executable, '-m', 'adtr_jax.main', *args, *dist], cwd=cwd, env=env,
                                     stdout=outs[-1], stderr=subprocess.STDOUT))
  sampler = _Sampler([c.pid for c in children])
  peaks, codes = [], []
  for child, out in zip(children, outs):
    _, status, usage = sampler.wait(child.pid)   # this child's own peak, not all children's
    child.returncode = os.waitstatus_to_exitcode(status)
    out.close()
    peaks.append(round(usage.ru_maxrss / 1024, 1))
    codes.append(child.returncode)
  anon = [round(sampler.anon[c.pid] / 1024, 1) for c in children]
  out = {'seconds': round(time.perf_counter() - start, 2), 'peak_rss_mib': max(peaks),
         'peak_anon_mib': max(anon), 'exit': next((c for c in codes if c), 0)}
  if processes > 1:
    out['peak_rss_mib_per_process'] = peaks
    out['peak_anon_mib_per_process'] = anon
  return out


class _Sampler:
  """The largest RssAnon (KiB, /proc/<pid>/status) of each child, read every SAMPLE_S while waiting.
  ru_maxrss also counts the pages of files a process maps (the image, feature and pixel-run caches
  are memory-mapped) that it has read, which the kernel drops under pressure; RssAnon is what the
  process allocated itself. Sampled: a peak shorter than SAMPLE_S can be missed."""

  SAMPLE_S = 0.05

  def __init__(self, pids: list[int]):
    self.anon = {pid: 0 for pid in pids}

  def _read(self, pid: int) -> None:
    try:
      for line in pathlib.Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('RssAnon:'):
          self.anon[pid] = max(self.anon[pid], int(line.split()[1]))
    except (OSError, ValueError):
      pass   # exited (or no /proc): the last sample stands

  def wait(self, pid: int):
    """os.wait4(pid) while sampling every child still running."""
    while True:
      for p in self.anon:
        self._read(p)
      done, status, usage = os.wait4(pid, os.WNOHANG)
      if done:
        return done, status, usage
      time.sleep(self.SAMPLE_S)


def stage_key(stage: str, processes: int) -> str:
  """A stage's key in the JSON line: 'eval', or 'eval_x2' for the same stage on 2 processes."""
  return stage if processes == 1 else f'{stage}_x{processes}'


def measure(n: int, *, source, scratch, image_size: int, config: str, epochs: int = 1,
            stages=STAGES, overrides=(), repo=None, processes=(1,)) -> dict:
  """One N: builds the category under scratch/n<N>/ and runs the stages. Returns the JSON line's dict:
  {'n', 'image_size', 'config', 'build_seconds', '<stage>': run_stage's dict, ...}; a stage that
  fails (exit != 0) ends the line with its output's last lines under 'error'. Each stage runs
  once per number of `processes` (stage_key), each multi-process run with
  '<stage>_x<P>_peak_ratio': its largest process's peak over the one-process peak."""
  repo = pathlib.Path(repo or pathlib.Path(__file__).resolve().parents[1])
  processes = sorted({1, *processes})   # the others' peaks are compared with one process's
  base = pathlib.Path(scratch).resolve() / f'n{n}'
  shutil.rmtree(base, ignore_errors=True)
  start = time.perf_counter()
  cat = build_category(source, base / 'data', f'scale{n}', n, image_size)
  out = {'n': n, 'image_size': image_size, 'config': config, 'build_seconds': round(time.perf_counter() - start, 2)}
  def common(suffix: str) -> list[str]:
    return [f'--config={config}', f'--workdir={base / f"work{suffix}"}', f'--config.dataset.root={base / "data"}',
            f'--config.dataset.category={cat.name}', f'--config.dataset.image_size={image_size}',
            f'--config.dataset.cache_dir={base / f"cache{suffix}"}', f'--config.train.num_epochs={epochs}',
            '--config.train.min_steps=0', *overrides]
  extra = {'train': ['--mode=train'], 'eval': ['--mode=eval'],
           'predict': ['--mode=predict', f'--predict_dir={cat / "train" / "good"}']}
  for stage in stages:
    for p in processes:
      key = stage_key(stage, p)
      # Training on several processes starts afresh in its own workdir and cache (it prepares the data
      # and writes the feature cache itself); eval and predict read the one-process run's.
      suffix = f'_x{p}' if stage == 'train' and p > 1 else ''
      out[key] = run_stage([*common(suffix), *extra[stage]], repo, base / f'{key}.log', p)
      if out[key]['exit']:
        out['error'] = (base / f'{key}.log').read_text()[-2000:]
        return out
      if p > 1 and stage in out:
        out[f'{key}_peak_ratio'] = round(out[key]['peak_rss_mib'] / out[stage]['peak_rss_mib'], 3)
  return out


def slopes(lines: list[dict]) -> dict:
  """Each stage's slope of peak RSS ('<stage>_bytes_per_image') and of peak RssAnon
  ('<stage>_anon_bytes_per_image'), bytes per image, between the smallest and the largest N."""
  done = [x for x in lines if 'error' not in x]
  if len(done) < 2:
    return {}
  lo, hi = min(done, key=lambda x: x['n']), max(done, key=lambda x: x['n'])
  out = {}
  for key in (k for k in lo if k in hi and isinstance(lo[k], dict)):
    for field, name in (('peak_rss_mib', f'{key}_bytes_per_image'), ('peak_anon_mib', f'{key}_anon_bytes_per_image')):
      if field in lo[key] and field in hi[key]:
        out[name] = round((hi[key][field] - lo[key][field]) * 2**20 / (hi['n'] - lo['n']))
  return out


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
                         overrides=_OVERRIDE.value, repo=_REPO.value,
                         processes=sorted({int(x) for x in _PROCESSES.value})))
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
