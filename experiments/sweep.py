r"""A grid of config overrides x seeds, each trained and evaluated, with the nearest-neighbour reference
on the same features; writes <workdir>/sweep.md (mean +- std over seeds) and sweep.json.

  python experiments/sweep.py --config=configs/magnetic_tile.py --workdir=workdirs/sweep \
      --sweep='train.learning_rate=1e-4,3e-4,1e-3' --seeds=0,1,2 \
      --set='dataset.image_size=224,train.num_epochs=0,train.min_steps=200'

--sweep crosses every listed field (`field=v1,v2;field2=v1,v2`); --set applies to every run. Each run
lives in <workdir>/<name>/seed<k>/ and is reused when its metrics.json exists (a killed sweep resumes).

--stack (default): models that differ only in numbers (seeds, optimiser fields, category; see
adtr_jax/defaults.py PER_MEMBER) train together as stacked models in one jitted step, one group per
set of shapes, each model checkpointed in its own run folder (a killed group resumes); min/run is
then the group's wall time divided by its models. Models fed from images (anomaly-aware training)
and --nostack train one after another. A config with several categories gets a row per category and a 'mean' row per run.
"""
import itertools
import json
import pathlib
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adtr_jax import errors  # noqa: E402

KEYS = ('image_auroc', 'pixel_auroc', 'pixel_aupro')
REFERENCE = 'nearest_neighbour'


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {'True': True, 'False': False}.get(text, text)


def apply(config, overrides: dict):
  for field, value in overrides.items():
    node = config
    *parents, leaf = field.split('.')
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise app.UsageError(f'unknown config field {field!r}')
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and not isinstance(
        node[leaf], bool) else value
  return config


def grid(spec: str) -> list[dict]:
  """'a=1,2;b=x' -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}]."""
  axes = []
  for part in filter(None, (p.strip() for p in spec.split(';'))):
    field, values = part.split('=', 1)
    axes.append([(field.strip(), _parse_value(v.strip())) for v in values.split(',')])
  return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def overrides(spec: str) -> dict:
  """'a.b=1,c.d=x' -> {'a.b': 1, 'c.d': 'x'}."""
  return dict((kv.split('=', 1)[0].strip(), _parse_value(kv.split('=', 1)[1].strip()))
              for kv in filter(None, spec.split(',')))


def mean_std(fractions) -> str:
  """'mean ± std' in percent of a list of fractions ('-' when empty): every table's cell."""
  vals = 100 * np.asarray([v for v in fractions if np.isfinite(v)], dtype=float)
  return f'{vals.mean():.1f} ± {vals.std():.1f}' if vals.size else '-'


def report_rows(report: dict) -> dict:
  """{category: metrics (+ minutes)} of one run's metrics.json, plus 'mean' when it has several."""
  cats = dict(report['categories'])
  if len(cats) > 1:
    cats['mean'] = report['mean']
  return {c: dict(m, minutes=report.get('minutes', float('nan'))) for c, m in cats.items()}


def run_sweep(base, workdir, points: list[dict], common: dict, seeds: list, reference: bool = True,
              stack: bool = True) -> str:
  """Trains and evaluates every (point, seed) on `base` + `common` + point (+ the reference per seed),
  seed by seed, skipping runs whose metrics.json exists; writes workdir/sweep.md and sweep.json and
  returns the table (mean +- std over seeds, a row per run and category)."""
  from adtr_jax import train
  from adtr_jax.baselines import nearest_neighbour
  workdir = pathlib.Path(workdir)
  names = ([(REFERENCE, {})] if reference else []) + [
      (','.join(f'{k}={v}' for k, v in p.items()) or 'base', p) for p in points]

  def run_dir(name, seed):
    return workdir / name.replace('/', '_') / f'seed{seed}'

  pending = []
  for seed in seeds:  # seed-major: a budget cut short leaves whole seeds of every run
    for name, point in names:
      if (run_dir(name, seed) / 'metrics.json').is_file():
        continue
      config = apply(apply(base.copy_and_resolve_references(), common), dict(point, seed=int(seed)))
      if name == REFERENCE:
        t0 = time.time()
        report = nearest_neighbour.run(config, run_dir(name, seed))
        report['minutes'] = (time.time() - t0) / 60
        (run_dir(name, seed) / 'metrics.json').write_text(json.dumps(report, indent=2) + '\n')
      else:
        pending.append((run_dir(name, seed), config))
  try:
    train.train_runs(pending, stack=stack)
    diverged = None
  except errors.Diverged as e:   # the other runs trained and were evaluated: their table, then the lines
    diverged = e
  rows = {}
  for name, _ in names:
    for seed in seeds:
      report = json.loads((run_dir(name, seed) / 'metrics.json').read_text())
      for cat, metrics in report_rows(report).items():
        rows.setdefault(name, {}).setdefault(cat, []).append(metrics)
  lines = [f'Base: `{base.dataset.category}`; for every run: {common or "-"}; seeds {",".join(map(str, seeds))}.',
           '', '| run | category | seeds | ' + ' | '.join(KEYS) + ' | min/run |', '|---' * (len(KEYS) + 4) + '|']
  for name, cats in rows.items():
    for cat, reports in cats.items():
      cells = [mean_std([r[k] for r in reports if k in r]) for k in KEYS]
      minutes = np.mean([r['minutes'] for r in reports])
      lines.append(f'| {name} | {cat} | {len(reports)} | ' + ' | '.join(cells) + f' | {minutes:.1f} |')
  table = '\n'.join(lines) + '\n'
  (workdir / 'sweep.md').write_text(table)
  (workdir / 'sweep.json').write_text(json.dumps(rows, indent=2) + '\n')
  if diverged:
    print(table, end='')
    raise diverged
  return table


def main(argv):
  del argv
  print(run_sweep(_CONFIG.value, _WORKDIR.value, grid(_SWEEP.value), overrides(_SET.value), _SEEDS.value,
                  reference=_REFERENCE.value, stack=_STACK.value), end='')


if __name__ == '__main__':
  # Flags only here, so that other scripts can import run_sweep without clashing with theirs.
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config.', lock_config=False)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.')
  _SWEEP = flags.DEFINE_string('sweep', '', "Crossed overrides: 'a.b=1,2;c.d=x,y' (empty: the base only).")
  _SET = flags.DEFINE_string('set', '', "Overrides for every run: 'a.b=1,c.d=x'.")
  _SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds of every grid point.')
  _REFERENCE = flags.DEFINE_bool('reference', True, 'Also run the nearest-neighbour reference.')
  _STACK = flags.DEFINE_bool('stack', True, 'Train runs that differ only in numbers as stacked models.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(errors.reporting(main))
