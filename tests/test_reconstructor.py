"""The reconstruction transformer's structure and behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adtr_jax import defaults
from adtr_jax.models import ablations, adtr, reconstructor
from adtr_jax.models.reconstructor import Reconstructor


def _model(aux_query=True, dropout=0.1):
  return Reconstructor(12, (3, 4), hidden_dim=16, num_encoder_layers=2, num_decoder_layers=2,
                       num_heads=4, ffn_dim=32, dropout=dropout, aux_query=aux_query, rngs=nnx.Rngs(0))


def test_paper_defaults():
  m = Reconstructor(720, (16, 16), rngs=nnx.Rngs(0))
  assert m.input_proj.kernel.shape == (720, 256) and m.output_proj.kernel.shape == (256, 720)
  assert len(m.encoder) == 4 and len(m.decoder) == 4
  assert m.pos_embed.shape == (256, 256) and m.aux_query.shape == (256, 256)
  assert m.encoder[0].ffn.fc1.kernel.shape == (256, 1024)
  assert m.encoder[0].self_attn.num_heads == 8 and m.encoder[0].self_attn.query.kernel.shape == (256, 256)


def test_shapes_and_dropout():
  m = _model()
  x = jax.random.normal(jax.random.key(1), (2, 3, 4, 12))
  y = m(x)
  assert y.shape == x.shape
  np.testing.assert_array_equal(y, m(x))  # deterministic by default
  a = m(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  b = m(x, deterministic=False, rngs=nnx.Rngs(dropout=2))
  assert not np.allclose(a, b)


def _decoder_input(model, x, monkeypatch):
  """What the first decoder layer receives as its input and its position: (tgt, pos) [B, T, D]."""
  seen = []
  original = reconstructor.DecoderLayer.__call__

  def spy(layer, tgt, memory, pos, **kw):
    seen.append((np.asarray(tgt), np.asarray(pos)))
    return original(layer, tgt, memory, pos, **kw)
  with monkeypatch.context() as patch:
    patch.setattr(reconstructor.DecoderLayer, '__call__', spy)
    model(x)
  return seen[0]


def test_aux_query_decouples_decoder_input_from_tokens(monkeypatch):
  """With the auxiliary query, the decoder's input is the learned query (its position is added inside
  every attention), the same whatever the tokens, so it cannot copy an anomalous token through; only
  the memory carries the tokens. aux_query=False feeds it the encoder output, which does change."""
  with_q, without_q = _model(True, 0.0), _model(False, 0.0)
  assert with_q.aux_query is not None and without_q.aux_query is None
  x1 = jax.random.normal(jax.random.key(1), (2, 3, 4, 12))
  x2 = jax.random.normal(jax.random.key(2), (2, 3, 4, 12))
  (tgt1, pos1), (tgt2, pos2) = (_decoder_input(with_q, x, monkeypatch) for x in (x1, x2))
  np.testing.assert_array_equal(tgt1, tgt2)
  np.testing.assert_array_equal(pos1, pos2)
  np.testing.assert_array_equal(tgt1, np.broadcast_to(with_q.aux_query[...], tgt1.shape))
  assert not np.allclose(with_q(x1), with_q(x2))   # the output still depends on the tokens
  tgt1, tgt2 = (_decoder_input(without_q, x, monkeypatch)[0] for x in (x1, x2))
  assert np.abs(tgt1 - tgt2).max() > 0.1


def test_every_model_field_reaches_the_reconstructor_by_name():
  """build_model passes each config.model field the class takes, under its own name: a field added to
  defaults.py but not to the class (or misspelt in either) fails here instead of being ignored."""
  model = defaults.get_config().model
  options = adtr.reconstructor_options(Reconstructor, model)
  assert set(model) - set(options) == {'type', 'target', 'feature_norm'}   # build_model reads these
  assert options == {name: model[name] for name in options}
  mlp = adtr.reconstructor_options(ablations.TokenMLP, model)
  assert set(mlp) == {'hidden_dim', 'num_encoder_layers', 'num_decoder_layers', 'ffn_dim', 'dropout'}


def test_build_model_applies_the_model_fields():
  config = defaults.get_config()
  config.dataset.image_size, config.backbone.out_stride = 32, 8
  config.model.update(target='pixels', hidden_dim=16, num_heads=2, ffn_dim=24, num_encoder_layers=1,
                      num_decoder_layers=3, dtype='bfloat16', neighbour_mask=3, aux_query=False)
  r = adtr.build_model(config)[0].reconstructor
  assert (len(r.encoder), len(r.decoder), r.encoder[0].self_attn.num_heads) == (1, 3, 2)
  assert r.encoder[0].ffn.fc1.kernel.shape == (16, 24) and r.aux_query is None
  assert r.dtype == jnp.bfloat16 and r.neighbour_mask == 3
  assert r(jnp.zeros((1, 4, 4, 192))).dtype == jnp.float32


def test_grid_mismatch_is_a_clear_error():
  with pytest.raises(ValueError, match='image_size'):
    _model()(jnp.zeros((1, 4, 4, 12)))
  with pytest.raises(ValueError, match='num_heads'):
    Reconstructor(8, (2, 2), hidden_dim=30, num_heads=8, rngs=nnx.Rngs(0))


def test_tied_qk_init_starts_with_position_matched_attention():
  """tie_qk_init: every key projection starts equal to its query projection (then trains freely), so
  the decoder's cross-attention from query position i already peaks at memory position i."""
  kw = dict(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, ffn_dim=32,
            dropout=0.0)
  tied = Reconstructor(8, (4, 4), tie_qk_init=True, rngs=nnx.Rngs(0), **kw)
  free = Reconstructor(8, (4, 4), tie_qk_init=False, rngs=nnx.Rngs(0), **kw)
  for m, same in ((tied, True), (free, False)):
    attn = m.decoder[0].cross_attn
    assert np.array_equal(attn.key.kernel[...], attn.query.kernel[...]) == same

  def diagonal_mass(m):
    attn, pos = m.decoder[0].cross_attn, m.pos_embed[...]
    q = attn.query(m.aux_query[...] + pos).reshape(16, 4, 8)
    k = attn.key(pos).reshape(16, 4, 8)
    weights = jax.nn.softmax(jnp.einsum('ihd,jhd->hij', q, k) / np.sqrt(8), axis=-1)
    return float(jnp.mean(jnp.diagonal(weights, axis1=1, axis2=2)))

  assert diagonal_mass(tied) > 3 * diagonal_mass(free)


