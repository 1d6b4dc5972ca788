"""--mode=export and the JAX-free scorer (adtr_jax.deploy) on real Magnetic Tile images: parity of the
ONNX graph and of the jax.export artifact with --mode=predict, a run without JAX, and bad input."""
import csv
import functools
import json
import pathlib
import shutil
import subprocess
import sys
import tomllib

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from adtr_jax import deploy, errors, evaluate, export, inference, sharding, train, trained
from adtr_jax.data import datasets, image_cache, pipeline
from adtr_jax.deploy import __main__ as deploy_cli
from tests.conftest import REPO, shared_data_dir, tiny_config

# The export extra (requirements-export*.txt; CI installs it and fails on any skip).
pytest.importorskip('jax2onnx', reason='pip install -r requirements-export.txt')
pytest.importorskip('onnxruntime', reason='pip install -r requirements-export.txt')

CATEGORY = 'magnetic_tile'
# The test images scored: the first of each sorted folder, about half normal and half defective.
PER_FOLDER = {'good': 20, 'blowhole': 4, 'break': 4, 'crack': 4, 'fray': 4, 'uneven': 4}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A tiny ADTR (64 px, tests/tiny_config.py, plus layer4) trained one epoch on Magnetic Tile, exported; and a folder
  of 40 of its test images (sizes vary; greyscale JPEGs) with their labels."""
  shared_data = shared_data_dir()
  if not (shared_data / CATEGORY).is_dir():
    pytest.skip(f'{shared_data / CATEGORY} is missing')
  work = tmp_path_factory.mktemp('mt')
  config = tiny_config(shared_data, work / 'cache', num_epochs=1)
  config.dataset.category = CATEGORY
  # layer4 (stride 16) is upsampled to the stride-8 grid: the export must convert that resize too.
  config.backbone.layers = ('layer1', 'layer2', 'layer3', 'layer4')
  train.train_and_evaluate(config, work, evaluate_after=False)
  out = export.export(config, work)
  folder, labels = work / 'parts', {}
  folder.mkdir()
  for kind, n in PER_FOLDER.items():
    for path in sorted((shared_data / CATEGORY / 'test' / kind).iterdir())[:n]:
      shutil.copy(path, folder / f'{kind}_{path.name}')
      labels[f'{kind}_{path.name}'] = int(kind != 'good')
  return config, work, out, folder, labels


def _csv(path: pathlib.Path) -> list[dict]:
  with path.open(newline='') as f:
    return list(csv.DictReader(f))


def parity(reference: tuple, candidate: tuple, threshold: float, labels: np.ndarray) -> dict:
  """Largest relative image-score and absolute map differences of (scores [N], maps [N, S, S]) pairs,
  asserted within 1e-4 and 1e-3, with the same decisions (at the calibrated threshold, and at the
  median score, which splits the images) and the same image AUROC."""
  (s_ref, m_ref), (s, m) = reference, candidate
  rel = float(np.max(np.abs(s - s_ref) / np.abs(s_ref)))
  abs_map = float(np.max(np.abs(m - m_ref)))
  assert rel <= 1e-4 and abs_map <= 1e-3, (rel, abs_map)
  for t in (threshold, np.median(s_ref)):
    np.testing.assert_array_equal(s > t, s_ref > t)
  assert skm.roc_auc_score(labels, s) == skm.roc_auc_score(labels, s_ref)
  return {'score_rel': rel, 'map_abs': abs_map}


@pytest.mark.slow
@pytest.mark.realdata
def test_onnx_and_jax_export_match_predict_on_real_images(exported):
  """--mode=predict's CSV, the ONNX graph and the jax.export artifact against the trained model applied
  directly (inference.score_fn, one jitted call on one device: no batching, padding, sharding, feature
  memo or reordering by index) to the images as the JAX-free deploy scorer decodes them."""
  config, work, out, folder, labels = exported
  meta = json.loads((out / 'model.json').read_text())
  threshold = meta['threshold']
  predicted = _csv(evaluate.predict(config, work, folder))
  paths = sorted(folder.iterdir())
  y = np.array([labels[p.name] for p in paths])
  assert 0 < y.sum() < len(y) == 40
  images = np.stack([deploy.read_image(p, config.dataset.image_size) for p in paths])
  assert len({Image.open(p).size for p in paths}) > 1 and Image.open(paths[0]).mode == 'L'
  model = trained.restore(config, work / CATEGORY, sharding.make_mesh(jax.devices()[:1])).model
  graphdef, params, frozen = model.graphdef, model.params, model.frozen
  direct = jax.jit(functools.partial(inference.score_fn, graphdef=graphdef, scoring_cfg=config.scoring,
                                     image_size=config.dataset.image_size))
  ref = tuple(map(np.asarray, direct(params, frozen, images)))[::-1]      # (scores [N], maps [N, S, S])
  # predict: each file's own score (8 devices and batches of 8 against one call: float32 rounding),
  # and its decision at the calibrated threshold.
  assert [r['path'] for r in predicted] == [str(p) for p in paths]
  np.testing.assert_allclose([float(r['image_score']) for r in predicted], ref[0], rtol=1e-5)
  assert [r['decision'] for r in predicted] == ['anomalous' if s > threshold else 'normal' for s in ref[0]]

  scorer = deploy.Scorer(out)
  onnx_err = parity(ref, scorer(images), threshold, y)
  restored = jax.export.deserialize(bytearray((out / 'model.jax_export').read_bytes()))
  assert set(restored.platforms) == {'cpu', 'cuda', 'tpu'}
  jax_err = parity(ref, tuple(map(np.asarray, restored.call(images))), threshold, y)
  print(f'parity vs the model: onnx {onnx_err}, jax.export {jax_err}')

  # The deploy CLI writes predict's CSV: same paths and decisions, scores within the parity bound.
  deployed = _csv(deploy_cli.score_folder(scorer, folder, work / 'deployed'))
  assert [r['path'] for r in deployed] == [r['path'] for r in predicted]
  assert [r['decision'] for r in deployed] == [r['decision'] for r in predicted]
  assert sorted(q.name for q in (work / 'deployed' / 'heatmaps').iterdir()) == sorted(
      q.name for q in (work / CATEGORY / 'predict' / 'heatmaps').iterdir())
  # ... and the same overlays: both colour the maps on the calibrated map_scale (model.json's), so
  # they differ only by the maps' parity error (within 2 of 255 per pixel).
  for q in (work / CATEGORY / 'predict' / 'heatmaps').iterdir():
    got = np.asarray(Image.open(work / 'deployed' / 'heatmaps' / q.name)).astype(int)
    assert np.abs(got - np.asarray(Image.open(q)).astype(int)).max() <= 2, q.name


@pytest.mark.slow
@pytest.mark.realdata
def test_deploy_reads_the_pixels_training_and_evaluation_read(exported):
  """The deploy scorer's decoding of the original files equals the rows of the prepared dataset (tfds
  array_record, then the resized-image cache) that training and evaluation read: the 40 test images
  (greyscale JPEGs of several sizes) and the first training rows."""
  config, _, _, folder, _ = exported
  size = config.dataset.image_size
  data = datasets.load_category(config, CATEGORY)          # prepared by the fixture's training run
  assert isinstance(data.test, image_cache.ArraySource)
  rows = {pathlib.Path(path).relative_to((shared_data_dir() / CATEGORY / 'test').resolve()): i
          for i, path in enumerate(data.test.paths)}
  for copy in sorted(folder.iterdir()):
    kind, name = copy.name.split('_', 1)
    row = data.test[rows[pathlib.Path(kind) / name]]
    np.testing.assert_array_equal(deploy.read_image(copy, size), row['image'], err_msg=copy.name)
  for i in range(6):
    row = data.train[i]
    np.testing.assert_array_equal(deploy.read_image(row['path'], size), row['image'], err_msg=row['path'])


@pytest.mark.slow
@pytest.mark.realdata
def test_model_json_holds_what_a_line_needs(exported):
  config, work, out, _, _ = exported
  meta = json.loads((out / 'model.json').read_text())
  assert meta['format'] == deploy.FORMAT and meta['format_version'] == deploy.FORMAT_VERSION
  assert meta['input']['size'] == config.dataset.image_size == meta['input']['shape'][1]
  assert meta['input']['resize'] == deploy.RESIZE
  assert meta['target_fpr'] == config.calibration.target_fpr and meta['threshold'] > 0
  vmin, vmax = meta['map_scale']
  assert meta['map_scale'] == meta['calibration']['map_scale'] and vmin < vmax
  assert meta['backbone']['arch'] == config.backbone.arch and len(meta['backbone']['weights_sha256']) == 64
  assert meta['config']['dataset']['category'] == CATEGORY and meta['adtr_jax_version'] == export.version()
  assert meta['test_metrics'] is None            # trained without evaluation: no metrics.json
  assert meta['export_seconds']['onnx'] > 0 and meta['exported_at']
  # The threshold is not in the graph: no initializer of the ONNX file holds its value.
  import onnx
  graph = onnx.load(str(out / 'model.onnx')).graph
  assert [i.name for i in graph.input] == ['images'] and [o.name for o in graph.output] == ['score', 'anomaly_map']
  assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'N'
  values = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
  assert not any(v.size == 1 and np.isclose(float(v.ravel()[0]), meta['threshold'], rtol=1e-6) for v in values)


def test_version_is_the_projects():
  """model.json's adtr_jax_version: the version pyproject.toml declares (this checkout, or installed)."""
  assert export.version() == tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']


