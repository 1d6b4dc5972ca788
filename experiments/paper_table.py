r"""A paper table with ours beside it: MVTec-AD per category, or CIFAR-10 one-class per class.

  python experiments/paper_table.py --table=mvtec --config=mvtec --workdir=workdirs/table_mvtec \
      --seeds=0,1,2 --config.dataset.root=/data/mvtec_ad
  python experiments/paper_table.py --table=cifar10 --config=cifar10 --workdir=workdirs/table_cifar10

Each seed trains and evaluates every category of the config (a file or a shipped name; any field can be
overridden) in <workdir>/seed<k>/, reused when its metrics.json exists. <workdir>/table.md then lists, per category, our mean ± std over the seeds, the paper's
figure where we have it, and every way the run differs from the paper's setting.
"""
import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adtr_jax import config_files, errors  # noqa: E402
from experiments import sweep  # noqa: E402

# The paper's figures (You et al. 2022). Only the means are transcribed here; per-category columns are
# left to be filled from the paper's tables, so a missing one shows as '-' rather than a guess.
PAPER = {
    'mvtec': {'keys': ('image_auroc', 'pixel_auroc'),
              'mean': {'image_auroc': 96.4, 'pixel_auroc': 97.2},
              'setting': {'backbone.arch': 'efficientnet_b4', 'dataset.image_size': 256}},
    'cifar10': {'keys': ('image_auroc',), 'mean': {'image_auroc': 94.7},
                'setting': {'backbone.arch': 'efficientnet_b4'}},
}
# The paper's training setting, shared by both tables.
PAPER_TRAINING = {'train.num_epochs': 500, 'train.learning_rate': 1e-4, 'train.schedule': 'step',
                  'model.feature_norm': 'none', 'model.tie_qk_init': False, 'model.dropout': 0.1,
                  'model.pos_init': 'normal',
                  'calibration.holdout_fraction': 0.0}


def _field(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def deviations(config, table: str) -> list[str]:
  """Every config field that differs from the paper's setting for `table`, as 'field: ours (paper x)'."""
  setting = {**PAPER_TRAINING, **PAPER[table]['setting']}
  return [f'{k}: {_field(config, k)!r} (paper: {v!r})' for k, v in setting.items()
          if _field(config, k) != v]


def run(config, table: str, workdir: pathlib.Path, seeds: list[int]) -> str:
  """Trains/evaluates every seed (reusing finished ones), writes workdir/table.md and returns it."""
  from adtr_jax import train
  reports = []
  for seed in seeds:
    run_dir = workdir / f'seed{seed}'
    done = run_dir / 'metrics.json'
    if not done.is_file():
      seeded = config.copy_and_resolve_references()
      seeded.seed = seed
      train.train_and_evaluate(seeded, run_dir)   # writes metrics.json
    reports.append(json.loads(done.read_text()))
  keys, paper = PAPER[table]['keys'], PAPER[table]['mean']
  lines = ['| category | ' + ' | '.join(f'ours {k} | paper {k}' for k in keys) + ' |',
           '|---' * (2 * len(keys) + 1) + '|']
  names = list(reports[0]['categories']) + ['mean']
  for name in names:
    cells = []
    for k in keys:
      cells += [sweep.mean_std([(r['mean'] if name == 'mean' else r['categories'][name])[k] for r in reports]),
                f'{paper[k]:.1f}' if name == 'mean' else '-']
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  devs = deviations(config, table)
  text = '\n'.join([f'Seeds {", ".join(map(str, seeds))}; mean ± std over seeds.', '', *lines, '',
                    'Deviations from the paper: ' + ('; '.join(devs) if devs else 'none') + '.'])
  (workdir / 'table.md').write_text(text + '\n')
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  print(run(f.config, f.table, pathlib.Path(f.workdir), [int(s) for s in f.seeds]))


if __name__ == '__main__':
  # Flags only for the command line: importing this module (e.g. from a test) defines none.
  flags.DEFINE_enum('table', None, sorted(PAPER), 'Which paper table.')
  config_flags.DEFINE_config_file('config', None, 'Config file or shipped name (mvtec, cifar10).',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.mark_flags_as_required(['table', 'config', 'workdir'])
  sys.argv = config_files.resolve_argv(sys.argv)
  app.run(errors.reporting(main))
