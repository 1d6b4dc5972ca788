"""Shared files on multi-host runs: one process writes them, the others wait and then read them."""
from __future__ import annotations

from typing import Callable, TypeVar

import jax

T = TypeVar('T')


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
