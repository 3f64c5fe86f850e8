"""The Perceiver paper's ImageNet model (configs/imagenet_perceiver.py) and
the options it needs: weight sharing of the first cross-attend, the
cross-attention at the inputs' width with pre-LN residuals, latent heads that
split the width, the truncated-normal latent array and a linear head.

Parameter counts come from `jax.eval_shape` (nothing of the 44.9M-parameter
model is initialised) and are derived by hand from the layer sizes.
"""

import functools
import math

from configs import cifar100
from configs import imagenet_perceiver
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.model import blocks
from perceiver_jax.model import encoders
from perceiver_jax.model import perceiver
from perceiver_jax.model import position_encoding

from tests.model.test_perceiver import key
from tests.model.test_perceiver_options import FAST_COMPILE
from tests.model.test_perceiver_options import count
from tests.model.test_perceiver_options import expected_param_count
from tests.model.test_perceiver_options import numpy_multi_head
from tests.model.test_perceiver_options import param_shapes
from tests.model.test_perceiver_options import random_variables
from tests.model.test_perceiver_options import tiny_config

IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=None)
def imagenet_params(weight_sharing='first_cross_attend'):
  config = imagenet_perceiver.get_config()
  config.weight_sharing = weight_sharing
  return param_shapes(config, IMAGENET_CLASSES, batch=1)


def imagenet_count_by_hand(cross_attends, transformers):
  """The paper's model with this many distinct weight sets, by hand."""
  d, n, c = 1024, 512, 3 + 2 * (2 * 64 + 1)  # Latent width, latents, inputs.
  dense = lambda fan_in, units: fan_in * units + units
  layer_norm = lambda width: 2 * width
  mlp = 2 * dense(d, d)  # Widening 1.
  cross_attend = (layer_norm(d) + layer_norm(c) +  # Latents, inputs.
                  dense(d, c) + 2 * dense(c, c) + dense(c, d) +  # q, k, v, o.
                  layer_norm(d) + mlp)
  block = (layer_norm(d) + 4 * dense(d, d) +  # q, k, v, o: 8 heads of 128.
           layer_norm(d) + mlp)
  return (n * d + cross_attends * cross_attend + transformers * 6 * block +
          dense(d, IMAGENET_CLASSES))


# --------------------------------------------------------------------------
# The ImageNet config's parameters.


@pytest.mark.parametrize('weight_sharing, sets, paper_millions', [
    ('first_cross_attend', (2, 1), 44.9),  # The paper's model.
    ('none', (8, 8), 326.2),  # The paper's unshared count.
    ('all', (1, 1), None),
    ('first_iteration', (2, 2), None),
])
def test_imagenet_parameter_counts(weight_sharing, sets, paper_millions):
  params = imagenet_params(weight_sharing)
  config = imagenet_perceiver.get_config()
  config.weight_sharing = weight_sharing
  by_hand = imagenet_count_by_hand(*sets)
  assert count(params) == by_hand == expected_param_count(
      config, IMAGENET_CLASSES)
  if paper_millions:
    assert round(by_hand / 1e6, 1) == paper_millions
  if weight_sharing == 'first_cross_attend':
    assert by_hand == 44_912_254  # As the config's docstring says.


def test_imagenet_parameter_tree():
  params = imagenet_params()
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert set(shapes) == {'latent_array', 'cross_attention_0',
                         'cross_attention_1', 'latent_transformer',
                         'classifier'}  # No patch projection.
  assert shapes['latent_array'] == (512, 1024)
  assert shapes['classifier'] == {'dense_0': {'kernel': (1024, 1000),
                                              'bias': (1000,)}}
  for cross in ('cross_attention_0', 'cross_attention_1'):
    attention = shapes[cross]['attention']
    assert {k: v['kernel'] for k, v in attention.items()} == {
        'query': (1024, 1, 261), 'key': (261, 1, 261),
        'value': (261, 1, 261), 'output': (1, 261, 1024)}
    assert shapes[cross]['data_norm']['scale'] == (261,)
  transformer = shapes['latent_transformer']
  assert sorted(transformer) == [f'block_{i}' for i in range(6)]
  ffns = [shapes[c]['ffn'] for c in ('cross_attention_0', 'cross_attention_1')
          ] + [b['ffn'] for b in transformer.values()]
  for ffn in ffns:  # Widening 1: Dense(1024), GELU, Dense(1024).
    assert ffn == {f'dense_{i}': {'kernel': (1024, 1024), 'bias': (1024,)}
                   for i in range(2)}
  for block in transformer.values():
    assert block['self_attention']['query']['kernel'] == (1024, 8, 128)
    assert block['self_attention']['output']['kernel'] == (8, 128, 1024)


