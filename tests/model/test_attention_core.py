"""attention_core: values and hand-written gradients against autodiff."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.model import attention_core
from perceiver_jax.model import dropout as dropout_lib


def reference(query, key, value, keep, scale):
  """The same function, differentiated by JAX."""
  logits = jnp.einsum('...me,...se->...ms', query.astype(jnp.float32),
                      key.astype(jnp.float32))
  weights = jax.nn.softmax(logits * scale, axis=-1)
  attended = weights if keep is None else weights * keep
  out = jnp.einsum('...ms,...sf->...mf', attended, value.astype(jnp.float32))
  return out, attended.sum(-1)


def inputs(lead, queries=5, keys=7, width=4, value_width=6, rate=0.25,
           dtype=jnp.float32):
  rngs = jax.random.split(jax.random.key(0), 4)
  query = jax.random.normal(rngs[0], lead + (queries, width), dtype)
  key = jax.random.normal(rngs[1], lead + (keys, width), dtype)
  value = jax.random.normal(rngs[2], lead + (keys, value_width), dtype)
  keep = dropout_lib.keep_multipliers(rngs[3], rate, lead + (queries, keys))
  return query, key, value, keep


@pytest.mark.parametrize('lead', [(2,), (2, 3)])
@pytest.mark.parametrize('use_keep', [False, True])
def test_values_and_gradients_match_autodiff(lead, use_keep):
  query, key, value, keep = inputs(lead)
  keep = keep if use_keep else None
  ours = lambda q, k, v: attention_core.softmax_attention(q, k, v, keep,
                                                          scale=0.7)
  theirs = lambda q, k, v: reference(q, k, v, keep, 0.7)
  out, vjp = jax.vjp(jax.jit(ours), query, key, value)
  out_ref, vjp_ref = jax.vjp(theirs, query, key, value)
  chex.assert_trees_all_close(out, out_ref, atol=1e-5, rtol=1e-5)
  # Cotangents on both outputs: the row sums feed the folded form's biases.
  cotangents = (jax.random.normal(jax.random.key(1), out[0].shape),
                jax.random.normal(jax.random.key(2), out[1].shape))
  chex.assert_trees_all_close(vjp(cotangents), vjp_ref(cotangents),
                              atol=1e-5, rtol=1e-5)
  if not use_keep:
    np.testing.assert_allclose(out[1], 1.0, rtol=1e-6)


def test_keys_shared_with_values_get_both_gradients():
  # The folded form passes one array as keys and values.
  query, key, _, keep = inputs((2,), value_width=4)
  loss = lambda f: lambda q, y: jnp.sum(jnp.sin(f(q, y, y, keep, 1.0)[0]))
  grads = jax.grad(loss(lambda *a: attention_core.softmax_attention(
      *a[:4], scale=a[4])), argnums=(0, 1))(query, key)
  grads_ref = jax.grad(loss(reference), argnums=(0, 1))(query, key)
  chex.assert_trees_all_close(grads, grads_ref, atol=1e-5, rtol=1e-5)


def test_no_gradient_flows_into_keep():
  query, key, value, keep = inputs((2,))
  grad = jax.grad(lambda m: attention_core.softmax_attention(
      query, key, value, m)[0].sum())(keep)
  np.testing.assert_array_equal(grad, 0.0)


def test_bfloat16_keeps_dtypes_and_stays_close():
  query, key, value, keep = inputs((2,), dtype=jnp.bfloat16)
  f = lambda q, k, v: attention_core.softmax_attention(q, k, v, keep)[0]
  out, vjp = jax.vjp(f, query, key, value)
  assert out.dtype == jnp.bfloat16
  grads = vjp(jnp.ones_like(out))
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  out_ref, vjp_ref = jax.vjp(lambda q, k, v: reference(q, k, v, keep, 1.0)[0],
                             query, key, value)
  np.testing.assert_allclose(out.astype(np.float32), out_ref, atol=0.05,
                             rtol=0.05)
  for g, g_ref in zip(grads, vjp_ref(jnp.ones_like(out_ref))):
    np.testing.assert_allclose(g.astype(np.float32), g_ref, atol=0.1,
                               rtol=0.05)


def test_softmax_weights_rows_sum_to_one():
  query, key, _, _ = inputs((2, 3))
  weights = attention_core.softmax_weights(query, key, scale=0.5)
  assert weights.shape == (2, 3, 5, 7) and weights.dtype == jnp.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_mismatched_shapes_are_rejected():
  query, key, value, keep = inputs((2,))
  with pytest.raises(ValueError, match='keep must have shape'):
    attention_core.softmax_attention(query, key, value, keep[:, :3])
  with pytest.raises(ValueError, match='Mismatched attention shapes'):
    attention_core.softmax_attention(query, key[..., :3], value)
