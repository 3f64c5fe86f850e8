"""Train and eval steps: sharded over 8 devices they equal the 1-device step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fake_data
from perceiver_jax import create_model
from perceiver_jax.training import recipe
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps

NUM_CLASSES = 10


def assert_params_close(name, a, b, atol):
  """Parameters of runs that differ only in reduction order (device count).

  Attention key biases shift every logit of a row equally, so softmax makes
  their gradient exactly zero; what reaches them is rounding noise, which
  LAMB's normalisation then scales up. They are compared loosely; every
  other parameter must match to float32 rounding.
  """
  if 'key' in name and 'bias' in name:
    atol = 1e-4
  np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=name)
STATS = {'mean': np.array([120., 110., 100.]),
         'variance': np.array([3000., 2800., 2900.])}


def _batch(n, seed=0, size=32, masked=0):
  rng = np.random.default_rng(seed)
  batch = {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
           'label': rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32)}
  if masked:
    batch['mask'] = (np.arange(n) < n - masked).astype(np.float32)
  return batch


def _setup(num_devices, config=None):
  config = config or fake_data.get_config()
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  model = create_model(config, NUM_CLASSES)
  state, shardings = steps.create_train_state(
      config, model, (config.image_size, config.image_size, 3), mesh)
  train_step, eval_step = steps.jit_steps(config, STATS, mesh, shardings)
  return mesh, state, train_step, eval_step


def _run(num_devices, num_steps=2):
  mesh, state, train_step, eval_step = _setup(num_devices)
  history = []
  for i in range(num_steps):
    batch = sharding_lib.global_batch(mesh, _batch(16, seed=i))
    state, m = train_step(state, batch, 1e-3)
    history.append(jax.device_get(m))
  ev = eval_step(state, sharding_lib.global_batch(
      mesh, _batch(16, 9, masked=5)))
  return jax.device_get(state.params), history, jax.device_get(ev), state


@pytest.fixture(scope='module')
def runs():
  assert jax.device_count() >= 8
  return {n: _run(n) for n in (1, 8)}


def test_eight_devices_equal_one_device(runs):
  params1, hist1, ev1, _ = runs[1]
  params8, hist8, ev8, state8 = runs[8]
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params1),
                          jax.tree.leaves(params8)):
    assert_params_close(str(path), a, b, atol=2e-6)
  for m1, m8 in zip(hist1, hist8):
    chex.assert_trees_all_close(m1, m8, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(ev1, ev8, atol=1e-5, rtol=1e-5)
  # Parameters stay replicated on all eight devices.
  leaf = jax.tree.leaves(state8.params)[0]
  assert leaf.sharding.is_fully_replicated
  assert len(leaf.sharding.device_set) == 8
  # And training moved them.
  mesh, fresh, _, _ = _setup(1)
  del mesh
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), params1,
                      jax.device_get(fresh.params))
  assert max(jax.tree.leaves(diff)) > 0


def test_batch_is_split_over_devices():
  mesh = sharding_lib.create_mesh(jax.devices()[:8])
  batch = sharding_lib.global_batch(mesh, _batch(16))
  assert batch['image'].shape == (16, 32, 32, 3)
  shards = batch['image'].addressable_shards
  assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)
  np.testing.assert_array_equal(np.asarray(batch['image']), _batch(16)['image'])


def test_metric_sums_and_mask(runs):
  _, history, ev, _ = runs[1]
  assert history[0]['count'] == 16
  assert 0 <= history[0]['accuracy'] <= history[0]['top5_accuracy'] <= 16
  assert ev['count'] == 11  # 16 examples, 5 of them padding.
  assert np.isfinite(ev['loss']) and ev['loss'] > 0


def test_zero_learning_rate_freezes_params_and_is_recorded():
  mesh, state, train_step, _ = _setup(1)
  before = jax.device_get(state.params)
  state, _ = train_step(state, sharding_lib.global_batch(mesh, _batch(16)), 0.)
  chex.assert_trees_all_close(before, jax.device_get(state.params), atol=0)
  assert float(state.opt_state.hyperparams['learning_rate']) == 0.0
  assert int(state.step) == 1


def test_optimizer_is_lamb_with_seed_weight_decay():
  config = fake_data.get_config()
  params = {'w': jnp.ones((3, 3))}
  grads = {'w': jnp.full((3, 3), 0.5)}
  tx = recipe.create_optimizer(config)
  ref = optax.lamb(config.learning_rate, weight_decay=config.weight_decay)
  u1, _ = tx.update(grads, tx.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  chex.assert_trees_all_close(u1, u2)


def test_step_rngs_are_a_function_of_seed_and_step():
  a = jax.random.key_data(steps.step_rngs(0, 5))
  b = jax.random.key_data(steps.step_rngs(0, 5))
  c = jax.random.key_data(steps.step_rngs(0, 6))
  d = jax.random.key_data(steps.step_rngs(1, 5))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_indivisible_batch_is_a_clear_error():
  mesh = sharding_lib.create_mesh(jax.devices()[:8])
  with pytest.raises(ValueError, match=r'config.batch_size=12 must be a '
                     r'positive multiple of the number of devices \(8\)'):
    sharding_lib.check_batch_size(12, mesh)
  sharding_lib.check_batch_size(16, mesh)


def test_sharding_rules_by_name():
  mesh = sharding_lib.create_mesh(jax.devices()[:8])
  tree = {'encoder': {'kernel': np.zeros((8, 4)), 'bias': np.zeros(4)}}
  shardings = sharding_lib.tree_shardings(
      tree, mesh, [('.*kernel', ('data', None))])
  assert shardings['encoder']['kernel'].spec == jax.sharding.PartitionSpec(
      'data', None)
  assert shardings['encoder']['bias'].is_fully_replicated
  with pytest.raises(ValueError, match='rank 1'):
    sharding_lib.tree_shardings(tree, mesh, [('.*bias', (None, 'data'))])
