"""The training driver: every run trains M >= 1 members through one loop, one checkpoint path and one
calibration.

A member is one model a run trains: a config with one category (or the unified union) and its workdir.
Members whose configs differ only in per-member fields (defaults.PER_MEMBER: seed, category, the
optimiser's numbers, init-only model numbers) share every array shape and the frozen backbone, so the
driver may lay them side by side on the mesh's 'model' axis and step them together (train.stacked, or
`train_runs(stack=True)`); a single model is a group of one. Members fed from images (anomalies, or
train.feature_cache='off') train one at a time, and the log says why.

Each member keeps its own ordinary checkpoints in <workdir>/checkpoints (what evaluation, prediction,
export and init_from read): a killed group resumes every member from the step they all saved.

Public: `train_and_evaluate(config, workdir)` (the CLI) and `train_runs(runs)` (experiments, sweeps).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from adtr_jax import (checkpoint, errors, evaluate, feature_cache, loop, members, sharding, step,
                      summaries, train_state, validate)
from adtr_jax.data import datasets
from adtr_jax.models.adtr import build_model


def _local(tree):
  """A replicated (possibly multi-host) pytree -> numpy, from this process's copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x,
                      tree)


def _epoch_steps(num_images: int, batch_size: int, category: str) -> int:
  """Steps per epoch, floor(images / batch) (a last partial batch is dropped); an error naming the
  category when it has fewer images than one batch."""
  if num_images < batch_size:
    raise errors.ConfigError(f'the train split of {category!r} has {num_images} images, fewer than '
                             f'train.batch_size={batch_size}')
  return num_images // batch_size


class _SaveClock:
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


@dataclasses.dataclass
class _Model:
  """A member while it trains: its data, budget, optimiser numbers, checkpoints and log."""
  member: members.Member
  data: datasets.CategoryData
  steps_per_epoch: int
  last_step: int
  hyper: dict
  mgr: object
  latest: int | None
  log: summaries.ModelLog | None = None
  since_save: list = dataclasses.field(default_factory=list)

  def meta(self, info: dict) -> dict:
    """What its checkpoint says about how it was made (the frozen backbone is recorded, not saved)."""
    return {'category': self.member.category, 'backbone': info, 'steps_per_epoch': self.steps_per_epoch,
            'config': json.loads(self.member.config.to_json_best_effort())}


class _Group:
  """Members that step together: their data (loaded once per category), models and states."""

  def __init__(self, group: list[members.Member]):
    self.cfg = group[0].config
    cfg = self.cfg.train
    axis = cfg.model_axis if len(group) % cfg.model_axis == 0 else 1
    self.mesh = sharding.make_mesh(model_axis=axis)
    sharding.check_batch_size(cfg.batch_size, self.mesh, 'train.batch_size')
    data = {}
    self.models = []
    for m in group:
      m.workdir.mkdir(parents=True, exist_ok=True)
      if m.category not in data:
        data[m.category] = (datasets.load_unified(m.config) if m.category == evaluate.UNIFIED else
                            datasets.load_category(m.config, m.category))
      spe = _epoch_steps(len(data[m.category].train), cfg.batch_size, m.category)
      last = train_state.total_steps(m.config.train, spe)
      mgr = checkpoint.manager(m.workdir / 'checkpoints', m.config.train.max_checkpoints)
      self.models.append(_Model(m, data[m.category], spe, last,
                                train_state.hyperparameters(m.config.train, spe, last), mgr,
                                mgr.latest_step()))
    self.categories = list(data)
    self.total = max(x.last_step for x in self.models)
    self.kind = members.feed_kind(self.cfg)

  def resume_step(self) -> int | None:
    """The group step every member saved (a member past its budget counts as saved); None: fresh."""
    if any(x.latest is None for x in self.models):   # _groups keeps fresh members apart
      return None
    unfinished = [x.latest for x in self.models if x.latest < x.last_step]
    return min(unfinished) if unfinished else self.total


