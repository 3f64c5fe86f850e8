"""What several test modules share: the repository root and main.py runs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *flags, devices=2, cache_dir=None, timeout=600):
  """Runs main.py with the fake-data config in a fresh process."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  if cache_dir:
    # Reruns compile the same programs; the persistent cache saves that time.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  cmd = [sys.executable, 'main.py', '--config=configs/fake_data.py',
         f'--workdir={workdir}', *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
