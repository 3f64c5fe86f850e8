"""A RandAugment-style policy (Cubuk et al. 2020) in JAX, jit-able, per image.

Runs inside the train step on the raw images (float values in [0, 255],
before normalisation), so pixel-value ops such as solarize and posterize
mean what they mean on 8-bit images. Each image draws `num_ops` ops
uniformly from `OPS`, each with a random sign, at a fixed magnitude on
timm's scale (0 .. 10; level = magnitude / 10). Unlike timm, every op is
scaled by the magnitude (autocontrast is blended in by `level`), so
magnitude 0 is the identity. Equalize and sharpness are left out; geometric
ops turn about the image centre, sample bilinearly and fill with grey (128).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

_FILL = 128.0
_MAX_ENHANCE = 0.9  # brightness / color / contrast factor 1 +- 0.9 * level
_MAX_ROTATE_DEGREES = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.45  # fraction of the image side


def _gray(image):
  """`[H, W]` luminance (ITU-R 601-2, as PIL) or the channel mean."""
  if image.shape[-1] == 3:
    return image @ jnp.array([0.299, 0.587, 0.114], image.dtype)
  return jnp.mean(image, axis=-1)


def _blend(base, image, factor):
  """PIL ImageEnhance: `base + factor * (image - base)`."""
  return base + factor * (image - base)


def _identity(image, level):
  del level
  return image


def _autocontrast(image, level):
  lo = jnp.min(image, axis=(0, 1))
  hi = jnp.max(image, axis=(0, 1))
  scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1e-6), 1.0)
  stretched = jnp.where(hi > lo, (image - lo) * scale, image)
  return _blend(image, stretched, jnp.abs(level))


def _brightness(image, level):
  return image * (1.0 + _MAX_ENHANCE * level)


def _color(image, level):
  return _blend(_gray(image)[..., None], image, 1.0 + _MAX_ENHANCE * level)


def _contrast(image, level):
  return _blend(jnp.mean(_gray(image)), image, 1.0 + _MAX_ENHANCE * level)


def _posterize(image, level):
  """Keeps `8 - round(4 * level)` bits: 8 (identity) down to 4."""
  step = 2.0**jnp.round(4.0 * jnp.abs(level))
  return jnp.where(step > 1.0, jnp.floor(image / step) * step, image)


def _solarize(image, level):
  """Inverts the values at or above `256 * (1 - level)`."""
  threshold = 256.0 * (1.0 - jnp.abs(level))
  return jnp.where(image >= threshold, 255.0 - image, image)


def _warp(image, matrix, offset):
  """Output pixel p samples `matrix @ (p - c) + c + offset` (c: the centre)."""
  height, width, _ = image.shape
  centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0], jnp.float32)
  grid = jnp.stack(jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                                jnp.arange(width, dtype=jnp.float32),
                                indexing='ij'))
  coords = (jnp.einsum('ij,jhw->ihw', matrix, grid - centre[:, None, None],
                       precision=jax.lax.Precision.HIGHEST)
            + (centre + offset)[:, None, None])
  sample = functools.partial(ndimage.map_coordinates, coordinates=list(coords),
                             order=1, mode='constant', cval=_FILL)
  return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def _rotate(image, level):
  angle = math.radians(_MAX_ROTATE_DEGREES) * level
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return _warp(image, jnp.array([[cos, -sin], [sin, cos]]), jnp.zeros(2))


def _shear_x(image, level):
  matrix = jnp.array([[1.0, 0.0], [_MAX_SHEAR * level, 1.0]])
  return _warp(image, matrix, jnp.zeros(2))


def _shear_y(image, level):
  matrix = jnp.array([[1.0, _MAX_SHEAR * level], [0.0, 1.0]])
  return _warp(image, matrix, jnp.zeros(2))


def _translate_x(image, level):
  shift = _MAX_TRANSLATE * level * image.shape[1]
  return _warp(image, jnp.eye(2), jnp.stack([0.0 * shift, shift]))


def _translate_y(image, level):
  shift = _MAX_TRANSLATE * level * image.shape[0]
  return _warp(image, jnp.eye(2), jnp.stack([shift, 0.0 * shift]))


# (name, op(image [H, W, C] float in [0, 255], signed level) -> image).
OPS = (
    ('identity', _identity),
    ('autocontrast', _autocontrast),
    ('brightness', _brightness),
    ('color', _color),
    ('contrast', _contrast),
    ('posterize', _posterize),
    ('solarize', _solarize),
    ('rotate', _rotate),
    ('shear_x', _shear_x),
    ('shear_y', _shear_y),
    ('translate_x', _translate_x),
    ('translate_y', _translate_y),
)


def apply_op(index, image, level):
  """`OPS[index]` at signed `level`, clipped back into [0, 255]."""
  branches = [op for _, op in OPS]
  out = jax.lax.switch(index, branches, image, jnp.float32(level))
  return jnp.clip(out, 0.0, 255.0)


def _augment_image(rng, image, num_ops, level):
  for i in range(num_ops):
    op_rng, sign_rng = jax.random.split(jax.random.fold_in(rng, i))
    index = jax.random.randint(op_rng, (), 0, len(OPS))
    sign = jnp.where(jax.random.bernoulli(sign_rng), 1.0, -1.0)
    image = apply_op(index, image, sign * level)
  return image


def rand_augment(rng, images, num_ops, magnitude):
  """Applies `num_ops` random ops at `magnitude` to each image.

  Args:
    rng: PRNG key; image i uses `jax.random.split(rng, B)[i]`.
    images: `[B, H, W, C]` raw images (any real dtype, values in [0, 255]).
    num_ops: static number of ops per image; 0 returns the images as float.
    magnitude: static strength on timm's 0 .. 10 scale.

  Returns:
    `[B, H, W, C]` float32 in [0, 255].
  """
  images = jnp.asarray(images, jnp.float32)
  if num_ops == 0 or magnitude == 0:
    return images
  keys = jax.random.split(rng, images.shape[0])
  augment_image = functools.partial(_augment_image, num_ops=num_ops,
                                    level=magnitude / 10.0)
  return jax.vmap(augment_image)(keys, images)
