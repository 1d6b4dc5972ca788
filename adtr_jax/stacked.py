"""Many models in one run: M reconstructors stacked on a leading axis, trained by one jitted step.

A member is one model a run would train alone: a config with one category, and its workdir. Members
whose configs differ only in STACKABLE fields (category, seed, and the optimiser's numbers) share
every array shape and the frozen backbone, so they train together (the init-only model numbers too:
each model is initialised from its own config):

* parameters, optimizer state, keys and optimiser numbers are stacked on a leading model axis and
  `jax.vmap`-ed through train.train_step; the model axis is sharded over the mesh's 'model' axis,
  each model's batch over 'data' (`train.model_axis` devices along 'model'); on each device,
  `train.models_per_call` of its models share one vectorised call and the rest run in sequence in the
  same jitted step (on CPU one at a time by default: vmapping lost throughput there);
* each category's training features are computed once and cached on the device ([K, N', h, w, C]);
  each model draws its own rows in its own epoch order, so model i trains exactly as it would alone
  (tests/test_stacked.py);
* training sets of different sizes give different steps per epoch and budgets: the run lasts the
  longest budget, and a model whose budget is spent keeps its state (masked) while the others go on;
* one stacked checkpoint (<group_dir>/checkpoints) holds every model: a killed run resumes all of
  them from it, exactly. At the end each model's final state is exported as an ordinary checkpoint
  in its own workdir (what evaluation, prediction and init_from read);
* evaluation scores a category's test split once for all the members trained on it (vmapped).

Members that differ in anything else (backbone, layers, image size, hidden size, dropout, batch size,
losses and anomalies...) go to separate groups (`groups`). Anomaly-aware training (its inputs change
every epoch) and init_from are not stacked: such configs train one at a time (train.train).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from adtr_jax import (checkpoint, errors, evaluate, feature_cache, inference, loop, sharding, summaries,
                      train, train_state)
from adtr_jax.data import datasets
from adtr_jax.models.adtr import build_model

# Config fields that are numbers (or the data) rather than shapes: members differing only in these
# train in one group. The model.* ones change only initial values (prepare builds each member's model
# from its own config), not the graph.
STACKABLE = ('seed', 'dataset.category', 'train.learning_rate', 'train.weight_decay',
             'train.grad_clip_norm', 'train.warmup_fraction', 'train.final_lr_fraction',
             'train.num_epochs', 'train.min_steps', 'train.lr_decay_factor',
             'model.embed_init_std', 'model.tie_qk_init', 'model.pos_init')


@dataclasses.dataclass
class Member:
  """One model of a stacked run: its config (one category) and its own workdir."""
  config: object
  workdir: pathlib.Path

  @property
  def category(self) -> str:
    names = datasets.categories(self.config)
    if len(names) != 1:
      raise errors.ConfigError(f'a stacked model trains one category; dataset.category={names}')
    return names[0]


def group_key(config) -> str:
  """What members must share to be stacked: the config without its STACKABLE fields."""
  d = json.loads(config.to_json_best_effort())
  for field in STACKABLE:
    *parents, leaf = field.split('.')
    node = d
    for p in parents:
      node = node[p]
    node.pop(leaf, None)
  return json.dumps(d, sort_keys=True)


def groups(members: list[Member]) -> list[list[Member]]:
  """Members split into stackable groups, in first-appearance order."""
  out: dict[str, list[Member]] = {}
  for m in members:
    out.setdefault(group_key(m.config), []).append(m)
  return list(out.values())


def check(config) -> None:
  """A clear error for a config that cannot be stacked."""
  if not train.uses_feature_cache(config) or config.init_from:
    raise errors.ConfigError('stacked training trains from cached features: anomaly-aware training '
                             '(anomalies.*, loss.type), train.feature_cache=off and init_from train one '
                             'model at a time (train.stacked=False)')
  if config.train.feature_cache != 'device':
    raise errors.ConfigError(f'stacked training keeps the features on the device: '
                             f'train.feature_cache={config.train.feature_cache!r} must be "device"')
  if config.dataset.unified:
    raise errors.ConfigError('dataset.unified trains one model: it is not stacked (train.stacked=False)')


def stack(trees):
  """Stacks equal-structured pytrees on a new leading (model) axis."""
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def take(tree, index, mesh):
  """Models `index` (list of ints) of a stacked pytree, replicated on every device (a jitted gather:
  it reshards across hosts too)."""
  return jax.jit(lambda t, i: jax.tree.map(lambda x: x[i], t),
                 out_shardings=sharding.replicated(mesh))(tree, jnp.asarray(index, jnp.int32))


class _Group:
  """A group's members, their categories' data (loaded once per category) and each model's budget."""

  def __init__(self, members: list[Member], mesh):
    self.members, self.mesh = members, mesh
    self.cfg = members[0].config
    cats = list(dict.fromkeys(m.category for m in members))
    self.categories = cats
    self.data = {c: datasets.load_category(next(m.config for m in members if m.category == c), c)
                 for c in cats}
    batch = self.cfg.train.batch_size
    sharding.check_batch_size(batch, mesh, 'train.batch_size')
    self.steps_per_epoch, self.last_steps = [], []
    for m in members:
      spe = train.epoch_steps(len(self.data[m.category].train), batch, m.category)
      self.steps_per_epoch.append(spe)
      self.last_steps.append(train_state.total_steps(m.config.train, spe))
    self.total = max(self.last_steps)


