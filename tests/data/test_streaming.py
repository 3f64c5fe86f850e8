"""Streaming storage: worker processes serve what the in-memory storage serves.

On the fake CIFAR-100 (PNG, fixed size, ids in pixel (0, 0)) the two
storages must give identical batches and statistics, including the
TFRecord-prepared copy read by tf.data; on tiny JPEGs of varying sizes the
Inception crops must not depend on the number of workers, in order. One set
of workers serves a run, imports no jax and dies with the training process.
"""

import glob
import itertools
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from configs import fake_data
from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import host_transforms
from perceiver_jax.data import input_pipeline
from perceiver_jax.data import records
from perceiver_jax.data import streaming
from perceiver_jax.data import workers as workers_lib
from tests.data import tfds_fixtures
from tests.support import ROOT
from tests.support import subprocess_env

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


def _spawned():
  """Ids of this process's spawned children (multiprocessing's workers)."""
  pids = set()
  for child in psutil.Process().children(recursive=True):
    try:
      if 'spawn_main' in ' '.join(child.cmdline()):
        pids.add(child.pid)
    except psutil.Error:  # Ended meanwhile.
      pass
  return pids


def test_two_workers_serve_the_in_process_batches_in_order(tiny_jpegs):
  """As the training loop reads: from the middle of an epoch (a resumed
  run), each epoch followed by a validation pass, then the test; one set of
  two workers serves it all, and closing stops them."""
  before = _spawned()
  inline = _jpegs(tiny_jpegs, data_workers=0, num_epochs=3)
  two = _jpegs(tiny_jpegs, data_workers=2, num_epochs=3)
  assert inline.storage == two.storage == 'stream'  # Varying sizes.
  spe, counts = inline.steps_per_epoch, set()
  try:
    batches = two.train_batches(0, 3)
    for epoch in range(3):
      for step in range(3 if epoch == 0 else 0, spe):
        _assert_same_batches([next(batches)], [inline.train_batch(epoch,
                                                                  step)])
        counts.add(len(_spawned() - before))
      _assert_same_batches(two.eval_batches('validation'),
                           inline.eval_batches('validation'))
      counts.add(len(_spawned() - before))
    assert next(batches, None) is None
    _assert_same_batches(two.eval_batches('test'),
                         inline.eval_batches('test'))
    assert counts == {2}
  finally:
    two.close()
  assert not _spawned() - before
  # Random crops: epochs differ, and each view is its record's.
  assert not np.array_equal(inline.train_batch(0, 0)['image'],
                            inline.train_batch(1, 0)['image'])


def test_workers_exit_when_the_training_process_is_killed(tiny_jpegs):
  child = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'data',
                                    'streaming_child.py'), tiny_jpegs],
      cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  workers = []
  try:
    line = child.stdout.readline()
    assert line.startswith('workers'), child.stderr.read()[-3000:]
    workers = [psutil.Process(int(pid)) for pid in line.split()[1:]]
    assert len(workers) == 2
    # A SIGTERM to the whole process group (a preempted VM) leaves them to
    # the training process, which saves a checkpoint first.
    for worker in workers:
      worker.terminate()
    time.sleep(1)
    assert all(w.status() != psutil.STATUS_ZOMBIE for w in workers)
    child.kill()
    child.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not [w for w in alive if w.status() != psutil.STATUS_ZOMBIE]
    # They removed the batches they had written for it.
    assert not glob.glob(os.path.join(workers_lib.buffer_dir(),
                                      f'perceiver_jax-{child.pid}-*'))
  finally:
    child.kill()
    for worker in workers:  # Only if the test failed.
      if worker.is_running():
        worker.kill()
    child.communicate(timeout=60)  # Workers held its pipes open.


def test_workers_load_neither_jax_nor_tensorflow(tiny_jpegs):
  """Seen from outside: no jaxlib or tensorflow library is mapped in a
  worker that has served training, evaluation and statistics."""

  def native_libraries(pid):
    return [m.path for m in psutil.Process(pid).memory_maps()
            if f'{os.sep}jaxlib{os.sep}' in m.path
            or f'{os.sep}tensorflow{os.sep}' in m.path]

  assert native_libraries(os.getpid())  # This process has jax: it shows.
  before = _spawned()
  with _jpegs(tiny_jpegs, data_workers=1) as pipeline:
    next(pipeline.train_batches(0, 0))
    next(pipeline.eval_batches('test'))
    pipeline.normalization_stats()
    workers = _spawned() - before
    assert len(workers) == 1
    for pid in workers:
      assert native_libraries(pid) == []


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


# One ImageNet batch of a one-process, 8-device host: 1024 uint8 images of
# 224 x 224 x 3, with int32 labels and float32 masks.
_IMAGENET_BATCH = 1024 * (224 * 224 * 3 + 4 + 4)


