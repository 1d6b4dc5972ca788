"""What evaluation runs over a split: reducers, fed batch by batch on every process, merged on process 0.

One pass over a split scores it batch by batch; each process gives each reducer its own valid rows of
every batch (`add`), then its part (`finish`); process 0 merges the parts of every process (`result`)
into report entries. Memory is then bounded by the batch, not the split: a reducer keeps per-row
scalars at most (an image's score, label, sample id: a few bytes an image), and writes anything of
pixel size to files under a folder it was given, shared by the processes (adtr_jax.metric_stream's
sorted runs), or reduces it to counts.

The standard metrics' reducers and the benchmarks' protocol reducers (adtr_jax/protocol_reducers.py)
implement this interface.
"""
from __future__ import annotations

from typing import Protocol


class Reducer(Protocol):
  """Consumes one pass over a split batch by batch on every process; process 0 merges the parts."""

  def add(self, rows: dict) -> None:
    """rows: this process's valid rows of one batch: 'maps' float32 [b, S, S] (S = dataset.image_size),
    'scores' float32 [b], 'labels' int32 [b], 'masks' bool [b, S, S], 'index' int64 [b] (the split's
    row numbers: source.records[index[k]] describes row k). b may be 0."""

  def finish(self) -> object:
    """This process's part, once every batch was added: small and JSON-serialisable (large state goes
    to files under a folder the reducer was given, shared by the processes)."""

  def result(self, parts: list) -> dict:
    """On process 0: the metrics (or what was written) from every process's part, in process order."""
