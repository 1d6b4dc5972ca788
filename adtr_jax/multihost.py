"""Multi-process runs: joining the other processes, checking they all run the same thing, noticing a
lost one, and shared files (one process writes them, the others wait and then read them)."""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import os
import pathlib
import secrets
import shutil
import socket
import threading
import time
from typing import Callable, Iterator, TypeVar

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
  that stopped answering goes unnoticed before the others end with an error (lost_peer_bound_s: a
  third of it, + 2 s at most), and how long a process that failed waits at exit for the others (JAX's
  shutdown barrier; its default, 300 s, would keep the others waiting in their next collective that
  long)."""
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
    # JAX's own heartbeat check is the backstop: it aborts with its own message, so it gets twice the
    # time the watchdog has to give ours.
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(timeout_s),
                               heartbeat_timeout_seconds=int(2 * timeout_s),
                               shutdown_timeout_seconds=int(timeout_s))
  except ValueError as e:  # nothing to auto-detect, or values jax refuses
    raise errors.ConfigError(f'jax.distributed.initialize: {e}') from e
  if jax.process_count() > 1:
    _start_watchdog(timeout_s)


# --- A lost process --------------------------------------------------------------------------------
# A process that is killed or hangs must not leave the others waiting, and they should say which one
# was lost. JAX notices too, but only by aborting the interpreter with its own message (its callback
# for this cannot be set from Python), and gloo's collectives fail at once with "Connection closed by
# peer", naming no process. So every process beats in the coordinator's key-value store, and a
# watchdog thread ends this process with one line when a peer's beat stops for LOST_AFTER of
# --distributed_timeout_s (at most that fraction + one beat after the loss) and the peer did not leave
# on purpose (main.py marks a finished or failed process).
# Not covered: losing process 0 itself. It runs the coordination service, and the others' JAX
# clients abort the interpreter the moment it goes, before any Python code runs (docs/multihost.md).

# Of --distributed_timeout_s. JAX's own check, given twice the timeout, fired 0.65 of its time after a
# kill (measured), so about 1.3x the timeout: ours comes first.
LOST_AFTER = 1 / 3
_KEY = 'adtr_jax/watchdog'


class _Watchdog(threading.Thread):
  """Beats every `period_s`. Ends the process (exit 1, one line) when a peer has not beaten for
  `lost_after_s` and did not leave, when a peer left with an error `lost_after_s` ago and this process
  still runs, or when the coordinator stops answering."""

  def __init__(self, client, me: int, count: int, timeout_s: float):
    super().__init__(name='adtr_jax watchdog', daemon=True)
    self.client, self.me, self.count, self.timeout_s = client, me, count, timeout_s
    self.lost_after_s = timeout_s * LOST_AFTER
    self.period_s = min(1.0, self.lost_after_s / 5)   # lost_peer_bound_s counts on both
    self.stop = threading.Event()
    # Local clocks only: peer -> (its last beat, when this process first saw that beat), and
    # peer -> ('ok' or 'error', when this process first saw it leave).
    self.beats = {p: (None, time.monotonic()) for p in range(count) if p != me}
    self.left: dict[int, tuple[str, float]] = {}

  def run(self):
    beat = 0
    while not self.stop.wait(self.period_s):
      try:
        beat += 1
        self.client.key_value_set(f'{_KEY}/beat/{self.me}', str(beat), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(f'{_KEY}/'))
      except Exception as e:  # noqa: BLE001  the coordinator (process 0) is gone or unreachable
        _lost(f'lost process 0 (the coordinator): it stopped answering ({type(e).__name__})', self)
        return
      self.check(values, time.monotonic())

  def check(self, values: dict, now: float) -> None:
    for p, (value, since) in self.beats.items():
      if p not in self.left and f'{_KEY}/left/{p}' in values:
        self.left[p] = (values[f'{_KEY}/left/{p}'], now)
      if p in self.left:
        how, at = self.left[p]
        if how != 'ok' and now - at > self.lost_after_s:   # this process would wait for it forever
          _lost(f'process {p} of {self.count} failed and left the run {now - at:.0f} s ago (see its '
                'own output)', self)
      elif values.get(f'{_KEY}/beat/{p}') != value:
        self.beats[p] = (values.get(f'{_KEY}/beat/{p}'), now)
      elif now - since > self.lost_after_s:
        _lost(f'lost process {p} of {self.count}: no heartbeat for {now - since:.0f} s (a process '
              f'silent for --distributed_timeout_s/3 = {self.lost_after_s:g} s was killed, crashed or '
              'hung; see its own output)', self)

  def all_well_since(self, t: float) -> bool:
    """Every peer has beaten after monotonic time t, or finished."""
    return all(self.left[p][0] == 'ok' if p in self.left else since > t
               for p, (_, since) in self.beats.items())


_WATCHDOG: _Watchdog | None = None


def lost_peer_bound_s(timeout_s: float) -> float:
  """Seconds from a peer's loss to the others' one-line error: its beat must stay the same for
  LOST_AFTER of the timeout, seen by checks one beat apart, from a beat up to one beat old."""
  lost_after = timeout_s * LOST_AFTER
  return lost_after + 2 * min(1.0, lost_after / 5)


def _lost(message: str, watchdog: _Watchdog) -> None:
  """Ends this process at once, from any thread: its main thread may be blocked in a collective with
  the lost peer, and exit handlers would wait at JAX's shutdown barrier for it."""
  if watchdog.stop.is_set():   # this process is leaving on its own
    return
  os.write(2, f'\nadtr_jax: error: {message}\n'.encode())
  os._exit(1)


