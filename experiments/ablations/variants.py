"""The paper's ablations as config overrides on top of any base config (one MVTec-layout category).

Each variant changes one thing relative to `adtr` (the paper's model on the base config's backbone):
the backbone (the Lites need nothing; B0/B4/ResNets need weights, see run.py --weights_dir), a single
last layer instead of the multi-scale embedding, no auxiliary query (the decoder is fed the encoder
output), token-wise MLP or 3x3 CNN blocks instead of attention, or reconstructing pixel patches
instead of features.
"""
VARIANTS = {
    'adtr': {},
    'backbone_lite0': {'backbone.arch': 'efficientnet_lite0'},
    'backbone_lite1': {'backbone.arch': 'efficientnet_lite1'},
    'backbone_lite2': {'backbone.arch': 'efficientnet_lite2'},
    'backbone_b0': {'backbone.arch': 'efficientnet_b0'},
    'backbone_b4': {'backbone.arch': 'efficientnet_b4'},
    'backbone_resnet18': {'backbone.arch': 'resnet18'},
    'backbone_resnet34': {'backbone.arch': 'resnet34'},
    'last_layer': {'backbone.layers': ('layer5',)},
    'no_aux_query': {'model.aux_query': False},
    'mlp': {'model.type': 'mlp'},
    'cnn': {'model.type': 'cnn'},
    'pixels': {'model.target': 'pixels'},
}
# Run by default: everything that needs no user-supplied weights.
DEFAULT = ('adtr', 'backbone_lite1', 'backbone_lite2', 'last_layer', 'no_aux_query', 'mlp', 'cnn', 'pixels')
# Archs without installable weights: their variants need a checkpoint in --weights_dir.
NEEDS_WEIGHTS = {'efficientnet_b0', 'efficientnet_b4', 'resnet18', 'resnet34'}


def apply(config, name: str):
  """A copy of `config` with variant `name`'s overrides (dotted field names)."""
  if name not in VARIANTS:
    raise ValueError(f'unknown ablation variant {name!r}; known: {sorted(VARIANTS)}')
  config = config.copy_and_resolve_references()
  for field, value in VARIANTS[name].items():
    *parents, leaf = field.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
