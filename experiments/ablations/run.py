r"""The paper's ablations on one MVTec-layout category, with identical budgets; writes a markdown table.

  python experiments/ablations/run.py --config=configs/magnetic_tile.py --workdir=workdirs/ablations \
      --num_epochs=2 --image_size=224

Variants (experiments/ablations/variants.py): the backbone, last layer vs multi-scale, no auxiliary
query, MLP/CNN instead of attention, pixels instead of features. B0/B4/ResNet variants need weights:
--weights_dir holding <arch>.npz / .pth / .safetensors (e.g. resnet18.pth). --seeds trains each
variant once per seed (<workdir>/<variant>/seed<k>/); the table gives mean ± std over them. Variants
and seeds that differ only in numbers train together as stacked models (adtr_jax/train.py; most
ablations change shapes, so they form their own groups). Resumable: a run with a metrics.json is not
retrained. Writes <workdir>/ablations.md.
"""
import json
import pathlib
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from adtr_jax import errors  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments.ablations import variants  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config (one category).',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (one sub-directory per variant).')
_VARIANTS = flags.DEFINE_list('variants', list(variants.DEFAULT), 'Variants to run, in table order.')
_EPOCHS = flags.DEFINE_integer('num_epochs', 2, 'Training epochs of every variant.')
_SIZE = flags.DEFINE_integer('image_size', 0, 'Input size for every variant (0: the base config\'s).')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds of every variant.')
_WEIGHTS_DIR = flags.DEFINE_string('weights_dir', '', 'Checkpoints for archs without packaged weights.')
flags.mark_flags_as_required(['config', 'workdir'])


def _weights_for(arch: str) -> str:
  found = sorted(pathlib.Path(_WEIGHTS_DIR.value).glob(f'{arch}.*')) if _WEIGHTS_DIR.value else []
  if not found:
    raise app.UsageError(f'backbone {arch} needs weights: put {arch}.pth (or .npz/.safetensors) in '
                         '--weights_dir')
  return str(found[0])


def variant_config(base, name: str):
  config = variants.apply(base, name)
  config.train.num_epochs, config.train.lr_decay_epochs = _EPOCHS.value, ()
  config.calibration.holdout_fraction = 0.0
  if _SIZE.value:
    config.dataset.image_size = _SIZE.value
  if config.backbone.arch in variants.NEEDS_WEIGHTS and config.model.target == 'features':
    config.backbone.weights = _weights_for(config.backbone.arch)
  return config


KEYS = ('image_auroc', 'pixel_auroc', 'pixel_aupro')


def _row(name: str, config, reports: list[dict], minutes: float) -> str:
  b, m = config.backbone, config.model
  embedding = (f'{b.arch}, {"+".join(b.layers)}' if m.target == 'features'
               else f'pixels, {b.out_stride}x{b.out_stride} patches')
  setup = f'{embedding}, {m.type}, aux query {"on" if m.aux_query else "off"}'
  cells = [sweep.mean_std([r[key] for r in reports if key in r]) for key in KEYS]   # a diverged run: none
  return f'| {name} | {setup} | {len(reports)} | ' + ' | '.join(cells) + f' | {minutes:.1f} |'


def main(argv):
  del argv
  from adtr_jax import train
  from adtr_jax.data import datasets
  base, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  (category,) = datasets.categories(base)
  configs = {name: variant_config(base, name) for name in _VARIANTS.value}  # bad names fail first
  runs = {(name, seed): workdir / name / f'seed{seed}' for name in configs for seed in _SEEDS.value}
  pending = []
  for (name, seed), run_dir in runs.items():
    if not (run_dir / 'metrics.json').is_file():
      config = configs[name].copy_and_resolve_references()
      config.seed = int(seed)
      pending.append((run_dir, config))
  try:
    train.train_runs(pending)
    diverged = None
  except errors.Diverged as e:   # the other variants trained and were evaluated: their table first
    diverged = e
  rows = []
  for name, config in configs.items():
    reports = [json.loads((runs[name, s] / 'metrics.json').read_text()) for s in _SEEDS.value]
    rows.append(_row(name, config, [r['categories'][category] for r in reports],
                     float(np.mean([r['minutes'] for r in reports]))))
  size = _SIZE.value or base.dataset.image_size
  table = '\n'.join([
      f'Category `{category}`, {size} px, {_EPOCHS.value} epochs per variant, batch '
      f'{base.train.batch_size}, seeds {",".join(_SEEDS.value)} (mean ± std); min = train + eval time '
      'per run (stacked runs: their group\'s time over its models).', '',
      '| variant | backbone, layers, reconstructor, aux query | seeds | image AUROC | pixel AUROC | '
      'pixel AUPRO | min |', '|---|---|---|---|---|---|---|', *rows])
  (workdir / 'ablations.md').write_text(table + '\n')
  (workdir / 'ablations.json').write_text(json.dumps(
      {name: c.to_dict() for name, c in configs.items()}, indent=1, default=str))
  print(table)
  if diverged:
    raise diverged


if __name__ == '__main__':
  app.run(errors.reporting(main))
