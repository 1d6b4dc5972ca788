"""Config files by path, or by the name of one shipped with the package: `--config=elpv`.

In a source checkout the shipped configs are the repo's configs/; an installed package carries the same
files as `adtr_jax/configs/` (pyproject.toml maps one onto the other).
"""
from __future__ import annotations

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def shipped_dir() -> pathlib.Path:
  """The folder of the shipped configs: installed (adtr_jax/configs) or a checkout (<repo>/configs)."""
  for folder in (_HERE / 'configs', _HERE.parent / 'configs'):
    if (folder / 'default.py').is_file():
      return folder
  raise FileNotFoundError(f'no shipped configs next to {_HERE}')


def resolve(value: str) -> str:
  """`NAME[:arg]` -> `<shipped>/NAME.py[:arg]` when NAME is not an existing path but names a shipped
  config (with or without .py); anything else is returned unchanged for config_flags to report."""
  path, sep, arg = value.partition(':')
  if pathlib.Path(path).exists() or '/' in path:
    return value
  candidate = shipped_dir() / (path if path.endswith('.py') else f'{path}.py')
  return f'{candidate}{sep}{arg}' if candidate.is_file() else value


def resolve_argv(argv: list[str], flag: str = '--config') -> list[str]:
  """Applies `resolve` to every `--config=VALUE` of a command line (before absl parses it)."""
  prefix = f'{flag}='
  return [prefix + resolve(a[len(prefix):]) if a.startswith(prefix) else a for a in argv]
