"""Hash dropout: rate, independence, determinism, layouts, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from perceiver_jax.model import dropout


def draw(keep_prob, shape, seed=0, **kwargs):
  return np.asarray(dropout.keep_mask(jax.random.key(seed), keep_prob, shape,
                                      **kwargs))


@pytest.mark.parametrize('bits', dropout.DROPOUT_BITS)
@pytest.mark.parametrize('keep_prob', [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_noise(bits, keep_prob):
  mask = draw(keep_prob, (64, 8, 128), bits=bits)
  n = mask.size
  # 5 standard deviations of a Binomial(n, p) mean.
  assert abs(mask.mean() - keep_prob) < 5 * np.sqrt(
      keep_prob * (1 - keep_prob) / n)


def test_neighbours_rows_and_seeds_are_uncorrelated():
  mask = draw(0.5, (64, 65536)).astype(np.float64)
  tol = 5 / np.sqrt(mask.size)
  # Along the flat index, across batch rows, and between seeds.
  assert abs(np.corrcoef(mask[:, :-1].ravel(), mask[:, 1:].ravel())[0, 1]) < tol
  assert abs(np.corrcoef(mask[:-1].ravel(), mask[1:].ravel())[0, 1]) < tol
  other = draw(0.5, (64, 65536), seed=1).astype(np.float64)
  assert abs(np.corrcoef(mask.ravel(), other.ravel())[0, 1]) < tol


def test_pairs_of_neighbours_are_uniform():
  """All four (keep, keep) patterns of adjacent elements equally often."""
  mask = draw(0.5, (32, 65536))
  pattern = 2 * mask[:, :-1].astype(int) + mask[:, 1:]
  counts = np.bincount(pattern.ravel(), minlength=4)
  expected = pattern.size / 4
  chi2 = ((counts - expected)**2 / expected).sum()
  assert chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


def test_same_key_same_mask_and_keep_everything_at_one():
  assert np.array_equal(draw(0.7, (4, 100)), draw(0.7, (4, 100)))
  assert not np.array_equal(draw(0.7, (4, 100)), draw(0.7, (4, 100), seed=3))
  assert draw(1.0, (4, 100)).all()
  assert draw(0.5, ()).shape == ()


@pytest.mark.parametrize('bits', dropout.DROPOUT_BITS)
def test_mask_in_a_permuted_layout_is_the_logical_mask_transposed(bits):
  logical = draw(0.8, (3, 4, 5, 6), bits=bits)
  physical = draw(0.8, (3, 5, 4, 6), bits=bits, perm=(0, 2, 1, 3))
  np.testing.assert_array_equal(np.transpose(physical, (0, 2, 1, 3)), logical)


def test_mask_of_a_batch_row_does_not_depend_on_the_batch():
  """Each row hashes its own index: a sharded batch draws the same mask."""
  whole = draw(0.5, (8, 3, 7))
  np.testing.assert_array_equal(draw(0.5, (2, 3, 7)), whole[:2])


def test_sharded_mask_equals_single_device_mask():
  devices = np.array(jax.devices()[:4])
  mesh = jax.sharding.Mesh(devices, ('data',))
  fn = jax.jit(lambda key: dropout.keep_mask(key, 0.6, (8, 5, 16)),
               out_shardings=NamedSharding(mesh, P('data')))
  np.testing.assert_array_equal(np.asarray(fn(jax.random.key(2))),
                                draw(0.6, (8, 5, 16), seed=2))


def test_dropout_scales_kept_values_and_zeroes_the_rest():
  x = jnp.arange(1, 401, dtype=jnp.float32).reshape(4, 100)
  out = np.asarray(dropout.dropout(x, 0.25, jax.random.key(0)))
  mask = draw(0.75, (4, 100))
  np.testing.assert_allclose(out[mask], np.asarray(x)[mask] / 0.75, rtol=1e-6)
  assert (out[~mask] == 0).all()


@pytest.mark.parametrize('bits', dropout.DROPOUT_BITS)
def test_keep_multipliers_are_the_mask_scaled(bits):
  keep = np.asarray(dropout.keep_multipliers(
      jax.random.key(3), 0.2, (3, 4, 50), bits=bits, perm=(1, 0, 2)))
  mask = np.asarray(dropout.keep_mask(jax.random.key(3), 0.8, (3, 4, 50),
                                      bits=bits, perm=(1, 0, 2)))
  assert keep.dtype == np.float32
  np.testing.assert_array_equal(keep, np.where(mask, np.float32(1 / 0.8), 0))
  with pytest.raises(ValueError, match='dropout rate'):
    dropout.keep_multipliers(jax.random.key(3), 1.0, (2,))
  with pytest.raises(ValueError, match='a dropout key is required'):
    dropout.keep_multipliers(None, 0.1, (2,))


def test_module_is_identity_when_deterministic_and_draws_when_training():
  layer = dropout.Dropout(0.5)
  x = jnp.ones((4, 64))
  assert (layer.apply({}, x, deterministic=True) == x).all()
  out = layer.apply({}, x, deterministic=False,
                    rngs={'dropout': jax.random.key(0)})
  assert 0 < float((out == 0).mean()) < 1


def test_threefry_matches_flax_bernoulli():
  """bits='threefry' draws what jax.random.bernoulli (flax's Dropout) draws."""
  key = jax.random.key(5)
  np.testing.assert_array_equal(
      draw(0.9, (2, 3, 4), seed=5, bits='threefry'),
      np.asarray(jax.random.bernoulli(key, 0.9, (2, 3, 4))))


@pytest.mark.parametrize('kwargs, message', [
    (dict(bits='philox'), "dropout_bits must be 'hash' or"),
    (dict(perm=(0, 0, 1)), 'not a permutation'),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    dropout.keep_mask(jax.random.key(0), 0.5, (2, 3, 4), **kwargs)


def test_bad_module_rate_raises():
  with pytest.raises(ValueError, match='dropout rate'):
    dropout.Dropout(1.0)
  with pytest.raises(ValueError, match='dropout_bits'):
    dropout.Dropout(0.1, bits='mt19937')


def test_flax_module_names_do_not_collide():
  """Two Dropouts in one module draw different masks."""
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return (dropout.Dropout(0.5)(x, deterministic=False),
              dropout.Dropout(0.5)(x, deterministic=False))

  a, b = Two().apply({}, jnp.ones((8, 64)),
                     rngs={'dropout': jax.random.key(0)})
  assert not np.array_equal(np.asarray(a), np.asarray(b))
