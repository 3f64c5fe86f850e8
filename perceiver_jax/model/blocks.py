"""The seed's building blocks: feed-forward, cross-attention and latent
Transformer modules, in the Keras example's layer order.

`perceiver.Perceiver` stacks them; each validates its own sizes.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax import errors
from perceiver_jax.model import attention as attention_lib
from perceiver_jax.model import compute as compute_lib
from perceiver_jax.model import dropout as dropout_lib


def _divisors(width):
  return [k for k in range(1, width + 1) if width % k == 0]


def cross_heads_problem(num_heads, width, field=str):
  """Why `num_heads` cross-attention heads cannot split `width`, or None.

  `field` renders the option names (config_lib adds 'config.').
  """
  if not (checks.is_int(num_heads) and num_heads > 0 and
          checks.is_int(width) and width > 0 and width % num_heads):
    return None
  return (f'{field("num_cross_heads")}={num_heads} must divide '
          f'{field("projection_dim")}={width} (each head is projection_dim '
          f'// num_cross_heads wide); choose 0 (the seed) or one of '
          f'{_divisors(width)}')


def input_width_problem(cross_attention_width, num_heads, field=str):
  """Why the cross-attention cannot work at the data array's width, or None.

  The seed's single head (`num_heads=0`) has no output projection, so it
  can only work at the latents' width.
  """
  if cross_attention_width != 'input' or num_heads != 0:
    return None
  return (f"{field('cross_attention_width')}='input' needs "
          f"{field('num_cross_heads')} >= 1: the seed's single head has no "
          'output projection back to projection_dim')


CROSS_HEADS_RULE = checks.non_negative_int("0: the seed's single head",
                                           example=8)
# The blocks' options, as the config names them (Perceiver passes them on).
RULES = {
    'num_cross_heads': CROSS_HEADS_RULE,
    # What the cross-attention works at: the latents' width (the seed's
    # projection_dim) or the data array's own (the paper's model).
    'cross_attention_width': checks.one_of('latent', 'input'),
    # Where the cross-attention's residuals branch (see CrossAttentionBlock).
    'cross_attention_residual': checks.one_of('normalized', 'pre_norm'),
    # 'full': the seed's heads, each projection_dim wide (Keras key_dim);
    # 'split': num_heads heads of projection_dim // num_heads (the paper's).
    'latent_head_width': checks.one_of('full', 'split'),
}


def problems(values, field=str):
  """What is wrong across the blocks' options (`values`), as messages."""
  out = []
  width, heads = values.get('projection_dim'), values.get('num_cross_heads')
  if values.get('cross_attention_width') == 'input':
    # What the data array must then be is the encoders' rule.
    out.append(input_width_problem('input', heads, field))
  else:
    out.append(cross_heads_problem(heads, width, field))
  heads = values.get('num_heads')
  if (values.get('latent_head_width') == 'split' and checks.is_int(heads)
      and checks.is_int(width) and heads > 0 and width > 0 and width % heads):
    out.append(f"{field('latent_head_width')}='split' needs "
               f"{field('num_heads')}={heads} to divide "
               f"{field('projection_dim')}={width}")
  return out


class FeedForward(nn.Module):
  """The seed's `create_ffn`: Dense+GELU per width but the last, then dropout.

  The last Dense is linear and dropout follows it (for the classifier head,
  dropout on the logits, exactly as the seed does) unless `final_dropout`
  is False.
  """
  units: Sequence[int]
  dropout_rate: float
  dtype: Any = jnp.float32
  final_dropout: bool = True
  dropout_bits: str = 'hash'
  gelu_approximate: bool = False

  def __post_init__(self):
    checks.enforce(self, {'units': checks.tuple_of_positive_ints(),
                          'dropout_rate': checks.RATE},
                   ['' if self.units else 'units must not be empty'])
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, deterministic):
    for i, units in enumerate(self.units):
      x = nn.Dense(units, dtype=self.dtype,
                   kernel_init=attention_lib.keras_glorot_uniform,
                   name=f'dense_{i}')(x)
      if i < len(self.units) - 1:
        # Exact erf (tf.nn.gelu's default) or the tanh approximation
        # (jax.nn.gelu's, which DeepMind's Perceiver code uses).
        x = nn.gelu(x, approximate=self.gelu_approximate)
    if not self.final_dropout:
      return x
    return dropout_lib.Dropout(self.dropout_rate, self.dropout_bits)(
        x, deterministic=deterministic)


