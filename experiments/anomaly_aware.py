r"""Normal-only vs anomaly-aware ADTR with identical budgets, on one MVTec-layout category.

  python experiments/anomaly_aware.py --config=configs/magnetic_tile.py --workdir=workdirs/aware \
      --pretrain_epochs=6 --finetune_epochs=2 --num_labelled=5

Stage 1 trains normal-only for --pretrain_epochs (shared by every variant). Stage 2 continues each
variant for --finetune_epochs from that checkpoint (the paper fine-tunes a normal-only model):
  normal     L_norm on normal images (the baseline, same total budget)
  synthetic  L_px with synthetic anomalies (--synthetic)
  real_px    L_px with N real labelled anomalies per defect type (their masks)
  real_img   L_img with the same N anomalies, image labels only
Every variant is evaluated on the same test images: the N per defect type used by the real_* variants
are removed from the test set of all four. Writes <workdir>/anomaly_aware.md (and prints it).
"""
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config (one category).',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (resumable).')
_PRE = flags.DEFINE_integer('pretrain_epochs', 6, 'Normal-only epochs shared by all variants.')
_FT = flags.DEFINE_integer('finetune_epochs', 2, 'Epochs of each variant after the shared stage.')
_N = flags.DEFINE_integer('num_labelled', 5, 'Real labelled anomalies per defect type.')
_SYN = flags.DEFINE_string('synthetic', 'confetti,cutpaste', 'Generators for the synthetic variant.')
flags.mark_flags_as_required(['config', 'workdir'])

VARIANTS = {
    'normal': dict(loss='mse', synthetic='none', labelled_use='exclude'),
    'synthetic': dict(loss='pixel', synthetic=None, labelled_use='exclude'),
    'real_px': dict(loss='pixel', synthetic='none', labelled_use='train'),
    'real_img': dict(loss='image', synthetic='none', labelled_use='train'),
}


def variant_config(base, name: str, init_from: pathlib.Path):
  v, config = VARIANTS[name], base.copy_and_resolve_references()
  config.loss.type = v['loss']
  config.anomalies.synthetic = v['synthetic'] or _SYN.value
  config.anomalies.num_labelled, config.anomalies.labelled_use = _N.value, v['labelled_use']
  config.init_from = str(init_from)
  config.train.num_epochs, config.train.lr_decay_epochs = _FT.value, ()
  config.calibration.holdout_fraction = 0.0
  return config


def main(argv):
  del argv
  from adtr_jax import train
  from adtr_jax.data import datasets
  base, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  (category,) = datasets.categories(base)
  pre = base.copy_and_resolve_references()
  pre.train.num_epochs, pre.train.lr_decay_epochs = _PRE.value, ()
  pre.calibration.holdout_fraction = 0.0
  t0 = time.time()
  train.train(pre, category, workdir / 'pretrain' / category)
  rows = []
  for name in VARIANTS:
    config = variant_config(base, name, workdir / 'pretrain')
    report = train.train_and_evaluate(config, workdir / name)['eval']['categories'][category]
    rows.append(f'| {name} | {100 * report["image_auroc"]:.1f} | {100 * report["pixel_auroc"]:.1f} | '
                f'{100 * report["pixel_aupro"]:.1f} | {report["num_test_images"]} |')
  table = '\n'.join([
      f'Category `{category}`: {_PRE.value} normal-only epochs, then {_FT.value} epochs per variant; '
      f'N = {_N.value} real anomalies per defect type; synthetic = {_SYN.value}; '
      f'{(time.time() - t0) / 60:.1f} min.', '',
      '| variant | image AUROC | pixel AUROC | pixel AUPRO | test images |', '|---|---|---|---|---|',
      *rows])
  (workdir / 'anomaly_aware.md').write_text(table + '\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