def _features(g: _Group, graphdef, state, frozen, dtype: str) -> list[np.ndarray]:
  """Each category's training features [N, h, w, C] (the frozen backbone once per image)."""
  c = g.cfg
  return [feature_cache.compute(
      next(x.data for x in g.models if x.member.category == cat).train, graphdef, state.params, frozen,
      g.mesh, image_size=c.dataset.image_size, batch_size=c.eval.batch_size, dtype=dtype,
      num_workers=c.dataset.num_workers, memo_mb=c.backbone.feature_memo_mb) for cat in g.categories]


def _initial_states(g: _Group, start: int | None):
  """(graphdef, [M] local states, frozen, backbone info, cached features or None)."""
  built = [build_model(x.member.config) for x in g.models]
  info = built[0][1]
  graphdef, state0, frozen = train_state.init_state(built[0][0], g.cfg.train)
  cached = g.kind != 'images' and start != g.total
  features = _features(g, graphdef, state0, frozen, g.cfg.train.feature_cache_dtype) if cached else None
  # A fresh model fits the feature statistics of its training images (a resumed or initialised one
  # restores them with the weights); image-fed models have no cache to fit from, so compute once.
  fits = [start is None and not x.member.config.init_from and model.feature_norm.kind != 'none'
          for x, (model, _) in zip(g.models, built)]
  fit = features or (_features(g, graphdef, state0, frozen, 'float32') if any(fits) else None)
  states = []
  for x, (model, _), fitted in zip(g.models, built, fits):
    if fitted:
      model.feature_norm.fit(fit[g.categories.index(x.member.category)])
    gd, state, _ = train_state.init_state(model, g.cfg.train)
    if gd != graphdef:
      raise errors.ConfigError(f'{x.member.workdir}: its model differs in structure from '
                               f'{g.models[0].member.workdir}')
    states.append(_restore(g, x, state, start, info))
  return graphdef, states, sharding.put_replicated(frozen, g.mesh), info, features


def _restore(g: _Group, x: _Model, state, start: int | None, info: dict):
  """A member's state at the group's start (local): its checkpoint, or init_from's weights, or as
  built. Only a restore needs the state placed on the mesh (orbax restores into its shardings)."""
  if start is not None:
    at = min(start, x.last_step)
    checkpoint.check_backbone(checkpoint.read_meta(x.mgr, at), info, x.mgr.directory)
    return _local(checkpoint.restore(x.mgr, at, sharding.put_replicated(state, g.mesh))[0])
  if x.member.config.init_from:
    mgr = checkpoint.manager(pathlib.Path(x.member.config.init_from) / x.member.category / 'checkpoints')
    at = checkpoint.select_step(mgr, 'latest')
    checkpoint.check_backbone(checkpoint.read_meta(mgr, at), info, mgr.directory)
    restored, _ = checkpoint.restore(mgr, at, sharding.put_replicated(state, g.mesh))
    mgr.close()
    logging.info('initialised %s from %s step %d', x.member.category, mgr.directory, at)
    state = state.replace(params=restored.params)
  return _local(state)


def _feed(g: _Group, features):
  cfg, c = g.cfg.train, g.cfg
  if g.kind == 'device':
    return loop.DeviceCache(features, g.mesh, cfg.batch_size)
  if g.kind == 'host':
    return loop.HostCache(features, g.mesh, cfg.batch_size,
                          [(x.member.config.seed, g.categories.index(x.member.category),
                            len(x.data.train), x.steps_per_epoch) for x in g.models])
  return loop.Images(g.models[0].data.train, g.mesh, batch_size=cfg.batch_size,
                     image_size=c.dataset.image_size, seed=c.seed, keys=step.input_keys(c.loss),
                     num_workers=c.dataset.num_workers)


