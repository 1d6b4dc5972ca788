"""Ways to feed the one pure train step (train.train_step), in chunks of steps between host visits.

* `device_cache_chunk`: features cached in device memory; one jitted `lax.scan` runs a whole chunk,
  drawing each step's rows on device from (seed, epoch, position): no host round trip per step.
* `host_cache_chunk`: features cached in host memory; the same rows, gathered on the host and sent once
  per chunk, then the same scan.
* `ImageFeeder`: images through the host input pipeline, one jitted step at a time (needed when the
  input changes every epoch, e.g. synthetic anomalies).

Every chunk runs from `state.step`, so a run resumed from any checkpoint, mid-epoch included, continues
with exactly the batches it would have seen. Each returns (state, metrics with a leading [steps] axis).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from adtr_jax import errors, sharding
from adtr_jax.data import pipeline

# fold_in constant separating the data-order stream from the dropout stream of the same seed.
_DATA_STREAM = 0x0DA7A


def epoch_order(key: jax.Array, epoch: jax.Array, num_rows, size: int | None = None) -> jax.Array:
  """int32 [size]: epoch `epoch`'s permutation of rows [0, num_rows) (every feed uses it), followed by
  the padding rows [num_rows, size) (size defaults to num_rows).

  Rows are sorted by random 32-bit keys. With JAX's partitionable threefry the key of row r depends
  only on (key, epoch, r), so `num_rows` may be traced and the order of a model's rows does not depend
  on `size`: a stacked model (stacked.py) padded to the largest training set visits the same rows as
  the same model trained alone.
  """
  size = num_rows if size is None else size
  data_key = jax.random.fold_in(jax.random.fold_in(key, _DATA_STREAM), epoch)
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
  return {'features': features.astype(jnp.float32),
          'valid': jnp.ones(features.shape[:1], bool)}


def device_cache_chunk(step_fn: Callable, mesh, *, num_rows: int, steps_per_epoch: int,
                       batch_size: int) -> Callable:
  """-> chunk(state, frozen, cache [N', h, w, C] sharded on 'data', key, start, num_steps)
  -> (state, metrics). `start` (== state.step, known on the host) is unused: the scan reads state.step.

  step_fn(state, frozen, batch, key) -> (state, metrics) is the pure train step.
  """
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  rows = functools.partial(step_rows, num_rows=num_rows, steps_per_epoch=steps_per_epoch,
                           batch_size=batch_size)

  def chunk(state, frozen, cache, key, num_steps):
    def body(state, _):
      batch = _feature_batch(cache[rows(key, state.step)])
      batch = jax.lax.with_sharding_constraint(batch, dat)
      return step_fn(state, frozen, batch, key)
    return jax.lax.scan(body, state, None, length=num_steps)

  @functools.cache  # one compilation per chunk length (at most two in a run)
  def compiled(num_steps):
    return jax.jit(functools.partial(chunk, num_steps=num_steps), in_shardings=(rep, rep, dat, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,))

  return lambda state, frozen, cache, key, start, num_steps: compiled(num_steps)(state, frozen, cache,
                                                                                 key)


def host_cache_chunk(step_fn: Callable, mesh, *, num_rows: int, steps_per_epoch: int,
                     batch_size: int) -> Callable:
  """-> chunk(state, frozen, features numpy [N, h, w, C], key, start, num_steps) -> (state, metrics)."""
  rep = sharding.replicated(mesh)
  xs_sharding = NamedSharding(mesh, P(None, 'data'))
  rows = jax.jit(jax.vmap(functools.partial(step_rows, num_rows=num_rows,
                                            steps_per_epoch=steps_per_epoch, batch_size=batch_size),
                          in_axes=(None, 0)))

  def scan(state, frozen, xs, key):
    def body(state, features):
      return step_fn(state, frozen, _feature_batch(features), key)
    return jax.lax.scan(body, state, xs)

  scan = jax.jit(scan, in_shardings=(rep, rep, xs_sharding, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))

  def chunk(state, frozen, features, key, start, num_steps):
    steps = start + np.arange(num_steps)
    idx = np.asarray(rows(key, jnp.asarray(steps)))            # [num_steps, B], same on every process
    xs = features[idx]                                         # host gather, one transfer per chunk
    xs = jax.make_array_from_callback(xs.shape, xs_sharding, lambda index: xs[index])
    return scan(state, frozen, xs, key)

  return chunk


class ImageFeeder:
  """Batches of images for global steps, from the host pipeline (decoding ahead in threads), in the
  same epoch orders as the cached feeds (epoch_order), so that both train on the same batches.

  next(step) returns this process's part of the batch of global step `step`; consecutive steps reuse
  one epoch iterator, any other step (a resume) starts a new one that skips to it.
  """

  def __init__(self, source, *, batch_size: int, image_size: int, seed: int, keys, num_workers: int,
               data_slice: tuple[int, int] | None = None):
    self.source, self.batch_size, self.image_size = source, batch_size, image_size
    # Which slice of each global batch this process reads (sharding.data_slice); default: its own.
    self.data_slice = data_slice or (jax.process_index(), jax.process_count())
    self.seed, self.keys, self.num_workers = seed, tuple(keys), num_workers
    self.steps_per_epoch = len(source) // batch_size
    self._next_step, self._it = None, None
    self._order = jax.jit(epoch_order, static_argnums=2)

  def next(self, step: int) -> dict:
    epoch, position = divmod(step, self.steps_per_epoch)
    if step != self._next_step or position == 0:
      source = self.source.for_epoch(epoch) if hasattr(self.source, 'for_epoch') else self.source
      order = np.asarray(self._order(jax.random.key(self.seed), epoch, len(source)))
      self._it = pipeline.batches(
          source, batch_size=self.batch_size, image_size=self.image_size, shuffle=True, seed=self.seed,
          epoch=epoch, drop_remainder=True, skip_batches=position, order=order,
          process_index=self.data_slice[0], process_count=self.data_slice[1],
          num_workers=self.num_workers)
    self._next_step = step + 1
    batch = next(self._it)
    return {k: batch[k] for k in self.keys}


def image_chunk(step_fn_jit: Callable, mesh, feeder: ImageFeeder) -> Callable:
  """-> chunk(state, frozen, _, key, start, num_steps) -> (state, metrics stacked over the steps)."""
  def chunk(state, frozen, _, key, start, num_steps):
    metrics = []
    for step in range(start, start + num_steps):
      batch = sharding.put_batch(feeder.next(step), mesh)
      state, m = step_fn_jit(state, frozen, batch, key)
      metrics.append(m)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
  return chunk


def stacked_cache_chunk(step_fn: Callable, mesh, *, size: int, batch_size: int,
                        models_per_call: int = 0) -> Callable:
  """Stacked models (stacked.py) from cached features in device memory: one jitted scan per chunk.

  -> chunk(state, frozen, cache [K, N', h, w, C] on (None, 'data'), keys [M], hyper [M], num_steps)
  -> (state, metrics [num_steps, M]). state, keys and hyper have a leading model axis sharded on
  'model'; model i reads category hyper['data'][i] of the cache, its first hyper['num_rows'][i] rows,
  in its own epoch order. A model whose run is over (step == hyper['last_step']) keeps its state
  unchanged while longer runs go on (metrics 'active' False).

  step_fn(state, frozen, batch, key, hyper) -> (state, metrics) is one model's pure train step.
  models_per_call: train.models_per_call, how many of a device's models one vectorised call steps
  (0: by the mesh's platform, see models_per_call_for()); the rest of them go through the same jitted
  step in sequence (`lax.map`), so the result is the same either way.
  """
  mod, rep, dat = sharding.model_sharded(mesh), sharding.replicated(mesh), sharding.data_sharded(mesh)
  cache_sharding = NamedSharding(mesh, P(None, 'data'))

  def one(state, frozen, cache, key, hyper):
    rows = step_rows(key, state.step, num_rows=hyper['num_rows'],
                     steps_per_epoch=hyper['steps_per_epoch'], batch_size=batch_size, size=size)
    batch = _feature_batch(cache[hyper['data'], rows])
    batch = jax.lax.with_sharding_constraint(batch, dat)   # + 'model' from spmd_axis_name
    new, metrics = step_fn(state, frozen, batch, key, hyper)
    active = state.step < hyper['last_step']
    new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
    return new, dict(metrics, active=active)

  devices = mesh.shape['model']
  per_call = models_per_call_for(models_per_call, mesh.devices.flat[0].platform)

  def stacked(state, frozen, cache, keys, hyper):
    xs = (state, keys, hyper)
    per_device = keys.shape[0] // devices
    if per_call == 0 or per_call >= per_device:  # every model in one vectorised call
      return jax.vmap(lambda x: one(x[0], frozen, cache, x[1], x[2]), spmd_axis_name='model')(xs)
    # [M] -> [devices, M / devices]: vmapped across the 'model' devices, and on each device the models
    # in sequence, per_call at a time.
    split = lambda t: jax.tree.map(lambda x: x.reshape(devices, per_device, *x.shape[1:]), t)
    merge = lambda t: jax.tree.map(lambda x: x.reshape(devices * per_device, *x.shape[2:]), t)
    on_device = lambda x: jax.lax.map(lambda y: one(y[0], frozen, cache, y[1], y[2]), x,
                                      batch_size=per_call)
    return merge(jax.vmap(on_device, spmd_axis_name='model')(split(xs)))

  def chunk(state, frozen, cache, keys, hyper, num_steps):
    return jax.lax.scan(lambda s, _: stacked(s, frozen, cache, keys, hyper), state, None,
                        length=num_steps)

  @functools.cache  # one compilation per chunk length (at most two in a run)
  def compiled(num_steps):
    return jax.jit(functools.partial(chunk, num_steps=num_steps),
                   in_shardings=(mod, rep, cache_sharding, mod, mod),
                   out_shardings=(mod, NamedSharding(mesh, P(None, 'model'))), donate_argnums=(0,))

  return lambda state, frozen, cache, keys, hyper, num_steps: compiled(num_steps)(state, frozen, cache,
                                                                                  keys, hyper)


def models_per_call_for(value: int, platform: str) -> int:
  """train.models_per_call resolved: value if > 0; 0 = every model at once (one vmapped call) on
  accelerators, one at a time on CPU, where the vmapped step ran at 0.72-0.84x of one model's images/s
  (BENCHMARKS.md)."""
  if value < 0:
    raise errors.ConfigError(f'train.models_per_call={value} must be >= 0')
  return value or (1 if platform == 'cpu' else 0)
