"""Instruments the processes of tests/test_multiprocess.py (on PYTHONPATH there only).

With $ADTR_TEST_AUDIT=<file.json> set, records for the test (written to that file at exit):
- 'writes': every file this process opened for writing, renamed, linked, copied or removed under
  $ADTR_TEST_AUDIT_ROOT (Python's audit events: open, os.rename, ...);
- 'reads': every row the input pipeline decoded for a batch, as [pass, source type, source length,
  epoch, row], where pass numbers the calls of adtr_jax.data.pipeline.batches in this process (every
  process of a run makes the same calls); single images read for heatmaps are left out;
- 'memo_bytes': what the backbone feature memo held at the end;
- 'reduced': [desc, rows] for each pass of adtr_jax.inference.reduce_split: how many rows this process
  handed to the pass's reducers;
- 'peak_rss_kib': this process's peak resident memory (ru_maxrss) at exit.
The command line itself is the one a user runs (`python -m adtr_jax.main ...`).
"""
import atexit
import importlib.abc
import importlib.util
import itertools
import json
import os
import resource

_OUT = os.environ.get('ADTR_TEST_AUDIT')


def _install(out: str) -> None:
  root = os.path.abspath(os.environ['ADTR_TEST_AUDIT_ROOT'])
  writes, reads = [], []
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
  paths_of = {'os.rename': (0, 1), 'os.remove': (0,), 'os.rmdir': (0,), 'shutil.rmtree': (0,),
              'os.symlink': (1,), 'shutil.copyfile': (1,), 'os.truncate': (0,)}

  def record(event, path):
    if isinstance(path, (str, bytes, os.PathLike)):
      path = os.path.abspath(os.fsdecode(path))
      if path.startswith(root + os.sep):
        writes.append([event, path])

  def hook(event, args):
    if event == 'open':
      path, mode, flags = args
      if (mode is not None and any(c in mode for c in 'wax+')) or (mode is None and flags & write_flags):
        record(event, path)
    elif event in paths_of:
      for i in paths_of[event]:
        record(event, args[i])

  import sys
  sys.addaudithook(hook)

  from adtr_jax.data import pipeline

  class Pass:
    """A source as seen by one call of pipeline.batches, numbered in call order."""

    def __init__(self, source, number: int):
      self.source, self.number = source, number

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      return self.source[i]

  batches, load_resized, calls = pipeline.batches, pipeline.load_resized, itertools.count()

  def numbered(source, **kwargs):
    return batches(Pass(source, next(calls)), **kwargs)

  def counted(source, index, image_size):
    if isinstance(source, Pass):
      reads.append([source.number, type(source.source).__name__, len(source),
                    getattr(source.source, 'epoch', None), int(index)])
    return load_resized(source, index, image_size)

  pipeline.batches, pipeline.load_resized = numbered, counted

  reduced = []

  def count_rows(inference):
    """Wraps inference.reduce_split: one more reducer counts the rows this process adds."""
    reduce_split = inference.reduce_split

    class Count:
      rows = 0

      def add(self, rows):
        self.rows += len(rows['index'])

      def finish(self):
        return self.rows

      def result(self, parts):
        return parts

    def counted(config, source, model, mesh, desc, reducers):
      count = Count()
      results = reduce_split(config, source, model, mesh, desc, [*reducers, count])
      reduced.append([desc, count.rows])
      return None if results is None else results[:-1]

    inference.reduce_split = counted

  class AfterImport(importlib.abc.MetaPathFinder):
    """Calls count_rows on adtr_jax.inference once it is imported (importing it here would start
    JAX before the program sets it up)."""

    def find_spec(self, name, path, target=None):
      if name != 'adtr_jax.inference':
        return None
      sys.meta_path.remove(self)
      spec = importlib.util.find_spec(name)
      exec_module = spec.loader.exec_module

      def exec_and_wrap(module):
        exec_module(module)
        count_rows(module)

      spec.loader.exec_module = exec_and_wrap
      return spec

  sys.meta_path.insert(0, AfterImport())

  def dump():
    memo = sys.modules.get('adtr_jax.feature_cache')
    with open(out, 'w') as f:   # after the hook's last use: the report itself is not recorded
      json.dump({'writes': writes, 'reads': reads, 'reduced': reduced,
                 'peak_rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 'memo_bytes': memo.MEMO.bytes if memo else None}, f)

  atexit.register(dump)


if _OUT:
  _install(_OUT)
