"""A trained model as evaluation, prediction and export use it: restored from its model folder, and
the decision threshold calibrated for it on held-out normal training images."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import numpy as np
from absl import logging

from adtr_jax import checkpoint, errors, inference, multihost, paths, reducers, sharding, train_state
from adtr_jax.data import datasets
from adtr_jax.models.adtr import SplitModel, build_model


@dataclasses.dataclass(frozen=True)
class Restored:
  """A model restored from `directory` (a model folder): the split model and its checkpoint's
  metadata (backbone, config, calibration, ...; meta['step'] is the restored step)."""
  model: SplitModel
  meta: dict
  directory: pathlib.Path
  category: str


def restore(config, model_dir: pathlib.Path, mesh, category: str = '') -> Restored:
  """The model trained in `model_dir`, at the checkpoint eval.checkpoint picks, replicated on mesh.
  meta['calibration']: the threshold calibrated for that step (when there is one)."""
  model, info = build_model(config)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  mgr = checkpoint.manager(paths.checkpoints(model_dir))
  state, meta = checkpoint.load(mgr, config.eval.checkpoint, state, info, mesh)
  mgr.close()
  if 'calibration' not in meta and calibration(model_dir, meta['step']):
    meta['calibration'] = calibration(model_dir, meta['step'])
  logging.info('restored %s step %d', model_dir, meta['step'])
  return Restored(SplitModel(graphdef, state.params, sharding.put_replicated(frozen, mesh)), meta,
                  pathlib.Path(model_dir), category)


def for_scoring(config, workdir: pathlib.Path, mesh, mode: str) -> Restored:
  """The one trained model that --mode=predict / export use; its checkpoint must hold a calibrated
  threshold (meta['calibration']). A calibration without 'map_scale' (made before overlays had a fixed
  colour scale) gets it from the held-out images now."""
  names = datasets.categories(config)
  if len(names) != 1 and not config.dataset.unified:
    raise errors.ConfigError(f'--mode={mode} needs one --config.dataset.category, got {names}')
  model_dir = paths.model_dir(config, pathlib.Path(workdir), names[0])
  restored = restore(config, model_dir, mesh, names[0])
  if 'calibration' not in restored.meta:
    raise errors.ConfigError(
        f'step {restored.meta["step"]} of {paths.checkpoints(model_dir)} (eval.checkpoint='
        f'{config.eval.checkpoint!r}) has no calibrated threshold: the model was trained with '
        'calibration.holdout_fraction=0, or its training did not finish (run --mode=train again)')
  calibration = restored.meta['calibration']
  if 'map_scale' not in calibration:
    # Calibrated by an adtr_jax from before the overlays' fixed colour scale: the same held-out images
    # give it now (the threshold stays the saved one).
    data = (datasets.load_unified(config) if config.dataset.unified else
            datasets.load_category(config, names[0]))
    if data.calib is None:
      raise errors.ConfigError(f'{model_dir} was calibrated without an overlay colour scale and the '
                               'config holds out no images to compute it (calibration.holdout_fraction=0)')
    logging.info('%s: no map_scale in its calibration; computing it on the held-out images', model_dir)
    calibration['map_scale'] = calibrate(config, data.calib, restored.model, mesh)['map_scale']
  return restored


def calibrate(config, calib, model: SplitModel, mesh) -> dict:
  """The decision threshold: the (1 - calibration.target_fpr) quantile of the scores of normal
  training images held out from training (`calib`), and 'map_scale': [vmin, vmax], the 1st and
  99.9th percentile of their score maps, the fixed colour scale of predict's overlays (and of the
  exported model's). Every process gets the same values (all of them save them in the checkpoint)."""
  with multihost.scratch(datasets.cache_dir(config) / 'scratch', 'calibrate') as folder:
    results = inference.reduce_split(config, calib, model, mesh, 'calibrate', [
        reducers.Scores(folder, len(calib), 'calibrate'),
        reducers.Pixels(folder / 'pixels', with_metrics=False)])
    values = None
    if results is not None:   # process 0
      scores, pixels = results[0]['scores'], results[1]
      target = config.calibration.target_fpr
      threshold = float(np.quantile(scores, 1.0 - target, method='higher'))
      values = {'threshold': threshold, 'target_fpr': target, 'num_images': int(len(scores)),
                'heldout_fpr': float(np.mean(scores > threshold)),
                'map_scale': [float(v) for v in pixels['percentiles']]}
  return multihost.share_json(values, 'calibration')


def calibration(model_dir: pathlib.Path, step: int) -> dict | None:
  """The threshold calibrated for `step` after it was saved (the best checkpoint), or None."""
  path = paths.calibrations(model_dir)
  return json.loads(path.read_text()).get(str(step)) if path.is_file() else None


def write_calibration(model_dir: pathlib.Path, step: int, values: dict) -> None:
  """Adds step's threshold to <model_dir>/calibration.json (process 0; replaced whole, never half
  written)."""
  if jax.process_index() != 0:
    return
  path = paths.calibrations(model_dir)
  table = json.loads(path.read_text()) if path.is_file() else {}
  table[str(step)] = values
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(table, indent=2) + '\n')
  os.replace(tmp, path)
