"""Ablation models (MLP/CNN reconstructors, pixel targets, no auxiliary query) and the ablation runner."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adtr_jax.models import ablations, adtr
from experiments.ablations import variants
from tests.conftest import REPO, tiny_config


def test_pixel_embedding_cuts_patches():
  images = jax.random.uniform(jax.random.key(0), (2, 16, 24, 3))
  patches = ablations.PixelEmbedding(8)(images)
  assert patches.shape == (2, 2, 3, 8 * 8 * 3)
  # Patch (1, 2) of image 1 is the 8x8 block at rows 8..15, columns 16..23, flattened row-major.
  expected = ((images[1, 8:16, 16:24] - 0.5) / 0.25).reshape(-1)
  np.testing.assert_allclose(patches[1, 1, 2], expected, rtol=1e-6)


@pytest.mark.parametrize('cls', [ablations.TokenMLP, ablations.ConvNet])
def test_block_reconstructors_shapes_and_mixing(cls):
  model = cls(12, (4, 4), hidden_dim=16, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32,
              dropout=0.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 12))
  y = model(x)
  assert y.shape == x.shape
  # Changing one token changes only that token's output for the MLP, also its neighbours for the CNN.
  y2 = model(x.at[0, 1, 1].add(1.0))
  changed = np.argwhere(np.any(np.abs(np.asarray(y2 - y)) > 1e-6, axis=-1))
  expect = {(0, 1, 1)} if cls is ablations.TokenMLP else {
      (0, i, j) for i in range(4) for j in range(4) if abs(i - 1) <= 2 and abs(j - 1) <= 2}
  assert {tuple(c) for c in changed} == expect


@pytest.mark.parametrize('name', ['mlp', 'cnn', 'pixels', 'no_aux_query', 'last_layer'])
def test_variants_build_and_run(name, toy_root, tmp_path):
  config = variants.apply(tiny_config(toy_root, tmp_path), name)
  model, info = adtr.build_model(config)
  f, f_hat = model(jnp.zeros((1, 64, 64, 3)))
  assert f.shape == f_hat.shape and f.shape[:3] == (1, 8, 8)
  if name == 'pixels':
    assert f.shape[-1] == 8 * 8 * 3 and info['arch'] == 'pixels'
  if name == 'last_layer':
    assert f.shape[-1] == 320   # Lite0 layer5 only
  if name == 'no_aux_query':
    assert model.reconstructor.aux_query is None


def test_bad_model_fields_are_named(toy_root, tmp_path):
  config = tiny_config(toy_root, tmp_path)
  config.model.type = 'rnn'
  with pytest.raises(ValueError, match='model.type'):
    adtr.build_model(config)
  config.model.type, config.model.target = 'transformer', 'voxels'
  with pytest.raises(ValueError, match='model.target'):
    adtr.build_model(config)
  config.model.target, config.model.dtype = 'features', 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    adtr.build_model(config)
  with pytest.raises(ValueError, match='unknown ablation variant'):
    variants.apply(config, 'nope')


@pytest.mark.slow
def test_ablation_runner_writes_a_table(toy_root, tmp_path):
  """Two variants x two seeds: each variant's seeds train stacked (a variant changes shapes, so the
  variants form separate groups); the table gives each variant's mean ± std over its seeds."""
  workdir = tmp_path / 'abl'
  arg = f'{toy_root}|{tmp_path / "cache"}'
  cmd = [sys.executable, 'experiments/ablations/run.py', f'--config=tests/tiny_config.py:{arg}',
         f'--workdir={workdir}', '--variants=adtr,pixels', '--num_epochs=1', '--seeds=0,1']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count('training 2 stacked models') == 2   # one group per variant
  table = (workdir / 'ablations.md').read_text()
  rows = [line for line in table.splitlines() if line.startswith('| adtr') or line.startswith('| pixels')]
  assert len(rows) == 2
  for row, name in zip(rows, ('adtr', 'pixels')):
    reports = [json.loads((workdir / name / f'seed{s}' / 'metrics.json').read_text()) for s in (0, 1)]
    assert [r['stacked_models'] for r in reports] == [2, 2]
    values = [100 * r['categories']['toy']['image_auroc'] for r in reports]
    cells = row.split('|')
    assert cells[3].strip() == '2'
    assert cells[4].strip() == f'{np.mean(values):.1f} ± {np.std(values):.1f}'
  assert json.loads((workdir / 'ablations.json').read_text())['pixels']['model']['target'] == 'pixels'
