"""Scoring with a trained model: score maps and image scores for a whole split, sharded on 'data'."""
from __future__ import annotations

import jax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from adtr_jax import feature_cache, scoring, sharding, split_pass
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


def score_split(config, source, model: SplitModel, mesh, desc: str) -> dict:
  """Scores every example of `source` once (padding rows dropped). Returns numpy arrays:

  'maps' [N, S, S] float32, 'scores' [N], 'labels' [N], 'masks' [N, S, S] bool, 'index' [N]; entry i
  is row i of `source`, put there by each row's all-gathered source index (not by its position in
  the batches), and a row scored twice or never is an error. The backbone does not run for images it
  embedded before in this process (feature_cache.MEMO, up to backbone.feature_memo_mb).
  """
  fn = jit_score_fn(mesh, model.graphdef, config)
  embed = feature_cache.Embedder(model, mesh, config.backbone.feature_memo_mb)
  out = {'maps': [], 'scores': [], 'labels': [], 'masks': [], 'index': []}
  for batch in split_pass.batches(source, mesh, batch_size=config.eval.batch_size,
                                  image_size=config.dataset.image_size,
                                  num_workers=config.dataset.num_workers, desc=desc):
    inputs = sharding.put_batch({k: batch[k] for k in ('mask', 'label', 'valid', 'index')}, mesh)
    maps, scores = fn(model.params, model.frozen, embed(batch['image']))
    valid = sharding.to_host(inputs['valid'])
    out['maps'].append(sharding.to_host(maps)[valid])
    out['scores'].append(sharding.to_host(scores)[valid])
    out['labels'].append(sharding.to_host(inputs['label'])[valid])
    out['masks'].append(sharding.to_host(inputs['mask'])[valid] >= 0.5)
    # Each row's source index travels with it (all-gathered like the maps): the pass deals rows to
    # the processes in turn, so gathered position is not source row.
    out['index'].append(sharding.to_host(inputs['index'])[valid])
  result = split_pass.in_source_order(out, len(source), desc)
  if embed.hits:
    logging.info('%s: %d of %d batches embedded earlier (feature memo)', desc, embed.hits, embed.calls)
  return result
