r"""Normal-only vs anomaly-aware ADTR with identical budgets, on one MVTec-layout category, over seeds.

  python experiments/anomaly_aware.py --config=configs/magnetic_tile.py --workdir=workdirs/aware \
      --pretrain_epochs=6 --finetune_epochs=2 --num_labelled=5 --seeds=0,1,2

Per seed, stage 1 trains normal-only for --pretrain_epochs (shared by every variant of that seed).
Stage 2 continues each variant for --finetune_epochs from that checkpoint (the paper fine-tunes a
normal-only model):
  normal     L_norm on normal images (the baseline, same total budget)
  synthetic  L_px with synthetic anomalies (--synthetic)
  real_px    L_px with N real labelled anomalies per defect type (their masks)
  real_img   L_img with the same N anomalies, image labels only
Every variant of a seed is evaluated on the same test images: the N per defect type (drawn from the
seed) used by the real_* variants are removed from the test set of all four. Runs live in
<workdir>/seed<k>/{pretrain,<variant>}/ and are reused when done (a killed run resumes). Writes
<workdir>/anomaly_aware.md (mean ± std over seeds, the paper's figures and every way the setting
differs from the paper's) and prints it.
"""
import json
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import paper_table, sweep  # noqa: E402

VARIANTS = {
    'normal': dict(loss='mse', synthetic='none', labelled_use='exclude'),
    'synthetic': dict(loss='pixel', synthetic=None, labelled_use='exclude'),
    'real_px': dict(loss='pixel', synthetic='none', labelled_use='train'),
    'real_img': dict(loss='image', synthetic='none', labelled_use='train'),
}
KEYS = ('image_auroc', 'pixel_auroc', 'pixel_aupro')
# The paper's anomaly-aware figures (You et al. 2022; EfficientNet-B4, 500 epochs).
PAPER = ('The paper: MVTec-AD pixel AUROC 97.2 normal-only, 97.5 with anomalies; CIFAR-10 image AUROC '
         '94.7 normal-only, 96.1 with external anomalies.')


def variant_config(base, name: str, init_from: pathlib.Path, flags_):
  v, config = VARIANTS[name], base.copy_and_resolve_references()
  config.loss.type = v['loss']
  config.anomalies.synthetic = v['synthetic'] or flags_['synthetic']
  config.anomalies.num_labelled, config.anomalies.labelled_use = flags_['num_labelled'], v['labelled_use']
  config.init_from = str(init_from)
  config.train.num_epochs, config.train.lr_decay_epochs = flags_['finetune_epochs'], ()
  config.calibration.holdout_fraction = 0.0
  return config


def run_seed(base, category: str, workdir: pathlib.Path, seed: int, flags_: dict) -> dict:
  """{variant: the category's metrics} of one seed (trained unless its metrics.json exists)."""
  from adtr_jax import train
  seeded = base.copy_and_resolve_references()
  seeded.seed = seed
  pre = seeded.copy_and_resolve_references()
  pre.train.num_epochs, pre.train.lr_decay_epochs = flags_['pretrain_epochs'], ()
  pre.calibration.holdout_fraction = 0.0
  if not all((workdir / name / 'metrics.json').is_file() for name in VARIANTS):
    train.train(pre, category, workdir / 'pretrain' / category)
  out = {}
  for name in VARIANTS:
    done = workdir / name / 'metrics.json'
    if not done.is_file():
      train.train_and_evaluate(variant_config(seeded, name, workdir / 'pretrain', flags_), workdir / name)
    out[name] = json.loads(done.read_text())['categories'][category]
  return out


def table(per_seed: list[dict], header: str, deviations: list[str]) -> str:
  """Mean ± std over seeds of each variant's metrics, as markdown."""
  rows = []
  for name in VARIANTS:
    cells = [sweep.mean_std([r[name][key] for r in per_seed if key in r[name]]) for key in KEYS]
    tests = sorted({r[name]['num_test_images'] for r in per_seed})
    rows.append(f'| {name} | {len(per_seed)} | ' + ' | '.join(cells) + f' | {",".join(map(str, tests))} |')
  return '\n'.join([header, '', '| variant | seeds | image AUROC | pixel AUROC | pixel AUPRO | test images |',
                    '|---' * 6 + '|', *rows, '', PAPER,
                    'Differences from the paper: ' + ('; '.join(deviations) or 'none') + '.'])


def main(argv):
  del argv
  from adtr_jax.data import datasets
  base, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  (category,) = datasets.categories(base)
  flags_ = dict(pretrain_epochs=_PRE.value, finetune_epochs=_FT.value, num_labelled=_N.value,
                synthetic=_SYN.value)
  t0 = time.time()
  per_seed = [run_seed(base, category, workdir / f'seed{s}', int(s), flags_) for s in _SEEDS.value]
  header = (f'Category `{category}`: {_PRE.value} normal-only epochs, then {_FT.value} epochs per variant; '
            f'N = {_N.value} real anomalies per defect type; synthetic = {_SYN.value}; seeds '
            f'{",".join(_SEEDS.value)}; {(time.time() - t0) / 60:.1f} min in this invocation.')
  as_run = base.copy_and_resolve_references()   # what every variant saw: both stages, no hold-out
  as_run.train.num_epochs, as_run.calibration.holdout_fraction = _PRE.value + _FT.value, 0.0
  text = table(per_seed, header, paper_table.deviations(as_run, 'mvtec'))
  (workdir / 'anomaly_aware.md').write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  # Flags only here, so that tests and other scripts can import this module.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config (one category).',
                                            lock_config=False)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (resumable).')
  _PRE = flags.DEFINE_integer('pretrain_epochs', 6, 'Normal-only epochs shared by all variants of a seed.')
  _FT = flags.DEFINE_integer('finetune_epochs', 2, 'Epochs of each variant after the shared stage.')
  _N = flags.DEFINE_integer('num_labelled', 5, 'Real labelled anomalies per defect type.')
  _SYN = flags.DEFINE_string('synthetic', 'confetti,cutpaste', 'Generators for the synthetic variant.')
  _SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (each: its own shared stage and labelled draw).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
