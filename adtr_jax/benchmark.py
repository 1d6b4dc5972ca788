r"""Throughput of the jitted train step (from images and from cached features) and of scoring.

  python -m adtr_jax.benchmark --config=configs/mvtec.py [--batch_size=8 --image_size=224]
  python -m adtr_jax.benchmark --config=configs/mvtec.py --breakdown   # where a train step's time goes
  python -m adtr_jax.benchmark --metrics   # the metric suite on an MVTec-sized synthetic test set
  python -m adtr_jax.benchmark --config=configs/mvtec.py --models=16   # 16 stacked models
  python -m adtr_jax.benchmark --config=configs/mvtec.py --batch_size=16 --scan_steps=6500  # 500 epochs
  XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
      python -m adtr_jax.benchmark --num_processes=2   # 2 processes x 2 CPU devices (docs/multihost.md)
  python -m adtr_jax.benchmark --export=<workdir>/<category>/export   # JAX vs onnxruntime (docs/deploy.md)

Prints one JSON line: train_images_per_s (backbone + reconstructor, from uint8 images),
train_cached_images_per_s (from features cached on the device: one jitted scan of `--scan_steps`
steps, default `--steps`, whose wall time is cached_scan_s), infer_images_per_s (scoring: backbone and
reconstructor), infer_memo_images_per_s (scoring images seen before: features from the memo,
feature_cache.Embedder), train_flops_per_image
(XLA's cost analysis of the step), mfu (accelerators only: achieved FLOP/s of the cached step over the
chip's dense bfloat16 peak), the devices and the model size.
Runs on every device JAX sees (the batch is sharded over them).

--export=<folder of --mode=export> times scoring with the exported model instead, on the CPU: the
jax.export artifact (JAX, XLA) against model.onnx (onnxruntime, as adtr_jax.deploy runs it). Prints
<runtime>_images_per_s at --batch_size and <runtime>_latency_ms_p50 / _p99 of one image (batch 1,
--latency_calls calls): what a part waits on an inspection line.

Training goes through the driver's runner (loop.make_runner, step.train_step) as train.py lays out a
run: one model is M = 1 of the path that --models=M (> 1) times for M stacked models. Their
train_cached_images_per_s, infer_images_per_s and infer_memo_images_per_s are then summed over the
models, one model's figures (measured in the same process) keep their keys with a one_model_ prefix,
and stacked_vs_one_model is the models' total cached images/s over one model's.
"""
import dataclasses
import functools
import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from adtr_jax import config_files

_CONFIG = config_flags.DEFINE_config_file('config', config_files.resolve('default'),
                                          'Model/backbone config (a file or a shipped name).',
                                          lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Input size in pixels (square).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).')
