r"""Score a folder of images with an exported model, without JAX.

  python -m adtr_jax.deploy --export=<workdir>/<category>/export --images=<folder> \
      [--threshold=0.42] [--out=<folder>] [--normalised]

Writes <out>/predictions.csv (path, image_score, decision[, normalised_score]) and <out>/heatmaps/, as
--mode=predict does; <out> defaults to <export>/predict. A file that cannot be read is named on stderr
and listed in the CSV as 'unreadable'; the rest are scored. Bad arguments or export folders end with
one line, `adtr_jax.deploy: error: ...`, and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import numpy as np

from adtr_jax import predictions
from adtr_jax.data import mvtec
from adtr_jax.deploy import DeployError, Scorer, read_image

PROG = 'adtr_jax.deploy'


def score_folder(scorer: Scorer, folder, out_dir, batch_size: int = 8, normalised: bool = False,
                 warn=lambda message: print(message, file=sys.stderr)) -> pathlib.Path:
  """Scores every image of `folder` (sorted, as --mode=predict lists them) batch by batch, writing each
  batch's overlays (on model.json's map_scale) as it goes; returns predictions.csv. Memory: one batch
  of images and maps, and a score per image."""
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise DeployError(f'--images={folder} is not a folder of images')
  out_dir = pathlib.Path(out_dir)
  paths, scores, unreadable, batch = [], [], [], []

  def score_batch():
    s, m = scorer(np.stack([image for _, image in batch]))
    for k, (path, image) in enumerate(batch):
      predictions.write_overlay(out_dir, path, float(s[k]), m[k], scorer.threshold, image, scorer.map_scale)
    paths.extend(path for path, _ in batch)
    scores.append(s)
    batch.clear()

  for path in mvtec.images_in(folder):
    try:
      batch.append((path, read_image(path, scorer.image_size)))
    except DeployError as e:   # one bad file must not stop a line: name it, score the others
      warn(f'{PROG}: skipped {path}: {e}')
      unreadable.append(path)
    if len(batch) == batch_size:
      score_batch()
  if batch:
    score_batch()
  if not paths:
    raise DeployError(f'--images={folder} has no readable images ({", ".join(mvtec.IMAGE_EXTENSIONS)})')
  scores = np.concatenate(scores)
  extra = {'normalised_score': scorer.normalised(scores)} if normalised else None
  return predictions.write_csv(out_dir, paths, scores, scorer.threshold, extra, unreadable)


def parse(argv):
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
  parser.add_argument('--export', required=True, help='an export folder (model.onnx, model.json)')
  parser.add_argument('--images', required=True, help='a folder of images to score')
  parser.add_argument('--threshold', type=float, default=None,
                      help="decision threshold on image_score (default: model.json's calibrated one)")
  parser.add_argument('--out', default=None, help='output folder (default: <export>/predict)')
  parser.add_argument('--normalised', action='store_true',
                      help='add normalised_score = image_score / threshold (1.0 = the decision boundary)')
  parser.add_argument('--batch_size', type=int, default=8, help='images per onnxruntime call')
  parser.add_argument('--threads', type=int, default=0, help='onnxruntime threads (0: its default)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  try:
    scorer = Scorer(args.export, args.threshold, args.threads)
    out = pathlib.Path(args.out) if args.out else scorer.dir / 'predict'
    csv_path = score_folder(scorer, args.images, out, args.batch_size, args.normalised)
  except DeployError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr)
    return 2
  with csv_path.open(newline='') as f:
    decisions = [row['decision'] for row in csv.DictReader(f)]
  n_bad, n_unreadable = decisions.count('anomalous'), decisions.count(predictions.UNREADABLE)
  source = 'given' if args.threshold is not None else (
      f'calibrated for {scorer.meta["target_fpr"]:.0%} false positives')
  skipped = f', {n_unreadable} unreadable' if n_unreadable else ''
  print(f'{n_bad} of {len(decisions) - n_unreadable} images anomalous (threshold {scorer.threshold:.4g}, '
        f'{source}){skipped}; {csv_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
