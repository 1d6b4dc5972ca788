r"""Throughput of the jitted train step and of scoring, on random input, after compilation.

  python -m adtr_jax.benchmark --config=configs/mvtec.py [--batch_size=8 --image_size=224]
  python -m adtr_jax.benchmark --metrics   # the metric suite on an MVTec-sized synthetic test set

Prints one JSON line: train_images_per_s, infer_images_per_s, the devices and the model's size.
Runs on every device JAX sees (the batch is sharded over them).
"""
import json
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Model/backbone config.',
                                          lock_config=False)
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Global batch size.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Input size in pixels (square).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 warm-up steps).')
_METRICS = flags.DEFINE_bool('metrics', False, 'Time the metrics (150 images of 256x256) instead.')


def _time(fn, steps: int) -> float:
  """Seconds per call of fn() (which must block until its result is ready)."""
  for _ in range(2):
    fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def run(config, batch_size: int, steps: int) -> dict:
  import jax
  import numpy as np

  from adtr_jax import evaluate, sharding, train
  from adtr_jax.models.adtr import build_model

  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh, '--batch_size')
  model, info = build_model(config)
  tx, _ = train.make_optimizer(config.train, 1)
  graphdef, state, frozen = train.init_state(model, tx)
  state, frozen = sharding.put_replicated((state, frozen), mesh)
  size = config.dataset.image_size
  rng = np.random.default_rng(0)
  batch = sharding.put_batch({
      'image': rng.random((batch_size, size, size, 3), dtype=np.float32),
      'mask': np.zeros((batch_size, size, size), np.float32),
      'label': np.zeros((batch_size,), np.int32), 'valid': np.ones((batch_size,), bool)}, mesh)
  key = sharding.put_replicated(jax.random.key(0), mesh)
  step_fn = train.jit_train_step(mesh, graphdef, tx)
  score = evaluate.jit_score_fn(mesh, graphdef, config)
  holder = {'state': state}

  def train_once():
    holder['state'], m = step_fn(holder['state'], frozen, batch, key)
    jax.block_until_ready(m['loss'])

  def infer_once():
    jax.block_until_ready(score(holder['state'].params, frozen, batch['image']))

  t_train, t_infer = _time(train_once, steps), _time(infer_once, steps)
  n_params = sum(x.size for x in jax.tree.leaves(holder['state'].params))
  return {'train_images_per_s': round(batch_size / t_train, 2),
          'infer_images_per_s': round(batch_size / t_infer, 2),
          'batch_size': batch_size, 'image_size': size, 'backbone': info['arch'],
          'layers': list(config.backbone.layers), 'trainable_params': int(n_params),
          'devices': [str(d) for d in jax.devices()], 'jax': jax.__version__}


def main(argv):
  del argv
  if _METRICS.value:
    from adtr_jax import metrics
    print(json.dumps(metrics.time_metrics(n=150, size=256)))
    return
  config = _CONFIG.value
  config.dataset.image_size = _SIZE.value
  config.scoring.avgpool_size = min(config.scoring.avgpool_size, _SIZE.value)
  print(json.dumps(run(config, _BATCH.value, _STEPS.value)))


if __name__ == '__main__':
  app.run(main)
