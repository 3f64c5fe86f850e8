"""A tiny CIFAR-100 prepared offline by the real tfds `cifar100` builder.

`write_cifar100_archive` writes a fake `cifar-100-binary.tar.gz` in the
original binary format (what tfds' builder reads: records of 1 coarse-label
byte, 1 fine-label byte and 3072 CHW pixel bytes, plus the label-name files).
`prepare_fake_cifar100` then runs `datasets.prepare`, i.e. the builder's
real download_and_prepare: tfds "downloads" the archive through its own
downloader (a file copy, since the URL is a local path), records the size and
sha256, extracts the tar.gz and writes the tfrecords. The only seam is the
builder's URL, pointed at the local file; its checksum is not registered, so
tfds does not validate it. Any attempt to reach the network fails the test.

Use the `fake_cifar100` session fixture (import it into a test module), or
`make_config(data_dir)` for a configs/cifar100.py config on such a dir.
`tiny_jpegs` and `bad_jpegs` are JPEGs of varying sizes, the second with
two records that do not decode.
"""

import dataclasses
import io
import pathlib
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import cifar100 as cifar100_config
from perceiver_jax.data import datasets

NUM_TRAIN = 100
NUM_TEST = 30
FINE_NAMES = tuple(f'fine_{i:02d}' for i in range(100))
COARSE_NAMES = tuple(f'coarse_{i:02d}' for i in range(20))


@dataclasses.dataclass(frozen=True)
class FakeCifar100:
  """A prepared fake CIFAR-100 and what was put in it (archive order)."""
  data_dir: str
  train_images: np.ndarray  # uint8 [NUM_TRAIN, 32, 32, 3]
  train_labels: np.ndarray  # int32 fine labels [NUM_TRAIN]
  test_images: np.ndarray  # uint8 [NUM_TEST, 32, 32, 3]
  test_labels: np.ndarray  # int32 [NUM_TEST]


def fake_examples(num, first_id, seed):
  """Random images, each made unique by writing its id into pixel (0, 0)."""
  images = np.random.default_rng(seed).integers(
      0, 256, (num, 32, 32, 3), dtype=np.uint8)
  ids = np.arange(first_id, first_id + num)
  images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
  labels = ((7 * ids + 3) % 100).astype(np.int32)
  return images, labels


def _records(images, labels):
  coarse = (labels // 5).astype(np.uint8)
  rows = [np.concatenate([[c, f], img.transpose(2, 0, 1).ravel()])
          for c, f, img in zip(coarse, labels.astype(np.uint8), images)]
  return np.asarray(rows, np.uint8).tobytes()


def write_cifar100_archive(path, train, test):
  """Writes (images, labels) pairs as a cifar-100-binary.tar.gz at `path`."""
  files = {
      'train.bin': _records(*train),
      'test.bin': _records(*test),
      'coarse_label_names.txt': '\n'.join(COARSE_NAMES).encode() + b'\n',
      'fine_label_names.txt': '\n'.join(FINE_NAMES).encode() + b'\n',
  }
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      member = tarfile.TarInfo(f'cifar-100-binary/{name}')
      member.size = len(data)
      tar.addfile(member, io.BytesIO(data))
  return path


def make_config(data_dir, **overrides):
  """configs/cifar100.py on `data_dir`, with field overrides."""
  config = cifar100_config.get_config()
  config.tfds_data_dir = str(data_dir)
  config.update(overrides)
  return config


def _no_network(url, *args, **kwargs):
  raise AssertionError(f'Test tried to download {url}.')


def prepare_fake_cifar100(root, tfrecord=False):
  """Builds the archive under `root` and prepares it into `root`/tfds.

  As the pipeline prepares datasets (ArrayRecord), or as TFRecord, as tfds
  prepares them by default (datasets prepared before ArrayRecord was used).
  """
  root = pathlib.Path(root)
  train = fake_examples(NUM_TRAIN, 0, seed=1)
  test = fake_examples(NUM_TEST, NUM_TRAIN, seed=2)
  archive = write_cifar100_archive(root / 'cifar-100-binary.tar.gz',
                                   train, test)
  data_dir = root / 'tfds'
  data_dir.mkdir()
  builder_cls = tfds.builder_cls('cifar100')
  real_info = builder_cls._cifar_info  # pylint: disable=protected-access
  local_info = property(lambda self: real_info.fget(self)._replace(
      url=str(archive)))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(builder_cls, '_cifar_info', local_info)
    mp.setattr('tensorflow_datasets.core.download.downloader._open_url',
               _no_network)
    if tfrecord:
      datasets.builder(make_config(data_dir)).download_and_prepare()
    else:
      datasets.prepare(make_config(data_dir))
  return FakeCifar100(str(data_dir), *train, *test)


@pytest.fixture(scope='session')
def fake_cifar100(tmp_path_factory):
  return prepare_fake_cifar100(tmp_path_factory.mktemp('fake_cifar100'))


@pytest.fixture(scope='session')
def fake_cifar100_tfrecord(tmp_path_factory):
  return prepare_fake_cifar100(tmp_path_factory.mktemp('fake_cifar100_tfr'),
                               tfrecord=True)


class TinyJpegs(tfds.core.GeneratorBasedBuilder):
  """JPEGs of varying sizes (ImageNet-like, in miniature), 5 classes.

  Pixel (0, 0)'s neighbourhood is not kept by JPEG, so examples are told
  apart by their labels and sizes only; the tests that need exact ids use
  the fake CIFAR-100.
  """
  VERSION = tfds.core.Version('1.0.0')
  NUM_TRAIN = 48
  NUM_TEST = 14

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(self.NUM_TRAIN, 0),
            'test': self._generate_examples(self.NUM_TEST, 1)}

  def _generate_examples(self, num, seed):
    rng = np.random.default_rng(seed)
    for i in range(num):
      height, width = rng.integers(24, 72, 2)
      # Smooth images, so JPEG keeps them close to what was written.
      base = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
      image = np.kron(base, np.ones((18, 18, 1)))[:height, :width]
      yield f'{seed}_{i}', {'image': image.astype(np.uint8),
                            'label': i % 5}


