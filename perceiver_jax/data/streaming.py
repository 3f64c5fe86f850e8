"""Streaming storage: records read from ArrayRecord files as batches are needed.

For data larger than host memory (ImageNet: 1.28M JPEGs, ~140 GB). Worker
processes (`workers.Pool`) read the records of whole batches through `tfds`
random access, decode and crop them (`host_transforms`) and hand back uint8
arrays, in order. Which records form a batch is decided by the
`sampler.Sampler`, a pure function of (seed, epoch, step), so a resumed run
needs no iterator state and 2 processes x 2 devices read what 1 x 4 reads.
Host memory stays bounded by the batches in flight, whatever the dataset's
size.

One pool serves the whole run: training, every validation pass, the test
and the statistics. Each request is a key (`_Reader.__call__`); the pool
reads ahead the keys a training run asks for next (`_Plan`: the rest of
the epoch, its validation pass, the next epoch, ..., the test), so an epoch
flows into its validation and back without a pause, and anything else (a
resumed run, early stopping) costs only the read-ahead. Workers import this
module, numpy, Pillow and tfds, never jax (so never `jax.distributed`).

The workers' results wait in shared memory (`/dev/shm`); `worker_count`
checks there is room for them before anything is compiled.
"""

import dataclasses
import logging
from typing import Any

import numpy as np

from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.data import records
from perceiver_jax.data import splits as splits_lib
from perceiver_jax.data import workers as workers_lib

_STATS_CHUNK = 64  # Training records per statistics task.


def _size(n):
  if n >= 2**30:
    return f'{n / 2**30:.1f} GiB'
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n:,} bytes'


