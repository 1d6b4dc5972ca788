"""Bad multi-process flags end the command with one line naming the flag and exit status 2 (one process
each: nothing to join)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.multiprocess_runs import config_args, free_port, last_line


@pytest.mark.parametrize('flags,message', [
    (['--coordinator_address=127.0.0.1:9', '--num_processes=2', '--process_id=2'],
     '--process_id=2 must be in [0, --num_processes=2)'),
    (['--num_processes=2'], '--coordinator_address, --num_processes and --process_id go together'),
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=1'],
     "--coordinator_address='localhost' must be host:port"),
    (['--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
      '--distributed_timeout_s=2'],
     'the coordinator --coordinator_address=127.0.0.1:{port} did not answer within 2 s'),
])
def test_bad_distributed_flags_are_one_line_errors(toy_root, tmp_path, flags, message):
  """Exit status 2 and one line naming the flag; a coordinator that never answers (nothing listens on
  the port) is reported after --distributed_timeout_s, not by an abort of the interpreter."""
  port = free_port()
  flags = [f.format(port=port) for f in flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, '-m', 'adtr_jax.main',
                         *config_args(toy_root, tmp_path / 'cache', tmp_path / 'work'), *flags],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert last_line(proc.stderr).startswith('adtr_jax: error: ' + message.format(port=port))
  assert time.monotonic() - t0 < 60
