"""In-memory storage: the three splits decoded into numpy once.

The fastest storage when the data fits in host memory (CIFAR's 184 MB):
batches are numpy takes from decoded uint8 arrays. Every process holds
whole splits, since each epoch's order draws its batches from all of the
training split (`sampler.py`). Records come from the
ArrayRecord files through the same decode as streaming (`host_transforms`),
or, for datasets prepared earlier as TFRecord and for tfds' mock data,
through tf.data.
"""

import contextlib

import numpy as np
import tensorflow_datasets as tfds

from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import host_transforms
from perceiver_jax.data import records
from perceiver_jax.data import splits as splits_lib

_READ_BATCH = 1024  # Examples per tf.data batch while decoding into memory.


def _read_tfrecord(data_builder, where, start, stop, info):
  """Decodes examples [start, stop) of a TFRecord split with tf.data.

  tf.data names no record when one does not decode; the error gives the
  range, and the data check names the record once the files are ArrayRecord.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = [np.zeros((0, info.height, info.width, info.channels), np.uint8)]
  labels = [np.zeros((0,), np.int32)]
  if stop > start:
    ds = data_builder.as_dataset(
        split=tfds.core.ReadInstruction(
            where.tfds_split, from_=start, to=stop, unit='abs'),
        shuffle_files=False,
        # Read files one after the other: stored order, not interleaved.
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
        decoders=tfds.decode.PartialDecoding({'image': True, 'label': True}))

    def select(example):
      image = example['image']
      if info.variable_size:
        image = tf.image.resize(image, (info.height, info.width), 'bilinear')
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image, tf.cast(example['label'], tf.int32)

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    try:
      for x, y in tfds.as_numpy(ds.batch(_READ_BATCH)):
        images.append(x)
        labels.append(y)
    except tf.errors.InvalidArgumentError as e:
      raise errors.InputError(
          f'A record among {start}..{stop - 1} of tfds split '
          f'{where.tfds_split!r} of dataset {where.dataset!r} (read for the '
          f'{where.split} split) does not decode ({e.message.splitlines()[0]}'
          '). The dataset is prepared as TFRecord, which cannot name it: '
          'convert it to ArrayRecord (`tfds convert_format '
          f'--dataset_version_dir={data_builder.data_dir} '
          f'--out_file_format={datasets.ARRAY_RECORD}`) and list the bad '
          f'records with `{records.CHECK_COMMAND}`, then prepare the dataset '
          'again.') from None
  return np.concatenate(images), np.concatenate(labels)


def _read_records(source, start, stop, transform, where):
  """Decodes records [start, stop) of a data source (evaluation view);
  `where` (`records.Where`) names a record that does not decode."""
  rows = [source[i] for i in range(start, stop)]
  shape = (transform.height, transform.width, transform.channels)
  images = np.zeros((len(rows),) + shape, np.uint8)
  for i, record in enumerate(rows):
    images[i] = records.decoded(transform.eval, record, where, start + i)
  return images, np.asarray([r['label'] for r in rows], np.int32)


class MemoryStorage:
  """Decoded arrays of the three splits.

  Args:
    data_builder: the tfds builder.
    config: the run's config.
    sampler: the `sampler.Sampler` that orders the records.
    transform: the `host_transforms.HostTransform` that decodes them
      (`crop='none'`).
  """

  def __init__(self, data_builder, config, sampler, transform):
    self._sampler = sampler
    mock = (tfds.testing.mock_data(num_examples=config.mock_num_examples)
            if config.mock_data else contextlib.nullcontext())
    info = datasets.dataset_info(data_builder, config)
    array_records = (not config.mock_data and datasets.file_format(
        data_builder) == datasets.ARRAY_RECORD)
    self._data = {}  # split -> (images, labels), by position in the split.
    with mock:
      for split in splits_lib.SPLITS:
        tfds_split, start, stop = sampler.splits[split]
        where = records.Where(data_builder.name, split, tfds_split)
        if array_records:
          source = datasets.data_source(data_builder, tfds_split, config)
          self._data[split] = _read_records(source, start, stop, transform,
                                            where)
        else:
          self._data[split] = _read_tfrecord(data_builder, where, start, stop,
                                             info)
        if len(self._data[split][1]) != stop - start:
          raise RuntimeError(f'Read {len(self._data[split][1])} {split} '
                             f'examples, expected {stop - start}.')

  def _rows(self, split, rows):
    """`(images, labels, mask)` of per-device `rows`, each padded to the
    per-device batch (mask 0)."""
    x, y = self._data[split]
    b = self._sampler.per_shard_batch
    pad = lambda a, n: np.pad(a, [(0, n)] + [(0, 0)] * (a.ndim - 1))
    images = [pad(x[r], b - len(r)) for r in rows]
    labels = [pad(y[r], b - len(r)) for r in rows]
    masks = [np.arange(b) < len(r) for r in rows]
    return (np.concatenate(images), np.concatenate(labels),
            np.concatenate(masks).astype(np.float32))

  def train_batch(self, epoch, step):
    images, labels, _ = self._rows(
        'train', self._sampler.train_rows(epoch, step))
    return {'image': images, 'label': labels}

  def eval_batch(self, split, step):
    images, labels, mask = self._rows(
        split, self._sampler.eval_rows(split, step))
    return {'image': images, 'label': labels, 'mask': mask}

  def stats_sums(self, positions):
    """`host_transforms.moment_sums` over the training images at
    `positions` (within the split)."""
    x = self._data['train'][0]
    sums = np.zeros((3, x.shape[-1]), np.float64)
    for start in range(0, len(positions), 4096):  # Bounds the float64 copy.
      sums += host_transforms.moment_sums(
          x[positions[start:start + 4096]], x.shape[-1])
    return sums

  def close(self):
    pass
