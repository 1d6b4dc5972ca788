"""adtr_jax.benchmark times the driver's own training path, and what it reports is what ran: the steps
of the timed calls, the models they trained, the FLOPs of the step with and without the backbone."""
import time

import jax
import numpy as np
import pytest

from adtr_jax import benchmark, loop
from adtr_jax.models.adtr import build_model
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def stacked(tmp_path_factory):
  """(config, stacked_run's JSON for 2 models on a 2 x 4 mesh with one model beside them (steps=2,
  scan_steps=3), every runner call it made): per call the feed's class, num_steps, the models' steps
  before and after [M], the call's own wall time and the parameters after [M, ...]."""
  tmp = tmp_path_factory.mktemp('bench')
  config = tiny_config(tmp, tmp / 'cache')
  config.train.model_axis = 2
  calls, make = [], loop.make_runner

  def recorded(step_fn, mesh, feed, models_per_call=0):
    run = make(step_fn, mesh, feed, models_per_call)

    def call(state, frozen, keys, hyper, start, num_steps):
      before, t0 = np.asarray(state.step), time.perf_counter()
      state, metrics = jax.block_until_ready(run(state, frozen, keys, hyper, start, num_steps))
      calls.append({'feed': type(feed).__name__, 'num_steps': num_steps, 'before': before,
                    'after': np.asarray(state.step), 'seconds': time.perf_counter() - t0,
                    'params': [np.asarray(x) for x in jax.tree.leaves(state.params)]})
      return state, metrics
    return call

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, 'make_runner', recorded)
    out = benchmark.stacked_run(config, batch_size=8, steps=2, models=2, scan_steps=3)
  return config, out, calls


@pytest.mark.slow
def test_timed_calls_ran_the_steps_they_report(stacked):
  """The last call of each feed is the timed one: it advanced every model by the steps the line
  reports, and the reported time encloses it (so it cannot be the time of something shorter)."""
  _, out, calls = stacked
  images = [c for c in calls if c['feed'] == '_SameImages']
  cached = [c for c in calls if c['feed'] == 'DeviceCache']
  # One model: the image step (one warm-up step, then `steps`), and the cached scan (warm-up, timed).
  assert [(c['num_steps'], len(c['after'])) for c in images] == [(1, 1), (2, 1)]
  assert [(c['num_steps'], len(c['after'])) for c in cached] == [(3, 1), (3, 1), (3, 2), (3, 2)]
  for c in images + cached:
    np.testing.assert_array_equal(c['after'] - c['before'], c['num_steps'])
  assert out['cached_scan_steps'] == 3
  # Rounded to 3 decimals (5e-4 s) and 2 (images/s).
  assert out['one_model_cached_scan_s'] >= cached[1]['seconds'] - 5e-4
  assert out['cached_scan_s'] >= cached[3]['seconds'] - 5e-4
  assert out['one_model_train_images_per_s'] <= 8 * 2 / images[1]['seconds'] + 0.01


@pytest.mark.slow
def test_models_are_distinct(stacked):
  """--models=2 trains two models with their own data order and dropout (seeds 0 and 1): their
  parameters, equal at the start, differ after the benchmark's steps."""
  _, out, calls = stacked
  many = [c for c in calls if c['feed'] == 'DeviceCache'][-1]
  diff = max(float(np.max(np.abs(p[0] - p[1]))) for p in many['params'])
  assert diff > 1e-3, diff   # measured 1.1e-2 (the same seed for both: 0)
  assert out['models'] == 2 and out['model_axis'] == 2
  assert 'train_images_per_s' not in out and out['one_model_train_images_per_s'] > 0


@pytest.mark.slow
def test_cached_step_flops_exclude_the_backbone(stacked):
  """The image step's FLOPs minus the cached step's are the backbone's forward pass (XLA's count of
  the embedding alone), within 1% (measured 0.002%): the cached figure is the step without the
  backbone."""
  config, out, _ = stacked
  model, _ = build_model(config)
  images = jax.ShapeDtypeStruct((8, 64, 64, 3), np.uint8)
  backbone = jax.jit(model.embed).lower(images).compile().cost_analysis()['flops'] / 8
  gap = out['train_flops_per_image'] - out['train_cached_flops_per_image']
  assert out['train_cached_flops_per_image'] > 0
  assert abs(gap - backbone) <= 0.01 * backbone, (gap, backbone)


def test_breakdown_times_every_part(tmp_path):
  config = tiny_config(tmp_path, tmp_path / 'cache')
  out = benchmark.breakdown(config, batch_size=8, steps=1)
  parts = [k for k in out if k.endswith('_s')]
  assert {'backbone_forward_s', 'reconstructor_forward_backward_s',
          'reconstructor_forward_backward_no_dropout_s', 'attention_forward_backward_s',
          'ffn_forward_backward_s', 'optimizer_s', 'host_resize_batch_s'} <= set(parts)
  assert all(out[k] > 0 for k in parts)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_time_one_step_together(tmp_path):
  """--num_processes=2 starts 2 local processes (2 fake CPU devices each) that time the step on one
  4-device mesh; process 0 prints the one JSON line, which names both processes' devices."""
  import json
  import os
  import signal
  import subprocess
  import sys

  from tests.conftest import REPO
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  # Its own process group: a failure or timeout kills the benchmark and both processes it started.
  proc = subprocess.Popen([sys.executable, '-m', 'adtr_jax.benchmark', '--num_processes=2',
                           f'--config=tests/tiny_config.py:{tmp_path}|{tmp_path / "cache"}',
                           '--image_size=64', '--batch_size=8', '--steps=1'],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    try:   # the group: anything still running after communicate() (a timeout, a stray child)
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert proc.returncode == 0, stderr[-3000:]
  lines = [line for line in stdout.splitlines() if line.startswith('{')]
  assert len(lines) == 1, stdout
  out = json.loads(lines[0])
  assert out['processes'] == 2 and len(set(out['devices'])) == 4
  assert out['train_images_per_s'] > 0 and out['train_cached_images_per_s'] > 0
