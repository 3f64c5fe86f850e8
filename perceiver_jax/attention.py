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

The paper's variants reuse `MultiHeadAttention` with queries and keys from
different arrays: multi-head cross-attention (`num_cross_heads`, heads that
split the width) and the Perceiver IO query decoder. Cross-attentions built
with `sow_weights=True` record their attention weights in 'intermediates'
when, and only when, that collection is mutable (attention maps).
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
# Keras LayerNormalization(epsilon=1e-6); two-pass variance for stability.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6,
                              use_fast_variance=False)
# Name of the sown cross-attention weights, [batch, heads, queries, inputs].
ATTENTION_WEIGHTS = 'cross_attention_weights'

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
                          implementation='xla', return_weights=False):
  """Returns `dropout(softmax(scale * q k^T)) v` per head.

  Without active dropout this calls `jax.nn.dot_product_attention`, so
  `implementation` can select a fused kernel. Keras drops attention weights,
  which fused kernels cannot do, so with dropout (or when the weights are
  asked for) the weights are materialised here (logits and softmax in
  float32, like jax.nn's XLA path).

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
    return_weights: also return the float32 softmax weights
      `[batch, heads, q_length, kv_length]` (before dropout).

  Returns:
    `[batch, q_length, heads, head_dim]` in `value`'s dtype, and the weights
    if `return_weights`.
  """
  check_implementation(implementation)
  check_rate('dropout_rate', dropout_rate)
  for name, x in (('query', query), ('key', key), ('value', value)):
    if x.ndim != 4:
      raise ValueError(f'{name} must be [batch, length, heads, head_dim], got '
                       f'shape {x.shape}.')
  dropout = not deterministic and dropout_rate > 0.0
  if not dropout and not return_weights:
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, implementation=implementation)
  if dropout and dropout_rng is None:
    raise ValueError('dropout_rng is required when attention dropout is on.')
  logits = jnp.einsum('btnh,bsnh->bnts', query, key,
                      preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  attended = weights
  if dropout:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    attended = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum('bnts,bsnh->btnh', attended.astype(value.dtype), value)
  return (out, weights) if return_weights else out


def attend(module, query, key, value, *, scale, dropout_rate, deterministic,
           implementation, sow_weights=False):
  """`dot_product_attention` inside `module`, optionally sowing its weights.

  The weights are materialised and sown only while 'intermediates' is
  mutable, so ordinary calls keep the fused kernel; the output is the same
  either way (same dropout rng, same formula).
  """
  rng = None if deterministic or not dropout_rate else (
      module.make_rng('dropout'))
  capture = sow_weights and module.is_mutable_collection('intermediates')
  out = dot_product_attention(
      query, key, value, scale=scale, dropout_rate=dropout_rate,
      deterministic=deterministic, dropout_rng=rng,
      implementation=implementation, return_weights=capture)
  if capture:
    out, weights = out
    module.sow('intermediates', ATTENTION_WEIGHTS, weights)
  return out


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
    sow_weights: sow the weights `[batch, 1, latents, inputs]` when
      'intermediates' is mutable.
  """
  features: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'
  sow_weights: bool = True

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
    out = attend(
        self, query[:, :, None, :], key[:, :, None, :], value[:, :, None, :],
        scale=1.0, dropout_rate=self.dropout_rate, deterministic=deterministic,
        implementation=self.attention_impl, sow_weights=self.sow_weights)
    return out[:, :, 0, :]


class MultiHeadAttention(nn.Module):
  """Keras `MultiHeadAttention(num_heads, key_dim=head_dim)`.

  Self-attention when called with one array (the seed's latent Transformer);
  cross-attention when `inputs_kv` is given (queries from `inputs_q`, keys
  and values from `inputs_kv`), as the paper's multi-head cross-attention
  and the Perceiver IO decoder use it. Logits are scaled by 1/sqrt(head_dim).

  Parameters are shaped like Keras' so weights can be moved across: q/k/v
  kernels `(width, num_heads, head_dim)` with biases `(num_heads, head_dim)`;
  output kernel `(num_heads, head_dim, width)` with bias `(width,)`, where
  the output width is that of `inputs_q`.

  Attributes:
    num_heads: number of heads.
    head_dim: per-head width (Keras key_dim; the seed uses projection_dim).
    dropout_rate: dropout on the attention weights (train only).
    dtype: compute dtype; parameters are float32.
    attention_impl: passed to `jax.nn.dot_product_attention`.
    attention_init: 'keras2' or 'keras3' glorot fans of the kernels.
    sow_weights: sow the weights `[batch, heads, queries, inputs]` when
      'intermediates' is mutable.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = 'xla'
  attention_init: str = 'keras2'
  sow_weights: bool = False

  def __post_init__(self):
    if self.num_heads <= 0 or self.head_dim <= 0:
      raise ValueError('num_heads and head_dim must be positive, got '
                       f'{self.num_heads} and {self.head_dim}.')
    check_rate('attention dropout_rate', self.dropout_rate)
    check_implementation(self.attention_impl)
    if self.attention_init not in ATTENTION_INITS:
      raise ValueError(f'attention_init must be one of {ATTENTION_INITS}, '
                       f'got {self.attention_init!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, deterministic):
    """Maps `[batch, q_length, width]` (and `[batch, kv_length, width_kv]`)
    to `[batch, q_length, width]`."""
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    width = inputs_q.shape[-1]
    heads = (self.num_heads, self.head_dim)

    def project(x, name):
      return nn.DenseGeneral(
          features=heads, axis=-1, dtype=self.dtype,
          kernel_init=multihead_kernel_init(
              self.attention_init, (x.shape[-1], *heads), 1), name=name)(x)

    query = project(inputs_q, 'query')
    key = project(inputs_kv, 'key')
    value = project(inputs_kv, 'value')
    out = attend(
        self, query, key, value, scale=1.0 / math.sqrt(self.head_dim),
        dropout_rate=self.dropout_rate, deterministic=deterministic,
        implementation=self.attention_impl, sow_weights=self.sow_weights)
    return nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype,
        kernel_init=multihead_kernel_init(self.attention_init,
                                          (*heads, width), 2),
        name='output')(out)


# The seed's name for the latent Transformer's attention.
MultiHeadSelfAttention = MultiHeadAttention
