"""Training: a pure, jitted step over a device mesh, and a resumable loop around it."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, struct
from tqdm.auto import tqdm

from adtr_jax import checkpoint, losses, sharding
from adtr_jax.data import datasets, pipeline
from adtr_jax.models.adtr import TRAINABLE, build_model


@struct.dataclass
class TrainState:
  """Everything that changes during training. The frozen backbone is not in here."""
  step: jax.Array          # [] int32
  params: Any              # nnx.State of the reconstructor's parameters
  opt_state: Any


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int):
  """AdamW with global-norm clipping and step decay (lr x factor at each of cfg.lr_decay_epochs).

  Returns (optax transformation, learning-rate schedule).
  """
  boundaries = {int(e) * steps_per_epoch: cfg.lr_decay_factor for e in cfg.lr_decay_epochs}
  schedule = optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=cfg.weight_decay))
  return tx, schedule


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
  raise ValueError(f"loss.type={cfg.type!r} must be 'mse', 'pixel' or 'image'")


DEVICE_KEYS = ('image', 'mask', 'label', 'valid')


def device_inputs(batch: dict) -> dict:
  """The batch entries the step uses (host-only bookkeeping such as 'index' stays on the host)."""
  return {k: batch[k] for k in DEVICE_KEYS}


def train_step(state: TrainState, frozen: nnx.State, batch: dict, key: jax.Array, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               loss: Callable = loss_fn) -> tuple[TrainState, dict]:
  """One optimisation step (pure). batch: 'image' [B, S, S, 3], 'valid' [B], ... sharded on 'data'."""
  dropout_key = jax.random.fold_in(key, state.step)

  def objective(params):
    model = nnx.merge(graphdef, params, frozen)
    f, f_hat = model(batch['image'], deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
    return loss(f, f_hat, batch)

  value, grads = jax.value_and_grad(objective)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {'loss': value, 'grad_norm': optax.tree.norm(grads)}


def jit_train_step(mesh, graphdef, tx, loss: Callable = loss_fn):
  """train_step jitted with the state replicated and the batch sharded on 'data' (state donated)."""
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def step(state, frozen, batch, key):
    return train_step(state, frozen, batch, key, graphdef=graphdef, tx=tx, loss=loss)

  return jax.jit(step, in_shardings=(rep, rep, dat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def init_state(model: nnx.Module, tx) -> tuple[nnx.GraphDef, TrainState, nnx.State]:
  """Splits the model into (graphdef, trainable state, frozen state)."""
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return graphdef, state, frozen


def checkpoint_meta(config, category: str, backbone_info: dict, steps_per_epoch: int) -> dict:
  """What a checkpoint must say about how it was made (the frozen backbone is recorded, not saved)."""
  return {'category': category, 'backbone': backbone_info, 'steps_per_epoch': steps_per_epoch,
          'config': json.loads(config.to_json_best_effort())}


def _check_same_backbone(meta: dict, info: dict, where) -> None:
  old = meta.get('backbone', {})
  for key in ('arch', 'weights_sha256'):
    if old.get(key) != info.get(key):
      raise ValueError(f'checkpoint in {where} was trained with backbone {key}={old.get(key)!r} but the '
                       f'config gives {info.get(key)!r}; use another --workdir or the original weights')


class JsonlLog:
  """Appends one JSON object per line (only on process 0)."""

  def __init__(self, path: pathlib.Path):
    self.path = path

  def write(self, **record) -> None:
    if jax.process_index() == 0:
      with self.path.open('a') as f:
        f.write(json.dumps(record) + '\n')


def calibrate(config, calib, graphdef, params, frozen, mesh) -> dict:
  """The decision threshold: the (1 - target_fpr) quantile of held-out normal images' scores."""
  from adtr_jax import evaluate  # evaluate imports this module
  scores = evaluate.score_split(config, calib, graphdef, params, frozen, mesh, 'calibrate')['scores']
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


