"""A model's training and evaluation record in its workdir: `train_log.jsonl` and TensorBoard event files.

`tensorboard --logdir <workdir>` shows every model below it as a run (a category, a stacked member, a
sweep run). Events are written with tensorboardX, which needs protobuf only: clu.metric_writers writes
through tf.summary and so needs TensorFlow. Only process 0 writes.

A resumed run starts from its checkpoint's step, which can be older than the last logged one (a kill
between two checkpoints): the JSONL drops the records after that step and the new event file tells
TensorBoard to purge them (`purge_step`), so no step is shown twice.
"""
from __future__ import annotations

import json
import math
import numbers
import pathlib
import time

import jax
import numpy as np

JSONL = 'train_log.jsonl'


class ModelLog:
  """A training run's scalars per step: <workdir>/train_log.jsonl and TensorBoard 'train/<name>'."""

  def __init__(self, workdir: pathlib.Path, start_step: int = 0):
    self.workdir, self._writer = pathlib.Path(workdir), None
    self.active = jax.process_index() == 0
    if self.active:
      _truncate_jsonl(self.workdir / JSONL, start_step)
      from tensorboardX import SummaryWriter  # imported here: only process 0 writes events
      # TensorBoard drops the events of steps >= purge_step written before: the run logs from
      # start_step + 1 on, also a run started again from step 0 (killed before its first checkpoint).
      self._writer = SummaryWriter(str(self.workdir), purge_step=start_step + 1, flush_secs=30,
                                   filename_suffix=_unique_suffix())

  def write(self, step: int, **record) -> None:
    """One JSON line {step, **record}; every finite number of it as scalar 'train/<name>'."""
    if not self.active:
      return
    with (self.workdir / JSONL).open('a') as f:
      f.write(json.dumps(dict(step=step, **record)) + '\n')
    for name, value in record.items():
      if _is_scalar(value):
        self._writer.add_scalar(f'train/{name}', float(value), step)

  def flush(self) -> None:
    """Called at each checkpoint: a killed run's events then reach at least its last checkpoint,
    where its resume starts."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def write_eval(workdir: pathlib.Path, step: int, values: dict, images: dict[str, np.ndarray]) -> None:
  """An evaluation at checkpoint `step` into <workdir>'s TensorBoard run: each scalar metric as
  'eval/<name>', each image (uint8 [H, W, 3]) as 'eval/<name>'."""
  if jax.process_index() != 0:
    return
  from tensorboardX import SummaryWriter
  with SummaryWriter(str(workdir), filename_suffix=_unique_suffix()) as writer:
    for name, value in values.items():
      if _is_scalar(value):
        writer.add_scalar(f'eval/{name}', float(value), step)
    for name, image in images.items():
      writer.add_image(f'eval/{name}', np.asarray(image), step, dataformats='HWC')


def _unique_suffix() -> str:
  # Event files are named by the second and the host: a second writer within the same second (a quick
  # resume, the evaluation after training) would replace the first's file. TensorBoard reads them in
  # name order, which the nanoseconds keep.
  return f'.{time.time_ns()}'


def _is_scalar(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _truncate_jsonl(path: pathlib.Path, start_step: int) -> None:
  """Keeps the records of steps <= start_step (all of them for a fresh run, which starts with none)."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines if line.strip() and json.loads(line)['step'] <= start_step]
  if len(kept) != len(lines):
    path.write_text(''.join(kept))
