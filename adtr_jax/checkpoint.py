"""Orbax checkpoints of the trainable state, with metadata naming the frozen backbone it belongs to."""
from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from adtr_jax import errors, sharding


def manager(directory: str | pathlib.Path) -> ocp.CheckpointManager:
  """A model's checkpoints. Orbax deletes nothing by itself: the driver prunes (`prune`) once every
  member of a group has finished saving a step, so that a kill during a save always leaves a step that
  every member can resume from. best_step(): the lowest mean training loss over the steps since the
  checkpoint before it (what `save` records)."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=pp.PreserveAll(), best_fn=lambda m: m['train_loss'], best_mode='min',
      create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_names=('state', 'meta'))


def prune(mgr: ocp.CheckpointManager, max_to_keep: int) -> None:
  """Deletes the finished steps other than the latest `max_to_keep` and the best one. Call it only when
  no save of `mgr` is in flight and every member of the group has finished its latest save."""
  steps = sorted(mgr.all_steps())
  keep = set(steps[-max_to_keep:]) | {mgr.best_step()}
  for step in steps:
    if step not in keep:
      mgr.delete(step)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict, train_loss: float) -> None:
  """Saves the state pytree and a JSON dict (backbone, weight hash, config, calibration...);
  train_loss: the mean training loss of the steps since the previous checkpoint."""
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         meta=ocp.args.JsonSave(meta)),
           metrics={'train_loss': float(train_loss)})


def select_step(mgr: ocp.CheckpointManager, which: str) -> int:
  """'latest' or 'best' -> a saved step; a clear error when the workdir has none."""
  step = mgr.latest_step() if which == 'latest' else mgr.best_step()
  if step is None:
    raise errors.MissingFileError(f'no checkpoint in {mgr.directory}: train first (--mode=train)')
  return step


def saved_steps(directory: pathlib.Path) -> list[int]:
  """The finished checkpoint steps in `directory` (orbax names them by the step and renames them so
  only once written); looks without creating anything, unlike manager()."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def require(directory: pathlib.Path, needed_by: str) -> None:
  """An error unless `directory` holds a finished checkpoint step."""
  if not saved_steps(directory):
    raise errors.MissingFileError(f'{needed_by} needs a trained model, but there is no checkpoint in '
                                  f'{directory}: train first (--mode=train)')


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores (state, meta) at `step` into the structure and shardings of `abstract_state`."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                  meta=ocp.args.JsonRestore()))
  return out.state, out.meta


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  """Only the JSON metadata of a step (cheap: no arrays are read)."""
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def check_backbone(meta: dict, info: dict, where) -> None:
  """The one backbone-identity check: a checkpoint's recorded arch and weights hash must be the
  config's (the frozen backbone is not saved, only named)."""
  old = meta.get('backbone', {})
  for key in ('arch', 'weights_sha256'):
    if old.get(key) != info.get(key):
      raise errors.ConfigError(f'the checkpoint in {where} was trained with backbone {key}={old.get(key)!r} '
                               f'but the config gives {info.get(key)!r}; use another --workdir or the '
                               'original weights')


def load(mgr: ocp.CheckpointManager, which: str | int, state, info: dict, mesh):
  """(state, meta) of step `which` ('latest', 'best' or a step number), restored into the structure of
  `state` replicated on `mesh`, after checking that it was trained with the backbone `info` names
  (before any array is read). meta['step'] is the step."""
  step = select_step(mgr, which) if isinstance(which, str) else which
  check_backbone(read_meta(mgr, step), info, mgr.directory)
  state, meta = restore(mgr, step, sharding.put_replicated(state, mesh))
  return state, dict(meta, step=step)