class CrossAttentionBlock(nn.Module):
  """The seed's cross-attention module: latents read from the data array.

  With `residual='normalized'` (the seed) the residual adds the *normalised*
  latents, and the second residual adds the LayerNorm output, not its input.
  `residual='pre_norm'` is the pre-LN block of DeepMind's released Perceiver
  code, like the latent Transformer's blocks: `x = latents +
  attention(LN(latents), LN(data))`, then `x + FFN(LN(x))`. Both hold the
  same parameters. `query_residual=False` (pre_norm only) drops the first
  residual, `x = attention(...)`, as DeepMind's `use_query_residual=False`.

  `num_heads=0` is the seed's single head with a learned scalar scale and no
  output projection; `num_heads=k` is standard multi-head attention (1/sqrt(
  head_dim), output projection to the latents' width) whose k heads split
  `projection_dim` (`width='latent'`) or, with `width='input'`, the data
  array's own width, as the paper's model does. Both sow their weights when
  'intermediates' is mutable.
  """
  projection_dim: int
  ffn_units: Sequence[int]
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  num_heads: int = 0
  attention_init: str = 'keras2'
  width: str = 'latent'
  residual: str = 'normalized'
  layer_norm_epsilon: float = attention_lib.LAYER_NORM_EPSILON
  gelu_approximate: bool = False
  query_residual: bool = True

  def __post_init__(self):
    if not self.query_residual and self.residual != 'pre_norm':
      raise ValueError('query_residual=False needs residual=\'pre_norm\'.')
    checks.enforce(self, {
        'num_heads': CROSS_HEADS_RULE,
        'width': RULES['cross_attention_width'],
        'residual': RULES['cross_attention_residual']}, [
        cross_heads_problem(self.num_heads, self.projection_dim)
        if self.width == 'latent' else '',
        input_width_problem(self.width, self.num_heads)])
    super().__post_init__()

  @nn.compact
  def __call__(self, latents, data, deterministic):
    inputs = latents
    norm = functools.partial(attention_lib.LayerNorm, dtype=self.dtype,
                             epsilon=self.layer_norm_epsilon)
    latents = norm(name='latent_norm')(latents)
    data = norm(name='data_norm')(data)
    if self.num_heads:
      width = self.projection_dim if self.width == 'latent' else data.shape[-1]
      if width % self.num_heads:  # Only 'input': its width is the data's.
        raise errors.InputError(
            f'config.num_cross_heads={self.num_heads} must divide the data '
            f'array\'s width, {width} with cross_attention_width=\'input\' '
            '(the pixel values of a patch and their Fourier features); '
            f'choose one of {_divisors(width)}')
      attention = attention_lib.MultiHeadAttention(
          self.num_heads, width // self.num_heads,
          self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute,
          attention_init=self.attention_init, sow_weights=True,
          name='attention')
    else:
      attention = attention_lib.CrossAttention(
          self.projection_dim, self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute, name='attention')
    x = attention(latents, data, deterministic=deterministic)
    ffn = FeedForward(self.ffn_units, self.dropout_rate, dtype=self.dtype,
                      dropout_bits=self.compute.dropout_bits,
                      gelu_approximate=self.gelu_approximate, name='ffn')
    ffn_norm = norm(name='ffn_norm')
    if self.residual == 'pre_norm':
      if self.query_residual:
        x = x + inputs
      return x + ffn(ffn_norm(x), deterministic=deterministic)
    x = ffn_norm(x + latents)
    return ffn(x, deterministic=deterministic) + x


class TransformerBlock(nn.Module):
  """Pre-LN Transformer block on the latents (one block of the seed's loop)."""
  num_heads: int
  head_dim: int
  ffn_units: Sequence[int]
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  attention_init: str = 'keras2'
  layer_norm_epsilon: float = attention_lib.LAYER_NORM_EPSILON
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, deterministic):
    norm = functools.partial(attention_lib.LayerNorm, dtype=self.dtype,
                             epsilon=self.layer_norm_epsilon)
    y = norm(name='attention_norm')(x)
    y = attention_lib.MultiHeadSelfAttention(
        self.num_heads, self.head_dim, self.attention_dropout_rate,
        dtype=self.dtype, compute=self.compute,
        attention_init=self.attention_init, name='self_attention')(
            y, deterministic=deterministic)
    x = x + y
    y = norm(name='ffn_norm')(x)
    y = FeedForward(self.ffn_units, self.dropout_rate, dtype=self.dtype,
                    dropout_bits=self.compute.dropout_bits,
                    gelu_approximate=self.gelu_approximate, name='ffn')(
                        y, deterministic=deterministic)
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
  compute: compute_lib.Compute = compute_lib.Compute()
  attention_init: str = 'keras2'
  remat: bool = False
  layer_norm_epsilon: float = attention_lib.LAYER_NORM_EPSILON
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic):
    block_cls = (remat(TransformerBlock, 2) if self.remat else
                 TransformerBlock)
    for i in range(self.num_blocks):
      x = block_cls(
          self.num_heads, self.head_dim, self.ffn_units, self.dropout_rate,
          self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute,
          attention_init=self.attention_init,
          layer_norm_epsilon=self.layer_norm_epsilon,
          gelu_approximate=self.gelu_approximate, name=f'block_{i}')(
              x, deterministic)
    return x


def remat(block_cls, deterministic_argnum):
  """Recomputes a block's activations in the backward pass to save memory.

  `deterministic` (positional argument `deterministic_argnum`, self being 0)
  is static: it selects code rather than being traced.
  """
  return nn.remat(block_cls, static_argnums=(deterministic_argnum,))
