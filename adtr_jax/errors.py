"""Errors a user can fix: bad config values, bad input data, unusable weight files, a diverged model.

The command line (and every experiment script, through `reporting`) prints these as one line
(`adtr_jax: error: <message>`; a line per model for Diverged) and exits with status 2 (Diverged: 1);
`--traceback` shows the traceback instead. Each also subclasses the builtin a caller would expect
(ValueError, FileNotFoundError), so library code can catch them the usual way.
"""
import functools
import sys


class UserError(Exception):
  """Base class: the message alone says what to fix (names the config field or the file)."""


class ConfigError(UserError, ValueError):
  """A config field holds a value that cannot work."""


class DataError(UserError, ValueError):
  """Missing, misplaced or unreadable input data; the message names the path."""


class WeightsError(UserError, ValueError):
  """A weight file that cannot be read or does not fit the backbone."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or checkpoint the run needs does not exist."""


class Diverged(UserError, ArithmeticError):
  """Models whose training loss stopped being finite: the others of their run trained on and were
  evaluated. One line per model (`lines`); the command line prints each and exits with status 1."""

  exit_status = 1

  def __init__(self, lines: list[str]):
    super().__init__('\n'.join(lines))
    self.lines = list(lines)


def report(error: UserError) -> int:
  """Prints `error` as the command line does (stderr, one `adtr_jax: error:` line each) and returns
  the exit status to end with."""
  for line in getattr(error, 'lines', [str(error)]):
    print(f'adtr_jax: error: {line}', file=sys.stderr)
  return getattr(error, 'exit_status', 2)


def reporting(main, traceback=lambda: False):
  """An absl main that ends with `report`'s lines and exit status on a UserError (traceback(): raise
  it instead, for --traceback), never with a traceback."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      if traceback() and not isinstance(e, Diverged):
        raise
      sys.exit(report(e))
  return wrapped
