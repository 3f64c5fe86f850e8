"""The input pipeline: uint8 batches of a tfds dataset, in a reproducible order.

`Pipeline` serves this process's part of every global batch: training
batches in the order the `sampler.Sampler` gives (a pure function of seed,
epoch and step, so resume and multi-host equality follow), evaluation
batches covering every example once (padded, masked), and the training
split's normalisation statistics. The examples come from one of two
storages (`storage.py`): decoded in host memory, or streamed from ArrayRecord
files by worker processes. Raw uint8 images and int32 labels leave here;
normalisation and augmentation run on the device (`augment.py`).

With `config.mock_data`, tfds' mock ignores split slicing: every split
holds the same `config.mock_num_examples` random examples.
Good for smoke runs only.
"""

from typing import Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from perceiver_jax import config_lib
from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.data import memory
from perceiver_jax.data import sampler as sampler_lib
from perceiver_jax.data import splits as splits_lib
from perceiver_jax.data import storage as storage_lib
from perceiver_jax.data import streaming


def _splits(data_builder, config):
  """`{split: (tfds split, start, stop)}` (see splits.py)."""
  if config.mock_data:
    n = config.mock_num_examples
    return {s: ('test' if s == 'test' else 'train', 0, n)
            for s in splits_lib.SPLITS}
  test_split = splits_lib.held_out_split(
      config_lib.option(config, 'test_split'), data_builder.name,
      data_builder.info.splits.keys())
  splits = datasets.check_splits(data_builder, test_split)
  return splits_lib.split_ranges(
      splits['train'].num_examples, splits[test_split].num_examples,
      config.validation_split, data_builder.name, test_split)


def steps_per_epoch(config, data_builder):
  """The train steps of an epoch, from the dataset's metadata alone (no
  record is read): those a `Pipeline` of `config` takes."""
  return sampler_lib.Sampler(_splits(data_builder, config), 1, [0],
                             config.batch_size, config.seed).steps_per_epoch


def _sum_over_processes(x):
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


class Pipeline:
  """This process's shards of train / validation / test.

  Args:
    config: the run's config.
    num_shards: the global number of shards (devices).
    shard_indices: the shards this process reads (its devices' positions).
    data_builder: the prepared dataset's tfds builder
      (`datasets.prepare`), where the caller has it already.
  """

  def __init__(self, config, *, num_shards: int,
               shard_indices: Sequence[int], data_builder=None):
    if data_builder is None:
      data_builder = datasets.builder(config)
    self.info = datasets.dataset_info(data_builder, config)
    self.sampler = sampler_lib.Sampler(
        _splits(data_builder, config), num_shards, shard_indices,
        config.batch_size, config.seed)
    if jax.process_count() > 1:  # Same dataset everywhere, or fail loudly.
      sizes = np.array([self.sampler.sizes[s] for s in splits_lib.SPLITS])
      if not (multihost_utils.process_allgather(sizes) == sizes).all():
        raise RuntimeError('Processes disagree on the split sizes; do they '
                           'read the same prepared dataset?')
    self.host_crop = config_lib.option(config, 'host_crop')
    transform = host_transforms.HostTransform.from_config(config, self.info)
    self.storage = storage_lib.choose(
        config, self.info, sum(self.sampler.sizes.values()), self.host_crop)
    if self.storage == 'memory':
      self._source = memory.MemoryStorage(data_builder, config, self.sampler,
                                          transform)
    else:
      self._source = streaming.StreamingStorage(
          data_builder, config, self.sampler, transform,
          storage_lib.num_workers(config),
          automatic=config_lib.option(config, 'data_workers') == -1)
    self._num_epochs = config.num_epochs
    self._stats_examples = config_lib.option(config, 'normalization_examples')
    self.steps_per_epoch = self.sampler.steps_per_epoch
    self.shard_indices = self.sampler.shard_indices
    self.per_shard_batch = self.sampler.per_shard_batch
    self.local_batch_size = self.per_shard_batch * len(
        self.sampler.shard_indices)
    self.num_train_examples = self.sampler.num_examples('train')
    self.num_validation_examples = self.sampler.num_examples('validation')
    self.num_test_examples = self.sampler.num_examples('test')

  def train_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `step` of `epoch`."""
    return self._source.train_batch(epoch, step)

  def train_batches(self, epoch: int, first_step: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The batches from (`epoch`, `first_step`) to the end of training.

    Streaming prefetches them in worker processes; the iterator is closed
    by `close()` if training stops early.
    """
    if self.storage == 'stream':
      return self._source.train_batches(epoch, first_step, self._num_epochs)
    return (self._source.train_batch(e, s)
            for e in range(epoch, self._num_epochs)
            for s in range(first_step if e == epoch else 0,
                           self.steps_per_epoch))

  def num_eval_steps(self, split: str) -> int:
    return self.sampler.num_eval_steps(split)

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in order; padding rows have mask 0."""
    if self.storage == 'stream':
      return self._source.eval_batches(split)
    return (self._source.eval_batch(split, step)
            for step in range(self.sampler.num_eval_steps(split)))

  def _stats_positions(self):
    """This process's share of the training positions the statistics use.

    All of them, or `normalization_examples` evenly spaced over the split;
    each device's share is one contiguous part (`Sampler.local_share`).
    """
    n, k = self.num_train_examples, self._stats_examples
    chosen = (np.arange(n) if not k or k >= n else (np.arange(k) * n) // k)
    return np.concatenate(self.sampler.local_share(chosen)), len(chosen)

  def normalization_stats(self) -> dict[str, np.ndarray]:
    """Per-channel mean and population variance of the training images.

    Like Keras' Normalization.adapt, over the images as the model sees them
    in evaluation (stored, or resized and centre-cropped); over all of the
    training split, or `normalization_examples` evenly spaced examples.
    Sums from `host_transforms.moment_sums` (which says when they are
    exact). A collective when there are several processes: call it on all
    of them.
    """
    positions, expected = self._stats_positions()
    count, total, total_sq = _sum_over_processes(
        self._source.stats_sums(positions))
    pixels = self.info.height * self.info.width
    if count[0] != expected * pixels:
      raise RuntimeError(
          f'Statistics saw {count[0] // pixels} of {expected} train '
          'examples: some shards are owned by no process (or by several).')
    mean = total / count
    return {'mean': mean, 'variance': total_sq / count - np.square(mean)}

  def close(self):
    """Stops any worker processes and releases their shared memory."""
    self._source.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
