"""Test setup: 8 simulated CPU devices, so sharded code runs as on a pod."""

import os
import sys

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8'])
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The `fake_cifar100` fixture, for every test module.
pytest_plugins = ['tests.data.tfds_fixtures']
