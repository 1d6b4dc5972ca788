"""The training state and its optimizer: what a checkpoint holds, and the learning-rate schedule."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

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


def hyperparameters(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total: int) -> dict:
  """config.train -> the optimiser's numbers (float32 / int32 scalars).

  They are plain numbers rather than Python constants of a closure so that stacked models (train.py)
  can each carry their own, stacked on a leading model axis and traced inside one jitted step.
  """
  warmup = max(1, round(cfg.warmup_fraction * total))
  return {'learning_rate': jnp.float32(cfg.learning_rate), 'weight_decay': jnp.float32(cfg.weight_decay),
          'grad_clip_norm': jnp.float32(cfg.grad_clip_norm), 'warmup_steps': jnp.int32(warmup),
          'decay_steps': jnp.int32(max(total, warmup + 1)),
          'final_lr': jnp.float32(cfg.learning_rate * cfg.final_lr_fraction),
          'decay_boundaries': jnp.asarray([int(e) * steps_per_epoch for e in cfg.lr_decay_epochs],
                                          jnp.int32).reshape(-1),
          'decay_factor': jnp.float32(cfg.lr_decay_factor)}


def learning_rate(hyper: dict, step: jax.Array, schedule: str) -> jax.Array:
  """The learning rate at `step` (traceable in `hyper` and `step`).

  'warmup_cosine': linear warmup from 0 over warmup_steps, then cosine decay to final_lr at
  decay_steps (the run's last step), so any budget gets a complete schedule.
  'step' (the paper's): constant, x decay_factor from each of decay_boundaries on.
  """
  step = jnp.asarray(step, jnp.float32)
  peak = hyper['learning_rate']
  if schedule == 'step':
    n = jnp.sum(step >= hyper['decay_boundaries'].astype(jnp.float32))
    return peak * hyper['decay_factor'] ** n
  warmup = hyper['warmup_steps'].astype(jnp.float32)
  span = hyper['decay_steps'].astype(jnp.float32) - warmup
  progress = jnp.clip(step - warmup, 0.0, span) / span
  cosine = hyper['final_lr'] + (peak - hyper['final_lr']) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, peak * step / warmup, cosine)


def optimizer(hyper: dict, schedule: str) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, built from `hyper` (concrete or traced: the state's structure
  does not depend on the values)."""
  return optax.chain(optax.clip_by_global_norm(hyper['grad_clip_norm']),
                     optax.adamw(lambda count: learning_rate(hyper, count, schedule),
                                 weight_decay=hyper['weight_decay'], mask=decays))


def init_state(model: nnx.Module, cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, TrainState,
                                                                          nnx.State]:
  """Splits the model into (graphdef, trainable state, frozen state); the optimizer state is config.train's
  AdamW's at step 0 (its structure and initial values do not depend on the optimiser's numbers)."""
  tx = optimizer(hyperparameters(cfg, 1, 1), cfg.schedule)
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return graphdef, state, frozen
