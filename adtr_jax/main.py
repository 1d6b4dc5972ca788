r"""ADTR command line.

  python -m adtr_jax.main --config=configs/elpv.py --workdir=workdirs/elpv
  adtr-jax --config=elpv --workdir=workdirs/elpv     # installed: a shipped config by its name
  python -m adtr_jax.main --config=configs/magnetic_tile.py --workdir=workdirs/mt \
      --config.train.num_epochs=20 --mode=train_and_eval
  python -m adtr_jax.main --config=configs/elpv.py --workdir=workdirs/elpv --mode=predict \
      --predict_dir=/path/to/new/images
  python -m adtr_jax.main --config=configs/elpv.py --workdir=workdirs/elpv --mode=export   # docs/deploy.md

Any config field can be overridden with --config.<field>=<value>. Re-running a killed `train` command
with the same --workdir resumes from its latest checkpoint. Bad input (config values, data, weight files)
ends with one line naming the field or file, `adtr_jax: error: ...`, and exit status 2; --traceback
shows the traceback instead.

The console shows progress bars, warnings, one-line events and results. Every log line (the libraries'
INFO lines too: orbax, tfds, absl) goes to <workdir>/log.txt (process i > 0 of a multi-process run:
log.process_<i>.txt); --verbosity=0 (absl's flag) shows them on the console as well.
"""
import contextlib
import logging as py_logging
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adtr_jax import errors   # no JAX: --help still answers at once

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config file (its get_config()), or the name of a shipped one (elpv, magnetic_tile, '
    'mvtec, mvtec_paper, default); override fields with --config.a.b=value.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, metrics and heatmaps.')
_MODE = flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval', 'predict', 'export',
                                    'show_anomalies'],
                          'train: train (resuming if possible); eval: evaluate the saved model; '
                          'train_and_eval: both; predict: score the images of --predict_dir; export: write '
                          '<category>/export/ (ONNX, jax.export, model.json; docs/deploy.md); show_anomalies: '
                          'write a few training anomalies with their masks as PNGs.')
_PREDICT_DIR = flags.DEFINE_string('predict_dir', None,
                                   '--mode=predict: a folder of images to score with the trained model. '
                                   'Without it, an MVTec AD 2 object (dataset.source=mvtec_ad2) writes the '
                                   'evaluation server\'s files of its private splits to <workdir>/ad2_submission.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                  'Call jax.distributed.initialize() first, which detects the processes '
                                  'of a TPU pod slice, a SLURM job or Open MPI (docs/multihost.md).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-process runs from any other launcher: host:port of process 0 '
                                   '(with --num_processes and --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process runs: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process runs: this one, in [0, num_processes).')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    'distributed_timeout_s', 300, 'Multi-process runs: seconds to wait for the coordinator at start-up, '
    'and after which a process that stopped answering ends the others with an error.')
_TRACEBACK = flags.DEFINE_bool('traceback', False,
                                'Show the full traceback of configuration and data errors instead of '
                                'their one-line message.')
flags.mark_flags_as_required(['config', 'workdir'])


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    with _quiet_console():
      run(_CONFIG.value, pathlib.Path(_WORKDIR.value), _MODE.value)
  except errors.UserError:
    raise   # one line and its exit status (errors.reporting, see cli)
  except Exception:
    _lost_peer_first()
    raise
  _finished_distributed()


# The CLI's main: a user error ends with its one line(s) and exit status (--traceback: its traceback).
main = errors.reporting(_main, traceback=lambda: _TRACEBACK.value)


def _lost_peer_first() -> None:
  """A multi-process run's error that a lost peer caused (a collective failing) ends with the
  watchdog's one line naming that peer (docs/multihost.md), not with a traceback."""
  if 'adtr_jax.multihost' in sys.modules:
    sys.modules['adtr_jax.multihost'].report_lost_peer()


def _finished_distributed() -> None:
  """Tells the other processes that this one finished (it may end before them: they must not take it
  for lost)."""
  if 'adtr_jax.multihost' in sys.modules:
    sys.modules['adtr_jax.multihost'].leave(ok=True)


