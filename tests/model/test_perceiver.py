"""Tests for the Perceiver model against the Keras example it reproduces.

The strongest check rebuilds the seed's Keras model with Keras 3 (its code,
with layer names added), copies its perturbed weights into the Flax params
and compares logits: that fixes patch order, weight sharing, the learned
cross-attention scale and every residual's placement at once.
"""

import contextlib
import functools
import os
import random
import subprocess
import sys

import chex
from configs import cifar100
from configs import fake_data
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import create_model
from perceiver_jax.model import attention
from perceiver_jax.model import encoders

from tests.support import ROOT

NUM_CLASSES = 5
# The model works with any key type. The tests use 'rbg' keys because XLA:CPU
# compiles threefry (partitionable, jax's default) random bits several times
# slower, which would dominate this file's runtime.
key = functools.partial(jax.random.key, impl='rbg')
# XLA:CPU's LLVM optimisations change no value these tests check (same HLO,
# float results to rounding) and take much of each compile.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def tiny_config(**overrides):
  """Small enough for the Keras comparison; 2 blocks catch indexing bugs."""
  config = fake_data.get_config()
  config.update(dict(image_size=8, patch_size=2, latent_dim=4,
                     projection_dim=8, num_heads=2, ffn_units=(8, 8),
                     num_transformer_blocks=2, num_iterations=2,
                     classifier_units=(8,)))
  config.update(overrides)
  return config


def images_for(config, batch=3, channels=3, seed=0):
  shape = (batch, config.image_size, config.image_size, channels)
  return jnp.asarray(np.random.RandomState(seed).normal(size=shape),
                     jnp.float32)


def init(model, images):
  return jax.jit(functools.partial(model.init, train=False))(
      key(0), images)


def jitted_apply(model):
  return jax.jit(model.apply, static_argnames='train')


@functools.lru_cache(maxsize=None)
def tiny():
  """(model, images, variables, jitted apply) shared to save compilations."""
  config = tiny_config()
  model = create_model(config, NUM_CLASSES)
  images = images_for(config)
  return model, images, init(model, images), jitted_apply(model)


