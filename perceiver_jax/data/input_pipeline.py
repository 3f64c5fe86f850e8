"""Host-memory input pipeline over a tfds image classification dataset.

Each process decodes only its own shards of the three splits into numpy once
(CIFAR-sized splits fit in memory) and serves raw uint8 images and int32
labels; augmentation and normalisation run on the device (`augment`).

Shards are per device, not per process: the global batch is the concatenation
of every device's per-shard batch, and the rows of shard i at (epoch, step)
are a pure function of (seed, epoch, step, i). So the global batch does not
depend on how devices are spread over processes, and a resumed run continues
at the next batch without iterator state.

Which tfds examples form each split and each shard: `splits.py`.

With `config.mock_data`, tfds' mock ignores split slicing: every shard of
every split holds the same `config.mock_num_examples` random examples.
Good for smoke runs only.
"""

import contextlib
import dataclasses
import difflib
from typing import Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from perceiver_jax import errors
from perceiver_jax.data import splits as splits_lib

_READ_BATCH = 1024  # Examples per tf.data batch while decoding into memory.
_STATS_CHUNK = 4096  # Images per float64 chunk in normalization_stats.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the logs need to know about the dataset."""
  name: str
  height: int
  width: int
  channels: int
  num_classes: int
  class_names: tuple[str, ...]
  version: str = ''  # The tfds version of the prepared data.


def _builder(config):
  """Returns the tfds builder after checking the data dir and the name."""
  data_dir = config.get('tfds_data_dir')
  if data_dir is not None:
    try:
      tf.io.gfile.listdir(data_dir)  # Fails unless an existing, readable dir.
    except (tf.errors.OpError, OSError) as e:
      raise errors.InputError(
          f'config.tfds_data_dir={data_dir!r} is not a readable directory '
          f'({e}); create it (mkdir -p) or pass an existing tfds data dir.'
      ) from None
  try:
    return tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(config.dataset, tfds.list_builders())
    hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
    raise errors.InputError(
        f'config.dataset={config.dataset!r} is not a tfds dataset.{hint} Pass '
        'a name from tfds.list_builders(), e.g. --config.dataset=cifar100.'
    ) from None


def _dataset_info(builder, config):
  """Checks the features the pipeline relies on and summarises them."""
  features = builder.info.features
  image = features['image'] if 'image' in features.keys() else None
  label = features['label'] if 'label' in features.keys() else None
  if (not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8
      or not isinstance(label, tfds.features.ClassLabel)):
    raise errors.InputError(
        f'config.dataset={config.dataset!r} must have an `image` feature '
        '(tfds.features.Image, uint8) and a `label` feature '
        f'(tfds.features.ClassLabel); it has {sorted(features.keys())}. Pick '
        'an image classification dataset such as cifar100 or mnist.')
  height, width, channels = image.shape
  if height is None or width is None:  # Variable size: resized on load.
    height = width = config.image_size
  return DatasetInfo(
      name=builder.name, height=height, width=width, channels=channels,
      num_classes=label.num_classes, class_names=tuple(label.names),
      version=str(builder.info.version))


def get_dataset_info(config) -> DatasetInfo:
  """Validates the dataset config cheaply and describes the dataset.

  Class names are the real ones once the dataset is prepared (CIFAR's come
  from the archive); before that tfds may only know '0', '1', ...
  """
  return _dataset_info(_builder(config), config)


def prepare(config) -> None:
  """Downloads and prepares the dataset on first use (no-op when prepared).

  Process 0 goes first so the download happens once on a shared data dir;
  the others then prepare too, which is a no-op on a shared dir and needed
  on local disks.
  """
  _builder(config)  # Validate before anyone downloads.
  if config.mock_data:
    return
  if jax.process_index() == 0:
    _builder(config).download_and_prepare()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('perceiver_jax.input_pipeline.prepare')
    if jax.process_index() != 0:
      _builder(config).download_and_prepare()


