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
import pathlib
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from adtr_jax import (checkpoint, errors, evaluate, faults, feature_cache, loop, members, moments, paths,
                      preflight, sharding, step, summaries, train_state, trained, validate)
from adtr_jax.data import datasets
from adtr_jax.models.adtr import SplitModel, build_model


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
  """A member while it trains: its data, budget, own numbers (members.numbers), checkpoints and log."""
  member: members.Member
  data: datasets.CategoryData
  steps_per_epoch: int
  last_step: int
  numbers: dict
  mgr: object
  saved: list[int]
  log: summaries.ModelLog | None = None
  since_save: list = dataclasses.field(default_factory=list)
  diverged: dict | None = None   # {'step', 'loss', 'checkpoint'} once its loss is not finite

  def meta(self, info: dict) -> dict:
    """What its checkpoint says about how it was made (the frozen backbone is recorded, not saved)."""
    return {'category': self.member.category, 'backbone': info, 'steps_per_epoch': self.steps_per_epoch,
            'config': json.loads(self.member.config.to_json_best_effort())}


def _training_set(category: str, train) -> tuple:
  """What identifies a member's training set: its category and the files of its rows. A mixture of
  normal images and anomalies (data/mixing.py) has no fixed file list; it trains alone (members.plan)."""
  if not hasattr(train, 'records'):
    return category, id(train)
  return category, tuple(r['path'] for r in train.records)


class _Group:
  """Members that step together: their data, models and states. Members whose training sets list the
  same files (same category and hold-out) share one set of cached features (`sets`); a member's
  numbers['data'] is its set's index."""

  def __init__(self, group: list[members.Member]):
    self.cfg = group[0].config
    cfg = self.cfg.train
    self.mesh, why = sharding.group_mesh(cfg.model_axis, len(group))
    if len(group) % cfg.model_axis:
      print(f'adtr_jax: {len(group)} models step together on a {why}', flush=True)
    sets = {}   # (category, the training set's files) -> its index
    self.models, self.sets, self.names = [], [], []   # names: each set's category
    for m in group:
      m.workdir.mkdir(parents=True, exist_ok=True)
      # Per member: its seed draws its calibration hold-out, so members of one category can differ.
      data = (datasets.load_unified(m.config) if m.category == paths.UNIFIED else
              datasets.load_category(m.config, m.category))
      key = _training_set(m.category, data.train)
      if key not in sets:
        sets[key] = len(self.sets)
        self.sets.append(data.train)
        self.names.append(m.category)
      spe = _epoch_steps(len(data.train), cfg.batch_size, m.category)
      last = train_state.total_steps(m.config.train, spe)
      mgr = checkpoint.manager(paths.checkpoints(m.workdir))
      self.models.append(_Model(m, data, spe, last, members.numbers(
          m.config.train, steps_per_epoch=spe, last_step=last, num_rows=len(data.train), data=sets[key]),
          mgr, checkpoint.saved_steps(paths.checkpoints(m.workdir))))
    self.total = max(x.last_step for x in self.models)
    self.kind = members.feed_kind(self.cfg)

  def resume_step(self) -> int | None:
    """The latest group step s from which every member can resume: each holds the checkpoint of
    min(s, its budget) (a kill between two members' saves leaves some a step ahead; _save keeps the
    step before until all have saved). None: fresh."""
    if any(not x.saved for x in self.models):   # _groups keeps fresh members apart
      return None
    for s in sorted({step for x in self.models for step in x.saved}, reverse=True):
      if all(min(s, x.last_step) in x.saved for x in self.models):
        return s
    raise errors.MissingFileError('no checkpoint step from which every model of '
                                  f'{[str(x.member.workdir) for x in self.models]} can resume: their '
                                  f'checkpoints hold steps {[x.saved for x in self.models]}')

  def active(self) -> list[_Model]:
    return [x for x in self.models if not x.diverged]


def _features(g: _Group, model: SplitModel) -> list[tuple[feature_cache.Features, moments.Moments]]:
  """Each training set's features [N, h, w, C] on disk (the frozen backbone once per image, each
  process its own rows; a complete cache of the same images and backbone is reused) and the moments
  of all its rows. Sets are padded to the largest one in the device feed, which fixes each process's
  block of rows."""
  size = feature_cache.padded_size([len(train) for train in g.sets], g.mesh)
  return [feature_cache.cache(train, model, g.mesh, g.cfg, g.cfg.train.feature_cache_dtype,
                              name=g.names[k], size=size, every_block=g.kind == 'host')
          for k, train in enumerate(g.sets)]


