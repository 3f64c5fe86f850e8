"""Streaming storage: records read from ArrayRecord files as batches are needed.

For data larger than host memory (ImageNet: 1.28M JPEGs, ~140 GB). grain's
worker processes (`grain_workers.py`) read the records of whole batches
through `tfds` random access, decode and crop them (`host_transforms`) and
hand back uint8 arrays, in order. Which records form a batch is decided by
the `sampler.Sampler`, a pure function of (seed, epoch, step), so a resumed
run needs no iterator state and 2 processes x 2 devices read what 1 x 4
reads. Host memory stays bounded by the batches in flight, whatever the
dataset's size.

Every request is a key (`_Reader.__call__`). One set of workers at a time
serves the run: one grain iterator over the keys the run is expected to ask
for from the first one (`_Plan`: the rest of the epoch, its validation
pass, the next epochs with theirs, the test), so an epoch flows into its
validation and back without new processes. A key the plan did not predict
(the test after early stopping, a resumed run) closes that iterator and
opens one from it. The statistics, before training, have their own
iterator, closed before the run's opens.

The batches in flight wait in shared memory (`/dev/shm`); `worker_count`
checks there is room for them before anything is compiled.
"""

import bisect
import dataclasses
import functools
import itertools
import logging
from typing import Any

import grain
import numpy as np

from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import grain_workers
from perceiver_jax.data import host_transforms
from perceiver_jax.data import records
from perceiver_jax.data import splits as splits_lib

_STATS_CHUNK = 64  # Training records per statistics task.


def _size(n):
  if n >= 2**30:
    return f'{n / 2**30:.1f} GiB'
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n:,} bytes'


def worker_count(requested, automatic, batch_bytes, free, directory):
  """The workers to start, given `free` bytes in the shared memory
  `directory` (None: unknown, nothing checked).

  Args:
    requested: workers wanted (`storage.num_workers`).
    automatic: whether that was `data_workers=-1`: then fewer workers are
      started when not all fit (and it is logged); when set by hand, or when
      not even one fits, an InputError says what to change.
    batch_bytes: shared memory one of this process's batches takes
      (`grain_workers.page_bytes` of each array, summed).
    free: free bytes in `directory` (`grain_workers.free_bytes`).
    directory: where grain's shared memory lives.
  """
  need = grain_workers.buffer_bytes(requested, batch_bytes)
  if not requested or free is None or need <= free:
    return requested
  fits = requested
  while fits and grain_workers.buffer_bytes(fits, batch_bytes) > free:
    fits -= 1
  why = (f'{requested} streaming workers (config.data_workers) need up to '
         f'{_size(need)} in {directory} for the batches in flight '
         f'({grain_workers.IN_FLIGHT_PER_WORKER} per worker and '
         f'{grain_workers.HELD} in use, {_size(batch_bytes)} each), and it '
         f'has {_size(free)} free')
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
class _Keys:
  """A sequence of keys, lazily: `segments` of (kind, first, stop) stand
  for (kind, first), ..., (kind, stop - 1). Pickled to each worker (grain's
  `MapDataset.source`), so it stays small however long the run."""
  segments: tuple

  @functools.cached_property
  def _ends(self):
    return tuple(itertools.accumulate(stop - first
                                      for _, first, stop in self.segments))

  def __len__(self):
    return self._ends[-1] if self.segments else 0

  def __getitem__(self, i):
    ends = self._ends
    if not 0 <= i < len(self):
      raise IndexError(i)
    k = bisect.bisect_right(ends, i)
    kind, first, stop = self.segments[k]
    return kind, first + i - (ends[k] - (stop - first))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The keys a training run asks for, in order."""
  steps_per_epoch: int
  num_epochs: int
  validation_steps: int
  test_steps: int

  def _epoch(self, epoch, first_step=0):
    spe = self.steps_per_epoch
    return [('train', epoch * spe + first_step, (epoch + 1) * spe),
            ('validation', 0, self.validation_steps)]

  def keys_from(self, key, epoch):
    """The keys from `key` on (`_Keys`); `epoch`: that of the last training
    batch asked for (None: none yet), which a validation pass follows."""
    kind, n = key
    segments = []
    if kind == 'train':
      epoch, step = divmod(n, self.steps_per_epoch)
      segments += self._epoch(epoch, step)
    elif kind == 'validation':
      segments.append(('validation', n, self.validation_steps))
    if kind == 'train' or (kind == 'validation' and epoch is not None):
      for e in range(epoch + 1, self.num_epochs):
        segments += self._epoch(e)
      n = 0
    if kind != 'validation' or epoch is not None:
      segments.append(('test', n, self.test_steps))
    return _Keys(tuple(s for s in segments if s[2] > s[1]))


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """Statistics keys: ('stats', up to `_STATS_CHUNK` training record
  indices) covering `indices`; a small sequence to pickle to the workers."""
  indices: np.ndarray

  def __len__(self):
    return -(-len(self.indices) // _STATS_CHUNK)

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    chunk = self.indices[i * _STATS_CHUNK:(i + 1) * _STATS_CHUNK]
    return 'stats', tuple(int(j) for j in chunk)


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


class _Run:
  """The run's grain iterator over `keys`, and how far it has come."""

  def __init__(self, keys, iterator):
    self.keys, self.iterator, self.position = keys, iterator, 0

  def expects(self, key):
    return self.position < len(self.keys) and self.keys[self.position] == key

  def next(self):
    self.position += 1
    return next(self.iterator)


class StreamingStorage:
  """Batches read, decoded and cropped by grain worker processes.

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
    self._run = None
    if num_workers:
      rows = sampler.per_shard_batch * len(sampler.shard_indices)
      # An evaluation batch: uint8 images, int32 labels, float32 masks.
      batch_bytes = (grain_workers.page_bytes(
          rows * transform.height * transform.width * transform.channels)
                     + 2 * grain_workers.page_bytes(4 * rows))
      num_workers = worker_count(num_workers, automatic, batch_bytes,
                                 grain_workers.free_bytes(),
                                 grain_workers.SHM_DIR)
    self._num_workers = num_workers

  def _iterate(self, keys):
    return grain_workers.open_iterator(
        grain.MapDataset.source(keys).map(self._reader),
        min(self._num_workers, len(keys)))

  def _close_run(self):
    if self._run is not None:
      grain_workers.close(self._run.iterator)
      self._run = None

  def _get(self, key):
    if not self._num_workers:
      return self._reader(key)
    if key[0] == 'train':
      self._epoch = key[1] // self._sampler.steps_per_epoch
    if self._run is None or not self._run.expects(key):
      self._close_run()  # Never two sets of workers at once.
      keys = self._plan.keys_from(key, self._epoch)
      self._run = _Run(keys, self._iterate(keys))
    try:
      return self._run.next()
    except Exception:
      self._close_run()  # A worker's error ends its iterator.
      raise

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
    keys = _Chunks(self._sampler.tfds_indices('train', positions))
    total = np.zeros((3, self._reader.transform.channels), np.float64)
    self._close_run()  # Never two sets of workers at once.
    iterator = self._iterate(keys)
    try:
      for sums in iterator:
        total += sums
    finally:
      grain_workers.close(iterator)
    return total

  def close(self):
    """Stops the workers and frees their shared memory."""
    self._close_run()
