"""Perceiver IO's options: arrangement, preprocessors, frozen BatchNorm,
checks, FLOPs."""

from configs import imagenet_perceiver_io
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import flops
from perceiver_jax import checks
from perceiver_jax import config_lib
from perceiver_jax.model import encoders
from perceiver_jax.model import perceiver
from perceiver_jax.model import sharing
from perceiver_jax.training import recipe


def _init(config, num_classes=10):
  model = perceiver.create_model(config, num_classes)
  size = config.image_size
  images = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 3),
                       jnp.float32)
  params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
      images)['params']
  return model, params, images


@pytest.fixture(scope='module')
def test_model():
  """configs/imagenet_perceiver_io.py:test, initialised once."""
  return _init(imagenet_perceiver_io.get_config('test'))


def test_one_cross_attend_then_the_shared_block_repeated(test_model):
  model, params, images = test_model
  assert set(params) == {'conv_encoder', 'latent_array', 'cross_attention',
                         'latent_transformer', 'decoder', 'classifier'}
  assert set(params['latent_transformer']) == {'block_0', 'block_1'}
  assert model.num_cross_attends == 1
  _, state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, train=False, mutable=['intermediates']))(params, images)
  weights = sharing.cross_attention_weights(state['intermediates'])
  assert len(weights) == 1
  # 16 x 16 -> 8 x 8 -> 3 x 3 stem cells (HuggingFace's padding).
  assert weights[0].shape == (2, 1, 8, 9)


def test_first_iteration_cross_attend_differs_from_every_iteration(
    test_model):
  model, params, images = test_model
  config = imagenet_perceiver_io.get_config('test')
  config.cross_attend = 'every_iteration'
  every = perceiver.create_model(config, 10)
  a, b = (jax.jit(lambda p, x, m=m: m.apply({'params': p}, x, train=False))(
      params, images) for m in (model, every))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.parametrize('size,padding,grid', [
    (224, 'same', 56), (224, 'huggingface', 55), (16, 'same', 4),
    (16, 'huggingface', 3), (15, 'same', 4)])
def test_the_stems_grid(size, padding, grid):
  assert encoders.stem_grid(size, padding) == (grid, grid)
  stem = encoders.ConvStemEncoder(4, 2, padding=padding)
  out = jax.eval_shape(lambda: stem.init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, 3)))[0])
  assert out.shape == (1, grid * grid, 4 + 10)


def test_the_same_padding_is_tensorflows():
  """The SAME stem equals TensorFlow's conv and max-pool (haiku's ops)."""
  tf = pytest.importorskip('tensorflow')
  stem = encoders.ConvStemEncoder(4, 1, padding='same')
  images = np.random.RandomState(0).randn(1, 12, 12, 3).astype(np.float32)
  params = stem.init(jax.random.key(0), images)['params']
  out = np.asarray(stem.apply({'params': params}, images))[..., :4]
  x = tf.nn.conv2d(images, params['conv']['kernel'], 2, 'SAME')
  x = tf.nn.max_pool2d(tf.nn.relu(x), 3, 2, 'SAME')  # BatchNorm: identity.
  np.testing.assert_allclose(out, x.numpy().reshape(1, -1, 4), rtol=2e-5,
                             atol=1e-6)


def test_batch_norm_statistics_get_no_gradient_and_no_update(test_model):
  """Weight decay on everything: the statistics still never move."""
  config = imagenet_perceiver_io.get_config('test')
  config.weight_decay_mask = 'all'
  config.weight_decay = 0.5
  model, params, images = test_model
  params = jax.tree.map(lambda x: x + 0.3, params)
  tx = recipe.create_optimizer(config)
  opt_state = tx.init(params)

  def loss(p):
    return jnp.sum(model.apply({'params': p}, images, train=False)**2)

  grads = jax.jit(jax.grad(loss))(params)
  updates, _ = jax.jit(tx.update)(grads, opt_state, params)
  stem = 'conv_encoder', 'batch_norm'
  for name in encoders.FROZEN_STATISTICS:
    assert not np.any(grads[stem[0]][stem[1]][name])
    assert not np.any(updates[stem[0]][stem[1]][name])
  for name in ('scale', 'bias'):  # These train.
    assert np.any(updates[stem[0]][stem[1]][name])
  assert np.any(updates['conv_encoder']['conv']['kernel'])


def test_a_model_without_frozen_parameters_keeps_the_optimiser_state():
  """The seed's optimiser state tree is unchanged (old checkpoints load)."""
  config = imagenet_perceiver_io.get_config('test')
  config.preprocessor = 'conv1x1'
  config.position_encoding = 'learned'
  _, params, _ = _init(config)
  state = recipe.create_optimizer(config).init(params)
  assert 'MultiTransform' not in repr(jax.tree.structure(state))


@pytest.mark.parametrize('changes,fragment', [
    (dict(preprocessor='conv1x1', cross_attention_width='latent'),
     "config.preprocessor='conv1x1' needs config.cross_attention_width="),
    (dict(preprocessor='conv', position_encoding='learned'),
     "config.preprocessor='conv' needs config.position_encoding='fourier'"),
    (dict(patch_size=2), "set config.patch_size=1"),
    (dict(image_size=2), 'config.image_size=2 is too small'),
    (dict(layer_norm_epsilon=0.0), 'config.layer_norm_epsilon=0.0 must be'),
    (dict(cross_attend='second'), "config.cross_attend='second' must be"),
    (dict(conv_stem_padding='valid'), "config.conv_stem_padding='valid'"),
    (dict(decoder='io'), "config.decoder='io' must be"),
])
def test_bad_options_are_named_before_anything_is_built(changes, fragment):
  config = imagenet_perceiver_io.get_config('test')
  for name, value in changes.items():
    config[name] = value
  problems = config_lib.config_problems(config)
  assert any(fragment in p for p in problems), problems
  with pytest.raises(ValueError):
    perceiver.create_model(config, 10)


def test_gelu_approximate_must_be_a_bool():
  assert checks.broken({'gelu_approximate': 'yes'}, perceiver.RULES)
  with pytest.raises(ValueError, match='gelu_approximate must be True or'):
    perceiver.create_model(
        ml_collections.ConfigDict(dict(
            imagenet_perceiver_io.get_config('test').to_dict(),
            gelu_approximate='yes')), 10)


def test_flops_of_the_conv_model_by_hand():
  """Perceiver IO's conv classifier, forward matmuls per 224 x 224 image."""
  config = imagenet_perceiver_io.get_config('conv')
  config.attention_form = 'factored'
  parts = flops.analytic_flops_per_example(config, 1000)
  n, d, m, width = 512, 1024, 55 * 55, 64 + 258
  stem = 112 * 112 * 7 * 7 * 3 * 64
  cross = (n * d * width + 2 * m * width * width  # q; k and v,
           + 2 * n * m * width                       # logits, weighted sum,
           + n * width * d + 2 * n * d * d)          # output, MLP.
  layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * d
  # One query: q, k and v of the latents, attention, output, MLP.
  decoder = d * d + 2 * n * d * d + 2 * n * d + d * d + 2 * d * d
  head = d * 1000
  want = 2 * (stem + cross + 48 * layer + decoder + head)
  assert parts['as_written_total'] == pytest.approx(want, rel=1e-12)
  assert parts['as_written_total'] / 1e9 == pytest.approx(369.2, abs=0.05)