@functools.lru_cache(maxsize=None)
def fake():
  """The smoke-run config (d=16, 2 heads, 8 latents), initialised."""
  config = fake_data.get_config()
  model = create_model(config, 100)
  images = images_for(config, batch=2)
  return config, model, images, init(model, images)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def keras_param_count(config, num_classes, channels=3):
  """The Keras example's trainable parameters, layer by layer."""
  d = config.projection_dim
  num_patches = (config.image_size // config.patch_size)**2
  dense = lambda fan_in, units: fan_in * units + units
  layer_norm = 2 * d  # gamma, beta

  def ffn(units):
    widths = (d,) + tuple(units)
    return sum(dense(a, b) for a, b in zip(widths[:-1], widths[1:]))

  latent_array = config.latent_dim * d
  patch_encoder = dense(config.patch_size**2 * channels, d) + num_patches * d
  # 2 input LNs, q/k/v Dense, Attention's scalar scale, LN, FFN.
  cross_attention = (2 * layer_norm + 3 * dense(d, d) + 1 + layer_norm +
                     ffn(config.ffn_units))
  # MultiHeadAttention(key_dim=d): q/k/v kernels (d, h, d) + biases (h, d);
  # output kernel (h, d, d) + bias (d,).
  h = config.num_heads
  mha = 3 * (d * h * d + h * d) + (h * d * d + d)
  block = layer_norm + mha + layer_norm + ffn(config.ffn_units)
  head = ffn(tuple(config.classifier_units) + (num_classes,))
  return (latent_array + patch_encoder + cross_attention +
          config.num_transformer_blocks * block + head)


# --------------------------------------------------------------------------
# Shapes, parameter count, initialisers.


def test_output_shape_fake_data_config():
  _, model, images, variables = fake()
  logits = jitted_apply(model)(variables, images, train=False)
  assert logits.shape == (2, 100)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_cifar100_shapes_and_parameter_count_match_keras():
  config = cifar100.get_config()
  model = create_model(config, 100)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(
      functools.partial(model.init, train=False), key(0), images)
  logits = jax.eval_shape(functools.partial(model.apply, train=False),
                          variables, images)
  assert logits.shape == (2, 100)
  assert set(variables) == {'params'}
  assert count(variables) == keras_param_count(config, 100) == 9_697_637


def test_parameter_tree_top_level():
  params = tiny()[2]['params']
  assert set(params) == {'patch_encoder', 'latent_array', 'cross_attention',
                         'latent_transformer', 'classifier'}
  assert set(params['latent_transformer']) == {'block_0', 'block_1'}
  mha = params['latent_transformer']['block_0']['self_attention']
  assert mha['query']['kernel'].shape == (8, 2, 8)
  assert mha['query']['bias'].shape == (2, 8)
  assert mha['output']['kernel'].shape == (2, 8, 8)
  assert mha['output']['bias'].shape == (8,)


def test_keras_default_initialisers():
  config, _, _, variables = fake()
  params = variables['params']
  d, h = config.projection_dim, config.num_heads

  def assert_glorot(kernel, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    peak = np.abs(kernel).max()
    assert 0.8 * limit < peak <= limit, (kernel.shape, peak, limit)

  mha = params['latent_transformer']['block_0']['self_attention']
  # The seed's Keras 2.7 treats the 3-D kernels like conv kernels: receptive
  # field = product of the leading axes.
  for name in ('query', 'key', 'value'):
    assert_glorot(mha[name]['kernel'], h * d, d * d)
  assert_glorot(mha['output']['kernel'], d * h, d * h)
  # Keras 3 EinsumDense fans: the einsum's input and output axes.
  with config.unlocked():
    config.attention_init = 'keras3'
  keras3 = create_model(config, 100).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  mha = keras3['latent_transformer']['block_0']['self_attention']
  for name in ('query', 'key', 'value'):
    assert_glorot(mha[name]['kernel'], d, h * d)
  assert_glorot(mha['output']['kernel'], h * d, d)
  assert_glorot(params['classifier']['dense_1']['kernel'], 16, 100)
  latent = params['latent_array']
  assert 0.035 < np.std(latent) < 0.065 and abs(np.mean(latent)) < 0.015
  position = params['patch_encoder']['position_embedding']
  assert 0.04 < np.abs(position).max() <= 0.05
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    assert leaf.dtype == jnp.float32
    if name.endswith("['bias']"):
      assert np.all(leaf == 0), name
    if name.endswith("_norm']['scale']"):
      assert np.all(leaf == 1), name
  assert params['cross_attention']['attention']['scale'] == 1.0


def test_weights_shared_across_iterations():
  # (The Keras comparison below shows the shared weights are applied twice.)
  trees = []
  for iterations in (1, 2, 5):
    config = tiny_config(num_iterations=iterations)
    model = create_model(config, NUM_CLASSES)
    trees.append(jax.eval_shape(
        functools.partial(model.init, train=False), key(0),
        images_for(config)))
  assert count(trees[0]) == count(trees[1]) == count(trees[2])
  chex.assert_trees_all_equal_shapes_and_dtypes(*trees)


# --------------------------------------------------------------------------
# Patches and the learned cross-attention scale.


def test_extract_patches_row_major_row_col_channel():
  images = np.random.RandomState(0).normal(size=(2, 6, 4, 5))
  patches = encoders.extract_patches(jnp.asarray(images), 2)
  assert patches.shape == (2, 6, 20)
  for b in range(2):
    for i, (r, c) in enumerate((r, c) for r in range(3) for c in range(2)):
      expected = images[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2, :].reshape(-1)
      np.testing.assert_allclose(patches[b, i], expected, rtol=1e-6)


def test_cross_attention_learned_scale_multiplies_logits():
  module = attention.CrossAttention(features=8)
  rng = np.random.RandomState(1)
  latents = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  data = jnp.asarray(rng.normal(size=(2, 16, 6)), jnp.float32)
  params = module.init(key(0), latents, data,
                       deterministic=True)['params']
  assert params['scale'].shape == () and params['scale'] == 1.0
  dense = lambda x, p: np.asarray(x) @ p['kernel'] + p['bias']
  q = dense(latents, params['query'])
  k = dense(data, params['key'])
  v = dense(data, params['value'])
  for scale in (0.0, 0.5, 1.0, 3.0):
    out = module.apply({'params': {**params, 'scale': jnp.float32(scale)}},
                       latents, data, deterministic=True)
    logits = scale * np.einsum('bnd,bmd->bnm', q, k)  # not / sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, weights @ v, rtol=1e-5, atol=1e-5)
    if scale == 0.0:  # Uniform attention: every latent reads the mean value.
      np.testing.assert_allclose(
          out, np.broadcast_to(v.mean(1, keepdims=True), out.shape),
          rtol=1e-5, atol=1e-5)


def test_model_output_depends_on_cross_attention_scale():
  _, images, variables, apply = tiny()
  changed = jax.tree.map(lambda x: x, variables)
  changed['params']['cross_attention']['attention']['scale'] = jnp.float32(4.)
  assert not np.allclose(apply(variables, images, train=False),
                         apply(changed, images, train=False), atol=1e-4)


def test_attention_dropout_path_matches_fused_path():
  rng = np.random.RandomState(2)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((2, 3, 2, 4), (2, 5, 2, 4), (2, 5, 2, 4)))
  fused = attention.dot_product_attention(q, k, v, scale=0.7)
  # A negligible rate forces the materialised-weights path.
  explicit = attention.dot_product_attention(
      q, k, v, scale=0.7, dropout_rate=1e-9, deterministic=False,
      dropout_key=key(0))
  np.testing.assert_allclose(explicit, fused, rtol=1e-5, atol=1e-6)
  dropped = attention.dot_product_attention(
      q, k, v, scale=0.7, dropout_rate=0.5, deterministic=False,
      dropout_key=key(0))
  assert not np.allclose(dropped, fused, atol=1e-3)


# --------------------------------------------------------------------------
# Dropout, jit, dtype and implementation hooks.


def test_dropout_only_in_training():
  _, images, variables, apply = tiny()
  train = lambda seed: apply(variables, images, train=True,
                             rngs={'dropout': key(seed)})
  evaluate = lambda: apply(variables, images, train=False)
  np.testing.assert_array_equal(evaluate(), evaluate())
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1))
  assert not np.allclose(train(0), evaluate())


