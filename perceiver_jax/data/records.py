"""A stored record that does not decode, named so that it can be found.

An ImageNet run reads 1.28M JPEGs every epoch; one truncated file, or one
that is no image, would otherwise stop it days in with a decoder's message
that names no record. `BadRecordError` names the dataset, the split (ours and
the tfds split it comes from), the record's index in that tfds split and,
where the dataset stores one, its `file_name` (imagenet2012 does), and says
what to do. It is an `InputError`, so `main.py` prints it as one paragraph,
and it pickles, so it reaches the training process from a worker intact.

No jax, no tensorflow: the streaming workers run it and ask for no device.
"""

import dataclasses

from perceiver_jax import errors
from perceiver_jax.data import host_transforms

CHECK_COMMAND = 'python main.py --mode=check_data --config=CONFIG'


@dataclasses.dataclass(frozen=True)
class Where:
  """Which split a record is read from.

  Attributes:
    dataset: the tfds dataset name.
    split: ours ('train', 'validation', 'test').
    tfds_split: the tfds split holding it ('train', 'test', 'validation').
  """
  dataset: str
  split: str
  tfds_split: str


def file_name(record):
  """The record's `file_name` feature as text, or None when it has none."""
  name = record.get('file_name') if hasattr(record, 'get') else None
  if isinstance(name, bytes):
    name = name.decode('utf-8', 'replace')
  return None if name is None else str(name)


class BadRecordError(errors.InputError):
  """A record whose image does not decode (see the module doc)."""

  def __init__(self, where, index, name, reason):
    self.where, self.index, self.file_name, self.reason = (where, index, name,
                                                           reason)
    named = f', file_name {name!r}' if name else ''
    super().__init__(
        f'Record {index} of tfds split {where.tfds_split!r} of dataset '
        f'{where.dataset!r} (read for the {where.split} split{named}) does '
        f'not decode: {reason}. The prepared data is damaged. List every bad '
        f'record with `{CHECK_COMMAND}` (the same --config and overrides), '
        'then prepare the dataset again (delete its version directory under '
        'the tfds data dir and rerun `tfds build` or this run), or replace '
        'or remove the source file and prepare again.')

  def __reduce__(self):
    return type(self), (self.where, self.index, self.file_name, self.reason)


def decoded(decode, record, where, index, *args):
  """`decode(record['image'], *args)`, a `BadRecordError` if it cannot."""
  try:
    return decode(record['image'], *args)
  except host_transforms.DecodeError as e:
    raise BadRecordError(where, index, file_name(record), str(e)) from None
