"""The feeds of the train step: cached features == images, device == host cache, 8 devices == 1,
the on-device data order, the schedule, and bfloat16 against float32."""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adtr_jax import defaults, feature_cache, inference, loop, members, sharding, step, train_state
from adtr_jax.data import datasets, pipeline
from adtr_jax.models.adtr import SplitModel, build_model
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def setup(toy_root, tmp_path_factory):
  """The tiny config, its training split, and float32 features of every training image (8 devices)."""
  config = tiny_config(toy_root, tmp_path_factory.mktemp('cache'))
  config.backbone.feature_memo_mb = 0   # each feature computed on the mesh the test names
  data = datasets.load_category(config, 'toy')
  model, _ = build_model(config)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  features = feature_cache.compute(data.train, SplitModel(graphdef, state.params, frozen),
                                   sharding.make_mesh(), config, 'float32')
  return config, data, features


def _fresh(config, mesh, num_rows=18, steps_per_epoch=2, total=100):
  """One model as the driver lays it out: (graphdef, state [1], frozen, step_fn, keys [1], hyper [1])."""
  model, _ = build_model(config)
  numbers = members.numbers(config.train, steps_per_epoch=steps_per_epoch, last_step=total,
                            num_rows=num_rows, data=0)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  state, keys, hyper = members.stack_members([state], members.member_keys([config]), [numbers], mesh)
  step_fn = functools.partial(step.train_step, graphdef=graphdef, loss=step.make_loss(config.loss),
                              schedule=config.train.schedule)
  return graphdef, state, sharding.put_replicated(frozen, mesh), step_fn, keys, hyper


def _feed(name, config, data, features, mesh):
  if name == 'device':
    return loop.DeviceCache([features], mesh, 8)
  keys = members.member_keys([config])
  if name == 'host':
    numbers = members.numbers(config.train, steps_per_epoch=2, last_step=100, num_rows=len(data.train),
                              data=0)
    return loop.HostCache([features], mesh, 8, keys, members.stack([numbers]))
  return loop.Images(data.train, mesh, batch_size=8, image_size=64, key=keys[0],
                     fields=('image', 'valid'), num_workers=1)


@pytest.mark.slow
def test_cached_features_give_the_same_loss_and_gradients_as_images(setup):
  """The backbone is frozen: training from its stored (float32) output is the same computation."""
  config, data, _ = setup
  mesh = sharding.make_mesh(jax.devices()[:1])   # both paths on one device: the same arithmetic
  model, _ = build_model(config)
  graphdef, state, frozen = train_state.init_state(model, config.train)
  features = feature_cache.compute(data.train, SplitModel(graphdef, state.params, frozen), mesh, config,
                                   'float32')
  rows = [3, 0, 7, 11, 5, 2, 9, 14]
  images = np.stack([pipeline.load_resized(data.train, r, 64)['image'] for r in rows])
  valid = np.ones(8, bool)
  key = jax.random.key(5)
  kw = dict(graphdef=graphdef, loss=step.make_loss(config.loss))
  loss_img, g_img = step.loss_and_grads(state.params, frozen, {'image': images, 'valid': valid}, key, **kw)
  loss_f, g_f = step.loss_and_grads(state.params, frozen, {'features': features[rows], 'valid': valid},
                                     key, **kw)
  np.testing.assert_allclose(loss_f, loss_img, rtol=1e-6)
  leaves_img, leaves_f = jax.tree.leaves(g_img), jax.tree.leaves(g_f)
  assert len(leaves_img) == len(leaves_f) > 10
  # XLA fuses the backbone into the gradient graph on the image path, so features differ by float32
  # rounding (~1e-7); a pre-activation that close to a ReLU kink flips one FFN unit, which moves the
  # gradient by 1.2e-4 of its L2 norm (measured). Bound: 5e-4. Control: the features of other rows.
  def rel_err(grads):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
    b = np.concatenate([np.ravel(x) for x in leaves_img])
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  assert rel_err(g_f) <= 5e-4
  _, g_wrong = step.loss_and_grads(state.params, frozen, {'features': features[[r + 1 for r in rows]],
                                                           'valid': valid}, key, **kw)
  assert rel_err(g_wrong) > 1e-2


def _run(feed, setup_, mesh, n_steps, per_call):
  """(losses, params) of one model after n_steps, per_call steps per runner call."""
  _, state, frozen, step_fn, keys, hyper = setup_
  runner = loop.make_runner(step_fn, mesh, feed)
  losses = []
  for start in range(0, n_steps, per_call):
    state, m = runner(state, frozen, keys, hyper, start, min(per_call, n_steps - start))
    losses += np.asarray(m['loss'])[:, 0].tolist()
  return np.asarray(losses), jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(state.params))


def _assert_params_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.mark.slow
def test_device_cache_host_cache_and_images_train_identically(setup):
  """Same rows in the same order from every feed (5 steps crossing an epoch boundary, 2 per call)."""
  config, data, features = setup
  mesh = sharding.make_mesh()
  results = {}
  for name in ('device', 'host', 'images'):
    results[name] = _run(_feed(name, config, data, features, mesh), _fresh(config, mesh), mesh, 5, 2)
  np.testing.assert_array_equal(results['device'][0], results['host'][0])
  _assert_params_close(results['device'][1], results['host'][1], atol=0)
  np.testing.assert_allclose(results['images'][0], results['device'][0], rtol=1e-5)
  _assert_params_close(results['images'][1], results['device'][1], atol=1e-5)
  assert results['device'][0][-1] < results['device'][0][0]


