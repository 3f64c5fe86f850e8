"""What an exception from reading a checkpoint says about its files.

Only damage to the files (`DAMAGED`) may get a checkpoint set aside for
good (`checkpointing.restore_latest`); a failure of the storage or the host
(`TRANSIENT`) is retried, and anything else (`OTHER`) stops the run. When in
doubt a failure is not damage: setting aside an intact checkpoint loses the
work since the one before it, stopping loses nothing. Pure Python.
"""

import json
import re

DAMAGED, TRANSIENT, OTHER = 'damaged', 'transient', 'other'
# tensorstore raises ValueError('CODE: ...'). Truncated, corrupted and
# missing array files read as these codes...
_DAMAGE_STATUSES = ('DATA_LOSS', 'OUT_OF_RANGE', 'NOT_FOUND')
# ...an unreachable or overloaded store (GCS), its own retries spent, as
# these.
_TRANSIENT_STATUSES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'ABORTED',
                       'RESOURCE_EXHAUSTED', 'CANCELLED')
_STATUS = re.compile(r'([A-Z_]+): ')
# Orbax's KeyError for a step that lacks an item's directory.
_MISSING_ITEM = 'was not found in the checkpoint'


def chain(error):
  """`error` and the exceptions it was raised from, outermost first."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _status(error):
  match = _STATUS.match(str(error))
  return match.group(1) if match else None


def failure_kind(error):
  """DAMAGED, TRANSIENT or OTHER: what a restore's exception says.

  DAMAGED only for what orbax and tensorstore raise on damaged files: a
  truncated, corrupted or missing array file; a corrupted, truncated or
  missing JSON file; a missing item or step directory (tests/training/
  test_checkpointing.py damages real checkpoints each way). TRANSIENT for
  failures of the storage or the host, not the files: any other OSError
  (ConnectionError, TimeoutError, EIO, ...), MemoryError, and tensorstore's
  unreachable-store codes. Anything else (e.g. a checkpoint of another
  model) is OTHER. Where the exception chain holds both, TRANSIENT wins.
  """
  damaged = False
  for e in chain(error):
    if (isinstance(e, (FileNotFoundError, NotADirectoryError,
                       IsADirectoryError, json.JSONDecodeError,
                       UnicodeDecodeError))
        or _status(e) in _DAMAGE_STATUSES
        or (isinstance(e, KeyError) and _MISSING_ITEM in str(e))):
      damaged = True
    elif (isinstance(e, (OSError, MemoryError))
          or _status(e) in _TRANSIENT_STATUSES):
      return TRANSIENT
  return DAMAGED if damaged else OTHER
