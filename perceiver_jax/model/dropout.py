"""Dropout with a counter-based hash for its random bits.

`jax.random.bernoulli` draws threefry bits, about 20 rounds of 32-bit
arithmetic per element. On a CPU one `[16, 8, 256, 256]` attention-weight mask
then costs more than 100 ms, a tenth of a latent block's forward and backward
pass. Dropout needs independent-looking bits, not a cryptographic generator,
so the default `bits='hash'` derives two 32-bit seeds from the dropout key
(with `jax.random.bits`, so any key implementation works) and hashes each
element's index with three rounds of MurmurHash3's 32-bit finaliser. That is
about 20 integer operations per element, fused by XLA into the consumer.

The index is the element's position in a *logical* layout, so a mask can be
produced directly in another physical layout (`perm`) and still equal the
mask of the logical array, transposed: the folded attention form keeps its
weights as `[batch, queries, heads, keys]` but draws the same mask as the
factored form's `[batch, heads, queries, keys]`.

The batch axis (logical axis 0) is hashed separately from the flat index of
the others, so every batch row is a function of its own index (masks do not
depend on how the batch is sharded) and only one row must have fewer than
2**32 elements.

`bits='threefry'` uses `jax.random.bernoulli`, as `flax.linen.Dropout` does.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_jax import checks

DROPOUT_BITS = ('hash', 'threefry')
BITS_RULE = checks.one_of(*DROPOUT_BITS)

_GOLDEN = np.uint32(0x9E3779B1)   # odd: multiplication permutes uint32
_ROW_MIX = np.uint32(0x85EBCA77)


def check_bits(bits):
  """Raises ValueError unless `bits` names a dropout bit generator."""
  if not BITS_RULE.ok(bits):
    raise ValueError(f'dropout_bits must be {BITS_RULE.requirement}, got '
                     f'{bits!r}.')


def check_rate(name, rate):
  """Raises ValueError unless `rate` is a dropout rate in [0, 1)."""
  if not checks.RATE.ok(rate):
    raise ValueError(f'{name} must be {checks.RATE.requirement}, got '
                     f'{rate!r}.')


def _fmix32(h):
  """MurmurHash3's finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _logical_indices(shape, perm):
  """(row, flat) uint32 indices of logical axis 0 and of the other axes.

  `shape` is physical; physical axis `perm[i]` is logical axis i.
  """
  logical = [shape[p] for p in perm]
  rest = int(np.prod(logical[1:], dtype=np.int64))
  if rest >= 2**32 or logical[0] >= 2**32:
    raise ValueError(f'Hash dropout needs fewer than 2**32 elements per '
                     f'row of logical axis 0; got logical shape {logical}.')
  row = jax.lax.broadcasted_iota(jnp.uint32, shape, perm[0])
  flat = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for i in range(len(perm) - 1, 0, -1):
    flat = flat + jax.lax.broadcasted_iota(
        jnp.uint32, shape, perm[i]) * np.uint32(stride)
    stride *= logical[i]
  return row, flat


def keep_mask(key, keep_prob, shape, *, bits='hash',
              perm: Optional[Sequence[int]] = None):
  """Boolean mask of `shape`, True with probability `keep_prob`.

  Args:
    key: a PRNG key.
    keep_prob: probability of True, in (0, 1].
    shape: the mask's (physical) shape.
    bits: one of DROPOUT_BITS.
    perm: physical axis `perm[i]` holds logical axis i (default: identity).
      The mask equals the mask of the logical shape transposed by `perm`.
  """
  check_bits(bits)
  shape = tuple(shape)
  perm = tuple(range(len(shape))) if perm is None else tuple(perm)
  if sorted(perm) != list(range(len(shape))):
    raise ValueError(f'perm {perm} is not a permutation of the {len(shape)} '
                     'axes.')
  if bits == 'threefry':
    logical = tuple(shape[p] for p in perm)
    mask = jax.random.bernoulli(key, keep_prob, logical)
    return jnp.transpose(mask, np.argsort(perm))  # identity: free
  if not shape:
    shape, perm, scalar = (1,), (0,), True
  else:
    scalar = False
  seeds = jax.random.bits(key, (3,), jnp.uint32)
  row, flat = _logical_indices(shape, perm)
  h = _fmix32(flat * _GOLDEN + seeds[0])
  h = _fmix32(h ^ (row * _ROW_MIX + seeds[1]))
  h = _fmix32(h + seeds[2])
  # True iff h < keep_prob * 2**32 (exact to 2**-32; keep_prob 1: all True).
  threshold = min(int(round(float(keep_prob) * 2**32)), 2**32)
  mask = (h < np.uint32(threshold)) if threshold < 2**32 else jnp.ones(
      shape, bool)
  return mask[0] if scalar else mask


def keep_multipliers(key, rate, shape, *, bits='hash', perm=None):
  """float32 `1 / (1 - rate)` where `keep_mask` keeps, 0 where it drops."""
  check_rate('dropout rate', rate)
  if key is None:
    raise ValueError('a dropout key is required when dropout is on.')
  keep_prob = 1.0 - rate
  mask = keep_mask(key, keep_prob, shape, bits=bits, perm=perm)
  return jnp.where(mask, np.float32(1.0 / keep_prob), np.float32(0.0))


def dropout(x, rate, key, *, bits='hash', perm=None):
  """Zeroes a `rate` fraction of `x` and scales the rest by 1/(1-rate)."""
  if rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  mask = keep_mask(key, keep_prob, x.shape, bits=bits, perm=perm)
  return jnp.where(mask, x / jnp.asarray(keep_prob, x.dtype),
                   jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """`flax.linen.Dropout` (no broadcast dims) with a choice of bit generator.

  Draws from the 'dropout' rng stream, as flax's does.
  """
  rate: float
  bits: str = 'hash'

  def __post_init__(self):
    check_rate('dropout rate', self.rate)
    check_bits(self.bits)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, deterministic):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'), bits=self.bits)
