"""What several test modules share: the repository root and main.py runs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices):
  """The environment of a process the tests start: `devices` CPU devices,
  and the session's persistent compilation cache (tests/conftest.py), since
  many such processes compile the same programs."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} '
             + env.get('PERCEIVER_TEST_XLA_FLAGS', ''),
             JAX_COMPILATION_CACHE_DIR=os.environ['PERCEIVER_TEST_JAX_CACHE'],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def run_main(workdir, *flags, devices=2, timeout=600):
  """Runs main.py with the fake-data config in a fresh process."""
  env = subprocess_env(devices)
  cmd = [sys.executable, 'main.py', '--config=configs/fake_data.py',
         f'--workdir={workdir}', *flags]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