def _save(g: _Group, graphdef, state, frozen, info: dict, group_step: int) -> None:
  """Each member's state at min(group_step, its budget) as its own checkpoint (once per step); a
  finished member's carries its calibrated threshold."""
  for i, x in enumerate(g.models):
    at = min(group_step, x.last_step)
    if x.mgr.latest_step() == at:
      continue
    single = jax.tree.map(lambda a: a[0], members.take(state, [i], g.mesh))
    meta = x.meta(info)
    if at == x.last_step and x.data.calib is not None:
      meta['calibration'] = evaluate.calibrate(x.member.config, x.data.calib, graphdef, single.params,
                                               frozen, g.mesh)
    loss = float(np.mean(x.since_save)) if x.since_save else float('nan')
    checkpoint.save(x.mgr, at, single, meta, loss)
    x.log.flush()
    x.since_save = []


def _log_chunk(g: _Group, group_step: int, n: int, metrics: dict, seconds: float) -> float:
  """Writes each active member's chunk to its log; an error naming it if its loss is not finite.
  Returns the mean loss of the chunk's active steps."""
  cfg = g.cfg.train
  active = metrics['active']
  for i, x in enumerate(g.models):
    if not active[:, i].any():
      continue
    losses = metrics['loss'][active[:, i], i]
    at = min(group_step + n, x.last_step)
    loss = float(np.mean(losses))
    x.since_save.extend(losses.tolist())
    x.log.write(at, epoch=at / x.steps_per_epoch, loss=loss,
                grad_norm=float(np.mean(metrics['grad_norm'][active[:, i], i])),
                lr=float(train_state.learning_rate(x.hyper, at - 1, cfg.schedule)),
                images_per_s=float(active[:, i].sum()) * cfg.batch_size / seconds,
                **({'stacked': True} if len(g.models) > 1 else {}))
    if not all(map(math.isfinite, losses.tolist())):
      raise FloatingPointError(f'{x.member.workdir}: training loss became {loss} at step {at}: lower '
                               f'train.learning_rate ({x.member.config.train.learning_rate})')
  return float(np.mean(metrics['loss'][active]))


def _loop(g: _Group, runner, graphdef, state, frozen, keys, hyper, info: dict, start: int):
  """Chunks of steps from `start` to the longest budget; logs, checkpoints and calibrates between them.
  Chunks end on multiples of log_every_steps, so a resumed run logs at the same steps."""
  cfg = g.cfg.train
  for x in g.models:
    x.log = summaries.ModelLog(x.member.workdir, min(start, x.last_step))
  clock = _SaveClock(cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, g.total, start)
  name = g.models[0].member.category if len(g.models) == 1 else f'{len(g.models)} stacked'
  bar = tqdm(total=g.total, initial=start, desc=f'train {name}', unit='step',
             disable=jax.process_index() != 0)
  group_step = start
  while group_step < g.total:
    n = min(cfg.log_every_steps - group_step % cfg.log_every_steps, g.total - group_step)
    t0 = time.perf_counter()
    state, metrics = runner(state, frozen, keys, hyper, group_step, n)
    metrics = jax.tree.map(sharding.to_host, metrics)   # [n, M]; waits for the chunk
    seconds = time.perf_counter() - t0
    loss = _log_chunk(g, group_step, n, metrics, seconds)
    group_step += n
    bar.update(n)
    bar.set_postfix(loss=f'{loss:.4f}', img_s=f'{metrics["active"].sum() * cfg.batch_size / seconds:.1f}')
    if clock.due(group_step):
      _save(g, graphdef, state, frozen, info, group_step)
      clock.saved(group_step)
  bar.close()
  for x in g.models:
    x.log.close()


