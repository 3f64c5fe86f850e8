"""A streaming `_Reader` that says, with each batch, what its worker's jax did.

Pickled to the grain workers by tests/data/test_streaming.py, which imports
this module (as they do) and puts `ProbingReader` in a pipeline's place.
"""

import dataclasses
import os
import sys

import numpy as np

from perceiver_jax.data import streaming

# pylint: disable=protected-access


def jax_state():
  """[pid, jax imported, a jax backend initialised, jax.distributed on]."""
  jax = sys.modules.get('jax')
  if jax is None:
    return [os.getpid(), 0, 0, 0]
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return [os.getpid(), 1, int(xla_bridge.backends_are_initialized()),
          int(jax.distributed.is_initialized())]


@dataclasses.dataclass(frozen=True)
class ProbingReader(streaming._Reader):
  """Adds 'jax_state' (`jax_state()` where it ran) to each batch; the
  statistics, which return bare sums, fail if jax started a backend."""

  @classmethod
  def of(cls, reader):
    return cls(**{f.name: getattr(reader, f.name)
                  for f in dataclasses.fields(reader)})

  def __call__(self, key):
    result = super().__call__(key)
    if isinstance(result, dict):
      result = dict(result, jax_state=np.asarray(jax_state(), np.int64))
    return result

  def stats_sums(self, indices):
    state = jax_state()
    if state[2] or state[3]:
      raise RuntimeError(f'jax started in a worker: {state}')
    return super().stats_sums(indices)
