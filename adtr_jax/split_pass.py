"""One pass over a split, for inference (scoring, prediction, the feature cache): every row once, in
global batches, each process decoding only its rows; results are put back in the split's order by the
source index that travels with each row.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from adtr_jax import faults, sharding
from adtr_jax.data import pipeline


def pass_order(n: int, batch_size: int, parts: int) -> np.ndarray:
  """int64 [n]: the rows in the order the pass visits them. Within each global batch, row j goes to
  slice j mod `parts` (pipeline.batches gives slice p the positions [p*b, (p+1)*b) of the batch).

  Why not contiguous slices: results are paired with their rows by the gathered index alone, and
  dealing rows in turn makes every multi-process pass depend on that pairing (pairing by position
  would show other images' maps, which tests/test_multiprocess.py checks) instead of only unusual
  layouts. On one slice this is the split's order."""
  rows = np.arange(n, dtype=np.int64)
  if parts == 1:
    return rows
  starts = rows - rows % batch_size                 # first row of each row's batch
  return rows[np.lexsort(((rows - starts), (rows - starts) % parts, starts))]


def batches(source, mesh, *, batch_size: int, image_size: int, num_workers: int, desc: str,
            leave: bool = True, field: str = 'eval.batch_size') -> Iterator[dict]:
  """This process's rows of each global batch of one pass over `source` (pipeline.batches' dicts),
  with a progress bar on process 0. 'index' int32 [b]: the source row of each (JAX's default integer
  width, so it can be gathered like the results), -1 for padding (valid=False). `field` names
  batch_size when it does not split over the devices and processes."""
  sharding.check_batch_size(batch_size, mesh, field)
  part, parts = sharding.data_slice(mesh)   # this process's slice of each batch
  n = len(source)
  it = pipeline.batches(source, batch_size=batch_size, image_size=image_size,
                        drop_remainder=False, process_index=part, process_count=parts,
                        num_workers=num_workers, order=pass_order(n, batch_size, parts))
  for batch in tqdm(it, total=pipeline.num_batches(n, batch_size, drop_remainder=False), desc=desc,
                    unit='batch', leave=leave, disable=jax.process_index() != 0):
    batch['index'] = batch['index'].astype(np.int32)
    faults.point(desc.split(' ')[0])   # 'feature', 'calibrate', 'eval', 'predict'
    yield batch


def in_source_order(rows: dict[str, list[np.ndarray]], n: int, what: str) -> dict[str, np.ndarray]:
  """Valid rows gathered batch by batch ({name: [arrays [b_valid, ...]]}, 'index' among them) ->
  {name: [n, ...]} where entry i is source row i, placed by its gathered index (not its position).
  A RuntimeError names `what` when a row came twice or never."""
  result = {k: np.concatenate(v) for k, v in rows.items()}
  order = np.argsort(result['index'], kind='stable')
  result = {k: v[order] for k, v in result.items()}
  if not np.array_equal(result['index'], np.arange(n)):
    raise RuntimeError(f'{what}: got {len(result["index"])} rows, not each of the {n} rows of the '
                       'split exactly once')
  return result
