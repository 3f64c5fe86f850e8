"""tfds datasets: checking a config's dataset, preparing it, opening its files.

`config.dataset` names any tfds image classification dataset with `image`
and `label` features. A first run prepares it (`prepare`): tfds downloads
and writes it as ArrayRecord files, which both storages read record by
record (`data_source`); datasets prepared earlier as TFRecord are read by
the in-memory storage through tf.data. Datasets that need a manual download
(ImageNet) say which files go where, and the command to prepare them.

Importing this module does not import tensorflow (tfds loads it lazily).
"""

import dataclasses
import difflib

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import tensorflow_datasets as tfds

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import host_transforms

ARRAY_RECORD = 'array_record'
TFRECORD = 'tfrecord'


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the logs need to know about the dataset.

  `height` and `width` are the size of the images the host serves
  (`host_transforms.served_size`): the stored size, or `image_size` for
  Inception crops and for datasets whose images vary in size
  (`variable_size`).
  """
  name: str
  height: int
  width: int
  channels: int
  num_classes: int
  class_names: tuple[str, ...]
  version: str = ''  # The tfds version of the prepared data.
  variable_size: bool = False


def builder(config):
  """The tfds builder, after checking the data dir and the name."""
  data_dir = config.get('tfds_data_dir')
  if data_dir is not None:
    _ensure_data_dir(data_dir)
  try:
    return tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(config.dataset, tfds.list_builders())
    hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
    raise errors.InputError(
        f'config.dataset={config.dataset!r} is not a tfds dataset.{hint} Pass '
        'a name from tfds.list_builders(), e.g. --config.dataset=cifar100.'
    ) from None


def _ensure_data_dir(data_dir):
  """Creates `config.tfds_data_dir` if need be, as tfds would; checks it reads.

  A first ImageNet preparation names a folder that does not exist yet; only
  a path that cannot be a readable folder is refused.
  """
  path = epath.Path(data_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
      raise NotADirectoryError(f'{data_dir} is not a directory')
    next(iter(path.iterdir()), None)  # Readable?
  except OSError as e:
    raise errors.InputError(
        f'config.tfds_data_dir={data_dir!r} is not a readable directory and '
        f'could not be created ({e}); pass a folder this user may create or '
        'read, e.g. --config.tfds_data_dir=~/tensorflow_datasets.') from None


def dataset_info(data_builder, config):
  """Checks the features the pipeline relies on and summarises them."""
  features = data_builder.info.features
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
  variable = height is None or width is None
  height, width = host_transforms.served_size(
      config_lib.option(config, 'host_crop'),
      height, width, config.image_size)
  return DatasetInfo(
      name=data_builder.name, height=height, width=width, channels=channels,
      num_classes=label.num_classes, class_names=tuple(label.names),
      version=str(data_builder.info.version), variable_size=variable)


def get_dataset_info(config) -> DatasetInfo:
  """Validates the dataset config cheaply and describes the dataset.

  Class names are the real ones once the dataset is prepared (CIFAR's come
  from the archive); before that tfds may only know '0', '1', ...
  """
  return dataset_info(builder(config), config)


def file_format(data_builder):
  """'array_record' or 'tfrecord': how the prepared dataset is stored."""
  fmt = data_builder.info.file_format
  return getattr(fmt, 'value', fmt) or TFRECORD


def build_command(config, data_builder=None):
  """The shell command that prepares `config.dataset` as ArrayRecord."""
  data_dir = config.get('tfds_data_dir') or '~/tensorflow_datasets'
  manual = config.get('tfds_manual_dir') or 'MANUAL_DIR'
  if data_builder is None:
    data_builder = builder(config)
  manual_flag = (f' --manual_dir={manual}'
                 if data_builder.MANUAL_DOWNLOAD_INSTRUCTIONS else '')
  return (f'tfds build {config.dataset} --data_dir={data_dir}{manual_flag} '
          f'--file_format={ARRAY_RECORD}')


def _download_and_prepare(config, data_builder):
  manual_dir = config.get('tfds_manual_dir')
  try:
    data_builder.download_and_prepare(
        file_format=ARRAY_RECORD,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except (AssertionError, FileNotFoundError) as e:
    instructions = data_builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    if not instructions:
      raise
    where = (f'config.tfds_manual_dir={manual_dir!r}' if manual_dir else
             'the manual dir (config.tfds_manual_dir, unset)')
    raise errors.InputError(
        f'Dataset {config.dataset!r} is not prepared and must be downloaded '
        f'by hand: {" ".join(instructions.split())} Put them in {where} and '
        f'rerun, or prepare it once with '
        f'`{build_command(config, data_builder)}` '
        f'({type(e).__name__}: {str(e).splitlines()[0][:200]}).') from None


def prepare(config, data_builder=None):
  """Downloads and prepares the dataset on first use (no-op when prepared).

  New preparations are written as ArrayRecord, which both storages read.
  Process 0 goes first so the download happens once on a shared data dir;
  the others then prepare too, which is a no-op on a shared dir and needed
  on local disks.

  Args:
    config: the run's config.
    data_builder: `builder(config)` where the caller has it already.

  Returns:
    The builder of the prepared dataset: `data_builder` when the data was
    prepared before it was made, else a new one, which reads the prepared
    dataset's metadata (split sizes, file format).
  """
  if data_builder is None:
    data_builder = builder(config)  # Validates before anyone downloads.
  if config.mock_data:
    return data_builder
  prepared = data_builder.is_prepared()
  if jax.process_index() == 0:
    _download_and_prepare(config, data_builder)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('perceiver_jax.datasets.prepare')
    if jax.process_index() != 0:
      _download_and_prepare(config, data_builder)
  return data_builder if prepared else builder(config)


def check_splits(data_builder, test_split='test'):
  """Raises InputError unless the prepared dataset has train and test."""
  splits = data_builder.info.splits
  missing = {'train', test_split} - set(splits.keys())
  if missing:
    raise errors.InputError(
        f'Dataset {data_builder.name!r} at {data_builder.data_dir} has splits '
        f'{sorted(splits.keys())}; the pipeline needs train and '
        f'{test_split} (config.test_split; missing {sorted(missing)}). Run '
        'prepare(config) first, or pick another dataset or test split.')
  return splits


def data_source(data_builder, tfds_split, config):
  """Random access to a split's records: `{'image': bytes, 'label': int}`.

  Images stay encoded (PNG or JPEG bytes); the input workers decode them.
  """
  try:
    return data_builder.as_data_source(
        split=tfds_split, decoders={'image': tfds.decode.SkipDecoding()})
  except NotImplementedError:  # Prepared as TFRecord: no random access.
    raise errors.InputError(
        f'Dataset {data_builder.name!r} in {data_builder.data_dir} is '
        f'prepared as {file_format(data_builder)}, and reading it record by '
        'record (streaming, config.data_storage) needs ArrayRecord files. '
        'Convert it once, in place, with `tfds convert_format '
        f'--dataset_version_dir={data_builder.data_dir} '
        f'--out_file_format={ARRAY_RECORD}`, or prepare it anew with '
        f'`{build_command(config)}`, or pass --config.data_storage=memory.'
    ) from None
