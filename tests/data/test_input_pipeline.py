"""The input pipeline on a tiny real CIFAR-100 and on tfds mock data.

The real one (tests/data/tfds_fixtures.py) is prepared offline by tfds' own
cifar100 builder; its examples carry their id in pixel (0, 0), so every
example the pipeline returns can be traced back to the fake archive. The
order and coverage tests run on both storages (in memory, and streamed
without worker processes; tests/data/test_streaming.py covers the workers).
"""

import concurrent.futures
import functools
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import fake_data
from perceiver_jax.data import datasets
from perceiver_jax.data import input_pipeline
from perceiver_jax.data import memory
from tests.data import tfds_fixtures

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)

tfds.disable_progress_bar()


def ids(images):
  """The id written into each fake image by tfds_fixtures.fake_examples."""
  return images[..., 0, 0, 0].astype(int) * 256 + images[..., 0, 0, 1]


@functools.cache
def _cached_pipeline(data_dir, num_shards, shard_indices, overrides):
  config = tfds_fixtures.make_config(data_dir, **dict(overrides))
  return input_pipeline.Pipeline(config, num_shards=num_shards,
                                 shard_indices=shard_indices)


STORAGES = ('memory', 'stream')


def pipeline(fake, num_shards=4, shard_indices=(0, 1, 2, 3), **overrides):
  """Pipelines hold no state once built, so tests share them."""
  overrides.setdefault('batch_size', 8)
  overrides.setdefault('data_storage', 'memory')
  overrides.setdefault('data_workers', 0)
  return _cached_pipeline(fake.data_dir, num_shards, tuple(shard_indices),
                          tuple(sorted(overrides.items())))


@pytest.fixture(scope='module')
def stored(fake_cifar100):
  """Ids of tfds 'train' and 'test' in tfds' stored order, read by tfds."""
  builder = tfds.builder('cifar100', data_dir=fake_cifar100.data_dir)
  return {s: np.array([ids(ex['image']) for ex in builder.as_data_source(s)])
          for s in ('train', 'test')}


def expected_split(stored_ids, split, validation_split=0.1):
  n = len(stored_ids['train'])
  n_train = int(np.floor(n * (1 - validation_split)))
  return {'train': stored_ids['train'][:n_train],
          'validation': stored_ids['train'][n_train:],
          'test': stored_ids['test']}[split]


def check_examples(fake, batch):
  """Images and labels are exactly the archive's for the ids they carry."""
  images = np.concatenate([fake.train_images, fake.test_images])
  labels = np.concatenate([fake.train_labels, fake.test_labels])
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  real = batch.get('mask', np.ones(len(batch['label']))) > 0
  np.testing.assert_array_equal(batch['image'][real],
                                images[ids(batch['image'][real])])
  np.testing.assert_array_equal(batch['label'][real],
                                labels[ids(batch['image'][real])])


def eval_ids(p, split):
  """Ids of the masked rows of eval_batches, in order: each device's padding
  comes after its real rows, and the padding of the global batch last."""
  b = p.per_shard_batch
  batches = list(p.eval_batches(split))
  assert len(batches) == p.num_eval_steps(split)
  out = []
  for batch in batches:
    assert batch['image'].shape[0] == p.local_batch_size
    mask = batch['mask'] > 0
    for k in range(len(p.shard_indices)):
      rows = mask[k * b:(k + 1) * b]
      assert (np.diff(rows.astype(int)) <= 0).all()  # Padding at the end.
    assert (np.diff(mask.astype(int)) <= 0).all()
    out.extend(ids(batch['image'][mask]))
  return np.array(out, int)


