"""Device mesh and data placement: the batch is sharded on the `data` axis, the state replicated.

Works unchanged on 1 CPU, N (fake) CPU devices, a GPU and a multi-host TPU pod: each process feeds its own
slice of the global batch and `make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adtr_jax import errors


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (or the given) devices, axis name 'data'."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(global_batch: int, mesh: Mesh, field: str) -> None:
  """The global batch must split evenly over devices and processes; say which field to change if not."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise errors.ConfigError(f'{field}={global_batch} must be divisible by the number of devices ({n}) '
                             f'and processes ({jax.process_count()})')


def put_replicated(tree, mesh: Mesh):
  """Places a host pytree (identical on every process) replicated over the mesh."""
  return jax.device_put(tree, replicated(mesh))


def put_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of a batch (numpy, leading axis) -> global arrays sharded on 'data'."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array -> the full numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
