"""Preemption notices: save at an agreed step, then exit.

A TPU VM (and most schedulers) announces preemption with SIGTERM. The run
finishes the step in flight, saves a checkpoint and exits; rerunning resumes
at the next batch. On several hosts, JAX's preemption sync manager (started
by `jax.distributed.initialize`) picks one step at which every host saves.
"""

import signal

import jax
from jax.experimental import multihost_utils

# Exit status after a preemption checkpoint: 128 + SIGTERM, as if the signal
# had ended the process, so schedulers see a preempted job.
EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
  """Raised after the preemption checkpoint is safely written."""

  def __init__(self, step):
    super().__init__(
        f'Preemption notice (SIGTERM) received: saved a checkpoint at step '
        f'{step}. Rerun the same command to resume from it.')
    self.step = step


class PreemptionWatcher:
  """Tells the training loop when to save and stop after a SIGTERM."""

  def __init__(self):
    self._received = False
    self._previous = None
    # With several processes JAX's own notifier handles SIGTERM and
    # agrees on a step; a Python handler would shadow it.
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._received = True

  def reached(self, step):
    """True at the step where every process should save and stop.

    Must be called after every training step, on every process.
    """
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
