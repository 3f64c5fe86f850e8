"""Test setup: 8 simulated CPU devices, so sharded code runs as on a pod."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Must happen before jax is imported anywhere. The tests check numbers, not
# speed, on tiny models, where compiling is most of the time: XLA's backend
# optimisations off compile about a third faster. The processes the tests
# start (tests/support.py, the workers) take the same flags, so their
# numbers compare bit for bit with this process's.
os.environ.setdefault('PERCEIVER_TEST_XLA_FLAGS',
                      '--xla_backend_optimization_level=0')
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8',
     os.environ['PERCEIVER_TEST_XLA_FLAGS']])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One persistent compilation cache for every process the tests start
# (main.py runs, multi-host workers): many compile the same programs. Made
# once by the first process to get here (pytest-xdist's workers inherit it)
# and removed by it at exit.
if 'PERCEIVER_TEST_JAX_CACHE' not in os.environ:
  os.environ['PERCEIVER_TEST_JAX_CACHE'] = tempfile.mkdtemp(
      prefix='perceiver_test_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['PERCEIVER_TEST_JAX_CACHE'],
                  ignore_errors=True)

# The `fake_cifar100` and `gcs` (a local GCS emulator) fixtures, for every
# test module.
pytest_plugins = ['tests.data.tfds_fixtures', 'tests.gcs_emulator']


# The modules that take longest, longest first. pytest-xdist's `--dist
# loadfile` hands whole modules to the workers in collection order, so these
# start first and the workers finish together instead of one of them
# running the longest module alone at the end.
SLOWEST_MODULES = (
    'tests/training/test_resilience.py',
    'tests/training/test_gcs.py',
    'tests/training/test_slices.py',
    'tests/training/test_multihost.py',
    'tests/benchmarks/test_device_check.py',
    'tests/training/test_loop.py',
    'tests/training/test_recipe.py',
    'tests/training/test_steps.py',
    'tests/training/test_grad_accum.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.nodeid.split('::')[0],
                                       len(rank)))


@pytest.fixture(scope='session')
def cache_dir():
  """The session's persistent compilation cache (see above)."""
  return os.environ['PERCEIVER_TEST_JAX_CACHE']