@pytest.mark.parametrize('dropout_rate, attention_dropout_rate, differs', [
    (0.0, 0.0, False), (0.0, 0.5, True), (0.5, 0.0, True)])
def test_each_dropout_is_wired(dropout_rate, attention_dropout_rate, differs):
  # One block and iteration (a subtree of the tiny params) compiles faster.
  config = tiny_config(num_transformer_blocks=1, num_iterations=1,
                       dropout_rate=dropout_rate,
                       attention_dropout_rate=attention_dropout_rate)
  model = create_model(config, NUM_CLASSES)
  _, images, variables, _ = tiny()
  params = dict(variables['params'])
  params['latent_transformer'] = {
      'block_0': params['latent_transformer']['block_0']}
  apply = jitted_apply(model)
  train = apply({'params': params}, images, train=True,
                rngs={'dropout': key(3)})
  evaluation = apply({'params': params}, images, train=False)
  assert np.allclose(train, evaluation, atol=1e-6) != differs


@pytest.mark.parametrize('dropout_bits', ['hash', 'threefry'])
def test_attention_forms_train_the_same_model(dropout_bits):
  """Folded and factored attention: same logits and gradients in training
  (same dropout masks too), on the tiny model's weights."""
  _, images, variables, _ = tiny()
  labels = jnp.arange(images.shape[0]) % NUM_CLASSES

  def logits_and_grads(form):
    model = create_model(tiny_config(attention_form=form,
                                     dropout_bits=dropout_bits), NUM_CLASSES)

    def loss(params):
      logits = model.apply({'params': params}, images, train=True,
                           rngs={'dropout': key(4)})
      one_hot = jax.nn.one_hot(labels, NUM_CLASSES)
      return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), (
          logits)
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  (grads_a, logits_a), (grads_b, logits_b) = (
      logits_and_grads('factored'), logits_and_grads('folded'))
  np.testing.assert_allclose(logits_b, logits_a, rtol=1e-5, atol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6),
      grads_a, grads_b)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_output_with_and_without_jit(self):
    model, images, variables, jitted = tiny()
    evaluate = self.variant(functools.partial(model.apply, train=False))
    np.testing.assert_allclose(evaluate(variables, images),
                               jitted(variables, images, train=False),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  _, images, variables, apply = tiny()
  config = tiny_config()
  config.dtype = 'bfloat16'
  model = create_model(config, NUM_CLASSES)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          key(0), images)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {np.dtype('float32')}
  logits = jitted_apply(model)(variables, images, train=False)
  assert logits.dtype == jnp.float32
  reference = np.asarray(apply(variables, images, train=False))
  scale = np.abs(reference).max()
  assert scale > 0.5, scale  # (0.91): errors are relative to this.
  # bfloat16 keeps 8 significant bits: each rounding is within 2**-9
  # (0.2%) relative. About 40 rounded steps run in sequence (2 iterations
  # of a cross-attention and 2 blocks, each with LayerNorms, projections,
  # attention, GELU FFN and residuals): a random walk of 40 roundings is
  # 1.2%, and 0.3% to 1.9% was measured on 6 image draws (1.7% here). 4% is
  # twice that and still fails a bfloat16-only slip such as dropping the
  # position embedding (6.5%, which the former atol=0.1 let through).
  error = np.abs(np.asarray(logits) - reference).max() / scale
  assert error <= 0.04, error


