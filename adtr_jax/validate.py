"""The whole config, and the workdir a mode needs, checked before any data, weights or file is touched.

`check(config, mode, workdir)` raises one errors.ConfigError / MissingFileError naming the field (or the
folder) for the first problem it finds, in a fraction of a second, so that a bad value never costs the
minutes of preparing a dataset first. The schema is adtr_jax/defaults.py itself: every field must exist
there and hold a value of its default's type; the ranges and choices are below, the choices taken from
the modules that use them.
"""
from __future__ import annotations

import json
import math
import pathlib

import ml_collections

from adtr_jax import (checkpoint, defaults, errors, feature_cache, losses, members, metrics, paths,
                      scoring, sharding, step, train_state)
from adtr_jax.baselines import nearest_neighbour
from adtr_jax.data import datasets, elpv, mixing, realiad, visa
from adtr_jax.models import adtr, backbone, reconstructor, weights

MODES = ('train', 'eval', 'train_and_eval', 'predict', 'show_anomalies', 'export')
_INF = math.inf

# field: (low, high, low inclusive, high inclusive). Integer fields are checked as numbers too.
RANGES = {
    'seed': (0, _INF, True, False),
    'dataset.image_size': (1, _INF, True, False),
    'dataset.num_workers': (0, _INF, True, False),
    'backbone.out_stride': (2, 32, True, True),
    'backbone.feature_memo_mb': (0, _INF, True, False),
    'model.hidden_dim': (1, _INF, True, False),
    'model.num_encoder_layers': (0, _INF, True, False),
    'model.num_decoder_layers': (1, _INF, True, False),
    'model.num_heads': (1, _INF, True, False),
    'model.ffn_dim': (1, _INF, True, False),
    'model.dropout': (0, 1, True, False),
    'model.embed_init_std': (0, _INF, False, False),
    'model.neighbour_mask': (0, _INF, True, False),
    'model.feature_jitter': (0, _INF, True, False),
    'train.batch_size': (1, _INF, True, False),
    'train.num_epochs': (0, _INF, True, False),
    'train.min_steps': (0, _INF, True, False),
    'train.learning_rate': (0, _INF, False, False),
    'train.weight_decay': (0, _INF, True, False),
    'train.grad_clip_norm': (0, _INF, False, False),
    'train.warmup_fraction': (0, 1, True, False),
    'train.final_lr_fraction': (0, 1, True, True),
    'train.lr_decay_factor': (0, _INF, False, False),
    'train.checkpoint_every_steps': (0, _INF, True, False),
    'train.checkpoint_every_minutes': (0, _INF, True, False),
    'train.max_checkpoints': (1, _INF, True, False),
    'train.log_every_steps': (1, _INF, True, False),
    'train.model_axis': (1, _INF, True, False),
    'train.models_per_call': (0, _INF, True, False),
    'scoring.avgpool_size': (1, _INF, True, False),
    'scoring.topk': (1, _INF, True, False),
    'scoring.gaussian_sigma': (0, _INF, True, False),
    'loss.alpha': (0, _INF, False, False),
    'loss.topk': (1, _INF, True, False),
    'anomalies.num_labelled': (0, _INF, True, False),
    'anomalies.fraction': (0, 1, False, False),
    'calibration.holdout_fraction': (0, 1, True, False),
    'calibration.target_fpr': (0, 1, False, False),
    'baseline.bank_fraction': (0, 1, False, True),
    'eval.batch_size': (1, _INF, True, False),
    'eval.num_heatmaps': (0, _INF, True, False),
}

CHOICES = {
    'dataset.source': datasets.SOURCES,
    'dataset.elpv_cell_type': elpv.CELL_TYPES,
    'dataset.visa_split': visa.SPLITS,
    'dataset.realiad_resolution': realiad.RESOLUTIONS,
    'dataset.realiad_json': realiad.JSON_VARIANTS,
    'model.type': tuple(adtr.RECONSTRUCTORS),
    'model.target': ('features', 'pixels'),
    'model.feature_norm': adtr.FEATURE_NORMS,
    'model.pos_init': reconstructor.POS_INITS,
    'model.dtype': tuple(reconstructor.DTYPES),
    'model.attention': reconstructor.ATTENTION_IMPLEMENTATIONS,
    'train.schedule': train_state.SCHEDULES,
    'train.feature_cache': feature_cache.PLACES,
    'train.feature_cache_dtype': tuple(feature_cache.DTYPES),
    'scoring.image_score': scoring.IMAGE_SCORES,
    'loss.type': step.LOSSES,
    'loss.mask_downsample': losses.DOWNSAMPLE_METHODS,
    'anomalies.labelled_use': ('train', 'exclude'),
    'baseline.subsample': nearest_neighbour.SUBSAMPLING,
    'eval.checkpoint': ('latest', 'best'),
    'eval.aupro_ties': metrics.AUPRO_TIES,
}


def check(config: ml_collections.ConfigDict, mode: str = 'train_and_eval',
          workdir: str | pathlib.Path | None = None) -> None:
  """Every field, their combinations, the meshes its models will train on, and (for eval / predict /
  export / init_from) the checkpoints the mode reads."""
  if mode not in MODES:
    raise errors.ConfigError(f'--mode={mode!r} must be one of {MODES}')
  _check_schema(config, defaults.get_config())
  for field, bounds in RANGES.items():
    _check_range(field, _get(config, field), *bounds)
  for field, choices in CHOICES.items():
    if _get(config, field) not in choices:
      raise errors.ConfigError(f'{field}={_get(config, field)!r} must be one of {tuple(choices)}')
  _check_combinations(config)
  check_groups(members.plan(members.members_of(config, pathlib.Path(workdir or '.')),
                            config.train.stacked, say=None))
  if workdir is not None:
    _check_checkpoints(config, mode, pathlib.Path(workdir))
    if mode in ('train', 'train_and_eval'):
      check_resume(config, pathlib.Path(workdir))


