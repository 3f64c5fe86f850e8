"""The example order: which records each device's rows hold at each step.

The order depends on the run's seed, the epoch, the step and the global
batch size only, never on how many devices or processes read it:

* Training: epoch e's order is one permutation of the training split,
  seeded by (seed, e). Global batch s of the epoch is its slice
  `[s * B, (s + 1) * B)` (B the global batch size); the
  `steps_per_epoch = n_train // B` full batches are the epoch, the last
  `n_train % B` records of the permutation sit it out.
* Evaluation: batch s is the split's records `[s * B, (s + 1) * B)` in
  stored order; the last batch is padded (mask 0) to B rows.

Device i of D (its position in the mesh) holds rows `[i * B/D, (i+1) * B/D)`
of every global batch, so a process reads just its devices' rows. A run
resumed on a slice of another shape (more or fewer devices or hosts) feeds
the model exactly the batches the uninterrupted run would have; 2 processes
x 2 devices read what 1 x 4 read. A resumed run needs no iterator state,
and both storages (`memory.py`, `streaming.py`) serve the same examples in
the same order. Only a change of the global batch size changes the order
(and the steps per epoch): `training/resume.py` allows it at an epoch end.

Positions here are within a split (`0 .. size - 1`); a split is the tfds
range `[start, stop)` that `splits.split_ranges` gives it.

Pure numpy: no tensorflow, no jax.
"""

import functools

import numpy as np

from perceiver_jax import errors
from perceiver_jax.data import splits as splits_lib

# Keeps the permutations' draws apart from the host transforms' (stream 1).
_RNG_STREAM = 0


@functools.lru_cache(maxsize=8)
def _permutation(seed, epoch, size):
  """Epoch `epoch`'s order of a split of `size` records: drawn once per
  epoch, not per batch (1.28M records take tens of ms to shuffle)."""
  perm = np.random.default_rng([seed, _RNG_STREAM, epoch]).permutation(size)
  perm.flags.writeable = False  # Shared by every batch of the epoch.
  return perm


class Sampler:
  """Positions of this process's rows of every global batch.

  Args:
    splits: `{split: (tfds split, start, stop)}` for train, validation and
      test (`splits.split_ranges`).
    num_shards: the global number of devices; each holds an equal share of
      every batch.
    shard_indices: the devices (mesh positions) whose rows this process
      reads.
    batch_size: the global batch size; a multiple of `num_shards`.
    seed: the run's seed.
  """

  def __init__(self, splits, num_shards, shard_indices, batch_size, seed):
    shard_indices = tuple(int(i) for i in shard_indices)
    if (not shard_indices or len(set(shard_indices)) != len(shard_indices)
        or not all(0 <= i < num_shards for i in shard_indices)):
      raise ValueError(f'shard_indices={shard_indices} must be distinct '
                       f'indices in [0, {num_shards}).')
    if batch_size % num_shards:
      raise errors.InputError(
          f'config.batch_size={batch_size} is not a multiple of the number '
          f'of devices ({num_shards}).')
    self.splits = dict(splits)
    self.num_shards = num_shards
    self.shard_indices = shard_indices
    self.batch_size = batch_size
    self.per_shard_batch = batch_size // num_shards
    self.seed = seed
    self.sizes = {s: stop - start
                  for s, (_, start, stop) in self.splits.items()}
    self.steps_per_epoch = self.sizes['train'] // batch_size
    if self.steps_per_epoch == 0:
      raise errors.InputError(
          f'config.batch_size={batch_size} is too large: the training split '
          f'has {self.sizes["train"]} examples, fewer than one batch. Use a '
          'smaller batch size.')

  def num_examples(self, split):
    return self.sizes[split]

  def tfds_split(self, split):
    """The tfds split that `split`'s records are read from."""
    return self.splits[split][0]

  def tfds_indices(self, split, positions):
    """Record indices in the tfds split of `split`'s `positions`."""
    return self.splits[split][1] + np.asarray(positions, np.int64)

  def _local_rows(self, positions):
    """This process's devices' rows of one global batch, per device."""
    b = self.per_shard_batch
    return [positions[i * b:(i + 1) * b] for i in self.shard_indices]

  def train_rows(self, epoch, step):
    """Per local device, the training positions of batch `step` of `epoch`."""
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f'step {step} not in [0, {self.steps_per_epoch}).')
    perm = _permutation(self.seed, epoch, self.sizes['train'])
    b = self.batch_size
    return self._local_rows(perm[step * b:(step + 1) * b])

  def num_eval_steps(self, split):
    """Batches that cover `split`; depends on the global batch size only."""
    if split not in splits_lib.EVAL_SPLITS:
      raise ValueError(f'split={split!r} must be one of '
                       f'{splits_lib.EVAL_SPLITS}.')
    return -(-self.sizes[split] // self.batch_size)

  def eval_rows(self, split, step):
    """Per local device, the positions of evaluation batch `step` (fewer
    than `per_shard_batch`, maybe none, in the padded last batch)."""
    b = self.batch_size
    return self._local_rows(
        np.arange(step * b, min((step + 1) * b, self.sizes[split])))

  def local_share(self, positions):
    """This process's part of `positions` when every device takes an equal
    contiguous part of them (e.g. the records the statistics read)."""
    n, k = len(positions), self.num_shards
    return [positions[i * n // k:(i + 1) * n // k]
            for i in self.shard_indices]
