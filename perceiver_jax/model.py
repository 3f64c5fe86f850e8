"""The Keras example's Perceiver (Jaegle et al. 2021) as Flax linen modules.

Architecture, initialisers and layer order follow the Keras example exactly:

  image -> patches -> Dense + learned position embedding  (data array)
  latent array (learned) -> [cross-attention -> latent Transformer] x T
  -> mean over latents -> classifier FFN (ending in dropout, as in the seed)

The cross-attention module and the latent Transformer are each applied
`num_iterations` times with the SAME weights, as in the seed.

Differences from the seed that do not change the function: the model takes
already normalised and augmented images (augmentation runs in the input
pipeline / train step), and the latent array is broadcast over the batch
instead of being passed with batch size 1.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_jax import attention as attention_lib

keras_glorot_uniform = attention_lib.keras_glorot_uniform
# Keras LayerNormalization(epsilon=1e-6); two-pass variance for stability.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6,
                              use_fast_variance=False)


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
  """Projects patches to `projection_dim` and adds a learned position embedding.

  The seed's learned embedding (Keras Embedding over range(num_patches))
  stands in for the paper's Fourier features.
  """
  patch_size: int
  num_patches: int
  projection_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    patches = extract_patches(images, self.patch_size)
    if patches.shape[1] != self.num_patches:
      raise ValueError(f'Expected {self.num_patches} patches, got '
                       f'{patches.shape[1]}.')
    encoded = nn.Dense(self.projection_dim, dtype=self.dtype,
                       kernel_init=keras_glorot_uniform,
                       name='projection')(patches)
    position_embedding = self.param(
        'position_embedding', keras_uniform(0.05),
        (self.num_patches, self.projection_dim), jnp.float32)
    return encoded + position_embedding.astype(encoded.dtype)


class FeedForward(nn.Module):
  """The seed's `create_ffn`: Dense+GELU per width but the last, then dropout.

  The last Dense is linear and dropout follows it (for the classifier head,
  dropout on the logits, exactly as the seed does).
  """
  units: Sequence[int]
  dropout_rate: float
  dtype: Any = jnp.float32

  def __post_init__(self):
    if not self.units or any(u <= 0 for u in self.units):
      raise ValueError(f'units must be non-empty and positive, got '
                       f'{self.units!r}.')
    attention_lib.check_rate('dropout_rate', self.dropout_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, deterministic):
    for i, units in enumerate(self.units):
      x = nn.Dense(units, dtype=self.dtype, kernel_init=keras_glorot_uniform,
                   name=f'dense_{i}')(x)
      if i < len(self.units) - 1:
        x = nn.gelu(x, approximate=False)  # tf.nn.gelu's default, exact erf.
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class CrossAttentionBlock(nn.Module):
  """The seed's cross-attention module: latents read from the data array.

  Note the residual adds the *normalised* latents (as the seed does), and the
  second residual adds the LayerNorm output, not its input.
  """
  projection_dim: int
  ffn_units: Sequence[int]
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'

  @nn.compact
  def __call__(self, latents, data, deterministic):
    latents = LayerNorm(dtype=self.dtype, name='latent_norm')(latents)
    data = LayerNorm(dtype=self.dtype, name='data_norm')(data)
    x = attention_lib.CrossAttention(
        self.projection_dim, self.attention_dropout_rate, dtype=self.dtype,
        attention_impl=self.attention_impl, name='attention')(
            latents, data, deterministic=deterministic)
    x = LayerNorm(dtype=self.dtype, name='ffn_norm')(x + latents)
    ffn = FeedForward(self.ffn_units, self.dropout_rate, dtype=self.dtype,
                      name='ffn')
    return ffn(x, deterministic=deterministic) + x


class TransformerBlock(nn.Module):
  """Pre-LN Transformer block on the latents (one block of the seed's loop)."""
  num_heads: int
  head_dim: int
  ffn_units: Sequence[int]
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'
  attention_init: str = 'keras2'

  @nn.compact
  def __call__(self, x, deterministic):
    y = LayerNorm(dtype=self.dtype, name='attention_norm')(x)
    y = attention_lib.MultiHeadSelfAttention(
        self.num_heads, self.head_dim, self.attention_dropout_rate,
        dtype=self.dtype, attention_impl=self.attention_impl,
        attention_init=self.attention_init, name='self_attention')(
            y, deterministic=deterministic)
    x = x + y
    y = LayerNorm(dtype=self.dtype, name='ffn_norm')(x)
    y = FeedForward(self.ffn_units, self.dropout_rate, dtype=self.dtype,
                    name='ffn')(y, deterministic=deterministic)
    return x + y


class LatentTransformer(nn.Module):
  """The seed's Transformer module: `num_blocks` blocks, O(latents^2) cost."""
  num_blocks: int
  num_heads: int
  head_dim: int
  ffn_units: Sequence[int]
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'
  attention_init: str = 'keras2'
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic):
    block_cls = (remat(TransformerBlock, 2) if self.remat else
                 TransformerBlock)
    for i in range(self.num_blocks):
      x = block_cls(
          self.num_heads, self.head_dim, self.ffn_units, self.dropout_rate,
          self.attention_dropout_rate, dtype=self.dtype,
          attention_impl=self.attention_impl,
          attention_init=self.attention_init, name=f'block_{i}')(
              x, deterministic)
    return x


