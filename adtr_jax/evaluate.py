"""Evaluation: score maps for a category's test split, metrics.json, heatmap overlays."""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
from sklearn import metrics as skm

from adtr_jax import (errors, inference, metrics, multihost, paths, predictions, protocol_reducers, reducers,
                      sharding, summaries, trained, visualize)
from adtr_jax.data import datasets
from adtr_jax.data.folder import FolderSource


def save_heatmaps(config, source, picks: dict, scale, out_dir: pathlib.Path, has_masks: bool) -> dict:
  """Overlays of the rows reducers.Heatmaps picked (the highest- and lowest-scoring anomalous and the
  highest-scoring normal images) as PNGs in out_dir, coloured on scale = (vmin, vmax), the 1st and
  99.9th percentile of all the split's maps. Process 0. Returns {'<kind>_<rank>': (path, panel uint8
  [H, W, 3])}."""
  vmin, vmax = scale
  written = {}
  for kind, rows in picks.items():
    for rank, row in enumerate(rows):
      example = datasets.load_example(source, row['index'], config.dataset.image_size)
      panel = visualize.overlay_panel(example['image'], row['mask'] if has_masks else None, row['map'],
                                      vmin, vmax)
      path = out_dir / f'{kind}_{rank:02d}_score{row["score"]:.3f}_{pathlib.Path(example["path"]).stem}.png'
      visualize.save_png(panel, path)
      written[f'{kind}_{rank:02d}'] = (str(path), panel)
  return written


def save_curves(scores: dict, pixels: dict, out_dir: pathlib.Path, has_masks: bool,
                fpr_limit: float = 0.3) -> dict:
  """Image ROC (from reducers.Scores' result) and, with masks, pixel PRO up to fpr_limit (from
  reducers.Pixels'), as PNGs in out_dir. Process 0.
  Returns {'image_roc' | 'pixel_pro': (path, plot uint8 [H, W, 3])}."""
  fpr, tpr, _ = skm.roc_curve(scores['labels'], scores['scores'])
  auroc = skm.auc(fpr, tpr)
  plots = {'image_roc.png': visualize.line_plot(fpr, tpr, f'image ROC (AUROC {100 * auroc:.1f})',
                                                'false positive rate', 'TPR')}
  if has_masks and pixels['pro_curve'] is not None:
    fpr, pro = pixels['pro_curve']
    plots['pixel_pro.png'] = visualize.line_plot(
        fpr, pro, f'pixel PRO (AUPRO@{fpr_limit} {100 * pixels["aupro_merged"]:.1f})',
        'false positive rate', 'PRO', xmax=fpr_limit)
  for name, image in plots.items():
    visualize.save_png(image, out_dir / name)
  return {name.removesuffix('.png'): (str(out_dir / name), image) for name, image in plots.items()}


TENSORBOARD_HEATMAPS = 4
FPR_LIMIT = 0.3   # AUPRO's and the drawn PRO curve's


def evaluate_category(config, category: str, workdir: pathlib.Path,
                      trained_in: pathlib.Path | None = None, maps_dir: pathlib.Path | None = None) -> dict:
  """Metrics (fractions in [0, 1]) for one category, with its benchmark's own (protocol_reducers);
  heatmaps under workdir/heatmaps; with maps_dir (eval.save_maps), each test map as a TIFF there. The
  model is restored from `trained_in` (default: workdir)."""
  mesh = sharding.make_mesh()
  data = datasets.load_category(config, category)
  restored = trained.restore(config, trained_in or workdir, mesh, category)
  result = score_test(config, data, restored.model, mesh, workdir, f'eval {category}', maps_dir)
  return category_report(config, data, result, workdir, int(restored.meta['step']))


