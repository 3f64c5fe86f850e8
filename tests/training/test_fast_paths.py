"""The speed options each match the float32 reference path on CPU.

Covers what tests/test_model.py and tests/test_steps.py do not: bfloat16 in
a whole train step, attention_impl None vs 'xla' in the whole model, which
attention path evaluation takes, donation of the train state, augmentation
keyed by (seed, step) inside the step, and configs/cifar100_fast.py.
(Rematerialisation is checked in tests/test_model.py.)
"""

import functools

import chex
from configs import cifar100
from configs import cifar100_fast
from configs import fake_data
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perceiver_jax import config_lib
from perceiver_jax import create_model
from perceiver_jax.data import augment
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from tests.model.test_perceiver import tiny_config

NUM_CLASSES = 10
LR = 1e-3
STATS = {'mean': np.array([120., 110., 100.]),
         'variance': np.array([3000., 2800., 2900.])}


# XLA:CPU's LLVM optimisations take half of each compile here and change
# nothing these tests check (same HLO, float results to rounding).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def compile_fast(fn, *args):
  """jit(fn) compiled for args, quickly; call it with the same arg types."""
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.fixture(scope='module', autouse=True)
def _rbg_keys():
  """'rbg' keys: XLA:CPU compiles threefry several times slower (see
  tests/test_model.py); nothing tested here depends on the key type."""
  with jax.default_prng_impl('rbg'):
    yield


def small_config(**overrides):
  """fake_data without dropout (so losses can be recomputed outside the
  step) and with one iteration (faster to compile)."""
  config = fake_data.get_config()
  config.update(dict(dropout_rate=0.0, attention_dropout_rate=0.0,
                     num_iterations=1))
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, (n,), dtype=np.int32)}


