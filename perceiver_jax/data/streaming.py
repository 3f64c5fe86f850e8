"""Streaming storage: records read from ArrayRecord files as batches are needed.

For data larger than host memory (ImageNet: 1.28M JPEGs, ~140 GB). grain
runs the host work in worker processes: each worker reads the records of
whole batches through `tfds` random access, decodes and crops them
(`host_transforms`) and hands back uint8 arrays; grain returns the batches
in order. Which records form a batch is decided by the `sampler.Sampler`,
a pure function of (seed, epoch, step), so a resumed run needs no iterator
state and 2 processes x 2 devices read what 1 x 4 reads. Host memory stays
bounded by the batches in flight, whatever the dataset's size.

Workers are spawned processes that import this module, numpy, Pillow and
tfds, never jax, so they cannot re-initialise `jax.distributed`. The
training iterator spans every remaining epoch, each evaluation pass has its
own; closing them (when a pass is done, or the pipeline closes as the run
stops) releases the workers and their shared memory.
"""

import dataclasses
import functools
import os
import threading
import time
from typing import Any

from absl import flags
import grain
from grain._src.python.ipc import shared_memory_array
import numpy as np

from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.data import splits as splits_lib

_PARENT_POLL_S = 0.5


def _close(iterator):
  """Stops a grain iterator's worker processes and frees its buffers."""
  if hasattr(iterator, 'close'):
    iterator.close()


def _exit_with_parent(worker_index, worker_count):
  """Ends this worker process soon after the training process ends.

  Normal exits stop the workers; a training process killed outright
  (SIGKILL, out of memory) cannot, so each worker watches for being
  re-parented and exits then, instead of lingering with the job's files
  and memory.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True).start()


def _finish_shared_memory_release():
  """Waits until grain has unlinked the shared memory of returned batches.

  grain frees a batch's shared memory in a background thread once the batch
  is garbage; a process that exits right after its last batch would leave
  the last few behind (the resource tracker then warns). Waiting here, and
  freeing synchronously from now on, leaves none. grain has no public call
  for this; the version is pinned in requirements.txt and
  tests/data/test_streaming.py checks a run leaves nothing behind.
  """
  arrays = shared_memory_array.SharedMemoryArray
  pool = arrays._del_thread_pool  # pylint: disable=protected-access
  if pool is not None:
    arrays._disable_async_del()  # pylint: disable=protected-access
    pool.close()
    pool.join()


@dataclasses.dataclass(frozen=True)
class _Reader:
  """Loads whole batches; pickled to each worker process.

  Attributes:
    sources: `{split: tfds data source}` (random access, picklable).
    sampler: the `sampler.Sampler`.
    transform: the `host_transforms.HostTransform`.
  """
  sources: Any
  sampler: Any
  transform: host_transforms.HostTransform

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
        images.append(self.transform.train(record['image'], seed, epoch,
                                           int(index)))
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
        images[k * b + j] = self.transform.eval(record['image'])
        labels[k * b + j] = record['label']
        mask[k * b + j] = 1.0
    return {'image': images, 'label': labels, 'mask': mask}

  def stats_sums(self, indices):
    """`host_transforms.moment_sums` over the evaluation views of the
    training records `indices` (tfds 'train' indices)."""
    c = self.transform.channels
    sums = np.zeros((3, c), np.float64)
    for index in indices:
      sums += host_transforms.moment_sums(
          self.transform.eval(self.sources['train'][int(index)]['image']), c)
    return sums


class StreamingStorage:
  """Batches read, decoded and cropped by grain worker processes.

  Args:
    data_builder: the tfds builder (prepared as ArrayRecord).
    config: the run's config (`data_workers`: worker processes, 0 to read in
      this process).
    sampler: the `sampler.Sampler`.
    transform: the `host_transforms.HostTransform`.
    num_workers: worker processes per host (0: read in this process).
  """

  def __init__(self, data_builder, config, sampler, transform, num_workers):
    sources = {split: datasets.data_source(data_builder,
                                           sampler.tfds_split(split), config)
               for split in splits_lib.SPLITS}
    self._reader = _Reader(sources, sampler, transform)
    # grain reads its absl flags; outside `app.run` (tests, notebooks) they
    # are not parsed yet, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    self._sampler = sampler
    self._num_workers = num_workers
    self._open = []

  def _iterate(self, dataset: grain.MapDataset):
    """Elements of `dataset` in order, prefetched by the workers."""
    it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0))
    if self._num_workers:
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._num_workers, per_worker_buffer_size=2),
                          worker_init_fn=_exit_with_parent)
    iterator = iter(it)
    self._open.append(iterator)
    try:
      yield from iterator
    finally:
      _close(iterator)
      if iterator in self._open:
        self._open.remove(iterator)

  def train_batch(self, epoch, step):
    return self._reader.train_batch(epoch * self._sampler.steps_per_epoch +
                                    step)

  def train_batches(self, epoch, first_step, num_epochs):
    """Batches from (`epoch`, `first_step`) to the end of `num_epochs`."""
    spe = self._sampler.steps_per_epoch
    return self._iterate(grain.MapDataset.range(
        epoch * spe + first_step, num_epochs * spe).map(
            self._reader.train_batch))

  def eval_batches(self, split):
    steps = grain.MapDataset.range(self._sampler.num_eval_steps(split))
    return self._iterate(steps.map(
        functools.partial(self._reader.eval_batch, split)))

  def stats_sums(self, positions: np.ndarray):
    """Summed `_Reader.stats_sums` over the training records at `positions`
    (within the split), in chunks read by the workers."""
    flat = self._sampler.tfds_indices('train', positions)
    chunks = [flat[i:i + 64] for i in range(0, len(flat), 64)]
    total = np.zeros((3, self._reader.transform.channels), np.float64)
    for sums in self._iterate(grain.MapDataset.source(chunks).map(
        self._reader.stats_sums)):
      total += sums
    return total

  def close(self):
    for iterator in self._open:
      _close(iterator)
    self._open.clear()
    _finish_shared_memory_release()