class _TfdsNoise(py_logging.Filter):
  """tfds warns at every preparation that our builder has a custom config and that a new folder has no
  dataset_info.json yet: facts of how the data is prepared, not for the console (the log file has them)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.ERROR or '/tensorflow_datasets/' not in record.pathname


@contextlib.contextmanager
def _quiet_console():
  """While the CLI runs, the console (absl's handler) shows warnings and errors only, unless --verbosity
  is given (absl's meaning then: 0 INFO, 1 DEBUG)."""
  handler, noise = logging.get_absl_handler(), _TfdsNoise()
  level = handler.level
  if not flags.FLAGS['verbosity'].present:
    handler.setLevel(py_logging.WARNING)
    handler.addFilter(noise)
  try:
    yield
  finally:
    handler.setLevel(level)
    handler.removeFilter(noise)


def log_file(workdir: pathlib.Path, process: int) -> pathlib.Path:
  """Where a CLI run's log lines go: <workdir>/log.txt; log.process_<i>.txt for process i > 0 (named, like
  orbax's per-process files, for the process that writes it)."""
  return workdir / ('log.txt' if process == 0 else f'log.process_{process}.txt')


@contextlib.contextmanager
def _logging_to(path: pathlib.Path):
  """Every log record (at absl's --verbosity, INFO by default) appended to `path` while the block runs."""
  handler = py_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  py_logging.root.addHandler(handler)
  try:
    yield
  finally:
    py_logging.root.removeHandler(handler)
    handler.close()


def run(config, workdir: pathlib.Path, mode: str):
  """Runs one --mode of the CLI."""
  # Imported here so that --help answers without starting JAX.
  import jax

  _init_distributed(config, workdir, mode)
  from adtr_jax import validate
  from adtr_jax.data import mixing
  if mode == 'predict' and not _PREDICT_DIR.value and config.dataset.source != 'mvtec_ad2':
    raise app.UsageError('--mode=predict needs --predict_dir=<folder of images> (without it, an MVTec AD 2 '
                         'object writes its submission)')
  if mode == 'show_anomalies' and not mixing.uses_anomalies(config):
    raise app.UsageError('no anomalies configured: set --config.anomalies.synthetic, num_labelled or '
                         'external_dir')
  # Before anything is written or prepared: a bad value costs a second, not a dataset's preparation.
  validate.check(config, mode, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with _logging_to(log_file(workdir, jax.process_index())):
    logging.info('JAX devices: %s (process %d of %d)', jax.devices(), jax.process_index(),
                 jax.process_count())
    _run_mode(config, workdir, mode)


def _run_mode(config, workdir: pathlib.Path, mode: str):
  """run()'s work once the config is checked and the workdir exists."""
  import jax

  from adtr_jax import evaluate, train
  from adtr_jax.data import datasets, mixing
  if jax.process_index() == 0 and mode in ('train', 'train_and_eval'):   # how its models were trained
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  if mode == 'predict' and not _PREDICT_DIR.value:   # MVTec AD 2: the evaluation server's files
    evaluate.predict_submission(config, workdir)
    return
  if mode == 'predict':
    evaluate.predict(config, workdir, _PREDICT_DIR.value)
    return
  if mode == 'export':
    from adtr_jax import export
    export.export(config, workdir)
    return
  if mode == 'show_anomalies':
    for category in datasets.categories(config):
      train_source = datasets.load_category(config, category).train
      paths = mixing.save_examples(train_source, workdir / category / 'anomalies',
                                   config.dataset.image_size)
      print(f'{len(paths)} training anomalies with masks in {workdir / category / "anomalies"}')
    return
  if mode == 'eval':
    report = evaluate.evaluate(config, workdir)
  else:
    report = train.train_and_evaluate(config, workdir, evaluate_after=mode == 'train_and_eval')
  if 'eval' in report or mode == 'eval':
    print(f'metrics: {workdir / "metrics.json"}; heatmaps: {workdir}/<category>/heatmaps/')


def _init_distributed(config, workdir: pathlib.Path, mode: str) -> None:
  """Joins the other processes of a multi-process run (--distributed or the explicit flags), then checks
  that all were started with the same config, workdir and mode."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value and all(v is None for v in explicit):
    return
  from adtr_jax import multihost
  multihost.initialize(*explicit, timeout_s=_DISTRIBUTED_TIMEOUT.value)
  multihost.check_same_run(config.to_json_best_effort(), str(workdir.absolute()), mode,
                           _PREDICT_DIR.value)


def cli():
  """The `adtr-jax` console command (same as `python -m adtr_jax.main`)."""
  from adtr_jax import config_files
  sys.argv = config_files.resolve_argv(sys.argv)
  # --help lists the key flags of the program file; under the console script that file is the script,
  # not this module, so this module's flags are declared key flags of it too.
  for flag in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__]):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)


if __name__ == '__main__':
  cli()
