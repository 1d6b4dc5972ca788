"""Scoring with a trained model: score maps and image scores of a split, sharded on 'data', handed
batch by batch to reductions (reducers.py) on the process that scored them."""
from __future__ import annotations

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from adtr_jax import feature_cache, multihost, scoring, sharding, split_pass
from adtr_jax.models.adtr import SplitModel


def score_features(params, frozen, embedded, *, graphdef, scoring_cfg, image_size: int):
  """embed()'s features [B, h, w, C] -> (score maps [B, S, S], image scores [B]). Pure; dropout off."""
  f, f_hat = nnx.merge(graphdef, params, frozen).reconstruct(embedded, deterministic=True)
  maps = scoring.pixel_score_map(f, f_hat, image_size, scoring_cfg.gaussian_sigma)
  scores = scoring.image_score(maps, scoring_cfg.image_score, scoring_cfg.avgpool_size,
                               scoring_cfg.topk)
  return maps, scores


def score_fn(params, frozen, images, *, graphdef, scoring_cfg, image_size: int):
  """images [B, S, S, 3] -> (score maps [B, S, S], image scores [B]): the backbone, then score_features."""
  embedded = nnx.merge(graphdef, params, frozen).embed(images)
  return score_features(params, frozen, embedded, graphdef=graphdef, scoring_cfg=scoring_cfg,
                        image_size=image_size)


def jit_score_fn(mesh, graphdef, config, stacked: bool = False):
  """score_features jitted, features sharded on 'data'. stacked: params have a leading model axis [M]
  and the outputs too ([M, B, S, S], [M, B]); the features are shared by all models."""
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def fn(params, frozen, embedded):
    return score_features(params, frozen, embedded, graphdef=graphdef, scoring_cfg=config.scoring,
                          image_size=config.dataset.image_size)

  if stacked:
    fn, dat = jax.vmap(fn, in_axes=(0, None, None)), NamedSharding(mesh, P(None, 'data'))
  return jax.jit(fn, in_shardings=(rep, rep, sharding.data_sharded(mesh)), out_shardings=(dat, dat))


def reduce_split(config, source, model: SplitModel, mesh, desc: str, reducers: list) -> list | None:
  """Scores every row of `source` once and hands each process's own valid rows of every batch to each
  of `reducers` (reducers.Reducer: add(rows), then finish() on every process); returns each reducer's
  result(parts) on process 0, from every process's finish() part, and None on the other processes.

  Nothing is gathered across processes but the parts: a process holds one batch of maps at a time,
  and only its own rows (split_pass deals each batch's rows to the processes in turn). Each row's
  source index comes with its map from the same local batch, so rows stay paired with their images.
  Where processes hold the same rows (a 'model' axis across processes), the first of them adds them.
  The backbone does not run for images it embedded before in this process (feature_cache.MEMO, up to
  backbone.feature_memo_mb).
  """
  fn = jit_score_fn(mesh, model.graphdef, config)
  embed = feature_cache.Embedder(model, mesh, config.backbone.feature_memo_mb)
  adds = sharding.reduces_rows(mesh)
  for batch in split_pass.batches(source, mesh, batch_size=config.eval.batch_size,
                                  image_size=config.dataset.image_size,
                                  num_workers=config.dataset.num_workers, desc=desc):
    maps, scores = fn(model.params, model.frozen, embed(batch['image']))
    if not adds:
      continue
    valid = batch['valid']
    rows = {'maps': sharding.local_rows(maps)[valid], 'scores': sharding.local_rows(scores)[valid],
            'labels': batch['label'][valid].astype(np.int32), 'masks': batch['mask'][valid] >= 0.5,
            'index': batch['index'][valid].astype(np.int64), 'images': batch['image'][valid]}
    for reducer in reducers:
      reducer.add(rows)
  parts = multihost.gather_json([reducer.finish() for reducer in reducers], desc)
  if embed.hits:
    logging.info('%s: %d of %d batches embedded earlier (feature memo)', desc, embed.hits, embed.calls)
  if parts is None:
    return None
  return [reducer.result([p[i] for p in parts]) for i, reducer in enumerate(reducers)]
