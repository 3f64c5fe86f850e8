"""Recipe options beyond the seed: each against its definition, defaults exact.

The seed's path is pinned by comparing the default train step with a step
built by hand from plain optax.lamb and the seed's loss; every option is
off by default. Steps compile with XLA:CPU's backend optimisations off
(same HLO, much quicker here).
"""

import functools

from configs import cifar100
from configs import cifar100_paper
from configs import fake_data
from configs import imagenet_perceiver
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perceiver_jax import config_lib
from perceiver_jax import create_model
from perceiver_jax.data import augment
from perceiver_jax.data import mixing
from perceiver_jax.data import randaugment
from perceiver_jax.training import recipe
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from tests.training.test_steps import STATS
from tests.training.test_steps import assert_params_close

NUM_CLASSES = 10
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def small_config(**overrides):
  config = fake_data.get_config()
  config.num_iterations = 1  # Quicker to compile.
  config.update(overrides)
  return config


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32),
          'mask': np.ones(n, np.float32)}


def _compiled_steps(config, num_devices, with_eval):
  mesh = sharding_lib.create_mesh(jax.devices()[:num_devices])
  model = create_model(config, NUM_CLASSES)
  state, shardings = steps.create_train_state(
      config, model, (config.image_size, config.image_size, 3), mesh)
  train, evaluate = steps.jit_steps(config, STATS, mesh, shardings)
  batch = sharding_lib.global_batch(mesh, _batch())
  train = train.lower(state, batch, 1e-3).compile(
      compiler_options=FAST_COMPILE)
  if with_eval:
    evaluate = evaluate.lower(state, batch).compile(
        compiler_options=FAST_COMPILE)
  return mesh, model, state, train, evaluate


def _train(config, num_devices, num_steps=2, with_eval=True):
  """Runs `num_steps` train steps; returns what the tests look at."""
  mesh, model, state, train, evaluate = _compiled_steps(config, num_devices,
                                                        with_eval)
  params, history = [jax.device_get(state.params)], []
  for i in range(num_steps):
    state, metrics = train(state, sharding_lib.global_batch(
        mesh, _batch(seed=i)), 1e-3)
    params.append(jax.device_get(state.params))
    history.append(jax.device_get(metrics))
  return dict(model=model, state=state, params=params, history=history,
              evaluate=evaluate,
              eval_batch=sharding_lib.global_batch(mesh, _batch(seed=9)))


# --------------------------------------------------------------------------
# The seed's path.


def test_defaults_are_the_seed_and_valid():
  config = cifar100.get_config()
  for name, default in recipe.OPTION_DEFAULTS.items():
    assert config[name] == default, name
  assert config_lib.config_problems(config) == []
  assert not recipe.uses_soft_targets(config)


@pytest.mark.parametrize('name,value,message', [
    ('lr_schedule', 'cosine', "'plateau', 'warmup_cosine' or 'step'"),
    ('warmup_epochs', -1, 'a non-negative integer'),
    ('lr_decay_epochs', (84, 84), 'increasing positive integers (epochs)'),
    ('lr_decay_epochs', (0, 10), 'increasing positive integers (epochs)'),
    ('lr_decay_factor', 0.0, 'in (0, 1]'),
    ('lr_decay_factor', 1.5, 'in (0, 1]'),
    ('min_learning_rate', 0.5, 'a number in [0, learning_rate]'),
    ('label_smoothing', 1.0, 'in [0, 1)'),
    ('weight_decay_mask', 'bias', "'all' or 'kernels'"),
    ('optimizer', 'adam', "'lamb', 'sgd' or 'adamw'"),
    ('momentum', 1.0, "in [0, 1) (optimizer='sgd')"),
    ('grad_clip_norm', -1.0, 'a non-negative number (0: off)'),
    ('mixup_alpha', -0.1, 'a non-negative number (0: off)'),
    ('cutmix_alpha', -0.1, 'a non-negative number (0: off)'),
    ('mix_prob', 1.5, 'in [0, 1]'),
    ('randaugment_num_ops', 11, 'an integer in [0, 10] (0: off)'),
    ('randaugment_magnitude', 12.0, "in [0, 10] (timm's scale)"),
    ('ema_decay', 1.0, 'in [0, 1) (0: off)'),
])
def test_bad_recipe_values_name_the_field_and_the_allowed_values(
    name, value, message):
  config = cifar100.get_config()
  config[name] = value
  problems = config_lib.config_problems(config)
  assert len(problems) == 1, problems
  assert problems[0].startswith(f'config.{name}={value!r} must be {message}')
  assert f'--config.{name}=' in problems[0]


