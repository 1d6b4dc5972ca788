"""The one pure train step: the loss of a batch, its gradients and the optimizer update of one model.

A run trains M >= 1 models; the driver (train.py) vmaps this step over the models' leading axis, each
with its own optimiser numbers (`hyper`, train_state.hyperparameters), so one model and many stacked
models are the same program.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from adtr_jax import errors, losses, train_state
from adtr_jax.train_state import TrainState

LOSSES = ('mse', 'pixel', 'image')


def key_streams(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A member's PRNG key -> (dropout key, data-order key): two independent streams. (Folding a
  constant into the key for the data order would coincide with the dropout key of the step of the
  same number.)"""
  dropout, data = jax.random.split(key)
  return dropout, data


def make_loss(cfg: ml_collections.ConfigDict) -> Callable:
  """config.loss -> loss(features [B, h, w, C], reconstruction, batch) -> scalar.

  'mse' is L_norm; 'pixel' uses batch['mask'] [B, S, S] brought to the token grid by
  cfg.mask_downsample; 'image' uses batch['label'] [B]. Padding rows (valid False) have weight 0.
  """
  def weights(batch):
    return batch['valid'].astype(jnp.float32)

  if cfg.type == 'mse':
    return lambda f, f_hat, batch: losses.normal_loss(f, f_hat, weights(batch))
  if cfg.type == 'pixel':
    def pixel(f, f_hat, batch):
      grid = losses.downsample_mask(batch['mask'], f.shape[1:3], cfg.mask_downsample)
      return losses.pixel_loss(f, f_hat, grid, cfg.alpha, weights(batch))
    return pixel
  if cfg.type == 'image':
    def image(f, f_hat, batch):
      return losses.image_loss(f, f_hat, batch['label'].astype(jnp.float32), cfg.alpha, cfg.topk,
                               weights(batch))
    return image
  raise errors.ConfigError(f'loss.type={cfg.type!r} must be one of {LOSSES}')


def input_keys(loss_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The image-batch entries the step reads for this loss (the pixel mask only for 'pixel')."""
  return {'mse': ('image', 'valid'), 'pixel': ('image', 'mask', 'valid'),
          'image': ('image', 'label', 'valid')}[loss_cfg.type]


def loss_and_grads(params, frozen: nnx.State, batch: dict, dropout_key: jax.Array, *,
                   graphdef: nnx.GraphDef, loss: Callable):
  """(loss, grads) of one batch. batch holds 'features' [B, h, w, C] (from a feature cache) or
  'image' [B, S, S, 3] uint8 (the frozen backbone runs first), plus 'valid' [B] and what `loss` reads."""
  def objective(params):
    model = nnx.merge(graphdef, params, frozen)
    embedded = batch['features'] if 'features' in batch else model.embed(batch['image'])
    f, f_hat = model.reconstruct(embedded, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
    return loss(f, f_hat, batch)
  return jax.value_and_grad(objective)(params)


def train_step(state: TrainState, frozen: nnx.State, batch: dict, key: jax.Array, hyper: dict, *,
               graphdef: nnx.GraphDef, loss: Callable, schedule: str) -> tuple[TrainState, dict]:
  """One optimisation step of one model with its own optimiser numbers `hyper`; dropout is drawn from
  (key's dropout stream, step). Returns (new state, {'loss', 'grad_norm'})."""
  tx = train_state.optimizer(hyper, schedule)
  dropout_key = jax.random.fold_in(key_streams(key)[0], state.step)
  value, grads = loss_and_grads(state.params, frozen, batch, dropout_key,
                                graphdef=graphdef, loss=loss)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {'loss': value, 'grad_norm': optax.tree.norm(grads)}
