r"""One unified model against one model per category, at equal total steps, on categories from two
real sources: Magnetic Tile (pixel masks) and ELPV monocrystalline cells (image labels only).

  python experiments/unified.py --workdir=workdirs/unified --seeds=0,1,2 \
      --set='train.num_epochs=6,train.min_steps=0'

The default recipe at 224 px for both settings (only --set changes the budget). num_epochs counts
passes over a model's own training images, so the unified model, whose pass covers both categories,
takes the sum of the separate models' steps, or up to one more per epoch, since an epoch is
floor(images / batch) steps (min_steps=0 keeps it so; metrics.json has each model's step).

The two categories sit side by side as symlinks in <workdir>/root, an MVTec-layout root read with
dataset.require_masks=False (ELPV has no masks: its pixel columns and the mean's stay empty).
experiments/sweep.py then crosses dataset.unified=False,True, seed by seed, with the nearest-neighbour
reference of each seed; the table goes to <workdir>/sweep.md.
"""
import pathlib
import sys

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from adtr_jax import errors  # noqa: E402
from experiments import sweep  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def joint_root(out, folders: dict) -> pathlib.Path:
  """out/<name> -> folder (symlinks, replaced when they point elsewhere) for {name: category folder}."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, folder in folders.items():
    folder, link = pathlib.Path(folder).resolve(), out / name
    if not folder.is_dir():
      raise FileNotFoundError(f'{folder} (category {name!r}) is not a folder')
    if link.is_symlink() and link.resolve() != folder:
      link.unlink()
    if not link.is_symlink():
      link.symlink_to(folder, target_is_directory=True)
  return out


def base_config(root, categories: str):
  from adtr_jax import defaults
  config = defaults.get_config()
  config.dataset.update(source='mvtec', root=str(root), category=categories, image_size=224,
                        require_masks=False)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from adtr_jax.data import datasets, elpv
  workdir = pathlib.Path(_WORKDIR.value)
  common = sweep.overrides(_SET.value)
  cache = datasets.cache_dir(sweep.apply(base_config('', ''), common))
  elpv_root, elpv_category = elpv.export_elpv(cache / 'elpv', 'mono')
  root = joint_root(workdir / 'root', {'magnetic_tile': pathlib.Path(_MT_ROOT.value) / 'magnetic_tile',
                                       elpv_category: elpv_root / elpv_category})
  points = sweep.grid('dataset.unified=False,True')
  print(sweep.run_sweep(base_config(root, f'magnetic_tile,{elpv_category}'), workdir, points, common,
                        _SEEDS.value, reference=_REFERENCE.value, stack=False), end='')


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (resumable).')
  _SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of both settings.')
  _SET = flags.DEFINE_string('set', 'train.num_epochs=6,train.min_steps=0',
                             "Overrides for every run: 'a.b=1,c.d=x' (the budget).")
  _MT_ROOT = flags.DEFINE_string('mt_root', str(REPO.parent / 'shared' / 'data'),
                                 'Folder that holds magnetic_tile/{train,test,ground_truth}.')
  _REFERENCE = flags.DEFINE_bool('reference', True, 'Also run the nearest-neighbour reference.')
  flags.mark_flags_as_required(['workdir'])
  app.run(errors.reporting(main))
