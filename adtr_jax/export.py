"""--mode=export: the trained scorer as one ONNX graph and one jax.export artifact, beside model.json.

<workdir>/<category>/export/ (or unified/export/) gets:
  model.onnx        images uint8 [N, S, S, 3] (RGB, N dynamic) -> score float32 [N], anomaly_map float32
                    [N, S, S]: normalisation, frozen backbone, feature standardisation, reconstructor,
                    score map, upsampling and blur, image score, all in one graph (jax2onnx).
  model.jax_export  the same function serialised by jax.export (StableHLO, N symbolic, lowered for CPU,
                    CUDA and TPU): jax.export.deserialize(bytearray(data)).call(images), no adtr_jax code.
  model.json        the input size and resize, the calibrated threshold and target FPR, the overlays'
                    colour scale (map_scale), test metrics (when
                    <workdir>/metrics.json has them), the backbone (arch, weights sha256), the config, the
                    adtr_jax version, the export time and the format version (adtr_jax.deploy reads it).
The threshold is only in model.json, so it changes without exporting again.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import io
import json
import logging as py_logging
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from adtr_jax import deploy, errors, inference, metrics, paths, sharding, trained
from adtr_jax.models import efficientnet
from adtr_jax.models.adtr import TRAINABLE, SplitModel

# Lowered for all three so one artifact serves a CPU, a GPU or a TPU host.
PLATFORMS = ('cpu', 'cuda', 'tpu')
METRICS_KEPT = (*metrics.METRIC_KEYS, 'num_test_images', 'num_anomalous', 'checkpoint_step')


class _Identity(nnx.Module):
  def __call__(self, x, **unused):
    return x


def without_dropout(model: nnx.Module) -> nnx.Module:
  """`model` with every nnx.Dropout replaced by the identity, in place. Scoring runs deterministically,
  where dropout is the identity anyway; jax2onnx replaces nnx.Dropout.__call__ by one that does not
  take the `rngs` keyword our layers pass, so the modules go before conversion."""
  for _, node in list(nnx.iter_graph(model)):
    if isinstance(node, nnx.Module):
      for name, child in list(vars(node).items()):
        if isinstance(child, nnx.Dropout):
          setattr(node, name, _Identity())
  return model


def grouped_depthwise(model: nnx.Module) -> nnx.Module:
  """`model` with every EfficientNet depthwise conv computed as one grouped convolution (in place):
  onnxruntime's depthwise kernel runs it, where the k*k shifted slices XLA:CPU prefers took half of
  onnxruntime's forward pass. Same numbers up to float32 rounding."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, efficientnet.DepthwiseConv):
      node.grouped = True
  return model


def scorer(config, split: SplitModel, for_onnx: bool = False):
  """The exported function: images uint8 [N, S, S, 3] -> (score float32 [N], anomaly_map [N, S, S]),
  inference.score_fn with the weights as constants (on the host: the export must not depend on the
  training mesh). for_onnx: dropout modules removed and depthwise convs grouped (see those helpers)."""
  model = nnx.merge(split.graphdef, *jax.device_get((split.params, split.frozen)))
  if for_onnx:
    model = grouped_depthwise(without_dropout(model))
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)

  def fn(images):
    maps, scores = inference.score_fn(params, frozen, images, graphdef=graphdef, scoring_cfg=config.scoring,
                                      image_size=config.dataset.image_size)
    return scores, maps

  return fn


def input_spec(image_size: int, batch) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)


def to_jax_export(fn, image_size: int, path: pathlib.Path) -> None:
  """fn lowered by jax.export with a symbolic batch N, serialised to `path`."""
  (batch,) = jax.export.symbolic_shape('N')
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(input_spec(image_size, batch))
  path.write_bytes(exported.serialize())


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx logs a traceback for each optional plugin whose library is absent, onnx_ir a warning for
  each intermediate value of unknown type it leaves out, and jax2onnx 0.12.5 prints a debug line per
  convolution: errors only from those loggers, and the converter's prints go to the log."""
  loggers = [py_logging.getLogger(name) for name in ('jax2onnx', 'onnx_ir')]
  levels = [logger.level for logger in loggers]
  printed = io.StringIO()
  for logger in loggers:
    logger.setLevel(py_logging.ERROR)
  try:
    with contextlib.redirect_stdout(printed):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)
    if printed.getvalue().strip():
      logging.info('jax2onnx printed: %s', printed.getvalue().strip())


def to_onnx(fn, image_size: int, path: pathlib.Path, what: str) -> None:
  """fn converted by jax2onnx into one self-contained ONNX file (dynamic batch N). `what` names the
  model in the error raised when an op cannot be converted."""
  try:
    import jax2onnx
    import onnx
  except ImportError as e:
    raise errors.ConfigError(f'--mode=export needs the export extra ({e.name} is missing): '
                             'pip install -r requirements-export.txt (see docs/deploy.md)') from e
  try:
    with _quiet_converter():
      proto = jax2onnx.to_onnx(fn, [input_spec(image_size, 'N')], model_name='adtr',
                               input_names=[deploy.INPUT_NAME], output_names=list(deploy.OUTPUT_NAMES))
  except Exception as e:  # noqa: BLE001 - jax2onnx raises many types; the user needs the op and the model
    message = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise errors.ConfigError(f'{what} cannot be exported to ONNX: jax2onnx: {type(e).__name__}: '
                             f'{message}') from e
  # jax2onnx annotates some intermediate shapes wrongly (NCHW vs NHWC around its Conv rewrites), which
  # onnxruntime warns about at every load; the annotations are optional, so they go.
  del proto.graph.value_info[:]
  onnx.save_model(proto, str(path))