def _shard_bounds(builder, config, num_shards):
  """{split: (tfds split, [(start, stop)] per shard)}, see the module doc."""
  if config.mock_data:
    n = config.mock_num_examples
    return {s: ('test' if s == 'test' else 'train', [(0, n)] * num_shards)
            for s in splits_lib.SPLITS}
  splits = builder.info.splits
  missing = {'train', 'test'} - set(splits.keys())
  if missing:
    raise errors.InputError(
        f'Dataset {builder.name!r} at {builder.data_dir} has splits '
        f'{sorted(splits.keys())}; the pipeline needs train and test (missing '
        f'{sorted(missing)}). Run prepare(config) first, or pick another '
        'dataset.')
  ranges = splits_lib.split_ranges(
      splits['train'].num_examples, splits['test'].num_examples,
      config.validation_split, builder.name)
  return {split: (tfds_split, splits_lib.shard_ranges(start, stop, num_shards))
          for split, (tfds_split, start, stop) in ranges.items()}


def _read(builder, tfds_split, start, stop, info):
  """Decodes examples [start, stop) of a tfds split into uint8/int32 arrays."""
  images = [np.zeros((0, info.height, info.width, info.channels), np.uint8)]
  labels = [np.zeros((0,), np.int32)]
  if stop > start:
    ds = builder.as_dataset(
        split=tfds.core.ReadInstruction(
            tfds_split, from_=start, to=stop, unit='abs'),
        shuffle_files=False,
        # Read files one after the other: stored order, not interleaved.
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
        decoders=tfds.decode.PartialDecoding({'image': True, 'label': True}))
    resize = builder.info.features['image'].shape[:2] != (
        info.height, info.width)

    def select(example):
      image = example['image']
      if resize:
        image = tf.image.resize(image, (info.height, info.width), 'bilinear')
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image, tf.cast(example['label'], tf.int32)

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    for x, y in tfds.as_numpy(ds.batch(_READ_BATCH)):
      images.append(x)
      labels.append(y)
  return np.concatenate(images), np.concatenate(labels)


def _sum_over_processes(x):
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