def test_neighbour_mask_hides_each_tokens_window():
  """model.neighbour_mask=3 on a 3 x 4 grid: an attention output at a token does not depend on the
  values in its 3 x 3 window and does depend on the rest (gradients through the value input)."""
  m = Reconstructor(12, (3, 4), hidden_dim=16, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                    ffn_dim=32, dropout=0.0, neighbour_mask=3, rngs=nnx.Rngs(0))
  mask = m.attention_mask()
  assert mask.shape == (12, 12) and not mask[5, 5] and not mask[5, 0] and mask[5, 3]   # 5 = (1, 1)
  attn = m.encoder[0].self_attn
  x = jax.random.normal(jax.random.key(0), (1, 12, 16))
  grad = jax.grad(lambda v: attn(x, x, v, deterministic=True, rngs=None, mask=mask)[0, 5].sum())(x)
  touched = np.abs(np.asarray(grad[0])).sum(-1) > 0
  np.testing.assert_array_equal(touched, np.asarray(mask[5]))
  assert _model().attention_mask() is None   # off by default (ADTR has no mask)


def test_feature_jitter_only_perturbs_training_inputs():
  x = jax.random.normal(jax.random.key(1), (2, 3, 4, 12))
  kw = dict(hidden_dim=16, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, ffn_dim=32,
            dropout=0.0)
  plain = Reconstructor(12, (3, 4), **kw, rngs=nnx.Rngs(0))
  jittered = Reconstructor(12, (3, 4), **kw, feature_jitter=20.0, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(plain(x), jittered(x))           # evaluation: no jitter
  train = dict(deterministic=False)
  np.testing.assert_array_equal(plain(x, **train, rngs=nnx.Rngs(dropout=3)),
                                plain(x, **train, rngs=nnx.Rngs(dropout=4)))   # dropout 0: no noise
  assert not np.allclose(jittered(x, **train, rngs=nnx.Rngs(dropout=3)),
                         plain(x, **train, rngs=nnx.Rngs(dropout=3)))


def test_fourier_position_init_is_a_one_token_gaussian_kernel():
  """pos_init='fourier': unit-variance position codes whose similarity falls with grid distance as
  exp(-d^2 / 2) (sampled, so within a tolerance), where 'normal' draws are ~0 for every other
  position; every other parameter gets the same initial values either way."""
  kw = dict(hidden_dim=512, num_encoder_layers=1, num_decoder_layers=1, num_heads=8, ffn_dim=32,
            dropout=0.0)
  smooth = Reconstructor(8, (6, 6), pos_init='fourier', rngs=nnx.Rngs(0), **kw)
  plain = Reconstructor(8, (6, 6), pos_init='normal', rngs=nnx.Rngs(0), **kw)

  def similarity(m):
    p = np.asarray(m.pos_embed[...])
    return p @ p.T / p.shape[1], p.var()

  gram, var = similarity(smooth)
  assert abs(var - 1) < 0.1
  centre = 2 * 6 + 2                                # (2, 2); (2, 3) is 1 token away, (2, 5) 3 tokens
  assert abs(gram[centre, centre + 1] - np.exp(-0.5)) < 0.15
  assert abs(gram[centre, centre + 7] - np.exp(-1.0)) < 0.15
  assert abs(gram[centre, centre + 3]) < 0.15
  plain_gram, _ = similarity(plain)
  assert abs(plain_gram[centre, centre + 1]) < 0.15
  same = jax.tree.map(np.array_equal, nnx.state(smooth, nnx.Param), nnx.state(plain, nnx.Param))
  assert not same['pos_embed'].get_value()
  del same['pos_embed']
  assert all(jax.tree.leaves(same))
  with pytest.raises(ValueError, match='pos_init'):
    Reconstructor(8, (2, 2), hidden_dim=16, num_heads=4, pos_init='sine', rngs=nnx.Rngs(0))
