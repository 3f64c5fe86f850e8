"""The Keras example's Perceiver (Jaegle et al. 2021) as Flax linen modules.

Architecture, initialisers and layer order follow the Keras example exactly:

  image -> patches -> Dense + learned position embedding  (data array)
  latent array (learned) -> [cross-attention -> latent Transformer] x T
  -> mean over latents -> classifier FFN (ending in dropout, as in the seed)

The cross-attention module and the latent Transformer (`blocks.py`) are
each applied `num_iterations` times with the SAME weights, as in the seed
(`weight_sharing='all'`; the other plans are in `sharing.py`).

Options from the Perceiver papers, each off by default so the default model
is exactly the seed's: Fourier position features (`encoders.py`,
`position_encoding.py`), the paper's weight sharing or none, multi-head
cross-attention at the latents' or the inputs' width with pre-LN residuals,
latent self-attention heads that split the width, a truncated-normal latent
array, a Perceiver IO query decoder (`decoders.py`) and no dropout on the
logits.

Perceiver IO's ImageNet classifiers (Jaegle et al. 2022) are a third
arrangement of the same modules, set by options too: one cross-attend, then
the latent Transformer applied `num_iterations` times with shared weights
(`cross_attend='first_iteration'`, `weight_sharing='all'`: their
`num_blocks` x `num_self_attends_per_block`), their preprocessors
(`preprocessor`, `encoders.py`), their decoder (`decoder='perceiver_io'`),
LayerNorm epsilon (`layer_norm_epsilon`) and GELU (`gelu_approximate`).
See configs/imagenet_perceiver_io.py.

Differences from the seed that do not change the function: the model takes
already normalised and augmented images (augmentation runs in the input
pipeline / train step), and the latent array is broadcast over the batch
instead of being passed with batch size 1.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax import config_lib
from perceiver_jax.model import attention as attention_lib
from perceiver_jax.model import blocks
from perceiver_jax.model import compute as compute_lib
from perceiver_jax.model import decoders
from perceiver_jax.model import encoders
from perceiver_jax.model import folded as folded_lib
from perceiver_jax.model import position_encoding as position_lib
from perceiver_jax.model import sharing

# How latents become the class representation: 'mean' (the seed), 'query'
# (a learned query cross-attends the latents) or 'perceiver_io' (Perceiver
# IO's whole decoder block: `decoders.PerceiverIODecoder`).
DECODERS = ('mean', 'query', 'perceiver_io')
# Which iterations cross-attend: every one (the seed, the 2021 paper) or
# only the first (Perceiver IO: later iterations apply the Transformer).
CROSS_ATTENDS = ('every_iteration', 'first_iteration')

# The model's options, as `Perceiver` and the config (same names) take them.
RULES = {
    **{name: checks.positive_int() for name in (
        'image_size', 'patch_size', 'latent_dim', 'projection_dim',
        'num_heads', 'num_transformer_blocks', 'num_iterations')},
    'ffn_units': checks.tuple_of_positive_ints(),
    'classifier_units': checks.tuple_of_positive_ints((256,)),
    'dropout_rate': checks.RATE,
    'attention_dropout_rate': checks.RATE,
    'attention_init': attention_lib.ATTENTION_INIT_RULE,
    'remat': checks.BOOL,
    **encoders.RULES,
    'weight_sharing': sharing.RULE,
    **blocks.RULES,
    # The latent array's init: the seed's Keras random_normal(0.05), or
    # DeepMind's truncated normal (stddev 0.02, cut at 2 stddev).
    'latent_init': checks.one_of('random_normal', 'truncated_normal'),
    'decoder': checks.one_of(*DECODERS),
    # decoder='perceiver_io': the query's residual around its attention
    # (HuggingFace's classifiers, DeepMind's Fourier and conv ones), or none
    # (DeepMind's learned-position classifier; `decoders.py`).
    'decoder_query_residual': checks.BOOL,
    'logits_dropout': checks.BOOL,
    'cross_attend': checks.one_of(*CROSS_ATTENDS),
    # Every LayerNorm's: the seed's Keras 1e-6, or haiku's and PyTorch's
    # 1e-5 (Perceiver IO's published weights).
    'layer_norm_epsilon': checks.number(
        0.0, low_open=True, requirement='a positive number', example=1e-5),
    # GELU's tanh approximation (jax.nn.gelu's default, DeepMind's code)
    # instead of the exact erf (the seed's, and HuggingFace's 'gelu').
    'gelu_approximate': checks.BOOL,
}
# The config names the compute dtype; the model holds it as a jnp dtype.
DTYPE_RULE = checks.one_of('float32', 'bfloat16', 'float16')


def problems(values, field=str):
  """What is wrong across options (`values`: name -> value), as messages.

  Each option on its own is checked by `RULES`; `field` renders option
  names (config_lib adds 'config.').
  """
  out = []
  image_size, patch_size = values.get('image_size'), values.get('patch_size')
  if (checks.is_int(image_size) and checks.is_int(patch_size)
      and patch_size > 0 and image_size % patch_size):
    out.append(
        f'{field("image_size")}={image_size} is not divisible by '
        f'{field("patch_size")}={patch_size}; images are cut into '
        'non-overlapping patches, so choose e.g. image_size='
        f'{max(patch_size, image_size // patch_size * patch_size)}')
  ffn, width = values.get('ffn_units'), values.get('projection_dim')
  if isinstance(ffn, (tuple, list)):
    if not ffn:
      out.append(f'{field("ffn_units")} must not be empty; pass e.g. '
                 '--config.ffn_units="(256,256)"')
    elif ffn[-1] != width:
      out.append(
          f'{field("ffn_units")}={tuple(ffn)!r} must end with projection_dim '
          f'({width}) because the FFN output is added back to its input; '
          f'set its last entry to {field("projection_dim")}')
  out += blocks.problems(values, field)
  out += encoders.problems(values, field)
  return [p for p in out if p]


class Perceiver(nn.Module):
  """Perceiver image classifier with the Keras example's architecture.

  Attributes:
    image_size: height and width of the (square) input images.
    patch_size: side of the non-overlapping patches; divides image_size.
    latent_dim: number of latents.
    projection_dim: width of the latents (and of the data array, unless
      cross_attention_width='input').
    num_heads: heads of the latent self-attention.
    ffn_units: FFN widths; the last must equal projection_dim (residual).
    num_transformer_blocks: blocks in the latent Transformer.
    num_iterations: applications of the cross-attention + Transformer.
    classifier_units: hidden widths of the classifier head.
    num_classes: logits width.
    dropout_rate: dropout after every FFN, the head included.
    attention_dropout_rate: dropout on all attention weights.
    dtype: compute dtype (parameters and logits stay float32).
    compute: `compute.Compute`, kernel choices that keep the function
      (attention implementation and form, dropout bit generator).
    attention_init: 'keras2' (the seed's Keras 2.7) or 'keras3' glorot fans
      of the multi-head attention kernels.
    remat: rematerialise the cross-attention and Transformer blocks in the
      backward pass (less activation memory, about one more forward pass).
    position_encoding: 'learned' (the seed) or 'fourier' (the paper).
    fourier_num_bands: Fourier frequencies per axis.
    fourier_max_resolution: top frequency is this / 2; 0: the patch grid.
    fourier_mode: 'concat' Fourier features to the patches before the
      projection, or 'add' them after their own projection.
    weight_sharing: one of `sharing.WEIGHT_SHARING`.
    num_cross_heads, cross_attention_width, cross_attention_residual,
      latent_head_width: the cross-attention's heads and width, where its
      residuals branch, the latent heads' width (see `blocks.RULES`).
    latent_init: 'random_normal' (the seed's, stddev 0.05) or
      'truncated_normal' (DeepMind's, stddev 0.02, cut at 2 stddev).
    decoder: one of DECODERS.
    decoder_query_residual: with decoder='perceiver_io', add the query to
      its attention's output.
    logits_dropout: end the classifier with dropout on the logits (seed).
    cross_attend: one of CROSS_ATTENDS.
    layer_norm_epsilon: every LayerNorm's epsilon.
    gelu_approximate: GELU's tanh approximation instead of the exact erf.
    preprocessor, preprocessor_channels, conv_stem_padding: how images
      become the data array (`encoders.RULES`).
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
  compute: compute_lib.Compute = compute_lib.Compute()
  attention_init: str = 'keras2'
  remat: bool = False
  position_encoding: str = 'learned'
  fourier_num_bands: int = 64
  fourier_max_resolution: int = 0
  fourier_mode: str = 'concat'
  weight_sharing: str = 'all'
  num_cross_heads: int = 0
  cross_attention_width: str = 'latent'
  cross_attention_residual: str = 'normalized'
  latent_head_width: str = 'full'
  latent_init: str = 'random_normal'
  decoder: str = 'mean'
  decoder_query_residual: bool = True
  logits_dropout: bool = True
  cross_attend: str = 'every_iteration'
  layer_norm_epsilon: float = attention_lib.LAYER_NORM_EPSILON
  gelu_approximate: bool = False
  preprocessor: str = 'patches'
  preprocessor_channels: int = 256
  conv_stem_padding: str = 'same'

  def __post_init__(self):
    values = {name: getattr(self, name) for name in RULES}
    checks.enforce(self, RULES, problems(values) + [
        '' if checks.is_int(self.num_classes) and self.num_classes > 0 else
        f'num_classes must be a positive integer, got {self.num_classes!r}',
        '' if jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating) else
        f'dtype must be a float dtype, got {self.dtype!r}'])
    super().__post_init__()

  @property
  def input_grid(self):
    """(rows, cols) of the inputs the cross-attention reads."""
    return encoders.input_grid(self.preprocessor, self.image_size,
                               self.patch_size, self.conv_stem_padding)

  @property
  def num_patches(self):
    """Inputs the cross-attention reads (patches, pixels or stem cells)."""
    rows, cols = self.input_grid
    return rows * cols

  @property
  def num_cross_attends(self):
    """Cross-attention calls, each sowing its weights (attention maps)."""
    return 1 if self.cross_attend == 'first_iteration' else (
        self.num_iterations)

  @property
  def latent_head_dim(self):
    """Width of each latent self-attention head."""
    return (self.projection_dim if self.latent_head_width == 'full' else
            self.projection_dim // self.num_heads)

  def data_width(self, channels):
    """Width of the data array the cross-attention reads."""
    if self.cross_attention_width == 'latent':
      return self.projection_dim
    if self.preprocessor == 'conv1x1':
      return 2 * self.preprocessor_channels
    fourier = position_lib.num_fourier_features(2, self.fourier_num_bands)
    if self.preprocessor == 'conv':
      return self.preprocessor_channels + fourier
    return self.patch_size**2 * channels + fourier

  def attention_shapes(self, channels=3):
    """Per-example shapes of the attention calls, as the modules make them.

    Each is `(q_length, kv_length, d_q, d_kv, d_out, num_heads, head_dim)`,
    what `folded.saves_flops` takes after the batch, under 'cross' (the
    encoder's cross-attention; the seed's, `num_cross_heads=0`, is one head
    of the latents' width without an output projection: `d_out=0`),
    'latent' (each self-attention of the latent Transformer) and, unless
    the decoder is 'mean', 'decoder'.
    """
    d, n = self.projection_dim, self.latent_dim
    width, heads = self.data_width(channels), max(self.num_cross_heads, 1)
    head_width = d if self.cross_attention_width == 'latent' else width
    shapes = {
        'cross': (n, self.num_patches, d, width,
                  d if self.num_cross_heads else 0, heads,
                  head_width // heads),
        'latent': (n, n, d, d, d, self.num_heads, self.latent_head_dim)}
    if self.decoder != 'mean':  # 'query': the cross-attention's heads.
      heads = heads if self.decoder == 'query' else 1
      shapes['decoder'] = (1, n, d, d, d, heads, d // heads)
    return shapes

  def attention_folded(self, kind, batch_size, channels=3):
    """Whether attention `kind` (see `attention_shapes`) runs folded."""
    if kind == 'cross' and not self.num_cross_heads:
      return False  # The seed's single head has no folded form.
    return folded_lib.uses_folded_form(
        self.compute.attention_form, batch_size,
        *self.attention_shapes(channels)[kind])

  def latent_attention_folded(self, batch_size):
    """Whether the latent self-attention runs folded at `batch_size`."""
    return self.attention_folded('latent', batch_size)

  def cross_attention_folded(self, batch_size, channels):
    """Whether the cross-attention runs folded (the seed's never does)."""
    return self.attention_folded('cross', batch_size, channels)

  @nn.compact
  def __call__(self, images, train: bool):
    """Maps preprocessed images `[b, image_size, image_size, c]` to logits.

    Args:
      images: float images, already normalised (and augmented in training).
      train: enables dropout; needs a 'dropout' rng when True.

    Returns:
      float32 logits `[batch, num_classes]`. With `mutable=['intermediates']`
      the encoder cross-attention also sows its weights, one entry per
      iteration (see `sharing.cross_attention_weights`).
    """
    if images.ndim != 4 or images.shape[1:3] != (self.image_size,) * 2:
      raise ValueError(
          f'Expected images [batch, {self.image_size}, {self.image_size}, '
          f'channels] (config image_size={self.image_size}), got shape '
          f'{images.shape}.')
    deterministic = not train
    common = dict(dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  dtype=self.dtype, compute=self.compute,
                  layer_norm_epsilon=self.layer_norm_epsilon,
                  gelu_approximate=self.gelu_approximate)
    data = self._encoder()(images.astype(self.dtype))
    latent_array = self.param(
        'latent_array',
        nn.initializers.normal(stddev=0.05)  # Keras random_normal.
        if self.latent_init == 'random_normal' else
        nn.initializers.truncated_normal(stddev=0.02),
        (self.latent_dim, self.projection_dim), jnp.float32)
    latents = jnp.broadcast_to(latent_array.astype(self.dtype),
                               (images.shape[0],) + latent_array.shape)
    # Each set is created once and called on its iterations (`sharing.py`):
    # with 'all' (the seed) one set serves every iteration.
    cross_cls = (blocks.remat(blocks.CrossAttentionBlock, 3) if self.remat
                 else blocks.CrossAttentionBlock)
    mode, t_max = self.weight_sharing, self.num_iterations
    sets = lambda kind: range(sharing.num_weight_sets(mode, kind, t_max))
    name = functools.partial(sharing.module_name, mode)
    cross_attentions = [
        cross_cls(self.projection_dim, tuple(self.ffn_units),
                  num_heads=self.num_cross_heads,
                  attention_init=self.attention_init,
                  width=self.cross_attention_width,
                  residual=self.cross_attention_residual,
                  name=name(sharing.CROSS_ATTENTION, i), **common)
        for i in sets(sharing.CROSS_ATTENTION)]
    transformers = [
        blocks.LatentTransformer(
            self.num_transformer_blocks, self.num_heads, self.latent_head_dim,
            tuple(self.ffn_units), attention_init=self.attention_init,
            remat=self.remat, name=name(sharing.TRANSFORMER, i), **common)
        for i in sets(sharing.TRANSFORMER)]
    for t in range(t_max):
      cross_attend = cross_attentions[
          sharing.weight_set(mode, sharing.CROSS_ATTENTION, t)]
      transformer = transformers[
          sharing.weight_set(mode, sharing.TRANSFORMER, t)]
      if t < self.num_cross_attends:
        latents = cross_attend(latents, data, deterministic)
      latents = transformer(latents, deterministic=deterministic)
    if self.decoder == 'mean':
      representation = jnp.mean(latents, axis=1)  # GlobalAveragePooling1D.
    elif self.decoder == 'perceiver_io':
      representation = decoders.PerceiverIODecoder(
          self.projection_dim, tuple(self.ffn_units),
          attention_init=self.attention_init,
          query_residual=self.decoder_query_residual, name='decoder',
          **common)(
              latents, deterministic=deterministic)
    else:
      representation = decoders.QueryDecoder(
          self.projection_dim, max(self.num_cross_heads, 1),
          self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute, attention_init=self.attention_init,
          layer_norm_epsilon=self.layer_norm_epsilon, name='decoder')(
              latents, deterministic=deterministic)
    logits = blocks.FeedForward(
        tuple(self.classifier_units) + (self.num_classes,), self.dropout_rate,
        dtype=self.dtype, final_dropout=self.logits_dropout,
        gelu_approximate=self.gelu_approximate,
        dropout_bits=self.compute.dropout_bits, name='classifier')(
            representation, deterministic=deterministic)
    return logits.astype(jnp.float32)

  def _encoder(self):
    """The module that turns images into the data array."""
    if self.preprocessor == 'conv1x1':
      return encoders.Conv1x1Encoder(
          self.num_patches, self.preprocessor_channels, dtype=self.dtype,
          name='conv1x1_encoder')
    if self.preprocessor == 'conv':
      return encoders.ConvStemEncoder(
          self.preprocessor_channels, self.fourier_num_bands,
          self.fourier_max_resolution, self.conv_stem_padding,
          dtype=self.dtype, name='conv_encoder')
    return encoders.PatchEncoder(
        self.patch_size, self.num_patches, self.projection_dim,
        dtype=self.dtype, position_encoding=self.position_encoding,
        fourier_num_bands=self.fourier_num_bands,
        fourier_max_resolution=self.fourier_max_resolution,
        fourier_mode=self.fourier_mode,
        project=self.cross_attention_width == 'latent',
        name='patch_encoder')


# Config fields the model reads with a default, and the default: the seed's
# model. Configs saved before a field existed build that model.
OPTION_DEFAULTS = dict(
    dtype='float32', attention_dropout_rate=0.1, attention_init='keras2',
    remat=False, position_encoding='learned', fourier_num_bands=64,
    fourier_max_resolution=0, fourier_mode='concat', weight_sharing='all',
    num_cross_heads=0, cross_attention_width='latent',
    cross_attention_residual='normalized', latent_head_width='full',
    latent_init='random_normal', decoder='mean', decoder_query_residual=True,
    logits_dropout=True,
    cross_attend='every_iteration',
    layer_norm_epsilon=attention_lib.LAYER_NORM_EPSILON,
    gelu_approximate=False, preprocessor='patches', preprocessor_channels=256,
    conv_stem_padding='same')


def create_model(config, num_classes):
  """Builds the Perceiver from a config (see configs/cifar100.py).

  Args:
    config: ConfigDict with image_size, patch_size, latent_dim, projection_dim,
      num_heads, ffn_units, num_transformer_blocks, num_iterations,
      classifier_units, dropout_rate, attention_dropout_rate and optionally
      the fields of `OPTION_DEFAULTS` and `compute.OPTION_DEFAULTS`
      (defaults: the seed's model).
    num_classes: width of the logits.

  Returns:
    An unbound `Perceiver`.
  """
  option = functools.partial(config_lib.option, config)
  dtype_name = option('dtype')
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
      dtype=dtype,
      compute=compute_lib.from_config(config),
      **{name: option(name) for name in OPTION_DEFAULTS if name != 'dtype'},
  )
