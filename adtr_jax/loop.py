"""Feeding the step: where each step's batch comes from, and the jitted chunk of steps that runs it.

A run's M >= 1 models (state, keys and optimiser numbers stacked on a leading model axis, sharded on
the mesh's 'model' axis) step in lockstep. Each feed gives one model's batch of global step `step`,
with the same arguments, from one of:

* `DeviceCache`: features of K training sets in device memory [K, N', h, w, C]; the rows are drawn on
  device inside the scan, so a chunk of steps is one jitted call with no host round trip per step;
* `HostCache`: the same features on disk (feature_cache.Features; or numpy); the host reads the
  chunk's rows and sends them once;
* `Images`: images through the host input pipeline, one step per call (anomalies change the input
  every epoch, so the backbone runs in the step).

Every feed draws the rows of (key, epoch) from the one order `epoch_order`, and starts from
`state.step`: a run resumed from any checkpoint, mid-epoch included, continues with the batches it
would have seen, and the three feeds train on the same batches (tests/test_loop.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from adtr_jax import feature_cache, sharding
from adtr_jax.data import pipeline
from adtr_jax.step import key_streams


class Feed(Protocol):
  """Where a run's batches come from (DeviceCache, HostCache, Images): make_runner's contract.

  steps_per_call: steps one jitted call runs (None: a whole chunk). resident: arrays kept on the
  devices for the whole run (or None), placed with resident_sharding. host_inputs(start, num_steps):
  what one call sends from the host for global steps [start, start + num_steps) (or None), placed with
  xs_sharding; its leading axis is the step. batch(resident, x, key, hyper, step): inside the jitted
  step, one model's batch of global step `step` (x: that step's and model's slice of host_inputs;
  key, hyper: the model's key and numbers, members.numbers)."""
  steps_per_call: int | None
  resident: Any
  resident_sharding: NamedSharding | None
  xs_sharding: NamedSharding | None

  def host_inputs(self, start: int, num_steps: int) -> Any: ...

  def batch(self, resident, x, key, hyper, step) -> dict: ...


def epoch_order(key: jax.Array, epoch: jax.Array, num_rows, size: int | None = None) -> jax.Array:
  """int32 [size]: epoch `epoch`'s permutation of rows [0, num_rows), followed by the padding rows
  [num_rows, size) (size defaults to num_rows).

  Rows are sorted by random 32-bit keys. With JAX's partitionable threefry the key of row r depends
  only on (key, epoch, r), so `num_rows` may be traced and the order of a model's rows does not depend
  on `size`: a model padded to the largest training set of a stacked run visits the same rows as
  the same model trained alone.
  """
  size = num_rows if size is None else size
  data_key = jax.random.fold_in(key_streams(key)[1], epoch)
  bits = jax.random.bits(data_key, (size,), jnp.uint32)
  padding = jnp.arange(size) >= num_rows
  return jnp.lexsort((jnp.arange(size), bits, padding)).astype(jnp.int32)  # ties: by row


def step_rows(key: jax.Array, step: jax.Array, *, num_rows, steps_per_epoch, batch_size: int,
              size: int | None = None) -> jax.Array:
  """int32 [batch_size]: the rows global step `step` trains on: positions
  [(step mod steps_per_epoch) * B, ... + B) of its epoch's order (a last partial batch is dropped).
  num_rows and steps_per_epoch may be traced when `size` (static) bounds num_rows."""
  epoch, position = jnp.divmod(step, steps_per_epoch)
  return jax.lax.dynamic_slice_in_dim(epoch_order(key, epoch, num_rows, size), position * batch_size,
                                      batch_size)


def _feature_batch(features: jax.Array) -> dict:
  return {'features': features.astype(jnp.float32), 'valid': jnp.ones(features.shape[:1], bool)}