@pytest.mark.slow
def test_device_cache_on_8_devices_matches_1_device(setup):
  """The cache sharded over 8 devices (rows gathered across them) == everything on one device.
  float32; losses agree to 1e-5 and, after 4 AdamW steps, parameters to 1e-4: the reduction order
  differs across devices, and Adam's normalised step turns a rounding-level difference in a
  near-zero gradient into a step of up to the learning rate (1e-3); measured 2.7e-5."""
  config, data, features = setup
  assert jax.device_count() == 8
  out = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = sharding.make_mesh(devices)
    out.append(_run(_feed('device', config, data, features, mesh), _fresh(config, mesh), mesh, 4, 4))
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
  _assert_params_close(out[0][1], out[1][1], atol=1e-4)


def test_place_pads_the_device_cache_to_the_device_count(setup):
  _, data, features = setup
  placed, size = feature_cache.place([features[:13], features[:5]], sharding.make_mesh())
  assert size == 16 and placed.shape == (2, 16, *features.shape[1:])
  assert len(placed.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(placed)[0, :13], features[:13])
  np.testing.assert_array_equal(np.asarray(placed)[1, :5], features[:5])
  assert not np.asarray(placed)[0, 13:].any() and not np.asarray(placed)[1, 5:].any()


def test_each_epoch_visits_every_row_once_in_a_new_order():
  rows = jax.jit(jax.vmap(functools.partial(loop.step_rows, num_rows=10, steps_per_epoch=3,
                                            batch_size=3), in_axes=(None, 0)))
  out = np.asarray(rows(jax.random.key(0), jnp.arange(9))).reshape(3, 9)   # 3 epochs x 9 rows
  for epoch in out:
    assert len(set(epoch.tolist())) == 9 and set(epoch.tolist()) <= set(range(10))
  assert not np.array_equal(out[0], out[1])
  again = np.asarray(rows(jax.random.key(0), jnp.arange(3, 6)))   # a resume at step 3: same rows
  np.testing.assert_array_equal(again.reshape(-1), out[1])


def test_warmup_cosine_schedule_is_complete_for_any_budget():
  for epochs in (3, 50):
    cfg = tiny_config('/x', '/y', schedule='warmup_cosine', learning_rate=1e-3, warmup_fraction=0.1,
                      final_lr_fraction=0.01, num_epochs=epochs).train
    total = train_state.total_steps(cfg, 10)
    hyper = train_state.hyperparameters(cfg, 10, total)
    schedule = lambda step: train_state.learning_rate(hyper, step, cfg.schedule)
    assert total == 10 * epochs
    warm = round(0.1 * total)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(warm)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(total)), 1e-5, rtol=1e-4)
    assert float(schedule(total // 2 + warm // 2)) < 1e-3


def test_min_steps_is_a_floor_on_the_budget():
  cfg = tiny_config('/x', '/y', num_epochs=30, min_steps=500).train
  assert train_state.total_steps(cfg, 3) == 500       # 54 images at batch 16: 90 steps would be too few
  assert train_state.total_steps(cfg, 40) == 1200     # a large set: the epochs decide


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32(setup):
  """bfloat16 matmuls (float32 parameters, float32 loss): loss within 2% and image scores within 2%
  of float32 on the same parameters (bfloat16 keeps 8 bits of mantissa, ~0.4% per rounding)."""
  _, data, features = setup
  out = {}
  for dtype in ('float32', 'bfloat16'):
    config = copy.deepcopy(setup[0])    # the module fixture's config stays as it is, whatever happens
    config.model.dtype = dtype
    model, _ = build_model(config)
    graphdef, state, frozen = train_state.init_state(model, config.train)
    if dtype == 'float32':
      params = state.params
    batch = {'features': features[:8], 'valid': np.ones(8, bool)}
    loss, _ = step.loss_and_grads(params, frozen, batch, jax.random.key(0), graphdef=graphdef,
                                  loss=step.make_loss(config.loss))
    maps, scores = inference.score_fn(params, frozen, jnp.asarray(
        np.stack([pipeline.load_resized(data.train, r, 64)['image'] for r in range(8)])),
        graphdef=graphdef, scoring_cfg=config.scoring, image_size=64)
    out[dtype] = (float(loss), np.asarray(scores))
  np.testing.assert_allclose(out['bfloat16'][0], out['float32'][0], rtol=0.02)
  np.testing.assert_allclose(out['bfloat16'][1], out['float32'][1], rtol=0.02)
  assert out['bfloat16'][0] != out['float32'][0]   # it really computed in bfloat16


@pytest.mark.slow
def test_default_bfloat16_cache_trains_like_images(setup):
  """The default cache stores features in bfloat16 (train.feature_cache_dtype): each feature is rounded
  to 8 significant bits (relative error <= 2^-9). The losses of the same 5 steps stay within 1e-3
  relative of training from images (measured: 7.5e-5)."""
  config, data, features = setup
  mesh = sharding.make_mesh()
  bf16 = jnp.asarray(features).astype(jnp.bfloat16)
  assert defaults.get_config().train.feature_cache_dtype == 'bfloat16'   # what a user gets
  cached = _run(_feed('device', config, data, np.asarray(bf16), mesh), _fresh(config, mesh), mesh, 5, 5)
  images = _run(_feed('images', config, data, None, mesh), _fresh(config, mesh), mesh, 5, 5)
  np.testing.assert_allclose(cached[0], images[0], rtol=1e-3)
