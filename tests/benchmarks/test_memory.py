"""benchmarks/memory.py: XLA's memory analysis of the step, by K."""

import json

import jax

from benchmarks import memory


def test_smoke_run(tmp_path, capsys):
  """The tiny model at K=1 and K=4, compiled from abstract inputs."""
  out = tmp_path / 'memory.json'
  with jax.default_prng_impl('rbg'):  # Quicker to compile than threefry.
    memory.main(['--smoke', f'--json={out}'])
  printed = capsys.readouterr().out
  results = json.loads(out.read_text())
  assert [(r['case'], r['batch'], r['accum']) for r in results] == [
      ('fake_data@16', 16, 1), ('fake_data@16', 16, 4)]
  for r in results:
    assert r['peak'] == r['argument'] + r['output'] + r['temp'] - r['alias']
    assert r['alias'] > 0  # The donated state.
    assert f"| fake_data@16 | 16 | float32 | {r['accum']} | " in printed
  one, four = results
  # The same state and batch, fewer activations alive at once.
  assert four['argument'] == one['argument']
  assert four['temp'] < one['temp']