@dataclasses.dataclass
class _Run:
  """A group's program: the model's structure, the frozen backbone (placed), the backbone's identity,
  the members' keys and numbers (placed on 'model') and the runner that steps them."""
  graphdef: object
  frozen: object
  info: dict
  keys: jax.Array = None
  hyper: dict = None
  runner: object = None


def _initial_states(g: _Group, start: int | None) -> tuple[_Run, list, list | None]:
  """(the group's run without its runner, [M] local states at `start`, cached features or None)."""
  built = [build_model(x.member.config) for x in g.models]
  info = built[0][1]
  graphdef, state0, frozen = train_state.init_state(built[0][0], g.cfg.train)
  fresh = SplitModel(graphdef, state0.params, frozen)   # the feature cache reads its backbone alone
  cached = g.kind != 'images' and start != g.total
  features, stats = zip(*_features(g, fresh)) if cached else (None, None)
  # A fresh model takes the feature statistics of its training images (a resumed or initialised one
  # restores them with the weights): the moments streamed while the cache was written, or, for
  # image-fed models, which have no cache, from one pass over their images.
  fits = [start is None and not x.member.config.init_from and model.feature_norm.kind != 'none'
          for x, (model, _) in zip(g.models, built)]
  if not cached and any(fits):
    stats = [feature_cache.set_moments(train, fresh, g.mesh, g.cfg) for train in g.sets]
  run = _Run(graphdef, sharding.put_replicated(frozen, g.mesh), info)
  states = []
  for x, (model, _), fitted in zip(g.models, built, fits):
    if fitted:
      m = stats[int(x.numbers['data'])]
      model.feature_norm.set_statistics(m.mean, m.std)
    gd, state, _ = train_state.init_state(model, g.cfg.train)
    if gd != graphdef:
      raise errors.ConfigError(f'{x.member.workdir}: its model differs in structure from '
                               f'{g.models[0].member.workdir}')
    states.append(_restore(g, x, state, start, info))
  return run, states, features


def _restore(g: _Group, x: _Model, state, start: int | None, info: dict):
  """A member's state at the group's start (local): its checkpoint, or init_from's weights, or as
  built. Only a restore needs the state placed on the mesh (orbax restores into its shardings)."""
  if start is not None:
    return _local(checkpoint.load(x.mgr, min(start, x.last_step), state, info, g.mesh)[0])
  if x.member.config.init_from:
    mgr = checkpoint.manager(paths.checkpoints(pathlib.Path(x.member.config.init_from) / x.member.category))
    restored, meta = checkpoint.load(mgr, 'latest', state, info, g.mesh)
    mgr.close()
    logging.info('initialised %s from %s step %d', x.member.category, mgr.directory, meta['step'])
    state = state.replace(params=restored.params)
  return _local(state)


def _feed(g: _Group, features, keys: jax.Array, hyper: dict) -> loop.Feed:
  """The group's feed (members.feed_kind); keys [M] and hyper: the members' (local)."""
  cfg, c = g.cfg.train, g.cfg
  if g.kind == 'device':
    return loop.DeviceCache(features, g.mesh, cfg.batch_size)
  if g.kind == 'host':
    return loop.HostCache(features, g.mesh, cfg.batch_size, keys, hyper)
  return loop.Images(g.models[0].data.train, g.mesh, batch_size=cfg.batch_size,
                     image_size=c.dataset.image_size, key=keys[0], fields=step.input_keys(c.loss),
                     num_workers=c.dataset.num_workers)


def _save(g: _Group, run: _Run, state, group_step: int) -> None:
  """Each member's state at min(group_step, its budget) as its own checkpoint (once per step); a
  finished member's carries its calibrated threshold. A diverged member saves nothing more.

  Older steps are pruned only here, when every member's previous save has finished: a kill during
  this save (between two members, or inside one) leaves every member its previous step to resume from,
  whatever train.max_checkpoints is."""
  for x in g.models:
    x.mgr.wait_until_finished()
    checkpoint.prune(x.mgr, x.member.config.train.max_checkpoints)
  for i, x in enumerate(g.models):
    at = min(group_step, x.last_step)
    if x.diverged or x.mgr.latest_step() == at:
      continue
    single = jax.tree.map(lambda a: a[0], members.take(state, [i], g.mesh))
    meta = x.meta(run.info)
    if at == x.last_step and x.data.calib is not None:
      meta['calibration'] = trained.calibrate(x.member.config, x.data.calib,
                                              SplitModel(run.graphdef, single.params, run.frozen), g.mesh)
    loss = float(np.mean(x.since_save)) if x.since_save else float('nan')
    checkpoint.save(x.mgr, at, single, meta, loss)
    faults.point('save')
    x.log.flush()
    x.since_save = []


