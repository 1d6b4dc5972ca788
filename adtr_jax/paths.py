"""The workdir's layout: where each model, its checkpoints, its export and its predictions live.

  <workdir>/config.json                    the training config (main.py)
  <workdir>/metrics.json, metrics.md       every category's metrics and their mean (evaluate.py)
  <workdir>/<category>/                    a model (or workdir/unified/: dataset.unified), or the
                                           evaluation of a category by the unified model
  <model dir>/checkpoints/<step>/          orbax checkpoints (checkpoint.py)
  <model dir>/calibration.json             thresholds of steps calibrated after they were saved
                                           (the best checkpoint; trained.py)
  <model dir>/diverged.json                the step where its training loss stopped being finite
  <model dir>/export/                      --mode=export (export.py)
  <model dir>/predict/                     --mode=predict (evaluate.predict)
  <workdir>/maps/<image path under the benchmark root>.tiff   eval.save_maps: the raw anomaly maps in
                                           the official evaluators' layout (protocol_reducers.MapWriter)
  <workdir>/ad2_submission/                MVTec AD 2's submission tree (protocol_reducers.Ad2Submission)
"""
from __future__ import annotations

import pathlib

UNIFIED = 'unified'   # the model folder of the unified setting (dataset.unified)


def model_dir(config, workdir: pathlib.Path, category: str) -> pathlib.Path:
  """Where `category`'s model lives: workdir/<category>, or workdir/unified in the unified setting."""
  return pathlib.Path(workdir) / (UNIFIED if config.dataset.unified else category)


def model_names(config, categories: list[str]) -> list[str]:
  """The model folders a config trains: one per category, or 'unified'."""
  return [UNIFIED] if config.dataset.unified else list(categories)


def checkpoints(model: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(model) / 'checkpoints'


def export_dir(model: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(model) / 'export'


def predict_dir(model: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(model) / 'predict'


def calibrations(model: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(model) / 'calibration.json'


def diverged(model: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(model) / 'diverged.json'


def maps_dir(workdir: pathlib.Path) -> pathlib.Path:
  """eval.save_maps' folder: one tree for every category of the run (their paths under the benchmark
  root start with the category), the folder an official evaluator's --anomaly_maps_dir takes."""
  return pathlib.Path(workdir) / 'maps'


def ad2_submission_dir(workdir: pathlib.Path) -> pathlib.Path:
  """MVTec AD 2's submission tree (anomaly_images/, anomaly_images_thresholded/): every object of the
  run in one tree, the folder MVTec's check_and_prepare_data_for_upload.py checks."""
  return pathlib.Path(workdir) / 'ad2_submission'
