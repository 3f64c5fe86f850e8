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

`MultiHeadAttention` evaluates in one of two forms (`compute.Compute`):
Keras' factored order, or the folded one of `folded.py`, which multiplies
the per-head weights first. Both read the same parameters.

The paper's variants reuse `MultiHeadAttention` with queries and keys from
different arrays: multi-head cross-attention (`num_cross_heads`, heads that
split the width) and the Perceiver IO query decoder. Cross-attentions built
with `sow_weights=True` record their attention weights in 'intermediates'
when, and only when, that collection is mutable (attention maps).
"""

import functools
import math
from typing import Any, Callable, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_jax import checks
from perceiver_jax.model import attention_core
from perceiver_jax.model import compute as compute_lib
from perceiver_jax.model import dropout as dropout_lib
from perceiver_jax.model import folded as folded_lib

# Keras' default kernel initialiser for 2-D kernels.
keras_glorot_uniform = nn.initializers.glorot_uniform()
# Keras LayerNormalization(epsilon=1e-6), the seed's; haiku's and PyTorch's
# is 1e-5 (config `layer_norm_epsilon`). Two-pass variance for stability.
LAYER_NORM_EPSILON = 1e-6
LayerNorm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON,
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
ATTENTION_INIT_RULE = checks.one_of(*ATTENTION_INITS)


def multihead_kernel_init(style, shape, num_input_axes):
  """Glorot-uniform for a multi-head kernel of `shape`, Keras 2 or 3 fans.

  `num_input_axes` leading axes are contracted (1 for q/k/v, 2 for the
  output projection). The returned initialiser ignores the (flattened)
  shape flax passes, other than its size, and reshapes to it.
  """
  if not ATTENTION_INIT_RULE.ok(style):
    raise ValueError(f'attention_init must be {ATTENTION_INIT_RULE.requirement}'
                     f', got {style!r}.')
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


def dot_product_attention(query, key, value, *, scale, dropout_rate=0.0,
                          deterministic=True, dropout_key=None,
                          implementation='xla', return_weights=False,
                          dropout_bits='hash'):
  """Returns `dropout(softmax(scale * q k^T)) v` per head.

  Without active dropout this calls `jax.nn.dot_product_attention`, so
  `implementation` can select a fused kernel. Keras drops attention weights,
  which fused kernels cannot do, so with dropout (or when the weights are
  asked for) the weights are materialised by `attention_core` (logits and
  softmax in float32, like jax.nn's XLA path).

  Args:
    query: `[batch, q_length, heads, head_dim]`.
    key: `[batch, kv_length, heads, head_dim]`.
    value: `[batch, kv_length, heads, head_dim]`, same dtype as `key`.
    scale: a Python float multiplying the logits (static, as fused kernels
      need); fold a learned scale into `query` instead.
    dropout_rate: fraction of attention weights dropped when not deterministic.
    deterministic: if True, no dropout.
    dropout_key: PRNG key, required when dropout is active.
    implementation: None, 'xla' or 'cudnn', passed to jax.nn.
    return_weights: also return the float32 softmax weights
      `[batch, heads, q_length, kv_length]` (before dropout).
    dropout_bits: the dropout bit generator, one of `dropout.DROPOUT_BITS`.

  Returns:
    `[batch, q_length, heads, head_dim]` in `value`'s dtype, and the weights
    if `return_weights`.
  """
  compute_lib.check_implementation(implementation)
  dropout_lib.check_rate('dropout_rate', dropout_rate)
  for name, x in (('query', query), ('key', key), ('value', value)):
    if x.ndim != 4:
      raise ValueError(f'{name} must be [batch, length, heads, head_dim], got '
                       f'shape {x.shape}.')
  dropout = not deterministic and dropout_rate > 0.0
  if not dropout and not return_weights:
    return jax.nn.dot_product_attention(
        query, key, value, scale=scale, implementation=implementation)
  # Heads first, [batch, heads, length, head_dim]: free for one head.
  query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  keep = None
  if dropout:
    keep = dropout_lib.keep_multipliers(
        dropout_key, dropout_rate, query.shape[:-1] + key.shape[-2:-1],
        bits=dropout_bits)
  out, _ = attention_core.softmax_attention(query, key, value, keep,
                                            scale=scale)
  out = jnp.swapaxes(out, 1, 2)
  if return_weights:
    return out, attention_core.softmax_weights(query, key, scale=scale)
  return out


def attend(module, query, key, value, *, scale, dropout_rate, deterministic,
           compute, sow_weights=False):
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
      deterministic=deterministic, dropout_key=rng,
      implementation=compute.attention_impl, return_weights=capture,
      dropout_bits=compute.dropout_bits)
  if capture:
    out, weights = out
    module.sow('intermediates', ATTENTION_WEIGHTS, weights)
  return out


class HeadProjection(nn.Module):
  """The parameters of `nn.DenseGeneral`, readable without applying them.

  Same names, shapes and initialisation as `nn.DenseGeneral(features,
  axis=<the last len(in_shape) axes>)`, so both attention forms, and
  checkpoints, share one parameter tree.
  """
  in_shape: Tuple[int, ...]
  features: Tuple[int, ...]
  kernel_init: Callable[..., Any]
  dtype: Any = jnp.float32

  def setup(self):
    flat = (math.prod(self.in_shape), math.prod(self.features))

    def kernel_init(rng, shape, dtype=jnp.float32):
      return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

    def bias_init(rng, shape, dtype=jnp.float32):
      return jnp.zeros(shape, dtype)

    self.kernel = self.param('kernel', kernel_init,
                             self.in_shape + self.features, jnp.float32)
    self.bias = self.param('bias', bias_init, self.features, jnp.float32)

  def weights(self):
    """(kernel, bias) in float32."""
    return self.kernel, self.bias

  def __call__(self, x):
    n = len(self.in_shape)
    axes = tuple(range(x.ndim - n, x.ndim))
    out = jax.lax.dot_general(
        x.astype(self.dtype), self.kernel.astype(self.dtype),
        ((axes, tuple(range(n))), ((), ())))
    return out + self.bias.astype(self.dtype)


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
    compute: `compute.Compute` (attention_impl, dropout bit generator).
    sow_weights: sow the weights `[batch, 1, latents, inputs]` when
      'intermediates' is mutable.
  """
  features: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  sow_weights: bool = True

  def __post_init__(self):
    checks.enforce(self, {'features': checks.positive_int(),
                          'dropout_rate': checks.RATE})
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
        compute=self.compute, sow_weights=self.sow_weights)
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
  the output width is that of `inputs_q`. `compute.attention_form` chooses
  Keras' factored evaluation or `folded.folded_attention` ('auto': fewer
  FLOPs).

  Attributes:
    num_heads: number of heads.
    head_dim: per-head width (Keras key_dim; the seed uses projection_dim).
    dropout_rate: dropout on the attention weights (train only).
    dtype: compute dtype; parameters are float32.
    compute: `compute.Compute` (attention_impl, attention_form, dropout bits).
    attention_init: 'keras2' or 'keras3' glorot fans of the kernels.
    sow_weights: sow the weights `[batch, heads, queries, inputs]` when
      'intermediates' is mutable.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  compute: compute_lib.Compute = compute_lib.Compute()
  attention_init: str = 'keras2'
  sow_weights: bool = False

  def __post_init__(self):
    checks.enforce(self, {'num_heads': checks.positive_int(),
                          'head_dim': checks.positive_int(),
                          'dropout_rate': checks.RATE,
                          'attention_init': ATTENTION_INIT_RULE})
    super().__post_init__()

  def folded(self, inputs_q, inputs_kv):
    """Whether this call evaluates in the folded form."""
    return folded_lib.uses_folded_form(
        self.compute.attention_form, inputs_q.shape[0], inputs_q.shape[1],
        inputs_kv.shape[1], inputs_q.shape[-1], inputs_kv.shape[-1],
        inputs_q.shape[-1], self.num_heads, self.head_dim)

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, deterministic):
    """Maps `[batch, q_length, width]` (and `[batch, kv_length, width_kv]`)
    to `[batch, q_length, width]`."""
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    width = inputs_q.shape[-1]
    heads = (self.num_heads, self.head_dim)

    def projection(in_shape, features, num_input_axes, name):
      return HeadProjection(
          in_shape, features, multihead_kernel_init(
              self.attention_init, in_shape + features, num_input_axes),
          dtype=self.dtype, name=name)

    query = projection((inputs_q.shape[-1],), heads, 1, 'query')
    key = projection((inputs_kv.shape[-1],), heads, 1, 'key')
    value = projection((inputs_kv.shape[-1],), heads, 1, 'value')
    output = projection(heads, (width,), 2, 'output')
    scale = 1.0 / math.sqrt(self.head_dim)
    if not self.folded(inputs_q, inputs_kv):
      out = attend(
          self, query(inputs_q), key(inputs_kv), value(inputs_kv),
          scale=scale, dropout_rate=self.dropout_rate,
          deterministic=deterministic, compute=self.compute,
          sow_weights=self.sow_weights)
      return output(out)
    capture = self.sow_weights and self.is_mutable_collection('intermediates')
    rng = None if deterministic or not self.dropout_rate else (
        self.make_rng('dropout'))
    out = folded_lib.folded_attention(
        inputs_q, inputs_kv, query=query.weights(), key=key.weights(),
        value=value.weights(), output=output.weights(), scale=scale,
        dropout_rate=self.dropout_rate, deterministic=deterministic,
        dropout_key=rng, compute=self.compute, dtype=self.dtype,
        return_weights=capture)
    if capture:
      out, weights = out
      self.sow('intermediates', ATTENTION_WEIGHTS, weights)
    return out


# The seed's name for the latent Transformer's attention.
MultiHeadSelfAttention = MultiHeadAttention
