"""The seed's Keras preprocessing and augmentation, as jit-able JAX functions.

The seed puts `Normalization -> Resizing -> RandomFlip('horizontal') ->
RandomZoom(0.2, 0.2)` inside the model, so it runs on the accelerator every
step. We do the same inside the jitted train/eval step, keyed by a JAX PRNG
key, and reproduce the Keras (TensorFlow backend) numerics: `tf.image.resize`
bilinear without antialiasing, and `ImageProjectiveTransformV3` with bilinear
interpolation and REFLECT fill for the zoom.

Resize, flip and zoom are all separable linear maps: along height and along
width separately, each output pixel is a fixed mix of at most two input
pixels. So each is a pair of small interpolation matrices per image applied
with two batched matmuls, which is exact, shape-static and cheap, and
`preprocess_train` multiplies the resize, flip and zoom matrices together so
the whole augmentation costs one pass over the batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax import checks

# On the device, training images get the seed's flip and zoom ('seed') or
# only the normalisation and resize evaluation gets ('none': for data the
# host already cropped and flipped, see host_transforms.py).
DEVICE_AUGMENTS = ('seed', 'none')
RULES = {'device_augment': checks.one_of(*DEVICE_AUGMENTS)}
OPTION_DEFAULTS = {'device_augment': 'seed'}

# `keras.backend.epsilon()`; Keras' Normalization divides by
# max(sqrt(variance), epsilon).
_EPSILON = 1e-7
# The seed's RandomZoom(height_factor=0.2, width_factor=0.2).
HEIGHT_FACTOR = 0.2
WIDTH_FACTOR = 0.2
# Full float32 matmuls: GPUs would otherwise use TF32 and TPUs bfloat16,
# which would blur the images by ~1e-3 relative. The matrices are tiny.
_PRECISION = jax.lax.Precision.HIGHEST


def normalize(images, mean, variance):
  """Keras `Normalization(mean, variance)`: per-channel standardisation.

  Args:
    images: `[..., C]` array of any real dtype (uint8 in the pipeline).
    mean: per-channel mean, broadcastable to `images`.
    variance: per-channel variance, broadcastable to `images`.

  Returns:
    float32 `(images - mean) / max(sqrt(variance), 1e-7)`, like Keras.
  """
  images = jnp.asarray(images, jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.sqrt(jnp.asarray(variance, jnp.float32))
  return (images - mean) / jnp.maximum(std, _EPSILON)


@functools.lru_cache(maxsize=None)
def _resize_matrix(in_size, out_size):
  """`[out_size, in_size]` weights of TF's half-pixel bilinear resize.

  Follows TF's `compute_interpolation_weights`: source coordinate
  `(i + 0.5) * in/out - 0.5`, neighbours clamped to the image, no
  antialiasing (so downsampling just mixes the two nearest pixels).
  Built with numpy at trace time; the result must not be mutated.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
  src = src - np.float32(0.5)
  floor = np.floor(src)
  lerp = src - floor
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1.0 - lerp)
  np.add.at(weights, (rows, upper), lerp)
  return weights


def _apply_separable(images, rows, cols):
  """`out[b, :, :, c] = rows[b] @ images[b, :, :, c] @ cols[b].T`.

  Args:
    images: `[B, H, W, C]` float32.
    rows: `[B, H', H]` or shared `[H', H]` height mixing matrix.
    cols: `[B, W', W]` or shared `[W', W]` width mixing matrix.

  Returns:
    `[B, H', W', C]` float32.
  """
  row_spec = 'byh' if rows.ndim == 3 else 'yh'
  col_spec = 'bxw' if cols.ndim == 3 else 'xw'
  out = jnp.einsum(f'{row_spec},bhwc->bywc', rows, images,
                   precision=_PRECISION)
  return jnp.einsum(f'{col_spec},bywc->byxc', cols, out, precision=_PRECISION)