class Pipeline:
  """This process's shards of train / validation / test, in host memory."""

  def __init__(self, config, *, num_shards: int,
               shard_indices: Sequence[int]):
    shard_indices = tuple(int(i) for i in shard_indices)
    if (not shard_indices or len(set(shard_indices)) != len(shard_indices)
        or not all(0 <= i < num_shards for i in shard_indices)):
      raise ValueError(f'shard_indices={shard_indices} must be distinct '
                       f'indices in [0, {num_shards}).')
    if config.batch_size % num_shards:
      raise errors.InputError(
          f'config.batch_size={config.batch_size} is not a multiple of the '
          f'number of shards ({num_shards}).')
    self.num_shards = num_shards
    self.shard_indices = shard_indices
    self.per_shard_batch = config.batch_size // num_shards
    self.local_batch_size = self.per_shard_batch * len(shard_indices)
    self._seed = config.seed

    mock = (tfds.testing.mock_data(num_examples=config.mock_num_examples)
            if config.mock_data else contextlib.nullcontext())
    with mock:
      builder = _builder(config)
      self.info = _dataset_info(builder, config)
      bounds = _shard_bounds(builder, config, num_shards)
      # Global shard sizes, known without reading other processes' shards.
      self._sizes = {s: np.array([b - a for a, b in bounds[s][1]])
                     for s in splits_lib.SPLITS}
      self._data = {}  # split -> [(images, labels)] per local shard.
      for split, (tfds_split, shard_ranges) in bounds.items():
        self._data[split] = [_read(builder, tfds_split, *shard_ranges[i],
                                   self.info) for i in shard_indices]
    for split in splits_lib.SPLITS:
      got = [len(y) for _, y in self._data[split]]
      want = self._sizes[split][list(shard_indices)].tolist()
      if got != want:
        raise RuntimeError(f'Read {got} {split} examples for shards '
                           f'{shard_indices}, expected {want}.')
    if jax.process_count() > 1:  # Same dataset everywhere, or fail loudly.
      sizes = np.stack([self._sizes[s] for s in splits_lib.SPLITS])
      if not (multihost_utils.process_allgather(sizes) == sizes).all():
        raise RuntimeError('Processes disagree on the split sizes; do they '
                           'read the same prepared dataset?')

    self.steps_per_epoch = int(min(self._sizes['train']) //
                               self.per_shard_batch)
    if self.steps_per_epoch == 0:
      raise errors.InputError(
          f'config.batch_size={config.batch_size} is too large: each of the '
          f'{num_shards} shards needs {self.per_shard_batch} train examples '
          f'per step but the smallest has {min(self._sizes["train"])}. Use a '
          'smaller batch size.')
    self.num_train_examples = int(self._sizes['train'].sum())
    self.num_validation_examples = int(self._sizes['validation'].sum())
    self.num_test_examples = int(self._sizes['test'].sum())

  def train_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `step` of `epoch`.

    Shard i's epoch is a permutation seeded by (seed, epoch, i); the last
    `size % per_shard_batch` examples of each permutation sit the epoch out.
    """
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f'step {step} not in [0, {self.steps_per_epoch}).')
    b = self.per_shard_batch
    images, labels = [], []
    for i, (x, y) in zip(self.shard_indices, self._data['train']):
      perm = np.random.default_rng([self._seed, epoch, i]).permutation(len(y))
      rows = perm[step * b:(step + 1) * b]
      images.append(x[rows])
      labels.append(y[rows])
    return {'image': np.concatenate(images), 'label': np.concatenate(labels)}

  def num_eval_steps(self, split: str) -> int:
    """Batches that cover the largest shard; the same on every process."""
    return -(-int(max(self._eval_sizes(split))) // self.per_shard_batch)

  def _eval_sizes(self, split):
    if split not in splits_lib.EVAL_SPLITS:
      raise ValueError(f'split={split!r} must be one of '
                       f'{splits_lib.EVAL_SPLITS}.')
    return self._sizes[split]

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in order; padding rows have mask 0."""
    b = self.per_shard_batch
    for step in range(self.num_eval_steps(split)):
      images, labels, masks = [], [], []
      for x, y in self._data[split]:
        x, y = x[step * b:(step + 1) * b], y[step * b:(step + 1) * b]
        pad = b - len(y)
        images.append(np.pad(x, [(0, pad)] + [(0, 0)] * 3))
        labels.append(np.pad(y, (0, pad)))
        masks.append(np.arange(b) < len(y))
      yield {'image': np.concatenate(images), 'label': np.concatenate(labels),
             'mask': np.concatenate(masks).astype(np.float32)}

  def normalization_stats(self) -> dict[str, np.ndarray]:
    """Per-channel mean and population variance of the whole train split.

    Like Keras' Normalization.adapt. float64 sums of uint8 values are exact
    (well below 2**53), so E[x^2] - E[x]^2 loses nothing to accumulation.
    A collective when there are several processes: call it on all of them.
    """
    c = self.info.channels
    sums = np.zeros((3, c), np.float64)  # count, sum, sum of squares.
    for x, _ in self._data['train']:
      for start in range(0, len(x), _STATS_CHUNK):
        chunk = x[start:start + _STATS_CHUNK].reshape(-1, c).astype(np.float64)
        sums += [np.full(c, len(chunk)), chunk.sum(0), np.square(chunk).sum(0)]
    count, total, total_sq = _sum_over_processes(sums)
    expected = self.num_train_examples * self.info.height * self.info.width
    if count[0] != expected:
      raise RuntimeError(
          f'Statistics saw {count[0] // (self.info.height * self.info.width)} '
          f'of {self.num_train_examples} train examples: some shards are '
          'owned by no process (or by several).')
    mean = total / count
    return {'mean': mean, 'variance': total_sq / count - np.square(mean)}