def test_imagenet_configs_build_the_options():
  for config in (imagenet_perceiver.get_config(),
                 imagenet_perceiver.get_config('test')):
    model = perceiver.create_model(config, IMAGENET_CLASSES)
    assert (model.weight_sharing, model.cross_attention_width,
            model.cross_attention_residual, model.latent_head_width,
            model.latent_init, model.logits_dropout) == (
                'first_cross_attend', 'input', 'pre_norm', 'split',
                'truncated_normal', False)
    assert model.classifier_units == () and model.patch_size == 1
    assert model.latent_head_dim == config.projection_dim // config.num_heads
    width = 3 + position_encoding.num_fourier_features(
        2, config.fourier_num_bands)
    assert model.data_width(3) == width
  assert imagenet_perceiver.get_config().fourier_max_resolution == 224
  with pytest.raises(ValueError, match="takes '' or 'test'"):
    imagenet_perceiver.get_config('tiny')


# --------------------------------------------------------------------------
# The blocks' new options against their formulas.


def _layer_norm(x, p):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _ffn(x, p):
  """Dense, exact (erf) GELU, Dense."""
  erf = np.vectorize(math.erf)
  h = x @ p['dense_0']['kernel'] + p['dense_0']['bias']
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return h @ p['dense_1']['kernel'] + p['dense_1']['bias']


@pytest.mark.parametrize('width, heads, residual', [
    ('input', 1, 'pre_norm'),  # The paper's.
    ('input', 3, 'normalized'),
    ('latent', 2, 'pre_norm'),
])
def test_cross_attention_block_formula(width, heads, residual):
  rng = np.random.RandomState(5)
  latents = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  data = jnp.asarray(rng.normal(size=(2, 5, 6 if width == 'input' else 8)),
                     jnp.float32)
  block = blocks.CrossAttentionBlock(8, (8, 8), 0.0, 0.0, num_heads=heads,
                                     width=width, residual=residual)
  params = random_variables(block, latents, data,
                            deterministic=True)['params']
  p = jax.tree.map(np.asarray, params)
  x, y = np.asarray(latents), np.asarray(data)
  head_dim = y.shape[-1] // heads if width == 'input' else 8 // heads
  assert p['attention']['key']['kernel'].shape == (y.shape[-1], heads,
                                                   head_dim)
  normed = _layer_norm(x, p['latent_norm'])
  attended, _ = numpy_multi_head(p['attention'], normed,
                                 _layer_norm(y, p['data_norm']), heads,
                                 head_dim)
  if residual == 'pre_norm':
    h = x + attended
    expected = h + _ffn(_layer_norm(h, p['ffn_norm']), p['ffn'])
  else:
    h = _layer_norm(attended + normed, p['ffn_norm'])
    expected = _ffn(h, p['ffn']) + h
  out = block.apply({'params': params}, latents, data, deterministic=True)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_patch_encoder_without_projection_passes_pixels_and_features():
  images = jnp.asarray(np.random.RandomState(2).normal(size=(2, 4, 4, 3)),
                       jnp.float32)
  encoder = encoders.PatchEncoder(1, 16, 8, position_encoding='fourier',
                                  fourier_num_bands=2, project=False)
  variables = encoder.init(key(0), images)
  assert not variables  # Nothing to learn.
  out = encoder.apply(variables, images)
  features = position_encoding.fourier_position_encoding((4, 4), 2)
  np.testing.assert_array_equal(out[..., :3], images.reshape(2, 16, 3))
  np.testing.assert_array_equal(out[..., 3:], np.broadcast_to(
      features, (2,) + features.shape))
  assert out.shape == (2, 16, 3 + 10)


def test_split_latent_heads():
  full, split = (param_shapes(tiny_config(latent_head_width=w))
                 for w in ('full', 'split'))
  self_attention = lambda p: p['latent_transformer']['block_0'][
      'self_attention']
  # projection_dim 8, 2 heads: each 8 wide, or 4.
  assert self_attention(full)['query']['kernel'].shape == (8, 2, 8)
  assert self_attention(split)['query']['kernel'].shape == (8, 2, 4)
  assert self_attention(split)['output']['kernel'].shape == (2, 4, 8)
  config = cifar100.get_config()  # 8 heads of 256 fold; of 32 they do not.
  assert perceiver.create_model(config, 100).latent_attention_folded(64)
  config.latent_head_width = 'split'
  assert not perceiver.create_model(config, 100).latent_attention_folded(64)