def test_attention_impl_none_equals_xla():
  rng = np.random.RandomState(4)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 2, 4)), jnp.float32)
             for _ in range(3))
  np.testing.assert_array_equal(
      attention.dot_product_attention(q, k, v, scale=0.5, implementation=None),
      attention.dot_product_attention(q, k, v, scale=0.5,
                                      implementation='xla'))
  config = tiny_config()
  config.attention_impl = None
  assert create_model(config, NUM_CLASSES).compute.attention_impl is None


def test_model_modules_do_not_import_tensorflow():
  code = ('import sys; import perceiver_jax.model.perceiver, '
          'perceiver_jax.training.steps; '
          'sys.exit("tensorflow" in sys.modules or "keras" in sys.modules)')
  assert subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        check=False).returncode == 0


# --------------------------------------------------------------------------
# Errors.


def test_wrong_image_size_raises():
  model, _, variables, _ = tiny()
  with pytest.raises(ValueError, match='image_size=8'):
    model.apply(variables, jnp.zeros((1, 12, 12, 3)), train=False)
  with pytest.raises(ValueError, match='image_size=8'):
    model.apply(variables, jnp.zeros((1, 8, 12, 3)), train=False)
  with pytest.raises(ValueError, match='image_size=8'):
    model.apply(variables, jnp.zeros((8, 8, 3)), train=False)


@pytest.mark.parametrize('overrides, message', [
    (dict(image_size=10, patch_size=4), 'not divisible by patch_size'),
    (dict(ffn_units=(8, 4)), 'must end with projection_dim'),
    (dict(num_heads=0), 'num_heads must be a positive int'),
    (dict(dropout_rate=1.0), r'dropout_rate must be in \[0, 1\)'),
    (dict(attention_impl='flash'), "attention_impl must be None, 'xla' or"),
    (dict(dtype='int32'), 'must be a float dtype'),
    (dict(dtype='float99'), 'Unknown dtype'),
])
def test_bad_config_raises(overrides, message):
  with pytest.raises(ValueError, match=message):
    create_model(tiny_config(**overrides), NUM_CLASSES)