_METRICS = flags.DEFINE_bool('metrics', False, 'Time the metrics (150 images of 256x256) instead.')
_BREAKDOWN = flags.DEFINE_bool('breakdown', False, 'Time the parts of a train step separately.')
_SCAN = flags.DEFINE_integer('scan_steps', 0, 'Steps of the one timed on-device scan of the cached path (0: '
                             '--steps); e.g. 6500 times a 200-image category\'s 500 epochs at batch 16.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', 1, 'Time the one-model step over N JAX processes. Without --process_id: starts N '
    'processes of this benchmark on this machine, joined on 127.0.0.1 (each sees the devices its '
    'environment gives it) and prints process 0\'s line; with --process_id and --coordinator_address: '
    'this is one of them (other launchers).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --num_processes: this process, in [0, N).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'With --num_processes: host:port of process 0.')
_EXPORT = flags.DEFINE_string('export', None, 'An export folder (--mode=export): time JAX against '
                               'onnxruntime scoring with it instead.')
_LATENCY_CALLS = flags.DEFINE_integer('latency_calls', 100, '--export: batch-1 calls timed for the latency.')
_MODELS = flags.DEFINE_integer('models', 1, 'Stacked models trained in one step (train.model_axis of '
                               'the config sets the mesh).')

_CACHE_BATCHES = 4   # the timed feature cache holds this many batches
# Dense bfloat16 peak FLOP/s by device_kind prefix (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12,
                   'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12}


def _time(fn, steps: int, warmup: int = 2) -> float:
  """Seconds per call of fn() (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def peak_flops(device) -> float | None:
  kind = getattr(device, 'device_kind', '')
  return next((v for k, v in PEAK_BF16_FLOPS.items() if kind.startswith(k)), None)


@dataclasses.dataclass(frozen=True)
class _Setup:
  """One fresh model as the benchmark times it: its backbone info, the split model (local, unplaced)
  and its optimiser state, its numbers (members.numbers; a feed of a cache of _CACHE_BATCHES batches),
  this process's rows (data_slice) of a random uint8 batch [B, S, S, 3], the same on every process,
  and that batch on the mesh (+ valid)."""
  info: dict
  model: object
  state: object
  numbers: dict
  images: object
  batch: dict


def _setup(config, batch_size: int, mesh) -> _Setup:
  import numpy as np

  from adtr_jax import members, sharding, train_state
  from adtr_jax.models.adtr import SplitModel, build_model
  sharding.check_batch_size(batch_size, mesh, '--batch_size')
  model, info = build_model(config)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  # A budget never reached (2**30 steps), with the schedule of a 1000-step run.
  numbers = dict(members.numbers(config.train, steps_per_epoch=_CACHE_BATCHES, last_step=2**30,
                                 num_rows=_CACHE_BATCHES * batch_size, data=0),
                 **train_state.hyperparameters(config.train, _CACHE_BATCHES, 1000))
  size = config.dataset.image_size
  images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  part, parts = sharding.data_slice(mesh)
  images = images[part * batch_size // parts:(part + 1) * batch_size // parts]
  batch = sharding.put_batch({'image': images, 'valid': np.ones((len(images),), bool)}, mesh)
  return _Setup(info, SplitModel(graphdef, state.params, frozen), state, numbers, images, batch)


class _SameImages:
  """A loop feed (loop.Images' interface, one step per call) whose every batch is one device-resident
  image batch: the image step as the driver runs it, without the host's decoding."""
  steps_per_call = 1
  xs_sharding = None   # nothing sent from the host

  def __init__(self, batch: dict, mesh):
    from adtr_jax import sharding
    self.resident, self.resident_sharding = batch, sharding.data_sharded(mesh)

  def host_inputs(self, start: int, num_steps: int):
    return None

  def batch(self, resident, x, key, hyper, step) -> dict:
    return resident


def _timed(run, state, frozen, keys, hyper, num_steps: int, first: int):
  """(seconds, state): the wall time of run's num_steps steps, after an untimed call of `first` steps
  that compiles the same program (a scan of num_steps, or the feed's one step per call)."""
  import jax

  from adtr_jax import sharding
  start = int(sharding.to_host(state.step)[0])
  state, _ = run(state, frozen, keys, hyper, start, first)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  state, metrics = run(state, frozen, keys, hyper, start + first, num_steps)
  jax.block_until_ready((state, metrics))
  return time.perf_counter() - t0, state


def _flops(fn, *args) -> float:
  """XLA's FLOP count of fn(*args) compiled for one device: the whole batch, not one device's share."""
  import jax
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  return float(jax.jit(fn).lower(*abstract).compile().cost_analysis().get('flops', 0.0))


def run(config, batch_size: int, steps: int, scan_steps: int = 0, models: int = 1) -> dict:
  """`models` models laid out and stepped as the driver does (train._train_group; one model is M = 1,
  on a mesh of config.train.model_axis rows when M > 1), model i drawing data and dropout from seed
  config.seed + i. The cached path is timed as one runner call of `scan_steps` steps (0: `steps`) from
  a device feature cache, after one untimed call of the same length that compiles it; images/s are
  summed over the models. One model also times its step from images (runner calls of one step each:
  image-fed models train alone, members.plan) and scoring from the feature memo."""
  import jax
  import numpy as np

  from adtr_jax import feature_cache, inference, loop, members, sharding, step
  mesh, _ = sharding.group_mesh(config.train.model_axis, models)
  setup = _setup(config, batch_size, mesh)
  graphdef, images, batch = setup.model.graphdef, setup.images, setup.batch
  step_fn = functools.partial(step.train_step, graphdef=graphdef, loss=step.make_loss(config.loss),
                              schedule=config.train.schedule)
  seeds = [config.copy_and_resolve_references() for _ in range(models)]
  for i, c in enumerate(seeds):
    c.seed = config.seed + i
  state, keys, hyper = members.stack_members([setup.state] * models, members.member_keys(seeds),
                                             [setup.numbers] * models, mesh)
  frozen = sharding.put_replicated(setup.model.frozen, mesh)
  per_call = config.train.models_per_call
  one_model = (setup.state, setup.model.frozen)   # what the FLOP counts are of (per model, the whole batch)
  out = {}
  if models == 1:
    t_image, state = _timed(loop.make_runner(step_fn, mesh, _SameImages(batch, mesh), per_call), state,
                            frozen, keys, hyper, steps, first=1)
    flops = _flops(step_fn, *one_model, batch, jax.random.key(0), setup.numbers)
    out.update(train_images_per_s=round(batch_size * steps / t_image, 2),
               train_flops_per_image=flops / batch_size)

  # Cached features: the batch's features repeated to a cache of _CACHE_BATCHES batches, stored in
  # the run's feature_cache_dtype as the driver stores them.
  placed = dataclasses.replace(setup.model, params=sharding.put_replicated(setup.model.params, mesh),
                               frozen=frozen)
  embed = feature_cache.Embedder(placed, mesh, max_mb=0)
  dtype = feature_cache.DTYPES[config.train.feature_cache_dtype]
  features = sharding.to_host(embed(images)).astype(dtype)
  scan = scan_steps or steps
  t_scan, state = _timed(loop.make_runner(
      step_fn, mesh, loop.DeviceCache([features.repeat(_CACHE_BATCHES, axis=0)], mesh, batch_size),
      per_call), state, frozen, keys, hyper, scan, first=scan)
  cached_flops = _flops(step_fn, *one_model, {'features': features.astype(np.float32),
                                               'valid': np.ones(batch_size, bool)}, jax.random.key(0),
                        setup.numbers)
  t_cached = t_scan / scan

  # Scoring (every model scores the same features): a first pass runs the backbone on every batch (no
  # memo), a repeated one takes the features from the memo (filled here by one call).
  score = inference.jit_score_fn(mesh, graphdef, config, stacked=True)
  params = sharding.put_replicated(state.params, mesh)
  memo_embed = feature_cache.Embedder(placed, mesh, max_mb=1024)
  memo_embed(images)
  t_infer, t_memo = (_time(lambda: jax.block_until_ready(score(params, frozen, e(images))), steps)
                     for e in (embed, memo_embed))
  peak = peak_flops(jax.devices()[0])
  if models == 1:
    out['cached_speedup'] = round(t_image / steps / t_cached, 2)
  mfu = round(cached_flops * models / t_cached / (peak * jax.device_count()), 4) if peak else None
  return dict(out, train_cached_images_per_s=round(models * batch_size / t_cached, 2),
              cached_scan_steps=int(scan), cached_scan_s=round(t_scan, 3), mfu=mfu,
              infer_images_per_s=round(models * batch_size / t_infer, 2),
              infer_memo_images_per_s=round(models * batch_size / t_memo, 2),
              train_cached_flops_per_image=cached_flops / batch_size,
              batch_size=batch_size, image_size=config.dataset.image_size, backbone=setup.info['arch'],
              layers=list(config.backbone.layers), dtype=config.model.dtype,
              feature_cache_dtype=config.train.feature_cache_dtype,
              trainable_params=int(sum(x.size for x in jax.tree.leaves(setup.model.params))),
              models=models, model_axis=mesh.shape['model'],
              models_per_call=loop.models_per_call_for(per_call, mesh.devices.flat[0].platform),
              devices=[str(d) for d in jax.devices()], processes=jax.process_count(), jax=jax.__version__)


def stacked_run(config, batch_size: int, steps: int, models: int, scan_steps: int = 0) -> dict:
  """run() for `models` models beside run() for one (the same process, the same code): one model's
  throughputs keep their keys with a one_model_ prefix, and stacked_vs_one_model is the models' total
  cached images/s over one model's."""
  one = run(config, batch_size, steps, scan_steps)
  many = run(config, batch_size, steps, scan_steps, models)
  renamed = {f'one_model_{k}' if k.endswith(('_per_s', 'speedup', '_scan_s')) else k: v
             for k, v in one.items()}
  return dict(renamed, **many, stacked_vs_one_model=round(
      many['train_cached_images_per_s'] / one['train_cached_images_per_s'], 2))


def breakdown(config, batch_size: int, steps: int) -> dict:
  """Seconds per train step spent in each part, each part jitted and timed on its own."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from adtr_jax import sharding, step, train_state
  from adtr_jax.data import pipeline
  from adtr_jax.models import reconstructor as rec
  from adtr_jax.models.adtr import TRAINABLE
  mesh = sharding.make_mesh()
  setup = _setup(config, batch_size, mesh)
  graphdef, batch = setup.model.graphdef, setup.batch
  state, frozen = sharding.put_replicated((setup.state, setup.model.frozen), mesh)
  tx, key = train_state.optimizer(setup.numbers, config.train.schedule), jax.random.key(0)
  model = nnx.merge(graphdef, state.params, frozen)
  embed = jax.jit(lambda x: model.embed(x))
  features = embed(batch['image'])
  loss = step.make_loss(config.loss)
  grads_fn = jax.jit(functools.partial(step.loss_and_grads, graphdef=graphdef, loss=loss))
  fbatch = {'features': features, 'valid': batch['valid']}
  grads = grads_fn(state.params, frozen, fbatch, key)[1]
  # The same reconstructor with every dropout rate set to 0: the difference is what drawing the
  # step's dropout masks (threefry bits for every [B, T, D] / [B, T, F] activation) costs.
  plain = nnx.merge(graphdef, state.params, frozen)
  for _, module in nnx.iter_modules(plain):
    if isinstance(module, nnx.Dropout):
      module.rate = 0.0
  no_dropout_fn = jax.jit(functools.partial(step.loss_and_grads, loss=loss,
                                            graphdef=nnx.split(plain, TRAINABLE, ...)[0]))
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
  m = config.model
  tokens = features.shape[1] * features.shape[2]
  x = jax.random.normal(key, (batch_size, tokens, m.hidden_dim))
  n_attn = m.num_encoder_layers + 2 * m.num_decoder_layers
  n_ffn = m.num_encoder_layers + m.num_decoder_layers

  def sublayer_time(module, call):
    g, p = nnx.split(module)
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(call(nnx.merge(g, p), x))))
    return _time(lambda: jax.block_until_ready(f(p, x)), steps)

  rngs = nnx.Rngs(0)
  attn = rec.Attention(m.hidden_dim, m.num_heads, 0.0, dtype=jnp.float32, implementation='xla',
                       rngs=rngs)
  ffn = rec.FeedForward(m.hidden_dim, m.ffn_dim, 0.0, dtype=jnp.float32, rngs=rngs)
  parts = {
      'backbone_forward_s': _time(lambda: jax.block_until_ready(embed(batch['image'])), steps),
      'reconstructor_forward_backward_s': _time(
          lambda: jax.block_until_ready(grads_fn(state.params, frozen, fbatch, key)), steps),
      'reconstructor_forward_backward_no_dropout_s': _time(
          lambda: jax.block_until_ready(no_dropout_fn(state.params, frozen, fbatch, key)), steps),
      'attention_forward_backward_s': n_attn * sublayer_time(
          attn, lambda a, x: a(x, x, x, deterministic=True, rngs=None)),
      'ffn_forward_backward_s': n_ffn * sublayer_time(
          ffn, lambda f, x: f(x, deterministic=True, rngs=None)),
      'optimizer_s': _time(lambda: jax.block_until_ready(update(grads, state.opt_state, state.params)),
                           steps),
  }
  # Host input: decode + resize a batch of real-size images (a 1024 px PNG stand-in) vs the cache.
  rng = np.random.default_rng(0)
  big = [{'image': rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8), 'label': 0}
         for _ in range(batch_size)]
  size = config.dataset.image_size
  parts['host_resize_batch_s'] = _time(
      lambda: [pipeline.load_resized(big, i, size) for i in range(batch_size)], 2, warmup=0)
  parts.update(batch_size=batch_size, image_size=size, devices=[str(d) for d in jax.devices()])
  return parts


def _spawn(num_processes: int) -> int:
  """Runs this command as `num_processes` local processes joined on 127.0.0.1; returns the worst exit
  status. Process 0's output is this one's; the others' is discarded (they time the same step)."""
  import socket
  import subprocess
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, '-m', 'adtr_jax.benchmark', *sys.argv[1:], f'--process_id={i}',
                             f'--coordinator_address=127.0.0.1:{port}'],
                            stdout=None if i == 0 else subprocess.DEVNULL)
           for i in range(num_processes)]
  return max((p.wait() for p in procs), key=abs)