def worker_count(requested, automatic, batch_bytes, free, directory):
  """The workers to start, given `free` bytes in the buffer `directory`.

  Args:
    requested: workers wanted (`storage.num_workers`).
    automatic: whether that was `data_workers=-1`: then fewer workers are
      started when not all fit (and it is logged); when set by hand, or when
      not even one fits, an InputError says what to change.
    batch_bytes: bytes of one of this process's batches.
    free: free bytes in `directory` (`workers.free_bytes`).
    directory: where the results wait (`workers.buffer_dir`).
  """
  if not requested or workers_lib.buffer_bytes(requested, batch_bytes) <= free:
    return requested
  fits = requested
  while fits and workers_lib.buffer_bytes(fits, batch_bytes) > free:
    fits -= 1
  need = workers_lib.buffer_bytes(requested, batch_bytes)
  why = (f'{requested} streaming workers (config.data_workers) need up to '
         f'{_size(need)} in {directory} for the batches in flight '
         f'({workers_lib.RESULTS_PER_WORKER} per worker and '
         f'{workers_lib.HELD_RESULTS} in use, {_size(batch_bytes)} each), and '
         f'it has {_size(free)} free')
  if automatic and fits:
    logging.warning('%s: starting %d workers instead. For all of them give it '
                    'more room (a container: docker run --shm-size=%dg).',
                    why, fits, -(-need // 2**30) + 1)
    return fits
  raise errors.InputError(
      f'{why}. Give it more room (a container: `docker run '
      f'--shm-size={-(-need // 2**30) + 1}g`), or pass fewer workers '
      + (f'(--config.data_workers={fits} fits) ' if fits else
         '(--config.data_workers=0 reads in the training process) ')
      + 'or a smaller --config.batch_size.')


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The keys a training run asks for, in order (main process only)."""
  steps_per_epoch: int
  num_epochs: int
  validation_steps: int
  test_steps: int

  def _epoch(self, epoch, first_step=0):
    spe = self.steps_per_epoch
    yield from (('train', epoch * spe + s) for s in range(first_step, spe))
    yield from (('validation', j) for j in range(self.validation_steps))

  def after(self, key, epoch):
    """The keys expected after `key`; `epoch`: that of the last training
    batch asked for (None: none yet), which a validation pass follows."""
    kind, n = key
    if kind == 'train':
      epoch, step = divmod(n, self.steps_per_epoch)
      yield from self._epoch(epoch, step + 1)
    elif kind == 'validation':
      yield from (('validation', j)
                  for j in range(n + 1, self.validation_steps))
      if epoch is None:
        return
    if kind in ('train', 'validation'):
      for e in range(epoch + 1, self.num_epochs):
        yield from self._epoch(e)
      n = -1
    if kind in ('train', 'validation', 'test'):
      yield from (('test', j) for j in range(n + 1, self.test_steps))


@dataclasses.dataclass(frozen=True)
class _Reader:
  """Loads whole batches; pickled to each worker process.

  Attributes:
    sources: `{split: tfds data source}` (random access, picklable).
    sampler: the `sampler.Sampler`.
    transform: the `host_transforms.HostTransform`.
    where: `{split: records.Where}`, to name a record that does not decode.
  """
  sources: Any
  sampler: Any
  transform: host_transforms.HostTransform
  where: Any

  def __call__(self, key):
    """The result of a `StreamingStorage` key: ('train', global step),
    (eval split, step) or ('stats', training record indices)."""
    kind, arg = key
    if kind == 'train':
      return self.train_batch(arg)
    if kind == 'stats':
      return self.stats_sums(arg)
    return self.eval_batch(kind, arg)

  def _decoded(self, decode, split, record, index, *args):
    return records.decoded(decode, record, self.where[split], index, *args)

  def _shape(self):
    t = self.transform
    return (t.height, t.width, t.channels)

  def train_batch(self, global_step):
    """This process's part of the batch of global step `global_step`."""
    epoch, step = divmod(int(global_step), self.sampler.steps_per_epoch)
    source, seed = self.sources['train'], self.sampler.seed
    images, labels = [], []
    for rows in self.sampler.train_rows(epoch, step):
      for index in self.sampler.tfds_indices('train', rows):
        record = source[int(index)]
        images.append(self._decoded(self.transform.train, 'train', record,
                                    int(index), seed, epoch, int(index)))
        labels.append(record['label'])
    return {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}

  def eval_batch(self, split, step):
    b, source = self.sampler.per_shard_batch, self.sources[split]
    images = np.zeros((b * len(self.sampler.shard_indices),) + self._shape(),
                      np.uint8)
    labels = np.zeros(len(images), np.int32)
    mask = np.zeros(len(images), np.float32)
    for k, rows in enumerate(self.sampler.eval_rows(split, step)):
      for j, index in enumerate(self.sampler.tfds_indices(split, rows)):
        record = source[int(index)]
        images[k * b + j] = self._decoded(self.transform.eval, split, record,
                                          int(index))
        labels[k * b + j] = record['label']
        mask[k * b + j] = 1.0
    return {'image': images, 'label': labels, 'mask': mask}

  def stats_sums(self, indices):
    """`host_transforms.moment_sums` over the evaluation views of the
    training records `indices` (tfds 'train' indices)."""
    c = self.transform.channels
    sums = np.zeros((3, c), np.float64)
    for index in indices:
      record = self.sources['train'][int(index)]
      sums += host_transforms.moment_sums(
          self._decoded(self.transform.eval, 'train', record, int(index)), c)
    return sums


class StreamingStorage:
  """Batches read, decoded and cropped by worker processes.

  Args:
    data_builder: the tfds builder (prepared as ArrayRecord).
    config: the run's config.
    sampler: the `sampler.Sampler`.
    transform: the `host_transforms.HostTransform`.
    num_workers: worker processes per host (0: read in this process).
    automatic: whether `num_workers` was chosen automatically (may be
      lowered to fit the shared memory, see `worker_count`).
  """

  def __init__(self, data_builder, config, sampler, transform, num_workers,
               automatic=False):
    sources, where = {}, {}
    for split in splits_lib.SPLITS:
      tfds_split = sampler.tfds_split(split)
      sources[split] = datasets.data_source(data_builder, tfds_split, config)
      where[split] = records.Where(data_builder.name, split, tfds_split)
    self._reader = _Reader(sources, sampler, transform, where)
    self._sampler = sampler
    self._plan = _Plan(sampler.steps_per_epoch, config.num_epochs,
                       sampler.num_eval_steps('validation'),
                       sampler.num_eval_steps('test'))
    self._epoch = None  # Of the last training batch asked for.
    self._pool = None
    if num_workers:
      rows = sampler.per_shard_batch * len(sampler.shard_indices)
      # uint8 images, int32 labels, float32 masks.
      batch_bytes = rows * (transform.height * transform.width *
                            transform.channels + 8)
      directory = workers_lib.buffer_dir()
      num_workers = worker_count(num_workers, automatic, batch_bytes,
                                 workers_lib.free_bytes(directory), directory)
      self._pool = workers_lib.Pool(self._reader, num_workers)

  def _get(self, key):
    if self._pool is None:
      return self._reader(key)
    if key[0] == 'train':
      self._epoch = key[1] // self._sampler.steps_per_epoch
    epoch = self._epoch
    return self._pool.get(key, lambda: self._plan.after(key, epoch))

  def train_batch(self, epoch, step):
    return self._reader(('train', epoch * self._sampler.steps_per_epoch +
                         step))

  def train_batches(self, epoch, first_step, num_epochs):
    """Batches from (`epoch`, `first_step`) to the end of `num_epochs`."""
    spe = self._sampler.steps_per_epoch
    for global_step in range(epoch * spe + first_step, num_epochs * spe):
      yield self._get(('train', global_step))

  def eval_batches(self, split):
    for step in range(self._sampler.num_eval_steps(split)):
      yield self._get((split, step))

  def stats_sums(self, positions: np.ndarray):
    """Summed `_Reader.stats_sums` over the training records at `positions`
    (within the split), in chunks read by the workers."""
    flat = self._sampler.tfds_indices('train', positions)
    keys = [('stats', tuple(int(i) for i in flat[i:i + _STATS_CHUNK]))
            for i in range(0, len(flat), _STATS_CHUNK)]
    results = (self._reader(key) for key in keys) if self._pool is None else (
        self._pool.map(keys))
    total = np.zeros((3, self._reader.transform.channels), np.float64)
    for sums in results:
      total += sums
    return total

  def close(self):
    """Stops the workers and frees their shared memory."""
    if self._pool is not None:
      self._pool.close()