@pytest.mark.parametrize('latent_init, stddev, bound', [
    ('random_normal', 0.05, None),
    # Drawn from N(0, 0.02) cut at 2 stddev (not rescaled, as haiku's
    # TruncatedNormal): stddev 0.02 * 0.880.
    ('truncated_normal', 0.02 * 0.880, 0.04),
])
def test_latent_array_init(latent_init, stddev, bound):
  config = tiny_config(latent_dim=64, projection_dim=32, ffn_units=(32, 32),
                       num_transformer_blocks=1, num_iterations=1,
                       latent_init=latent_init)
  model = perceiver.create_model(config, 5)
  images = jnp.zeros((1, 8, 8, 3))
  init = jax.jit(functools.partial(model.init, train=False)).lower(
      key(0), images).compile(compiler_options=FAST_COMPILE)
  latents = np.asarray(init(key(0), images)['params']['latent_array'])
  assert latents.shape == (64, 32)
  assert abs(latents.std() / stddev - 1) < 0.06, latents.std()
  assert abs(latents.mean()) < 0.1 * stddev
  if bound:
    assert np.abs(latents).max() <= bound
  else:  # 2048 draws of N(0, 0.05): many beyond 0.04.
    assert (np.abs(latents) > 0.04).mean() > 0.3


@pytest.mark.parametrize('units', [(8, 5), (5,)])  # (5,): a linear head.
def test_linear_head_and_logits_dropout(units):
  x = jnp.asarray(np.random.RandomState(4).normal(size=(4, 8)), jnp.float32)
  for logits_dropout in (True, False):
    head = blocks.FeedForward(units, 0.5, final_dropout=logits_dropout)
    variables = random_variables(head, x, deterministic=True)
    train = lambda seed, head=head, v=variables: head.apply(
        v, x, deterministic=False, rngs={'dropout': key(seed)})
    evaluation = head.apply(variables, x, deterministic=True)
    if len(units) == 1:
      p = variables['params']['dense_0']
      np.testing.assert_allclose(evaluation, x @ p['kernel'] + p['bias'],
                                 rtol=1e-5, atol=1e-6)
    if logits_dropout:  # Dropout on the logits, as the seed's head ends.
      dropped = np.asarray(train(0)) == 0
      assert 0 < dropped.mean() < 1
      np.testing.assert_allclose(np.asarray(train(0))[~dropped],
                                 np.asarray(evaluation)[~dropped] * 2,
                                 rtol=1e-5)
    else:
      np.testing.assert_array_equal(train(0), evaluation)


# --------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize('overrides, message', [
    (dict(weight_sharing='paper'),
     "config.weight_sharing='paper' must be 'all', 'first_cross_attend', "
     "'first_iteration' or 'none' (earlier versions' 'paper' is now "
     "'first_iteration'; the paper's ImageNet model shares as "
     "'first_cross_attend'); pass e.g. --config.weight_sharing="
     'first_iteration.'),
    (dict(cross_attention_width='input', position_encoding='fourier'),
     "config.cross_attention_width='input' needs config.num_cross_heads >= "
     '1'),
    (dict(cross_attention_width='input', num_cross_heads=1),
     "config.cross_attention_width='input' needs config.position_encoding="
     "'fourier' with config.fourier_mode='concat'"),
    (dict(latent_head_width='split', num_heads=3),
     "config.latent_head_width='split' needs config.num_heads=3 to divide "
     'config.projection_dim=256'),
    (dict(cross_attention_width='wide'),
     "config.cross_attention_width='wide' must be 'latent' or 'input'"),
    (dict(cross_attention_residual='post'),
     "config.cross_attention_residual='post' must be 'normalized' or "
     "'pre_norm'"),
    (dict(latent_init='zeros'),
     "config.latent_init='zeros' must be 'random_normal' or "
     "'truncated_normal'"),
])
def test_config_lib_names_bad_new_options(overrides, message):
  config = cifar100.get_config()
  config.update(overrides)
  problems = config_lib.config_problems(config)
  assert len(problems) == 1 and message in problems[0], problems


def test_model_and_blocks_reject_bad_new_options():
  with pytest.raises(ValueError, match="weight_sharing must be 'all', 'first_"
                     r".*earlier versions' 'paper' is now 'first_iteration'"):
    perceiver.create_model(tiny_config(weight_sharing='paper'), 5)
  with pytest.raises(ValueError,
                     match="width='input' needs num_cross_heads >= 1"):
    blocks.CrossAttentionBlock(8, (8, 8), 0.0, 0.0, width='input')
  with pytest.raises(ValueError, match='project=False needs position_enc'):
    encoders.PatchEncoder(1, 16, 8, project=False)
  block = blocks.CrossAttentionBlock(8, (8, 8), 0.0, 0.0, num_heads=4,
                                     width='input')
  # The data's width is known only from the data: an input error, not a bug.
  with pytest.raises(errors.InputError,
                     match=r"num_cross_heads=4 must divide the data array's "
                     r'width, 6 .*choose one of \[1, 2, 3, 6\]'):
    jax.eval_shape(functools.partial(block.init, deterministic=True),
                   key(0), jnp.zeros((1, 3, 8)), jnp.zeros((1, 5, 6)))

