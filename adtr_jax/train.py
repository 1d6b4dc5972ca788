"""Training: a pure, jitted step over a device mesh, fed from cached features or images (see loop.py)."""
from __future__ import annotations

import json
import math
import pathlib
import time
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from adtr_jax import (checkpoint, errors, evaluate, feature_cache, inference, loop, losses, sharding,
                      summaries)
from adtr_jax.data import datasets, mixing
from adtr_jax.models.adtr import build_model
from adtr_jax.train_state import TrainState, init_state, make_optimizer, total_steps

def loss_fn(features: jax.Array, reconstruction: jax.Array, batch: dict) -> jax.Array:
  """The normal-only objective L_norm over the batch's valid rows. features [B, h, w, C]."""
  return losses.normal_loss(features, reconstruction, batch['valid'].astype(jnp.float32))


def make_loss(cfg: ml_collections.ConfigDict) -> Callable:
  """config.loss -> loss(features [B, h, w, C], reconstruction, batch) -> scalar.

  'pixel' uses batch['mask'] [B, S, S] brought to the token grid by cfg.mask_downsample;
  'image' uses batch['label'] [B]. Padding rows (valid False) have weight 0 in every case.
  """
  if cfg.type == 'mse':
    return loss_fn
  if cfg.type == 'pixel':
    def pixel(f, f_hat, batch):
      grid = losses.downsample_mask(batch['mask'], f.shape[1:3], cfg.mask_downsample)
      return losses.pixel_loss(f, f_hat, grid, cfg.alpha, batch['valid'].astype(jnp.float32))
    return pixel
  if cfg.type == 'image':
    def image(f, f_hat, batch):
      return losses.image_loss(f, f_hat, batch['label'].astype(jnp.float32), cfg.alpha, cfg.topk,
                               batch['valid'].astype(jnp.float32))
    return image
  raise errors.ConfigError(f"loss.type={cfg.type!r} must be 'mse', 'pixel' or 'image'")