def score_test(config, data: datasets.CategoryData, model, mesh, workdir: pathlib.Path,
               desc: str, maps_dir: pathlib.Path | None = None) -> dict | None:
  """One pass over data.test, reduced (inference.reduce_split) in a scratch folder under workdir:
  {'scores': reducers.Scores', 'pixels': reducers.Pixels', 'heatmaps': reducers.Heatmaps' result,
  'protocol': the merged results of the benchmark's reducers (protocol_reducers.test_reducers; MVTec
  AD 2's need a pass over data.validation first, for the SegF1 threshold)} on process 0, None on the
  others."""
  source = config.dataset.source
  with multihost.scratch(workdir, 'eval') as folder:
    validation, before = {}, protocol_reducers.validation_reducers(source)
    if before:
      got = inference.reduce_split(config, data.validation, model, mesh, f'{desc} validation', before)
      validation = multihost.share_json(None if got is None else _merged(got), 'validation metrics')
    protocol = protocol_reducers.test_reducers(source, data, folder / 'protocol', jax.process_index(),
                                               validation, maps_dir)
    results = inference.reduce_split(config, data.test, model, mesh, desc, [
        reducers.Scores(folder, len(data.test), desc),
        reducers.Pixels(folder / 'pixels', with_metrics=data.has_masks, fpr_limit=FPR_LIMIT,
                        aupro_ties=config.eval.aupro_ties),
        reducers.Heatmaps(folder, config.eval.num_heatmaps)] + protocol)
  if results is None:
    return None
  return dict(zip(('scores', 'pixels', 'heatmaps'), results), protocol=_merged(results[3:]))


def _merged(results: list[dict]) -> dict:
  """One dict of several reducers' results (their keys are distinct, protocol_reducers.report_keys)."""
  return {key: value for result in results for key, value in result.items()}


def category_report(config, data: datasets.CategoryData, result: dict | None, workdir: pathlib.Path,
                    step: int) -> dict:
  """Metrics, heatmaps and curves of one model's scores of data.test (score_test's result), made and
  written by process 0; every process returns the metrics."""
  values = None
  if result is not None:
    scores = result['scores']
    values = metrics.image_metrics(scores['scores'], scores['labels'])
    if data.has_masks:
      values.update(result['pixels']['metrics'])
    values.update(result['protocol'])
    heatmaps = save_heatmaps(config, data.test, result['heatmaps'], result['pixels']['percentiles'],
                             workdir / 'heatmaps', data.has_masks)
    curves = save_curves(scores, result['pixels'], workdir, data.has_masks, FPR_LIMIT)
    # TensorBoard: the metrics, the curves and the first few heatmap panels (the top anomalous ones).
    shown = {**{f'heatmaps/{k}': v for k, v in list(heatmaps.items())[:TENSORBOARD_HEATMAPS]}, **curves}
    summaries.write_eval(workdir, step, values, {name: image for name, (_, image) in shown.items()})
    values.update(num_test_images=int(len(scores['labels'])),
                  num_anomalous=int(scores['labels'].sum()), checkpoint_step=step,
                  heatmap_dir=str(workdir / 'heatmaps'), num_heatmaps=len(heatmaps),
                  curves=[path for path, _ in curves.values()],
                  labelled_anomalies_removed_from_test=list(data.labelled_files),
                  labelled_use=config.anomalies.labelled_use)
  return multihost.share_json(values, 'evaluation report')


def summarise(per_category: dict) -> dict:
  """Mean over categories of each metric present in all of them (NaN-free means only)."""
  mean = {}
  for key in metrics.METRIC_KEYS:
    vals = [v[key] for v in per_category.values() if key in v]
    if len(vals) == len(per_category):
      mean[key] = float(np.mean(vals))
  return mean


