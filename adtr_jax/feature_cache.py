"""The frozen backbone's features, computed once per training image and kept for the whole run.

The backbone is frozen and normal-only training has no randomness in input space, so every epoch would
recompute the same features. `compute` runs the backbone once over a split in inference batches;
`place` puts the result in device memory sharded over the mesh's `data` axis (each device, and so
each process of a multi-host run, holds only its block of rows). `Embedder`
gives the features of a batch, to `compute` and to evaluation, from `MEMO` when the same images were
embedded before in this process.
"""
from __future__ import annotations

import collections
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from adtr_jax import sharding, split_pass
from adtr_jax.models.adtr import SplitModel

PLACES = ('device', 'host', 'off')
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


def compute(source, model: SplitModel, mesh, config, dtype: str) -> np.ndarray:
  """Features of every row of `source`, in order: [N, h, w, C] numpy in `dtype` (bfloat16/float32),
  in batches of eval.batch_size at dataset.image_size. Batches embedded before in this process come
  from MEMO (up to backbone.feature_memo_mb, see Embedder)."""
  store = DTYPES[dtype]
  embed = Embedder(model, mesh, config.backbone.feature_memo_mb)
  out = {'features': [], 'index': []}
  for batch in split_pass.batches(source, mesh, batch_size=config.eval.batch_size,
                                  image_size=config.dataset.image_size,
                                  num_workers=config.dataset.num_workers, desc='feature cache',
                                  leave=False):
    inputs = sharding.put_batch({'valid': batch['valid'], 'index': batch['index']}, mesh)
    valid = sharding.to_host(inputs['valid'])
    out['features'].append(sharding.to_host(embed(batch['image']).astype(store))[valid])
    out['index'].append(sharding.to_host(inputs['index'])[valid])   # rows come dealt to processes
  return split_pass.in_source_order(out, len(source), 'feature cache')['features']


def place(features: list[np.ndarray], mesh) -> tuple[jax.Array, int]:
  """Training sets' features (one per category) -> ([K, N', h, w, C] on (None, 'data'), N'): each
  padded with zero rows (never sampled) to N', the largest N rounded up to the 'data' devices. Each
  process hands over only the rows of its own devices (a callback per addressable shard)."""
  n_dev = sharding.data_size(mesh)
  size = max(len(f) for f in features)
  size += -size % n_dev
  stacked = np.zeros((len(features), size, *features[0].shape[1:]), features[0].dtype)
  for k, f in enumerate(features):
    stacked[k, :len(f)] = f
  spec = NamedSharding(mesh, P(None, 'data'))
  return jax.make_array_from_callback(stacked.shape, spec, lambda index: stacked[index]), size


class Memo:
  """Backbone features of images this process has embedded, by content: (backbone key, image digest)
  -> float32 row [h, w, C], least recently used evicted beyond max_bytes.

  Evaluation scores the same test images again and again (every class of a one-class protocol, every
  variant and seed of an experiment, every run of an in-process sweep), and runs on the same training
  set build the same feature cache; the frozen backbone gives them the same features each time, so
  only the reconstructor needs to run again.
  """

  def __init__(self):
    self.rows: collections.OrderedDict = collections.OrderedDict()
    self.bytes = 0

  def get(self, key, digests: list[bytes]) -> np.ndarray | None:
    """All the rows [b, h, w, C], or None when any one is missing."""
    found = [self.rows.get((key, d)) for d in digests]
    if any(row is None for row in found):
      return None
    for d in digests:
      self.rows.move_to_end((key, d))
    return np.stack(found)

  def put(self, key, digests: list[bytes], rows: np.ndarray, max_bytes: int) -> None:
    for d, row in zip(digests, rows):
      if (key, d) not in self.rows and row.nbytes <= max_bytes:
        self.rows[(key, d)] = np.array(row, np.float32)
        self.bytes += row.nbytes
    while self.bytes > max_bytes:
      _, old = self.rows.popitem(last=False)
      self.bytes -= old.nbytes


MEMO = Memo()   # one per process, shared by every Embedder


def digest(image: np.ndarray) -> bytes:
  """An image's identity for the memo: its shape, dtype and pixels."""
  h = hashlib.blake2b(f'{image.shape}{image.dtype}'.encode(), digest_size=16)
  h.update(np.ascontiguousarray(image).data)
  return h.digest()


_GRAPHS: dict = {}   # model structure -> a small int: hashing an nnx GraphDef costs milliseconds


def backbone_key(model: SplitModel) -> tuple[int, str]:
  """What the features depend on besides the image: the model's structure and the frozen weights."""
  h = hashlib.blake2b(digest_size=16)
  for leaf in jax.tree.leaves(jax.device_get(model.frozen)):
    h.update(np.ascontiguousarray(leaf).data)
  return _GRAPHS.setdefault(model.graphdef, len(_GRAPHS)), h.hexdigest()


class Embedder:
  """images -> the frozen backbone's features, reusing MEMO's rows for images seen before.

  __call__(local images uint8 [b, S, S, 3], this process's rows) -> features [B, h, w, C] float32,
  sharded on 'data'. A batch is taken from the memo only when every one of its rows is there (the
  jitted shapes stay fixed). max_mb = 0 turns the memo off; so does a multi-host run, where every
  process would have to agree on each batch's hit.
  """

  def __init__(self, model: SplitModel, mesh, max_mb: float):
    rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
    self.mesh, self.params, self.frozen = mesh, model.params, model.frozen
    self.max_bytes = int(max_mb * 2**20) if jax.process_count() == 1 else 0
    self.key = backbone_key(model) if self.max_bytes else None
    graphdef = model.graphdef
    # params only complete the model's structure: embed() reads the frozen backbone alone.
    self.fn = jax.jit(lambda params, frozen, images: nnx.merge(graphdef, params, frozen).embed(images)
                      .astype(jnp.float32), in_shardings=(rep, rep, dat), out_shardings=dat)
    self.hits = self.calls = 0

  def __call__(self, images: np.ndarray) -> jax.Array:
    self.calls += 1
    digests = [digest(x) for x in images] if self.max_bytes else []
    rows = MEMO.get(self.key, digests) if digests else None
    if rows is not None:
      self.hits += 1
      return sharding.put_batch({'features': rows}, self.mesh)['features']
    features = self.fn(self.params, self.frozen, sharding.put_batch({'image': images}, self.mesh)['image'])
    if digests:
      MEMO.put(self.key, digests, sharding.to_host(features), self.max_bytes)
    return features
