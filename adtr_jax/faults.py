"""Failpoints for the fault-injection tests (tests/test_faults.py).

`point(name)` marks a moment a run can be killed at: data preparation ('prepare', 'resize'), the
feature cache ('feature'), a chunk of training steps ('chunk'), a checkpoint save in flight ('save'),
calibration ('calibrate'), evaluation ('eval') and prediction ('predict'). With the environment
variable ADTR_JAX_KILL_AT=<name>:<n> the process SIGKILLs itself the n-th time it reaches <name>
(`<name>:<n>@<p>`: only JAX process p), and prints `adtr_jax: fault: killed at <name>:<n>` first, so
the test knows which moment it hit. Unset, as in every real run, a point costs one truth test.
"""
from __future__ import annotations

import os
import signal
import sys

_SPEC = os.environ.get('ADTR_JAX_KILL_AT', '')
_SEEN: dict[str, int] = {}


def point(name: str) -> None:
  if not _SPEC:
    return
  target, _, rest = _SPEC.partition(':')
  count, _, process = rest.partition('@')
  if name != target:
    return
  _SEEN[name] = _SEEN.get(name, 0) + 1
  if _SEEN[name] != int(count):
    return
  if process:
    import jax
    if jax.process_index() != int(process):
      return
  print(f'adtr_jax: fault: killed at {name}:{count}', file=sys.stderr, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
