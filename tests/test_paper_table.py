"""experiments/paper_table.py: per-category mean ± std over seeds, the paper's mean, the deviations."""
import pytest

from experiments import paper_table
from tests.conftest import tiny_config


@pytest.mark.slow
def test_table_lists_categories_paper_mean_and_deviations(toy_root, tmp_path):
  config = tiny_config(toy_root, tmp_path / 'cache', num_epochs=1)
  text = paper_table.run(config, 'mvtec', tmp_path / 'w', seeds=[0, 1])
  assert (tmp_path / 'w' / 'seed0' / 'metrics.json').is_file()
  assert (tmp_path / 'w' / 'seed1' / 'metrics.json').is_file()
  rows = {line.split('|')[1].strip(): line for line in text.splitlines() if line.startswith('| ')}
  assert set(rows) == {'category', 'toy', 'mean'}
  assert '± ' in rows['toy'] and '96.4' in rows['mean'] and '97.2' in rows['mean']
  assert "backbone.arch: 'efficientnet_lite0' (paper: 'efficientnet_b4')" in text
  assert 'dataset.image_size: 64 (paper: 256)' in text
  assert (tmp_path / 'w' / 'table.md').read_text().strip() == text.strip()
  # Finished seeds are reused, not retrained: a second call gives the same table.
  assert paper_table.run(config, 'mvtec', tmp_path / 'w', seeds=[0, 1]) == text
