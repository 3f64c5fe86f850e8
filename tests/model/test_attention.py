"""Attention modules: the folded form against Keras' factored order (same
parameters, outputs, gradients, masks and sown weights), and their parts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.model import attention
from perceiver_jax.model.compute import Compute

KEY = jax.random.key(0)


def mha(form, num_heads=4, head_dim=16, dropout_rate=0.0, dtype=jnp.float32,
        dropout_bits='hash', sow_weights=False):
  return attention.MultiHeadAttention(
      num_heads, head_dim, dropout_rate, dtype=dtype,
      compute=Compute(attention_form=form, dropout_bits=dropout_bits),
      sow_weights=sow_weights)


def inputs(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


def randomised(params, seed=1):
  """Params with every leaf random, biases included (they start at zero)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      0.2 * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


def apply_both(x, kv=None, train=False, **kwargs):
  """Outputs of the factored and folded forms on the same random params."""
  args = (x,) if kv is None else (x, kv)
  params = randomised(mha('factored', **kwargs).init(
      KEY, *args, deterministic=True))
  rngs = {'dropout': jax.random.key(7)} if train else {}
  return [mha(form, **kwargs).apply(params, *args, deterministic=not train,
                                    rngs=rngs)
          for form in ('factored', 'folded')]


def test_folded_equals_factored_self_attention():
  factored, folded = apply_both(inputs((3, 10, 16), 0))
  np.testing.assert_allclose(folded, factored, rtol=1e-5, atol=1e-5)


def test_folded_equals_factored_cross_attention_of_other_width():
  """Queries and keys of different lengths and widths (the decoder case)."""
  factored, folded = apply_both(inputs((2, 1, 16), 0), inputs((2, 9, 24), 1))
  assert folded.shape == (2, 1, 16)
  np.testing.assert_allclose(folded, factored, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dropout_bits', ['hash', 'threefry'])
def test_folded_draws_the_same_dropout_mask(dropout_bits):
  """Same rng, same dropped weights: training outputs agree too."""
  factored, folded = apply_both(inputs((3, 10, 16), 0), train=True,
                                dropout_rate=0.3, dropout_bits=dropout_bits)
  np.testing.assert_allclose(folded, factored, rtol=1e-5, atol=1e-5)
  no_dropout, _ = apply_both(inputs((3, 10, 16), 0))
  assert not np.allclose(factored, no_dropout, atol=1e-3)


def test_folded_gradients_equal_factored_gradients():
  x = inputs((3, 10, 16), 0)
  params = randomised(mha('factored').init(KEY, x, deterministic=True))

  def grads(form):
    def loss(p):
      out = mha(form, dropout_rate=0.2).apply(
          p, x, deterministic=False, rngs={'dropout': jax.random.key(3)})
      return jnp.sum(jnp.sin(out))
    return jax.grad(loss)(params)

  factored, folded = grads('factored'), grads('folded')
  # The key bias shifts whole rows of logits: zero gradient in both forms.
  key_bias = folded['params']['key']['bias']
  assert np.all(np.asarray(key_bias) == 0)
  np.testing.assert_allclose(factored['params']['key']['bias'], 0, atol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
      factored, folded)


def test_folded_sows_the_same_weights():
  x = inputs((2, 6, 16), 0)
  params = randomised(mha('factored').init(KEY, x, deterministic=True))
  sown = []
  for form in ('factored', 'folded'):
    _, state = mha(form, sow_weights=True).apply(
        params, x, deterministic=True, mutable=['intermediates'])
    sown.append(state['intermediates'][attention.ATTENTION_WEIGHTS][0])
  assert sown[0].shape == (2, 4, 6, 6)
  np.testing.assert_allclose(sown[1], sown[0], rtol=1e-5, atol=1e-6)


def test_folded_in_bfloat16_stays_close_to_float32():
  x = inputs((2, 8, 16), 0)
  reference, _ = apply_both(x)
  _, folded = apply_both(x, dtype=jnp.bfloat16)
  assert folded.dtype == jnp.bfloat16
  np.testing.assert_allclose(folded.astype(jnp.float32), reference,
                             rtol=5e-2, atol=5e-2)


def test_head_projection_initialises_like_dense_general():
  init = attention.multihead_kernel_init('keras2', (16, 2, 8), 1)

  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 8), kernel_init=init, name='query')(x)

  class Projection(nn.Module):
    @nn.compact
    def __call__(self, x):
      return attention.HeadProjection((16,), (2, 8), init, name='query')(x)

  x = inputs((3, 5, 16), 0)
  dense, ours = Dense().init(KEY, x), Projection().init(KEY, x)
  jax.tree.map(np.testing.assert_array_equal, dense, ours)
  np.testing.assert_allclose(Projection().apply(ours, x),
                             Dense().apply(dense, x), rtol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(attention_impl='flash'), "attention_impl must be None, 'xla' or"),
    (dict(attention_form='fused'), "attention_form must be 'auto', "),
    (dict(dropout_bits='philox'), "dropout_bits must be 'hash' or"),
])
def test_bad_compute_options_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Compute(**kwargs)
