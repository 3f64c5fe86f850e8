"""benchmarks/step_bench.py: the batch sweep, on made-up timings."""

from benchmarks import cases
from benchmarks import step_bench


def _sweep(rates, first=64, last=4096, wave=3, out_of_time=lambda: False):
  """`batch_sweep` over fake timings: batch -> images/s, or 'oom'."""
  waves = []

  def run_wave(batches):
    waves.append(batches)
    for b in batches:
      rate = rates[b]
      yield ({'batch': b, 'oom': True} if rate == 'oom' else
             {'batch': b, 'images_per_sec': rate})

  rows, best, reason = step_bench.batch_sweep(first, last, wave, 0.05,
                                                run_wave, out_of_time)
  return [r['batch'] for r in rows], best and best['batch'], reason, waves


def test_batch_sweep_stops_where_it_should():
  # Doubling pays until 512 (310 images/s is not 5% over 300): the best is
  # still 512, the fastest timed, and 1024 is never timed.
  rates = {64: 100, 128: 190, 256: 300, 512: 310, 1024: 400}
  assert _sweep(rates) == ([64, 128, 256, 512], 512, 'no gain',
                           [[64, 128, 256], [512, 1024, 2048]])
  # Slower at 256: the best stays at 128.
  assert _sweep({64: 100, 128: 190, 256: 150})[1:3] == (128, 'no gain')
  # Out of memory at 128, mid-wave: the rest of the wave is not timed.
  assert _sweep({64: 100, 128: 'oom', 256: 500})[:3] == (
      [64, 128], 64, 'does not fit')
  assert _sweep({64: 100, 128: 190, 256: 'oom'}, wave=1)[:3] == (
      [64, 128, 256], 128, 'does not fit')
  # The largest batch allowed, and the time guard.
  assert _sweep({64: 100, 128: 190}, last=128)[1:3] == (
      128, 'largest batch (--sweep_max) reached')
  assert _sweep({}, out_of_time=lambda: True)[:3] == (
      [], None, 'out of time')


def test_initial_state_builds_no_train_step(monkeypatch):
  """A fresh state on the devices, carrying the lowered program's very model
  and optimiser, made without building (and discarding) a train step."""
  # pylint: disable=g-import-not-at-top
  import jax
  from benchmarks import cases
  from benchmarks import train_program
  from perceiver_jax.training import steps as steps_lib
  # pylint: enable=g-import-not-at-top
  bench = step_bench.Bench(None, 1, log=lambda line: None)
  config = cases.parse_case('fake_data@8').config()
  program = step_bench.Program(
      'fake_data', config,
      step=train_program.build(config, bench.mesh, abstract=True))
  built = []
  monkeypatch.setattr(steps_lib, 'jit_steps',
                      lambda *args: built.append(args))
  first, second = (bench.initial_state(program) for _ in range(2))
  assert not built
  for state in (first, second):
    assert state.apply_fn is program.step.state.apply_fn
    assert state.tx is program.step.state.tx
    assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state) == (
        jax.tree.map(lambda x, s: (x.shape, x.dtype, s), program.step.state,
                     program.step.shardings))
  # Two copies of one initial state: donating one leaves the other.
  assert first.params is not second.params
  assert all(jax.numpy.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(first.params), jax.tree.leaves(second.params)))


def test_architecture_ignores_speed_fields_only():
  """Programs that differ only in speed options share one train state."""
  from configs import fake_data  # pylint: disable=g-import-not-at-top
  config = fake_data.get_config()
  faster = cases.variant(config, dtype='bfloat16', remat=True,
                         attention_form='factored', batch_size=64)
  assert step_bench.architecture(faster) == step_bench.architecture(config)
  wider = cases.variant(config, latent_dim=16)
  assert step_bench.architecture(wider) != step_bench.architecture(config)