class Step:
  """A compiled train step and a host copy of its initial state."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding_lib.create_mesh(jax.devices()[:1])
    self.model = create_model(config, NUM_CLASSES)
    shape = (config.image_size, config.image_size, 3)
    state, self.shardings = steps.create_train_state(config, self.model,
                                                     shape, self.mesh)
    train, _ = steps.jit_steps(config, STATS, self.mesh, self.shardings)
    self.batch = sharding_lib.global_batch(self.mesh, _batch())
    self.compiled = train.lower(state, self.batch, LR).compile(
        compiler_options=FAST_COMPILE)
    self.host_state = jax.device_get(state)

  def fresh_state(self, step=0):
    """A new on-device copy of the initial state (the step donates it)."""
    host = self.host_state.replace(step=np.asarray(step, np.int32))
    return jax.device_put(host, self.shardings)

  def __call__(self, state):
    return self.compiled(state, self.batch, LR)


@functools.lru_cache(maxsize=None)
def step_for(dtype):
  """Each dtype's model initialises its own state, as main.py's would."""
  return Step(small_config(dtype=dtype))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


# --------------------------------------------------------------------------
# bfloat16 compute.


def test_bfloat16_train_step_matches_float32():
  """(bfloat16 logits alone: tests/test_model.py.)"""
  f32, bf16 = step_for('float32'), step_for('bfloat16')
  # Initialised independently, the two models start from the very same
  # float32 parameters: the compute dtype changes no key and no initialiser
  # (so a bfloat16 run is the float32 run, computed in bfloat16).
  assert {x.dtype for x in jax.tree.leaves(bf16.host_state.params)} == {
      np.dtype('float32')}
  chex.assert_trees_all_equal(f32.host_state.params, bf16.host_state.params)
  state32, metrics32 = f32(f32.fresh_state())
  state16, metrics16 = bf16(bf16.fresh_state())
  # Relative errors of values known not to be small: the loss is a sum of
  # 16 cross-entropies near ln(10) (random initial logits), the gradient
  # norm far from 0. bfloat16 rounds to 2**-9 relative (0.2%); the loss
  # averages those roundings over the batch and must stay within 0.2%, the
  # gradient norm (twice the depth: forward and backward) within 1%.
  assert 16 * 1.5 < metrics32['loss'] < 16 * 4, metrics32['loss']
  assert metrics32['grad_norm'] > 1, metrics32['grad_norm']
  np.testing.assert_allclose(metrics16['loss'], metrics32['loss'], rtol=2e-3)
  np.testing.assert_allclose(metrics16['grad_norm'], metrics32['grad_norm'],
                             rtol=1e-2)
  # Parameters and the whole optimiser state stay float32 (the counters
  # int32): bfloat16 is for compute only.
  dtypes = {x.dtype for x in jax.tree.leaves((state16.params,
                                               state16.opt_state))}
  assert dtypes <= {np.dtype('float32'), np.dtype('int32')}, dtypes
  # The LAMB updates point the same way: cosine similarity above 0.95.
  initial = _flat(f32.host_state.params)
  u32 = _flat(jax.device_get(state32.params)) - initial
  u16 = _flat(jax.device_get(state16.params)) - initial
  cosine = u32 @ u16 / np.linalg.norm(u32) / np.linalg.norm(u16)
  assert cosine > 0.95, cosine


# --------------------------------------------------------------------------
# Attention implementations.




@functools.lru_cache(maxsize=None)
def tiny_inputs():
  config = tiny_config()
  images = jnp.asarray(np.random.RandomState(0).normal(size=(3, 8, 8, 3)),
                       jnp.float32)
  variables = create_model(config, NUM_CLASSES).init(
      jax.random.key(0), images, train=False)
  return images, variables


def test_model_with_attention_impl_none_equals_xla():
  images, variables = tiny_inputs()
  logits = {}
  for impl in (None, 'xla'):
    model = create_model(tiny_config(attention_impl=impl), NUM_CLASSES)
    assert model.compute.attention_impl == impl
    logits[impl] = compile_fast(functools.partial(model.apply, train=False),
                                variables, images)(variables, images)
  # On CPU, None selects the XLA implementation: bitwise the same program.
  np.testing.assert_array_equal(logits[None], logits['xla'])


def test_eval_uses_dot_product_attention_and_equals_materialised_path(
    monkeypatch):
  images, variables = tiny_inputs()
  calls = []
  original = jax.nn.dot_product_attention

  def counting(*args, **kwargs):
    calls.append(kwargs.get('implementation'))
    return original(*args, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', counting)
  # No FFN dropout and a negligible attention dropout: training takes the
  # materialised-weights path but computes the same function.
  config = tiny_config(dropout_rate=0.0, attention_dropout_rate=1e-9)
  model = create_model(config, NUM_CLASSES)
  evaluated = compile_fast(functools.partial(model.apply, train=False),
                           variables, images)(variables, images)
  # Each iteration: one cross-attention and one self-attention per block.
  assert len(calls) == config.num_iterations * (
      1 + config.num_transformer_blocks)
  assert set(calls) == {'xla'}
  calls.clear()
  train = lambda v, x, rng: model.apply(v, x, train=True,
                                        rngs={'dropout': rng})
  rng = jax.random.key(1)
  trained = compile_fast(train, variables, images, rng)(variables, images, rng)
  assert not calls  # Attention dropout active: weights materialised.
  np.testing.assert_allclose(evaluated, trained, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Donation and augmentation inside the step.


def test_train_step_donates_the_state():
  step = step_for('float32')
  state = step.fresh_state()
  old = jax.tree_util.tree_leaves_with_path(state)
  new, _ = step(state)
  # Every buffer is handed to XLA for reuse except the injected learning
  # rate, a scalar the step replaces with its argument without reading it
  # (so XLA has nothing to alias it to and jax keeps it).
  kept = [jax.tree_util.keystr(path) for path, x in old if not x.is_deleted()]
  assert kept == [".opt_state.hyperparams['learning_rate']"], kept
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_augmentation_inside_the_step_is_keyed_by_seed_and_step():
  step = step_for('float32')
  config = step.config
  run = lambda s: jax.device_get(step(step.fresh_state(s)))
  (state_a, metrics_a), (state_b, metrics_b) = run(5), run(5)
  np.testing.assert_array_equal(_flat(state_a.params), _flat(state_b.params))
  assert metrics_a == metrics_b

  # Without dropout the step's loss is the model's loss on
  # preprocess_train(step_rngs(seed, step)[0], batch): the augmentation, and
  # only it, is keyed by (seed, step).
  labels = _batch()['label']
  apply = None

  def loss_outside(seed, step_number):
    rng = steps.step_rngs(seed, step_number)[0]
    images = augment.preprocess_train(
        rng, _batch()['image'], STATS['mean'], STATS['variance'],
        config.image_size)
    nonlocal apply
    params = {'params': step.host_state.params}
    if apply is None:
      apply = compile_fast(functools.partial(step.model.apply, train=False),
                           params, images)
    logits = apply(params, images)
    return float(jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits, labels)))

  np.testing.assert_allclose(metrics_a['loss'], loss_outside(config.seed, 5),
                             rtol=1e-5)
  assert not np.isclose(metrics_a['loss'], loss_outside(config.seed + 1, 5),
                        rtol=1e-4)
  _, metrics_c = run(6)
  assert not np.isclose(metrics_a['loss'], metrics_c['loss'], rtol=1e-4)


# --------------------------------------------------------------------------
# The throughput config.


def test_fast_config_is_the_seed_model_with_speed_options():
  fast, seed = cifar100_fast.get_config(), cifar100.get_config()
  config_lib.validate(fast)
  changed = {k for k in fast.keys() if k not in seed or fast[k] != seed[k]}
  # remat is unchanged where configs/cifar100.py defines it (False).
  assert ({'batch_size', 'learning_rate', 'dtype', 'attention_impl'} <= changed
          <= {'batch_size', 'learning_rate', 'dtype', 'attention_impl',
              'remat'}), changed
  assert fast.batch_size == 512 and fast.dtype == 'bfloat16'
  # LAMB's square-root learning-rate scaling with the batch size.
  np.testing.assert_allclose(
      fast.learning_rate,
      seed.learning_rate * np.sqrt(fast.batch_size / seed.batch_size))
  model = create_model(fast, 100)
  assert model.dtype == jnp.bfloat16 and model.compute.attention_impl is None
  params = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}