def _print(result: dict) -> None:
  import jax
  if jax.process_index() == 0:   # every process has the same figures (the step is one SPMD program)
    print(json.dumps(result))


def deploy_run(export_dir: str, batch_size: int, steps: int, latency_calls: int) -> dict:
  """Scoring with an exported model, JAX (the jax.export artifact, jitted) against onnxruntime: images/s
  at batch_size and the batch-1 latency percentiles (ms). Both score the same random uint8 images."""
  import pathlib

  import jax
  import numpy as np

  from adtr_jax import deploy
  folder = pathlib.Path(export_dir)
  size = int(deploy.read_meta(folder)['input']['size'])
  exported = jax.export.deserialize(bytearray((folder / deploy.JAX_EXPORT_FILE).read_bytes()))
  call = jax.jit(exported.call)
  runtimes = {'jax': lambda x: jax.block_until_ready(call(x)), 'onnxruntime': deploy.Scorer(folder)}
  images = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
  out = {'batch_size': batch_size, 'image_size': size, 'latency_calls': latency_calls}
  for name, fn in runtimes.items():
    out[f'{name}_images_per_s'] = round(batch_size / _time(lambda: fn(images), steps), 2)
    one = images[:1]
    for _ in range(3):  # warm-up (a new shape: compilation / allocation)
      fn(one)
    times = []
    for _ in range(latency_calls):
      t0 = time.perf_counter()
      fn(one)
      times.append(time.perf_counter() - t0)
    out[f'{name}_latency_ms_p50'], out[f'{name}_latency_ms_p99'] = (
        round(float(v) * 1e3, 2) for v in np.percentile(times, [50, 99]))
  out['onnx_mib'] = round((folder / deploy.ONNX_FILE).stat().st_size / 2**20, 2)
  return out


