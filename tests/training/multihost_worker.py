"""One process of a multi-process CPU training run (driven by test_multihost).

Usage: multihost_worker.py WORKDIR OUT_NPZ NUM_PROCESSES PROCESS_ID PORT
DEVICES_PER_PROCESS [CONFIG_OVERRIDES_JSON]. Trains the fake-data config
(with the overrides) for one epoch and saves this process's own copy of the
final parameters. The work happens under `__main__`: streaming input
workers are spawned processes that import this file again.
"""

import json
import os
import sys


def main(workdir, out, num_processes, process_id, port, devices,
         overrides='{}'):
  os.environ['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={int(devices)} '
      + os.environ.get('PERCEIVER_TEST_XLA_FLAGS', ''))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from configs import fake_data
  from perceiver_jax.training import loop
  from perceiver_jax.training import sharding
  # pylint: enable=g-import-not-at-top

  if int(num_processes) > 1:
    sharding.initialize_distributed(f'127.0.0.1:{port}', int(num_processes),
                                    int(process_id))
  config = fake_data.get_config()
  config.num_epochs = 1
  config.mock_num_examples = 32
  config.update(json.loads(overrides))
  state, _ = loop.train_and_evaluate(config, workdir)
  local = {jax.tree_util.keystr(path): np.asarray(x.addressable_data(0))
           for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
  local['__num_devices__'] = np.asarray(jax.device_count())
  local['__step__'] = np.asarray(state.step.addressable_data(0))
  np.savez(out, **local)


if __name__ == '__main__':
  main(*sys.argv[1:])