def _get(config, field: str):
  for part in field.split('.'):
    config = config[part]
  return config


def _check_schema(config, schema, prefix: str = '') -> None:
  """Every field exists in defaults.py (a typo is not silently ignored) with its default's type."""
  for key, value in config.items():
    field = prefix + key
    if key not in schema:
      raise errors.ConfigError(f'unknown config field {field} (every field is declared in '
                               'adtr_jax/defaults.py)')
    default = schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise errors.ConfigError(f'{field} must be a section of fields, got {value!r}')
      _check_schema(value, default, field + '.')
    elif not _same_type(value, default):
      raise errors.ConfigError(f'{field}={value!r} must be of type {type(default).__name__}')


def _same_type(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _check_range(field: str, value, low, high, low_in: bool, high_in: bool) -> None:
  ok = ((value >= low if low_in else value > low) and (value <= high if high_in else value < high))
  if not ok or (isinstance(value, float) and math.isnan(value)):
    lo, hi = ('[' if low_in else '(') + f'{low}', f'{high}' + (']' if high_in else ')')
    raise errors.ConfigError(f'{field}={value!r} must be in {lo}, {hi}')


def check_groups(groups: list[list[members.Member]]) -> None:
  """Each group of members that will step together (members.plan), on the mesh the driver will give it
  (sharding.group_mesh): its batches must split over that mesh's devices and processes (training, and
  the calibration that scores on the same mesh)."""
  for group in groups:
    config = group[0].config
    mesh, _ = sharding.group_mesh(config.train.model_axis, len(group))
    sharding.check_batch_size(config.train.batch_size, mesh, 'train.batch_size')
    sharding.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')


def _check_combinations(config) -> None:
  """Fields that must agree with each other or with the devices; each check is the one its module
  makes when it uses the field, called here first."""
  names = datasets.categories(config)
  m, t = config.model, config.train
  reconstructor.check_heads(m.hidden_dim, m.num_heads)
  backbone.check_layers(config.backbone.layers, config.backbone.out_stride)
  adtr.feature_grid(config)
  if m.target == 'features':
    weights.family(config.backbone.arch)
    if config.backbone.weights and not pathlib.Path(config.backbone.weights).expanduser().is_file():
      raise errors.MissingFileError(f'backbone.weights={config.backbone.weights!r}: no such file')
  for name in names:
    datasets.check_source(config, name)
  mixing.check(config, has_masks=True)   # whether a category has masks is known once it is read
  if t.num_epochs == 0 and t.min_steps == 0:
    raise errors.ConfigError('train.num_epochs=0 and train.min_steps=0 leave nothing to train')
  sharding.make_mesh(model_axis=t.model_axis)   # train.model_axis must divide the devices
  # Evaluation, prediction and the feature cache score on one row of every device.
  sharding.check_batch_size(config.eval.batch_size, sharding.make_mesh(), 'eval.batch_size')
  if config.dataset.unified:
    datasets.check_unified(config)


def _check_checkpoints(config, mode: str, workdir: pathlib.Path) -> None:
  """eval / predict / export read each category's checkpoint, and init_from its own: say which is
  missing before any data is prepared."""
  names = paths.model_names(config, datasets.categories(config))
  if mode in ('eval', 'predict', 'export'):
    for name in names:
      checkpoint.require(paths.checkpoints(workdir / name), f'--mode={mode}')
  if config.init_from and mode in ('train', 'train_and_eval'):
    for name in names:
      checkpoint.require(paths.checkpoints(pathlib.Path(config.init_from).expanduser() / name),
                         f'init_from={config.init_from!r}')


def _flat(d: dict, prefix: str = '') -> dict:
  """A config as JSON ({section: {field: value}}) -> {'section.field': value}."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def changed_on_resume(saved: dict, config) -> list[str]:
  """'field old -> new' for every field that `config` changes from the config a checkpoint saved
  (`saved`, meta['config']) and that may not change when a run resumes (defaults.RESUMABLE may). A
  field the saved config lacks (added to adtr_jax since) counts at its default."""
  old = {**_flat(json.loads(defaults.get_config().to_json_best_effort())), **_flat(saved)}
  new = _flat(json.loads(config.to_json_best_effort()))
  return [f'{field} {old.get(field)!r} -> {value!r}' for field, value in sorted(new.items())
          if field not in defaults.RESUMABLE and old.get(field) != value]


def check_resume(config, workdir: pathlib.Path) -> None:
  """A run resumed in `workdir` trains what its checkpoints trained: one ConfigError names every field
  of every model folder that changed but may not change on resume (before any data is prepared)."""
  problems = []
  for member in members.members_of(config, workdir):
    steps = checkpoint.saved_steps(paths.checkpoints(member.workdir))
    if not steps:
      continue
    mgr = checkpoint.manager(paths.checkpoints(member.workdir))
    saved = checkpoint.read_meta(mgr, steps[-1]).get('config', {})
    mgr.close()
    changed = changed_on_resume(saved, member.config)
    if changed:
      problems.append(f'{member.workdir} (step {steps[-1]}): {", ".join(changed)}')
  if problems:
    raise errors.ConfigError(
        'the checkpoints were trained with another config, and these fields may not change when a run '
        f'resumes: {"; ".join(problems)}. Use the original values, or train longer or differently in a '
        f'new --workdir with --config.init_from={workdir} (README, "Resume")')