def train(config: ml_collections.ConfigDict, category: str, workdir: pathlib.Path) -> dict:
  """Trains one category in `workdir` (resuming from its latest checkpoint). Returns a summary."""
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh()
  cfg = config.train
  sharding.check_batch_size(cfg.batch_size, mesh, 'train.batch_size')
  data = datasets.load_category(config, category)
  steps_per_epoch = len(data.train) // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'the train split of {category!r} has {len(data.train)} images, fewer than '
                     f'train.batch_size={cfg.batch_size}')
  model, info = build_model(config)
  tx, schedule = make_optimizer(cfg, steps_per_epoch)
  graphdef, state, frozen = init_state(model, tx)
  state, frozen = sharding.put_replicated((state, frozen), mesh)
  meta = checkpoint_meta(config, category, info, steps_per_epoch)

  mgr = checkpoint.manager(workdir / 'checkpoints', cfg.max_checkpoints)
  if (latest := mgr.latest_step()) is not None:
    _check_same_backbone(checkpoint.read_meta(mgr, latest), info, mgr.directory)
    state, _ = checkpoint.restore(mgr, latest, state)
    logging.info('resumed %s from step %d', category, latest)
  elif config.init_from:
    state = _init_from(config, category, state, info)
  step = int(state.step)
  total_steps = cfg.num_epochs * steps_per_epoch
  step_fn = jit_train_step(mesh, graphdef, tx, make_loss(config.loss))
  key = sharding.put_replicated(jax.random.key(config.seed), mesh)
  log = JsonlLog(workdir / 'train_log.jsonl')
  epoch_loss = None

  bar = tqdm(total=total_steps, initial=step, desc=f'train {category}', unit='step',
             disable=jax.process_index() != 0)
  while step < total_steps:
    epoch, skip = divmod(step, steps_per_epoch)
    losses_dev, t0, n0 = [], time.perf_counter(), step
    source = data.train.for_epoch(epoch) if hasattr(data.train, 'for_epoch') else data.train
    for batch in pipeline.batches(
        source, batch_size=cfg.batch_size, image_size=config.dataset.image_size, shuffle=True,
        seed=config.seed, epoch=epoch, drop_remainder=True, skip_batches=skip,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.dataset.num_workers):
      state, metrics = step_fn(state, frozen, sharding.put_batch(device_inputs(batch), mesh), key)
      losses_dev.append(metrics['loss'])
      step += 1
      bar.update(1)
      if step % cfg.log_every_steps == 0 or step % steps_per_epoch == 0:
        loss_now = float(metrics['loss'])  # syncs: only at log steps
        rate = (step - n0) * cfg.batch_size / (time.perf_counter() - t0)
        bar.set_postfix(loss=f'{loss_now:.4f}', img_s=f'{rate:.1f}')
        log.write(step=step, epoch=epoch, loss=loss_now, grad_norm=float(metrics['grad_norm']),
                  lr=float(schedule(step - 1)), images_per_s=rate)
        t0, n0 = time.perf_counter(), step
    epoch_loss = float(np.mean(jax.device_get(losses_dev)))
    log.write(step=step, epoch=epoch, epoch_mean_loss=epoch_loss)
    if step == total_steps and data.calib is not None:
      meta = dict(meta, calibration=calibrate(config, data.calib, graphdef, state.params, frozen, mesh))
    if (epoch + 1) % cfg.checkpoint_every_epochs == 0 or step == total_steps:
      checkpoint.save(mgr, step, state, meta, epoch_loss)
  bar.close()
  mgr.wait_until_finished()
  mgr.close()
  return {'category': category, 'steps': step, 'last_epoch_loss': epoch_loss}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       evaluate_after: bool = True) -> dict:
  """Trains every configured category in workdir/<category>, then (optionally) evaluates them all."""
  workdir = pathlib.Path(workdir)
  summaries = [train(config, c, workdir / c) for c in datasets.categories(config)]
  if not evaluate_after:
    return {'train': summaries}
  from adtr_jax import evaluate  # evaluate builds on this module's state helpers
  return {'train': summaries, 'eval': evaluate.evaluate(config, workdir)}
