"""perceiver_jax.augment against TensorFlow / Keras 3 (TF backend) kernels."""

import ast
import functools
import os

os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import tensorflow as tf

from perceiver_jax.data import augment

ATOL = 1e-4
# CIFAR-100's per-channel statistics, roughly, so values are O(1).
MEAN = np.array([129.3, 124.1, 112.4], np.float32)
VARIANCE = np.array([68.2, 65.4, 70.4], np.float32) ** 2


@pytest.fixture
def tf_keras():
  """Fails, never skips, unless Keras runs on TensorFlow.

  The Keras layers are the reference only on the seed's backend; skipping
  on another would quietly drop the file's strongest checks.
  """
  backend = keras.backend.backend()
  if backend != 'tensorflow':
    pytest.fail(f'Keras was imported with the {backend!r} backend, but the '
                'reference layers need TensorFlow: unset KERAS_BACKEND (or '
                'set it to "tensorflow") and run again.', pytrace=False)


def _uint8_images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _float_images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _tf_zoom(images, height_zoom, width_zoom):
  """ImageProjectiveTransformV3 with Keras RandomZoom's matrix."""
  _, height, width, _ = images.shape
  hz = np.asarray(height_zoom, np.float32)
  wz = np.asarray(width_zoom, np.float32)
  zeros = np.zeros_like(hz)
  transforms = np.stack(
      [wz, zeros, (width - 1.0) / 2.0 * (1.0 - wz),
       zeros, hz, (height - 1.0) / 2.0 * (1.0 - hz), zeros, zeros], axis=1)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.constant(images, tf.float32),
      transforms=tf.constant(transforms, tf.float32),
      output_shape=[height, width], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='REFLECT').numpy()


def test_module_does_not_import_tensorflow():
  with open(augment.__file__, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      imported.add(node.module.split('.')[0])
  # perceiver_jax: its option rules (perceiver_jax.checks, pure Python).
  assert imported == {'functools', 'jax', 'numpy', 'perceiver_jax'}


@pytest.mark.parametrize('shape,size', [
    ((3, 32, 32, 3), 64),   # the seed: CIFAR 32 -> 64
    ((3, 32, 32, 1), 16),   # downsampling
    ((2, 32, 20, 3), 64),   # non-square up
    ((2, 20, 45, 1), 13),   # non-square down, non-integer ratio
    ((2, 24, 24, 3), 24),   # same size: identity
])
def test_resize_matches_tf_bilinear_without_antialias(shape, size):
  images = _uint8_images(shape)
  expected = tf.image.resize(images, (size, size), method='bilinear',
                             antialias=False).numpy()
  got = np.asarray(augment.resize(images, size))
  assert got.dtype == np.float32
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=ATOL * 255, rtol=0)
  # And on float data of unit scale, the tolerance the brief asks for.
  floats = _float_images(shape)
  expected = tf.image.resize(floats, (size, size), method='bilinear',
                             antialias=False).numpy()
  np.testing.assert_allclose(augment.resize(floats, size), expected,
                             atol=ATOL, rtol=0)


def test_resize_is_not_antialiased():
  # Downsampling 3x without antialiasing samples input column 3i + 1 only
  # (all ones here); an antialiased resize would average in the zeros.
  images = np.tile((np.arange(30) % 3 == 1).astype(np.float32),
                   (1, 30, 1))[..., None]
  got = np.asarray(augment.resize(images, 10))
  np.testing.assert_allclose(got, 1.0, atol=1e-6)


@pytest.mark.usefixtures('tf_keras')
@pytest.mark.parametrize('channels', [1, 3])
def test_normalize_matches_keras_normalization(channels):
  images = _uint8_images((2, 8, 6, channels))
  mean, variance = MEAN[:channels], VARIANCE[:channels]
  variance = variance.copy()
  variance[0] = 0.0  # Keras floors the std at epsilon = 1e-7.
  layer = keras.layers.Normalization(mean=mean, variance=variance)
  expected = keras.ops.convert_to_numpy(layer(images.astype(np.float32)))
  got = np.asarray(augment.normalize(images, mean, variance))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert np.isfinite(got).all()