def resize(images, image_size: int):
  """Keras `Resizing(image_size, image_size)`: bilinear, no antialiasing.

  Equals `tf.image.resize(images, (s, s), 'bilinear', antialias=False)`
  (half-pixel centres) for up- and downsampling.

  Args:
    images: `[B, H, W, C]` array.
    image_size: static output height and width.

  Returns:
    `[B, image_size, image_size, C]` float32.
  """
  images = jnp.asarray(images, jnp.float32)
  _, height, width, _ = images.shape
  if (height, width) == (image_size, image_size):
    return images  # TF's weights are then the identity.
  return _apply_separable(images, _resize_matrix(height, image_size),
                          _resize_matrix(width, image_size))


def _sample_flips(rng, batch_size):
  """Per-image horizontal-flip decisions, p = 0.5 as in Keras RandomFlip."""
  return jax.random.bernoulli(rng, 0.5, (batch_size,))


def random_flip(rng, images):
  """Keras `RandomFlip('horizontal')`: mirror each image with p = 0.5.

  Args:
    rng: PRNG key.
    images: `[B, H, W, C]` array; dtype is kept.

  Returns:
    `images` with a random subset of them mirrored left-right.
  """
  images = jnp.asarray(images)
  flips = _sample_flips(rng, images.shape[0])
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def _factor_range(factor):
  """Keras' zoom range `[1 + lower, 1 + upper]` for a float or a pair."""
  if isinstance(factor, (tuple, list)):
    lower, upper = sorted(factor)
  else:
    lower, upper = -abs(factor), abs(factor)
  return 1.0 + lower, 1.0 + upper


def sample_zoom_factors(rng, batch_size, height_factor=HEIGHT_FACTOR,
                        width_factor=WIDTH_FACTOR):
  """Per-image zoom factors as Keras RandomZoom draws them.

  Args:
    rng: PRNG key.
    batch_size: static number of images.
    height_factor: float `f` for `U[1 - f, 1 + f]`, or a Keras-style pair
      `(lower, upper)` for `U[1 + lower, 1 + upper]`. Above 1 zooms out.
    width_factor: as `height_factor`, drawn independently; None reuses the
      height zoom (aspect-preserving), as in Keras.

  Returns:
    `(height_zoom, width_zoom)`, each float32 `[batch_size]`.
  """
  height_rng, width_rng = jax.random.split(rng)
  low, high = _factor_range(height_factor)
  height_zoom = jax.random.uniform(height_rng, (batch_size,), jnp.float32,
                                   low, high)
  if width_factor is None:
    return height_zoom, height_zoom
  low, high = _factor_range(width_factor)
  width_zoom = jax.random.uniform(width_rng, (batch_size,), jnp.float32,
                                  low, high)
  return height_zoom, width_zoom


def _reflect(coord, size):
  """TF's FILL_REFLECT coordinate map (d c b a | a b c d | d c b a).

  Reflects about the outer edges of the border pixels, then clamps into
  `[0, size - 1]` as `ImageProjectiveTransformV3` does before interpolating.
  """
  if size <= 1:
    return jnp.zeros_like(coord)
  period = 2.0 * size
  # Negative side (the TF kernel's `sz2 * int(-c / sz2) + c`, then mirror).
  neg = coord + period * jnp.trunc(-coord / period)
  neg = jnp.where(neg < -size, neg + period, -neg - 1.0)
  # Positive side beyond the last pixel.
  pos = coord - period * jnp.trunc(coord / period)
  pos = jnp.where(pos >= size, period - pos - 1.0, pos)
  mapped = jnp.where(coord < 0, neg, jnp.where(coord > size - 1, pos, coord))
  return jnp.clip(mapped, 0.0, size - 1.0)


