"""The reconstruction transformer against PyTorch's post-norm transformer layers, with our weights.

The reference is built from torch.nn.TransformerEncoderLayer / TransformerDecoderLayer (post-norm,
ReLU, dropout 0, batch_first) plus two torch.nn.Linear for the 1x1 input / output projections. Two
comparisons:
  * torch's own layer forward passes, with our position embedding set to zero: the layer structure
    (attention, residuals, LayerNorm placement, FFN) is torch's, not a copy of ours;
  * our position handling: models/reconstructor.py adds the learned position embedding to the queries
    and keys of every attention (encoder self-attention; decoder self-attention; the decoder's cross-
    attention query and the memory's keys), never to values or to the decoder's input (the learned
    query embedding). torch's layers take no such argument, so that reference runs the same torch
    submodules (self_attn, multihead_attn, linear1/2, norm1/2/3) in the post-norm order of torch's
    forward, adding the position where our model does; and model.neighbour_mask as torch's attn_mask.
Float32 on CPU; tolerance: max |ours - torch| <= ATOL.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from adtr_jax.models.reconstructor import Reconstructor
from tests import torch_refs

ATOL = 1e-5
TINY = dict(in_channels=12, grid=(3, 4), hidden_dim=16, num_heads=4, ffn_dim=32, num_encoder_layers=2,
            num_decoder_layers=2)
PAPER = dict(in_channels=64, grid=(8, 8), hidden_dim=256, num_heads=8, ffn_dim=1024, num_encoder_layers=4,
             num_decoder_layers=4)


def _ours(size: dict, **options) -> Reconstructor:
  size = dict(size)
  return Reconstructor(size.pop('in_channels'), size.pop('grid'), dropout=0.0, rngs=nnx.Rngs(0),
                       **size, **options)


@nnx.jit
def _run(model, tokens):
  return model(tokens)


def _tensor(array):
  """A torch copy of a JAX / numpy array (JAX's buffers are read-only)."""
  return torch_refs.require('torch').tensor(np.asarray(array))


def _copy_linear(linear, ours) -> None:
  linear.weight.copy_(_tensor(ours.kernel[...]).T)
  linear.bias.copy_(_tensor(ours.bias[...]))


def _copy_attention(mha, ours) -> None:
  """Our separate q, k, v Linears ([in, out] kernels) -> torch's packed in_proj ([3D, D], x @ W^T)."""
  projections = (ours.query, ours.key, ours.value)
  mha.in_proj_weight.copy_(_tensor(np.concatenate([np.asarray(p.kernel[...]).T for p in projections])))
  mha.in_proj_bias.copy_(_tensor(np.concatenate([np.asarray(p.bias[...]) for p in projections])))
  _copy_linear(mha.out_proj, ours.out)


def _copy_norm(norm, ours) -> None:
  norm.weight.copy_(_tensor(ours.scale[...]))
  norm.bias.copy_(_tensor(ours.bias[...]))


def _torch_layers(model: Reconstructor, size: dict):
  """torch modules with our weights: (input_proj, encoder layers, decoder layers, output_proj)."""
  torch = torch_refs.require('torch')
  d, h, f = size['hidden_dim'], size['num_heads'], size['ffn_dim']
  layer = dict(dim_feedforward=f, dropout=0.0, activation='relu', batch_first=True, norm_first=False)
  input_proj, output_proj = torch.nn.Linear(size['in_channels'], d), torch.nn.Linear(d, size['in_channels'])
  encoder = [torch.nn.TransformerEncoderLayer(d, h, **layer).eval() for _ in model.encoder]
  decoder = [torch.nn.TransformerDecoderLayer(d, h, **layer).eval() for _ in model.decoder]
  with torch.no_grad():
    _copy_linear(input_proj, model.input_proj)
    _copy_linear(output_proj, model.output_proj)
    for ref, ours in zip(encoder, model.encoder):
      _copy_attention(ref.self_attn, ours.self_attn)
      _copy_linear(ref.linear1, ours.ffn.fc1), _copy_linear(ref.linear2, ours.ffn.fc2)
      _copy_norm(ref.norm1, ours.norm1), _copy_norm(ref.norm2, ours.norm2)
    for ref, ours in zip(decoder, model.decoder):
      _copy_attention(ref.self_attn, ours.self_attn)
      _copy_attention(ref.multihead_attn, ours.cross_attn)
      _copy_linear(ref.linear1, ours.ffn.fc1), _copy_linear(ref.linear2, ours.ffn.fc2)
      for i in (1, 2, 3):
        _copy_norm(getattr(ref, f'norm{i}'), getattr(ours, f'norm{i}'))
  return input_proj, encoder, decoder, output_proj


def _ffn(layer, x):
  return layer.linear2(torch_refs.require('torch').relu(layer.linear1(x)))


def _encode_with_pos(layer, x, pos, mask):
  """torch's post-norm encoder layer with the position added to queries and keys."""
  qk = x + pos
  x = layer.norm1(x + layer.self_attn(qk, qk, x, attn_mask=mask, need_weights=False)[0])
  return layer.norm2(x + _ffn(layer, x))


def _decode_with_pos(layer, tgt, memory, pos, mask):
  """torch's post-norm decoder layer with the position added to every attention's queries and keys."""
  qk = tgt + pos
  tgt = layer.norm1(tgt + layer.self_attn(qk, qk, tgt, attn_mask=mask, need_weights=False)[0])
  cross = layer.multihead_attn(tgt + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
  tgt = layer.norm2(tgt + cross)
  return layer.norm3(tgt + _ffn(layer, tgt))


def _reference(model: Reconstructor, size: dict, tokens: np.ndarray, with_pos: bool) -> np.ndarray:
  """tokens [B, H, W, C] -> the torch reconstruction [B, H, W, C]."""
  torch = torch_refs.require('torch')
  input_proj, encoder, decoder, output_proj = _torch_layers(model, size)
  b, hh, ww, c = tokens.shape
  pos = _tensor(model.pos_embed[...])[None]
  query = _tensor(model.aux_query[...])[None].expand(b, -1, -1)
  mask = model.attention_mask()   # ours: True = may attend; torch's bool attn_mask: True = may not
  mask = None if mask is None else _tensor(~np.asarray(mask))
  with torch.no_grad():
    memory = input_proj(_tensor(tokens.reshape(b, hh * ww, c)))
    for layer in encoder:
      memory = _encode_with_pos(layer, memory, pos, mask) if with_pos else layer(memory)
    tgt = query
    for layer in decoder:
      tgt = _decode_with_pos(layer, tgt, memory, pos, mask) if with_pos else layer(tgt, memory)
    return output_proj(tgt).numpy().reshape(b, hh, ww, c)


def _tokens(size: dict, batch: int = 2) -> np.ndarray:
  shape = (batch, *size['grid'], size['in_channels'])
  return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def _assert_close(ours, ref, label, record_property):
  diff = float(np.max(np.abs(np.asarray(ours) - ref)))
  print(f'\n{label}: max abs diff {diff:.2e} (max |torch| {np.max(np.abs(ref)):.2f})')
  record_property('max_abs_diff', diff)
  assert diff <= ATOL, f'{label}: max abs diff {diff:.3g} > {ATOL}'


@pytest.mark.parametrize('size', [TINY, PAPER], ids=['tiny', 'paper'])
def test_layers_match_torch_transformer_layers(size, record_property):
  """Position embedding zeroed: our encoder / decoder stack is torch's own layers' forward."""
  model = _ours(size)
  model.pos_embed[...] = jax.numpy.zeros_like(model.pos_embed[...])
  tokens = _tokens(size)
  _assert_close(_run(model, tokens), _reference(model, size, tokens, with_pos=False),
                'torch layers, no position', record_property)


@pytest.mark.parametrize('size,options', [
    (TINY, {}), (TINY, dict(neighbour_mask=3)), (PAPER, dict(pos_init='fourier', tie_qk_init=True))],
    ids=['tiny', 'tiny-neighbour-mask', 'paper-recipe'])
def test_matches_torch_with_positions_on_queries_and_keys(size, options, record_property):
  model = _ours(size, **options)
  tokens = _tokens(size)
  _assert_close(_run(model, tokens), _reference(model, size, tokens, with_pos=True),
                f'torch with positions {options}', record_property)
