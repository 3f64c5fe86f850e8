"""benchmarks/device_check.py: the accelerator run, rehearsed on the CPU.

The smoke run is the real script in a fresh process that can import neither
tensorflow, tfds nor an installed ml_collections, only one from a wheel, as
on the accelerator images. The rest checks, in-process, what the smoke run
cannot show: the verdicts and the time guard.
"""

import json
import os
import subprocess
import sys
import types
import zipfile

import ml_collections
import pytest

from benchmarks import device_check
from benchmarks import fast_paths
from tests.support import ROOT

# Makes tensorflow and tfds unimportable, and ml_collections importable only
# from a .whl on sys.path, then runs the script as `python` would.
HIDE = """
import importlib.abc, importlib.machinery, runpy, sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None

class OnlyFromWheels(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name != 'ml_collections':
      return None
    wheels = [p for p in sys.path if p.endswith('.whl')]
    spec = importlib.machinery.PathFinder.find_spec(name, wheels)
    if spec is None:
      raise ModuleNotFoundError('ml_collections is hidden (no wheel)')
    return spec

sys.meta_path.insert(0, OnlyFromWheels())
runpy.run_path('benchmarks/device_check.py', run_name='__main__')
"""


def _wheel(folder):
  """The installed ml_collections as a pure-Python wheel (a zip)."""
  package = os.path.dirname(ml_collections.__file__)
  path = os.path.join(folder, 'ml_collections-0+test-py3-none-any.whl')
  with zipfile.ZipFile(path, 'w') as z:
    for root, _, files in os.walk(package):
      for name in files:
        if name.endswith('.py'):
          full = os.path.join(root, name)
          z.write(full, os.path.relpath(full, os.path.dirname(package)))
  return path


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  wheels = tmp_path_factory.mktemp('wheels')
  wheel = _wheel(wheels)
  out = tmp_path_factory.mktemp('out')
  env = dict(os.environ, JAX_DEFAULT_PRNG_IMPL='rbg',  # Quicker to compile.
             XLA_FLAGS='--xla_force_host_platform_device_count=1 '
             + os.environ.get('PERCEIVER_TEST_XLA_FLAGS', ''))
  proc = subprocess.run(
      [sys.executable, '-c', HIDE, f'--out={out}', '--smoke',
       f'--wheels={wheels}',
       '--configs=configs/cifar100_fast.py+float32,configs/no_such_config.py'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / 'device_check.json') as f:
    results = json.load(f)
  with open(out / 'device_check.md') as f:
    table = f.read()
  return proc, results, table, wheel


def test_smoke_run_without_tensorflow_or_installed_ml_collections(smoke):
  proc, results, table, wheel = smoke
  assert results['environment']['ml_collections'].startswith(wheel)
  assert [(s['name'], s['status']) for s in results['sections']] == [
      ('setup', 'done'), ('checks', 'done'), ('seed', 'done'),
      ('configs', 'done')]
  # Every section printed its time, and the table is the last output.
  for name in ('setup', 'checks', 'seed', 'configs'):
    assert f'== {name}: starts at' in proc.stdout
  assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])

  checks = {c['path']: c for c in results['checks']}
  assert checks['float32']['verdict'] == 'reference'
  for path in ('bfloat16', 'remat', 'factored'):
    assert checks[path]['verdict'] == 'ok', checks[path]
    assert checks[path]['against'] == 'float32'
    assert 0 <= checks[path]['loss'] <= fast_paths.TOLERANCES['loss']
  assert checks['cudnn (bfloat16)']['verdict'].startswith(
      'skipped: fused cuDNN attention is GPU-only')

  timings = [(t['config'], t['dtype'], t['batch']) for t in
             results['timings']]
  # The seed in both dtypes at batch 1 (the checks' programs) and 2, then
  # cifar100_fast; a missing config is a note, not an error.
  assert timings == [('cifar100', 'float32', 1), ('cifar100', 'float32', 2),
                     ('cifar100', 'bfloat16', 1), ('cifar100', 'bfloat16', 2),
                     ('cifar100_fast', 'float32', 1)]
  assert results['notes'] == [
      'configs/no_such_config.py does not exist (yet): not timed.']
  for t in results['timings']:
    assert t['images_per_sec'] > 0 and 0 < t['mfu'] < 1, t
    assert t['epoch_s'] == pytest.approx(45_000 / t['images_per_sec'])
    assert t['epochs_min'] == pytest.approx(45 * t['epoch_s'] / 60)
    assert t['roofline_bound'] in ('compute', 'memory')
  assert sum(bool(t.get('best')) for t in results['timings']) == 2
  assert '| cifar100_fast | float32 | 1 |' in table


def test_max_minutes_skips_every_section(tmp_path):
  flags = types.SimpleNamespace(
      out=str(tmp_path), max_minutes=0.0, plan_scale=1.0, smoke=True,
      sections=['setup', 'checks', 'seed', 'configs'], compile_threads=1,
      seed_config='configs/cifar100.py', configs=[], check_batch=8,
      check_steps=1, sweep_start=8, sweep_max=16, min_gain=0.05, steps=1,
      warmup=0, peak_matmul_size=128, bandwidth_bytes=2**20)
  results = device_check.run(flags, log=lambda line: None)
  assert {s['status'] for s in results['sections']} == {
      'skipped: --max_minutes=0 reached'}
  assert not results['checks'] and not results['timings']
  with open(tmp_path / 'device_check.json') as f:
    assert json.load(f)['sections'] == results['sections']
