"""The example order: which records each shard reads at each step.

Shards are per device, not per process: the global batch is the
concatenation of every device's per-shard batch, and the records of shard i
at (epoch, step) are a pure function of (seed, epoch, step, i). So the
global batch does not depend on how devices are spread over processes (2
processes x 2 devices train like 1 x 4), a resumed run continues at the
next batch without iterator state, and every storage (`memory.py`,
`streaming.py`) serves the same examples in the same order.

Training: shard i's epoch is a permutation of its records seeded by
(seed, epoch, i); every shard takes `steps_per_epoch` batches (set by the
smallest shard), so the permutation's records past `steps_per_epoch *
per_shard_batch` sit the epoch out. Evaluation: every record of every shard
once, in stored order, the last batch padded (mask 0).

Pure numpy: no tensorflow, no jax.
"""

import functools

import numpy as np

from perceiver_jax import errors
from perceiver_jax.data import splits as splits_lib


@functools.lru_cache(maxsize=64)
def _permutation(seed, epoch, shard, size):
  """Shard `shard`'s record order in `epoch`: drawn once per epoch, not per
  batch (a 1.28M-record shard takes tens of ms to shuffle)."""
  perm = np.random.default_rng([seed, epoch, shard]).permutation(size)
  perm.flags.writeable = False  # Shared by every batch of the epoch.
  return perm


class Sampler:
  """Record indices of this process's shards, per split and step.

  Args:
    shards: `{split: (tfds split, [(start, stop)] per global shard)}`, as
      `splits.split_ranges` and `splits.shard_ranges` give them.
    shard_indices: the global shards this process reads.
    batch_size: the global batch size; a multiple of the shard count.
    seed: the run's seed.
  """

  def __init__(self, shards, shard_indices, batch_size, seed):
    num_shards = len(shards['train'][1])
    shard_indices = tuple(int(i) for i in shard_indices)
    if (not shard_indices or len(set(shard_indices)) != len(shard_indices)
        or not all(0 <= i < num_shards for i in shard_indices)):
      raise ValueError(f'shard_indices={shard_indices} must be distinct '
                       f'indices in [0, {num_shards}).')
    if batch_size % num_shards:
      raise errors.InputError(
          f'config.batch_size={batch_size} is not a multiple of the number '
          f'of shards ({num_shards}).')
    self.shards = shards
    self.num_shards = num_shards
    self.shard_indices = shard_indices
    self.per_shard_batch = batch_size // num_shards
    self.seed = seed
    # Global shard sizes, known without reading other processes' shards.
    self.sizes = {s: np.array([b - a for a, b in shards[s][1]])
                  for s in splits_lib.SPLITS}
    smallest = int(min(self.sizes['train']))
    self.steps_per_epoch = smallest // self.per_shard_batch
    if self.steps_per_epoch == 0:
      raise errors.InputError(
          f'config.batch_size={batch_size} is too large: each of the '
          f'{num_shards} shards needs {self.per_shard_batch} train examples '
          f'per step but the smallest has {smallest}. Use a smaller batch '
          'size.')

  def num_examples(self, split):
    return int(self.sizes[split].sum())

  def local_ranges(self, split):
    """`[(start, stop)]` of this process's shards of `split`."""
    return [self.shards[split][1][i] for i in self.shard_indices]

  def train_rows(self, epoch, step):
    """Per local shard, the positions within the shard of batch `step`."""
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f'step {step} not in [0, {self.steps_per_epoch}).')
    b = self.per_shard_batch
    rows = []
    for i, (start, stop) in zip(self.shard_indices,
                                self.local_ranges('train')):
      perm = _permutation(self.seed, epoch, i, stop - start)
      rows.append(perm[step * b:(step + 1) * b])
    return rows

  def num_eval_steps(self, split):
    """Batches that cover the largest shard; the same on every process."""
    if split not in splits_lib.EVAL_SPLITS:
      raise ValueError(f'split={split!r} must be one of '
                       f'{splits_lib.EVAL_SPLITS}.')
    return -(-int(max(self.sizes[split])) // self.per_shard_batch)

  def eval_rows(self, split, step):
    """Per local shard, the positions of batch `step` (fewer when the
    shard runs out: the storage pads them with mask 0)."""
    b = self.per_shard_batch
    return [np.arange(step * b, min((step + 1) * b, stop - start))
            for start, stop in self.local_ranges(split)]
