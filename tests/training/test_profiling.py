"""config.profile_steps: a jax.profiler trace of exactly the asked-for steps.

Two kinds of test: `main.py` on mock data (one CPU device, 2 epochs of 4
steps; one reference run reused, and the compilation cache shared, as in
test_resilience.py), and the hook alone on a trivial step, in-process, for
what a short run cannot show cheaply (a window across epochs, a run that
fails inside the window).
"""

import glob
import gzip
import json
import os
import subprocess
import sys
import types

from configs import fake_data
import jax
import jax.numpy as jnp
import ml_collections
import portpicker
import pytest

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.training import profiling
from tests.support import ROOT
from tests.support import run_main
from tests.support import subprocess_env


def _run(workdir, *flags):
  return run_main(workdir, *flags, devices=1)


@pytest.fixture(scope='module')
def reference_history(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert not os.path.exists(workdir / profiling.PROFILE_DIR)
  with open(workdir / 'history.json', 'rb') as f:
    return f.read()


def _traced_steps(log_dir):
  """The `train` step numbers in the one Perfetto trace under `log_dir`."""
  runs = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*'))
  assert len(runs) == 1, runs
  assert glob.glob(os.path.join(runs[0], '*.xplane.pb'))  # TensorBoard's.
  with gzip.open(os.path.join(runs[0], 'perfetto_trace.json.gz')) as f:
    events = json.load(f)['traceEvents']
  return sorted(int(e['args']['step_num']) for e in events
                if e.get('name') == 'train')


def test_profiled_run_writes_the_window_and_trains_identically(
    tmp_path, reference_history):
  proc = _run(tmp_path, '--config.profile_steps=(2, 2)')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'Wrote the profile of train steps 2..3' in proc.stderr
  assert _traced_steps(profiling.process_dir(tmp_path, 0)) == [2, 3]
  with open(tmp_path / 'history.json', 'rb') as f:
    assert f.read() == reference_history


def test_each_process_writes_its_own_trace(tmp_path):
  """Two jax.distributed processes sharing a workdir stop tracing at once."""
  port = portpicker.pick_unused_port()
  env = subprocess_env(devices=1)
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'training',
                                    'profile_worker.py'),
       str(tmp_path), '2', str(i), str(port)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
  assert sorted(os.listdir(tmp_path / profiling.PROFILE_DIR)) == [
      'process_0', 'process_1']
  for i in range(2):
    assert _traced_steps(tmp_path / 'profile' / f'process_{i}') == [2, 3]


def test_window_past_the_end_fails_before_compiling(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_LOG_COMPILES', '1')  # Logs every compilation.
  proc = run_main(tmp_path, '--config.profile_steps=(8, 2)', devices=1)
  assert proc.returncode == 1, proc.stderr[-4000:]
  assert ('Error: config.profile_steps=(8, 2) traces steps 8..9, but '
          'training ends at step 8 (config.num_epochs=2 x 4 steps per '
          'epoch)') in proc.stderr
  assert '--config.profile_steps="(7, 2)"' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert 'Compiling' not in proc.stderr
  assert not os.path.exists(tmp_path / profiling.PROFILE_DIR)


# --------------------------------------------------------------------------
# The hook alone.


def _config(**fields):
  """fake_data (2 epochs) with `fields`, of any type (a user's typo too)."""
  return ml_collections.ConfigDict(
      dict(fake_data.get_config().to_dict(), **fields))


def _step(state, batch, learning_rate):
  """Stands in for the train step: the state counts the calls."""
  del batch, learning_rate
  return state + 1, {}


def _epochs(profile, steps_per_epoch, num_epochs, fail_at=None):
  """Runs the loop's calls: a fresh wrap per epoch, inside `with profile`."""
  step_fn = jax.jit(_step)
  state = jnp.zeros((), jnp.int32)
  with profile:
    for epoch in range(num_epochs):
      train_step = profile.wrap(step_fn, epoch * steps_per_epoch)
      for _ in range(steps_per_epoch):
        if fail_at is not None and int(state) + 1 == fail_at:
          raise RuntimeError('step failed')
        state, _ = train_step(state, None, 0.1)
  return int(state)


def test_window_across_an_epoch_end_is_one_trace(tmp_path):
  profile = profiling.Profile(_config(profile_steps=(3, 3)), tmp_path, 4)
  assert _epochs(profile, 4, 2) == 8
  assert _traced_steps(profiling.process_dir(tmp_path, 0)) == [3, 4, 5]


def test_a_run_failing_inside_the_window_stops_the_trace(tmp_path):
  profile = profiling.Profile(_config(profile_steps=(2, 5)), tmp_path, 4)
  with pytest.raises(RuntimeError, match='step failed'):
    _epochs(profile, 4, 2, fail_at=4)
  # The trace was stopped and written with the steps that ran; a new one
  # can start (jax allows one at a time).
  assert _traced_steps(profiling.process_dir(tmp_path, 0)) == [2, 3]
  jax.profiler.start_trace(str(tmp_path / 'again'))
  jax.profiler.stop_trace()


def test_off_leaves_the_step_untouched(tmp_path):
  for steps in ((), (5, 0)):
    profile = profiling.Profile(_config(profile_steps=steps), tmp_path, 4)
    assert profile.window is None
    assert profile.wrap(_step, 0) is _step
  assert not os.path.exists(tmp_path / profiling.PROFILE_DIR)
  # A config saved before the field existed: off.
  legacy = types.SimpleNamespace(get=lambda name, default: default)
  assert profiling.window(legacy) is None


def test_window_checks():
  assert profiling.window(_config(profile_steps=(3, 2))) == (3, 4)
  unused = '/never/written'  # A workdir the checks never write to.
  assert profiling.Profile(_config(profile_steps=(7, 2)), unused, 4).window
  with pytest.raises(errors.InputError, match='ends at step 8'):
    profiling.Profile(_config(profile_steps=(7, 3)), unused, 4)
  for bad in ((0, 2), (2,), (2, -1), (2.0, 3), 'steps 2-3'):
    problems = config_lib.config_problems(_config(profile_steps=bad))
    assert [p for p in problems if p.startswith('config.profile_steps=')], (
        bad, problems)
  assert not config_lib.config_problems(_config(profile_steps=(1, 8)))