def prepare_tiny_jpegs(root):
  """TinyJpegs prepared as ArrayRecord under `root`; returns the data dir."""
  data_dir = pathlib.Path(root) / 'tfds'
  TinyJpegs(data_dir=str(data_dir)).download_and_prepare(
      file_format='array_record')
  return str(data_dir)


@pytest.fixture(scope='session')
def tiny_jpegs(tmp_path_factory):
  return prepare_tiny_jpegs(tmp_path_factory.mktemp('tiny_jpegs'))


class TinyRectangles(tfds.core.GeneratorBasedBuilder):
  """PNGs of one non-square size (24 x 40), 5 classes: a fixed-size dataset
  whose stored shape is neither square nor the model's `image_size`."""
  VERSION = tfds.core.Version('1.0.0')
  HEIGHT, WIDTH = 24, 40
  NUM_TRAIN = 20
  NUM_TEST = 8

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(self.HEIGHT, self.WIDTH, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(self.NUM_TRAIN, 0),
            'test': self._generate_examples(self.NUM_TEST, 1)}

  def _generate_examples(self, num, seed):
    rng = np.random.default_rng(seed)
    for i in range(num):
      image = rng.integers(0, 256, (self.HEIGHT, self.WIDTH, 3), np.uint8)
      yield f'{seed}_{i}', {'image': image, 'label': i % 5}


@pytest.fixture(scope='session')
def tiny_rectangles(tmp_path_factory):
  """TinyRectangles prepared as ArrayRecord; returns the data dir."""
  data_dir = tmp_path_factory.mktemp('tiny_rectangles') / 'tfds'
  TinyRectangles(data_dir=str(data_dir)).download_and_prepare(
      file_format='array_record')
  return str(data_dir)


def _jpeg(height, width, seed, noise=False):
  """A smooth (or noisy) random image, JPEG-encoded by Pillow."""
  rng = np.random.default_rng(seed)
  if noise:
    image = rng.integers(0, 256, (height, width, 3))
  else:
    base = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
    image = np.kron(base, np.ones((12, 12, 1)))[:height, :width]
  out = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(out, format='JPEG')
  return out.getvalue()


class BadJpegs(tfds.core.GeneratorBasedBuilder):
  """JPEGs stored byte for byte, with imagenet2012's `file_name` feature.

  Two records do not decode: `TRUNCATED` (a JPEG cut in half) and
  `NOT_IMAGE` (text bytes). tfds stores image bytes as given, and
  `disable_shuffling` keeps the generated order, so a record's index in its
  tfds split is the `i` it was generated with.
  """
  VERSION = tfds.core.Version('1.0.0')
  NUM_TRAIN = 20
  NUM_TEST = 6
  TRUNCATED = ('train', 3)  # In our training split (the first 90%).
  NOT_IMAGE = ('test', 2)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=5),
            'file_name': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, num) for split, num in
            (('train', self.NUM_TRAIN), ('test', self.NUM_TEST))}

  def _generate_examples(self, split, num):
    for i in range(num):
      data = _jpeg(20 + i, 40 - i, seed=i)
      if (split, i) == self.TRUNCATED:  # Past its header, short of its end.
        data = _jpeg(48, 48, seed=i, noise=True)
        data = data[:len(data) * 2 // 3]
      elif (split, i) == self.NOT_IMAGE:
        data = b'This file is no image.'
      yield i, {'image': data, 'label': i % 5,
                'file_name': f'{split}_{i:03d}.JPEG'}


@pytest.fixture(scope='session')
def bad_jpegs(tmp_path_factory):
  """BadJpegs prepared as ArrayRecord; returns the data dir."""
  data_dir = tmp_path_factory.mktemp('bad_jpegs') / 'tfds'
  BadJpegs(data_dir=str(data_dir)).download_and_prepare(
      file_format='array_record')
  return str(data_dir)