def test_prepare_runs_the_real_builder_offline(fake_cifar100, stored):
  builder = tfds.builder('cifar100', data_dir=fake_cifar100.data_dir)
  assert builder.info.splits['train'].num_examples == tfds_fixtures.NUM_TRAIN
  assert builder.info.splits['test'].num_examples == tfds_fixtures.NUM_TEST
  # Extracted from the archive by the real download manager.
  assert (builder.info.features['label'].names ==
          list(tfds_fixtures.FINE_NAMES))
  np.testing.assert_array_equal(np.sort(stored['train']),
                                np.arange(tfds_fixtures.NUM_TRAIN))
  np.testing.assert_array_equal(
      np.sort(stored['test']), tfds_fixtures.NUM_TRAIN + np.arange(30))
  info = datasets.get_dataset_info(
      tfds_fixtures.make_config(fake_cifar100.data_dir))
  assert info == datasets.DatasetInfo(
      'cifar100', 32, 32, 3, 100, tfds_fixtures.FINE_NAMES, '3.0.2')


@pytest.mark.parametrize('validation_split,num_train', [
    (0.1, 90), (0.15, 85), (0.333, 66), (0.99, 1)])  # floor(100 * 0.667).
def test_split_boundaries(fake_cifar100, stored, validation_split, num_train):
  p = pipeline(fake_cifar100, 1, (0,), batch_size=1,
               validation_split=validation_split, data_storage='stream')
  assert (p.num_train_examples, p.num_validation_examples,
          p.num_test_examples) == (num_train, 100 - num_train, 30)
  assert p.steps_per_epoch == num_train
  epoch = [p.train_batch(0, s) for s in range(p.steps_per_epoch)]
  for batch in epoch:
    check_examples(fake_cifar100, batch)
  seen = np.concatenate([ids(b['image']) for b in epoch])
  np.testing.assert_array_equal(
      np.sort(seen), np.sort(stored['train'][:num_train]))
  for split in ('validation', 'test'):
    np.testing.assert_array_equal(
        eval_ids(p, split), expected_split(stored, split, validation_split))


@pytest.mark.parametrize('validation_split', [0.0, 1.0, 0.999])
def test_rejects_validation_split_leaving_a_split_empty(fake_cifar100,
                                                       validation_split):
  with pytest.raises(ValueError, match='config.validation_split='):
    pipeline(fake_cifar100, 1, (0,), validation_split=validation_split)


@pytest.mark.parametrize('storage', STORAGES)
def test_order_is_one_permutation_per_epoch_sliced_into_batches(
    fake_cifar100, stored, storage):
  p = pipeline(fake_cifar100, data_storage=storage)
  # Evaluation: the split in stored order, 8 rows a batch, padded at the end.
  for split in ('validation', 'test'):
    np.testing.assert_array_equal(eval_ids(p, split),
                                  expected_split(stored, split))
  # Train: batch s of epoch e is rows [8s, 8s + 8) of the documented
  # permutation of the split; one epoch drops 90 % 8 = 2 examples, ten
  # epochs see every one.
  train, seen = expected_split(stored, 'train'), set()
  for epoch in range(10):
    perm = np.random.default_rng([0, 0, epoch]).permutation(len(train))
    for step in range(p.steps_per_epoch):
      batch = p.train_batch(epoch, step)
      check_examples(fake_cifar100, batch)
      got = ids(batch['image'])
      np.testing.assert_array_equal(got, train[perm[step * 8:][:8]])
      seen.update(got.tolist())
  assert seen == set(train.tolist())


@pytest.mark.parametrize('storage', STORAGES)
def test_order_does_not_depend_on_the_device_count(fake_cifar100, storage):
  """What a run resumed on another slice relies on: 1, 2, 4 or 8 devices
  holding a global batch of 8 see the same batches in the same order."""
  layouts = [pipeline(fake_cifar100, n, range(n), data_storage=storage)
             for n in (1, 2, 4, 8)]
  assert {p.steps_per_epoch for p in layouts} == {11}
  for epoch, step in [(0, 0), (0, 10), (7, 4)]:
    want = layouts[0].train_batch(epoch, step)
    for p in layouts[1:]:
      got = p.train_batch(epoch, step)
      for key in ('image', 'label'):
        np.testing.assert_array_equal(got[key], want[key])
  for split in ('validation', 'test'):
    want = list(layouts[0].eval_batches(split))
    for p in layouts[1:]:
      got = list(p.eval_batches(split))
      assert len(got) == len(want)
      for a, b in zip(got, want):
        for key in ('image', 'label', 'mask'):
          np.testing.assert_array_equal(a[key], b[key])


