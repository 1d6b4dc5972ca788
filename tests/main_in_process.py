"""Runs adtr_jax.main's main() for each argv of a list, all in this one process, as
`python -m adtr_jax.main <args>` would run it: absl parses the flags (config_flags reads the --config.*
overrides from sys.argv), then main(). Reads the list as JSON on stdin; prints one JSON line,
[[exit status, stderr], ...] (status 'exception' and the traceback for an error main let through).

A process, not the test's own: the test process imports adtr_jax.benchmark (tests/test_benchmark.py),
which defines absl flags of the same names as adtr_jax.main's.
"""
import contextlib
import io
import json
import sys
import traceback

from absl import flags

from adtr_jax import main


def run(args: list[str]) -> tuple:
  sys.argv = ['adtr_jax.main', *args]
  flags.FLAGS.unparse_flags()
  err, code = io.StringIO(), 0
  with contextlib.redirect_stderr(err):
    try:
      main.main(flags.FLAGS(sys.argv))
    except SystemExit as e:
      code = e.code
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
      code = 'exception'
      err.write(traceback.format_exc())
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:   # --config's override flags
    delattr(flags.FLAGS, name)
  return code, err.getvalue()


if __name__ == '__main__':
  print(json.dumps([run(args) for args in json.loads(sys.stdin.read())]))
