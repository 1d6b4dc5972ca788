"""Real multi-process runs for the tests/test_multiprocess*.py files: 2 JAX processes x 2 fake CPU
devices on this machine (joined through jax.distributed on 127.0.0.1, gloo collectives), compared with
1 process x 4 fake CPU devices on the same global batch. Each process is the command a user runs,
`python -m adtr_jax.main ... --coordinator_address=127.0.0.1:<port> --num_processes=2 --process_id=<i>`;
tests/multiprocess_audit/sitecustomize.py records which files each process wrote and which rows it
decoded. The tests are split into files by the runs they share (a module fixture each), so that two
pytest-xdist workers (--dist loadfile) run them side by side.

Tolerances: both layouts run the same XLA program on a 4-device ('model', 'data') mesh, but the
cross-device sums go through gloo (between processes) instead of in-process collectives, so they may
round differently: losses agree to 1e-5 relative and parameters to 1e-5 absolute after the whole run
(tests/test_train.py holds 8-way vs 1 device to the same), attention key biases to 1e-4
(assert_same_training says why), image scores to 1e-5 relative, overlays to 1/255, metrics to 1e-6.
Measured: losses 1e-7 relative, parameters < 1e-6 (key biases 3.5e-5), metrics identical. Control:
training moves the parameters by > 1e-2, so other batches or another seed would be far outside.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from adtr_jax import sharding
from tests import helpers
from tests.conftest import REPO, tiny_config

AUDIT = REPO / 'tests' / 'multiprocess_audit'
RUN_TIMEOUT_S = 400       # one CLI run on 2 busy cores, compilation included
DISTRIBUTED_TIMEOUT_S = 15   # --distributed_timeout_s: start-up wait and lost-peer detection


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Processes:
  """The processes of one run, each in its own process group (killed with it), output in files."""

  def __init__(self, tmp: pathlib.Path, tag: str):
    self.tmp, self.tag, self.procs, self.logs = tmp, tag, [], []

  def start(self, args: list[str], devices: int, process: int, audit_root: pathlib.Path):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               PYTHONPATH=os.pathsep.join([str(AUDIT), str(REPO)]),
               ADTR_TEST_AUDIT=str(self.audit_file(process)), ADTR_TEST_AUDIT_ROOT=str(audit_root))
    log = self.tmp / f'{self.tag}.{process}.log'
    self.logs.append(log)
    with log.open('w') as out:
      self.procs.append(subprocess.Popen([sys.executable, '-m', 'adtr_jax.main', *args], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

  def audit_file(self, process: int) -> pathlib.Path:
    return self.tmp / f'{self.tag}.{process}.audit.json'

  def audit(self, process: int) -> dict:
    return json.loads(self.audit_file(process).read_text())

  def output(self, process: int) -> str:
    return self.logs[process].read_text()

  def kill(self, process: int | None = None) -> None:
    for i, p in enumerate(self.procs):
      if process in (None, i) and p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, signal.SIGKILL)
        p.wait()

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> list[int]:
    """Exit codes of all; the group is killed and the test fails when one runs past `timeout`."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'{self.tag} ran past {timeout} s:\n' + '\n'.join(
          self.output(i)[-3000:] for i in range(len(self.procs))))

  def check(self, timeout: float = RUN_TIMEOUT_S) -> None:
    codes = self.wait(timeout)
    assert codes == [0] * len(codes), '\n'.join(f'process {i} exit {c}:\n{self.output(i)[-4000:]}'
                                                 for i, c in enumerate(codes))


def launch(tmp: pathlib.Path, tag: str, layout: str, args: list[str], audit_root: pathlib.Path,
           per_process=lambda i: []) -> Processes:
  """Starts the CLI with `args` as `layout` ('1x4' or '2x2': processes x fake CPU devices each)."""
  n, devices = LAYOUTS[layout]
  procs = Processes(tmp, tag)
  port = free_port()
  for i in range(n):
    dist = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}', f'--process_id={i}',
             f'--distributed_timeout_s={DISTRIBUTED_TIMEOUT_S}'] if n > 1 else [])
    procs.start([*args, *dist, *per_process(i)], devices, i, audit_root)
  return procs