# --------------------------------------------------------------------------
# Against the seed's Keras model (Keras 3, TensorFlow backend).


@pytest.fixture(scope='module')
def keras_seed():
  """The seed's model code (benchmarks/keras_reference.py, which adds only
  layer names), without augmentation; returns (builder, tf)."""
  if 'keras' not in sys.modules:
    os.environ['KERAS_BACKEND'] = 'tensorflow'
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  backend = keras.backend.backend()
  if backend != 'tensorflow':  # Fail, never skip: these are the key checks.
    pytest.fail(f'Keras was imported with the {backend!r} backend before '
                'this test ran, but the seed model needs TensorFlow: unset '
                'KERAS_BACKEND (or set it to "tensorflow") and run again.',
                pytrace=False)
  from benchmarks import keras_reference  # pylint: disable=g-import-not-at-top
  return keras_reference.build_seed_model, tf


def keras_to_flax_params(keras_model, config):
  """Maps the seed model's weights onto the Flax parameter tree."""
  to_np = lambda v: np.asarray(v.numpy(), np.float32)
  dense = lambda layer: {'kernel': to_np(layer.kernel),
                         'bias': to_np(layer.bias)}
  norm = lambda layer: {'scale': to_np(layer.gamma), 'bias': to_np(layer.beta)}

  def ffn(sequential):
    denses = [l for l in sequential.layers if l.weights]
    return {f'dense_{i}': dense(l) for i, l in enumerate(denses)}

  cross = keras_model.cross_attention
  transformer = keras_model.transformer
  blocks = {}
  for b in range(config.num_transformer_blocks):
    mha = transformer.get_layer(f'block_{b}_self_attention')
    blocks[f'block_{b}'] = {
        'attention_norm': norm(transformer.get_layer(
            f'block_{b}_attention_norm')),
        'self_attention': {'query': dense(mha.query_dense),
                           'key': dense(mha.key_dense),
                           'value': dense(mha.value_dense),
                           'output': dense(mha.output_dense)},
        'ffn_norm': norm(transformer.get_layer(f'block_{b}_ffn_norm')),
        'ffn': ffn(transformer.get_layer(f'block_{b}_ffn')),
    }
  encoder = keras_model.patch_encoder
  return {
      'latent_array': to_np(keras_model.latent_array),
      'patch_encoder': {
          'projection': dense(encoder.projection),
          'position_embedding': to_np(
              encoder.position_embedding.embeddings)},
      'cross_attention': {
          'latent_norm': norm(cross.get_layer('latent_norm')),
          'data_norm': norm(cross.get_layer('data_norm')),
          # The seed calls Attention()([query, key, value]) but Keras'
          # order is [query, value, key]: its Dense named 'key' projects the
          # values and its 'value' the keys. Same architecture (both Denses
          # read the normalised data, same shape and init); names swap.
          'attention': {'query': dense(cross.get_layer('query')),
                        'key': dense(cross.get_layer('value')),
                        'value': dense(cross.get_layer('key')),
                        'scale': to_np(cross.get_layer('attention').scale)},
          'ffn_norm': norm(cross.get_layer('ffn_norm')),
          'ffn': ffn(cross.get_layer('cross_ffn')),
      },
      'latent_transformer': blocks,
      'classifier': ffn(keras_model.classification_head),
  }


