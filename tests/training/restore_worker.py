"""One of two processes restoring checkpoints together (test_checkpointing).

Usage: restore_worker.py CHECKPOINT_DIR OUT_JSON PROCESS_ID PORT. Both
processes save steps 10, 20 and 30 of a small state sharded over their two
devices, then run `restore_latest` in several scenarios in which only
process 1's reads fail: errors injected into `checkpointing.read`, then
real damage to the files only process 1 reads (its shard of step 20's
array). Each process writes what it saw to OUT_JSON: the step restored
(with the first and last value of this process's shard) or the error, the
steps it read, those whose real read raised, and the checkpoint
directory's entries afterwards.
"""

import json
import os
import sys


def _errors(kind, count):
  """`count` errors of `kind`, as orbax and tensorstore raise them."""
  make = {
      'transient': lambda: ConnectionError('Connection reset by peer'),
      'unavailable': lambda: ValueError(
          'UNAVAILABLE: Error reading "step/.zarray" in OCDBT database'),
      'damaged': lambda: ValueError(
          'DATA_LOSS: Error reading "params.w/0" in OCDBT database: Error '
          'decoding b-tree node'),
      'other': lambda: ValueError('Requested shape: (7,) is not compatible '
                                  'with the stored shape: (65536,).'),
  }[kind]
  return [make() for _ in range(count)]


SIZE = 2**16  # Elements of the array sharded over the two processes.
# Scenario -> {step: errors of process 1's successive reads}, in order; the
# last one damages step 30 for good.
SCENARIOS = {
    'transient_once': {30: _errors('transient', 1)},
    'transient_always': {30: _errors('unavailable', 3)},
    'other': {30: _errors('other', 1)},
    'damaged': {30: _errors('damaged', 1)},
}


def main(directory, out, process_id, port):
  os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=1 '
                             + os.environ.get('PERCEIVER_TEST_XLA_FLAGS', ''))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental import multihost_utils
  import numpy as np
  from perceiver_jax.training import checkpointing
  from perceiver_jax.training import sharding
  # pylint: enable=g-import-not-at-top

  sharding.initialize_distributed(f'127.0.0.1:{port}', 2, int(process_id))
  mesh = sharding.create_mesh()

  def state(value):  # Large enough that OCDBT keeps w out of its b-tree.
    w = np.arange(SIZE, dtype=np.float32) + value
    return {'w': jax.make_array_from_callback(
        (SIZE,), sharding.data_sharding(mesh), lambda index: w[index]),
            'step': jax.device_put(np.int32(value), sharding.replicated(mesh))}

  manager = checkpointing.create_manager(directory, max_to_keep=5)
  for step in (10, 20, 30):
    checkpointing.save(manager, step, state(step), {'epoch': step // 10})
  manager.wait_until_finished()
  abstract = checkpointing.abstract(state(0))
  real_read = checkpointing.read
  seen = {}
  for name, plan in list(SCENARIOS.items()) + [('damaged_here', {})]:
    if name == 'damaged_here':  # Only process 1's shard of step 20's w.
      if jax.process_index() == 0:
        for root, _, files in os.walk(os.path.join(
            directory, '20', 'state', 'ocdbt.process_1')):
          for file in files:
            os.truncate(os.path.join(root, file), 0)
      multihost_utils.sync_global_devices('damaged')
    reads, raised = [], []

    def read(directory, step, abstract_state, plan=plan, reads=reads,
             raised=raised):
      reads.append(step)
      failures = plan.get(step, []) if jax.process_index() == 1 else []
      if reads.count(step) <= len(failures):
        raise failures[reads.count(step) - 1]
      try:
        return real_read(directory, step, abstract_state)
      except Exception:
        raised.append(step)
        raise

    checkpointing.read = read
    try:
      restored, meta = checkpointing.restore_latest(
          manager, abstract, attempts=3, backoff_s=0.01)
      result = {'epoch': meta['epoch'],
                'w': np.asarray(restored['w'].addressable_data(0))[
                    [0, -1]].tolist()}
    except checkpointing.CheckpointUnavailableError as e:
      result = {'error': str(e)}
    result.update(reads=reads, raised=raised,
                  entries=sorted(os.listdir(directory)))
    seen[name] = result
  manager.close()
  with open(out, 'w') as f:
    json.dump(seen, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
