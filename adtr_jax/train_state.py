"""The training state and its optimizer: what a checkpoint holds, and the learning-rate schedule."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from adtr_jax import errors
from adtr_jax.models.adtr import TRAINABLE, decays

SCHEDULES = ('warmup_cosine', 'step')


@struct.dataclass
class TrainState:
  """Everything that changes during training. The frozen backbone is not in here."""
  step: jax.Array          # [] int32
  params: Any              # nnx.State of the reconstructor's parameters
  opt_state: Any


def total_steps(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The run's length: num_epochs epochs, but at least min_steps steps.

  A few dozen training images give a handful of steps per epoch, far too few for the transformer to
  learn anything in a plausible number of epochs; min_steps sets a floor in optimisation steps.
  """
  return max(int(cfg.num_epochs) * steps_per_epoch, int(cfg.min_steps))


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total: int):
  """config.train -> learning rate per step.

  'warmup_cosine': linear warmup over warmup_fraction of the run, then cosine decay to
  learning_rate * final_lr_fraction at its last step, so any budget gets a complete schedule.
  'step' (the paper's): constant, x lr_decay_factor at each epoch of lr_decay_epochs.
  """
  if cfg.schedule == 'warmup_cosine':
    warmup = max(1, round(cfg.warmup_fraction * total))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total, warmup + 1),
                                              cfg.learning_rate * cfg.final_lr_fraction)
  if cfg.schedule == 'step':
    boundaries = {int(e) * steps_per_epoch: cfg.lr_decay_factor for e in cfg.lr_decay_epochs}
    return optax.piecewise_constant_schedule(cfg.learning_rate, boundaries)
  raise errors.ConfigError(f'train.schedule={cfg.schedule!r} must be one of {SCHEDULES}')


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total: int):
  """AdamW with global-norm clipping. Returns (optax transformation, learning-rate schedule)."""
  schedule = make_schedule(cfg, steps_per_epoch, total)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decays))
  return tx, schedule


def init_state(model: nnx.Module, tx) -> tuple[nnx.GraphDef, TrainState, nnx.State]:
  """Splits the model into (graphdef, trainable state, frozen state)."""
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return graphdef, state, frozen
