"""Streaming storage: grain workers serve what the in-memory storage serves.

On the fake CIFAR-100 (PNG, fixed size, ids in pixel (0, 0)) the two
storages must give identical batches and statistics, including the
TFRecord-prepared copy read by tf.data; on tiny JPEGs of varying sizes the
Inception crops must not depend on the number of workers, in order. One set
of workers at a time serves a run; they hold what the /dev/shm check counts,
start no jax backend and die with the training process.
"""

import gc
import glob
import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from configs import fake_data
from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import grain_workers
from perceiver_jax.data import host_transforms
from perceiver_jax.data import input_pipeline
from perceiver_jax.data import records
from perceiver_jax.data import streaming
from tests.data import tfds_fixtures
from tests.data import worker_probe
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
  """Ids of this process's spawned children (grain's workers)."""
  pids = set()
  for child in psutil.Process().children(recursive=True):
    try:
      if 'spawn_main' in ' '.join(child.cmdline()):
        pids.add(child.pid)
    except psutil.Error:  # Ended meanwhile.
      pass
  return pids


class _Census:
  """Counts this process's spawned children every 0.1 s while it runs."""

  def __init__(self):
    self.counts, self.before = [], _spawned()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True)

  def _watch(self):
    while not self._stop.wait(0.1):
      self.counts.append(len(_spawned() - self.before))

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    self._stop.set()
    self._thread.join()


def test_the_plan_lists_what_a_run_asks_for_next():
  # 3 steps per epoch, 3 epochs, 2 validation and 2 test steps.
  plan = streaming._Plan(3, 3, 2, 2)  # pylint: disable=protected-access
  v, t = [('validation', 0), ('validation', 1)], [('test', 0), ('test', 1)]
  # A resumed run: the rest of epoch 1, its validation, epoch 2, the test.
  keys = plan.keys_from(('train', 4), None)
  assert list(keys) == ([('train', 4), ('train', 5)] + v +
                        [('train', 6), ('train', 7), ('train', 8)] + v + t)
  with pytest.raises(IndexError):  # How grain learns where it ends.
    keys[len(keys)]  # pylint: disable=pointless-statement
  # Validation after epoch 0's training goes on with epoch 1.
  assert list(plan.keys_from(('validation', 1), 0))[:5] == [
      ('validation', 1), ('train', 3), ('train', 4), ('train', 5),
      ('validation', 0)]
  assert list(plan.keys_from(('validation', 0), None)) == v  # No training.
  assert list(plan.keys_from(('test', 1), 2)) == [('test', 1)]


def test_two_workers_serve_the_in_process_batches_in_order(tiny_jpegs):
  """As the training loop reads: from the middle of an epoch (a resumed
  run), each epoch followed by a validation pass, then, as after early
  stopping, the test while the next epoch was expected. One set of two
  workers at a time serves it all, a SIGTERM to the process group (a
  preempted VM) does not stop them, and closing does."""
  inline = _jpegs(tiny_jpegs, data_workers=0, num_epochs=3)
  two = _jpegs(tiny_jpegs, data_workers=2, num_epochs=3)
  assert inline.storage == two.storage == 'stream'  # Varying sizes.
  spe = inline.steps_per_epoch
  with _Census() as census:
    try:
      batches = two.train_batches(0, 3)
      for epoch in range(2):
        for step in range(3 if epoch == 0 else 0, spe):
          _assert_same_batches([next(batches)],
                               [inline.train_batch(epoch, step)])
          if (epoch, step) == (0, 4):  # Each worker has served a batch.
            for pid in _spawned() - census.before:
              os.kill(pid, signal.SIGTERM)
        _assert_same_batches(two.eval_batches('validation'),
                             inline.eval_batches('validation'))
      _assert_same_batches(two.eval_batches('test'),
                           inline.eval_batches('test'))
    finally:
      two.close()
  assert max(census.counts) == 2, census.counts
  assert not _spawned() - census.before
  # Random crops: epochs differ, and each view is its record's.
  assert not np.array_equal(inline.train_batch(0, 0)['image'],
                            inline.train_batch(1, 0)['image'])


def _segments(size):
  """grain's shared memory segments of `size` bytes."""
  found = set()
  for path in glob.glob(os.path.join(grain_workers.SHM_DIR, 'psm_*')):
    try:
      if os.path.getsize(path) == size:
        found.add(path)
    except OSError:  # Freed meanwhile.
      pass
  return found


def test_workers_hold_the_batches_the_shared_memory_check_counts(tiny_jpegs):
  # Images of 13 x 13: 8 of them take 4,056 bytes, a size no other test's
  # arrays have.
  size = 8 * 13 * 13 * 3
  before = _segments(size)
  with _jpegs(tiny_jpegs, data_workers=2, image_size=13) as pipeline:
    held = next(pipeline.train_batches(0, 0))
    assert held['image'].nbytes == size
    want = grain_workers.IN_FLIGHT_PER_WORKER * 2 + 1
    deadline = time.monotonic() + 120
    while (len(_segments(size) - before) < want and
           time.monotonic() < deadline):
      time.sleep(0.2)
    time.sleep(2)  # Had they room for more, they would take it by now.
    assert len(_segments(size) - before) == want
  # Closed: all freed but the one held.
  assert len(_segments(size) - before) == 1
  del held
  gc.collect()
  deadline = time.monotonic() + 30  # Freed by the array's finaliser.
  while _segments(size) - before and time.monotonic() < deadline:
    time.sleep(0.2)
  assert not _segments(size) - before