def _train_group(group: list[members.Member]) -> list[dict]:
  """Trains members that step together (see plan) to their budgets, resuming from their checkpoints.
  Returns a summary per member."""
  g = _Group(group)
  start = g.resume_step()
  graphdef, states, frozen, info, features = _initial_states(g, start)
  if start is not None:
    name = g.models[0].member.category if len(group) == 1 else f'{len(group)} stacked models'
    logging.info('resumed %s from step %d', name, start)
    print(f'adtr_jax: resumed {name} from step {start}', flush=True)
  start = start or 0
  if start < g.total:
    mod = sharding.model_sharded(g.mesh)
    hyper = members.stack([dict(x.hyper, num_rows=np.int32(len(x.data.train)),
                                last_step=np.int32(x.last_step), steps_per_epoch=np.int32(x.steps_per_epoch),
                                data=np.int32(g.categories.index(x.member.category))) for x in g.models])
    keys = members.member_keys([x.member.config for x in g.models])
    state, keys, hyper = sharding.put((members.stack(states), keys, hyper), mod)
    step_fn = functools.partial(step.train_step, graphdef=graphdef, loss=step.make_loss(g.cfg.loss),
                                schedule=g.cfg.train.schedule)
    runner = loop.make_runner(step_fn, g.mesh, _feed(g, features), g.cfg.train.models_per_call)
    # One-line events on the console (library logs go to the CLI's log file): what trains, where it is saved.
    print(f'adtr_jax: training {len(group)} model(s) {g.categories} on mesh {dict(g.mesh.shape)}, '
          f'feed {g.kind!r}', flush=True)
    _loop(g, runner, graphdef, state, frozen, keys, hyper, info, start)
  for x in g.models:
    x.mgr.wait_until_finished()
    x.mgr.close()
    print(f'adtr_jax: {x.member.category} saved at step {x.last_step} in {x.mgr.directory}', flush=True)
  return [{'category': x.member.category, 'steps': x.last_step, 'stacked': len(group) > 1}
          for x in g.models]


def _groups(todo: list[members.Member], stack: bool):
  """members.plan's groups, each split into members that have checkpoints and members that have none
  (runs added to a resumed sweep): a fresh member cannot step in lockstep with resumed ones."""
  for group in members.plan(todo, stack):
    parts = {True: [], False: []}
    for m in group:
      parts[bool(checkpoint.saved_steps(m.workdir / 'checkpoints'))].append(m)
    yield from (part for part in parts.values() if part)


def train_and_evaluate(config, workdir: str | pathlib.Path, evaluate_after: bool = True) -> dict:
  """Trains every configured category in workdir/<category> (or, with dataset.unified, one model on
  all of them in workdir/unified), stacked when train.stacked, then (optionally) evaluates them."""
  validate.check(config)
  workdir = pathlib.Path(workdir)
  trained = [s for group in _groups(members.members_of(config, workdir), config.train.stacked)
             for s in _train_group(group)]
  if not evaluate_after:
    return {'train': trained}
  return {'train': trained, 'eval': evaluate.evaluate(config, workdir)}


def train_runs(runs: list, stack: bool = True, evaluate_after: bool = True) -> None:
  """Trains and evaluates runs [(run_dir, config)] as train_and_evaluate would, each writing
  run_dir/metrics.json with 'minutes' (its training, a stacked group's time shared equally among its
  models, plus its evaluation) and 'stacked_models' (the size of its group); the experiments' one
  entry point. stack: members of different runs that can step together (members.plan) do.
  """
  for _, config in runs:
    validate.check(config)
  todo = [m for run_dir, config in runs for m in members.members_of(config, pathlib.Path(run_dir))]
  minutes: dict[pathlib.Path, float] = {}
  stacked: dict[pathlib.Path, int] = {}
  for group in _groups(todo, stack):
    if len(group) > 1:
      print(f'training {len(group)} stacked models: {[str(m.workdir) for m in group]}', flush=True)
    t0 = time.time()
    _train_group(group)
    for m in group:
      run_dir = m.workdir.parent
      minutes[run_dir] = minutes.get(run_dir, 0.0) + (time.time() - t0) / 60 / len(group)
      stacked[run_dir] = max(stacked.get(run_dir, 1), len(group))
  for run_dir, config in runs if evaluate_after else ():
    run_dir = pathlib.Path(run_dir)
    t0 = time.time()
    report = evaluate.evaluate(config, run_dir)
    minutes[run_dir] = minutes.get(run_dir, 0.0) + (time.time() - t0) / 60
    if jax.process_index() == 0:
      (run_dir / 'metrics.json').write_text(json.dumps(
          dict(report, minutes=minutes.get(run_dir, 0.0), stacked_models=stacked.get(run_dir, 1)),
          indent=2) + '\n')