def _start_watchdog(timeout_s: float) -> None:
  global _WATCHDOG
  from jax._src import distributed   # the client JAX connected (multihost_utils uses it the same way)
  _WATCHDOG = _Watchdog(distributed.global_state.client, jax.process_index(), jax.process_count(),
                        timeout_s)
  _WATCHDOG.start()
  # Registered after jax.distributed.initialize, so it runs before JAX's shutdown (atexit is LIFO):
  # a process that exits without leave() (an uncaught error) is marked as failed.
  atexit.register(leave, False)


def leave(ok: bool) -> None:
  """This process ends on purpose (ok: finished; else failed with an error it reported): the others'
  watchdogs stop watching it, and its own stops (the coordinator may go away as the run ends).
  Idempotent: the first call's `ok` stands."""
  watchdog = _WATCHDOG
  if watchdog is None or watchdog.stop.is_set():
    return
  watchdog.stop.set()
  watchdog.join()
  try:
    watchdog.client.key_value_set(f'{_KEY}/left/{watchdog.me}', 'ok' if ok else 'error',
                                  allow_overwrite=True)
  except Exception:  # noqa: BLE001  the coordinator is gone: no one is left to tell
    pass


def report_lost_peer() -> None:
  """Called on an error in a multi-process run before it is reported: a collective fails at once when
  a peer dies, so this waits until every peer has beaten again (about a second: the error is this
  process's own, and returns) or the watchdog names the lost or failed peer (one line, exit 1)
  instead of a traceback."""
  watchdog = _WATCHDOG
  if watchdog is None or watchdog.stop.is_set():
    return
  t0 = time.monotonic()
  deadline = t0 + 2 * watchdog.lost_after_s + 2 * watchdog.period_s
  while time.monotonic() < deadline and watchdog.is_alive() and not watchdog.all_well_since(t0):
    time.sleep(watchdog.period_s / 4)


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
  barrier(what)
  return result if first else fn()


def barrier(what: str) -> None:
  """Returns once every process got here (a collective: every process must call it, in the same
  order). On one process it returns at once."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'adtr_jax {what}')


def gather(x) -> np.ndarray:
  """Every process's numpy array `x` (same shape and dtype on all), stacked by process index:
  [processes, *x.shape], bit for bit (float64 included: it travels as bytes, since JAX without x64
  would round it to float32). A collective; x[None] on one process."""
  x = np.ascontiguousarray(x)
  if jax.process_count() == 1:
    return x[None]
  from jax.experimental import multihost_utils
  raw = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint8)))   # [P, bytes]
  return np.ascontiguousarray(raw).view(x.dtype).reshape(len(raw), *x.shape)


def gather_flags(flag: bool) -> list[bool]:
  """Every process's `flag`, by process index (a collective; [flag] on one process)."""
  return [bool(x) for x in gather(np.asarray(int(flag), np.int32))]


def from_first(fn: Callable[[], int], what: str) -> int:
  """fn() on process 0, its result (an int in [0, 2**31)) returned on every process: e.g. whether a
  shared file exists and the name of the folder process 0 made for it, so that all processes take
  the same branch. A collective (every process calls it; the others wait for process 0's fn)."""
  value = int(fn()) if jax.process_index() == 0 else 0
  if not 0 <= value < 2**31:   # on process 0, before the others are told anything
    raise ValueError(f'{what}: from_first shares ints in [0, 2**31), got {value}')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    value = int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))
  return value


# --- Small values between processes ----------------------------------------------------------------
# The parts of a reduction (inference.reduce_split) and what process 0 makes of them (a threshold, a
# report) are small JSON values: they travel through the coordinator's key-value store, never as
# device arrays. Every process makes the same exchanges in the same order (like collectives), so the
# n-th exchange has the same key everywhere.
_EXCHANGES = itertools.count()
_KV_TIMEOUT_MS = 60_000   # after the barrier every value is there: this only bounds a lost coordinator


def _client():
  from jax._src import distributed   # the client JAX connected (as the watchdog)
  return distributed.global_state.client


def gather_json(value, what: str) -> list | None:
  """Every process's `value` (JSON-serialisable, small) on process 0, by process index; None on the
  others. A collective: it returns once every process has given its value. [value] on one process."""
  if jax.process_count() == 1:
    return [value]
  key = f'adtr_jax/exchange/{next(_EXCHANGES)}'
  client = _client()
  client.key_value_set(f'{key}/{jax.process_index()}', json.dumps(value))
  barrier(what)
  if jax.process_index() != 0:
    return None
  return [json.loads(client.blocking_key_value_get(f'{key}/{p}', _KV_TIMEOUT_MS))
          for p in range(jax.process_count())]


def share_json(value, what: str):
  """Process 0's `value` (JSON-serialisable, small) on every process (the others' `value` is
  ignored). A collective."""
  if jax.process_count() == 1:
    return value
  key = f'adtr_jax/exchange/{next(_EXCHANGES)}'
  if jax.process_index() == 0:
    _client().key_value_set(key, json.dumps(value))
  barrier(what)
  return value if jax.process_index() == 0 else json.loads(
      _client().blocking_key_value_get(key, _KV_TIMEOUT_MS))


@contextlib.contextmanager
def scratch(parent: pathlib.Path, what: str) -> Iterator[pathlib.Path]:
  """A new, empty folder parent/scratch-<what>-<token>, the same on every process (parent must be
  shared by them, as the workdir and the cache are), removed by process 0 when the block ends (also
  on an error). A collective on entry (process 0 draws the token)."""
  token = from_first(lambda: secrets.randbits(31), f'{what} scratch folder')
  folder = pathlib.Path(parent) / f'scratch-{what}-{token:08x}'
  folder.mkdir(parents=True, exist_ok=True)
  try:
    yield folder
  finally:
    if jax.process_index() == 0:
      shutil.rmtree(folder, ignore_errors=True)
