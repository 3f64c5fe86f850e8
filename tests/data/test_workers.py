"""workers.Pool: order, read-ahead, errors and clean-up, on a toy loader.

The loader takes a key and sleeps so that later keys finish first; its
results carry an array large enough to travel through the buffer files.
"""

import dataclasses
import glob
import os
import threading
import time

import numpy as np
import pytest

from perceiver_jax import errors
from perceiver_jax.data import workers


@dataclasses.dataclass(frozen=True)
class _Loader:
  """`key` -> {'key', 'pixels'}; some keys misbehave (see the tests)."""
  size: int = 256  # 256 x 256 uint8: 64 KiB, past the inline limit.

  def __call__(self, key):
    if key == 'bad input':
      raise errors.InputError('Record 7 of split x is bad; fix it.')
    if key == 'bug':
      return 1 // 0
    if key == 'die':
      os._exit(3)  # pylint: disable=protected-access
    time.sleep(0.2 * (key % 4 == 0))  # Every fourth finishes last.
    return {'key': key,
            'pixels': np.full((self.size, self.size), key % 251, np.uint8)}


def _within(seconds, call, *args):
  """`call(*args)`, failing instead of hanging past `seconds`."""
  outcome = []

  def run():
    try:
      outcome.append((True, call(*args)))
    except Exception as e:  # pylint: disable=broad-except
      outcome.append((False, e))

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert outcome, f'still waiting after {seconds} s'
  ok, value = outcome[0]
  if not ok:
    raise value
  return value


def _files(pool):
  return glob.glob(pool._prefix + '*')  # pylint: disable=protected-access


def _check(result, key):
  assert result['key'] == key
  np.testing.assert_array_equal(result['pixels'],
                                np.full((256, 256), key % 251, np.uint8))


def test_results_come_in_the_order_asked_and_a_miss_restarts():
  pool = workers.Pool(_Loader(), num_workers=2)
  try:
    for key, result in zip(range(12), pool.map(range(12))):
      _check(result, key)
    # Read ahead from 20; then a key that is not the one expected.
    _check(pool.get(20, lambda: range(21, 40)), 20)
    _check(pool.get(21, lambda: range(22, 40)), 21)
    _check(pool.get(30, lambda: range(31, 40)), 30)
    _check(pool.get(31, lambda: ()), 31)
    _check(pool.get(5, lambda: ()), 5)
    assert pool.get(5)['pixels'].flags.writeable  # As the steps may need.
  finally:
    pool.close()
  assert not _files(pool)


def test_worker_errors_reach_the_caller_as_themselves():
  pool = workers.Pool(_Loader(), num_workers=1)
  try:
    with pytest.raises(errors.InputError) as e:
      pool.get('bad input')
    assert str(e.value) == 'Record 7 of split x is bad; fix it.'
    with pytest.raises(ZeroDivisionError) as e:
      pool.get('bug')
    assert 'return 1 // 0' in str(e.value.__cause__)  # The worker's trace.
    _check(pool.get(1), 1)  # The pool serves on.
    with pytest.raises(RuntimeError, match=r'ended unexpectedly \(exit code '
                       r'3;'):
      _within(60, pool.get, 'die')
  finally:
    pool.close()


def test_close_removes_unread_results_and_stops_the_workers():
  pool = workers.Pool(_Loader(), num_workers=2, depth=6)
  pool.get(1, lambda: range(2, 10))
  time.sleep(1.0)  # The read-ahead is written, not yet mapped.
  assert _files(pool)
  processes = list(pool._workers)  # pylint: disable=protected-access
  pool.close()
  assert not _files(pool)
  assert not any(p.is_alive() for p in processes)


def test_buffer_bytes_count_what_is_in_flight_and_held():
  assert workers.buffer_bytes(15, 10) == (2 * 15 + 2) * 10