def _calibrate_best(g: _Group, run: _Run, template) -> None:
  """The threshold of each member's best checkpoint too, when it is not its last (eval.checkpoint='best'
  then picks a calibrated step): written to <model>/calibration.json. template: a local state of the
  model's structure."""
  for x in g.active():
    best = x.mgr.best_step()
    if x.data.calib is None or best is None or best == x.last_step or trained.calibration(x.member.workdir, best):
      continue
    state, _ = checkpoint.load(x.mgr, best, template, run.info, g.mesh)
    calibration = trained.calibrate(x.member.config, x.data.calib,
                                    SplitModel(run.graphdef, state.params, run.frozen), g.mesh)
    trained.write_calibration(x.member.workdir, best, calibration)


def _log_chunk(g: _Group, group_step: int, n: int, metrics: dict, seconds: float) -> float:
  """Writes each active member's chunk to its log; a member whose loss (or gradient) is no longer
  finite is marked diverged at its first such step (see _diverge). Returns the mean loss of the chunk's
  active finite steps."""
  cfg = g.cfg.train
  active = metrics['active']
  finite = np.isfinite(metrics['loss']) & np.isfinite(metrics['grad_norm'])
  for i, x in enumerate(g.models):
    if x.diverged or not active[:, i].any():
      continue
    losses = metrics['loss'][active[:, i], i]
    at = min(group_step + n, x.last_step)
    if not finite[active[:, i], i].all():
      first = int(np.argmax(~finite[:, i] & active[:, i]))
      x.diverged = {'step': group_step + first + 1, 'loss': float(metrics['loss'][first, i]),
                    'checkpoint': x.mgr.latest_step()}
      x.log.write(at, epoch=at / x.steps_per_epoch, diverged_at_step=x.diverged['step'])
      continue
    x.since_save.extend(losses.tolist())
    x.log.write(at, epoch=at / x.steps_per_epoch, loss=float(np.mean(losses)),
                grad_norm=float(np.mean(metrics['grad_norm'][active[:, i], i])),
                lr=float(train_state.learning_rate(x.numbers, at - 1, cfg.schedule)),
                images_per_s=float(active[:, i].sum()) * cfg.batch_size / seconds,
                **({'stacked': True} if len(g.models) > 1 else {}))
  ok = active & finite
  return float(np.mean(metrics['loss'][ok])) if ok.any() else float('nan')


def _diverge(g: _Group, run: _Run, x: _Model) -> None:
  """Stops a diverged member while the rest of its group trains on: its budget on the device becomes 0
  (the runner leaves its state alone from now on), it saves nothing more, and its folder records the
  step (diverged.json; the run ends with a line per diverged member, see train_and_evaluate)."""
  numbers = members.stack([y.numbers for y in g.models])
  for j, y in enumerate(g.models):
    if y.diverged:
      numbers['last_step'][j] = 0
  run.hyper = sharding.put(numbers, sharding.model_sharded(g.mesh))
  if jax.process_index() == 0:
    paths.diverged(x.member.workdir).write_text(json.dumps(dict(x.diverged, config_learning_rate=float(
        x.member.config.train.learning_rate))) + '\n')


def _loop(g: _Group, run: _Run, state, start: int) -> None:
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
  while group_step < (total := max((x.last_step for x in g.active()), default=group_step)):
    n = min(cfg.log_every_steps - group_step % cfg.log_every_steps, total - group_step)
    t0 = time.perf_counter()
    state, metrics = run.runner(state, run.frozen, run.keys, run.hyper, group_step, n)
    faults.point('chunk')
    metrics = jax.tree.map(sharding.to_host, metrics)   # [n, M]; waits for the chunk
    seconds = time.perf_counter() - t0
    fine = g.active()
    loss = _log_chunk(g, group_step, n, metrics, seconds)
    for x in fine:
      if x.diverged:
        _diverge(g, run, x)
    group_step += n
    bar.update(n)
    bar.set_postfix(loss=f'{loss:.4f}', img_s=f'{metrics["active"].sum() * cfg.batch_size / seconds:.1f}')
    if clock.due(group_step):
      _save(g, run, state, group_step)
      clock.saved(group_step)
  _save(g, run, state, group_step)   # members that finished before a longer one diverged (else a no-op)
  bar.close()
  for x in g.models:
    x.log.close()