@contextlib.contextmanager
def seeded_keras(seed):
  """Keras' unseeded initialisers draw from Python's global `random`, so
  each run (and each place in a full-suite run) built a different model.
  Seeded, every run compares the same weights and a failure reproduces;
  Python's and NumPy's global states are given back to the other tests.
  """
  import keras  # pylint: disable=g-import-not-at-top
  python_state, numpy_state = random.getstate(), np.random.get_state()
  keras.utils.set_random_seed(seed)
  try:
    yield
  finally:
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def test_logits_match_seed_keras_model(keras_seed):
  build_keras, _ = keras_seed
  config = tiny_config()
  images = np.asarray(images_for(config))
  with seeded_keras(0):
    keras_model = build_keras(config, NUM_CLASSES)
    keras_model(images[:1], training=False)  # Builds the weights.
  # Perturb every weight so biases, LayerNorm gains and the attention scale
  # are not at their (symmetry-hiding) initial values.
  rng = np.random.RandomState(0)
  for weight in keras_model.weights:
    weight.assign(weight.numpy() + rng.normal(0, 0.2, weight.shape))
  keras_model.cross_attention.get_layer('attention').scale.assign(1.7)
  expected = np.asarray(keras_model(images, training=False))

  _, _, variables, apply = tiny()
  params = keras_to_flax_params(keras_model, config)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, variables['params'])
  assert count(params) == keras_model.count_params() == keras_param_count(
      config, NUM_CLASSES)
  logits = apply({'params': params}, jnp.asarray(images), train=False)
  scale = np.abs(expected).max()
  assert scale > 0.1  # A non-trivial comparison.
  # Both are float32 evaluations of the same function: about 40 sequential
  # steps (2 iterations of a cross-attention and 2 blocks: LayerNorms,
  # projections, softmax, exact GELU, residuals), each rounded to 2**-24
  # relative, in different but valid orders and approximations (matmul
  # blocking, erf, exp, rsqrt). The error is that of the latents the
  # classifier reads, so it scales with the largest logit, not with each
  # logit: the former elementwise rtol=atol=1e-5 failed on a 0.45 logit
  # beside larger ones (1.7e-5 off; weights were then unseeded). Over 520
  # draws of the Keras weights the largest difference was 5.1e-6 x
  # max|logit| (median 5e-7; a float64 evaluation puts each framework's own
  # error at that level), the same on 1 thread as on all. 3e-5 x max|logit|
  # is 6x that; with these weights Keras' default LayerNorm epsilon (1e-3
  # for the seed's 1e-6) is 0.1 x max|logit| off, a tanh GELU 1.2e-3.
  np.testing.assert_allclose(logits, expected, rtol=0, atol=3e-5 * scale)


def test_extract_patches_matches_tensorflow(keras_seed):
  _, tf = keras_seed
  images = np.random.RandomState(3).normal(size=(2, 6, 6, 5)).astype(
      np.float32)
  expected = tf.image.extract_patches(
      images, sizes=[1, 3, 3, 1], strides=[1, 3, 3, 1], rates=[1, 1, 1, 1],
      padding='VALID').numpy().reshape(2, -1, 45)
  np.testing.assert_array_equal(
      encoders.extract_patches(jnp.asarray(images), 3), expected)


@pytest.mark.parametrize('train', [False, True])
def test_remat_gives_the_same_loss_and_gradients(train):
  """Rematerialisation only trades memory for compute.

  In training the backward pass recomputes the blocks' forward pass, dropout
  included: the gradients are the loss's only if it redraws the very masks
  the forward pass used, and remat must not change which masks those are.
  """
  # One block (a subtree of the tiny params) compiles faster; two
  # iterations keep the shared, rematerialised blocks called twice.
  _, images, variables, _ = tiny()
  params = dict(variables['params'])
  params['latent_transformer'] = {
      'block_0': params['latent_transformer']['block_0']}
  results = []
  for use_remat in (False, True):
    # Strong dropout everywhere, so a different mask changes every value.
    model = create_model(tiny_config(
        remat=use_remat, num_transformer_blocks=1, dropout_rate=0.5,
        attention_dropout_rate=0.5), NUM_CLASSES)

    def loss(p, x, rng, model=model):
      # Arguments, not constants: XLA would fold constant masks slowly.
      rngs = {'dropout': rng} if train else {}
      return model.apply({'params': p}, x, train=train, rngs=rngs).sum()

    args = (params, images, key(5))
    grad = jax.jit(jax.value_and_grad(loss)).lower(*args).compile(
        compiler_options=FAST_COMPILE)
    results.append(grad(*args))
  (loss0, grads0), (loss1, grads1) = results
  np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
  chex.assert_trees_all_close(grads0, grads1, atol=1e-5, rtol=1e-5)
