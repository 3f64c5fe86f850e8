"""Image -> data array: patches, their projection and position information.

The seed adds a learned position embedding to projected patches; the paper
uses fixed Fourier features of each patch's (row, col) instead, either
concatenated to the patch values before the projection (the paper's and
DeepMind's default) or projected by their own Dense and added. The paper's
model projects nothing here: its data array is the pixel values with their
Fourier features, and the cross-attention's key and value projections are
the first layers to read them (`project=False`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax.model import attention as attention_lib
from perceiver_jax.model import position_encoding as position_lib

# The options of the patches' position information, as PatchEncoder and
# the config take them.
RULES = {
    'position_encoding': checks.one_of(*position_lib.POSITION_ENCODINGS),
    'fourier_num_bands': checks.positive_int(example=64),
    'fourier_max_resolution': checks.non_negative_int(
        '0: the patch grid size'),
    'fourier_mode': checks.one_of(*position_lib.FOURIER_MODES),
}


def keras_uniform(limit=0.05):
  """Keras' "uniform" initialiser: U(-limit, limit) (Embedding's default)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def extract_patches(images, patch_size):
  """Non-overlapping patches, row-major, each flattened (row, col, channel).

  Same result as `tf.image.extract_patches` (VALID, stride = size) followed
  by a reshape to `[batch, num_patches, patch_size**2 * channels]`.
  """
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f'Image size {height}x{width} is not divisible by '
                     f'patch_size {patch_size}.')
  rows, cols = height // patch_size, width // patch_size
  patches = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
  patches = patches.transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(batch, rows * cols, patch_size**2 * channels)


class PatchEncoder(nn.Module):
  """Projects patches to `projection_dim` and adds position information.

  Attributes:
    patch_size: side of the patches (1: every pixel is an input).
    num_patches: expected number of patches (checked).
    projection_dim: width of the data array.
    dtype: compute dtype.
    position_encoding: 'learned' (the seed: a Keras Embedding over
      range(num_patches), added) or 'fourier' (the paper's fixed features).
    fourier_num_bands: frequencies per axis.
    fourier_max_resolution: sets the top frequency (max_resolution / 2);
      0 uses the patch grid size.
    fourier_mode: 'concat' (features join the patch values before the
      projection) or 'add' (own Dense to projection_dim, added after).
    project: project to `projection_dim` (the seed); False returns the
      patch values and their Fourier features unprojected (needs 'fourier'
      features in 'concat' mode), `patch_size**2 * channels +
      2 * (2 * fourier_num_bands + 1)` wide.
  """
  patch_size: int
  num_patches: int
  projection_dim: int
  dtype: Any = jnp.float32
  position_encoding: str = 'learned'
  fourier_num_bands: int = 64
  fourier_max_resolution: int = 0
  fourier_mode: str = 'concat'
  project: bool = True

  def __post_init__(self):
    checks.enforce(self, RULES, [
        '' if self.project or (self.position_encoding, self.fourier_mode) == (
            'fourier', 'concat') else
        "project=False needs position_encoding='fourier' with "
        "fourier_mode='concat' (the position features must join the "
        'pixel values; nothing would project them)'])
    super().__post_init__()

  @nn.compact
  def __call__(self, images):
    patches = extract_patches(images, self.patch_size)
    if patches.shape[1] != self.num_patches:
      raise ValueError(f'Expected {self.num_patches} patches, got '
                       f'{patches.shape[1]}.')
    dense = functools.partial(nn.Dense, self.projection_dim, dtype=self.dtype,
                              kernel_init=attention_lib.keras_glorot_uniform)
    if self.position_encoding == 'learned':
      encoded = dense(name='projection')(patches)
      position_embedding = self.param(
          'position_embedding', keras_uniform(0.05),
          (self.num_patches, self.projection_dim), jnp.float32)
      return encoded + position_embedding.astype(encoded.dtype)
    grid = (images.shape[1] // self.patch_size,
            images.shape[2] // self.patch_size)
    features = position_lib.fourier_position_encoding(
        grid, self.fourier_num_bands, self.fourier_max_resolution).astype(
            self.dtype)
    if self.fourier_mode == 'concat':
      features = jnp.broadcast_to(features, patches.shape[:1] + features.shape)
      inputs = jnp.concatenate([patches.astype(self.dtype), features], axis=-1)
      return dense(name='projection')(inputs) if self.project else inputs
    # 'add': the same position projection for every image, so project once.
    return (dense(name='projection')(patches) +
            dense(name='position_projection')(features))