@contextlib.contextmanager
def running(*started: Processes):
  """Kills whatever is still running when the block ends (a failed assertion included)."""
  try:
    yield started
  finally:
    for p in started:
      p.kill()


LAYOUTS = {'1x4': (1, 4), '2x2': (2, 2)}   # processes x fake CPU devices per process


def config_args(root, cache, workdir, *extra) -> list[str]:
  return [f'--config=tests/tiny_config.py:{root}|{cache}', f'--workdir={workdir}', *extra]


# Normal-only training from the device feature cache: 16 training images (2 held out to calibrate),
# 2 steps of 8 per epoch, 30 steps; checkpoints every 4 (for the kill-and-resume test).
NORMAL = ['--config.train.num_epochs=15', '--config.train.checkpoint_every_steps=4']
NORMAL_STEPS = 30


def params_and_losses(workdir: pathlib.Path, root, cache):
  """(final step, parameter leaves by name, {step: last logged loss})."""
  config = tiny_config(root, cache)
  step, leaves, _ = helpers.params(config, workdir, sharding.make_mesh(jax.devices()[:1]))
  losses = {}
  for line in (workdir / 'train_log.jsonl').read_text().splitlines():
    record = json.loads(line)
    losses[record['step']] = record['loss']   # a resumed run logs its replayed steps again
  return step, leaves, losses


def assert_same_training(got, want, steps: int):
  """Same final step and loss curve (rtol 1e-5); parameters within 1e-5, but attention key biases
  within 1e-4: their true gradient is zero (softmax ignores a shift shared by all keys), so Adam's
  normalised steps follow the rounding noise of the sums (measured 1x4 vs 2x2: 3.5e-5 there, < 1e-6
  everywhere else)."""
  (step1, params1, losses1), (step2, params2, losses2) = got, want
  assert step1 == step2 == steps and sorted(losses1) == sorted(losses2) == list(range(1, steps + 1))
  np.testing.assert_allclose([losses1[s] for s in losses2], list(losses2.values()), rtol=1e-5)
  assert params1.keys() == params2.keys()
  for name, value in params1.items():
    np.testing.assert_allclose(value, params2[name], atol=1e-4 if "['key']['bias']" in name else 1e-5,
                               err_msg=name)

def batched_reads(procs: Processes, process: int, kind: tuple) -> list[tuple]:
  return [tuple(r) for r in procs.audit(process)['reads'] if tuple(r[1:3]) == kind]


def assert_own_slices(two: Processes, one: Processes, kind: tuple) -> list[int]:
  """Each process decoded only its own slice of every batch: the two processes' reads from sources
  `kind` (type name, length) are disjoint within each pass over the data (one call of
  pipeline.batches) and together they are the 1x4 process's reads. One exception: a process whose
  slice of a pass's last batch is all padding decodes the epoch's last row as a filler
  (pipeline._fill_padding), so the two may share one row per pass and epoch, which the other decodes
  as its own. Returns each process's number of reads."""
  got = [batched_reads(two, p, kind) for p in (0, 1)]
  fillers = sorted(set(got[0]) & set(got[1]))
  assert len({r[:-1] for r in fillers}) == len(fillers), fillers   # at most one per pass and epoch
  assert sorted(got[0] + got[1]) == sorted(batched_reads(one, 0, kind) + fillers) and got[0] and got[1]
  return [len(g) for g in got]

def last_line(text: str) -> str:
  """The last line the program printed; gloo's C++ logging ('[Gloo] ...') can come after it, from the
  collectives' own thread as the process shuts down."""
  lines = [line for line in text.splitlines() if line.strip() and not line.startswith('[Gloo]')]
  return lines[-1] if lines else ''
