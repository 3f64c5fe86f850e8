"""Attention primitives of the Keras Perceiver example, in Flax linen.

Two attentions appear in the seed and they differ in more than their inputs:

* `CrossAttention` is Keras `Attention(use_scale=True)` on single-head
  projections: logits are `scale * q @ k^T` with ONE learned scalar `scale`
  initialised to 1.0, not the usual fixed `1 / sqrt(d)`.
* `MultiHeadSelfAttention` is Keras `MultiHeadAttention(num_heads,
  key_dim=projection_dim)`: every head is `projection_dim` wide (the heads do
  not split the width), logits are scaled by `1 / sqrt(key_dim)`, and an output
  projection maps the concatenated heads back to the input width.

Both drop attention *weights* (not outputs) in training, like Keras.

Arrays are laid out `[batch, length, heads, head_dim]`, the layout of
`jax.nn.dot_product_attention`, so a fused kernel can be selected with
`implementation` ('cudnn' on GPU) wherever no attention dropout is active.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# Values accepted by `jax.nn.dot_product_attention(implementation=...)`.
ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn')

# Keras' default kernel initialiser for 2-D kernels.
keras_glorot_uniform = nn.initializers.glorot_uniform()

# How Keras computes glorot fans for the 3-D multi-head kernels differs by
# version. Keras 2 (the seed ran 2.7) treats them like convolution kernels:
# receptive field = prod(shape[:-2]), fan_in = shape[-2] * field, fan_out =
# shape[-1] * field; at the seed's sizes that gives 5.4x (q/k/v) and 1.3x
# (output) smaller limits than Keras 3's EinsumDense, whose fans are the
# einsum's input and output axes.
ATTENTION_INITS = ('keras2', 'keras3')


def multihead_kernel_init(style, shape, num_input_axes):
  """Glorot-uniform for a multi-head kernel of `shape`, Keras 2 or 3 fans.

  `num_input_axes` leading axes are contracted (1 for q/k/v, 2 for the
  output projection). The returned initialiser ignores the (flattened)
  shape flax passes, other than its size, and reshapes to it.
  """
  if style not in ATTENTION_INITS:
    raise ValueError(f'attention_init must be one of {ATTENTION_INITS}, got '
                     f'{style!r}.')
  if style == 'keras2':
    field = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * field, shape[-1] * field
  else:
    fan_in = math.prod(shape[:num_input_axes])
    fan_out = math.prod(shape[num_input_axes:])
  limit = math.sqrt(6.0 / (fan_in + fan_out))

  def init(key, flat_shape, dtype=jnp.float32):
    assert math.prod(flat_shape) == math.prod(shape), (flat_shape, shape)
    return jax.random.uniform(key, flat_shape, dtype, -limit, limit)

  return init


def check_implementation(implementation):
  """Raises ValueError unless `implementation` is one jax.nn accepts."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
        f'attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got '
        f'{implementation!r}.')


