"""Multi-process runs: joining the other processes, checking they all run the same thing, and shared
files (one process writes them, the others wait and then read them)."""
from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Callable, TypeVar

import jax
import numpy as np

from adtr_jax import errors

T = TypeVar('T')


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once `address` (host:port) accepts TCP connections; a ConfigError after timeout_s.

  jax.distributed.initialize aborts the interpreter (no Python exception) when the coordinator never
  answers, so a process other than 0 first checks that it is there."""
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise errors.ConfigError(f'--coordinator_address={address!r} must be host:port')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise errors.ConfigError(
            f'the coordinator --coordinator_address={address} did not answer within {timeout_s:g} s '
            f'(--distributed_timeout_s): start process 0 there, or fix the address ({e})') from e
      time.sleep(0.2)


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: float) -> None:
  """jax.distributed.initialize(): auto-detected (TPU pods, SLURM, Open MPI) when no value is given,
  else from all three. timeout_s bounds the wait for the coordinator at start-up, how long a process
  that stopped answering (heartbeats) goes unnoticed before the others end with an error, and how long
  a process that failed waits at exit for the others (JAX's shutdown barrier; its default, 300 s,
  would keep the others waiting in their next collective that long)."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise errors.ConfigError('--coordinator_address, --num_processes and --process_id go together: '
                               'give all three, or none with --distributed (auto-detection)')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise errors.ConfigError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
  if timeout_s <= 0:
    raise errors.ConfigError(f'--distributed_timeout_s={timeout_s} must be > 0')
  # CPU devices talk across processes through gloo (the GPU and TPU runtimes bring their own).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if process_id:  # process 0 runs the coordinator itself
    _wait_for_coordinator(coordinator_address, timeout_s)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s),
                               heartbeat_timeout_seconds=int(timeout_s),
                               shutdown_timeout_seconds=int(timeout_s))
  except ValueError as e:  # nothing to auto-detect, or values jax refuses
    raise errors.ConfigError(f'jax.distributed.initialize: {e}') from e


def run_digest(*parts) -> np.ndarray:
  """uint32 [8]: sha256 of the JSON of `parts` (what every process must agree on)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return np.frombuffer(hashlib.sha256(blob).digest(), np.uint32).copy()


def check_same_run(*parts) -> None:
  """A ConfigError on every process when the processes were started with different `parts` (config,
  workdir, mode...): they would otherwise run different programs and deadlock or silently mix runs."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digests = np.asarray(multihost_utils.process_allgather(run_digest(*parts)))   # [processes, 8]
  differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if differ:
    raise errors.ConfigError(f'processes {differ} were started with another config, --workdir or --mode '
                             f'than process 0 (sha256 of each differs): start every process with the '
                             f'same flags')


def first_then_others(fn: Callable[[], T], what: str) -> T:
  """fn() on process 0, a barrier, then fn() on every other process.

  For work that prepares shared caches (tfds data, exported datasets, resized images): fn must be
  idempotent, so on processes 1.. it finds what process 0 wrote and only reads it. Every process gets
  fn's result. On one process this is just fn().
  """
  first = jax.process_index() == 0
  result = fn() if first else None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'adtr_jax {what}')
  return result if first else fn()
