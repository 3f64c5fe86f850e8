"""benchmarks/roofline.py: the prediction's arithmetic and its inputs."""

import json

import jax
import pytest

from benchmarks import roofline

# Same HLO, quicker XLA:CPU code generation; the cost analysis is the same.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def test_predict_is_the_larger_of_the_two_times():
  # 2 TFLOP at 1 PFLOP/s: 2 ms; 1 GB at 1 TB/s: 1 ms.
  p = roofline.predict(2e12, 1e9, 1e15, 1e12)
  assert p['compute_s'] == pytest.approx(2e-3)
  assert p['memory_s'] == pytest.approx(1e-3)
  assert p['time_s'] == pytest.approx(2e-3)
  assert (p['bound'], p['ratio']) == ('compute', pytest.approx(2.0))
  p = roofline.predict(1e12, 3e9, 1e15, 1e12)
  assert p['time_s'] == pytest.approx(3e-3)
  assert (p['bound'], p['ratio']) == ('memory', pytest.approx(3.0))


def test_peaks_by_dtype():
  h100 = roofline.ACCELERATORS[0]
  assert h100.name == 'H100 SXM'
  # GPUs: bfloat16 on the Tensor Cores' dense rate, float32 at TF32's.
  assert roofline.peak_flops(h100, 'bfloat16') == 989e12
  assert roofline.peak_flops(h100, 'float32') == 494.7e12
  # TPUs run jax's default float32 matmul as one bfloat16 pass.
  v5e = roofline.ACCELERATORS[-1]
  assert roofline.peak_flops(v5e, 'float32') == roofline.peak_flops(
      v5e, 'bfloat16') == 197e12


def test_cli_on_a_tiny_config(tmp_path, capsys):
  """One compile of the fake-data step: its cost, the table's arithmetic."""
  out = tmp_path / 'roofline.json'
  with jax.default_prng_impl('rbg'):  # Quicker to compile than threefry.
    roofline.main(['--cases=fake_data@16+bfloat16,no_such_config',
                   f'--json={out}', '--top=3'])
  printed = capsys.readouterr().out
  assert 'no_such_config: skipped' in printed
  (result,) = json.loads(out.read_text())
  assert (result['case'], result['batch'], result['dtype']) == (
      'fake_data@16+bfloat16', 16, 'bfloat16')
  # XLA counts every matmul the analytic count has, plus elementwise work
  # (in this tiny model most of it: augmentation, LAMB, softmax).
  assert result['flops'] > result['model_flops'] > 0
  assert result['bytes'] > 0 and len(result['fusions']) == 3
  (row,) = [line for line in printed.splitlines()
            if line.startswith('| fake_data@16+bfloat16 |')]
  assert row.endswith('| not yet measured |')


def test_table_rows():
  """Each accelerator's cell: its peak for the dtype and its bandwidth."""
  result = {'case': 'c', 'batch': 64, 'dtype': 'float32', 'flops': 2e12,
            'bytes': 5e10}
  header, _, row = roofline.table([result]).splitlines()
  names = [a.name for a in roofline.ACCELERATORS]
  assert [c.strip() for c in header.strip('|').split('|')][6:] == (
      names + ['measured'])
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[:6] == ['c', '64', 'float32', '2,000', '50.0', '40']
  assert cells[-1] == 'not yet measured'
  for cell, accelerator in zip(cells[6:], roofline.ACCELERATORS):
    compute_ms = 2e12 / accelerator.f32_flops * 1e3
    memory_ms = 5e10 / accelerator.bandwidth * 1e3
    predicted = max(compute_ms, memory_ms)
    bound = 'compute' if compute_ms > memory_ms else 'memory'
    ratio = predicted / min(compute_ms, memory_ms)
    assert cell == (f'{predicted:.2f} ms, {bound} {ratio:.1f}x '
                    f'({64 / predicted * 1e3:,.0f}/s)')
  # H100 at TF32: 4.04 ms of compute, 14.93 ms of memory traffic.
  assert cells[6] == '14.93 ms, memory 3.7x (4,288/s)'
  # A step estimated at 20 GB does not fit a 16 GB TPU v5e chip alone.
  row = roofline.table([dict(result, memory_bytes=20e9)]).splitlines()[-1]
  marked = [c.strip().endswith('(!)') for c in row.strip('|').split('|')]
  assert marked[6:-1] == [a.memory < 20e9 for a in roofline.ACCELERATORS]
  assert marked[6:-1] == [False, False, False, True]
