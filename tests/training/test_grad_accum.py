"""Gradient accumulation: K micro-batches train as one batch, up to rounding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fake_data
from perceiver_jax import config_lib
from perceiver_jax import create_model
from perceiver_jax import errors
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from tests.training.test_steps import NUM_CLASSES
from tests.training.test_steps import STATS
from tests.training.test_steps import _batch
from tests.training.test_steps import assert_params_close

DEVICES = 8
BATCH = 32  # 4 micro-batches of 8: one row per device each.
ACCUM = 4
# Same HLO, quicker XLA:CPU code generation.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
COLLECTIVES = ('all-reduce', 'all-gather', 'all-to-all', 'collective-permute',
               'reduce-scatter')


def _config(accum, recipe=False, dropout=False):
  config = fake_data.get_config()
  config.batch_size = BATCH
  config.grad_accum_steps = accum
  config.num_iterations = 1  # Half the program to compile.
  if not dropout:
    config.dropout_rate = 0.0
    config.attention_dropout_rate = 0.0
  if recipe:  # Options that act on the whole batch, its targets or grads.
    # (RandAugment, left out to save its compile, acts on the whole batch as
    # the seed's flip and zoom do.)
    config.label_smoothing = 0.1
    config.mixup_alpha = 0.8
    config.cutmix_alpha = 1.0
    config.grad_clip_norm = 1.0
    config.ema_decay = 0.9
  return config


def _train(config, num_steps=3):
  """`num_steps` steps on 8 devices: the final state, each step's metrics."""
  mesh = sharding_lib.create_mesh(jax.devices()[:DEVICES])
  sharding_lib.check_batch_size(config.batch_size, mesh,
                                micro_batches=steps.grad_accum_steps(config))
  state, shardings = steps.create_train_state(
      config, create_model(config, NUM_CLASSES),
      (config.image_size, config.image_size, 3), mesh)
  train_step, _ = steps.jit_steps(config, STATS, mesh, shardings)
  batches = [sharding_lib.global_batch(mesh, _batch(BATCH, seed=i))
             for i in range(num_steps)]
  lowered = train_step.lower(state, batches[0], 1e-3)
  loops = lowered.as_text().count('stablehlo.while')
  train_step = lowered.compile(compiler_options=FAST_COMPILE)
  history = []
  for batch in batches:
    state, metrics = train_step(state, batch, 1e-3)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, loops


@pytest.mark.parametrize('recipe', [False, True], ids=['seed', 'recipe'])
def test_four_micro_batches_train_as_one_batch(recipe):
  """Parameters, EMA and every metric of 3 steps, dropout off.

  With the recipe on, augmentation and MixUp / CutMix must act on the
  whole batch and the mixed targets follow each micro-batch's rows.
  """
  one, history_one, loops_one = _train(_config(1, recipe))
  four, history_four, loops_four = _train(_config(ACCUM, recipe))
  # K>1 adds one loop, over the micro-batches; K=1 is the plain step.
  assert loops_four == loops_one + 1
  trees = [('params', one.params, four.params)]
  if recipe:
    trees.append(('ema', one.ema_params, four.ema_params))
  for label, a, b in trees:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                            jax.tree.leaves(b)):
      assert_params_close(label + str(path), x, y, atol=2e-6)
  for m1, m4 in zip(history_one, history_four):
    assert set(m1) == set(m4)
    assert m4['count'] == BATCH
    chex.assert_trees_all_close(m1, m4, atol=1e-5, rtol=1e-5)
  assert int(four.step) == 3


