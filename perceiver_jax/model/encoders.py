"""Image -> data array: patches, their projection and position information.

The seed adds a learned position embedding to projected patches; the paper
uses fixed Fourier features of each patch's (row, col) instead, either
concatenated to the patch values before the projection (the paper's and
DeepMind's default) or projected by their own Dense and added. The paper's
model projects nothing here: its data array is the pixel values with their
Fourier features, and the cross-attention's key and value projections are
the first layers to read them (`project=False`).

Perceiver IO's ImageNet classifiers (Jaegle et al. 2022) add two more
preprocessors (`PREPROCESSORS`), both unprojected like the paper's pixels:
'conv1x1', a 1x1 convolution of the pixels joined by learned position
embeddings, each projected to `preprocessor_channels`; and 'conv', a
convolutional stem (7x7 convolution with stride 2, BatchNorm, ReLU, 3x3
max-pool with stride 2: a 4x smaller grid) joined by Fourier features of
the smaller grid. The stem's BatchNorm is frozen (`FrozenBatchNorm`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax.model import attention as attention_lib
from perceiver_jax.model import position_encoding as position_lib

# How images become the data array: the seed's and the paper's patches
# (`PatchEncoder`), or Perceiver IO's 'conv1x1' or 'conv' (module doc).
PREPROCESSORS = ('patches', 'conv1x1', 'conv')
# The conv stem's padding (see `stem_grid`).
STEM_PADDINGS = ('same', 'huggingface')
# The patches' position information, as PatchEncoder takes it.
PATCH_RULES = {
    'position_encoding': checks.one_of(*position_lib.POSITION_ENCODINGS),
    'fourier_num_bands': checks.positive_int(example=64),
    'fourier_max_resolution': checks.non_negative_int(
        '0: the patch grid size'),
    'fourier_mode': checks.one_of(*position_lib.FOURIER_MODES),
}
# The encoders' options, as the config takes them.
RULES = {
    **PATCH_RULES,
    'preprocessor': checks.one_of(*PREPROCESSORS),
    'preprocessor_channels': checks.positive_int(example=256),
    'conv_stem_padding': checks.one_of(*STEM_PADDINGS),
}


def _stem_requirements(preprocessor):
  """(position_encoding, fourier_mode or None) each preprocessor needs."""
  return {'conv1x1': ('learned', None), 'conv': ('fourier', 'concat')}.get(
      preprocessor)


def problems(values, field=str):
  """What is wrong across the encoders' options (`values`), as messages.

  The cross-attention can work at the data array's own width
  (`cross_attention_width='input'`) only when the encoder leaves it
  unprojected, and Perceiver IO's preprocessors leave it so.
  """
  out = []
  preprocessor = values.get('preprocessor', 'patches')
  width = values.get('cross_attention_width')
  position = values.get('position_encoding')
  if preprocessor == 'patches':
    if width == 'input' and (position, values.get('fourier_mode')) != (
        'fourier', 'concat'):
      out.append(f"{field('cross_attention_width')}='input' needs "
                 f"{field('position_encoding')}='fourier' with "
                 f"{field('fourier_mode')}='concat': the data array is then "
                 'the pixel values and their Fourier features, unprojected')
    return out
  if preprocessor not in PREPROCESSORS:
    return out
  if width != 'input':
    out.append(f"{field('preprocessor')}={preprocessor!r} needs "
               f"{field('cross_attention_width')}='input': its data array "
               'is not projected to the latents\' width')
  if values.get('patch_size') != 1:
    out.append(f"{field('preprocessor')}={preprocessor!r} reads every pixel; "
               f"set {field('patch_size')}=1")
  need_position, need_mode = _stem_requirements(preprocessor)
  if position != need_position or (
      need_mode and values.get('fourier_mode') != need_mode):
    mode = (f" with {field('fourier_mode')}={need_mode!r}" if need_mode
            else '')
    out.append(f"{field('preprocessor')}={preprocessor!r} needs "
               f"{field('position_encoding')}={need_position!r}{mode}, "
               'as Perceiver IO\'s classifier has it')
  size = values.get('image_size')
  if preprocessor == 'conv' and checks.is_int(size) and size > 0 and min(
      stem_grid(size, values.get('conv_stem_padding', 'same'))) < 1:
    out.append(f"{field('image_size')}={size} is too small for "
               f"{field('preprocessor')}='conv' (a 7x7 convolution and a "
               '3x3 max-pool, each with stride 2); use at least 8')
  return out


def stem_grid(image_size, padding='same'):
  """(rows, cols) of the conv stem's output on square `image_size` images.

  'same' pads as TensorFlow's SAME (DeepMind's haiku code): 224 -> 112 ->
  56. 'huggingface' pads the convolution by 3 pixels on each side and not
  the max-pool, as HuggingFace's PyTorch port does: 224 -> 112 -> 55.
  """
  conv = -(-image_size // 2)  # Both paddings: ceil(size / 2).
  pool = -(-conv // 2) if padding == 'same' else (conv - 3) // 2 + 1
  return (pool, pool)


def input_grid(preprocessor, image_size, patch_size, padding='same'):
  """(rows, cols) of the inputs the cross-attention reads."""
  if preprocessor == 'conv':
    return stem_grid(image_size, padding)
  return (image_size // patch_size,) * 2


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
    checks.enforce(self, PATCH_RULES, [
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


# Names of the frozen BatchNorm statistics (see `frozen_mask`).
BATCH_NORM = 'batch_norm'
FROZEN_STATISTICS = ('mean', 'var')


class FrozenBatchNorm(nn.Module):
  """BatchNorm in inference mode: `(x - mean) / sqrt(var + eps) * scale + bias`.

  The published models' statistics are kept as they were trained: `mean`
  and `var` are parameters (so checkpoints, EMA and init_from carry them
  like any weight) that receive no gradient here and no update from the
  optimiser (`frozen_mask`; `recipe.create_optimizer`), so neither training
  nor weight decay changes them. `scale` and `bias` train.
  """
  epsilon: float = 1e-5  # haiku's and PyTorch's BatchNorm default.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    param = lambda name, init: self.param(name, init, features, jnp.float32)
    mean = jax.lax.stop_gradient(param('mean', nn.initializers.zeros))
    var = jax.lax.stop_gradient(param('var', nn.initializers.ones))
    scale = param('scale', nn.initializers.ones)
    bias = param('bias', nn.initializers.zeros)
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x - mean.astype(self.dtype)) * multiplier.astype(self.dtype) + (
        bias.astype(self.dtype))


def has_frozen_parameters(preprocessor):
  """Whether the model `preprocessor` builds has `frozen_mask` leaves."""
  return preprocessor == 'conv'


def frozen_mask(params):
  """True for the leaves no optimiser may change (`FrozenBatchNorm`'s
  statistics), False for the others."""
  def frozen(path, _):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    return (len(keys) >= 2 and keys[-2] == BATCH_NORM and
            keys[-1] in FROZEN_STATISTICS)
  return jax.tree_util.tree_map_with_path(frozen, params)


class Conv1x1Encoder(nn.Module):
  """Perceiver IO's 'conv1x1' preprocessor (its learned-positions model).

  Every pixel is projected to `channels` (a 1x1 convolution: a Dense on the
  pixel values), and a learned position embedding per pixel, projected by
  its own Dense to `channels`, is concatenated after it:
  `[batch, pixels, 2 * channels]`, unprojected for the cross-attention.
  """
  num_positions: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    pixels = images.reshape(images.shape[0], -1, images.shape[-1])
    if pixels.shape[1] != self.num_positions:
      raise ValueError(f'Expected {self.num_positions} pixels, got '
                       f'{pixels.shape[1]}.')
    dense = functools.partial(nn.Dense, self.channels, dtype=self.dtype,
                              kernel_init=attention_lib.keras_glorot_uniform)
    embedding = self.param(
        'position_embedding', nn.initializers.truncated_normal(stddev=0.02),
        (self.num_positions, self.channels), jnp.float32)
    positions = dense(name='position_projection')(
        embedding.astype(self.dtype))
    positions = jnp.broadcast_to(positions,
                                 pixels.shape[:1] + positions.shape)
    return jnp.concatenate(
        [dense(name='projection')(pixels), positions], axis=-1)


class ConvStemEncoder(nn.Module):
  """Perceiver IO's 'conv' preprocessor (its convolutional model).

  A 7x7 convolution with stride 2 and no bias, a frozen BatchNorm, ReLU and
  a 3x3 max-pool with stride 2 (`stem_grid`: 224 -> 56 or 55), then Fourier
  features of that grid concatenated after the `channels` features.
  """
  channels: int
  fourier_num_bands: int
  fourier_max_resolution: int = 0
  padding: str = 'same'
  dtype: Any = jnp.float32

  def __post_init__(self):
    checks.enforce(self, {'padding': RULES['conv_stem_padding'],
                          'channels': RULES['preprocessor_channels']})
    super().__post_init__()

  @nn.compact
  def __call__(self, images):
    same = self.padding == 'same'
    x = nn.Conv(self.channels, (7, 7), strides=(2, 2),
                padding='SAME' if same else ((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, name='conv')(images)
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name=BATCH_NORM)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2),
                    padding='SAME' if same else 'VALID')
    grid = x.shape[1:3]
    features = position_lib.fourier_position_encoding(
        grid, self.fourier_num_bands, self.fourier_max_resolution).astype(
            self.dtype)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    features = jnp.broadcast_to(features, x.shape[:1] + features.shape)
    return jnp.concatenate([x, features], axis=-1)
