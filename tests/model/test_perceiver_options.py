"""Tests for the Perceiver paper's model options (all off by default).

The default model itself is pinned by tests/test_perceiver.py (weights copied
from the seed's Keras model give the same logits); these tests check each
option against its definition: Fourier features against hand-computed
values, parameter counts against a layer-by-layer count, weight sharing by
swapping weight sets, attention against its formula.
"""

import functools

from configs import cifar100
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from perceiver_jax import config_lib
from perceiver_jax.model import attention
from perceiver_jax.model import blocks
from perceiver_jax.model import decoders
from perceiver_jax.model import dropout as dropout_lib
from perceiver_jax.model import encoders
from perceiver_jax.model import perceiver
from perceiver_jax.model import sharing
from perceiver_jax.model import position_encoding

from tests.model import test_perceiver
from tests.model.test_perceiver import key  # 'rbg' keys: see there.

NUM_CLASSES = 5
# XLA:CPU's LLVM optimisations change no value these tests check.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
# The paper's options, all off by default (model.OPTION_DEFAULTS also holds
# older fields, such as dtype, that config_lib requires).
PAPER_OPTION_DEFAULTS = {
    name: perceiver.OPTION_DEFAULTS[name] for name in (
        'position_encoding', 'fourier_num_bands', 'fourier_max_resolution',
        'fourier_mode', 'weight_sharing', 'num_cross_heads',
        'cross_attention_width', 'cross_attention_residual',
        'latent_head_width', 'latent_init', 'decoder', 'logits_dropout')}


def tiny_config(**overrides):
  """test_perceiver.py's tiny model, with 2 Fourier bands."""
  return test_perceiver.tiny_config(**{'fourier_num_bands': 2, **overrides})


def images_for(config, batch=2, channels=3, seed=0):
  shape = (batch, config.image_size, config.image_size, channels)
  return jnp.asarray(np.random.RandomState(seed).normal(size=shape),
                     jnp.float32)


def random_variables(module, *args, seed=0, scale=0.3, **kwargs):
  """Random values in the shapes `module.init` gives, without running init.

  Eager init compiles a random kernel per parameter shape, which is most of
  a test's time on CPU; random values also move LayerNorm gains and biases
  off 1 and 0, so every parameter matters to the checks.
  """
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), key(0),
                          *args)
  rng = np.random.RandomState(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype), shapes)


def build(config, images, num_classes=NUM_CLASSES):
  model = perceiver.create_model(config, num_classes)
  return model, random_variables(model, images, train=False)


def param_shapes(config, num_classes=NUM_CLASSES, batch=2):
  model = perceiver.create_model(config, num_classes)
  images = jax.ShapeDtypeStruct(
      (batch, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), key(0),
                        images)['params']


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Weight sets of (cross-attention, latent Transformer) per sharing mode, at
# num_iterations t (see perceiver_jax/model/sharing.py).
WEIGHT_SETS = {
    'all': lambda t: (1, 1),
    'first_cross_attend': lambda t: (min(t, 2), 1),
    'first_iteration': lambda t: (min(t, 2), min(t, 2)),
    'none': lambda t: (t, t),
}


