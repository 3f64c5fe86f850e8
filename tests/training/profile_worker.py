"""One process of a 2-process profile (driven by test_profiling).

Usage: profile_worker.py WORKDIR NUM_PROCESSES PROCESS_ID PORT. Joins
jax.distributed, then traces steps 2..3 of 4 calls of a trivial step into
WORKDIR with `profiling.Profile`, every process stopping its trace at the
same moment (a barrier first), as hosts sharing a workdir do.
"""

import os
import sys


def main(workdir, num_processes, process_id, port):
  os.environ['XLA_FLAGS'] = ('--xla_force_host_platform_device_count=1 '
                             + os.environ.get('PERCEIVER_TEST_XLA_FLAGS', ''))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  # pylint: disable=g-import-not-at-top
  from configs import fake_data
  from etils import epath
  import jax
  from jax.experimental import multihost_utils
  import jax.numpy as jnp
  from perceiver_jax.training import profiling
  from perceiver_jax.training import sharding
  # pylint: enable=g-import-not-at-top

  sharding.initialize_distributed(f'127.0.0.1:{port}', int(num_processes),
                                  int(process_id))
  config = fake_data.get_config()
  config.profile_steps = (2, 2)
  profile = profiling.Profile(config, epath.Path(workdir), steps_per_epoch=4)
  step = jax.jit(lambda state, batch, learning_rate: (state + 1, {}))
  state = jnp.zeros((), jnp.int32)
  with profile:
    train_step = profile.wrap(step, 0)
    for number in range(1, 5):
      if number == 3:
        multihost_utils.sync_global_devices('stop the traces together')
      state, _ = train_step(state, None, 0.1)
  assert int(state) == 4


if __name__ == '__main__':
  main(*sys.argv[1:])