@pytest.mark.parametrize('shape,height_zoom,width_zoom', [
    ((4, 20, 28, 3), [0.8, 0.85, 0.9, 0.97], [0.8, 0.85, 0.9, 0.97]),  # in
    ((4, 20, 28, 3), [1.2, 1.15, 1.1, 1.03], [1.2, 1.15, 1.1, 1.03]),  # out
    ((4, 28, 20, 1), [0.8, 1.2, 1.0, 0.93], [1.2, 0.8, 0.87, 1.0]),  # mixed
    ((2, 64, 64, 3), [0.81, 1.17], [1.13, 0.86]),                   # seed
    ((3, 11, 16, 2), [0.3, 2.5, 4.1], [3.7, 0.2, 1.6]),   # far outside,
])                                                        # many reflections
def test_zoom_matches_tf_projective_transform(shape, height_zoom, width_zoom):
  images = _float_images(shape)
  expected = _tf_zoom(images, height_zoom, width_zoom)
  got = np.asarray(augment.zoom(images, np.float32(height_zoom),
                                np.float32(width_zoom)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_zoom_by_one_is_identity_and_zoom_in_magnifies_the_centre():
  images = _float_images((2, 9, 13, 1))
  np.testing.assert_allclose(augment.zoom(images, np.ones(2), np.ones(2)),
                             images, atol=1e-6)
  # Zoom 0.5 about the centre: output column 2 * k reads input column
  # 3 + k (W = 13, centre 6).
  got = np.asarray(augment.zoom(images, np.ones(2), np.full(2, 0.5)))
  np.testing.assert_allclose(got[:, :, ::2], images[:, :, 3:10], atol=1e-6)


@pytest.mark.usefixtures('tf_keras')
@pytest.mark.parametrize('height_factor,width_factor', [
    ((0.3, 0.3), (-0.25, -0.25)),   # zoom out vertically, in horizontally
    ((-0.2, -0.2), (0.2, 0.2)),
])
def test_zoom_matches_keras_random_zoom_with_fixed_factors(height_factor,
                                                           width_factor):
  images = _float_images((3, 32, 24, 3))
  layer = keras.layers.RandomZoom(height_factor, width_factor)
  expected = keras.ops.convert_to_numpy(layer(images, training=True))
  ones = np.ones(3, np.float32)
  got = augment.zoom(images, ones * (1.0 + height_factor[0]),
                     ones * (1.0 + width_factor[0]))
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.usefixtures('tf_keras')
def test_preprocess_eval_matches_keras_normalization_then_resizing():
  images = _uint8_images((4, 32, 32, 3))
  model = keras.Sequential([
      keras.layers.Normalization(mean=MEAN, variance=VARIANCE),
      keras.layers.Resizing(64, 64),
  ])
  expected = keras.ops.convert_to_numpy(model(images.astype(np.float32)))
  got = augment.preprocess_eval(images, MEAN, VARIANCE, 64)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_random_flip_flips_about_half_of_the_images_left_right():
  images = _uint8_images((2000, 4, 5, 1))
  out = np.asarray(augment.random_flip(jax.random.key(0), images))
  assert out.dtype == images.dtype
  same = (out == images).all(axis=(1, 2, 3))
  mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
  assert (same | mirrored).all()
  assert not (same & mirrored).any()  # random 4x5 images are not symmetric
  assert 900 < mirrored.sum() < 1100  # Binomial(2000, 0.5): sd 22.


def test_random_flip_is_deterministic_per_key():
  images = _uint8_images((64, 4, 5, 3))
  a = augment.random_flip(jax.random.key(1), images)
  b = augment.random_flip(jax.random.key(1), images)
  c = augment.random_flip(jax.random.key(2), images)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sample_zoom_factors_are_independent_and_fill_the_range():
  height, width = augment.sample_zoom_factors(jax.random.key(0), 20000)
  height, width = np.asarray(height), np.asarray(width)
  for z in (height, width):
    assert z.dtype == np.float32
    assert z.min() >= 0.8 and z.max() <= 1.2
    assert z.min() < 0.801 and z.max() > 1.199
    assert abs(z.mean() - 1.0) < 0.005
    assert abs(z.std() - 0.4 / np.sqrt(12)) < 0.003  # uniform's std
  assert abs(np.corrcoef(height, width)[0, 1]) < 0.03
  # Keras-style ranges: a pair is (lower, upper); None ties width to height.
  height, width = augment.sample_zoom_factors(jax.random.key(1), 1000,
                                              (0.1, 0.3), None)
  assert np.all((height >= 1.1) & (height <= 1.3))
  np.testing.assert_array_equal(height, width)


def _ramp_images(batch, height, width):
  """Channel 0 holds the column index, channel 1 the row index."""
  cols = np.broadcast_to(np.arange(width, dtype=np.float32), (height, width))
  rows = np.broadcast_to(np.arange(height, dtype=np.float32)[:, None],
                         (height, width))
  return np.broadcast_to(np.stack([cols, rows], -1),
                         (batch, height, width, 2)).copy()


def test_random_zoom_applies_sampled_factors_to_the_right_axes():
  batch, height, width = 256, 32, 40
  images = _ramp_images(batch, height, width)
  key = jax.random.key(3)
  out = np.asarray(augment.random_zoom(key, images))
  # On a linear ramp bilinear sampling returns the source coordinate, so
  # the slope through the (never reflected) centre is the zoom factor.
  width_zoom = out[:, 0, width // 2 + 1, 0] - out[:, 0, width // 2, 0]
  height_zoom = out[:, height // 2 + 1, 0, 1] - out[:, height // 2, 0, 1]
  expected_h, expected_w = augment.sample_zoom_factors(key, batch)
  np.testing.assert_allclose(height_zoom, expected_h, atol=1e-4)
  np.testing.assert_allclose(width_zoom, expected_w, atol=1e-4)
  assert height_zoom.min() >= 0.8 - 1e-4 and height_zoom.max() <= 1.2 + 1e-4
  assert width_zoom.min() >= 0.8 - 1e-4 and width_zoom.max() <= 1.2 + 1e-4
  assert height_zoom.std() > 0.05 and width_zoom.std() > 0.05
  # Deterministic per key, different for another key.
  np.testing.assert_array_equal(out, augment.random_zoom(key, images))
  assert not np.allclose(out, augment.random_zoom(jax.random.key(4), images))


@pytest.mark.parametrize('channels', [1, 3])
def test_preprocess_train_equals_composition_of_the_steps(channels):
  images = _uint8_images((16, 32, 32, channels))
  mean, variance = MEAN[:channels], VARIANCE[:channels]
  key = jax.random.key(5)
  got = np.asarray(augment.preprocess_train(key, images, mean, variance, 64))
  flip_key, zoom_key = jax.random.split(key)
  x = augment.resize(augment.normalize(images, mean, variance), 64)
  expected = np.asarray(
      augment.random_zoom(zoom_key, augment.random_flip(flip_key, x)))
  assert got.shape == (16, 64, 64, channels) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
  # Reference the zoom to TF too, with the factors the key draws.
  height_zoom, width_zoom = augment.sample_zoom_factors(zoom_key, 16)
  flipped = np.asarray(augment.random_flip(flip_key, x))
  np.testing.assert_allclose(
      got, _tf_zoom(flipped, height_zoom, width_zoom), atol=ATOL, rtol=0)


def test_preprocess_under_jit():
  images = _uint8_images((8, 32, 32, 3))
  train = jax.jit(augment.preprocess_train, static_argnames='image_size')
  evaluate = jax.jit(functools.partial(augment.preprocess_eval,
                                       image_size=64))
  key = jax.random.key(6)
  a = train(key, images, MEAN, VARIANCE, image_size=64)
  assert a.shape == (8, 64, 64, 3) and a.dtype == jnp.float32
  # Not bit-equal: XLA fuses the source-coordinate arithmetic differently
  # (1 ulp of ~63 moves a sample by 4e-6 pixels).
  np.testing.assert_allclose(
      a, augment.preprocess_train(key, images, MEAN, VARIANCE, 64),
      atol=ATOL, rtol=0)
  np.testing.assert_array_equal(a, train(key, images, MEAN, VARIANCE,
                                         image_size=64))
  assert not np.allclose(a, train(jax.random.key(7), images, MEAN, VARIANCE,
                                  image_size=64))
  e = evaluate(images, MEAN, VARIANCE)
  assert e.shape == (8, 64, 64, 3) and e.dtype == jnp.float32
  np.testing.assert_array_equal(e, evaluate(images, MEAN, VARIANCE))
  np.testing.assert_allclose(
      e, augment.resize(augment.normalize(images, MEAN, VARIANCE), 64),
      atol=1e-5, rtol=0)