def check_rate(name, rate):
  """Raises ValueError unless `rate` is a dropout rate in [0, 1)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'{name} must be in [0, 1), got {rate!r}.')


def dot_product_attention(query, key, value, *, scale, dropout_rate=0.0,
                          deterministic=True, dropout_rng=None,
                          implementation='xla'):
  """Returns `dropout(softmax(scale * q k^T)) v` per head.

  Without active dropout this calls `jax.nn.dot_product_attention`, so
  `implementation` can select a fused kernel. Keras drops attention weights,
  which fused kernels cannot do, so with dropout the weights are materialised
  here (logits and softmax in float32, like jax.nn's XLA path).

  Args:
    query: `[batch, q_length, heads, head_dim]`.
    key: `[batch, kv_length, heads, head_dim]`.
    value: `[batch, kv_length, heads, head_dim]`, same dtype as `key`.
    scale: a Python float multiplying the logits (static, as fused kernels
      need); fold a learned scale into `query` instead.
    dropout_rate: fraction of attention weights dropped when not deterministic.
    deterministic: if True, no dropout.
    dropout_rng: PRNG key, required when dropout is active.
    implementation: None, 'xla' or 'cudnn', passed to jax.nn.

  Returns:
    `[batch, q_length, heads, head_dim]` in `value`'s dtype.
  """
  check_implementation(implementation)
  check_rate('dropout_rate', dropout_rate)
  for name, x in (('query', query), ('key', key), ('value', value)):
    if x.ndim != 4:
      raise ValueError(f'{name} must be [batch, length, heads, head_dim], got '
                       f'shape {x.shape}.')
  if deterministic or dropout_rate == 0.0:
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, implementation=implementation)
  if dropout_rng is None:
    raise ValueError('dropout_rng is required when attention dropout is on.')
  logits = jnp.einsum('btnh,bsnh->bnts', query, key,
                      preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
  weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return jnp.einsum('bnts,bsnh->btnh', weights.astype(value.dtype), value)


class CrossAttention(nn.Module):
  """Latents query the data array: Keras `Attention(use_scale=True)`.

  Single head; q from the latents, k and v from the data, each projected to
  `features` with bias; no output projection (the seed adds the attention
  output straight onto the normalised latents).

  Porting note: the seed calls `Attention()([query, key, value])`, but Keras'
  input order is [query, value, key], so the seed's Dense named 'key' in fact
  projects the values and its 'value' the keys. Both read the normalised data
  with the same shape and initialiser, so the model is the same; only the
  names swap when weights are moved between the two.

  Attributes:
    features: width of the q/k/v projections (the seed's projection_dim).
    dropout_rate: dropout on the attention weights (train only).
    dtype: compute dtype; parameters are float32.
    attention_impl: passed to `jax.nn.dot_product_attention`.
  """
  features: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'

  def __post_init__(self):
    if self.features <= 0:
      raise ValueError(f'features must be positive, got {self.features}.')
    check_rate('attention dropout_rate', self.dropout_rate)
    check_implementation(self.attention_impl)
    super().__post_init__()

  @nn.compact
  def __call__(self, latents, data, *, deterministic):
    """Maps latents `[b, n, d]` and data `[b, m, d']` to `[b, n, features]`."""
    dense = functools.partial(nn.Dense, self.features, dtype=self.dtype,
                              kernel_init=keras_glorot_uniform)
    query = dense(name='query')(latents)
    key = dense(name='key')(data)
    value = dense(name='value')(data)
    # Keras multiplies the logits by this scalar; it learns the softmax
    # temperature, starting from the unscaled dot product.
    scale = self.param('scale', nn.initializers.ones, (), jnp.float32)
    # scale * (q k^T) == (scale * q) k^T; fused kernels take a static scale.
    query = query * scale.astype(query.dtype)
    rng = None if deterministic or not self.dropout_rate else (
        self.make_rng('dropout'))
    out = dot_product_attention(
        query[:, :, None, :], key[:, :, None, :], value[:, :, None, :],
        scale=1.0, dropout_rate=self.dropout_rate, deterministic=deterministic,
        dropout_rng=rng, implementation=self.attention_impl)
    return out[:, :, 0, :]


class MultiHeadSelfAttention(nn.Module):
  """Keras `MultiHeadAttention(num_heads, key_dim=head_dim)` on one sequence.

  Parameters are shaped like Keras' so weights can be moved across: q/k/v
  kernels `(width, num_heads, head_dim)` with biases `(num_heads, head_dim)`;
  output kernel `(num_heads, head_dim, width)` with bias `(width,)`.

  Attributes:
    num_heads: number of heads.
    head_dim: per-head width (Keras key_dim; the seed uses projection_dim).
    dropout_rate: dropout on the attention weights (train only).
    dtype: compute dtype; parameters are float32.
    attention_impl: passed to `jax.nn.dot_product_attention`.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'
  attention_init: str = 'keras2'

  def __post_init__(self):
    if self.num_heads <= 0 or self.head_dim <= 0:
      raise ValueError('num_heads and head_dim must be positive, got '
                       f'{self.num_heads} and {self.head_dim}.')
    check_rate('attention dropout_rate', self.dropout_rate)
    check_implementation(self.attention_impl)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, *, deterministic):
    """Maps `[batch, length, width]` to the same shape."""
    width = inputs.shape[-1]
    heads = (self.num_heads, self.head_dim)
    project = functools.partial(
        nn.DenseGeneral, features=heads, axis=-1, dtype=self.dtype,
        kernel_init=multihead_kernel_init(self.attention_init,
                                          (width, *heads), 1))
    query = project(name='query')(inputs)
    key = project(name='key')(inputs)
    value = project(name='value')(inputs)
    rng = None if deterministic or not self.dropout_rate else (
        self.make_rng('dropout'))
    out = dot_product_attention(
        query, key, value, scale=1.0 / math.sqrt(self.head_dim),
        dropout_rate=self.dropout_rate, deterministic=deterministic,
        dropout_rng=rng, implementation=self.attention_impl)
    return nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype,
        kernel_init=multihead_kernel_init(self.attention_init,
                                          (*heads, width), 2),
        name='output')(out)
