"""Streaming storage: grain workers serve what the in-memory storage serves.

On the fake CIFAR-100 (PNG, fixed size, ids in pixel (0, 0)) the two
storages must give identical batches and statistics, including the
TFRecord-prepared copy read by tf.data; on tiny JPEGs of varying sizes the
Inception crops must not depend on the number of workers.
"""

import itertools
import multiprocessing

import numpy as np
import pytest

from configs import fake_data
from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import host_transforms
from perceiver_jax.data import input_pipeline
from tests.data import tfds_fixtures

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


def _cifar(data_dir, shard_indices=(1, 3), **overrides):
  config = tfds_fixtures.make_config(data_dir, batch_size=8, num_epochs=3)
  config.update(overrides)
  return input_pipeline.Pipeline(config, num_shards=4,
                                 shard_indices=shard_indices)


def _jpegs(data_dir, **overrides):
  config = fake_data.get_config()
  config.update(dict(mock_data=False, dataset='tiny_jpegs',
                     tfds_data_dir=data_dir, batch_size=8, num_epochs=2,
                     host_crop='inception', image_size=16))
  config.update(overrides)
  return input_pipeline.Pipeline(config, num_shards=2, shard_indices=[0, 1])


def _assert_same_batches(one, two):
  one, two = list(one), list(two)
  assert len(one) == len(two)
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_streaming_serves_what_memory_serves(fake_cifar100,
                                             fake_cifar100_tfrecord):
  # One process, four devices: every shard, so statistics can be compared.
  shards = (0, 1, 2, 3)
  stream = _cifar(fake_cifar100.data_dir, shards, data_storage='stream',
                  data_workers=1)
  memory = _cifar(fake_cifar100.data_dir, shards, data_storage='memory')
  # Decoded by tf.data from TFRecord files: the same PNGs, the same pixels.
  tfrecord = _cifar(fake_cifar100_tfrecord.data_dir, shards)
  assert (stream.storage, memory.storage, tfrecord.storage) == (
      'stream', 'memory', 'memory')
  spe = stream.steps_per_epoch
  # From the middle of epoch 1 into epoch 2, as a resumed run reads them.
  want = [memory.train_batch(e, s) for e, s in
          itertools.islice(itertools.product(range(1, 3), range(spe)), 3,
                           spe + 2)]
  for p in (stream, tfrecord):
    _assert_same_batches(itertools.islice(p.train_batches(1, 3), spe - 1),
                         want)
    _assert_same_batches(p.eval_batches('test'), memory.eval_batches('test'))
    for key, value in memory.normalization_stats().items():
      np.testing.assert_array_equal(p.normalization_stats()[key], value)
  stream.close()


def test_workers_change_nothing_and_close_stops_them(tiny_jpegs):
  inline, workers = _jpegs(tiny_jpegs), _jpegs(tiny_jpegs, data_workers=1)
  assert inline.storage == workers.storage == 'stream'  # Varying sizes.
  batches = workers.train_batches(1, 2)
  first = next(batches)
  assert first['image'].shape == (8, 16, 16, 3)
  assert first['image'].dtype == np.uint8
  assert len(multiprocessing.active_children()) == 1
  _assert_same_batches(itertools.chain([first], batches),
                       inline.train_batches(1, 2))
  _assert_same_batches(workers.eval_batches('test'),
                       inline.eval_batches('test'))
  unfinished = workers.train_batches(0, 0)
  next(unfinished)
  workers.close()
  assert not multiprocessing.active_children()
  # Random crops: epochs differ, and each view is its record's.
  assert not np.array_equal(inline.train_batch(0, 0)['image'],
                            inline.train_batch(1, 0)['image'])


def test_each_training_view_is_drawn_for_its_epoch_and_record(
    tiny_jpegs, monkeypatch):
  pipeline = _jpegs(tiny_jpegs)
  drawn, train = [], host_transforms.HostTransform.train

  def recording(self, data, seed, epoch, record):
    drawn.append((seed, epoch, record))
    return train(self, data, seed, epoch, record)

  monkeypatch.setattr(host_transforms.HostTransform, 'train', recording)
  sampler = pipeline.sampler
  pipeline.train_batch(1, 2)
  assert drawn == [(sampler.seed, 1, int(index))
                   for rows in sampler.train_rows(1, 2)
                   for index in sampler.tfds_indices('train', rows)]


def test_statistics_of_a_sample_of_the_training_split(tiny_jpegs):
  whole = _jpegs(tiny_jpegs).normalization_stats()
  sample = _jpegs(tiny_jpegs, normalization_examples=10).normalization_stats()
  assert not np.allclose(whole['mean'], sample['mean'])
  assert np.allclose(whole['mean'], sample['mean'], rtol=0.2)


def test_streaming_tfrecord_data_says_how_to_convert(fake_cifar100_tfrecord):
  with pytest.raises(errors.InputError) as e:
    _cifar(fake_cifar100_tfrecord.data_dir, data_storage='stream')
  message = str(e.value)
  assert 'is prepared as tfrecord' in message
  assert ('tfds convert_format --dataset_version_dir='
          f'{fake_cifar100_tfrecord.data_dir}/cifar100/3.0.2 '
          '--out_file_format=array_record') in message
  assert 'tfds build cifar100' in message


def test_auto_keeps_fixed_size_data_in_memory(fake_cifar100):
  assert _cifar(fake_cifar100.data_dir).storage == 'memory'


def test_random_crops_cannot_be_kept_in_memory():
  config = fake_data.get_config()
  config.host_crop, config.data_storage = 'inception', 'memory'
  problems = config_lib.config_problems(config)
  assert problems == [
      "config.data_storage='memory' cannot serve config.host_crop="
      "'inception' (its random crops change every epoch); pass "
      '--config.data_storage=stream (or auto).']