def test_warmup_must_be_shorter_than_the_run():
  config = cifar100.get_config()
  config.lr_schedule, config.warmup_epochs = 'warmup_cosine', 50
  assert config_lib.config_problems(config) == [
      "config.warmup_epochs=50 must be smaller than config.num_epochs=50 "
      "with lr_schedule='warmup_cosine'; pass e.g. --config.warmup_epochs=5."]
  config.lr_schedule = 'plateau'  # Unused by the plateau schedule.
  assert config_lib.config_problems(config) == []
  config.lr_schedule = 'step'
  assert config_lib.config_problems(config) == [
      "config.warmup_epochs=50 must be smaller than config.num_epochs=50 "
      "with lr_schedule='step'; pass e.g. --config.warmup_epochs=5."]


def test_step_decays_past_the_end_are_logged_not_refused(caplog):
  # A run cut short (fine-tuning, fewer epochs) keeps the decays it reaches.
  config = cifar100.get_config()
  config.update(dict(lr_schedule='step', learning_rate=4e-3, num_epochs=6,
                     lr_decay_epochs=(4, 6, 8), lr_decay_factor=0.1))
  assert config_lib.config_problems(config) == []
  with caplog.at_level('WARNING'):
    rates = recipe.LearningRates(config, steps_per_epoch=2)
  np.testing.assert_allclose([rates.at(s, 123.0) for s in range(12)],
                             np.repeat([4e-3, 4e-4], [8, 4]), rtol=1e-6)
  assert ('lr_decay_epochs (4, 6, 8): no decay at [6, 8], at or after the '
          'end of num_epochs=6.') in caplog.text


def test_default_train_step_equals_plain_lamb_and_the_seed_loss():
  config = small_config()
  run = _train(config, 1, with_eval=False)
  model, state, history = run['model'], run['state'], run['history']
  assert state.ema_params is None
  tx = optax.lamb(config.learning_rate, weight_decay=config.weight_decay)
  params = run['params'][0]

  def reference_step(params, opt_state, step, batch):
    augment_key, dropout_key = steps.step_rngs(config.seed, step)
    images = augment.preprocess_train(augment_key, batch['image'],
                                      STATS['mean'], STATS['variance'],
                                      config.image_size)

    def loss_fn(p):
      logits = model.apply({'params': p}, images, train=True,
                           rngs={'dropout': dropout_key})
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits, batch['label']))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  batches = [{k: v for k, v in _batch(seed=i).items() if k != 'mask'}
             for i in range(2)]
  reference_step = jax.jit(reference_step).lower(
      params, opt_state, 0, batches[0]).compile(compiler_options=FAST_COMPILE)
  for i, batch in enumerate(batches):
    params, opt_state, loss = reference_step(params, opt_state, i, batch)
    np.testing.assert_allclose(history[i]['loss'] / 16, loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(jax.device_get(state.params))):
    assert_params_close(str(path), a, b, atol=5e-7)


