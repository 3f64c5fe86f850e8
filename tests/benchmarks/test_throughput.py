"""The benchmark harness: CI's 1-step smoke run and its modes."""

import os
import re
import subprocess
import sys
import types

from configs import cifar100
from configs import fake_data
import jax
import jax.numpy as jnp
import pytest

from benchmarks import throughput
from perceiver_jax.model import perceiver
from tests.support import ROOT

# Same HLO, quicker XLA:CPU code generation; the FLOP count does not change.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
LAST_LINE = re.compile(r'images_per_sec=(\S+) mfu=(\S+)')


def test_cli_smoke_run_without_tensorflow():
  """`python benchmarks/throughput.py ... --steps=1` where tensorflow is absent.

  `sys.modules['tensorflow'] = None` makes any import of it fail, as on the
  GPU machines. The run uses conftest's 8 CPU devices (a sharded step).
  """
  code = ("import runpy, sys; sys.modules['tensorflow'] = None; "
          "runpy.run_path('benchmarks/throughput.py', run_name='__main__')")
  env = dict(os.environ, JAX_DEFAULT_PRNG_IMPL='rbg')  # Quicker to compile.
  result = subprocess.run(
      [sys.executable, '-c', code, '--config=configs/fake_data.py',
       '--config.num_iterations=1', '--steps=1', '--warmup=0',
       '--peak_matmul_size=128'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  match = LAST_LINE.fullmatch(lines[-1])
  assert match, lines[-1]
  images_per_sec, mfu = map(float, match.groups())
  assert images_per_sec > 0 and 0 < mfu < 1
  assert any('devices: 8 x' in line for line in lines), lines
  assert any('XLA / analytic' in line for line in lines), lines


def test_host_pipeline_mode_on_mock_data(monkeypatch):
  """The rates are batch / median timed step, warmup excluded, per core.

  The harness's clock is replaced by one that only the batch source moves,
  by a known time per batch, so every rate it reports has an exact value
  that does not come from the harness itself.
  """
  # Imports tensorflow, as the mode does; the train-step tests need none.
  # pylint: disable-next=g-import-not-at-top
  from perceiver_jax.data import input_pipeline
  config = fake_data.get_config()  # tfds mock data, batch 16.
  warmup, steps = 1, 3
  # Seconds per batch drawn: the gather loop (1 warmup + 3 timed), then the
  # augmentation loop (same). A slow warmup batch and an outlier among the
  # timed ones: only the median of the timed ones gives 0.2 s and 0.5 s.
  durations = iter([9.0, 0.1, 0.2, 0.6, 9.0, 0.5, 0.4, 3.0])
  clock = [0.0]
  shapes = []
  original = input_pipeline.Pipeline.train_batch

  def timed_batch(self, epoch, step):
    batch = original(self, epoch, step)
    shapes.append(batch['image'].shape)
    clock[0] += next(durations)
    return batch

  monkeypatch.setattr(input_pipeline.Pipeline, 'train_batch', timed_batch)
  monkeypatch.setattr(throughput, 'time',
                      types.SimpleNamespace(perf_counter=lambda: clock[0]))
  lines = []
  results = throughput.benchmark_host_pipeline(config, steps=steps,
                                               warmup=warmup, log=lines.append)
  # Every batch it timed was drawn, each a full batch of raw images.
  assert shapes == [(config.batch_size, 32, 32, 3)] * 2 * (warmup + steps)
  cores = len(os.sched_getaffinity(0))  # What this process may run on.
  rate = config.batch_size / 0.5
  assert results['cores'] == cores
  assert results['gather_images_per_sec'] == pytest.approx(
      config.batch_size / 0.2)
  assert results['images_per_sec'] == pytest.approx(rate)
  assert results['images_per_sec_per_core'] == pytest.approx(rate / cores)
  assert lines[0].startswith(
      f'host: {cores} CPU cores available; batch {config.batch_size},')
  assert lines[-1] == (f'host_images_per_sec={rate:.3f} '
                       f'host_images_per_sec_per_core={rate / cores:.3f}')


def test_keras_reference_is_the_seed_model():
  """Same parameter count as the Flax model: 9,697,637 for the seed config."""
  from benchmarks import keras_reference  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = cifar100.get_config()
  keras_model = keras_reference.build_seed_model(
      config, 100, mean=[120.0] * 3, variance=[4000.0] * 3)
  keras_model(np.zeros((1, 32, 32, 3), np.float32))
  flax_params = jax.eval_shape(
      lambda: perceiver.create_model(config, 100).init(
          jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  flax_count = sum(x.size for x in jax.tree.leaves(flax_params))
  assert keras_model.count_params() == flax_count == 9_697_637
