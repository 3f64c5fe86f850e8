"""host_memory: freed memory is reused, so repeated steps stop faulting."""

import os
import subprocess
import sys
import textwrap

import pytest

from perceiver_jax.training import host_memory
from tests.support import ROOT


# Repeats a jitted op whose 32 MiB output is allocated and freed every call,
# in a fresh process (the setting must precede the JAX backend's threads),
# and prints whether memory is retained and the minor page faults per call
# (in the quietest of three windows of ten calls).
SCRIPT = textwrap.dedent('''
    import resource, sys
    from perceiver_jax.training import host_memory
    retained = host_memory.configure(sys.argv[1])
    import jax, jax.numpy as jnp
    x = jnp.ones((2048, 4096), jnp.float32)
    double = jax.jit(lambda x: x * 2)
    for _ in range(20):  # the heap grows to its working size
      double(x).block_until_ready()
    per_call = []
    for _ in range(3):  # the fewest of three windows: growth is one-off
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(10):
        double(x).block_until_ready()
      after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      per_call.append((after - before) / 10)
    print(retained, min(per_call))
''')


def faults_per_call(mode):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', SCRIPT, mode], env=env,
                       capture_output=True, text=True, timeout=300,
                       check=True).stdout.split()
  return out[0] == 'True', float(out[1])


@pytest.mark.skipif(host_memory._glibc() is None, reason='needs glibc')
def test_retained_memory_is_reused_without_page_faults():
  retained, retained_faults = faults_per_call('retain')
  assert retained
  default, default_faults = faults_per_call('system')
  assert not default
  # A fresh 32 MiB buffer is 8,192 pages; reused memory needs none.
  assert default_faults > 4000, default_faults
  assert retained_faults < default_faults / 20, (retained_faults,
                                                 default_faults)


def test_auto_retains_only_without_accelerators(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert host_memory.accelerator_plugin_installed()
  assert not host_memory.configure('auto')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not host_memory.accelerator_plugin_installed()


def test_unknown_mode_is_rejected():
  with pytest.raises(ValueError, match='host memory mode'):
    host_memory.configure('tcmalloc')