def test_default_optimizer_is_bit_identical_to_the_seeds():
  """Same state tree and bit-equal updates as inject_hyperparams(lamb)."""
  config = small_config()
  params = jax.eval_shape(
      functools.partial(create_model(config, NUM_CLASSES).init, train=False),
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        params)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                       params)
  seed_tx = optax.inject_hyperparams(optax.lamb)(
      learning_rate=config.learning_rate, weight_decay=config.weight_decay)
  tx = recipe.create_optimizer(config)
  state, seed_state = tx.init(params), seed_tx.init(params)
  assert (jax.tree.structure(state) == jax.tree.structure(seed_state))
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    seed_updates, seed_state = seed_tx.update(grads, seed_state, params)
    chex.assert_trees_all_equal(updates, seed_updates)


# --------------------------------------------------------------------------
# Optimiser options.


def _model_params(**overrides):
  config = small_config(**overrides)
  return jax.eval_shape(
      functools.partial(create_model(config, NUM_CLASSES).init, train=False),
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']


@pytest.mark.parametrize('overrides', [
    {},  # The seed's model: learned positions, one-head cross-attention.
    dict(position_encoding='fourier', fourier_num_bands=2,
         num_cross_heads=2, decoder='query', weight_sharing='none'),
])
def test_decay_mask_decays_only_dense_kernels(overrides):
  params = _model_params(**overrides)
  names = {jax.tree_util.keystr(p): leaf for p, leaf in
           jax.tree_util.tree_leaves_with_path(params)}
  mask = {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_leaves_with_path(recipe.decay_mask(params))}
  assert mask.keys() == names.keys()
  decayed = {k for k, v in mask.items() if v}
  assert decayed == {k for k in names if k.endswith("['kernel']")}
  assert all(len(names[k].shape) >= 2 for k in decayed)
  # What is left undecayed, by the leaf's own name.
  kept = {k.rsplit("['", 1)[1][:-2] for k, v in mask.items() if not v}
  expected = {'bias', 'scale', 'latent_array'} | (
      {'query'} if overrides else {'position_embedding'})
  assert kept == expected


def test_decay_mask_of_the_imagenet_model():
  """Only the Dense kernels decay: not the latent array, biases or
  LayerNorms; the Fourier features and the unprojected pixels have no
  parameters to decay."""
  config = imagenet_perceiver.get_config()
  assert config.weight_decay_mask == 'kernels'
  params = jax.eval_shape(
      functools.partial(create_model(config, 1000).init, train=False),
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  mask = {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_leaves_with_path(recipe.decay_mask(params))}
  leaves = {jax.tree_util.keystr(p): leaf for p, leaf in
            jax.tree_util.tree_leaves_with_path(params)}
  assert 'patch_encoder' not in params
  assert not mask["['latent_array']"]
  decayed = {k for k, v in mask.items() if v}
  assert decayed == {k for k in leaves if k.endswith("['kernel']")}
  kept = {k.rsplit("['", 1)[1][:-2] for k in set(mask) - decayed}
  assert kept == {'bias', 'scale', 'latent_array'}
  size = lambda keys: sum(int(np.prod(leaves[k].shape)) for k in keys)
  # Undecayed: the 512 x 1024 latents; Dense biases (2 cross-attends: q, k,
  # v 261, output and MLP 3 x 1024; 6 blocks: 6 x 1024; the head's 1000);
  # LayerNorm scales and offsets (2 x (1024 + 261 + 1024), 6 x 2 x 1024).
  biases = 2 * (3 * 261 + 3 * 1024) + 6 * 6 * 1024 + 1000
  norms = 2 * 2 * (1024 + 261 + 1024) + 6 * 2 * 2 * 1024
  assert size(set(mask) - decayed) == 512 * 1024 + biases + norms
  assert size(decayed) + size(set(mask) - decayed) == 44_912_254


def test_kernels_mask_leaves_biases_undecayed():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'latent_array': jnp.ones((2, 4))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for mode, decays_all in (('all', True), ('kernels', False)):
    config = small_config(weight_decay_mask=mode, weight_decay=0.1)
    tx = recipe.create_optimizer(config)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradients: the update is the (trust-scaled) decay alone.
    assert float(jnp.abs(updates['dense']['kernel']).max()) > 0
    for moved in (updates['dense']['bias'], updates['latent_array']):
      assert (float(jnp.abs(moved).max()) > 0) == decays_all


def test_grad_clip_is_clip_then_lamb_with_an_injectable_learning_rate():
  config = small_config(grad_clip_norm=1.0)
  params = {'w': jnp.ones((3, 3)), 'b': jnp.ones(3)}
  grads = {'w': jnp.full((3, 3), 2.0), 'b': jnp.full(3, -3.0)}
  tx = recipe.create_optimizer(config)
  opt_state = tx.init(params)
  assert set(opt_state.hyperparams) >= {'learning_rate', 'weight_decay'}
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.lamb(0.5, weight_decay=config.weight_decay))
  opt_state.hyperparams['learning_rate'] = jnp.float32(0.5)
  u1, _ = tx.update(grads, opt_state, params)
  u2, _ = ref.update(grads, ref.init(params), params)
  chex.assert_trees_all_close(u1, u2, rtol=1e-6)


@pytest.mark.parametrize('optimizer,weight_decay', [
    ('sgd', 0.0), ('sgd', 0.05), ('adamw', 0.0), ('adamw', 0.05)])
def test_fine_tuning_optimizers_step_as_pytorchs(optimizer, weight_decay):
  """SGD with momentum and AdamW against torch.optim's, the references
  fine-tuning recipes are written for: five steps, a changing rate."""
  import torch  # pylint: disable=g-import-not-at-top  (test-only)
  config = small_config(optimizer=optimizer, weight_decay=weight_decay,
                        momentum=0.8)
  rng = np.random.default_rng(0)
  init = rng.normal(size=(4, 3)).astype(np.float32)
  # Adam's gradients small enough for its eps (1e-8) to matter.
  scale = 1e-7 if optimizer == 'adamw' else 1.0
  grads = [(scale * rng.normal(size=(4, 3))).astype(np.float32)
           for _ in range(5)]
  rates = [0.1, 0.05, 0.05, 0.02, 0.01]
  tx = recipe.create_optimizer(config)
  params = {'w': jnp.asarray(init)}
  opt_state = tx.init(params)
  reference = torch.nn.Parameter(torch.tensor(init))
  if optimizer == 'sgd':
    torch_opt = torch.optim.SGD([reference], lr=rates[0], momentum=0.8,
                                weight_decay=weight_decay)
  else:  # optax.adamw's defaults, in PyTorch's terms.
    torch_opt = torch.optim.AdamW([reference], lr=rates[0], betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=weight_decay)
  for g, lr in zip(grads, rates):
    opt_state.hyperparams['learning_rate'] = jnp.float32(lr)
    updates, opt_state = tx.update({'w': jnp.asarray(g)}, opt_state, params)
    params = optax.apply_updates(params, updates)
    for group in torch_opt.param_groups:
      group['lr'] = lr
    reference.grad = torch.tensor(g)
    torch_opt.step()
  np.testing.assert_allclose(params['w'], reference.detach().numpy(),
                             rtol=2e-5, atol=2e-6)


def test_warmup_cosine_learning_rates():
  config = small_config(lr_schedule='warmup_cosine', warmup_epochs=1,
                        min_learning_rate=1e-5, num_epochs=5,
                        learning_rate=2e-3)
  rates = recipe.LearningRates(config, steps_per_epoch=10)
  assert not rates.uses_plateau
  schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, 50, 1e-5)
  table = [rates.at(s, plateau_lr=123.0) for s in range(50)]
  np.testing.assert_allclose(table, [schedule(s) for s in range(50)],
                             rtol=1e-6)
  assert table[0] == 0.0 and table[10] == pytest.approx(2e-3)
  np.testing.assert_allclose(np.diff(table[:11]), 2e-4, rtol=1e-4)
  assert all(np.diff(table[10:]) < 0)
  # The last step is one short of the schedule's end (min_learning_rate).
  assert 1e-5 < table[-1] < 1e-5 + 2e-3 * (1 - np.cos(np.pi / 40)) / 2 * 1.01
  assert rates.at(10**6, 123.0) == table[-1]
  assert rates.of_epoch(2, 123.0) == pytest.approx(np.mean(table[20:30]))
  # The seed's schedule: whatever the plateau controller says.
  plateau = recipe.LearningRates(small_config(), steps_per_epoch=10)
  assert plateau.uses_plateau
  assert plateau.at(7, 0.25) == plateau.of_epoch(3, 0.25) == 0.25