def test_each_micro_batch_draws_its_own_dropout_masks():
  """Four identical micro-batches: their logits differ only by dropout."""
  base = _batch(BATCH // ACCUM, seed=3)
  # Micro-batch k is rows k, k + K, ... (checked below): each one is `base`.
  images = jnp.asarray(np.repeat(base['image'][:, :16, :16], ACCUM, axis=0),
                       jnp.float32) / 255.0
  labels = jnp.asarray(np.repeat(base['label'], ACCUM))
  config = _config(ACCUM, dropout=True)
  model = create_model(config, NUM_CLASSES)
  params = model.init({'params': jax.random.key(0)}, images[:1],
                      train=False)['params']
  gradients = jax.jit(lambda p, x, y: steps.gradients(
      model.apply, p, x, y, None, jax.random.key(1), config))
  _, logits, _, micro_labels = gradients.lower(params, images, labels).compile(
      compiler_options=FAST_COMPILE)(params, images, labels)
  assert logits.shape == (ACCUM, BATCH // ACCUM, NUM_CLASSES)
  np.testing.assert_array_equal(
      micro_labels, np.broadcast_to(base['label'], micro_labels.shape))
  logits = np.asarray(logits)
  for k in range(1, ACCUM):
    for j in range(k):  # No two micro-batches share their masks.
      assert np.abs(logits[k] - logits[j]).max() > 1e-3, (j, k)


def test_micro_batches_stay_on_their_devices():
  """Micro-batch k is rows k, k+K, ...; splitting moves no data.

  Each device's shard of a micro-batch is rows of its own shard of the
  batch, so the compiled split has no collective at all.
  """
  mesh = sharding_lib.create_mesh(jax.devices()[:DEVICES])
  sharding = sharding_lib.data_sharding(mesh)
  rows = np.arange(BATCH * 3, dtype=np.float32).reshape(BATCH, 3)
  batch = jax.device_put(rows, sharding)
  split = jax.jit(
      lambda x, k: steps.micro_batch(steps.micro_batches(x, ACCUM), k,
                                     sharding),
      in_shardings=(sharding, None), out_shardings=sharding)
  for k in range(ACCUM):
    part = split(batch, k)
    np.testing.assert_array_equal(np.asarray(part), rows[k::ACCUM])
    shards = part.addressable_shards
    assert len(shards) == DEVICES
    for shard in shards:
      assert shard.data.shape == (BATCH // ACCUM // DEVICES, 3)
  text = split.lower(batch, 0).compile().as_text()
  found = [c for c in COLLECTIVES if c in text]
  assert not found, found


def test_batch_must_split_into_micro_batches():
  config = fake_data.get_config()  # batch_size 16
  config.grad_accum_steps = 3
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert ('config.batch_size=16 must be a multiple of config.grad_accum_steps'
          '=3, so that every micro-batch holds batch_size / grad_accum_steps '
          'examples; pass e.g. --config.grad_accum_steps=2 or '
          '--config.batch_size=18.') in str(e.value)
  config.grad_accum_steps = 0
  with pytest.raises(config_lib.ConfigError, match=(
      r'config.grad_accum_steps=0 must be a positive integer')):
    config_lib.validate(config)
  config.grad_accum_steps = 16
  config_lib.validate(config)
  del config['grad_accum_steps']  # Saved before the field existed: 1.
  assert config_lib.validate(config) and steps.grad_accum_steps(config) == 1


def test_every_micro_batch_must_split_over_the_devices():
  mesh = sharding_lib.create_mesh(jax.devices()[:DEVICES])
  with pytest.raises(errors.InputError) as e:
    sharding_lib.check_batch_size(48, mesh, micro_batches=4)
  assert str(e.value) == (
      'config.batch_size=48 must be a positive multiple of '
      'config.grad_accum_steps (4) x the number of devices (8) = 32, so '
      'every micro-batch splits evenly over the devices; use '
      '--config.batch_size=32 or another multiple of 32, or '
      '--config.grad_accum_steps=3 to keep this batch.')
  with pytest.raises(errors.InputError, match='use --config.batch_size=32 or '
                     r'another multiple of 32\.$'):
    sharding_lib.check_batch_size(4, mesh, micro_batches=4)
  sharding_lib.check_batch_size(64, mesh, micro_batches=4)
  sharding_lib.check_batch_size(8, mesh, micro_batches=1)
