"""Members: the models a run trains (one per category, or the unified union, each with its workdir),
which of them can step together, and how their pytrees are stacked on the leading model axis.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from adtr_jax import defaults, paths, sharding, train_state
from adtr_jax.data import datasets, mixing


@dataclasses.dataclass
class Member:
  """One model of a run: its config (dataset.category = its category), workdir and category name."""
  config: object
  workdir: pathlib.Path
  category: str


def members_of(config, workdir: pathlib.Path) -> list[Member]:
  """The models a config trains: one per category in workdir/<category>, or one unified model."""
  if config.dataset.unified:
    return [Member(config, workdir / paths.UNIFIED, paths.UNIFIED)]
  out = []
  for c in datasets.categories(config):
    member = config.copy_and_resolve_references()
    member.dataset.category = c
    out.append(Member(member, workdir / c, c))
  return out


def feed_kind(config) -> str:
  """'device' or 'host' (a feature cache: normal-only training has a fixed input) or 'images'.
  train.feature_cache='auto' is 'host' on CPU devices: their memory is the host's, so the device feed
  would hold every row in host memory where the host feed holds one chunk read from the
  memory-mapped cache. On accelerators it is 'device', which preflight.check sets to 'host' when a
  device's share of the rows would pass half of the device's memory (DEVICE_SHARE_LIMIT)."""
  if mixing.uses_anomalies(config) or config.train.feature_cache == 'off':
    return 'images'
  if config.train.feature_cache == 'auto':
    return 'host' if platform() == 'cpu' else 'device'
  return config.train.feature_cache


def platform() -> str:
  """The platform of the devices a run trains on: 'cpu', 'gpu' or 'tpu'."""
  return jax.devices()[0].platform


def group_key(config) -> str:
  """What members must share to step together: the config without its per-member fields."""
  d = json.loads(config.to_json_best_effort())
  for field in defaults.PER_MEMBER:
    *parents, leaf = field.split('.')
    node = d
    for p in parents:
      node = node[p]
    node.pop(leaf, None)
  return json.dumps(d, sort_keys=True)


def _print(line: str) -> None:
  print(line, flush=True)


def plan(members: list[Member], stack: bool, say=_print) -> list[list[Member]]:
  """Members in groups that train together, in first-appearance order; image-fed members alone.
  say(line) is told why a member does not step with others (None: nothing is said)."""
  say = say or (lambda line: None)
  out: dict[str, list[Member]] = {}
  for i, m in enumerate(members):
    kind = feed_kind(m.config)
    if kind == 'images' and m.config.train.feature_cache not in ('off', 'auto'):   # asked for a cache
      say(f'adtr_jax: {m.workdir} trains from images, not from the feature cache '
          f'(train.feature_cache={m.config.train.feature_cache}): its anomalies (anomalies.*) change the '
          'input every epoch')
    if stack and kind == 'images' and len(members) > 1:
      say(f'adtr_jax: {m.workdir} trains alone: a model fed from images is not stacked')
    key = group_key(m.config) if stack and kind != 'images' else str(i)
    out.setdefault(key, []).append(m)
  return list(out.values())


def member_keys(configs) -> jax.Array:
  """[M] PRNG keys: member i's data order and dropout come from its own seed. Every feed and the
  step take these (the feeds draw the data order from them, loop.epoch_order)."""
  return jnp.stack([jax.random.key(c.seed) for c in configs])


def numbers(train_cfg, *, steps_per_epoch: int, last_step: int, num_rows: int, data: int) -> dict:
  """A member's own numbers, what its step and feed read (traced, so members differ in them): its
  optimiser's (train_state.hyperparameters), its budget `last_step`, and its training set (`data`: which
  of the run's sets, `num_rows` rows, `steps_per_epoch`)."""
  return dict(train_state.hyperparameters(train_cfg, steps_per_epoch, last_step),
              num_rows=np.int32(num_rows), last_step=np.int32(last_step),
              steps_per_epoch=np.int32(steps_per_epoch), data=np.int32(data))


def stack_members(states, keys: jax.Array, member_numbers: list[dict], mesh):
  """Members' states, keys [M] and numbers (each a local pytree) -> (state, keys, hyper), each stacked
  on a leading model axis and sharded on the mesh's 'model' axis: what loop.make_runner's run takes."""
  return sharding.put((stack(states), keys, stack(member_numbers)), sharding.model_sharded(mesh))


def stack(trees):
  """Stacks equal-structured pytrees (numpy or local arrays) on a new leading (model) axis."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def take(tree, index, mesh):
  """Models `index` (list of ints) of a stacked pytree, replicated on every device (a jitted gather:
  it reshards across hosts too)."""
  return jax.jit(lambda t, i: jax.tree.map(lambda x: x[i], t),
                 out_shardings=sharding.replicated(mesh))(tree, jnp.asarray(index, jnp.int32))