@pytest.mark.parametrize('warmup_epochs', [0, 2])
def test_step_learning_rates(warmup_epochs):
  config = small_config(lr_schedule='step', learning_rate=4e-3,
                        lr_decay_epochs=(5, 7), lr_decay_factor=0.1,
                        num_epochs=8, warmup_epochs=warmup_epochs)
  rates = recipe.LearningRates(config, steps_per_epoch=4)
  assert not rates.uses_plateau
  table = np.asarray([rates.at(s, plateau_lr=123.0) for s in range(32)])
  # 4e-3 for epochs 0-4, 4e-4 for 5-6, 4e-5 for 7: steps 20 and 28 decay.
  expected = np.repeat([4e-3, 4e-4, 4e-5], [20, 8, 4])
  if warmup_epochs:  # Linear from 0 over the first 2 epochs (8 steps).
    expected[:8] *= np.arange(8) / 8
  np.testing.assert_allclose(table, expected, rtol=1e-6)
  assert rates.at(10**6, 123.0) == pytest.approx(4e-5)
  assert rates.of_epoch(5, 123.0) == pytest.approx(4e-4)
  assert rates.of_epoch(0, 123.0) == pytest.approx(
      4e-3 * (np.mean(np.arange(4) / 8) if warmup_epochs else 1.0))


