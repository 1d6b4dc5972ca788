"""What a training run will need, said before any work (issue 36): the disk for the image and feature
caches, the device memory of the feed it picked, and the host memory of the feature memo and the host
feed; a one-line ConfigError naming the option to change when it cannot fit.

From the categories' listings alone (datasets.listed: no image is read, nothing is prepared), per
process:
* image cache (dataset.cache_dir, beside the prepared data): every split's rows x (S x S x 3 image +
  S x S mask + label) bytes, for the splits not resized yet;
* feature cache (dataset.cache_dir/features, feature_cache.py): training rows x h x w x C x bytes of
  train.feature_cache_dtype: this process's block of each set in the device feed, every row in the
  host feed; none when a cache of a set of that category, size and dtype is there (the exact check,
  by content, comes when a block is written: feature_cache._write_block);
* the feed (members.feed_kind; 'auto' settled here on an accelerator, _settle_auto): 'device' holds
  each device's share of the sets (K x N' / 'data' devices rows, N' the largest set rounded up to
  them); 'host' one chunk of rows
  (train.log_every_steps x models x batch, this process's share); 'images' a few batches of images;
* the feature memo: up to backbone.feature_memo_mb of host memory (float32 rows; off on several
  processes, see feature_cache.Embedder).

Checked:
* disk: the new caches against the free space of dataset.cache_dir's disk
  (--config.dataset.cache_dir);
* device memory: each device's share of the device feed against the memory JAX reports for it
  (memory_stats()['bytes_limit'], GPU and TPU) (--config.train.feature_cache=host). On CPU JAX reports
  none, and a CPU device's memory is the host's: the local devices' shares count as host memory;
* host memory: the memo, the host feed's chunk (twice on CPU: its numpy rows and their device copy)
  and, on CPU, the device feed, against the host's available memory (MemAvailable in /proc/meminfo),
  naming the largest part's option.

Only what grows with the data or is set by an option is counted: the model, its optimiser state,
activations and JAX itself need room besides. Categories of the 'elpv' and 'classes' sources are
listed by their export, so they are counted only once exported; until then their feature cache is
checked when it is written.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax
import numpy as np

from adtr_jax import errors, feature_cache, members, multihost, paths, sharding
from adtr_jax.data import builder, datasets, image_cache, pipeline
from adtr_jax.models import backbone, weights

GiB = 2**30


@dataclasses.dataclass
class Need:
  """Bytes a run will use, per process: new on disk, device memory per device, host memory by option."""
  disk: int = 0
  device: int = 0
  host: dict = dataclasses.field(default_factory=dict)   # option -> bytes
  lines: list = dataclasses.field(default_factory=list)


def feature_row_bytes(config) -> tuple[tuple[int, int, int], int]:
  """((h, w, C), bytes) of one image's cached features in train.feature_cache_dtype."""
  c, size = config.backbone, config.dataset.image_size
  if config.model.target == 'pixels':
    channels = 3 * c.out_stride ** 2
  else:
    backbone.check_layers(tuple(c.layers), c.out_stride)
    table = weights.family(c.arch).layer_channels(c.arch)
    channels = sum(table[name] for name in c.layers)
  shape = (size // c.out_stride, size // c.out_stride, channels)
  itemsize = np.dtype(feature_cache.DTYPES[config.train.feature_cache_dtype]).itemsize
  return shape, int(np.prod(shape)) * itemsize


def _rows(config, category: str) -> dict | None:
  """{'train': rows the member trains on (normal, after the calibration hold-out), 'splits': {split:
  rows}, 'new': rows of the splits not yet in the image cache}, or None when the source lists its
  files only by exporting them."""
  scan = datasets.listed(config, category)
  if scan is None:
    return None
  normal = sum(r['label'] == 0 for r in scan.splits['train'])
  held = 0 if 'validation' in scan.splits else datasets.held_out(normal, config.calibration.holdout_fraction)
  data_dir = builder.builder_for(datasets.cache_dir(config) / 'tfds', scan).data_path
  splits = {split: len(rows) for split, rows in scan.splits.items()}
  new = sum(n for split, n in splits.items()
            if not image_cache.is_cached(data_dir, split, config.dataset.image_size))
  return {'train': normal - held, 'splits': splits, 'new': new}


def _feature_cache_there(config, name: str, n: int) -> bool:
  """A complete block of a set of this category, size and dtype is in the cache (by name only)."""
  start = feature_cache.prefix(name, n, config, config.train.feature_cache_dtype)
  return any(any(d.glob('rows-*.npy')) for d in feature_cache.features_root(config).glob(f'{start}*'))


# What lowers each part of the host memory (Need.host's keys).
DEVICE_FEED_ON_CPU = 'set --config.train.feature_cache=host (CPU devices hold the device feed in host memory)'
HOST_CHUNK = 'lower --config.train.log_every_steps (the host feed sends that many steps at once)'
IMAGE_BATCHES = 'lower --config.train.batch_size'
MEMO = 'lower --config.backbone.feature_memo_mb'
# train.feature_cache='auto' keeps the device feed while a device's share of the rows is at most this
# fraction of its memory: the model, its optimiser state and the step's activations need the rest.
DEVICE_SHARE_LIMIT = 0.5


def _add_host(need: Need, what: str, n: int) -> None:
  need.host[what] = max(need.host.get(what, 0), n)   # groups train one after another


def _group_need(group: list[members.Member], need: Need, resized: set) -> None:
  """Adds one group's image cache, feature cache, feed and memo to `need`."""
  config = group[0].config
  px = config.dataset.image_size
  kind = members.feed_kind(config)
  mesh, _ = sharding.group_mesh(config.train.model_axis, len(group))
  sets = {}   # (category, seed, hold-out): one training set -> (its name, rows or None if unknown)
  images = 0   # rows of every split of the group's categories (None: some unknown)
  for m in group:
    categories = datasets.categories(m.config) if m.category == paths.UNIFIED else [m.category]
    counts = [_rows(m.config, c) for c in categories]
    images = None if images is None or None in counts else images + sum(
        sum(r['splits'].values()) for r in counts)
    for c, rows in zip(categories, counts):
      if rows is None or (c, px) in resized:
        continue
      resized.add((c, px))
      need.disk += rows['new'] * image_cache.row_bytes(px)
      listed = ', '.join(f'{n} {s}' for s, n in rows['splits'].items())
      total = sum(rows['splits'].values()) * image_cache.row_bytes(px)
      need.lines.append(f'image cache of {c}: {_gib(total)} ({listed} images at {px} px), '
                        f'{_gib(rows["new"] * image_cache.row_bytes(px))} new')
    known = None if any(r is None for r in counts) else sum(r['train'] for r in counts)
    sets[(m.category, m.config.seed, m.config.calibration.holdout_fraction)] = (m.category, known)
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  cpu = mesh.devices.flat[0].platform == 'cpu'
  shape, row = feature_row_bytes(config)
  size = feature_cache.padded_size([n for _, n in sets.values() if n is not None], mesh)
  per_device = len(sets) * (size // sharding.data_size(mesh)) * row   # the device feed's share
  if kind == 'device' and config.train.feature_cache == 'auto':
    kind = _settle_auto(group, per_device, need)
  if kind in ('device', 'host'):
    # The device feed keeps this process's block of each set; the host feed reads any row.
    block = size // sharding.data_slice(mesh)[1]
    here = [(name, n, n if kind == 'host' else block) for name, n in sets.values() if n is not None]
    new = sum(k for name, n, k in here if not _feature_cache_there(config, name, n))
    need.disk += new * row
    held = '' if kind == 'host' else f'; this process holds {block} of each'
    unknown = sorted({name for name, n in sets.values() if n is None})
    later = f'; {", ".join(unknown)}: counted once exported' if unknown else ''
    if here:
      need.lines.append(f'feature cache: {_gib(sum(k for _, _, k in here) * row)} on disk, {_gib(new * row)} '
                        f'new (rows of {" x ".join(map(str, shape))} {config.train.feature_cache_dtype}: '
                        f'{", ".join(f"{name} {n}" for name, n, _ in here)}{held}{later})')
    else:
      need.lines.append(f'feature cache: rows of {" x ".join(map(str, shape))} '
                        f'{config.train.feature_cache_dtype}{later}')
  if kind == 'device':
    need.device = max(need.device, per_device)
    if cpu:
      _add_host(need, DEVICE_FEED_ON_CPU, per_device * local)
    need.lines.append(f'feed: device, {_gib(per_device)} per device ({sharding.data_size(mesh)} "data" '
                      f'device(s){"; CPU devices: host memory" if cpu else ""})')
  elif kind == 'host':
    chunk = (config.train.log_every_steps * len(group) * config.train.batch_size * row * local
             // mesh.devices.size * (2 if cpu else 1))
    _add_host(need, HOST_CHUNK, chunk)
    need.lines.append(f'feed: host, {_gib(chunk)} of host memory per chunk of '
                      f'{config.train.log_every_steps} steps')
  else:
    batches = (pipeline.PREFETCH_BATCHES + 1) * config.train.batch_size * px ** 2 * 4
    _add_host(need, IMAGE_BATCHES, batches)
    need.lines.append(f'feed: images, {_gib(batches)} of host memory for the batches decoded ahead')
  # The memo holds float32 rows of the images embedded (training, calibration, test), up to its budget.
  budget = int(config.backbone.feature_memo_mb * 2**20) if jax.process_count() == 1 else 0
  _add_host(need, MEMO, budget if images is None else min(budget, images * int(np.prod(shape)) * 4))


def _settle_auto(group: list[members.Member], per_device: int, need: Need) -> str:
  """train.feature_cache='auto' on an accelerator (members.feed_kind): 'device', or 'host' when a
  device's share of the rows would pass DEVICE_SHARE_LIMIT of the memory JAX reports for it. 'host' is
  set on the group's members' configs, which their training then uses."""
  device = device_memory()
  if device is None or per_device <= DEVICE_SHARE_LIMIT * device:
    return 'device'
  for m in group:
    m.config.train.feature_cache = 'host'
  need.lines.append(f'feed: auto chose host: the device feed would need {_gib(per_device)} per device, '
                    f'over {DEVICE_SHARE_LIMIT:.0%} of the {_gib(device)} of a device')
  return 'host'


def _gib(n: float) -> str:
  """Bytes as GiB, or MiB below one GiB."""
  return f'{n / GiB:.2f} GiB' if n >= GiB else f'{n / 2**20:.1f} MiB'


def available_host_memory() -> int | None:
  """MemAvailable of /proc/meminfo (what can be allocated without swapping), or None."""
  try:
    for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def device_memory() -> int | None:
  """The memory JAX reports for one local device (bytes_limit), or None (CPU reports none)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def _free_disk(path: pathlib.Path) -> int:
  while not path.exists():
    path = path.parent
  return shutil.disk_usage(path).free


def check(groups: list[list[members.Member]], say=print) -> Need:
  """Prints what the run will need (process 0) and raises a one-line ConfigError, on every process,
  when it does not fit on one of them. A collective on several processes."""
  need, resized = Need(), set()
  for group in groups:
    _group_need(group, need, resized)
  config = groups[0][0].config if groups else None
  problem = _problem(need, config) if config is not None else None
  if jax.process_index() == 0 and config is not None:
    cache = datasets.cache_dir(config)
    host_total = sum(need.host.values())
    device = device_memory()
    lines = [*need.lines,
             f'feature memo: up to {_gib(need.host.get(MEMO, 0))} of host memory (backbone.feature_memo_mb)',
             f'disk: {_gib(need.disk)} new in {cache} ({_gib(_free_disk(cache))} free)',
             f'host memory: {_gib(host_total)} counted ({_gib(available_host_memory() or 0)} available)']
    if need.device:
      lines.append(f'device memory: {_gib(need.device)} per device' +
                   (f' ({_gib(device)} each)' if device else ' (CPU devices: counted as host memory)'))
    say('adtr_jax: this run will need, per process:\n' + '\n'.join(f'  {line}' for line in lines),
        flush=True)
  failed = [p for p, bad in enumerate(multihost.gather_flags(problem is not None)) if bad]
  if problem:
    raise errors.ConfigError(problem)
  if failed:
    raise errors.ConfigError(f'process(es) {failed} of {jax.process_count()} do not have what this run '
                             'needs (see their output)')
  return need


def _problem(need: Need, config) -> str | None:
  """The first thing that does not fit, as a one-line message naming the option, or None."""
  cache = datasets.cache_dir(config)
  free = _free_disk(cache)
  if need.disk > free:
    return (f'the image and feature caches need {_gib(need.disk)} more in {cache} but its disk has '
            f'{_gib(free)} free: set --config.dataset.cache_dir to a disk with more space'
            + (' (or --config.train.feature_cache_dtype=bfloat16)'
               if config.train.feature_cache_dtype == 'float32' else ''))
  device = device_memory()
  if device is not None and need.device > device:
    return (f'the device feature cache needs {_gib(need.device)} per device but a device has '
            f'{_gib(device)}: set --config.train.feature_cache=host (the features stay on disk)'
            + (' or --config.train.feature_cache_dtype=bfloat16'
               if config.train.feature_cache_dtype == 'float32' else ''))
  available = available_host_memory()
  total = sum(need.host.values())
  if available is not None and total > available:
    parts = ', '.join(f'{_gib(v)} to {k.split()[1]}' for k, v in need.host.items() if v)
    return (f'this run needs {_gib(total)} of host memory ({parts}) but {_gib(available)} is '
            f'available: {max(need.host, key=need.host.get)}')
  return None