def test_metrics_json_is_copied_into_model_json(tmp_path):
  """Only the metrics of the exported checkpoint step: metrics.json of another step is not copied."""
  metrics = {'image_auroc': 0.75, 'num_test_images': 630, 'checkpoint_step': 40, 'heatmap_dir': '/x'}
  (tmp_path / 'metrics.json').write_text(json.dumps({'categories': {CATEGORY: metrics}, 'mean': {}}))
  kept = export.metrics_at_export(tmp_path, CATEGORY, unified=False, step=40)
  assert kept == {'image_auroc': 0.75, 'num_test_images': 630, 'checkpoint_step': 40,
                  'source': str(tmp_path / 'metrics.json')}
  assert export.metrics_at_export(tmp_path, 'other', unified=False, step=40) is None
  assert export.metrics_at_export(tmp_path, CATEGORY, unified=False, step=30) is None


@pytest.mark.slow
@pytest.mark.realdata
def test_threshold_changes_without_exporting_again(exported, tmp_path, capsys):
  _, _, out, folder, _ = exported
  scores = np.array([float(r['image_score']) for r in _csv(deploy_cli.score_folder(
      deploy.Scorer(out), folder, tmp_path / 'calibrated'))])
  middle = float(np.median(scores))
  assert deploy_cli.main([f'--export={out}', f'--images={folder}', f'--threshold={middle}',
                          f'--out={tmp_path / "given"}', '--normalised']) == 0
  rows = _csv(tmp_path / 'given' / 'predictions.csv')
  assert [r['decision'] == 'anomalous' for r in rows] == list(scores > middle)
  assert deploy.Scorer(out, threshold=middle).decisions(scores) == [r['decision'] for r in rows]
  np.testing.assert_allclose([float(r['normalised_score']) for r in rows], scores / middle, rtol=1e-6)
  assert f'{int(np.sum(scores > middle))} of 40 images anomalous (threshold {middle:.4g}, given)' in (
      capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.realdata
def test_deploy_scores_a_folder_without_jax(exported, tmp_path):
  """The deploy CLI in a fresh interpreter: it scores the folder and never imports JAX or flax."""
  _, _, out, folder, _ = exported
  code = ('import sys; from adtr_jax.deploy.__main__ import main; '
          f'rc = main(["--export={out}", "--images={folder}", "--out={tmp_path}"]); '
          'bad = [m for m in ("jax", "jaxlib", "flax", "orbax", "tensorflow") if m in sys.modules]; '
          'print("imported:", bad); sys.exit(rc or bool(bad))')
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert 'imported: []' in run.stdout and 'images anomalous' in run.stdout
  assert len(_csv(tmp_path / 'predictions.csv')) == 40


@pytest.mark.slow
@pytest.mark.realdata
def test_deploy_converts_resizes_and_skips_unreadable_files(exported, tmp_path, capsys):
  """Greyscale, RGBA and other-size images are prepared as training does; a corrupt file is named on
  stderr and listed as unreadable while the rest are scored."""
  config, _, out, folder, _ = exported
  grey = sorted(folder.iterdir())[0]
  parts = tmp_path / 'parts'
  parts.mkdir()
  image = Image.open(grey)
  image.save(parts / 'a_grey.png')
  image.convert('RGB').save(parts / 'b_rgb.png')
  rgba = image.convert('RGBA')
  rgba.putalpha(7)                                    # alpha is dropped, whatever it holds
  rgba.save(parts / 'c_rgba.png')
  image.resize((image.width * 3, image.height * 2)).save(parts / 'd_larger.png')
  (parts / 'e_broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  assert deploy_cli.main([f'--export={out}', f'--images={parts}', f'--out={tmp_path / "o"}']) == 0
  captured = capsys.readouterr()
  assert ' of 4 images anomalous ' in captured.out and '), 1 unreadable; ' in captured.out
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('adtr_jax.deploy: skipped ') and 'e_broken.png' in err[0]
  assert 'not an image file' in err[0] and 'BytesIO' not in err[0]
  rows = {pathlib.Path(r['path']).name: r for r in _csv(tmp_path / 'o' / 'predictions.csv')}
  assert rows['e_broken.png']['decision'] == 'unreadable' and rows['e_broken.png']['image_score'] == ''
  assert rows['a_grey.png']['image_score'] == rows['b_rgb.png']['image_score'] == rows['c_rgba.png']['image_score']
  assert float(rows['d_larger.png']['image_score']) > 0
  size = config.dataset.image_size
  np.testing.assert_array_equal(deploy.read_image(parts / 'd_larger.png', size),
                                pipeline.resize_image(np.asarray(Image.open(parts / 'd_larger.png').convert('RGB')), size))


def _one_error_line(capsys, argv) -> str:
  assert deploy_cli.main(argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('adtr_jax.deploy: error: ') and not captured.out
  return lines[0]


@pytest.mark.slow
@pytest.mark.realdata
def test_deploy_names_a_missing_or_foreign_export_folder(exported, tmp_path, capsys):
  _, _, out, folder, _ = exported
  missing = tmp_path / 'nowhere'
  assert str(missing) in _one_error_line(capsys, [f'--export={missing}', f'--images={folder}'])
  other = tmp_path / 'other'
  other.mkdir()
  meta = json.loads((out / 'model.json').read_text())
  (other / 'model.json').write_text(json.dumps(dict(meta, format_version=99)))
  line = _one_error_line(capsys, [f'--export={other}', f'--images={folder}'])
  assert 'format_version' in line and str(other / 'model.json') in line
  (other / 'model.json').write_text(json.dumps(dict(meta, threshold=None)))
  assert '"threshold"' in _one_error_line(capsys, [f'--export={other}', f'--images={folder}'])
  for scale in (None, [1.0], [2.0, 1.0], [0.0, 'x']):
    (other / 'model.json').write_text(json.dumps(dict(meta, map_scale=scale)))
    assert '"map_scale"' in _one_error_line(capsys, [f'--export={other}', f'--images={folder}']), scale
  assert '--images=' in _one_error_line(capsys, [f'--export={out}', f'--images={tmp_path / "none"}'])


@pytest.mark.slow
@pytest.mark.realdata
def test_export_names_the_model_it_cannot_convert(exported, monkeypatch, tmp_path):
  """jax2onnx failing on an op (as it would on a backbone with an op it lacks) ends in a ConfigError
  naming the backbone and the op, not a traceback from inside the converter; the folder is left
  without model.json, so no scorer uses a half-written export."""
  import jax2onnx
  config, work, out, _, _ = exported
  shutil.copytree(work / CATEGORY / 'checkpoints', tmp_path / CATEGORY / 'checkpoints')
  shutil.copytree(out, tmp_path / CATEGORY / 'export')       # an earlier, complete export

  def unsupported(*args, **kwargs):
    raise NotImplementedError("No plugin registered for primitive 'cumlogsumexp'")

  monkeypatch.setattr(jax2onnx, 'to_onnx', unsupported)
  monkeypatch.setattr(export, 'to_jax_export', lambda *args: None)   # not the part under test
  with pytest.raises(errors.ConfigError, match=r"backbone.arch='efficientnet_lite0'.*cumlogsumexp"):
    export.export(config, tmp_path)
  assert not (tmp_path / CATEGORY / 'export' / 'model.json').exists()


def test_export_without_a_checkpoint_says_so(tmp_path, toy_root):
  with pytest.raises(errors.MissingFileError, match='no checkpoint'):
    export.export(tiny_config(toy_root, tmp_path / 'cache'), tmp_path / 'empty')


def test_deploy_imports_no_jax():
  run = subprocess.run([sys.executable, '-c', 'import sys, adtr_jax.deploy, adtr_jax.deploy.__main__; '
                        'print("jax" in sys.modules)'], cwd=REPO, capture_output=True, text=True)
  assert run.stdout.strip() == 'False', run.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_benchmark_times_jax_and_onnxruntime(exported):
  from adtr_jax import benchmark
  _, _, out, _, _ = exported
  result = benchmark.deploy_run(str(out), batch_size=2, steps=1, latency_calls=5)
  for runtime in ('jax', 'onnxruntime'):
    assert result[f'{runtime}_images_per_s'] > 0
    assert 0 < result[f'{runtime}_latency_ms_p50'] <= result[f'{runtime}_latency_ms_p99']
  assert result['image_size'] == 64 and result['onnx_mib'] > 0
