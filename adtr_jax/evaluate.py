"""Evaluation: score maps for a category's test split, metrics.json, heatmap overlays."""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
from sklearn import metrics as skm

from adtr_jax import metrics, paths, predictions, sharding, summaries, trained, visualize
from adtr_jax.data import datasets
from adtr_jax.data.folder import FolderSource
from adtr_jax.inference import score_split


def save_heatmaps(config, source, result: dict, out_dir: pathlib.Path, has_masks: bool) -> dict:
  """Overlays for the highest- and lowest-scoring anomalous and the highest-scoring normal images,
  as PNGs in out_dir. Returns {'<kind>_<rank>': (path, panel uint8 [H, W, 3])}."""
  n = config.eval.num_heatmaps
  scores, labels = result['scores'], result['labels']
  order = np.argsort(-scores, kind='stable')
  anomalous = [i for i in order if labels[i] == 1]
  normal = [i for i in order if labels[i] == 0]
  picks = {'top_anomalous': anomalous[:max(n // 2, 1)],
           'low_anomalous': anomalous[::-1][:max(n // 4, 1)],
           'top_normal': normal[:max(n // 4, 1)]}
  vmin, vmax = np.percentile(result['maps'], [1.0, 99.9])
  written = {}
  for kind, rows in picks.items():
    for rank, i in enumerate(rows):
      example = datasets.load_example(source, int(result['index'][i]), config.dataset.image_size)
      panel = visualize.overlay_panel(example['image'], result['masks'][i] if has_masks else None,
                                      result['maps'][i], vmin, vmax)
      path = out_dir / f'{kind}_{rank:02d}_score{scores[i]:.3f}_{pathlib.Path(example["path"]).stem}.png'
      if jax.process_index() == 0:
        visualize.save_png(panel, path)
      written[f'{kind}_{rank:02d}'] = (str(path), panel)
  return written


def _thin(x: np.ndarray, y: np.ndarray, n: int = 4000):
  """At most n points of a curve, for drawing (pixel-level curves have millions of points)."""
  if len(x) <= n:
    return x, y
  keep = np.unique(np.linspace(0, len(x) - 1, n).round().astype(int))
  return x[keep], y[keep]


def save_curves(result: dict, out_dir: pathlib.Path, has_masks: bool, fpr_limit: float = 0.3) -> list:
  """Image ROC and (with masks) pixel PRO up to fpr_limit, as PNGs in out_dir.
  Returns {'image_roc' | 'pixel_pro': (path, plot uint8 [H, W, 3])}."""
  fpr, tpr, _ = skm.roc_curve(result['labels'], result['scores'])
  auroc = skm.auc(fpr, tpr)
  plots = {'image_roc.png': visualize.line_plot(fpr, tpr, f'image ROC (AUROC {100 * auroc:.1f})',
                                                'false positive rate', 'TPR')}
  if has_masks and result['masks'].any():
    fpr, pro = metrics.pro_curve(result['maps'], result['masks'], fpr_limit)
    aupro = np.trapezoid(pro, fpr) / fpr_limit
    plots['pixel_pro.png'] = visualize.line_plot(
        *_thin(fpr, pro), f'pixel PRO (AUPRO@{fpr_limit} {100 * aupro:.1f})', 'false positive rate',
        'PRO', xmax=fpr_limit)
  if jax.process_index() == 0:
    for name, image in plots.items():
      visualize.save_png(image, out_dir / name)
  return {name.removesuffix('.png'): (str(out_dir / name), image) for name, image in plots.items()}


TENSORBOARD_HEATMAPS = 4


def evaluate_category(config, category: str, workdir: pathlib.Path,
                      trained_in: pathlib.Path | None = None) -> dict:
  """Metrics (fractions in [0, 1]) for one category; heatmaps under workdir/heatmaps. The model is
  restored from `trained_in` (default: workdir)."""
  mesh = sharding.make_mesh()
  data = datasets.load_category(config, category)
  restored = trained.restore(config, trained_in or workdir, mesh, category)
  result = score_split(config, data.test, restored.model, mesh, f'eval {category}')
  return category_report(config, data, result, workdir, int(restored.meta['step']))


def category_report(config, data: datasets.CategoryData, result: dict, workdir: pathlib.Path,
                    step: int) -> dict:
  """Metrics, heatmaps and curves of one model's scores of data.test (score_split's result)."""
  values = metrics.compute_all(result['scores'], result['labels'],
                               result['maps'] if data.has_masks else None,
                               result['masks'] if data.has_masks else None,
                               aupro_ties=config.eval.aupro_ties)
  heatmaps = save_heatmaps(config, data.test, result, workdir / 'heatmaps', data.has_masks)
  curves = save_curves(result, workdir, data.has_masks)
  # TensorBoard: the metrics, the curves and the first few heatmap panels (the top anomalous ones).
  shown = {**{f'heatmaps/{k}': v for k, v in list(heatmaps.items())[:TENSORBOARD_HEATMAPS]}, **curves}
  summaries.write_eval(workdir, step, values, {name: image for name, (_, image) in shown.items()})
  values.update(num_test_images=int(len(result['labels'])),
                num_anomalous=int(result['labels'].sum()), checkpoint_step=step,
                heatmap_dir=str(workdir / 'heatmaps'), num_heatmaps=len(heatmaps),
                curves=[path for path, _ in curves.values()],
                labelled_anomalies_removed_from_test=list(data.labelled_files),
                labelled_use=config.anomalies.labelled_use)
  return values


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
      per_category[c] = evaluate_category(config, c, workdir / c, model)
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

  Writes <category>/predict/predictions.csv (path, image_score, decision) and heatmap overlays; the
  decision compares the score with the threshold calibrated at the end of training. Returns the CSV.
  """
  mesh = sharding.make_mesh()
  source = FolderSource(folder)
  restored = trained.for_scoring(config, workdir, mesh, 'predict')
  meta = restored.meta
  threshold = meta['calibration']['threshold']
  result = score_split(config, source, restored.model, mesh, f'predict {restored.category}')
  csv_path = paths.predict_dir(restored.directory) / 'predictions.csv'
  if jax.process_index() == 0:
    predictions.write(csv_path.parent, source.paths, result['scores'], result['maps'], threshold,
                      lambda i: datasets.load_example(source, i, config.dataset.image_size)['image'])
  n_bad = int(np.sum(result['scores'] > threshold))
  print(f'{n_bad} of {len(source)} images anomalous (threshold {threshold:.4g}, calibrated for '
        f'{meta["calibration"]["target_fpr"]:.0%} false positives); {csv_path}')
  return csv_path
