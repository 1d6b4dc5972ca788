"""Folder-per-class image data (ImageFolder style) as one-class MVTec-layout categories.

<root>/train/<class>/*.jpg|png|... and <root>/test/<class>/*; <root> may also be a .tar.gz / .tgz / .tar
archive holding that (extracted once into the cache). Category <class> is the one-class protocol
(CIFAR-10 in the paper): train/good = train/<class>; test/good = test/<class>; test/<other class> = the
test images of every other class, all anomalous. Exported as symlinks, so nothing is copied.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tarfile

from adtr_jax import errors
from adtr_jax.data import export, mvtec

ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar')
SPLITS = ('train', 'test')
EXPORT_VERSION = 1


def _key(path: pathlib.Path) -> str:
  """A short name for a source: its resolved path, size and modification time."""
  st = path.stat()
  return hashlib.sha256(f'{path.resolve()}|{st.st_size}|{st.st_mtime_ns}'.encode()).hexdigest()[:12]


def extracted(archive: pathlib.Path, cache: pathlib.Path) -> pathlib.Path:
  """The folder `archive` was extracted into (extracting it the first time; a crash leaves none)."""
  stem = archive.name.removesuffix('.gz').removesuffix('.tgz').removesuffix('.tar')
  out = cache / f'{stem}_{_key(archive)}'
  if (out / '.complete').is_file():
    return out
  tmp = out.with_name(f'.{out.name}.tmp{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    with tarfile.open(archive) as tar:
      tar.extractall(tmp, filter='data')  # refuses absolute paths, links out of tmp, devices
  except (tarfile.TarError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise errors.DataError(f'cannot extract {archive}: {e}') from e
  (tmp / '.complete').write_text(str(archive) + '\n')
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out


def check_root(root: str | os.PathLike) -> pathlib.Path:
  """`root` as a path, if it is a folder or an archive (an error naming it if not); nothing is read."""
  root = pathlib.Path(root).expanduser()
  if not root.exists():
    raise errors.DataError(f'dataset root {root} does not exist (a folder with train/<class>/ and '
                           f'test/<class>/, or a {"/".join(ARCHIVE_SUFFIXES)} archive of one)')
  if root.is_file() and not root.name.endswith(ARCHIVE_SUFFIXES):
    raise errors.DataError(f'dataset root {root} is a file but not a {"/".join(ARCHIVE_SUFFIXES)} archive')
  return root


def data_dir(root: str | os.PathLike, cache: pathlib.Path) -> pathlib.Path:
  """The folder holding train/ and test/: `root` itself, or where its archive was extracted. An
  archive holding a single top folder (e.g. cifar10/train, cifar10/test) is looked into."""
  root = check_root(root)
  if root.is_file():
    root = extracted(root, cache)
    entries = [p for p in root.iterdir() if not p.name.startswith('.')]
    if len(entries) == 1 and entries[0].is_dir() and not (root / 'train').is_dir():
      root = entries[0]
  return root


def scan(root: pathlib.Path) -> dict[str, dict[str, list[str]]]:
  """{split: {class: sorted image paths relative to root}}; both splits must hold the same classes."""
  found = {}
  for split in SPLITS:
    folder = root / split
    if not folder.is_dir():
      raise errors.DataError(f'{folder} is missing: folder-per-class data needs {root}/train/<class>/ '
                             f'and {root}/test/<class>/')
    classes = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith('.')]
    if not classes:
      raise errors.DataError(f'{folder} holds no class folders')
    found[split] = {}
    for c in classes:
      images = [str(p.relative_to(root)) for p in mvtec.images_in(c)]
      if not images:
        raise errors.DataError(f'{c} holds no images ({", ".join(mvtec.IMAGE_EXTENSIONS)})')
      found[split][c.name] = images
  if set(found['train']) != set(found['test']):
    raise errors.DataError(f'{root}: train/ and test/ hold different classes: '
                           f'{sorted(found["train"])} vs {sorted(found["test"])}')
  return found


def export_class(root: str | os.PathLike, name: str, cache: pathlib.Path) -> tuple[pathlib.Path, str]:
  """Exports class `name` as a one-class category under cache (MVTec layout, image labels only).

  Returns (the export's root, name). Reuses a complete export of the same files.
  """
  source = data_dir(root, cache)
  found = scan(source)
  if name not in found['train']:
    raise errors.ConfigError(f'--config.dataset.category={name!r} is not a class of {source}; classes: '
                             f'{", ".join(sorted(found["train"]))}')
  files = {'train/good': found['train'][name], 'test/good': found['test'][name],
           **{f'test/{c}': paths for c, paths in found['test'].items() if c != name}}
  manifest = {'version': EXPORT_VERSION, 'source': str(source), 'class': name,
              'rule': 'train/<class> -> train/good; test/<class> -> test/good; other classes -> test',
              'files': files}
  out = cache / f'one_class_{_key(source)}'
  export.ensure(out / name, source, manifest)
  return out, name