def test_shared_memory_too_small_for_one_worker_says_what_to_set():
  # Docker's default /dev/shm: 64 MiB.
  with pytest.raises(errors.InputError) as e:
    streaming.worker_count(7, True, _IMAGENET_BATCH, 64 * 2**20, '/dev/shm')
  assert str(e.value) == (
      '7 streaming workers (config.data_workers) need up to 2.3 GiB in '
      '/dev/shm for the batches in flight (2 per worker and 2 in use, 147.0 '
      'MiB each), and it has 64.0 MiB free. Give it more room (a container: '
      '`docker run --shm-size=4g`), or pass fewer workers '
      '(--config.data_workers=0 reads in the training process) or a smaller '
      '--config.batch_size.')


def test_automatic_workers_shrink_to_fit_and_say_so(caplog):
  assert streaming.worker_count(15, True, _IMAGENET_BATCH, 2 * 2**30,
                                '/dev/shm') == 5
  assert 'starting 5 workers instead' in caplog.text
  assert 'docker run --shm-size=6g' in caplog.text
  assert streaming.worker_count(15, True, _IMAGENET_BATCH, 5 * 2**30,
                                '/dev/shm') == 15


def test_workers_set_by_hand_that_do_not_fit_are_refused_before_reading(
    tiny_jpegs, monkeypatch):
  # A batch: 8 images of 16 x 16 x 3, labels and masks: 6208 bytes; two
  # workers need (2 * 2 + 2) of them, one (2 + 2).
  monkeypatch.setattr(workers_lib, 'free_bytes', lambda directory: 30000)
  before = _spawned()
  with pytest.raises(errors.InputError) as e:
    _jpegs(tiny_jpegs, data_workers=2)
  assert (f'need up to 37,248 bytes in {workers_lib.buffer_dir()} for the '
          'batches in flight (2 per worker and 2 in use, 6,208 bytes each), '
          'and it has 30,000 bytes free') in str(e.value)
  assert 'pass fewer workers (--config.data_workers=1 fits)' in str(e.value)
  assert not _spawned() - before


def _bad_jpegs(data_dir, **overrides):
  config = fake_data.get_config()
  config.update(dict(mock_data=False, dataset='bad_jpegs',
                     tfds_data_dir=data_dir, batch_size=4, num_epochs=1,
                     host_crop='inception', image_size=16, data_workers=1))
  config.update(overrides)
  return input_pipeline.Pipeline(config, num_shards=2, shard_indices=[0, 1])


_FIX = ('The prepared data is damaged. List every bad record with `python '
        'main.py --mode=check_data --config=CONFIG` (the same --config and '
        'overrides), then prepare the dataset again (delete its version '
        'directory under the tfds data dir and rerun `tfds build` or this '
        'run), or replace or remove the source file and prepare again.')
_TRUNCATED = ("Record 3 of tfds split 'train' of dataset 'bad_jpegs' (read for "
              "the train split, file_name 'train_003.JPEG') does not decode: "
              'OSError: image file is truncated (')


def _assert_bad_record(error, where, index, message_start):
  # The exact type: it crossed from a worker intact.
  assert error.__class__ is records.BadRecordError
  assert (error.where, error.index) == (where, index)
  assert str(error).startswith(message_start), str(error)
  assert str(error).endswith(_FIX), str(error)


def test_a_record_that_does_not_decode_is_named_through_the_workers(
    bad_jpegs):
  train = records.Where('bad_jpegs', 'train', 'train')
  test = records.Where('bad_jpegs', 'test', 'test')
  with _bad_jpegs(bad_jpegs) as pipeline:
    with pytest.raises(errors.InputError) as e:
      list(pipeline.train_batches(0, 0))
    _assert_bad_record(e.value, train, 3, _TRUNCATED)
    with pytest.raises(errors.InputError) as e:
      list(pipeline.eval_batches('test'))
    _assert_bad_record(
        e.value, test, 2, "Record 2 of tfds split 'test' of dataset "
        "'bad_jpegs' (read for the test split, file_name 'test_002.JPEG') "
        'does not decode: not an image (Pillow knows no format of its '
        'bytes). ')
    # Validation's records all decode.
    assert len(list(pipeline.eval_batches('validation'))) == 1
    with pytest.raises(errors.InputError) as e:  # Statistics read it too.
      pipeline.normalization_stats()
    _assert_bad_record(e.value, train, 3, _TRUNCATED)


def test_the_in_memory_storage_names_a_record_that_does_not_decode(
    bad_jpegs):
  with pytest.raises(errors.InputError) as e:
    _bad_jpegs(bad_jpegs, data_storage='memory', host_crop='none')
  _assert_bad_record(e.value, records.Where('bad_jpegs', 'train', 'train'),
                     3, _TRUNCATED)
