"""Writing a category in the MVTec layout out of another dataset's files (symlinks, or copies).

A manifest {..., 'files': {'<split>/<folder>': [paths relative to the data dir]}} says what goes
where; it is saved as split.json, so a changed rule or source redoes the export and an unchanged one
is reused.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil


def _link_or_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  try:
    os.symlink(src, dst)
  except OSError:  # filesystems without symlinks
    shutil.copyfile(src, dst)


def is_complete(cat_dir: pathlib.Path, manifest: dict) -> bool:
  """True when split.json matches `manifest` and every listed image is there (and resolves)."""
  try:
    if json.loads((cat_dir / 'split.json').read_text()) != manifest:
      return False
  except (OSError, ValueError):
    return False
  return all((cat_dir / folder / pathlib.Path(p).name).is_file()
             for folder, paths in manifest['files'].items() for p in paths)


def write(cat_dir: pathlib.Path, data_dir: pathlib.Path, manifest: dict) -> None:
  """Writes the category into a temporary folder and renames it, so a crash leaves no half export."""
  tmp = cat_dir.with_name(f'.{cat_dir.name}.tmp{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  for folder, paths in manifest['files'].items():
    (tmp / folder).mkdir(parents=True)
    for p in paths:
      _link_or_copy(data_dir / p, tmp / folder / pathlib.Path(p).name)
  (tmp / 'split.json').write_text(json.dumps(manifest, indent=1) + '\n')
  shutil.rmtree(cat_dir, ignore_errors=True)
  os.replace(tmp, cat_dir)


def ensure(cat_dir: pathlib.Path, data_dir: pathlib.Path, manifest: dict) -> None:
  """Writes the export unless a complete one for the same manifest is already there."""
  if not is_complete(cat_dir, manifest):
    cat_dir.parent.mkdir(parents=True, exist_ok=True)
    write(cat_dir, data_dir, manifest)
