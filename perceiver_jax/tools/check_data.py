"""`--mode=check_data`: decode every record a config's run would read.

  python main.py --mode=check_data --config=configs/imagenet_perceiver.py

A damaged record (a truncated JPEG, a file that is no image) stops a run
when it is first read, which may be days in. This reads, before the run,
every record of the splits the config uses: tfds 'train' (our training and
validation splits, `data/splits.py`) and `config.test_split`, and decodes
each image at full size as the input workers would, in grain worker
processes on every CPU this process may use (`storage.usable_cpus`), with
a progress bar. It prints each record that does not decode (our split,
tfds split, index, file_name where the dataset has one, the decoder's
error) or that all N decode; `main.py` exits with status 1 when any does
not.

It needs no accelerator: neither this process nor its workers start a jax
backend (they import jax, through the config checks and grain, but never
ask for a device), so it runs beside a training job or on a machine
without one. The dataset must be prepared as ArrayRecord.
"""

import dataclasses
import sys
from typing import Any

import grain

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import grain_workers
from perceiver_jax.data import host_transforms
from perceiver_jax.data import records
from perceiver_jax.data import splits as splits_lib
from perceiver_jax.data import storage

RECORDS_PER_TASK = 256


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record that does not decode."""
  split: str  # Ours: 'train', 'validation' or 'test'.
  tfds_split: str
  index: int  # In the tfds split.
  file_name: str | None
  error: str

  def __str__(self):
    name = f', file_name {self.file_name!r}' if self.file_name else ''
    return (f'{self.split} split (tfds {self.tfds_split!r}), record '
            f'{self.index}{name}: {self.error}')


@dataclasses.dataclass(frozen=True)
class _Checker:
  """Decodes records [start, stop) of a tfds split; pickled to each worker.

  Attributes:
    sources: `{tfds split: tfds data source}`.
    transform: decodes as the pipeline does (`HostTransform.decode`).
  """
  sources: Any
  transform: host_transforms.HostTransform

  def __call__(self, key):
    """`[(index, file_name, error)]` of the records of `key` that do not
    decode; `key` is (tfds split, start, stop)."""
    tfds_split, start, stop = key
    bad = []
    for index in range(start, stop):
      record = self.sources[tfds_split][index]
      try:
        self.transform.decode(record['image'])
      except host_transforms.DecodeError as e:
        bad.append((index, records.file_name(record), str(e)))
    return bad


def _our_split(ranges, tfds_split, index):
  for split, (t, start, stop) in ranges.items():
    if t == tfds_split and start <= index < stop:
      return split
  return 'unused'


def check(config, num_workers=None, progress=True):
  """Every record of `config`'s splits that does not decode, and how many
  records were read.

  Args:
    config: a training config (its data fields are what count).
    num_workers: worker processes; default `storage.usable_cpus()`.
    progress: whether to draw a tqdm bar (on stderr).

  Returns:
    `([BadRecord], number of records)`.
  """
  config_lib.validate(config)
  if config.mock_data:
    raise errors.InputError(
        'config.mock_data=True: tfds mock data has no stored records to '
        'check. Pass the dataset a run will read (--config.mock_data=False).')
  builder = datasets.builder(config)
  info = datasets.dataset_info(builder, config)
  test_split = config_lib.option(config, 'test_split')
  if not builder.info.splits:
    raise errors.InputError(
        f'Dataset {config.dataset!r} is not prepared in {builder.data_dir}; '
        f'prepare it once with `{datasets.build_command(config)}` (or let '
        'the training run do it), then check it.')
  splits = datasets.check_splits(builder, test_split)
  sizes = {t: splits[t].num_examples for t in ('train', test_split)}
  ranges = splits_lib.split_ranges(sizes['train'], sizes[test_split],
                                   config.validation_split, builder.name,
                                   test_split)
  checker = _Checker(
      {t: datasets.data_source(builder, t, config) for t in sizes},
      host_transforms.HostTransform('none', info.height, info.width,
                                    info.channels))
  keys = [(t, a, min(a + RECORDS_PER_TASK, n)) for t, n in sizes.items()
          for a in range(0, n, RECORDS_PER_TASK)]
  workers = min(num_workers or storage.usable_cpus(), len(keys))
  iterator = grain_workers.open_iterator(
      grain.MapDataset.source(keys).map(checker), workers)
  bad = []
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  try:
    with tqdm.tqdm(total=sum(sizes.values()), unit=' records',
                   desc=f'Decoding {builder.name}', disable=not progress,
                   file=sys.stderr) as bar:
      for (t, start, stop), found in zip(keys, iterator):
        bad += [BadRecord(_our_split(ranges, t, i), t, i, name, error)
                for i, name, error in found]
        bar.update(stop - start)
  finally:
    grain_workers.close(iterator)
  return bad, sum(sizes.values())


def run(config, out=sys.stdout):
  """Prints what `check` finds; returns True when every record decodes."""
  bad, total = check(config)
  splits = ' and '.join(sorted({b.tfds_split for b in bad}))
  for record in bad:
    print(f'Bad record: {record}', file=out)
  if bad:
    print(f'{len(bad)} of {total:,} records of {config.dataset} do not '
          f'decode (tfds {splits}). Prepare the dataset again, or replace '
          'or remove those files and prepare it again; a run would stop at '
          'the first.', file=out)
  else:
    print(f'All {total:,} records of {config.dataset} decode.', file=out)
  return not bad