def test_memory_storage_reads_each_split_once(fake_cifar100, monkeypatch):
  reads = []
  real_read = memory._read_records  # pylint: disable=protected-access

  def spy(source, start, stop, *rest):
    reads.append((source.split, start, stop))
    return real_read(source, start, stop, *rest)

  monkeypatch.setattr(memory, '_read_records', spy)
  config = tfds_fixtures.make_config(fake_cifar100.data_dir, batch_size=8,
                                     data_storage='memory')
  input_pipeline.Pipeline(config, num_shards=4, shard_indices=[2, 3])
  # Every process holds whole splits: an epoch draws from all of train.
  assert sorted(reads) == [('test', 0, 30), ('train', 0, 90),
                           ('train', 90, 100)]


def test_steps_per_epoch_is_global(fake_cifar100):
  assert pipeline(fake_cifar100).steps_per_epoch == 11  # 90 // 8.
  # 85 train examples: 10 batches of 8, whichever devices this process has.
  p = pipeline(fake_cifar100, 4, (3,), validation_split=0.15)
  assert p.steps_per_epoch == 10
  assert p.num_train_examples == 85
  with pytest.raises(ValueError, match='too large'):
    pipeline(fake_cifar100, batch_size=92)
  with pytest.raises(ValueError, match='multiple'):
    pipeline(fake_cifar100, batch_size=10)


def test_train_batch_is_a_pure_function(fake_cifar100):
  p = pipeline(fake_cifar100)
  first = p.train_batch(3, 5)
  assert first['image'].shape == (8, 32, 32, 3)
  assert first['label'].shape == (8,)
  np.testing.assert_array_equal(first['image'], p.train_batch(3, 5)['image'])
  epoch = np.concatenate([ids(p.train_batch(0, s)['image'])
                          for s in range(p.steps_per_epoch)])
  assert len(set(epoch.tolist())) == len(epoch) == 88
  other_epoch = np.concatenate([ids(p.train_batch(1, s)['image'])
                                for s in range(p.steps_per_epoch)])
  assert not np.array_equal(epoch, other_epoch)
  one, two = (pipeline(fake_cifar100, 1, (0,), seed=seed) for seed in (1, 2))
  assert not np.array_equal(one.train_batch(0, 0)['image'],
                            two.train_batch(0, 0)['image'])
  with pytest.raises(IndexError):
    p.train_batch(0, p.steps_per_epoch)


@pytest.mark.parametrize('storage', STORAGES)
def test_global_batch_independent_of_process_layout(fake_cifar100, storage):
  whole = pipeline(fake_cifar100, data_storage=storage)
  halves = [pipeline(fake_cifar100, 4, s, data_storage=storage)
            for s in ((0, 1), (2, 3))]
  for epoch, step in [(0, 0), (0, 10), (7, 4)]:
    parts = [h.train_batch(epoch, step) for h in halves]
    want = whole.train_batch(epoch, step)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in parts]), want[key])
  for split in ('validation', 'test'):
    assert {h.num_eval_steps(split) for h in halves} == {
        whole.num_eval_steps(split)}
    for *parts, want in zip(*(h.eval_batches(split) for h in halves),
                            whole.eval_batches(split)):
      for key in ('image', 'label', 'mask'):
        np.testing.assert_array_equal(
            np.concatenate([part[key] for part in parts]), want[key])