def prepare(members: list[Member], mesh, fresh: bool):
  """-> (group, graphdef, stacked state, frozen, cache, keys, hyper, backbone info)."""
  for m in members:
    check(m.config)
  g = _Group(members, mesh)
  tx0 = train_state.make_optimizer(g.cfg.train, 1, 1)[0]   # the state's structure only
  models = [build_model(m.config) for m in members]
  info = models[0][1]
  graphdef, state0, frozen = train_state.init_state(models[0][0], tx0)
  features = {c: train.train_features(g.cfg, g.data[c], mesh, graphdef, state0, frozen,
                                      g.cfg.train.feature_cache_dtype) for c in g.categories}
  states = []
  for m, (model, _) in zip(members, models):
    if fresh and model.feature_norm.kind != 'none':
      model.feature_norm.fit(features[m.category])
    gd, state, _ = train_state.init_state(model, tx0)
    if gd != graphdef:
      raise errors.ConfigError(f'{m.workdir}: its model differs in structure from {members[0].workdir}')
    states.append(state)
  n_models = len(members)
  if n_models % mesh.shape['model']:
    raise errors.ConfigError(f'{n_models} stacked models do not split over train.model_axis='
                             f'{mesh.shape["model"]} devices')
  hyper = stack([dict(train_state.hyperparameters(m.config.train, spe, last),
                      num_rows=jnp.int32(len(g.data[m.category].train)),
                      steps_per_epoch=jnp.int32(spe), last_step=jnp.int32(last),
                      data=jnp.int32(g.categories.index(m.category)))
                 for m, spe, last in zip(members, g.steps_per_epoch, g.last_steps)])
  keys = jnp.stack([jax.random.key(m.config.seed) for m in members])
  mod = sharding.model_sharded(mesh)
  state, keys, hyper = sharding.put((stack(states), keys, hyper), mod)
  frozen = sharding.put_replicated(frozen, mesh)
  cache, size = feature_cache.place_stacked([features[c] for c in g.categories], mesh)
  return g, graphdef, state, frozen, (cache, size), keys, hyper, info


def _meta(g: _Group, info: dict) -> dict:
  return {'members': [{'workdir': str(m.workdir), 'category': m.category, 'seed': m.config.seed}
                      for m in g.members],
          'backbone': info, 'last_steps': g.last_steps,
          'configs': [json.loads(m.config.to_json_best_effort()) for m in g.members]}


def _restore(mgr, step: int, state, meta: dict):
  saved = checkpoint.read_meta(mgr, step)
  if saved.get('members') != meta['members'] or saved.get('configs') != meta['configs']:
    raise errors.ConfigError(f'{mgr.directory} holds a stacked run of other models '
                             f'({[m["workdir"] for m in saved.get("members", [])]}); use another group dir')
  train._check_same_backbone(saved, meta['backbone'], mgr.directory)
  return checkpoint.restore(mgr, step, state)[0]


