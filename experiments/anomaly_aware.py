r"""Normal-only vs anomaly-aware ADTR with identical budgets, on the categories of a config, over seeds.

  python experiments/anomaly_aware.py --config=configs/magnetic_tile.py --workdir=workdirs/aware \
      --pretrain_epochs=6 --finetune_epochs=2 --num_labelled=5 --seeds=0,1,2
  python experiments/anomaly_aware.py --config=configs/cifar10.py --workdir=workdirs/cifar10_aware \
      --variants=normal,external --external_dir=DIR --num_labelled=0 --finetune_epochs=0 \
      --pretrained='workdirs/cifar10/base/seed{seed}' --seeds=0

Per seed, stage 1 trains normal-only for --pretrain_epochs (shared by every variant of that seed), or
--pretrained names finished normal-only runs to start from instead (a workdir per seed, `{seed}` filled
in, holding <category>/checkpoints: e.g. a sweep's runs). Stage 2 continues each variant for
--finetune_epochs (0: the config's train.min_steps steps, equal for every variant) from that checkpoint
(the paper fine-tunes a normal-only model):
  normal     L_norm on normal images (the baseline, same total budget)
  synthetic  L_px with synthetic anomalies (--synthetic)
  real_px    L_px with N real labelled anomalies per defect type (their masks)
  real_img   L_img with the same N anomalies, image labels only
  external   L_img with irrelevant images from --external_dir as anomalies (the paper's CIFAR-10 setting)
Every variant of a seed is evaluated on the same test images: the N per defect type (drawn from the
seed) used by the real_* variants are removed from the test set of all of them. Runs live in
<workdir>/seed<k>/{pretrain,<variant>}/ and are reused when done (a killed run resumes). Writes
<workdir>/anomaly_aware.md (mean ± std over seeds per category and variant, with the mean over
categories when there are several, the paper's figures and every way the setting differs from the
paper's) and prints it.
"""
import json
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adtr_jax import errors, paths  # noqa: E402
from experiments import paper_table, sweep  # noqa: E402

