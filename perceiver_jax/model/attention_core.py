"""Softmax attention with dropout on its weights, and a hand-written backward.

Keras drops attention *weights*, so the seed's attention cannot use a fused
kernel in training: the `[..., queries, keys]` weights are materialised.
Differentiating that chain automatically leaves the layout of the backward
products to XLA, which on a CPU copies the `[..., queries, keys]` gradients
into a transposed layout before contracting over the queries.

`softmax_attention` saves the softmax weights and the dropped weights instead
and writes the backward pass out: with `A = keep * W` the dropped weights and
`dA` their gradient, the logits' gradient is `g - W * rowsum(g)` where
`g = dA * A`, so the mask is not needed again. Every product contracts
over the last axis of one operand or over the queries of both, in the
layout the forward pass produced.
"""

import functools

import jax
import jax.numpy as jnp


def softmax_weights(query, key, *, scale=1.0):
  """float32 `softmax(scale * q k^T)` over the keys, `[..., queries, keys]`."""
  logits = jnp.einsum('...me,...se->...ms', query, key,
                      preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)


def _forward(query, key, value, keep, scale):
  weights = softmax_weights(query, key, scale=scale)
  attended = weights if keep is None else weights * keep
  out = jnp.einsum('...ms,...sf->...mf', attended.astype(value.dtype), value)
  return (out, jnp.sum(attended, axis=-1)), (query, key, value, weights,
                                             attended)


def _backward(scale, residuals, cotangents):
  query, key, value, weights, attended = residuals
  d_out, d_row_sums = cotangents
  d_attended = jnp.einsum('...mf,...sf->...ms', d_out, value,
                          preferred_element_type=jnp.float32)
  d_attended = d_attended + d_row_sums[..., None]
  d_value = jnp.einsum('...ms,...mf->...sf', attended.astype(value.dtype),
                       d_out)
  g = d_attended * attended
  d_logits = (g - weights * jnp.sum(g, axis=-1, keepdims=True)) * scale
  d_logits = d_logits.astype(query.dtype)
  d_query = jnp.einsum('...ms,...se->...me', d_logits, key)
  d_key = jnp.einsum('...ms,...me->...se', d_logits, query)
  return d_query, d_key, d_value, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(query, key, value, keep, scale):
  return _forward(query, key, value, keep, scale)[0]


_attention.defvjp(_forward, _backward)


def softmax_attention(query, key, value, keep=None, *, scale=1.0):
  """`(keep * softmax(scale * q k^T)) v` and the row sums of the weights.

  Args:
    query: `[..., queries, width]`.
    key: `[..., keys, width]`, same leading axes.
    value: `[..., keys, value_width]`.
    keep: dropout multipliers `[..., queries, keys]` (0 for a dropped
      weight, `1 / keep_prob` for a kept one), or None for no dropout. No
      gradient flows into it.
    scale: a Python float multiplying the logits.

  Returns:
    `[..., queries, value_width]` in `value`'s dtype, and the float32 row
    sums `[..., queries]` of the dropped weights (1 without dropout).
    Logits and softmax are float32.
  """
  if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
    raise ValueError(f'Mismatched attention shapes: query {query.shape}, '
                     f'key {key.shape}, value {value.shape}.')
  if keep is not None:
    expected = query.shape[:-1] + key.shape[-2:-1]
    if keep.shape != expected:
      raise ValueError(f'keep must have shape {expected}, got {keep.shape}.')
    keep = jax.lax.stop_gradient(keep.astype(jnp.float32))
  return _attention(query, key, value, keep, float(scale))
