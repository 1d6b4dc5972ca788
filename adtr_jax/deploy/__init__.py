"""Scoring with an exported model (--mode=export) on a PC without JAX: numpy, pillow and onnxruntime.

  pip install -r requirements-deploy.txt
  python -m adtr_jax.deploy --export=workdirs/mt/magnetic_tile/export --images=/path/to/parts

An export folder holds model.onnx (uint8 images [N, S, S, 3] -> score [N], anomaly_map [N, S, S]) and
model.json (input size and resize, the calibrated threshold, the backbone, the config...). The
threshold is applied here, never inside the graph, so a line changes it without exporting again.

Images are decoded and resized by the same code as the training pipeline (adtr_jax.data.mvtec and
pipeline, which need only numpy and pillow): a model sees the same pixels here as in training.
Nothing in this package imports JAX (tests/test_export.py checks that).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from adtr_jax import errors, predictions
from adtr_jax.data import mvtec, pipeline

# model.json's 'format' and 'format_version': a scorer refuses a folder written for another format.
FORMAT = 'adtr_jax.export'
FORMAT_VERSION = 2   # 2: map_scale, the overlays' fixed colour scale
ONNX_FILE, JAX_EXPORT_FILE, META_FILE = 'model.onnx', 'model.jax_export', 'model.json'
INPUT_NAME, OUTPUT_NAMES = 'images', ('score', 'anomaly_map')
# How images reach the graph's size; model.json records it and the scorer checks it is this one.
RESIZE = {'library': 'PIL', 'method': 'bilinear',
          'colour': 'RGB: greyscale repeated, alpha dropped, palette expanded, 16-bit grey divided by 257',
          'when': 'only images not already S x S'}


class DeployError(errors.UserError):
  """A missing or unusable export folder or input; printed as one line naming the file or field."""


def read_meta(export_dir) -> dict:
  """model.json of an export folder, checked: the format this scorer reads and a usable threshold."""
  folder = pathlib.Path(export_dir).expanduser()
  path = folder / META_FILE
  if not folder.is_dir():
    raise DeployError(f'export folder {folder} does not exist (make one with --mode=export)')
  if not path.is_file():
    raise DeployError(f'{path} is missing: {folder} is not an export folder (make one with --mode=export)')
  try:
    meta = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DeployError(f'cannot read {path}: {e}') from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise DeployError(f'{path}: field "format" is {meta.get("format") if isinstance(meta, dict) else None!r}, '
                      f'not {FORMAT!r}')
  if meta.get('format_version') != FORMAT_VERSION:
    raise DeployError(f'{path}: field "format_version" is {meta.get("format_version")!r}, this scorer reads '
                      f'{FORMAT_VERSION}: export the model again with this adtr_jax version')
  if meta.get('input', {}).get('resize') != RESIZE:
    raise DeployError(f'{path}: field "input.resize" is {meta.get("input", {}).get("resize")!r}, not {RESIZE!r}')
  threshold = meta.get('threshold')
  if not isinstance(threshold, (int, float)) or not threshold > 0:
    raise DeployError(f'{path}: field "threshold" must be a positive number, not {threshold!r}')
  scale = meta.get('map_scale')
  if (not isinstance(scale, list) or len(scale) != 2 or not all(isinstance(v, (int, float)) for v in scale)
      or not np.isfinite(scale).all() or scale[0] > scale[1]):
    raise DeployError(f'{path}: field "map_scale" must be [vmin, vmax], two finite numbers with vmin <= '
                      f'vmax, not {scale!r}')
  return meta


def read_image(path, size: int) -> np.ndarray:
  """An image file -> uint8 [size, size, 3], exactly as training prepared it (mvtec.load_image's RGB
  conversion, then pipeline.resize_image's PIL bilinear resize). DeployError naming the file."""
  try:
    return pipeline.resize_image(mvtec.load_image(path), size)
  except errors.DataError as e:
    raise DeployError(str(e)) from e
  except Exception as e:  # noqa: BLE001 - any decoder failure is this file's fault; name it
    raise DeployError(f'cannot prepare {path}: {type(e).__name__}: {e}') from e


class Scorer:
  """An export folder loaded into onnxruntime: images uint8 [N, S, S, 3] -> (scores [N], maps [N, S, S]).

  `threshold` is model.json's calibrated one unless given; `normalised(scores)` is scores / threshold,
  so 1.0 is the decision boundary and a score reads as "times the threshold". `map_scale`: model.json's
  (vmin, vmax), the overlays' colour scale.
  """

  def __init__(self, export_dir, threshold: float | None = None, threads: int = 0):
    import onnxruntime as ort  # imported here so that --help and read_meta work without it

    self.dir = pathlib.Path(export_dir).expanduser()
    self.meta = read_meta(self.dir)
    self.image_size = int(self.meta['input']['size'])
    if threshold is not None and not threshold > 0:
      raise DeployError(f'--threshold={threshold} must be positive (image scores are distances >= 0)')
    self.threshold = float(self.meta['threshold'] if threshold is None else threshold)
    self.map_scale = tuple(float(v) for v in self.meta['map_scale'])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's shape-merge notes are not the user's concern
    options.intra_op_num_threads = threads
    try:
      self.session = ort.InferenceSession(str(self.dir / ONNX_FILE), options,
                                          providers=['CPUExecutionProvider'])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
      raise DeployError(f'cannot load {self.dir / ONNX_FILE}: {str(e).splitlines()[0]}') from e

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, S, S, 3] -> (scores float32 [N], anomaly maps float32 [N, S, S])."""
    scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.asarray(images, np.uint8)})
    return scores, maps

  def normalised(self, scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, np.float64) / self.threshold

  def decisions(self, scores: np.ndarray) -> list[str]:
    """'anomalous' where score > threshold (as --mode=predict decides), else 'normal'."""
    return [predictions.decide(s, self.threshold) for s in scores]