def _train_group(group: list[members.Member]) -> list[dict]:
  """Trains members that step together (see plan) to their budgets, resuming from their checkpoints.
  Returns a summary per member."""
  g = _Group(group)
  start = g.resume_step()
  run, states, features = _initial_states(g, start)
  if start is not None:
    name = g.models[0].member.category if len(group) == 1 else f'{len(group)} stacked models'
    logging.info('resumed %s from step %d', name, start)
    print(f'adtr_jax: resumed {name} from step {start}', flush=True)
  start = start or 0
  if start < g.total:
    keys = members.member_keys([x.member.config for x in g.models])
    numbers = [x.numbers for x in g.models]
    state, run.keys, run.hyper = members.stack_members(states, keys, numbers, g.mesh)
    step_fn = functools.partial(step.train_step, graphdef=run.graphdef, loss=step.make_loss(g.cfg.loss),
                                schedule=g.cfg.train.schedule)
    run.runner = loop.make_runner(step_fn, g.mesh, _feed(g, features, keys, members.stack(numbers)),
                                  g.cfg.train.models_per_call)
    # One-line events on the console (library logs go to the CLI's log file): what trains, where it is saved.
    print(f'adtr_jax: training {len(group)} model(s) {[x.member.category for x in g.models]} on '
          f'{len(g.sets)} training set(s), mesh '
          f'{dict(g.mesh.shape)}, feed {g.kind!r}', flush=True)
    _loop(g, run, state, start)
  for x in g.models:
    x.mgr.wait_until_finished()
    checkpoint.prune(x.mgr, x.member.config.train.max_checkpoints)
  _calibrate_best(g, run, states[0])
  for x in g.models:
    x.mgr.close()
    if not x.diverged:   # a diverged one is named at the end of the run
      print(f'adtr_jax: {x.member.category} saved at step {x.last_step} in {x.mgr.directory}', flush=True)
  return [{'category': x.member.category, 'steps': x.last_step, 'stacked': len(group) > 1}
          for x in g.models]


def _groups(todo: list[members.Member], stack: bool):
  """members.plan's groups, each split into members that have checkpoints and members that have none
  (runs added to a resumed sweep): a fresh member cannot step in lockstep with resumed ones. Members
  that diverged before are left out: with the config they may not change, they would again."""
  todo = [m for m in todo if not paths.diverged(m.workdir).is_file()]
  for group in members.plan(todo, stack):
    parts = {True: [], False: []}
    for m in group:
      parts[bool(checkpoint.saved_steps(paths.checkpoints(m.workdir)))].append(m)
    yield from (part for part in parts.values() if part)


def _raise_if_diverged(todo: list[members.Member]) -> None:
  """After the others trained and were evaluated: errors.Diverged with one line per diverged model."""
  lines = []
  for m in todo:
    if paths.diverged(m.workdir).is_file():
      d = json.loads(paths.diverged(m.workdir).read_text())
      kept = (f'its last finite checkpoint is step {d["checkpoint"]}' if d['checkpoint'] is not None
              else 'it saved no checkpoint')
      lines.append(f'{m.workdir} diverged at step {d["step"]} (training loss {d["loss"]}); {kept}. '
                   f'Train it again in a new --workdir with a lower train.learning_rate (it had '
                   f'{m.config.train.learning_rate})')
  if lines:
    raise errors.Diverged(lines)


def train_and_evaluate(config, workdir: str | pathlib.Path, evaluate_after: bool = True) -> dict:
  """Trains every configured category in workdir/<category> (or, with dataset.unified, one model on
  all of them in workdir/unified), stacked when train.stacked, then (optionally) evaluates them."""
  workdir = pathlib.Path(workdir)
  validate.check(config, 'train', workdir)
  todo = members.members_of(config, workdir)
  groups = list(_groups(todo, config.train.stacked))
  validate.check_groups(groups)
  preflight.check(groups)   # disk and memory, before any data is prepared
  done = {'train': [s for group in groups for s in _train_group(group)]}
  if evaluate_after:
    done['eval'] = evaluate.evaluate(config, workdir)
  _raise_if_diverged(todo)
  return done


def train_runs(runs: list, stack: bool = True, evaluate_after: bool = True) -> None:
  """Trains and evaluates runs [(run_dir, config)] as train_and_evaluate would, each writing
  run_dir/metrics.json with 'minutes' (its training, a stacked group's time shared equally among its
  models, plus its evaluation) and 'stacked_models' (the size of its group); the experiments' one
  entry point. stack: members of different runs that can step together (members.plan) do.
  """
  for run_dir, config in runs:
    validate.check(config, 'train', pathlib.Path(run_dir))
  todo = [m for run_dir, config in runs for m in members.members_of(config, pathlib.Path(run_dir))]
  minutes: dict[pathlib.Path, float] = {}
  stacked: dict[pathlib.Path, int] = {}
  groups = list(_groups(todo, stack))
  validate.check_groups(groups)
  preflight.check(groups)
  for group in groups:
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
  _raise_if_diverged(todo)
