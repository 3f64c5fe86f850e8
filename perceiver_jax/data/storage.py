"""Which storage serves the batches: in host memory, or streamed from disk.

One interface (`input_pipeline.Pipeline`), two storages: `memory.py` decodes
the dataset once and keeps it (fastest while it fits: CIFAR's 184 MB),
`streaming.py` reads records from ArrayRecord files in worker
processes as batches are needed (host memory independent of dataset size:
ImageNet). Both serve the same examples in the same order (`sampler.py`);
for fixed-size images they decode them identically too.

`data_storage='auto'` keeps data in memory when its images have one size,
are used whole (`host_crop='none'`) and all three splits decoded take at
most `MEMORY_BUDGET_BYTES` (every process holds them all: an epoch's
batches draw from the whole training split); otherwise it streams. Pure
Python.
"""

import os

from perceiver_jax import checks

STORAGES = ('auto', 'memory', 'stream')
MEMORY_BUDGET_BYTES = 4 * 2**30

# The storage options, as the config takes them.
RULES = {
    'data_storage': checks.one_of(*STORAGES),
    'data_workers': checks.Rule(
        lambda v: checks.is_int(v) and v >= -1,
        'an integer >= -1 (-1: one per CPU core but one; 0: read in the '
        'training process)', -1),
    'normalization_examples': checks.non_negative_int(
        '0: the whole training split', example=10000),
}
OPTION_DEFAULTS = {'data_storage': 'auto', 'data_workers': -1,
                   'normalization_examples': 0}


def problems(values, field=str):
  """What is wrong across the storage options, as messages."""
  if values.get('host_crop') != 'inception':
    return []
  if values.get('data_storage') == 'memory':
    return [f'{field("data_storage")}=\'memory\' cannot serve '
            f'{field("host_crop")}=\'inception\' (its random crops change '
            "every epoch); pass --config.data_storage=stream (or auto)"]
  if values.get('mock_data'):
    return [f'{field("mock_data")}=True serves whole images from memory, '
            f'so it cannot take {field("host_crop")}=\'inception\'; pass '
            '--config.host_crop=none']
  return []


def choose(config, info, num_examples, host_crop):
  """'memory' or 'stream' for `config.data_storage` (see the module doc).

  Args:
    config: the run's config.
    info: the `datasets.DatasetInfo`.
    num_examples: examples of the three splits together.
    host_crop: the `host_transforms` crop in use.
  """
  kind = config.get('data_storage', OPTION_DEFAULTS['data_storage'])
  if config.mock_data:
    return 'memory'  # tfds' mock serves tf.data only.
  if kind != 'auto':
    return kind
  size = num_examples * info.height * info.width * info.channels
  fits = (not info.variable_size and host_crop == 'none'
          and size <= MEMORY_BUDGET_BYTES)
  return 'memory' if fits else 'stream'


def num_workers(config):
  """Worker processes for streaming (`data_workers`, -1: automatic)."""
  workers = config.get('data_workers', OPTION_DEFAULTS['data_workers'])
  return max(1, (os.cpu_count() or 2) - 1) if workers == -1 else workers