def main(argv):
  del argv
  if _EXPORT.value:
    print(json.dumps(deploy_run(_EXPORT.value, _BATCH.value, _STEPS.value, _LATENCY_CALLS.value)))
    return
  if _SCAN.value and (_METRICS.value or _BREAKDOWN.value):
    raise app.UsageError('--scan_steps times the cached run: not with --metrics or --breakdown')
  if _NUM_PROCESSES.value > 1:
    if _METRICS.value or _BREAKDOWN.value or _MODELS.value > 1:
      raise app.UsageError('--num_processes times the one-model run: not with --metrics, --breakdown or --models')
    if _PROCESS_ID.value is None:
      sys.exit(_spawn(_NUM_PROCESSES.value))
    from adtr_jax import multihost
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, timeout_s=300)
  if _METRICS.value:
    from adtr_jax import metrics
    print(json.dumps(metrics.time_metrics(n=150, size=256)))
    return
  config = _CONFIG.value
  config.dataset.image_size = _SIZE.value
  config.scoring.avgpool_size = min(config.scoring.avgpool_size, _SIZE.value)
  if _BREAKDOWN.value:
    _print(breakdown(config, _BATCH.value, _STEPS.value))
  elif _MODELS.value > 1:
    _print(stacked_run(config, _BATCH.value, _STEPS.value, _MODELS.value, _SCAN.value))
  else:
    _print(run(config, _BATCH.value, _STEPS.value, _SCAN.value))


if __name__ == '__main__':
  sys.argv = config_files.resolve_argv(sys.argv)
  app.run(main)