def test_workers_exit_when_the_training_process_is_killed(tiny_jpegs):
  child = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'data',
                                    'streaming_child.py'), tiny_jpegs],
      cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  descendants = []
  try:
    line = child.stdout.readline()
    assert line.startswith('workers'), child.stderr.read()[-3000:]
    workers = [psutil.Process(int(pid)) for pid in line.split()[1:]]
    assert len(workers) == 2
    # With multiprocessing's resource tracker, which frees what the dead
    # leave in shared memory.
    descendants = psutil.Process(child.pid).children(recursive=True)
    assert len(descendants) == 3
    with open(f'/proc/{child.pid}/maps') as f:
      mapped = {word for line in f for word in line.split()
                if word.startswith('/dev/shm/psm_')}
    assert mapped  # The batch it holds, those read ahead for it.
    child.kill()
    child.wait()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not [path for path in mapped if os.path.exists(path)]
  finally:
    child.kill()
    for process in descendants:  # Only if the test failed.
      if process.is_running():
        process.kill()
    child.communicate(timeout=60)  # Workers held its pipes open.


def test_workers_import_jax_but_never_start_it(tiny_jpegs):
  """In a worker that serves training, evaluation and statistics: jax is
  imported (by grain), but no backend and no jax.distributed start."""
  # pylint: disable=protected-access  (the probe takes the reader's place)
  with _jpegs(tiny_jpegs, data_workers=1) as pipeline:
    # The probe sees a backend where there is one: here, since the
    # pipeline asked jax for the process count.
    assert worker_probe.jax_state()[1:] == [1, 1, 0]
    storage = pipeline._source
    storage._reader = worker_probe.ProbingReader.of(storage._reader)
    pipeline.normalization_stats()  # Fails if jax started in its worker.
    states = np.stack([next(pipeline.train_batches(0, 0))['jax_state'],
                       next(pipeline.eval_batches('test'))['jax_state']])
  for pid, *jax_state in states.tolist():
    assert pid != os.getpid()
    assert jax_state == [1, 0, 0]


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


# One ImageNet batch of a one-process, 8-device host in shared memory: 1024
# uint8 images of 224 x 224 x 3 (whole pages already), and a page each for
# the int32 labels and float32 masks.
_IMAGENET_BATCH = 1024 * 224 * 224 * 3 + 2 * 4096


def test_shared_memory_too_small_for_one_worker_says_what_to_set():
  # Docker's default /dev/shm: 64 MiB.
  with pytest.raises(errors.InputError) as e:
    streaming.worker_count(7, True, _IMAGENET_BATCH, 64 * 2**20, '/dev/shm')
  assert str(e.value) == (
      '7 streaming workers (config.data_workers) need up to 4.3 GiB in '
      '/dev/shm for the batches in flight (4 per worker and 2 in use, 147.0 '
      'MiB each), and it has 64.0 MiB free. Give it more room (a container: '
      '`docker run --shm-size=6g`), or pass fewer workers '
      '(--config.data_workers=0 reads in the training process) or a smaller '
      '--config.batch_size.')


def test_automatic_workers_shrink_to_fit_and_say_so(caplog):
  assert streaming.worker_count(15, True, _IMAGENET_BATCH, 2 * 2**30,
                                '/dev/shm') == 2
  assert 'starting 2 workers instead' in caplog.text
  assert 'docker run --shm-size=10g' in caplog.text
  assert streaming.worker_count(15, True, _IMAGENET_BATCH, 9 * 2**30,
                                '/dev/shm') == 15
  # Where there is no /dev/shm to ask, nothing is checked.
  assert streaming.worker_count(15, False, _IMAGENET_BATCH, None,
                                '/dev/shm') == 15


def test_workers_set_by_hand_that_do_not_fit_are_refused_before_reading(
    tiny_jpegs, monkeypatch):
  # A batch: 8 images of 16 x 16 x 3 (6,144 bytes: 2 pages), labels and
  # masks (a page each): 16,384 bytes; two workers need (4 * 2 + 2) of them,
  # one (4 + 2).
  monkeypatch.setattr(grain_workers, 'free_bytes', lambda: 120000)
  before = _spawned()
  with pytest.raises(errors.InputError) as e:
    _jpegs(tiny_jpegs, data_workers=2)
  assert ('need up to 163,840 bytes in /dev/shm for the batches in flight '
          '(4 per worker and 2 in use, 16,384 bytes each), and it has '
          '120,000 bytes free') in str(e.value)
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
