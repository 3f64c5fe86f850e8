"""benchmarks/host_pipeline.py: each measurement runs on tiny data."""

import pytest

from benchmarks import host_pipeline


def test_every_measurement_runs(tmp_path):
  lines = []
  results = host_pipeline.run(
      str(tmp_path), num_images=24, memory_factor=2, memory_budget_mib=1,
      batch_size=2, image_size=32, peak_tflops=989.0, mfu=0.4,
      probe_memory=False, log=lines.append)
  for key in ('train_per_core', 'eval_per_core', 'pipeline_1_workers',
              'cifar_memory', 'cifar_stream'):
    assert results[key] > 0, key
  # The paper model's training FLOPs, 3 x 596.9 G per image as it runs
  # (configs/imagenet_perceiver.py), at 40% of 989 TFLOP/s.
  assert results['images_per_sec_needed'] == pytest.approx(
      989e12 * 0.4 / (3 * 596.9e9), rel=1e-3)
  assert lines[-1].startswith('host_train_images_per_sec_per_core=')
