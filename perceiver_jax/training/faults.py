"""Fault injection for resilience tests: one hook object the loop calls.

Tests set `PERCEIVER_JAX_FAULT=<point>@<value>` to kill the process, or
poison the learning rate, at an exact moment of a real run:

  kill_after_step@N            SIGKILL once step N's checkpoint (if due) landed
  kill_in_eval@E               SIGKILL after the first validation batch of
                               epoch E
  kill_in_checkpoint_write@N   SIGKILL while step N's checkpoint is written
  nan_learning_rate_at_step@N  the update to step N uses a NaN learning rate

SIGKILL leaves no chance to clean up, as in a crash or a lost VM.
`PERCEIVER_JAX_RECORD=<file>` appends, per train step, a digest of every
example of this process's batch to `file` (JSON lines), so a test can
compare which examples two runs consumed. Unset, every hook is a no-op.
"""

import hashlib
import json
import os
import signal

ENV = 'PERCEIVER_JAX_FAULT'
RECORD_ENV = 'PERCEIVER_JAX_RECORD'


class Faults:
  """The hooks; `Faults.from_env()` reads the one fault a test asked for."""

  def __init__(self, spec=None, record=None):
    self.point, _, value = (spec or '').partition('@')
    self.value = int(value) if value else None
    self.record = record

  @classmethod
  def from_env(cls):
    return cls(os.environ.get(ENV), os.environ.get(RECORD_ENV))

  def consumed(self, step, batch):
    """Notes the examples of the local `batch` that makes step `step`."""
    if self.record:
      digests = [hashlib.blake2b(image.tobytes(), digest_size=8).hexdigest()
                 for image in batch['image']]
      with open(self.record, 'a', encoding='utf-8') as f:
        f.write(json.dumps({'step': step, 'examples': digests}) + '\n')

  def _at(self, point, value):
    return self.point == point and self.value == value

  def _kill_at(self, point, value):
    if self._at(point, value):
      os.kill(os.getpid(), signal.SIGKILL)

  def learning_rate(self, step, learning_rate):
    """The rate of the update from `step` to `step + 1`."""
    return (float('nan') if self._at('nan_learning_rate_at_step', step + 1)
            else learning_rate)

  def after_step(self, step, manager):
    if self._at('kill_after_step', step):
      manager.wait_until_finished()  # Crash after the last save landed.
      self._kill_at('kill_after_step', step)

  def in_eval(self, epoch):
    self._kill_at('kill_in_eval', epoch)

  def in_checkpoint_write(self, step):
    self._kill_at('kill_in_checkpoint_write', step)