def _run(g: _Group, group_dir: pathlib.Path, chunk, state, frozen, cache, keys, hyper, mgr, meta):
  """Chunks of lockstep steps up to the longest budget, logging each model in its own workdir."""
  cfg = g.cfg.train
  step = int(np.max(sharding.to_host(state.step)))   # model-sharded: spans every process
  logs = [summaries.ModelLog(m.workdir, min(step, last)) for m, last in zip(g.members, g.last_steps)]
  clock = train.SaveClock(cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, g.total, step)
  bar = tqdm(total=g.total, initial=step, desc=f'train {len(g.members)} stacked', unit='step',
             disable=jax.process_index() != 0)
  since_save = []
  while step < g.total:
    n = min(cfg.log_every_steps - step % cfg.log_every_steps, g.total - step)
    t0 = time.perf_counter()
    state, metrics = chunk(state, frozen, cache, keys, hyper, n)
    metrics = jax.tree.map(sharding.to_host, metrics)   # [n, M], sharded on 'model'; waits for the chunk
    seconds = time.perf_counter() - t0
    active = metrics['active']
    for i, log in enumerate(logs):
      if active[:, i].any():
        loss_i = float(np.mean(metrics['loss'][active[:, i], i]))
        log.write(min(step + n, g.last_steps[i]), epoch=min(step + n, g.last_steps[i]) /
                  g.steps_per_epoch[i], loss=loss_i,
                  grad_norm=float(np.mean(metrics['grad_norm'][active[:, i], i])),
                  images_per_s=float(active[:, i].sum()) * cfg.batch_size / seconds, stacked=True)
        if not math.isfinite(loss_i):
          raise FloatingPointError(f'{g.members[i].workdir}: training loss became {loss_i} near step '
                                   f'{step + n}: lower its train.learning_rate')
    step += n
    since_save.append(float(np.mean(metrics['loss'][active])))
    bar.update(n)
    bar.set_postfix(loss=f'{since_save[-1]:.4f}', img_s=f'{active.sum() * cfg.batch_size / seconds:.1f}')
    if clock.due(step):
      checkpoint.save(mgr, step, state, meta, float(np.mean(since_save)))
      for log in logs:
        log.flush()
      clock.saved(step)
      since_save = []
  bar.close()
  for log in logs:
    log.close()
  return state


def _export(g: _Group, graphdef, state, frozen, info, mesh) -> None:
  """Each model's final state as an ordinary checkpoint in its workdir (calibrated as train.train does)."""
  for i, m in enumerate(g.members):
    mgr = checkpoint.manager(m.workdir / 'checkpoints', m.config.train.max_checkpoints)
    if mgr.latest_step() != g.last_steps[i]:
      single = jax.tree.map(lambda x: x[0], take(state, [i], mesh))
      meta = dict(train.checkpoint_meta(m.config, m.category, info, g.steps_per_epoch[i]),
                  stacked_group=[str(x.workdir) for x in g.members])
      calib = g.data[m.category].calib
      if calib is not None:
        meta['calibration'] = train.calibrate(m.config, calib, graphdef, single.params, frozen, mesh)
      checkpoint.save(mgr, g.last_steps[i], single, meta, float('nan'))
      mgr.wait_until_finished()
    mgr.close()


