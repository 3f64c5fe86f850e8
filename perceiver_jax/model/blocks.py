"""The seed's building blocks: feed-forward, cross-attention and latent
Transformer modules, in the Keras example's layer order.

`perceiver.Perceiver` stacks them; each validates its own sizes.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax.model import attention as attention_lib
from perceiver_jax.model import compute as compute_lib
from perceiver_jax.model import dropout as dropout_lib


def cross_heads_problem(num_heads, width, field=str):
  """Why `num_heads` cross-attention heads cannot split `width`, or None.

  `field` renders the option names (config_lib adds 'config.').
  """
  if not (checks.is_int(num_heads) and num_heads > 0 and
          checks.is_int(width) and width > 0 and width % num_heads):
    return None
  divisors = [k for k in range(1, width + 1) if width % k == 0]
  return (f'{field("num_cross_heads")}={num_heads} must divide '
          f'{field("projection_dim")}={width} (each head is projection_dim '
          f'// num_cross_heads wide); choose 0 (the seed) or one of '
          f'{divisors}')


CROSS_HEADS_RULE = checks.non_negative_int("0: the seed's single head",
                                           example=8)


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
        x = nn.gelu(x, approximate=False)  # tf.nn.gelu's default, exact erf.
    if not self.final_dropout:
      return x
    return dropout_lib.Dropout(self.dropout_rate, self.dropout_bits)(
        x, deterministic=deterministic)


class CrossAttentionBlock(nn.Module):
  """The seed's cross-attention module: latents read from the data array.

  Note the residual adds the *normalised* latents (as the seed does), and the
  second residual adds the LayerNorm output, not its input.

  `num_heads=0` is the seed's single head with a learned scalar scale and no
  output projection; `num_heads=k` is standard multi-head attention (k heads
  of width projection_dim // k, 1/sqrt(head_dim), output projection). Both
  sow their weights when 'intermediates' is mutable.
  """
  projection_dim: int
  ffn_units: Sequence[int]
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  num_heads: int = 0
  attention_init: str = 'keras2'

  def __post_init__(self):
    checks.enforce(self, {'num_heads': CROSS_HEADS_RULE}, [
        cross_heads_problem(self.num_heads, self.projection_dim)])
    super().__post_init__()

  @nn.compact
  def __call__(self, latents, data, deterministic):
    latents = attention_lib.LayerNorm(dtype=self.dtype,
                                      name='latent_norm')(latents)
    data = attention_lib.LayerNorm(dtype=self.dtype, name='data_norm')(data)
    if self.num_heads:
      attention = attention_lib.MultiHeadAttention(
          self.num_heads, self.projection_dim // self.num_heads,
          self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute,
          attention_init=self.attention_init, sow_weights=True,
          name='attention')
    else:
      attention = attention_lib.CrossAttention(
          self.projection_dim, self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute, name='attention')
    x = attention(latents, data, deterministic=deterministic)
    x = attention_lib.LayerNorm(dtype=self.dtype, name='ffn_norm')(x + latents)
    ffn = FeedForward(self.ffn_units, self.dropout_rate, dtype=self.dtype,
                      dropout_bits=self.compute.dropout_bits, name='ffn')
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

  @nn.compact
  def __call__(self, x, deterministic):
    y = attention_lib.LayerNorm(dtype=self.dtype, name='attention_norm')(x)
    y = attention_lib.MultiHeadSelfAttention(
        self.num_heads, self.head_dim, self.attention_dropout_rate,
        dtype=self.dtype, compute=self.compute,
        attention_init=self.attention_init, name='self_attention')(
            y, deterministic=deterministic)
    x = x + y
    y = attention_lib.LayerNorm(dtype=self.dtype, name='ffn_norm')(x)
    y = FeedForward(self.ffn_units, self.dropout_rate, dtype=self.dtype,
                    dropout_bits=self.compute.dropout_bits, name='ffn')(
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

  @nn.compact
  def __call__(self, x, *, deterministic):
    block_cls = (remat(TransformerBlock, 2) if self.remat else
                 TransformerBlock)
    for i in range(self.num_blocks):
      x = block_cls(
          self.num_heads, self.head_dim, self.ffn_units, self.dropout_rate,
          self.attention_dropout_rate, dtype=self.dtype,
          compute=self.compute,
          attention_init=self.attention_init, name=f'block_{i}')(
              x, deterministic)
    return x


def remat(block_cls, deterministic_argnum):
  """Recomputes a block's activations in the backward pass to save memory.

  `deterministic` (positional argument `deterministic_argnum`, self being 0)
  is static: it selects code rather than being traced.
  """
  return nn.remat(block_cls, static_argnums=(deterministic_argnum,))