VARIANTS = {
    'normal': dict(loss='mse', synthetic='none', labelled_use='exclude'),
    'synthetic': dict(loss='pixel', synthetic=None, labelled_use='exclude'),
    'real_px': dict(loss='pixel', synthetic='none', labelled_use='train'),
    'real_img': dict(loss='image', synthetic='none', labelled_use='train'),
    'external': dict(loss='image', synthetic='none', labelled_use='exclude', external=True),
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
  config.anomalies.external_dir = flags_['external_dir'] if v.get('external') else ''
  config.init_from = str(init_from)
  config.train.num_epochs, config.train.lr_decay_epochs = flags_['finetune_epochs'], ()
  config.calibration.holdout_fraction = 0.0
  return config


def stage_one(base, categories: list[str], workdir: pathlib.Path, seed: int, flags_: dict,
              variants_done: bool) -> pathlib.Path:
  """The normal-only runs (<dir>/<category>/checkpoints) that every variant of `seed` starts from:
  --pretrained's (checked), or trained here for --pretrain_epochs unless all variants are done."""
  if flags_['pretrained']:
    pre = pathlib.Path(flags_['pretrained'].format(seed=seed))
    missing = [c for c in categories if not paths.checkpoints(pre / c).is_dir()]
    if missing:
      raise app.UsageError(f'--pretrained: {pre} has no run of {", ".join(missing)} '
                           f'(expected {paths.checkpoints(pre / missing[0])})')
    return pre
  from adtr_jax import train
  pre = base.copy_and_resolve_references()
  pre.train.num_epochs, pre.train.lr_decay_epochs = flags_['pretrain_epochs'], ()
  pre.calibration.holdout_fraction = 0.0
  pre.dataset.category = ','.join(categories)
  if not variants_done:   # the categories' normal-only models, stacked where they can be
    train.train_runs([(workdir / 'pretrain', pre)], evaluate_after=False)
  return workdir / 'pretrain'


def run_seed(base, categories: list[str], workdir: pathlib.Path, seed: int, flags_: dict) -> dict:
  """{variant: {category: metrics}, plus 'mean' over several categories} of one seed (each variant
  trained unless its metrics.json exists)."""
  from adtr_jax import train
  seeded = base.copy_and_resolve_references()
  seeded.seed = seed
  done = {name: workdir / name / 'metrics.json' for name in flags_['variants']}
  init_from = stage_one(seeded, categories, workdir, seed, flags_, all(d.is_file() for d in done.values()))
  out = {}
  for name, path in done.items():
    if not path.is_file():
      train.train_and_evaluate(variant_config(seeded, name, init_from, flags_), workdir / name)
    out[name] = sweep.report_rows(json.loads(path.read_text()))
  return out


def table(per_seed: list[dict], categories: list[str], header: str, deviations: list[str]) -> str:
  """Mean ± std over seeds of each (category, variant)'s metrics, as markdown; with several categories
  also their mean (taken per seed, then over seeds)."""
  rows = []
  for category in categories + (['mean'] if len(categories) > 1 else []):
    for name in per_seed[0]:
      runs = [r[name][category] for r in per_seed]
      cells = [sweep.mean_std([m[key] for m in runs if key in m]) for key in KEYS]
      tests = ','.join(map(str, sorted({m['num_test_images'] for m in runs if 'num_test_images' in m})))
      rows.append(f'| {category} | {name} | {len(per_seed)} | ' + ' | '.join(cells) + f' | {tests or "-"} |')
  return '\n'.join([header, '', '| category | variant | seeds | image AUROC | pixel AUROC | pixel AUPRO '
                    '| test images |', '|---' * 7 + '|', *rows, '', PAPER,
                    'Differences from the paper: ' + ('; '.join(deviations) or 'none') + '.'])


def _setting(flags_: dict, min_steps: int) -> str:
  """The two stages and each variant's anomalies, in words (only what the chosen variants use)."""
  stage1 = (f'stage 1 = the runs in {flags_["pretrained"]}' if flags_['pretrained']
            else f'{flags_["pretrain_epochs"]} normal-only epochs')
  parts = [f'{stage1}, then {flags_["finetune_epochs"]} epochs (at least {min_steps} steps) per variant']
  variants = flags_['variants']
  if 'synthetic' in variants:
    parts.append(f'synthetic = {flags_["synthetic"]}')
  if {'real_px', 'real_img'} & set(variants):
    parts.append(f'N = {flags_["num_labelled"]} real anomalies per defect type')
  if 'external' in variants:
    parts.append(f'external = {flags_["external_dir"]}')
  return '; '.join(parts)


def main(argv):
  del argv
  from adtr_jax.data import datasets
  base, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  categories = datasets.categories(base)
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown or not _VARIANTS.value:
    raise app.UsageError(f'--variants: {unknown or "none given"}; choose from {", ".join(VARIANTS)}')
  if 'external' in _VARIANTS.value and not _EXT.value:
    raise app.UsageError('--variants=external needs --external_dir (a folder of irrelevant images)')
  flags_ = dict(pretrain_epochs=_PRE.value, finetune_epochs=_FT.value, num_labelled=_N.value,
                synthetic=_SYN.value, variants=list(_VARIANTS.value), external_dir=_EXT.value,
                pretrained=_PRETRAINED.value)
  t0 = time.time()
  per_seed = [run_seed(base, categories, workdir / f'seed{s}', int(s), flags_) for s in _SEEDS.value]
  header = f'Categories {", ".join(categories)}: {_setting(flags_, base.train.min_steps)}; seeds ' \
           f'{",".join(_SEEDS.value)}; {(time.time() - t0) / 60:.1f} min in this invocation.'
  as_run = base.copy_and_resolve_references()   # what every variant saw: both stages, no hold-out
  as_run.train.num_epochs, as_run.calibration.holdout_fraction = _PRE.value + _FT.value, 0.0
  deviations = paper_table.deviations(as_run, _PAPER.value)
  if _PRETRAINED.value:   # stage 1's budget and hold-out are those of the given runs, unknown here
    deviations = [d for d in deviations if not d.startswith(('train.num_epochs', 'calibration.'))] + [
        "the budget: the --pretrained runs' own, then stage 2 (paper: 500 epochs)"]
  text = table(per_seed, categories, header, deviations)
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
  _VARIANTS = flags.DEFINE_list('variants', ['normal', 'synthetic', 'real_px', 'real_img'],
                                f'Stage-2 variants, of: {", ".join(VARIANTS)}.')
  _EXT = flags.DEFINE_string('external_dir', '', 'Folder of irrelevant images for the external variant.')
  _PRETRAINED = flags.DEFINE_string('pretrained', '', 'Finished normal-only runs to use as stage 1, a '
                                    'workdir per seed with {seed} in the path (empty: train stage 1 here).')
  _PAPER = flags.DEFINE_enum('paper', 'mvtec', list(paper_table.PAPER), 'The paper table whose setting '
                             'the deviations are listed against.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(errors.reporting(main))