def _zoom_matrix(zoom, size):
  """`[B, size, size]` bilinear sampling matrices for Keras' zoom.

  Output pixel `i` reads input coordinate `zoom * i + (size - 1) / 2 *
  (1 - zoom)` (the Keras zoom transform, about the image centre), reflected
  into the image, interpolated linearly between its two neighbours.
  """
  zoom = jnp.asarray(zoom, jnp.float32)
  offset = (jnp.float32(size) - 1.0) / 2.0 * (1.0 - zoom)
  src = zoom[:, None] * jnp.arange(size, dtype=jnp.float32) + offset[:, None]
  src = _reflect(src, size)
  floor = jnp.floor(src)
  frac = (src - floor)[..., None]
  index = floor.astype(jnp.int32)
  # At the last pixel frac is 0 and `index + 1` one-hots to zeros, just as
  # TF reads its fill value there with weight 0.
  return ((1.0 - frac) * jax.nn.one_hot(index, size, dtype=jnp.float32)
          + frac * jax.nn.one_hot(index + 1, size, dtype=jnp.float32))


def zoom(images, height_zoom, width_zoom):
  """Deterministic core of Keras RandomZoom, given per-image factors.

  Equals `ImageProjectiveTransformV3` with Keras' zoom matrix, bilinear
  interpolation and REFLECT fill.

  Args:
    images: `[B, H, W, C]` array.
    height_zoom: `[B]` vertical factors; above 1 zooms out.
    width_zoom: `[B]` horizontal factors.

  Returns:
    `[B, H, W, C]` float32.
  """
  images = jnp.asarray(images, jnp.float32)
  _, height, width, _ = images.shape
  return _apply_separable(images, _zoom_matrix(height_zoom, height),
                          _zoom_matrix(width_zoom, width))


def random_zoom(rng, images, height_factor=HEIGHT_FACTOR,
                width_factor=WIDTH_FACTOR):
  """Keras `RandomZoom(height_factor, width_factor)`, fill 'reflect'.

  Args:
    rng: PRNG key.
    images: `[B, H, W, C]` array.
    height_factor: see `sample_zoom_factors`.
    width_factor: see `sample_zoom_factors`.

  Returns:
    `[B, H, W, C]` float32, each image zoomed by its own random factors.
  """
  images = jnp.asarray(images, jnp.float32)
  height_zoom, width_zoom = sample_zoom_factors(
      rng, images.shape[0], height_factor, width_factor)
  return zoom(images, height_zoom, width_zoom)


def preprocess_train(rng, images, mean, variance, image_size):
  """Training input: normalize -> resize -> random flip -> random zoom.

  Same result (to float rounding) as
  `random_zoom(k2, random_flip(k1, resize(normalize(...))))` with
  `k1, k2 = jax.random.split(rng)`, but the resize, flip and zoom matrices
  are multiplied first so the images are touched by only two matmuls.

  Args:
    rng: PRNG key.
    images: raw `[B, H, W, C]` batch (uint8).
    mean: per-channel mean of the training set.
    variance: per-channel variance of the training set.
    image_size: static output size.

  Returns:
    `[B, image_size, image_size, C]` float32.
  """
  images = normalize(images, mean, variance)
  batch_size, height, width, _ = images.shape
  flip_rng, zoom_rng = jax.random.split(rng)
  flips = _sample_flips(flip_rng, batch_size)
  height_zoom, width_zoom = sample_zoom_factors(zoom_rng, batch_size)
  resize_rows = jnp.asarray(_resize_matrix(height, image_size))
  resize_cols = jnp.asarray(_resize_matrix(width, image_size))
  # Mirroring the resized image reverses the rows of its width matrix.
  resize_cols = jnp.where(flips[:, None, None], resize_cols[::-1],
                          resize_cols)
  rows = jnp.einsum('byz,zh->byh', _zoom_matrix(height_zoom, image_size),
                    resize_rows, precision=_PRECISION)
  cols = jnp.einsum('bxz,bzw->bxw', _zoom_matrix(width_zoom, image_size),
                    resize_cols, precision=_PRECISION)
  return _apply_separable(images, rows, cols)


def preprocess_eval(images, mean, variance, image_size):
  """Evaluation input: normalize -> resize, no randomness (as in Keras)."""
  return resize(normalize(images, mean, variance), image_size)