def version() -> str:
  """adtr_jax's version: the installed distribution's, else the checkout's pyproject.toml."""
  try:
    return importlib.metadata.version('adtr_jax')
  except importlib.metadata.PackageNotFoundError:
    import tomllib
    pyproject = pathlib.Path(__file__).resolve().parents[1] / 'pyproject.toml'
    return tomllib.loads(pyproject.read_text())['project']['version'] if pyproject.is_file() else 'unknown'


def metrics_at_export(workdir: pathlib.Path, category: str, unified: bool, step: int) -> dict | None:
  """The test metrics of <workdir>/metrics.json (written by --mode=eval / train_and_eval) when they
  describe checkpoint `step` (the exported one), else None."""
  path = workdir / 'metrics.json'
  if not path.is_file():
    return None
  report = json.loads(path.read_text())
  categories = report.get('categories', {})
  if not categories or any(v.get('checkpoint_step') != step for v in categories.values()):
    return None   # evaluated at another step (or not every category): they would not be this model's
  if unified:
    return {'mean': report.get('mean'), 'source': str(path)}
  if category not in categories:
    return None
  return {**{k: v for k, v in categories[category].items() if k in METRICS_KEPT}, 'source': str(path)}


def model_json(config, category: str, meta: dict, metrics: dict | None, seconds: dict) -> dict:
  """model.json's content (see the module docstring and docs/deploy.md)."""
  size = config.dataset.image_size
  return {
      'format': deploy.FORMAT, 'format_version': deploy.FORMAT_VERSION,
      'files': {'onnx': deploy.ONNX_FILE, 'jax_export': deploy.JAX_EXPORT_FILE},
      'category': category,
      'input': {'name': deploy.INPUT_NAME, 'dtype': 'uint8', 'shape': ['N', size, size, 3], 'layout': 'NHWC',
                'channels': 'RGB', 'size': size, 'resize': deploy.RESIZE},
      'outputs': {'score': {'dtype': 'float32', 'shape': ['N']},
                  'anomaly_map': {'dtype': 'float32', 'shape': ['N', size, size]}},
      'decision': 'anomalous if score > threshold; normalised score = score / threshold',
      'threshold': float(meta['calibration']['threshold']),
      'target_fpr': float(meta['calibration']['target_fpr']),
      'map_scale': [float(v) for v in meta['calibration']['map_scale']],
      'calibration': meta['calibration'],
      'test_metrics': metrics,
      'backbone': meta['backbone'],
      'checkpoint_step': int(meta['step']),
      'adtr_jax_version': version(), 'jax_version': jax.__version__,
      'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'export_seconds': seconds,
      'config': json.loads(config.to_json_best_effort()),
  }


def export(config, workdir: pathlib.Path) -> pathlib.Path:
  """Writes <model folder>/export/{model.onnx, model.jax_export, model.json}; returns the folder."""
  workdir = pathlib.Path(workdir)
  restored = trained.for_scoring(config, workdir, sharding.make_mesh(), 'export')
  name, meta = restored.category, restored.meta
  out = paths.export_dir(restored.directory)
  out.mkdir(parents=True, exist_ok=True)
  # model.json is written last: until then the folder is no export (a scorer refuses it), so a failed
  # re-export cannot leave an old model.json beside a new graph.
  (out / deploy.META_FILE).unlink(missing_ok=True)
  fn, onnx_fn = (scorer(config, restored.model, for_onnx) for for_onnx in (False, True))
  size = config.dataset.image_size
  what = (f'the model (backbone.arch={meta["backbone"].get("arch")!r}, '
          f'model.type={config.model.get("type", "transformer")!r})')
  seconds = {}
  for key, write, path in (('jax_export', lambda p: to_jax_export(fn, size, p), out / deploy.JAX_EXPORT_FILE),
                           ('onnx', lambda p: to_onnx(onnx_fn, size, p, what), out / deploy.ONNX_FILE)):
    start = time.perf_counter()
    if jax.process_index() == 0:
      write(path)
    seconds[key] = round(time.perf_counter() - start, 2)
  metrics = metrics_at_export(workdir, name, config.dataset.unified, int(meta['step']))
  if jax.process_index() == 0:
    (out / deploy.META_FILE).write_text(json.dumps(model_json(config, name, meta, metrics, seconds),
                                                   indent=2) + '\n')
  mb = (out / deploy.ONNX_FILE).stat().st_size / 2**20 if (out / deploy.ONNX_FILE).exists() else 0.0
  print(f'exported {name} to {out}: {deploy.ONNX_FILE} ({mb:.1f} MiB, {seconds["onnx"]:.1f} s), '
        f'{deploy.JAX_EXPORT_FILE} ({seconds["jax_export"]:.1f} s), {deploy.META_FILE} (threshold '
        f'{meta["calibration"]["threshold"]:.4g})')
  return out
