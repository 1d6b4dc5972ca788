"""adtr_jax.benchmark: the JSON keys it promises, with values that follow from the model."""
from adtr_jax import benchmark
from tests.conftest import tiny_config


def test_run_reports_cached_and_image_training(tmp_path):
  config = tiny_config(tmp_path, tmp_path / 'cache')
  out = benchmark.run(config, batch_size=8, steps=1)
  for key in ('train_images_per_s', 'train_cached_images_per_s', 'infer_images_per_s',
              'infer_memo_images_per_s'):
    assert out[key] > 0, key
  # The cached step skips the backbone, so XLA counts fewer FLOPs for it than for the image step.
  assert 0 < out['train_cached_flops_per_image'] < out['train_flops_per_image']
  assert out['mfu'] is None      # no known peak for a CPU
  assert out['batch_size'] == 8 and out['image_size'] == 64
  assert out['cached_scan_steps'] == 1      # scan_steps=0: one scan of `steps` steps


def test_run_times_one_scan_of_scan_steps(tmp_path):
  """scan_steps sets the length of the timed on-device scan: its wall time is what the per-step
  images/s figure is derived from (3 steps of batch 8 in cached_scan_s)."""
  config = tiny_config(tmp_path, tmp_path / 'cache')
  out = benchmark.run(config, batch_size=8, steps=1, scan_steps=3)
  assert out['cached_scan_steps'] == 3 and out['cached_scan_s'] > 0
  ips = out['train_cached_images_per_s']
  # Both figures are rounded (3 decimals of seconds, 2 of images/s): that is the whole allowed gap.
  assert abs(3 * 8 / out['cached_scan_s'] - ips) <= ips * 0.0006 / out['cached_scan_s'] + 0.01


def test_breakdown_times_every_part(tmp_path):
  config = tiny_config(tmp_path, tmp_path / 'cache')
  out = benchmark.breakdown(config, batch_size=8, steps=1)
  parts = [k for k in out if k.endswith('_s')]
  assert {'backbone_forward_s', 'reconstructor_forward_backward_s',
          'reconstructor_forward_backward_no_dropout_s', 'attention_forward_backward_s',
          'ffn_forward_backward_s', 'optimizer_s', 'host_resize_batch_s'} <= set(parts)
  assert all(out[k] > 0 for k in parts)


def test_stacked_benchmark_sums_over_the_models(tmp_path):
  config = tiny_config(tmp_path, tmp_path / 'cache')
  config.train.model_axis = 4
  out = benchmark.stacked_run(config, batch_size=8, steps=1, models=4)
  assert out['models'] == 4 and out['model_axis'] == 4
  assert out['train_cached_images_per_s'] > 0 and out['one_model_train_cached_images_per_s'] > 0
  assert out['stacked_vs_one_model'] == round(
      out['train_cached_images_per_s'] / out['one_model_train_cached_images_per_s'], 2)
  assert 'train_images_per_s' not in out and out['one_model_train_images_per_s'] > 0


def test_two_processes_time_one_step_together(tmp_path):
  """--num_processes=2 starts 2 local processes (2 fake CPU devices each) that time the step on one
  4-device mesh; process 0 prints the one JSON line."""
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
  assert out['processes'] == 2 and len(out['devices']) == 4
  assert out['train_images_per_s'] > 0 and out['train_cached_images_per_s'] > 0