def test_imagenet_step_schedule():
  config = imagenet_perceiver.get_config()
  rates = recipe.LearningRates(config, steps_per_epoch=2)
  epochs = [rates.of_epoch(e, plateau_lr=1.0) for e in range(120)]
  np.testing.assert_allclose(
      epochs, np.repeat([4e-3, 4e-4, 4e-5, 4e-6], [84, 18, 12, 6]),
      rtol=1e-6)


# --------------------------------------------------------------------------
# Loss and EMA.


def test_label_smoothing_loss():
  logits = jax.random.normal(jax.random.key(0), (6, 5))
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  plain = recipe.train_losses(small_config(), logits, labels)
  np.testing.assert_array_equal(
      plain, optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  smooth = recipe.train_losses(small_config(label_smoothing=0.1), logits,
                               labels)
  targets = jax.nn.one_hot(labels, 5) * 0.9 + 0.1 / 5
  np.testing.assert_allclose(
      smooth, -jnp.sum(targets * jax.nn.log_softmax(logits), -1), rtol=1e-6)
  # Mixed targets: weight * own + (1 - weight) * partner's.
  mixed = recipe.train_losses(small_config(mixup_alpha=1.0), logits, labels,
                              (jnp.float32(0.3), labels[::-1]))
  np.testing.assert_allclose(mixed, 0.3 * plain + 0.7 * (
      optax.softmax_cross_entropy_with_integer_labels(logits, labels[::-1])),
                             rtol=1e-5)


def test_ema_update_formula():
  ema = {'a': jnp.array([1.0, 2.0]), 'b': jnp.array(4.0)}
  params = {'a': jnp.array([3.0, 2.0]), 'b': jnp.array(0.0)}
  out = recipe.ema_update(ema, params, 0.75)
  chex.assert_trees_all_close(out, {'a': jnp.array([1.5, 2.0]),
                                    'b': jnp.array(3.0)})


# --------------------------------------------------------------------------
# MixUp and CutMix.


def test_mixup_is_a_convex_combination_with_the_mirrored_batch():
  images = jax.random.normal(jax.random.key(0), (4, 5, 6, 3))
  np.testing.assert_allclose(mixing.mixup(images, 0.3),
                             0.3 * images + 0.7 * images[::-1], rtol=1e-6)


@pytest.mark.parametrize('weight', [0.0, 0.2, 0.5, 0.93, 1.0])
def test_cutmix_box_area_matches_the_adjusted_weight(weight):
  for seed in range(8):
    box, adjusted = mixing.cutmix_box(jax.random.key(seed), 20, 30,
                                      jnp.float32(weight))
    assert box.shape == (20, 30)
    np.testing.assert_allclose(1.0 - float(box.mean()), adjusted, atol=1e-6)
  images = jax.random.normal(jax.random.key(1), (4, 20, 30, 3))
  mixed, adjusted = mixing.cutmix(jax.random.key(2), images,
                                  jnp.float32(weight))
  from_self = np.isclose(mixed, images).all(-1).mean(axis=(1, 2))
  np.testing.assert_allclose(from_self, adjusted, atol=1e-6)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.8, 0.0), (0.0, 1.0),
                                                       (0.8, 1.0)])