class DeviceCache:
  """features[k] [N_k, h, w, C] of K training sets (feature_cache.Features on disk, or numpy), in device
  memory as [K, N', h, w, C] on (None, 'data'), each process placing its devices' rows
  (feature_cache.place); model i reads set hyper['data'][i], its first hyper['num_rows'][i] rows."""
  steps_per_call = None   # a whole chunk in one call
  xs_sharding = None      # nothing sent from the host

  def __init__(self, features: list, mesh, batch_size: int):
    self.resident, self.size = feature_cache.place(features, mesh)
    self.resident_sharding = NamedSharding(mesh, P(None, 'data'))
    self.batch_size = batch_size

  def host_inputs(self, start: int, num_steps: int):
    return None

  def batch(self, resident, x, key, hyper, step) -> dict:
    rows = step_rows(key, step, num_rows=hyper['num_rows'], steps_per_epoch=hyper['steps_per_epoch'],
                     batch_size=self.batch_size, size=self.size)
    return _feature_batch(resident[hyper['data'], rows])


class HostCache:
  """The features of DeviceCache read from the host (feature_cache.Features: pread from the files on
  disk; or numpy); each call reads its steps' rows and sends them as one array [num_steps, M, B, h, w,
  C], each process reading only the rows of its own devices' shards: host memory is one chunk's
  share, whatever the size of the set. keys [M]: the members' keys; hyper: their stacked numbers
  (members.numbers; local), whose data, num_rows and steps_per_epoch it reads."""
  steps_per_call = None
  resident = None
  resident_sharding = None

  def __init__(self, features: list, mesh, batch_size: int, keys: jax.Array, hyper: dict):
    self.features = features
    self.xs_sharding = NamedSharding(mesh, P(None, 'model', 'data'))
    # Per model: rows [num_steps, B] of the steps given (vmapped step_rows with its static sizes).
    self._rows = [(keys[i], int(hyper['data'][i]), jax.jit(jax.vmap(functools.partial(
        step_rows, num_rows=int(hyper['num_rows'][i]), steps_per_epoch=int(hyper['steps_per_epoch'][i]),
        batch_size=batch_size), in_axes=(None, 0)))) for i in range(len(keys))]

  def host_inputs(self, start: int, num_steps: int):
    steps = jnp.asarray(start + np.arange(num_steps))
    rows = np.stack([np.asarray(fn(key, steps)) for key, _, fn in self._rows], axis=1)   # [n, M, B]
    sets = [data for _, data, _ in self._rows]
    row = self.features[0].shape[1:]

    def shard(index: tuple) -> np.ndarray:   # one addressable device's rows, [n, m, b, h, w, C]
      wanted = rows[index[:3]]
      models = range(len(sets))[index[1]]
      out = np.empty((*wanted.shape, *row), self.features[0].dtype)
      for j, m in enumerate(models):
        out[:, j] = self.features[sets[m]][wanted[:, j]]
      return out[(slice(None),) * 3 + index[3:]]

    return jax.make_array_from_callback((*rows.shape, *row), self.xs_sharding, shard)

  def batch(self, resident, x, key, hyper, step) -> dict:
    return _feature_batch(x)


class Images:
  """One model's batches of images from the host pipeline (decoding ahead in threads), in the
  epoch orders of `epoch_order`: each process decodes only its slice of every global batch.
  Consecutive steps reuse one epoch iterator; any other step (a resume) starts one that skips to it."""
  steps_per_call = 1
  resident = None
  resident_sharding = None

  def __init__(self, source, mesh, *, batch_size: int, image_size: int, key: jax.Array, fields,
               num_workers: int):
    """key: the member's key (members.member_keys); fields: the batch entries the loss reads."""
    self.source, self.batch_size, self.image_size = source, batch_size, image_size
    self.data_slice = sharding.data_slice(mesh)
    self.key, self.fields, self.num_workers = key, tuple(fields), num_workers
    self.steps_per_epoch = len(source) // batch_size
    self.xs_sharding = NamedSharding(mesh, P(None, 'model', 'data'))
    self._next_step, self._it = None, None
    self._order = jax.jit(epoch_order, static_argnums=2)

  def next(self, step: int) -> dict:
    """This process's part of the batch of global step `step` (numpy)."""
    epoch, position = divmod(step, self.steps_per_epoch)
    if step != self._next_step or position == 0:
      source = self.source.for_epoch(epoch) if hasattr(self.source, 'for_epoch') else self.source
      order = np.asarray(self._order(self.key, epoch, len(source)))
      self._it = pipeline.batches(
          source, batch_size=self.batch_size, image_size=self.image_size, drop_remainder=True,
          skip_batches=position, order=order, process_index=self.data_slice[0],
          process_count=self.data_slice[1], num_workers=self.num_workers)
    self._next_step = step + 1
    batch = next(self._it)
    return {k: batch[k] for k in self.fields}

  def host_inputs(self, start: int, num_steps: int):
    local = [self.next(s) for s in range(start, start + num_steps)]
    return {k: jax.make_array_from_process_local_data(
        self.xs_sharding, np.stack([b[k] for b in local])[:, None]) for k in self.fields}

  def batch(self, resident, x, key, hyper, step) -> dict:
    return x