def expected_param_count(config, num_classes, channels=3):
  """Trainable parameters of a config, layer by layer (not from the model)."""
  d = config.projection_dim
  dense = lambda fan_in, units: fan_in * units + units
  layer_norm = 2 * d

  def ffn(units):
    widths = (d,) + tuple(units)
    return sum(dense(a, b) for a, b in zip(widths[:-1], widths[1:]))

  def multi_head(heads, head_dim, kv_width=d):  # q/k/v kernels + biases, out.
    return (dense(d, heads * head_dim) + 2 * dense(kv_width, heads * head_dim)
            + dense(heads * head_dim, d))

  patch_values = config.patch_size**2 * channels
  grid = config.image_size // config.patch_size
  fourier = 2 * (1 + 2 * config.fourier_num_bands)  # (row, col), sin, cos.
  data_width = d
  if config.get('cross_attention_width', 'latent') == 'input':
    patch_encoder = 0  # The data array: pixels and Fourier features as such.
    data_width = patch_values + fourier
  elif config.position_encoding == 'learned':
    patch_encoder = dense(patch_values, d) + grid * grid * d
  else:
    patch_encoder = (dense(patch_values + fourier, d)
                     if config.fourier_mode == 'concat' else
                     dense(patch_values, d) + dense(fourier, d))
  k = config.num_cross_heads
  cross_attention_module = (3 * dense(d, d) + 1 if k == 0 else  # + scale
                            multi_head(k, data_width // k, data_width))
  cross_attention = (layer_norm + 2 * data_width + cross_attention_module +
                     layer_norm + ffn(config.ffn_units))
  h = config.num_heads
  latent_head_dim = (d // h if config.get('latent_head_width', 'full') ==
                     'split' else d)
  block = (layer_norm + multi_head(h, latent_head_dim) + layer_norm +
           ffn(config.ffn_units))
  transformer = config.num_transformer_blocks * block
  cross_sets, transformer_sets = WEIGHT_SETS[config.weight_sharing](
      config.num_iterations)
  decoder = 0
  if config.decoder == 'query':
    heads = max(k, 1)
    decoder = d + layer_norm + multi_head(heads, d // heads)  # query, LN.
  head = ffn(tuple(config.classifier_units) + (num_classes,))
  return (config.latent_dim * d + patch_encoder +
          cross_sets * cross_attention + transformer_sets * transformer +
          decoder + head)


# --------------------------------------------------------------------------
# Fourier position features.


def test_fourier_features_at_known_positions():
  # Bands run linearly from 1 to max_resolution / 2: [1, 2.5] for rows and
  # [1, 1.5] for cols. Order: positions, all sines, all cosines.
  pos = jnp.asarray([[0.5, -1.0]])
  features = position_encoding.generate_fourier_features(
      pos, num_bands=2, max_resolution=(5, 3))
  r = np.sqrt(0.5)
  # sin(pi/2), sin(1.25pi), sin(-pi), sin(-1.5pi), then the same cosines.
  expected = [0.5, -1.0, 1.0, -r, 0.0, 1.0, 0.0, -r, -1.0, 0.0]
  np.testing.assert_allclose(features[0], expected, atol=1e-6)
  assert position_encoding.num_fourier_features(2, 2) == 10


def test_fourier_encoding_of_a_2x2_grid_with_2_bands():
  # Positions -1 and 1 on each axis, row-major like the patches; the default
  # max_resolution is the grid (2), so both bands are at frequency 1.
  features = position_encoding.fourier_position_encoding((2, 2), num_bands=2)
  assert features.shape == (4, 10) and features.dtype == jnp.float32
  for i, (row, col) in enumerate([(-1, -1), (-1, 1), (1, -1), (1, 1)]):
    np.testing.assert_allclose(
        features[i], [row, col] + [0.0] * 4 + [-1.0] * 4, atol=1e-6)


def test_fourier_encoding_grid_order_and_max_resolution():
  # 2 rows x 3 cols with max_resolution 4: bands [1, 2]; col 0 sits at 0.
  features = position_encoding.fourier_position_encoding(
      (2, 3), num_bands=2, max_resolution=4)
  assert features.shape == (6, 10)
  np.testing.assert_allclose(features[:, :2], [
      [-1, -1], [-1, 0], [-1, 1], [1, -1], [1, 0], [1, 1]], atol=1e-6)
  # Patch (row 0, col 1) at (-1, 0): sin(-pi), sin(-2pi), sin(0), sin(0);
  # cos(-pi), cos(-2pi), cos(0), cos(0).
  np.testing.assert_allclose(features[1, 2:], [0, 0, 0, 0, -1, 1, 1, 1],
                             atol=1e-6)


@pytest.mark.parametrize('mode', ['concat', 'add'])
def test_patch_encoder_fourier_wiring(mode):
  encoder = encoders.PatchEncoder(
      patch_size=2, num_patches=6, projection_dim=8,
      position_encoding='fourier', fourier_num_bands=3, fourier_mode=mode)
  images = jnp.asarray(np.random.RandomState(1).normal(size=(2, 4, 6, 3)),
                       jnp.float32)
  params = random_variables(encoder, images)['params']
  out = encoder.apply({'params': params}, images)
  patches = np.asarray(encoders.extract_patches(images, 2))
  features = np.asarray(
      position_encoding.fourier_position_encoding((2, 3), 3))
  dense = lambda x, p: x @ np.asarray(p['kernel']) + np.asarray(p['bias'])
  if mode == 'concat':
    assert set(params) == {'projection'}
    inputs = np.concatenate(
        [patches, np.broadcast_to(features, (2,) + features.shape)], -1)
    expected = dense(inputs, params['projection'])
  else:
    assert set(params) == {'projection', 'position_projection'}
    expected = (dense(patches, params['projection']) +
                dense(features, params['position_projection']))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Per-pixel input at native resolution (the paper's ImageNet setting).


@pytest.mark.parametrize('encoding', ['learned', 'fourier'])
def test_per_pixel_input_at_native_resolution(encoding):
  config = cifar100.get_config()
  config.update(dict(image_size=32, patch_size=1, latent_dim=16,
                     position_encoding=encoding))
  model = perceiver.create_model(config, 100)
  assert model.num_patches == 1024
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             key(0), images)
  params = variables['params']
  kernel = params['patch_encoder']['projection']['kernel']
  # 3 channel values per input, plus (row, col) and 64 sin + 64 cos per axis.
  assert kernel.shape == ((3, 256) if encoding == 'learned' else
                          (3 + 2 * (1 + 2 * 64), 256))
  assert count(params) == expected_param_count(config, 100)
  data = jax.eval_shape(
      lambda p, x: encoders.PatchEncoder(
          1, 1024, 256, position_encoding=encoding).apply(
              {'params': p['patch_encoder']}, x), params, images)
  assert data.shape == (2, 1024, 256)
  logits, state = jax.eval_shape(
      functools.partial(model.apply, train=False, mutable=['intermediates']),
      variables, images)
  assert logits.shape == (2, 100)
  weights = sharing.cross_attention_weights(state['intermediates'])
  assert [w.shape for w in weights] == [(2, 1, 16, 1024)] * 2


# --------------------------------------------------------------------------
# Parameter counts and trees.

VARIANTS = [
    dict(),
    dict(num_iterations=3, weight_sharing='all'),
    dict(num_iterations=3, weight_sharing='first_cross_attend'),
    dict(num_iterations=3, weight_sharing='first_iteration'),
    dict(num_iterations=3, weight_sharing='none'),
    dict(num_iterations=1, weight_sharing='first_iteration'),
    dict(num_iterations=1, weight_sharing='first_cross_attend'),
    dict(latent_head_width='split'),
    dict(classifier_units=()),
    dict(position_encoding='fourier', cross_attention_width='input',
         num_cross_heads=1),
    dict(position_encoding='fourier', cross_attention_width='input',
         num_cross_heads=2, fourier_num_bands=3,  # 2 heads of 13.
         weight_sharing='first_cross_attend', num_iterations=3),
    dict(num_cross_heads=1),
    dict(num_cross_heads=4),
    dict(decoder='query'),
    dict(decoder='query', num_cross_heads=2),
    dict(position_encoding='fourier'),
    dict(position_encoding='fourier', fourier_mode='add'),
    dict(position_encoding='fourier', fourier_num_bands=5,
         fourier_max_resolution=32),
    dict(position_encoding='fourier', fourier_mode='add', num_iterations=3,
         weight_sharing='first_iteration', num_cross_heads=2,
         decoder='query', logits_dropout=False),
]


@pytest.mark.parametrize('overrides', VARIANTS)
def test_parameter_count_of_variant(overrides):
  config = tiny_config(**overrides)
  assert count(param_shapes(config)) == expected_param_count(
      config, NUM_CLASSES)


@pytest.mark.parametrize('overrides', [
    dict(), dict(weight_sharing='first_iteration', num_iterations=8),
    dict(weight_sharing='first_cross_attend', num_iterations=8,
         latent_head_width='split'),
    dict(position_encoding='fourier', num_cross_heads=8, decoder='query')])
def test_parameter_count_at_cifar100_size(overrides):
  config = cifar100.get_config()
  config.update(overrides)
  assert count(param_shapes(config, 100)) == expected_param_count(config, 100)


def test_weight_sets_per_sharing_mode():
  names = {}
  for mode in WEIGHT_SETS:
    params = param_shapes(tiny_config(num_iterations=3,
                                      weight_sharing=mode))
    names[mode] = sorted(n for n in params if n.startswith(
        ('cross', 'latent_transformer')))
    # Every set of a kind has the same size; the rest is shared by all.
    one = {kind: count(params[next(n for n in names[mode]
                                   if n.startswith(kind))])
           for kind in ('cross_attention', 'latent_transformer')}
    others = count({n: p for n, p in params.items()
                    if n not in names[mode]})
    cross_sets, transformer_sets = WEIGHT_SETS[mode](3)
    assert count(params) == (others + cross_sets * one['cross_attention'] +
                             transformer_sets * one['latent_transformer'])
  assert names == {
      'all': ['cross_attention', 'latent_transformer'],
      'first_cross_attend': ['cross_attention_0', 'cross_attention_1',
                             'latent_transformer'],
      'first_iteration': ['cross_attention_0', 'cross_attention_1',
                          'latent_transformer_0', 'latent_transformer_1'],
      'none': ['cross_attention_0', 'cross_attention_1', 'cross_attention_2',
               'latent_transformer_0', 'latent_transformer_1',
               'latent_transformer_2']}


def test_seed_parameter_tree_unchanged_by_explicit_defaults():
  explicit = tiny_config(weight_sharing='all', position_encoding='learned',
                         num_cross_heads=0, decoder='mean',
                         logits_dropout=True)
  legacy = tiny_config()
  for name in PAPER_OPTION_DEFAULTS:  # Configs from before.
    del legacy[name]
  trees = [param_shapes(c) for c in (explicit, legacy)]
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
  assert set(trees[0]) == {'patch_encoder', 'latent_array', 'cross_attention',
                           'latent_transformer', 'classifier'}
  assert set(trees[0]['cross_attention']['attention']) == {
      'query', 'key', 'value', 'scale'}
  assert set(trees[0]['patch_encoder']) == {'projection',
                                            'position_embedding'}
  legacy_model = perceiver.create_model(legacy, 5)
  for name, default in PAPER_OPTION_DEFAULTS.items():
    assert getattr(legacy_model, name) == default == cifar100.get_config()[name]


# --------------------------------------------------------------------------
# Weight sharing: which iteration uses which weight set.


def test_weight_sharing_maps_iterations_to_weight_sets():
  sharing = lambda mode: tiny_config(num_iterations=3, weight_sharing=mode,
                                     num_transformer_blocks=1)
  images = images_for(sharing('none'))
  none_model, variables = build(sharing('none'), images)
  params = variables['params']
  apply = lambda model, p: model.apply({'params': p}, images, train=False)
  common = {n: p for n, p in params.items()
            if not n.startswith(('cross', 'latent_transformer'))}
  cross = lambda i: params[f'cross_attention_{i}']
  transformer = lambda i: params[f'latent_transformer_{i}']

  def none_with_sets(cross_sets, transformer_sets):
    # 'none' params whose iteration j uses cross-attention set
    # cross_sets[j] and Transformer set transformer_sets[j].
    return {**common,
            **{f'cross_attention_{j}': cross(i)
               for j, i in enumerate(cross_sets)},
            **{f'latent_transformer_{j}': transformer(i)
               for j, i in enumerate(transformer_sets)}}

  first_iteration = apply(
      perceiver.create_model(sharing('first_iteration'), NUM_CLASSES),
      {**common, 'cross_attention_0': cross(0), 'cross_attention_1': cross(1),
       'latent_transformer_0': transformer(0),
       'latent_transformer_1': transformer(1)})
  np.testing.assert_allclose(
      apply(none_model, none_with_sets((0, 1, 1), (0, 1, 1))),
      first_iteration, rtol=1e-5, atol=1e-6)
  assert not np.allclose(apply(none_model, params), first_iteration,
                         atol=1e-4)
  first_cross_attend = apply(
      perceiver.create_model(sharing('first_cross_attend'), NUM_CLASSES),
      {**common, 'cross_attention_0': cross(0), 'cross_attention_1': cross(1),
       'latent_transformer': transformer(2)})
  np.testing.assert_allclose(
      apply(none_model, none_with_sets((0, 1, 1), (2, 2, 2))),
      first_cross_attend, rtol=1e-5, atol=1e-6)
  assert not np.allclose(first_cross_attend, first_iteration, atol=1e-4)
  shared = perceiver.create_model(sharing('all'), NUM_CLASSES)
  np.testing.assert_allclose(
      apply(shared, {**common, 'cross_attention': cross(2),
                     'latent_transformer': transformer(2)}),
      apply(none_model, none_with_sets((2, 2, 2), (2, 2, 2))), rtol=1e-5,
      atol=1e-6)


def test_iterations_sharing_weights_draw_different_dropout_masks(
    monkeypatch):
  """Each call of a shared module draws a fresh key (flax's make_rng counts
  the calls), so iteration 2 does not repeat iteration 1's masks.

  Every mask the model draws (attention weights and FFN outputs alike) goes
  through `dropout.keep_mask`; recording them in call order gives each
  iteration's masks, in the same order, then the classifier's.
  """
  config = tiny_config(weight_sharing='all', num_iterations=2,
                       num_transformer_blocks=1, dropout_rate=0.5,
                       attention_dropout_rate=0.5)
  images = images_for(config)
  model, variables = build(config, images)
  masks = []
  keep_mask = dropout_lib.keep_mask

  def recording(*args, **kwargs):
    masks.append(keep_mask(*args, **kwargs))
    return masks[-1]

  monkeypatch.setattr(dropout_lib, 'keep_mask', recording)

  def draw(variables, images):
    masks.clear()
    model.apply(variables, images, train=True, rngs={'dropout': key(11)})
    return list(masks)

  compiled = jax.jit(draw).lower(variables, images).compile(
      compiler_options=FAST_COMPILE)
  masks.clear()  # (Tracers.)
  drawn = [np.asarray(m) for m in compiled(variables, images)]
  # Per iteration: cross-attention weights and its FFN, then attention
  # weights and FFN of each block; then the logits.
  per_iteration = 2 + 2 * config.num_transformer_blocks
  assert len(drawn) == 2 * per_iteration + 1, [m.shape for m in drawn]
  first, second = drawn[:per_iteration], drawn[per_iteration:-1]
  for i, (a, b) in enumerate(zip(first, second)):
    assert a.shape == b.shape, i
    assert 0 < a.mean() < 1 and 0 < b.mean() < 1, i  # Dropout is on.
    # Equal only with the same key: masks of 64 or more elements at rate
    # 0.5 coincide by chance with probability 2**-64 or less.
    assert (a != b).any(), f'mask {i} repeated in iteration 2'


# --------------------------------------------------------------------------
# Multi-head cross-attention and the query decoder, against their formulas.


def numpy_multi_head(params, inputs_q, inputs_kv, heads, head_dim):
  project = lambda x, p: np.einsum('btd,dnh->btnh', x, p['kernel']) + p['bias']
  q = project(inputs_q, params['query'])
  k = project(inputs_kv, params['key'])
  v = project(inputs_kv, params['value'])
  logits = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(head_dim)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bnts,bsnh->btnh', weights, v)
  assert out.shape[2:] == (heads, head_dim)
  return (np.einsum('btnh,nhd->btd', out, params['output']['kernel']) +
          params['output']['bias'], weights)


def test_multi_head_cross_attention_formula_and_sown_weights():
  rng = np.random.RandomState(1)
  latents = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  data = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  module = attention.MultiHeadAttention(4, 2, sow_weights=True)
  params = random_variables(module, latents, data,
                            deterministic=True)['params']
  assert params['query']['kernel'].shape == (8, 4, 2)
  assert params['key']['kernel'].shape == (6, 4, 2)
  assert params['output']['kernel'].shape == (4, 2, 8)
  expected, weights = numpy_multi_head(
      jax.tree.map(np.asarray, params), np.asarray(latents), np.asarray(data),
      4, 2)
  out = module.apply({'params': params}, latents, data, deterministic=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  captured, state = module.apply({'params': params}, latents, data,
                                 deterministic=True, mutable=['intermediates'])
  np.testing.assert_allclose(captured, out, rtol=1e-6, atol=1e-6)
  (sown,) = state['intermediates'][attention.ATTENTION_WEIGHTS]
  np.testing.assert_allclose(sown, weights, rtol=1e-5, atol=1e-6)


def test_seed_cross_attention_sows_its_scaled_weights():
  rng = np.random.RandomState(2)
  latents = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  data = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  module = attention.CrossAttention(features=8)
  params = random_variables(module, latents, data,
                            deterministic=True)['params']
  params = {**params, 'scale': jnp.float32(0.7)}
  _, state = module.apply({'params': params}, latents, data,
                          deterministic=True, mutable=['intermediates'])
  dense = lambda x, p: np.asarray(x) @ p['kernel'] + p['bias']
  logits = 0.7 * np.einsum('bnd,bmd->bnm', dense(latents, params['query']),
                           dense(data, params['key']))
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  (sown,) = state['intermediates'][attention.ATTENTION_WEIGHTS]
  np.testing.assert_allclose(sown, weights[:, None], rtol=1e-5, atol=1e-6)


def test_query_decoder_formula():
  rng = np.random.RandomState(3)
  latents = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  decoder = decoders.QueryDecoder(features=8, num_heads=2)
  params = random_variables(decoder, latents, deterministic=True)['params']
  assert params['query'].shape == (1, 8)
  p = jax.tree.map(np.asarray, params)
  x = np.asarray(latents)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  normed = ((x - mean) / np.sqrt(var + 1e-6) * p['latent_norm']['scale'] +
            p['latent_norm']['bias'])
  query = np.broadcast_to(p['query'], (2, 1, 8))
  expected, _ = numpy_multi_head(p['attention'], query, normed, 2, 4)
  out = decoder.apply({'params': params}, latents, deterministic=True)
  assert out.shape == (2, 8)
  np.testing.assert_allclose(out, expected[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides', [dict(num_cross_heads=2),
                                       dict(decoder='query')])
def test_attention_dropout_reaches_new_attentions(overrides):
  # Only attention dropout, on the attentions this option adds or changes.
  config = tiny_config(dropout_rate=0.0, attention_dropout_rate=0.5,
                       num_transformer_blocks=1, num_iterations=1,
                       **overrides)
  images = images_for(config)
  model, variables = build(config, images)
  train = lambda: model.apply(variables, images, train=True,
                              rngs={'dropout': key(5)})
  assert not np.allclose(train(), model.apply(variables, images, train=False),
                         atol=1e-6)
  np.testing.assert_array_equal(train(), train())


# --------------------------------------------------------------------------
# Dropout on the logits.


def test_classifier_without_logits_dropout_ignores_the_rng():
  x = jnp.asarray(np.random.RandomState(4).normal(size=(4, 8)), jnp.float32)
  for final_dropout in (True, False):
    head = blocks.FeedForward((8, 5), 0.5, final_dropout=final_dropout)
    variables = random_variables(head, x, deterministic=True)
    train = lambda seed, head=head, v=variables: head.apply(
        v, x, deterministic=False, rngs={'dropout': key(seed)})
    evaluation = head.apply(variables, x, deterministic=True)
    if final_dropout:
      assert not np.allclose(train(0), train(1))
    else:
      np.testing.assert_array_equal(train(0), evaluation)
      np.testing.assert_array_equal(train(1), evaluation)


def test_logits_dropout_is_the_only_difference_in_training():
  # Same params and rng: the body's dropout masks are the same, so the seed's
  # logits are the logits_dropout=False logits with dropout applied.
  rate = 0.5
  images = images_for(tiny_config())
  logits = {}
  for logits_dropout in (True, False):
    config = tiny_config(dropout_rate=rate, logits_dropout=logits_dropout,
                         num_transformer_blocks=1, num_iterations=1)
    model, variables = build(config, images)
    logits[logits_dropout] = np.asarray(model.apply(
        variables, images, train=True, rngs={'dropout': key(7)}))
  dropped = logits[True] == 0
  assert 0 < dropped.sum() < dropped.size
  assert not np.any(logits[False] == 0)
  np.testing.assert_allclose(logits[True][~dropped],
                             logits[False][~dropped] / (1 - rate), rtol=1e-5)


# --------------------------------------------------------------------------
# Sown cross-attention weights (for attention maps).


@pytest.mark.parametrize('overrides, heads', [
    (dict(), 1),
    (dict(num_iterations=3, weight_sharing='first_iteration',
          num_cross_heads=2,
          decoder='query', num_transformer_blocks=1), 2),
])
def test_sown_cross_attention_weights(overrides, heads):
  config = tiny_config(**overrides)
  images = images_for(config)
  model, variables = build(config, images)
  assert set(variables) == {'params'}  # init sows nothing.
  for train in (False, True):
    rngs = {'dropout': key(9)} if train else {}
    plain = model.apply(variables, images, train=train, rngs=rngs)
    captured, state = model.apply(variables, images, train=train, rngs=rngs,
                                  mutable=['intermediates'])
    np.testing.assert_allclose(captured, plain, rtol=1e-6, atol=1e-6)
    weights = sharing.cross_attention_weights(state['intermediates'])
    assert len(weights) == config.num_iterations
    for w in weights:
      assert w.shape == (2, heads, config.latent_dim, model.num_patches)
      np.testing.assert_allclose(np.sum(w, -1), 1.0, rtol=1e-5)
    # Iterations see different latents, so their maps differ.
    assert not np.allclose(weights[0], weights[1], atol=1e-4)


@pytest.mark.parametrize('num_cross_heads', [0, 2])
def test_fused_attention_unless_capturing(monkeypatch, num_cross_heads):
  calls = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **k: calls.append(a[0].shape) or fused(*a,
                                                                        **k))
  config = tiny_config(num_cross_heads=num_cross_heads)
  images = images_for(config)
  model, variables = build(config, images)
  calls.clear()  # (build traces init.)
  model.apply(variables, images, train=False)
  # Queries [batch, latents, heads, head_dim]; self-attention: (2, 4, 2, 8).
  cross_query = (2, 4, 1, 8) if num_cross_heads == 0 else (2, 4, 2, 4)
  # 2 iterations x (1 cross-attention + 2 self-attention blocks).
  assert len(calls) == 6 and calls.count(cross_query) == 2
  calls.clear()
  model.apply(variables, images, train=False, mutable=['intermediates'])
  # Only self-attention: the captured cross-attention materialises weights.
  assert len(calls) == 4 and cross_query not in calls


@pytest.mark.parametrize('weight_sharing', ['all', 'none'])
def test_sown_weights_through_remat(weight_sharing):
  # Shapes only (remat changes no values; see test_perceiver.py).
  config = tiny_config(remat=True, num_iterations=3, num_cross_heads=2,
                       weight_sharing=weight_sharing)
  model = perceiver.create_model(config, NUM_CLASSES)
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             key(0), images)
  for train in (False, True):
    _, state = jax.eval_shape(
        lambda v, x, train=train: model.apply(
            v, x, train=train, rngs={'dropout': key(1)},
            mutable=['intermediates']), variables, images)
    weights = sharing.cross_attention_weights(state['intermediates'])
    assert [w.shape for w in weights] == [(2, 2, 4, 16)] * 3


# --------------------------------------------------------------------------
# Validation: config_lib and the module constructors.


@pytest.mark.parametrize('field, value, message', [
    ('position_encoding', 'sinusoid',
     "config.position_encoding='sinusoid' must be 'learned' or 'fourier'"),
    ('num_cross_heads', 3, 'config.num_cross_heads=3 must divide '
     'config.projection_dim=256'),
    ('num_cross_heads', -1, 'config.num_cross_heads=-1 must be a non-negative'),
    ('weight_sharing', 'some',
     "config.weight_sharing='some' must be 'all', 'first_cross_attend', "
     "'first_iteration' or 'none'"),
    ('decoder', 'cls', "config.decoder='cls' must be 'mean', 'query' or "
     "'perceiver_io'"),
    ('fourier_mode', 'mul', "config.fourier_mode='mul' must be 'concat' or"),
    ('fourier_num_bands', 0, 'config.fourier_num_bands=0 must be a positive'),
    ('fourier_max_resolution', -2, 'config.fourier_max_resolution=-2 must be'),
    ('logits_dropout', 'yes', "config.logits_dropout='yes' must be True or"),
])
def test_config_lib_rejects_bad_paper_options(field, value, message):
  values = cifar100.get_config().to_dict()
  values[field] = value  # Bypasses ConfigDict's type lock (bool field).
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(ml_collections.ConfigDict(values))
  assert message in str(e.value)


def test_config_lib_accepts_paper_options_and_old_configs():
  config = cifar100.get_config()
  config.update(dict(position_encoding='fourier', fourier_mode='add',
                     fourier_max_resolution=64, weight_sharing='none',
                     num_cross_heads=8, decoder='query',
                     logits_dropout=False))
  assert not config_lib.config_problems(config)
  for name in PAPER_OPTION_DEFAULTS:
    del config[name]
  assert not config_lib.config_problems(config)


@pytest.mark.parametrize('overrides, message', [
    (dict(position_encoding='sinusoid'),
     "position_encoding must be 'learned' or 'fourier'"),
    (dict(fourier_mode='mul'), "fourier_mode must be 'concat' or 'add'"),
    (dict(fourier_num_bands=0), 'fourier_num_bands must be a positive integer'),
    (dict(fourier_max_resolution=-1),
     'fourier_max_resolution must be a non-negative integer'),
    (dict(weight_sharing='some'),
     "weight_sharing must be 'all', 'first_cross_attend', 'first_iteration' "
     'or'),
    (dict(decoder='cls'), "decoder must be 'mean', 'query' or 'perceiver_io'"),
    (dict(num_cross_heads=3), 'num_cross_heads=3 must divide projection_dim'),
])
def test_model_rejects_bad_paper_options(overrides, message):
  config = tiny_config()
  config.update(overrides)  # No config_lib here: the model checks itself.
  with pytest.raises(ValueError, match=message):
    perceiver.create_model(config, NUM_CLASSES)


def test_submodules_reject_bad_options():
  with pytest.raises(ValueError, match="position_encoding must be 'learned'"):
    encoders.PatchEncoder(2, 16, 8, position_encoding='none')
  with pytest.raises(ValueError, match='num_cross_heads=3 must divide'):
    blocks.CrossAttentionBlock(8, (8, 8), 0.0, 0.0, num_heads=3)
  with pytest.raises(ValueError, match='num_heads=3 must divide the decoder'):
    decoders.QueryDecoder(features=8, num_heads=3)
  with pytest.raises(ValueError, match="attention_init must be 'keras2' or"):
    attention.MultiHeadAttention(2, 4, attention_init='keras1')
  with pytest.raises(ValueError, match='num_bands must be positive'):
    position_encoding.generate_fourier_features(jnp.zeros((3, 2)), 0, (4, 4))


def test_bfloat16_with_every_option():
  config = tiny_config(position_encoding='fourier', num_cross_heads=2,
                       decoder='query', weight_sharing='first_iteration',
                       num_transformer_blocks=1, dtype='bfloat16')
  images = images_for(config)
  model, variables = build(config, images)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {
      np.dtype('float32')}
  # Jitted: eagerly, every bfloat16 op would compile on its own.
  logits = jax.jit(functools.partial(model.apply, train=False))(variables,
                                                                images)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