def remat(block_cls, deterministic_argnum):
  """Recomputes a block's activations in the backward pass to save memory.

  `deterministic` (positional argument `deterministic_argnum`, self being 0)
  is static: it selects code rather than being traced.
  """
  return nn.remat(block_cls, static_argnums=(deterministic_argnum,))


class Perceiver(nn.Module):
  """Perceiver image classifier with the Keras example's architecture.

  Attributes:
    image_size: height and width of the (square) input images.
    patch_size: side of the non-overlapping patches; divides image_size.
    latent_dim: number of latents.
    projection_dim: width of latents and data array elements.
    num_heads: heads of the latent self-attention (each projection_dim wide).
    ffn_units: FFN widths; the last must equal projection_dim (residual).
    num_transformer_blocks: blocks in the latent Transformer.
    num_iterations: applications of the shared cross-attention + Transformer.
    classifier_units: hidden widths of the classifier head.
    num_classes: logits width.
    dropout_rate: dropout after every FFN, the head included.
    attention_dropout_rate: dropout on all attention weights.
    dtype: compute dtype (parameters and logits stay float32).
    attention_impl: jax.nn.dot_product_attention implementation.
    attention_init: 'keras2' (the seed's Keras 2.7) or 'keras3' glorot fans
      of the multi-head attention kernels.
    remat: rematerialise the cross-attention and Transformer blocks in the
      backward pass (less activation memory, about one more forward pass).
  """
  image_size: int
  patch_size: int
  latent_dim: int
  projection_dim: int
  num_heads: int
  ffn_units: Sequence[int]
  num_transformer_blocks: int
  num_iterations: int
  classifier_units: Sequence[int]
  num_classes: int
  dropout_rate: float
  attention_dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'
  attention_init: str = 'keras2'
  remat: bool = False

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'latent_dim', 'projection_dim',
                 'num_heads', 'num_transformer_blocks', 'num_iterations',
                 'num_classes'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive int, got {value!r}.')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by '
                       f'patch_size {self.patch_size}.')
    if not self.ffn_units or self.ffn_units[-1] != self.projection_dim:
      raise ValueError(f'ffn_units {self.ffn_units!r} must end with '
                       f'projection_dim {self.projection_dim} (residual add).')
    if any(u <= 0 for u in self.classifier_units):
      raise ValueError(f'classifier_units must be positive, got '
                       f'{self.classifier_units!r}.')
    attention_lib.check_rate('dropout_rate', self.dropout_rate)
    attention_lib.check_rate('attention_dropout_rate',
                             self.attention_dropout_rate)
    attention_lib.check_implementation(self.attention_impl)
    if self.attention_init not in attention_lib.ATTENTION_INITS:
      raise ValueError(f'attention_init must be one of '
                       f'{attention_lib.ATTENTION_INITS}, got '
                       f'{self.attention_init!r}.')
    if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
      raise ValueError(f'dtype must be a float dtype, got {self.dtype!r}.')
    super().__post_init__()

  @property
  def num_patches(self):
    return (self.image_size // self.patch_size)**2

  @nn.compact
  def __call__(self, images, train: bool):
    """Maps preprocessed images `[b, image_size, image_size, c]` to logits.

    Args:
      images: float images, already normalised (and augmented in training).
      train: enables dropout; needs a 'dropout' rng when True.

    Returns:
      float32 logits `[batch, num_classes]`.
    """
    if images.ndim != 4 or images.shape[1:3] != (self.image_size,) * 2:
      raise ValueError(
          f'Expected images [batch, {self.image_size}, {self.image_size}, '
          f'channels] (config image_size={self.image_size}), got shape '
          f'{images.shape}.')
    deterministic = not train
    common = dict(dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  dtype=self.dtype, attention_impl=self.attention_impl)
    data = PatchEncoder(self.patch_size, self.num_patches, self.projection_dim,
                        dtype=self.dtype, name='patch_encoder')(
                            images.astype(self.dtype))
    latent_array = self.param(
        'latent_array', nn.initializers.normal(stddev=0.05),  # random_normal
        (self.latent_dim, self.projection_dim), jnp.float32)
    latents = jnp.broadcast_to(latent_array.astype(self.dtype),
                               (images.shape[0],) + latent_array.shape)
    # Created once, called every iteration: weights are shared, as in the seed.
    cross_cls = (remat(CrossAttentionBlock, 3) if self.remat else
                 CrossAttentionBlock)
    cross_attention = cross_cls(
        self.projection_dim, tuple(self.ffn_units), name='cross_attention',
        **common)
    transformer = LatentTransformer(
        self.num_transformer_blocks, self.num_heads, self.projection_dim,
        tuple(self.ffn_units), attention_init=self.attention_init,
        remat=self.remat, name='latent_transformer', **common)
    for _ in range(self.num_iterations):
      latents = cross_attention(latents, data, deterministic)
      latents = transformer(latents, deterministic=deterministic)
    representation = jnp.mean(latents, axis=1)  # GlobalAveragePooling1D.
    logits = FeedForward(
        tuple(self.classifier_units) + (self.num_classes,), self.dropout_rate,
        dtype=self.dtype, name='classifier')(
            representation, deterministic=deterministic)
    return logits.astype(jnp.float32)


def create_model(config, num_classes):
  """Builds the Perceiver from a config (see configs/cifar100.py).

  Args:
    config: ConfigDict with image_size, patch_size, latent_dim, projection_dim,
      num_heads, ffn_units, num_transformer_blocks, num_iterations,
      classifier_units, dropout_rate, attention_dropout_rate and optionally
      dtype (compute dtype name, default 'float32') and attention_impl
      (default 'xla').
    num_classes: width of the logits.

  Returns:
    An unbound `Perceiver`.
  """
  dtype_name = config.get('dtype', 'float32')
  try:
    dtype = jnp.dtype(dtype_name)
  except TypeError as e:
    raise ValueError(f'Unknown dtype {dtype_name!r} in config.') from e
  return Perceiver(
      image_size=config.image_size,
      patch_size=config.patch_size,
      latent_dim=config.latent_dim,
      projection_dim=config.projection_dim,
      num_heads=config.num_heads,
      ffn_units=tuple(config.ffn_units),
      num_transformer_blocks=config.num_transformer_blocks,
      num_iterations=config.num_iterations,
      classifier_units=tuple(config.classifier_units),
      num_classes=num_classes,
      dropout_rate=config.dropout_rate,
      attention_dropout_rate=config.get('attention_dropout_rate', 0.1),
      dtype=dtype,
      attention_impl=config.get('attention_impl', 'xla'),
      attention_init=config.get('attention_init', 'keras2'),
      remat=config.get('remat', False),
  )
