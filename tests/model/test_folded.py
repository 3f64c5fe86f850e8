"""The folded form's parts: when it pays, and its matmul's gradient.

Its equivalence with Keras' factored order is tested through the modules,
in test_attention.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.model import attention
from perceiver_jax.model import folded as folded_lib
from perceiver_jax.model.compute import Compute


def inputs(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


def attention_with(head_dim):
  """A bound 4-head MultiHeadAttention left to choose its form."""
  return attention.MultiHeadAttention(
      4, head_dim, compute=Compute(attention_form='auto')).bind({})


def test_auto_folds_only_where_it_saves_flops():
  # The seed's latent self-attention: 8 heads as wide as the latents.
  assert folded_lib.saves_flops(16, 256, 256, 256, 256, 256, 8, 256)
  # Standard heads that split the width: folding would cost 8x.
  assert not folded_lib.saves_flops(16, 256, 1024, 256, 256, 256, 8, 32)
  # At batch 1 the weight products cancel the saving (a tie: factored).
  assert not folded_lib.saves_flops(1, 256, 256, 256, 256, 256, 8, 256)
  x = jnp.zeros((4, 8, 16))
  assert attention_with(16).folded(x, x)
  assert not attention_with(16).folded(x[:2], x[:2])  # a tie
  assert not attention_with(4).folded(x, x)


@pytest.mark.parametrize('m, k, n', [(12, 4, 16), (12, 16, 4)])
def test_matmul_gradient_is_the_plain_gradient(m, k, n):
  """Both branches of the custom weight gradient."""
  x, w = inputs((m, k), 0), inputs((k, n), 1)
  probe = inputs((m, n), 2)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w) * probe)

  ours = jax.grad(loss(folded_lib.matmul), argnums=(0, 1))(x, w)
  plain = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