def markdown_table(per_category: dict, mean: dict) -> str:
  """Paper-style percentages with one decimal, one row per category; a metric that some category lacks
  (pixel metrics of an image-labelled one) shows as '-' there and in the mean."""
  keys = [k for k in metrics.METRIC_KEYS if any(k in v for v in per_category.values())]
  lines = ['| category | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
  for name, vals in list(per_category.items()) + [('mean', mean)]:
    lines.append(f'| {name} | ' + ' | '.join(f'{100 * vals[k]:.1f}' if k in vals else '-' for k in keys) + ' |')
  return '\n'.join(lines)


def evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Evaluates every configured category; writes workdir/metrics.json and metrics.md."""
  per_category = {}
  for c in datasets.categories(config):
    model = paths.model_dir(config, workdir, c)
    if paths.diverged(model).is_file():   # nothing finite to evaluate (train.py says so at the end)
      per_category[c] = {'diverged_at_step': json.loads(paths.diverged(model).read_text())['step']}
    else:
      per_category[c] = evaluate_category(config, c, workdir / c, model,
                                          paths.maps_dir(workdir) if config.eval.save_maps else None)
  return write_report(per_category, workdir)


def write_report(per_category: dict, workdir: pathlib.Path) -> dict:
  """workdir/metrics.json ({'categories': ..., 'mean': ...}) and metrics.md; prints the table."""
  report = {'categories': per_category, 'mean': summarise(per_category)}
  table = markdown_table(per_category, report['mean'])
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'metrics.json').write_text(json.dumps(report, indent=2) + '\n')
    (workdir / 'metrics.md').write_text(table + '\n')
  print(table)
  return report


def predict(config: ml_collections.ConfigDict, workdir: pathlib.Path, folder) -> pathlib.Path:
  """Scores every image of `folder` with the model trained in workdir/<category> (or workdir/unified).

  Writes <category>/predict/predictions.csv (path, image_score, decision; process 0, in the folder's
  order) and a heatmap overlay per image (each process its own images', as they are scored, coloured
  on the model's calibrated map_scale); the decision compares the score with the threshold calibrated
  at the end of training. Returns the CSV.
  """
  mesh = sharding.make_mesh()
  source = FolderSource(folder)
  restored = trained.for_scoring(config, workdir, mesh, 'predict')
  calibration = restored.meta['calibration']
  threshold = calibration['threshold']
  out_dir = paths.predict_dir(restored.directory)
  desc = f'predict {restored.category}'
  with multihost.scratch(restored.directory, 'predict') as scratch:
    results = inference.reduce_split(config, source, restored.model, mesh, desc, [
        reducers.Scores(scratch, len(source), desc),
        reducers.Overlays(out_dir, lambda i: source.paths[i], threshold, calibration['map_scale'])])
  n_bad = None
  if results is not None:
    scores = results[0]['scores']
    predictions.write_csv(out_dir, source.paths, scores, threshold)
    n_bad = int(np.sum(scores > threshold))
  n_bad = multihost.share_json(n_bad, 'predictions')
  csv_path = out_dir / 'predictions.csv'
  print(f'{n_bad} of {len(source)} images anomalous (threshold {threshold:.4g}, calibrated for '
        f'{calibration["target_fpr"]:.0%} false positives); {csv_path}')
  return csv_path


def predict_submission(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """--mode=predict of an MVTec AD 2 object without --predict_dir: the evaluation server's tree of its
  private splits (test_private, test_private_mixed) under <workdir>/ad2_submission/ (float16 TIFFs at
  each image's original size, and 0/255 PNGs at the SegF1 threshold taken on validation/good at that
  size; protocol_reducers). The splits' file names are checked as MVTec's checker does before any
  scoring. Returns the submission folder."""
  mesh = sharding.make_mesh()
  restored = trained.for_scoring(config, workdir, mesh, 'predict')
  data = datasets.load_category(config, restored.category)
  out_dir = paths.ad2_submission_dir(workdir)
  if not data.unlabelled:
    raise errors.DataError(f'{data.root / restored.category}: no test_private or test_private_mixed '
                           'folder to score for the MVTec AD 2 submission')
  protocol_reducers.check_submission(data, restored.category)   # before any scoring
  desc = f'predict {restored.category}'
  got = inference.reduce_split(config, data.validation, restored.model, mesh, f'{desc} validation',
                               [protocol_reducers.submission_threshold_reducer(data)])
  threshold = multihost.share_json(None if got is None else got[0]['ad2_segf1_threshold'],
                                   'submission threshold')
  written = {}
  for split, split_reducers in protocol_reducers.submission_reducers(
      data, restored.category, out_dir, threshold).items():
    got = inference.reduce_split(config, data.unlabelled[split], restored.model, mesh,
                                 f'{desc} {split}', split_reducers)
    written.update({} if got is None else got[0])
  written = multihost.share_json(written, 'submission')
  print(f'MVTec AD 2 submission of {restored.category}: '
        + ', '.join(f'{n} {k.removeprefix("ad2_submission_")}' for k, n in written.items())
        + f' images (PNGs at {threshold:.4g}); {out_dir}')
  return out_dir