def train_members(members: list[Member], group_dir: str | pathlib.Path, mesh=None):
  """Trains one stackable group (see module doc) in one run; resumes from group_dir/checkpoints.
  mesh: default every device, train.model_axis of them along 'model'.

  Returns (group, graphdef, stacked state, frozen, mesh) for evaluate_members.
  """
  group_dir = pathlib.Path(group_dir)
  for m in members:
    m.workdir.mkdir(parents=True, exist_ok=True)
  cfg = members[0].config.train
  mesh = mesh or sharding.make_mesh(model_axis=cfg.model_axis)
  mgr = checkpoint.manager(group_dir / 'checkpoints', cfg.max_checkpoints)
  latest = mgr.latest_step()
  g, graphdef, state, frozen, (cache, size), keys, hyper, info = prepare(members, mesh, latest is None)
  meta = _meta(g, info)
  if latest is not None:
    state = _restore(mgr, latest, state, meta)
    print(f'adtr_jax: resumed {len(members)} stacked models from step {latest}', flush=True)
  step_fn = functools.partial(_model_step, graphdef=graphdef, loss=train.make_loss(g.cfg.loss),
                              schedule=cfg.schedule)
  chunk = loop.stacked_cache_chunk(step_fn, mesh, size=size, batch_size=cfg.batch_size,
                                   models_per_call=cfg.models_per_call)
  logging.info('training %d stacked models (%s) on mesh %s', len(members), g.categories, mesh.shape)
  state = _run(g, group_dir, chunk, state, frozen, cache, keys, hyper, mgr, meta)
  mgr.wait_until_finished()
  mgr.close()
  _export(g, graphdef, state, frozen, info, mesh)
  return g, graphdef, state, frozen, mesh


def _model_step(state, frozen, batch, key, hyper, *, graphdef, loss, schedule):
  """One model's train step with its own optimiser numbers (traced under vmap)."""
  return train.train_step(state, frozen, batch, key, graphdef=graphdef,
                          tx=train_state.optimizer(hyper, schedule), loss=loss)


def evaluate_members(g: _Group, graphdef, state, frozen, mesh) -> list[dict]:
  """Each category's test split scored once for all its models (vmapped); writes each member's
  workdir/metrics.json. Returns the members' reports, in order."""
  reports = [None] * len(g.members)
  for c in g.categories:
    idx = [i for i, m in enumerate(g.members) if m.category == c]
    params = take(state.params, idx, mesh)
    result = inference.score_split(g.cfg, g.data[c].test, graphdef, params, frozen, mesh,
                                   f'eval {c} x{len(idx)}', stacked=True)
    for j, i in enumerate(idx):
      m = g.members[i]
      values = evaluate.category_report(m.config, g.data[c], dict(result, maps=result['maps'][j],
                                                                  scores=result['scores'][j]),
                                        m.workdir, g.last_steps[i])
      reports[i] = evaluate.write_report({c: values}, m.workdir)
  return reports


def train_and_evaluate_members(members: list[Member], group_dir) -> list[dict]:
  """train_members, then evaluate_members; the members' metrics reports in order."""
  return evaluate_members(*train_members(members, group_dir))


def train_runs(runs: list, groups_dir: str | pathlib.Path, stack: bool = True) -> None:
  """Trains and evaluates runs [(run_dir, config)] as train.train_and_evaluate would, each writing
  run_dir/metrics.json (with 'minutes'); the experiment runners' one entry point.

  stack: runs that can be stacked (`check`) train in groups (`groups`), each group in
  groups_dir/<id> (its identity is its members: a resumed runner with other runs pending gets
  another dir), with each model in run_dir/<category>; 'minutes' is then the group's wall time over
  its models. The others (and all, with stack=False) run one after another.
  """
  groups_dir = pathlib.Path(groups_dir)
  to_stack = []
  for run_dir, config in runs:
    try:
      if stack:
        check(config)
        member = Member(config, run_dir)
        to_stack.append(Member(config, run_dir / member.category))
        continue
    except errors.ConfigError as e:
      print(f'{run_dir}: trained alone ({e})', flush=True)
    t0 = time.time()
    report = train.train_and_evaluate(config, run_dir)['eval']
    _write(run_dir, report, minutes=(time.time() - t0) / 60)
  for group in groups(to_stack):
    gid = hashlib.sha1('|'.join(str(m.workdir) for m in group).encode()).hexdigest()[:12]
    print(f'training {len(group)} stacked models in {groups_dir / gid}', flush=True)
    t0 = time.time()
    reports = train_and_evaluate_members(group, groups_dir / gid)
    minutes = (time.time() - t0) / 60
    for m, report in zip(group, reports):
      _write(m.workdir.parent, report, minutes=minutes / len(group), group_minutes=minutes,
             stacked_models=len(group))


def _write(run_dir: pathlib.Path, report: dict, **extra) -> None:
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'metrics.json').write_text(json.dumps(dict(report, **extra), indent=2) + '\n')