def test_mix_batch_targets_sum_to_one_and_are_deterministic(mixup_alpha,
                                                            cutmix_alpha):
  images = jax.random.normal(jax.random.key(0), (8, 24, 24, 3))
  labels = jnp.arange(8)
  mix = jax.jit(functools.partial(
      mixing.mix_batch, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      mix_prob=1.0))
  weights = []
  for seed in range(12):
    out, (weight, partner) = mix(jax.random.key(seed), images, labels)
    np.testing.assert_array_equal(partner, labels[::-1])
    assert 0.0 <= float(weight) <= 1.0
    soft = weight * jax.nn.one_hot(labels, 8) + (1 - weight) * jax.nn.one_hot(
        partner, 8)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
    again = mix(jax.random.key(seed), images, labels)
    np.testing.assert_array_equal(out, again[0])
    np.testing.assert_array_equal(weight, again[1][0])
    weights.append(float(weight))
  assert len(set(weights)) > 6  # A fresh weight per key.
  unmixed, (weight, _) = mixing.mix_batch(
      jax.random.key(0), images, labels, mixup_alpha=mixup_alpha,
      cutmix_alpha=cutmix_alpha, mix_prob=0.0)
  np.testing.assert_array_equal(unmixed, images)
  assert float(weight) == 1.0


# --------------------------------------------------------------------------
# RandAugment.


