"""Which examples form each split.

With n = the number of examples of tfds 'train' and
n_train = floor(n * (1 - validation_split)) (Keras' `validation_split` rule):
  train      = tfds 'train' examples [0, n_train)
  validation = tfds 'train' examples [n_train, n)
  test       = tfds `test_split` ('test'; 'auto': the dataset's labelled
               held-out split, see `held_out_split`)
in tfds' stored order (fixed when the dataset was prepared). Which of a
split's examples each step reads is `sampler.py`'s business.

Pure Python, so the config checks (`RULES`) import without tensorflow.
"""

import math

from perceiver_jax import checks
from perceiver_jax import errors

SPLITS = ('train', 'validation', 'test')
EVAL_SPLITS = ('validation', 'test')

# The data options, as the config takes them.
RULES = {
    'dataset': checks.Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                           'a tfds dataset name', 'cifar100'),
    'tfds_data_dir': checks.Rule(
        lambda v: v is None or (isinstance(v, str) and bool(v)),
        'a directory path or unset', '/data/tfds'),
    'validation_split': checks.number(
        0.0, 1.0, low_open=True, high_open=True, example=0.1,
        requirement='strictly between 0 and 1 (the held-out fraction of '
        'tfds "train")'),
    'mock_data': checks.BOOL,
    'test_split': checks.Rule(
        lambda v: isinstance(v, str) and bool(v),
        "'auto' (the dataset's labelled held-out split) or the name of a "
        'tfds split', 'auto'),
    'tfds_manual_dir': checks.Rule(
        lambda v: v is None or (isinstance(v, str) and bool(v)),
        'a directory path or unset (datasets with a manual download, e.g. '
        'imagenet2012)', '/data/imagenet_tars'),
}
OPTION_DEFAULTS = {'tfds_manual_dir': None, 'test_split': 'test'}
# Datasets whose tfds 'test' split has no labels (imagenet2012's are -1).
UNLABELLED_TEST = ('imagenet2012',)


def problems(values, field=str):
  """What is wrong across the data options, as messages."""
  count = values.get('mock_num_examples')
  if values.get('mock_data') and not checks.positive_int().ok(count):
    return [f'{field("mock_num_examples")}={count!r} must be a positive '
            f'integer when {field("mock_data")} is True']
  return []


def held_out_split(test_split, dataset, available):
  """The tfds split that `test_split` names for `dataset`.

  'auto' follows the dataset, so a config can move to other data (e.g.
  fine-tuning an ImageNet model on CIFAR): its 'test' split when that has
  labels, else 'validation'. Any other value is the split's own name.

  Args:
    test_split: `config.test_split`.
    dataset: the tfds builder's name.
    available: the names of the dataset's prepared splits.
  """
  if test_split != 'auto':
    return test_split
  if 'test' in available and dataset not in UNLABELLED_TEST:
    return 'test'
  return 'validation'


def split_ranges(num_train_records, num_test_records, validation_split,
                 dataset='', test_split='test'):
  """`{split: (tfds split, start, stop)}` of the three splits.

  Raises:
    errors.InputError: when `validation_split` leaves a split empty.
  """
  n = num_train_records
  n_train = int(math.floor(n * (1.0 - validation_split)))
  ranges = {'train': ('train', 0, n_train),
            'validation': ('train', n_train, n),
            'test': (test_split, 0, num_test_records)}
  for split, (_, start, stop) in ranges.items():
    if stop <= start:
      raise errors.InputError(
          f'config.validation_split={validation_split} leaves the {split} '
          f'split of {dataset!r} ({n} train examples) empty.')
  return ranges

