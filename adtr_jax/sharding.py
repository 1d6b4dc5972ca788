"""Device mesh and data placement: each model's batch is sharded on the `data` axis, the models'
stacked states on the `model` axis.

The mesh is 2-D, ('model', 'data'). A run's M >= 1 models (train.py) lie side by side on a leading
model axis spread over 'model' (`group_mesh`: train.model_axis rows of devices), and each model's batch
over 'data'; evaluation uses one row ('model' of size 1).

Works unchanged on 1 CPU, N (fake) CPU devices, a GPU and a multi-host TPU pod: each process feeds its own
slice of the global batch and `make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adtr_jax import errors


def make_mesh(devices=None, model_axis: int = 1) -> Mesh:
  """A ('model', 'data') mesh over all (or the given) devices: `model_axis` rows of devices, each row
  one data-parallel group."""
  devices = jax.devices() if devices is None else list(devices)
  if model_axis < 1 or len(devices) % model_axis:
    raise errors.ConfigError(f'train.model_axis={model_axis} must divide the number of devices '
                             f'({len(devices)})')
  return Mesh(np.asarray(devices).reshape(model_axis, -1), ('model', 'data'))


def group_mesh(model_axis: int, num_models: int) -> tuple[Mesh, str]:
  """The one mesh rule for `num_models` models that step together (the driver, validation and the
  benchmark all use it): train.model_axis rows of devices along 'model' when it divides the number of
  models, else one row (every model on every device). Returns (mesh, why it has the rows it has)."""
  if num_models % model_axis == 0:
    return make_mesh(model_axis=model_axis), f'{model_axis} x {jax.device_count() // model_axis} mesh'
  return make_mesh(model_axis=1), (f'1 x {jax.device_count()} mesh: train.model_axis={model_axis} does '
                                   f'not divide the {num_models} models that step together')


def data_size(mesh: Mesh) -> int:
  """Devices along 'data': what one model's batch is split over."""
  return mesh.shape['data']


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def model_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis = stacked models, spread over 'model' (each model's arrays whole on its devices)."""
  return NamedSharding(mesh, P('model'))


def _data_positions(mesh: Mesh) -> dict[int, set]:
  """{process index: the positions along 'data' of its devices}."""
  positions: dict[int, set] = {}
  for (_, j), device in np.ndenumerate(mesh.devices):
    positions.setdefault(device.process_index, set()).add(j)
  return positions


def data_slice(mesh: Mesh) -> tuple[int, int]:
  """(which slice, how many slices) of every global batch this process reads: a batch sharded on 'data'
  is split between the groups of processes that hold different 'data' positions. Processes that hold
  the same positions (a 'model' axis across processes: stacked models, one per process) read the same
  rows, since make_array_from_process_local_data takes from each process the rows of its devices."""
  positions = _data_positions(mesh)
  blocks = sorted({tuple(sorted(p)) for p in positions.values()})
  if [j for b in blocks for j in b] != list(range(mesh.shape['data'])) or len({len(b) for b in blocks}) > 1:
    raise ValueError(f'each process must hold an equal, contiguous block of the "data" axis: {blocks}')
  return blocks.index(tuple(sorted(positions[jax.process_index()]))), len(blocks)


def check_batch_size(global_batch: int, mesh: Mesh, field: str) -> None:
  """The global batch must split evenly over devices and processes; say which field to change if not."""
  n = data_size(mesh)
  if global_batch % n or global_batch % jax.process_count():
    raise errors.ConfigError(f'{field}={global_batch} must be divisible by the number of devices along "data" ({n}) '
                             f'and processes ({jax.process_count()})')


def put(tree, sharding: NamedSharding):
  """Places a pytree that is identical on every process (numpy, or arrays on this process's devices,
  PRNG keys included) with `sharding`.

  Leaves go through host memory: on a multi-process run jax.device_put refuses an array committed to
  one local device for a sharding that spans other processes' devices.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)   # already global: a reshard
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)
  return jax.tree.map(one, tree)


def put_replicated(tree, mesh: Mesh):
  """Places a pytree identical on every process replicated over the mesh (see put)."""
  return put(tree, replicated(mesh))


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


def local_rows(x) -> np.ndarray:
  """This process's rows of a global array sharded on its leading axis over 'data' -> numpy: the rows
  it fed with put_batch, in that order, and nothing of the other processes' (no gather). Devices that
  hold the same rows (a 'model' axis) give them once."""
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def reduces_rows(mesh: Mesh) -> bool:
  """Whether this process is the first of those that read its slice of every batch (data_slice): the
  one that hands those rows on to the reductions. Processes that hold the same 'data' positions (a
  'model' axis across processes) read the same rows, which must be counted once."""
  data_slice(mesh)   # checks the layout
  positions = _data_positions(mesh)
  mine = positions[jax.process_index()]
  return jax.process_index() == min(p for p, held in positions.items() if held == mine)