def _raw_images(n=6, size=12, channels=3, seed=0):
  return np.random.default_rng(seed).integers(
      0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.mark.parametrize('channels', [1, 3])
def test_every_op_at_level_zero_is_the_identity(channels):
  image = jnp.asarray(_raw_images(1, channels=channels)[0], jnp.float32)
  op = jax.jit(randaugment.apply_op)
  for index, (name, _) in enumerate(randaugment.OPS):
    np.testing.assert_array_equal(op(index, image, 0.0), image, err_msg=name)
    moved = op(index, image, 1.0)
    assert moved.shape == image.shape
    if name != 'identity' and not (name == 'color' and channels == 1):
      assert not np.array_equal(moved, image), name


def test_rand_augment_shapes_ranges_and_determinism():
  images = _raw_images()
  augment_fn = jax.jit(randaugment.rand_augment,
                       static_argnames=('num_ops', 'magnitude'))
  out = augment_fn(jax.random.key(0), images, num_ops=2, magnitude=9.0)
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
  np.testing.assert_array_equal(
      out, augment_fn(jax.random.key(0), images, num_ops=2, magnitude=9.0))
  assert not np.array_equal(
      out, augment_fn(jax.random.key(1), images, num_ops=2, magnitude=9.0))
  # Images draw their own ops: not all changed the same way.
  assert not np.array_equal(out - images, (out - images)[::-1])
  for num_ops, magnitude in ((0, 9.0), (2, 0.0)):
    np.testing.assert_array_equal(
        randaugment.rand_augment(jax.random.key(0), images, num_ops,
                                 magnitude), images.astype(np.float32))


def test_translate_moves_pixels_and_fills_with_grey():
  image = jnp.asarray(_raw_images(1, size=10)[0], jnp.float32)
  index = [n for n, _ in randaugment.OPS].index('translate_x')
  # pylint: disable-next=protected-access
  level = 2.0 / (randaugment._MAX_TRANSLATE * 10)  # A 2-pixel shift.
  out = randaugment.apply_op(index, image, level)
  np.testing.assert_allclose(out[:, :-2], image[:, 2:], atol=1e-4)
  np.testing.assert_allclose(out[:, -2:], 128.0)


# --------------------------------------------------------------------------
# Inside the sharded step.


def test_all_options_on_eight_devices_equal_one_and_eval_uses_ema():
  config = small_config(
      mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9, label_smoothing=0.1,
      randaugment_num_ops=2, grad_clip_norm=1.0, weight_decay_mask='kernels')
  one, eight = _train(config, 1), _train(config, 8)
  s1, s8, ev1, b1 = one['state'], eight['state'], one['evaluate'], one[
      'eval_batch']
  for tree1, tree8 in ((s1.params, s8.params), (s1.ema_params, s8.ema_params)):
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(jax.device_get(tree1)),
        jax.tree.leaves(jax.device_get(tree8))):
      assert_params_close(str(path), a, b, atol=2e-6)
  chex.assert_trees_all_close(one['history'], eight['history'], atol=1e-5,
                              rtol=1e-5)
  e1 = jax.device_get(ev1(s1, b1))
  e8 = jax.device_get(eight['evaluate'](s8, eight['eval_batch']))
  chex.assert_trees_all_close(e1, e8, atol=1e-5, rtol=1e-5)
  # Two EMA(0.9) updates from the initial params, as the formula says.
  p0, p1, p2 = one['params']
  expected = jax.tree.map(lambda a, b, c: 0.81 * a + 0.09 * b + 0.1 * c,
                          p0, p1, p2)
  chex.assert_trees_all_close(jax.device_get(s1.ema_params), expected,
                              atol=1e-6, rtol=1e-5)
  assert not np.allclose(p2['latent_array'],
                         jax.device_get(s1.ema_params['latent_array']))
  # Evaluation reads the EMA weights only: scrambling the raw ones changes
  # nothing, scrambling the EMA's does.
  scrambled = jax.tree.map(lambda p: p * 0.0 + 0.5, s1.params)
  e_raw = jax.device_get(ev1(s1.replace(params=scrambled), b1))
  chex.assert_trees_all_equal(e1, e_raw)
  e_ema = jax.device_get(ev1(s1.replace(ema_params=scrambled), b1))
  assert e_ema['loss'] != e1['loss']


def test_paper_config_is_valid():
  config = cifar100_paper.get_config()
  assert config_lib.config_problems(config) == []
  assert config.lr_schedule == 'warmup_cosine' and config.ema_decay > 0


def test_imagenet_test_config_trains_a_step():
  """The paper's options and recipe (RandAugment, masked decay, clipping)
  on a shrunk model: one train step."""
  config = imagenet_perceiver.get_config('test')
  assert config_lib.config_problems(config) == []
  run = _train(config, 1, num_steps=1, with_eval=False)
  (before, after), (metrics,) = run['params'], run['history']
  assert np.isfinite(metrics['loss']) and metrics['count'] == 16
  assert set(before) == {'latent_array', 'cross_attention_0',
                         'cross_attention_1', 'latent_transformer',
                         'classifier'}
  for name in before:  # Every weight set and the latents learn.
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before[name]), jax.tree.leaves(after[name]))), name
