"""What several tests do with trained model folders: run the CLI, kill it after its first checkpoint,
restore a model's parameters, and compare two runs' parameters; and every row of a scored split."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from adtr_jax import checkpoint, inference, paths, sharding, split_pass, trained
from tests.conftest import REPO


def cli(args, **kw) -> subprocess.Popen:
  """`python -m adtr_jax.main *args` on 2 fake CPU devices, stdout and stderr together."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.Popen([sys.executable, '-m', 'adtr_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def steps(model_dir: pathlib.Path) -> list[int]:
  """The finished checkpoint steps of a model folder."""
  return checkpoint.saved_steps(paths.checkpoints(model_dir))


def kill_after_first_checkpoint(args, model_dir: pathlib.Path, total_steps: int) -> int:
  """Starts the CLI with `args`, SIGKILLs it once model_dir holds a checkpoint; returns its last step."""
  proc = cli(args)
  deadline = time.time() + 300
  while not steps(model_dir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert steps(model_dir), proc.stdout.read()[-3000:]
  killed_at = steps(model_dir)[-1]
  assert killed_at < total_steps, 'the run finished before it was killed'
  return killed_at


def params(config, model_dir: pathlib.Path, mesh=None) -> tuple[int, dict, trained.Restored]:
  """(restored step, {leaf path: numpy array}, the restored model) of the model in model_dir at the
  checkpoint config.eval.checkpoint picks."""
  restored = trained.restore(config, model_dir, mesh or sharding.make_mesh())
  leaves = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(restored.model.params)[0]}
  return restored.meta['step'], leaves, restored


def max_diff(a: dict, b: dict) -> float:
  """The largest absolute difference between two runs' parameters ({leaf path: array}, same leaves)."""
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


class Rows:
  """A reducer (adtr_jax.reducers.Reducer) that keeps every row it is given, for tests on one process:
  result() -> {'maps', 'scores', 'labels', 'masks', 'index'} with entry i = source row i."""

  def __init__(self, num_rows: int):
    self.num_rows = num_rows
    self.rows = {k: [] for k in ('maps', 'scores', 'labels', 'masks', 'index')}

  def add(self, rows: dict) -> None:
    for key, value in self.rows.items():
      value.append(np.array(rows[key]))

  def finish(self) -> dict:
    return {}

  def result(self, parts: list) -> dict:
    assert len(parts) == 1, 'Rows keeps the rows of one process'
    return split_pass.in_source_order(self.rows, self.num_rows, 'rows')


def score_rows(config, source, model, mesh, desc: str = 'rows') -> dict:
  """Every row of `source` scored by inference.reduce_split, in memory (Rows' result)."""
  return inference.reduce_split(config, source, model, mesh, desc, [Rows(len(source))])[0]