def make_runner(step_fn: Callable, mesh, feed: Feed, models_per_call: int = 0) -> Callable:
  """-> run(state, frozen, keys [M], hyper [M], start, num_steps) -> (state, metrics [num_steps, M]).

  state, keys and hyper have a leading model axis sharded on 'model'; step_fn(state, frozen, batch,
  key, hyper) -> (state, metrics) is one model's pure train step. A model whose run is over
  (step == hyper['last_step']) keeps its state while longer runs go on (metrics 'active' False).
  models_per_call: train.models_per_call, how many of a device's models one vectorised call steps
  (0: by platform, see models_per_call_for); the rest go through the same jitted step in sequence
  (`lax.map`), so the result is the same either way.
  """
  mod, rep = sharding.model_sharded(mesh), sharding.replicated(mesh)
  dat = sharding.data_sharded(mesh)
  devices = mesh.shape['model']
  per_call = models_per_call_for(models_per_call, mesh.devices.flat[0].platform)

  def one(state, frozen, resident, x, key, hyper):
    batch = jax.lax.with_sharding_constraint(feed.batch(resident, x, key, hyper, state.step), dat)
    new, metrics = step_fn(state, frozen, batch, key, hyper)
    active = state.step < hyper['last_step']
    new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
    return new, dict(metrics, active=active)

  def models(state, frozen, resident, x, keys, hyper):
    xs = (state, x, keys, hyper)
    step = lambda y: one(y[0], frozen, resident, y[1], y[2], y[3])
    per_device = keys.shape[0] // devices
    if per_call == 0 or per_call >= per_device:  # every model in one vectorised call
      return jax.vmap(step, spmd_axis_name='model')(xs)
    # [M] -> [devices, M / devices]: vmapped across the 'model' devices, and on each device the models
    # in sequence, per_call at a time.
    split = lambda t: jax.tree.map(lambda a: a.reshape(devices, per_device, *a.shape[1:]), t)
    merge = lambda t: jax.tree.map(lambda a: a.reshape(devices * per_device, *a.shape[2:]), t)
    on_device = lambda y: jax.lax.map(step, y, batch_size=per_call)
    return merge(jax.vmap(on_device, spmd_axis_name='model')(split(xs)))

  def chunk(state, frozen, resident, xs, keys, hyper, num_steps):
    body = lambda s, x: models(s, frozen, resident, x, keys, hyper)
    return jax.lax.scan(body, state, xs, length=num_steps)

  @functools.cache  # one compilation per call length (at most two in a run)
  def compiled(num_steps):
    return jax.jit(functools.partial(chunk, num_steps=num_steps),
                   in_shardings=(mod, rep, feed.resident_sharding, feed.xs_sharding, mod, mod),
                   out_shardings=(mod, NamedSharding(mesh, P(None, 'model'))), donate_argnums=(0,))

  def run(state, frozen, keys, hyper, start: int, num_steps: int):
    metrics = []
    per = feed.steps_per_call or num_steps
    for begin in range(start, start + num_steps, per):
      n = min(per, start + num_steps - begin)
      xs = feed.host_inputs(begin, n)
      state, m = compiled(n)(state, frozen, feed.resident, xs, keys, hyper)
      metrics.append(m)
    return state, jax.tree.map(lambda *x: jnp.concatenate(x), *metrics)

  return run


def models_per_call_for(value: int, platform: str) -> int:
  """train.models_per_call resolved: value if > 0; 0 = every model at once (one vmapped call) on
  accelerators, one at a time on CPU, where the vmapped step gave fewer images/s than one model at a
  time (BENCHMARKS.md)."""
  return value or (1 if platform == 'cpu' else 0)