@pytest.mark.parametrize('storage', STORAGES)
def test_eval_covers_every_example_once(fake_cifar100, stored, storage):
  # Per-shard batch 2; test shards of 7 and 8.
  p = pipeline(fake_cifar100, data_storage=storage)
  assert (p.num_eval_steps('validation'), p.num_eval_steps('test')) == (2, 4)
  for split in ('validation', 'test'):
    batches = list(p.eval_batches(split))
    for batch in batches:
      check_examples(fake_cifar100, batch)
      assert batch['mask'].dtype == np.float32
    masks = np.concatenate([b['mask'] for b in batches])
    seen = np.concatenate([ids(b['image']) for b in batches])[masks > 0]
    assert masks.sum() == len(expected_split(stored, split)) == getattr(
        p, f'num_{split}_examples')
    np.testing.assert_array_equal(np.sort(seen),
                                  np.sort(expected_split(stored, split)))
  with pytest.raises(ValueError):
    p.num_eval_steps('train')


def test_normalization_stats_match_numpy(fake_cifar100, stored):
  train_ids = expected_split(stored, 'train')
  pixels = fake_cifar100.train_images[train_ids].reshape(-1, 3)
  want = {'mean': pixels.mean(0), 'variance': pixels.var(0)}
  for p in (pipeline(fake_cifar100), pipeline(fake_cifar100, 1, (0,)),
            pipeline(fake_cifar100, 1, (0,), data_storage='stream')):
    got = p.normalization_stats()
    for key in want:
      assert got[key].dtype == np.float64 and got[key].shape == (3,)
      np.testing.assert_allclose(got[key], want[key], rtol=1e-12)


def test_normalization_stats_sum_over_processes(fake_cifar100, stored,
                                                monkeypatch):
  """Two "processes" (threads) with a fake process_allgather collective."""
  halves = [pipeline(fake_cifar100, 4, s) for s in ((0, 1), (2, 3))]
  with pytest.raises(RuntimeError, match='owned by no process'):
    halves[0].normalization_stats()  # One process can't see shards 2 and 3.
  rank, values = threading.local(), [None, None]
  barrier = threading.Barrier(2, timeout=60)

  def allgather(x):
    values[rank.value] = np.asarray(x)
    barrier.wait()
    out = np.stack(values)
    barrier.wait()
    return out

  def run(r):
    rank.value = r
    return halves[r].normalization_stats()

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(run, (0, 1)))
  pixels = fake_cifar100.train_images[expected_split(stored, 'train')]
  for got in results:
    np.testing.assert_allclose(got['mean'], pixels.reshape(-1, 3).mean(0),
                               rtol=1e-12)
    np.testing.assert_allclose(got['variance'], pixels.reshape(-1, 3).var(0),
                               rtol=1e-12)


@pytest.mark.parametrize('dataset,native,channels,num_classes', [
    ('cifar100', 32, 3, 100), ('mnist', 28, 1, 10),
    ('tf_flowers', None, 3, 5)])  # Variable size: resized to image_size.
def test_mock_data(tmp_path, dataset, native, channels, num_classes):
  config = fake_data.get_config()  # Batch 16, image size 16.
  config.dataset, config.tfds_data_dir = dataset, str(tmp_path)
  n = config.mock_num_examples
  size = native or config.image_size
  info = datasets.get_dataset_info(config)
  assert (info.height, info.width, info.channels, info.num_classes) == (
      size, size, channels, num_classes)
  p = input_pipeline.Pipeline(config, num_shards=2, shard_indices=[1])
  # tfds' mock ignores slicing: every split holds the n mock examples.
  assert p.num_train_examples == p.num_test_examples == n
  assert p.steps_per_epoch == n // 16
  batch = p.train_batch(0, 0)
  assert batch['image'].shape == (8, size, size, channels)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert ((batch['label'] >= 0) & (batch['label'] < num_classes)).all()
  # This process's device holds rows 8..15 of each global batch of 16.
  assert sum(b['mask'].sum() for b in p.eval_batches('test')) == sum(
      i % 16 >= 8 for i in range(n))