def input_keys(loss_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The batch entries the step reads for this loss (the pixel mask only for 'pixel')."""
  return {'mse': ('image', 'valid'), 'pixel': ('image', 'mask', 'valid'),
          'image': ('image', 'label', 'valid')}[loss_cfg.type]


def loss_and_grads(params, frozen: nnx.State, batch: dict, dropout_key: jax.Array, *,
                   graphdef: nnx.GraphDef, loss: Callable = loss_fn):
  """(loss, grads) of one batch (pure). batch holds 'features' [B, h, w, C] (from the feature cache)
  or 'image' [B, S, S, 3] uint8 (the frozen backbone runs first), plus 'valid' [B] and what `loss`
  reads; sharded on 'data'."""
  def objective(params):
    model = nnx.merge(graphdef, params, frozen)
    embedded = batch['features'] if 'features' in batch else model.embed(batch['image'])
    f, f_hat = model.reconstruct(embedded, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
    return loss(f, f_hat, batch)
  return jax.value_and_grad(objective)(params)


def train_step(state: TrainState, frozen: nnx.State, batch: dict, key: jax.Array, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               loss: Callable = loss_fn) -> tuple[TrainState, dict]:
  """One optimisation step (pure); dropout is a function of (key, step)."""
  value, grads = loss_and_grads(state.params, frozen, batch, jax.random.fold_in(key, state.step),
                                graphdef=graphdef, loss=loss)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {'loss': value, 'grad_norm': optax.tree.norm(grads)}


def jit_step(step_fn: Callable, mesh):
  """step_fn(state, frozen, batch, key) jitted: state replicated, batch sharded on 'data', state donated."""
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(step_fn, in_shardings=(rep, rep, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def jit_train_step(mesh, graphdef, tx, loss: Callable = loss_fn):
  """train_step for one model, jitted (see jit_step)."""
  return jit_step(functools.partial(train_step, graphdef=graphdef, tx=tx, loss=loss), mesh)


def checkpoint_meta(config, category: str, backbone_info: dict, steps_per_epoch: int) -> dict:
  """What a checkpoint must say about how it was made (the frozen backbone is recorded, not saved)."""
  return {'category': category, 'backbone': backbone_info, 'steps_per_epoch': steps_per_epoch,
          'config': json.loads(config.to_json_best_effort())}


def _check_same_backbone(meta: dict, info: dict, where) -> None:
  old = meta.get('backbone', {})
  for key in ('arch', 'weights_sha256'):
    if old.get(key) != info.get(key):
      raise errors.ConfigError(f'checkpoint in {where} was trained with backbone {key}={old.get(key)!r} but the '
                               f'config gives {info.get(key)!r}; use another --workdir or the original weights')


def calibrate(config, calib, graphdef, params, frozen, mesh) -> dict:
  """The decision threshold: the (1 - target_fpr) quantile of held-out normal images' scores."""
  scores = inference.score_split(config, calib, graphdef, params, frozen, mesh, 'calibrate')['scores']
  target = config.calibration.target_fpr
  threshold = float(np.quantile(scores, 1.0 - target, method='higher'))
  return {'threshold': threshold, 'target_fpr': target, 'num_images': int(len(scores)),
          'heldout_fpr': float(np.mean(scores > threshold))}


def _init_from(config, category: str, state: TrainState, info: dict) -> TrainState:
  """Fresh optimizer and step, reconstructor weights from init_from/<category> (its latest step)."""
  mgr = checkpoint.manager(pathlib.Path(config.init_from) / category / 'checkpoints')
  step = checkpoint.select_step(mgr, 'latest')
  _check_same_backbone(checkpoint.read_meta(mgr, step), info, mgr.directory)
  restored, _ = checkpoint.restore(mgr, step, state)
  mgr.close()
  logging.info('initialised %s from %s step %d', category, mgr.directory, step)
  return state.replace(params=restored.params)


class SaveClock:
  """When to checkpoint: every `every_steps` steps and/or every `every_minutes` of wall clock (0 = off),
  checked between chunks; always at the last step."""

  def __init__(self, every_steps: int, every_minutes: float, last_step: int, step: int):
    self.every_steps, self.every_s, self.last_step = every_steps, 60.0 * every_minutes, last_step
    self.saved_step, self.saved_time = step, time.monotonic()

  def due(self, step: int) -> bool:
    return (step == self.last_step
            or (self.every_steps > 0 and step - self.saved_step >= self.every_steps)
            or (self.every_s > 0 and time.monotonic() - self.saved_time >= self.every_s))

  def saved(self, step: int) -> None:
    self.saved_step, self.saved_time = step, time.monotonic()


def uses_feature_cache(config) -> bool:
  """Cached features need a fixed input: normal-only training (anomalies change it every epoch)."""
  feature_cache.check(config.train)
  return config.train.feature_cache != 'off' and not mixing.uses_anomalies(config)


def train_features(config, data, mesh, graphdef, state, frozen, dtype: str) -> np.ndarray:
  """The frozen backbone's features of every training image, [N, h, w, C] numpy in `dtype`."""
  return feature_cache.compute(
      data.train, graphdef, state.params, frozen, mesh, image_size=config.dataset.image_size,
      batch_size=config.eval.batch_size, dtype=dtype, num_workers=config.dataset.num_workers,
      memo_mb=config.backbone.feature_memo_mb)


def _feeder(config, data, mesh, features, step_fn, steps_per_epoch):
  """(chunk function, what it reads): the feature cache when there is one, else images."""
  cfg = config.train
  if features is not None:
    make = loop.device_cache_chunk if cfg.feature_cache == 'device' else loop.host_cache_chunk
    chunk = make(step_fn, mesh, num_rows=len(data.train), steps_per_epoch=steps_per_epoch,
                 batch_size=cfg.batch_size)
    logging.info('training from cached features %s (%s, %s)', features.shape, cfg.feature_cache,
                 cfg.feature_cache_dtype)
    return chunk, feature_cache.place(features, mesh, cfg.feature_cache)
  # Synthetic anomalies change the input every epoch: the backbone must run on each batch.
  feeder = loop.ImageFeeder(data.train, batch_size=cfg.batch_size, image_size=config.dataset.image_size,
                            seed=config.seed, keys=input_keys(config.loss),
                            num_workers=config.dataset.num_workers, data_slice=sharding.data_slice(mesh))
  return loop.image_chunk(jit_step(step_fn, mesh), mesh, feeder), None


def _loop(config, workdir, data, mesh, model_state, chunk, cache, mgr, meta, schedule,
          steps_per_epoch: int, last_step: int, category: str) -> float:
  """Runs chunks of steps from state.step to last_step; logs, checkpoints and (at the end) calibrates
  between them. Returns the last chunk's mean loss."""
  graphdef, state, frozen = model_state
  cfg = config.train
  step = int(state.step)
  key = sharding.put_replicated(jax.random.key(config.seed), mesh)
  log = summaries.ModelLog(workdir, step)
  clock = SaveClock(cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, last_step, step)
  since_save, loss_now = [], float('nan')
  bar = tqdm(total=last_step, initial=step, desc=f'train {category}', unit='step',
             disable=jax.process_index() != 0)
  while step < last_step:
    # Chunks end on multiples of log_every_steps: a resumed run logs at the same steps.
    n = min(cfg.log_every_steps - step % cfg.log_every_steps, last_step - step)
    t0 = time.perf_counter()
    state, metrics = chunk(state, frozen, cache, key, step, n)
    metrics = jax.device_get(metrics)  # waits for the chunk: the bar shows completed steps
    rate = n * cfg.batch_size / (time.perf_counter() - t0)
    step += n
    since_save.extend(metrics['loss'].tolist())
    loss_now = float(np.mean(metrics['loss']))
    bar.update(n)
    bar.set_postfix(loss=f'{loss_now:.4f}', img_s=f'{rate:.1f}')
    log.write(step, epoch=step / steps_per_epoch, loss=loss_now,
              grad_norm=float(np.mean(metrics['grad_norm'])), lr=float(schedule(step - 1)),
              images_per_s=rate)
    if not all(map(math.isfinite, metrics['loss'].tolist())):
      raise FloatingPointError(f'training loss became {loss_now} at step {step}: lower '
                               f'train.learning_rate ({cfg.learning_rate})')
    if clock.due(step):
      if step == last_step and data.calib is not None:
        meta = dict(meta, calibration=calibrate(config, data.calib, graphdef, state.params, frozen,
                                                mesh))
      checkpoint.save(mgr, step, state, meta, float(np.mean(since_save)))
      log.flush()
      clock.saved(step)
      since_save = []
  bar.close()
  log.close()
  return loss_now


def epoch_steps(num_images: int, batch_size: int, category: str) -> int:
  """Steps per epoch, floor(images / batch) (a last partial batch is dropped); an error naming the
  category when it has fewer images than one batch."""
  if num_images < batch_size:
    raise errors.ConfigError(f'the train split of {category!r} has {num_images} images, fewer than '
                             f'train.batch_size={batch_size}')
  return num_images // batch_size


def train(config: ml_collections.ConfigDict, category: str, workdir: pathlib.Path,
          data: datasets.CategoryData | None = None, mesh=None) -> dict:
  """Trains one model in `workdir` (resuming from its latest checkpoint) on `category`'s training data,
  or on `data` when given (the unified setting's union), on `mesh` (default: every device on 'data').
  Returns a summary."""
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or sharding.make_mesh()
  cfg = config.train
  sharding.check_batch_size(cfg.batch_size, mesh, 'train.batch_size')
  data = data if data is not None else datasets.load_category(config, category)
  steps_per_epoch = epoch_steps(len(data.train), cfg.batch_size, category)
  last_step = total_steps(cfg, steps_per_epoch)
  model, info = build_model(config)
  tx, schedule = make_optimizer(cfg, steps_per_epoch, last_step)
  graphdef, state, frozen = init_state(model, tx)
  mgr = checkpoint.manager(workdir / 'checkpoints', cfg.max_checkpoints)
  latest = mgr.latest_step()
  finished = latest is not None and latest >= last_step
  features = (train_features(config, data, mesh, graphdef, state, frozen, cfg.feature_cache_dtype)
              if uses_feature_cache(config) and not finished else None)
  if latest is None and not config.init_from and model.feature_norm.kind != 'none':
    # A fresh run: the feature statistics of its training images (a resumed or initialised run
    # restores them with the weights).
    model.feature_norm.fit(features if features is not None else
                           train_features(config, data, mesh, graphdef, state, frozen, 'float32'))
    graphdef, state, frozen = init_state(model, tx)
  state, frozen = sharding.put_replicated((state, frozen), mesh)
  meta = checkpoint_meta(config, category, info, steps_per_epoch)

  if latest is not None:
    _check_same_backbone(checkpoint.read_meta(mgr, latest), info, mgr.directory)
    state, _ = checkpoint.restore(mgr, latest, state)
    logging.info('resumed %s from step %d', category, latest)
    print(f'adtr_jax: resumed {category} from step {latest}', flush=True)
  elif config.init_from:
    state = _init_from(config, category, state, info)
  step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, loss=make_loss(config.loss))
  chunk, cache = _feeder(config, data, mesh, features, step_fn, steps_per_epoch)
  loss_now = _loop(config, workdir, data, mesh, (graphdef, state, frozen), chunk, cache, mgr, meta,
                   schedule, steps_per_epoch, last_step, category)
  mgr.wait_until_finished()
  mgr.close()
  return {'category': category, 'steps': last_step, 'last_loss': loss_now}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       evaluate_after: bool = True) -> dict:
  """Trains every configured category in workdir/<category> (or, with dataset.unified, one model on all
  of them in workdir/unified), then (optionally) evaluates every category."""
  workdir = pathlib.Path(workdir)
  if config.train.stacked and not config.dataset.unified:
    return _train_and_evaluate_stacked(config, workdir, evaluate_after)
  if config.dataset.unified:
    summaries = [train(config, evaluate.UNIFIED, workdir / evaluate.UNIFIED,
                       datasets.load_unified(config))]
  else:
    summaries = [train(config, c, workdir / c) for c in datasets.categories(config)]
  if not evaluate_after:
    return {'train': summaries}
  return {'train': summaries, 'eval': evaluate.evaluate(config, workdir)}


def _train_and_evaluate_stacked(config, workdir: pathlib.Path, evaluate_after: bool) -> dict:
  """train.stacked: every category's model in one stacked run (stacked.py), then the usual report."""
  from adtr_jax import stacked   # stacked builds on this module
  members = []
  for c in datasets.categories(config):
    member = config.copy_and_resolve_references()
    member.dataset.category = c
    members.append(stacked.Member(member, workdir / c))
  trained = stacked.train_members(members, workdir / 'stacked')
  summaries = [{'category': m.category, 'steps': s, 'stacked': True}
               for m, s in zip(members, trained[0].last_steps)]
  if not evaluate_after:
    return {'train': summaries}
  reports = stacked.evaluate_members(*trained)
  per_category = {m.category: r['categories'][m.category] for m, r in zip(members, reports)}
  return {'train': summaries, 'eval': evaluate.write_report(per_category, workdir)}
