r"""A nearest-neighbour reference on ADTR's own frozen features (PatchCore-style, no training).

Every training image's feature tokens (the same backbone, layers, grid and model.feature_norm as the
ADTR config) form a
memory bank, optionally subsampled (random rows, or a greedy k-center coreset as in PatchCore); a test
token's score is its L2 distance to the nearest bank token. The score map then goes through ADTR's own
upsampling, blur, image score and metrics, so the two differ only in what is learned.

  python -m adtr_jax.baselines.nearest_neighbour --config=configs/magnetic_tile.py --workdir=W

writes W/metrics.json and W/metrics.md like the ADTR evaluation.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm.auto import tqdm

from adtr_jax import errors, evaluate, feature_cache, metrics, scoring, sharding
from adtr_jax.data import datasets
from adtr_jax.models.adtr import TRAINABLE, SplitModel, build_model

SUBSAMPLING = ('random', 'coreset')


def subsample(tokens: np.ndarray, fraction: float, method: str, seed: int) -> np.ndarray:
  """tokens [N, C] -> the memory bank [M, C], M = max(1, round(fraction * N)) (fraction 1: all)."""
  if not 0.0 < fraction <= 1.0:
    raise errors.ConfigError(f'baseline.bank_fraction={fraction} must be in (0, 1]')
  if method not in SUBSAMPLING:
    raise errors.ConfigError(f'baseline.subsample={method!r} must be one of {SUBSAMPLING}')
  m = max(1, round(fraction * len(tokens)))
  if m >= len(tokens):
    return tokens
  if method == 'random':
    return tokens[np.sort(np.random.default_rng(seed).choice(len(tokens), m, replace=False))]
  return tokens[np.asarray(greedy_coreset(jnp.asarray(tokens, jnp.float32), m, seed))]


def greedy_coreset(tokens: jax.Array, m: int, seed: int, projection_dim: int = 128) -> jax.Array:
  """Indices [m] of a greedy k-center cover of tokens [N, C]: each pick is the token farthest from
  those picked so far. Distances are taken after a random projection to projection_dim dimensions
  (Johnson-Lindenstrauss), which keeps the cover and cuts the cost, as PatchCore does."""
  key = jax.random.key(seed)
  c = tokens.shape[1]
  if c > projection_dim:
    tokens = tokens @ jax.random.normal(key, (c, projection_dim)) / np.sqrt(projection_dim)

  @jax.jit
  def run(tokens):
    first = jax.random.randint(jax.random.fold_in(key, 1), (), 0, tokens.shape[0])
    dist = jnp.sum(jnp.square(tokens - tokens[first]), axis=-1)

    def body(i, carry):
      picks, dist = carry
      nxt = jnp.argmax(dist)
      dist = jnp.minimum(dist, jnp.sum(jnp.square(tokens - tokens[nxt]), axis=-1))
      return picks.at[i].set(nxt), dist

    picks = jnp.zeros((m,), jnp.int32).at[0].set(first)
    return jax.lax.fori_loop(1, m, body, (picks, dist))[0]

  return run(tokens)


@jax.jit
def nearest_distance(bank: jax.Array, bank_sq: jax.Array, queries: jax.Array) -> jax.Array:
  """queries [B, h, w, C] -> L2 distance of each token to its nearest bank row [B, h, w]."""
  q = queries.reshape(-1, queries.shape[-1]).astype(jnp.float32)
  d2 = jnp.sum(jnp.square(q), -1)[:, None] - 2.0 * q @ bank.T + bank_sq[None]
  return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=-1), 0.0)).reshape(queries.shape[:3])


def score_test(config: ml_collections.ConfigDict, category: str) -> dict:
  """The reference's scores of one category's test split: {'maps': [N, S, S], 'scores': [N], 'labels':
  [N], 'masks': [N, S, S] or None, 'paths': [N] image files, 'bank_size'} (same splits and scoring as
  ADTR's)."""
  mesh = sharding.make_mesh()
  data = datasets.load_category(config, category)
  model, _ = build_model(config)
  split = SplitModel(*nnx.split(model, TRAINABLE, ...))
  train = feature_cache.compute(data.train, split, mesh, config, 'float32')
  model.feature_norm.fit(train)   # the same feature space as ADTR with this config
  train = np.asarray(model.feature_norm(train))
  b = config.baseline
  bank = jnp.asarray(subsample(train.reshape(-1, train.shape[-1]), b.bank_fraction, b.subsample,
                               config.seed))
  bank_sq = jnp.sum(jnp.square(bank), -1)
  test = np.asarray(model.feature_norm(feature_cache.compute(data.test, split, mesh, config, 'float32')))
  s = config.scoring
  maps, scores = [], []
  for i in tqdm(range(0, len(test), config.eval.batch_size), desc=f'nearest neighbour {category}',
                unit='batch', leave=False):
    m = scoring.upsample_map(nearest_distance(bank, bank_sq, jnp.asarray(test[i:i + config.eval.batch_size])),
                             config.dataset.image_size, s.gaussian_sigma)
    maps.append(np.asarray(m))
    scores.append(np.asarray(scoring.image_score(m, s.image_score, s.avgpool_size, s.topk)))
  rows = [data.test[i] for i in range(len(data.test))]
  return {'maps': np.concatenate(maps), 'scores': np.concatenate(scores),
          'labels': np.asarray([r['label'] for r in rows]),
          'masks': np.stack([r['mask'] for r in rows]) if data.has_masks else None,
          'paths': [r['path'] for r in rows], 'bank_size': int(bank.shape[0])}


def evaluate_category(config: ml_collections.ConfigDict, category: str) -> dict:
  """The reference's metrics for one category (same splits, scoring and metrics as ADTR's)."""
  t = score_test(config, category)
  values = metrics.compute_all(t['scores'], t['labels'], t['maps'] if t['masks'] is not None else None,
                               t['masks'], aupro_ties=config.eval.aupro_ties)
  b = config.baseline
  values.update(num_test_images=len(t['labels']), bank_size=t['bank_size'],
                bank_fraction=b.bank_fraction, subsample=b.subsample)
  return values


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Every configured category; writes workdir/metrics.json and metrics.md. Returns the report."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  per_category = {c: evaluate_category(config, c) for c in datasets.categories(config)}
  report = {'method': 'nearest_neighbour', 'categories': per_category,
            'mean': evaluate.summarise(per_category)}
  table = evaluate.markdown_table(per_category, report['mean'])
  if jax.process_index() == 0:
    (workdir / 'metrics.json').write_text(json.dumps(report, indent=2) + '\n')
    (workdir / 'metrics.md').write_text(table + '\n')
  print(table)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Flags only for the command line: importing this module (e.g. from a sweep) defines none.
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (same as for ADTR).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where metrics.json and metrics.md go.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
