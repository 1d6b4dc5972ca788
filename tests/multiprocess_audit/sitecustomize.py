"""Instruments the processes of tests/test_multiprocess.py (on PYTHONPATH there only).

With $ADTR_TEST_AUDIT=<file.json> set, records for the test (written to that file at exit):
- 'writes': every file this process opened for writing, renamed, linked, copied or removed under
  $ADTR_TEST_AUDIT_ROOT (Python's audit events: open, os.rename, ...);
- 'reads': every row the input pipeline's threads decoded for a batch, as [source type, source length,
  epoch, row] (each call of adtr_jax.data.pipeline.load_resized in a decoding thread; single images
  read for heatmaps are left out);
- 'memo_bytes': what the backbone feature memo held at the end.
The command line itself is the one a user runs (`python -m adtr_jax.main ...`).
"""
import atexit
import json
import os
import threading

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
  load_resized = pipeline.load_resized

  def counted(source, index, image_size):
    if threading.current_thread().name.startswith('adtr_data'):
      reads.append([type(source).__name__, len(source), getattr(source, 'epoch', None), int(index)])
    return load_resized(source, index, image_size)

  pipeline.load_resized = counted

  def dump():
    memo = sys.modules.get('adtr_jax.feature_cache')
    with open(out, 'w') as f:   # after the hook's last use: the report itself is not recorded
      json.dump({'writes': writes, 'reads': reads,
                 'memo_bytes': memo.MEMO.bytes if memo else None}, f)

  atexit.register(dump)


if _OUT:
  _install(_OUT)
