"""Runs killed at any moment, preempted or diverged: exact resume or clean stop.

Each run is a real `main.py` process on mock data (one CPU device, 3 epochs
of 4 steps, a checkpoint every 2 steps). Faults are injected at exact
moments through the PERCEIVER_JAX_FAULT hook; SIGKILL leaves no chance to
clean up, as in a crash or a lost VM.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.support import ROOT
from tests.support import run_main
from tests.support import subprocess_env

FLAGS = ('--config.num_epochs=3', '--config.checkpoint_every_steps=2')


def _run(workdir, fault=None, extra=(), devices=1, record=None):
  env = {'PERCEIVER_JAX_FAULT': fault} if fault else {}
  if record:
    env['PERCEIVER_JAX_RECORD'] = str(record)
  old = dict(os.environ)
  os.environ.update(env)
  try:
    return run_main(workdir, *FLAGS, *extra, devices=devices)
  finally:
    os.environ.clear()
    os.environ.update(old)


def _final(workdir):
  """history.json bytes and the newest checkpoint's arrays, as numpy."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(ckpt_dir, str(step), 'state'))
  with open(os.path.join(workdir, 'history.json'), 'rb') as f:
    return step, f.read(), state


def _assert_identical(a, b, step=12):
  step_a, history_a, state_a = a
  step_b, history_b, state_b = b
  assert step_a == step_b == step
  assert history_a == history_b
  flat_a = ocp.tree.to_flat_dict(state_a)
  flat_b = ocp.tree.to_flat_dict(state_b)
  assert flat_a.keys() == flat_b.keys()
  assert any('opt_state' in str(k) for k in flat_a)
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]),
                                  err_msg=str(k))


@pytest.fixture(scope='module')
def reference_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  proc = _run(workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


@pytest.fixture(scope='module')
def reference(reference_workdir):
  return _final(reference_workdir)


def test_more_epochs_continue_exactly_where_a_longer_run_would_be(
    tmp_path, reference):
  """Two epochs, then the same workdir with num_epochs=3: the run resumes
  after epoch 2 and ends bit-identical to the uninterrupted three."""
  for epochs in (2, 3):
    proc = _run(tmp_path, extra=(f'--config.num_epochs={epochs}',))
    assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'Resuming from step 8 ' in proc.stderr
  _assert_identical(_final(tmp_path), reference)


@pytest.mark.parametrize('fault,resumes_from', [
    # Mid-epoch 2, once the step-6 checkpoint has landed.
    ('kill_after_step@7', (6,)),
    # Validation of epoch 2: the asynchronous step-6 save may or may not
    # have landed; either way the rerun must end identically.
    ('kill_in_eval@2', (4, 6)),
    # During the step-10 save; a save starts only after the previous one
    # (step 8) has landed.
    ('kill_in_checkpoint_write@10', (8,)),
])
def test_sigkill_then_rerun_matches_uninterrupted_run(
    tmp_path, reference, fault, resumes_from):
  killed = _run(tmp_path, fault=fault)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  entries = os.listdir(tmp_path / 'checkpoints')
  if fault.startswith('kill_in_checkpoint_write'):
    # The write was cut off: a temporary directory, never a step directory.
    assert '10' not in entries
    assert any('tmp' in e for e in entries), entries
  rerun = _run(tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert any(f'Resuming from step {s} ' in rerun.stderr for s in resumes_from)
  _assert_identical(_final(tmp_path), reference)


def _truncate_arrays(checkpoint):
  """Empties every file of a checkpoint's array data, as a full disk might."""
  damaged = 0
  for root, _, files in os.walk(os.path.join(checkpoint, 'state')):
    for name in files:
      if os.path.basename(root) == 'd':  # OCDBT data files.
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(0)
        damaged += 1
  assert damaged, f'no array files under {checkpoint}'


def _stream_flags(data_dir):
  """Tiny JPEGs read, cropped and flipped by a grain worker process."""
  return ('--config.mock_data=False', '--config.dataset=tiny_jpegs',
          f'--config.tfds_data_dir={data_dir}', '--config.batch_size=8',
          '--config.num_epochs=2', '--config.host_crop=inception',
          '--config.device_augment=none', '--config.data_storage=stream',
          '--config.data_workers=1')


@pytest.fixture(scope='module')
def stream_reference(tmp_path_factory, tiny_jpegs):
  workdir = tmp_path_factory.mktemp('stream_reference')
  proc = _run(workdir, extra=_stream_flags(tiny_jpegs))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'Test accuracy: ' in proc.stdout  # Trained end to end.
  assert 'leaked shared_memory' not in proc.stderr  # Workers cleaned up.
  return _final(workdir)


def test_streaming_run_killed_mid_epoch_resumes_exactly(
    tmp_path, tiny_jpegs, stream_reference):
  # 43 training JPEGs, batch 8: 5 steps per epoch; killed in epoch 2 once
  # the step-6 checkpoint has landed. No iterator state is saved: the
  # sampler alone says where to read on.
  killed = _run(tmp_path, fault='kill_after_step@7',
                extra=_stream_flags(tiny_jpegs))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  rerun = _run(tmp_path, extra=_stream_flags(tiny_jpegs))
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert 'Resuming from step 6 ' in rerun.stderr
  _assert_identical(_final(tmp_path), stream_reference, step=10)


def test_damaged_newest_checkpoint_is_set_aside_and_trained_past(
    tmp_path, reference):
  first = _run(tmp_path, extra=('--config.num_epochs=2',))
  assert first.returncode == 0, first.stderr[-4000:]
  _truncate_arrays(tmp_path / 'checkpoints' / '8')
  # Twice: the first rerun trains past step 8; the second finds the run done.
  for _ in range(2):
    rerun = _run(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert 'Resuming from step 12 ' in rerun.stderr
  entries = os.listdir(tmp_path / 'checkpoints')
  assert '8.unreadable' in entries, entries
  _assert_identical(_final(tmp_path), reference)


def test_sigterm_saves_at_the_next_step_and_resumes(tmp_path, reference):
  env = subprocess_env(devices=1)
  cmd = [sys.executable, 'main.py', '--config=configs/fake_data.py',
         f'--workdir={tmp_path}', *FLAGS, '--config.log_every_steps=1']
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  # Announce preemption while the run is still setting up (loading data,
  # compiling): it must still save after its first step.
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if 'steps per epoch' in line:
      proc.send_signal(signal.SIGTERM)
      break
  _, err = proc.communicate(timeout=300)
  err = ''.join(seen) + err
  assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
  assert ('Preemption notice (SIGTERM) received: saved a checkpoint at step '
          '1.') in err
  rerun = _run(tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-4000:]
  assert 'Resuming from step' in rerun.stderr
  _assert_identical(_final(tmp_path), reference)


def test_nan_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
  proc = _run(tmp_path, fault='nan_learning_rate_at_step@6')
  assert proc.returncode == 1
  # Step 6 applies a NaN update: its parameters are the first non-finite.
  assert 'Error: param_norm became nan at step 6.' in proc.stderr
  assert 'Traceback' not in proc.stderr
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints')
                 if d.isdigit())
  assert steps == [2, 4]
  state = ocp.PyTreeCheckpointer().restore(
      os.path.join(tmp_path, 'checkpoints', '4', 'state'))
  assert all(np.isfinite(np.asarray(x)).all()
             for x in ocp.tree.to_flat_dict(state['params']).values())


def test_resumed_run_trains_on_with_the_new_learning_rate(
    tmp_path, reference_workdir):
  workdir = tmp_path / 'run'
  shutil.copytree(reference_workdir, workdir)
  proc = _run(workdir, extra=('--config.num_epochs=4',
                                         '--config.learning_rate=0.0005'))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'the plateau controller continues from 0.0005' in proc.stderr
  with open(workdir / 'history.json') as f:
    rates = [h['learning_rate'] for h in json.load(f)]
  assert rates == [1e-3, 1e-3, 1e-3, 5e-4]


_FULL_DISK_SCRIPT = '''
set -e
mount -t tmpfs -o size=800k tmpfs "$DISK"
"$PYTHON" main.py --config=configs/fake_data.py --workdir="$DISK/run" $FLAGS \
    >"$OUT/full.out" 2>"$OUT/full.err" || echo $? >"$OUT/full.rc"
find "$DISK/run" >"$OUT/full.files"
mount -o remount,size=64m "$DISK"
"$PYTHON" main.py --config=configs/fake_data.py --workdir="$DISK/run" $FLAGS \
    >"$OUT/rerun.out" 2>"$OUT/rerun.err" || echo $? >"$OUT/rerun.rc"
cp -r "$DISK/run" "$OUT/run"
'''


def test_a_full_disk_ends_in_one_paragraph_and_the_rerun_resumes(
    tmp_path, reference):
  """A real full filesystem: an 800 kB tmpfs in a private mount namespace
  (`unshare`, no privileges needed), enlarged before the rerun."""
  disk, out = tmp_path / 'disk', tmp_path / 'out'
  disk.mkdir()
  out.mkdir()
  env = subprocess_env(1)
  env.update(DISK=str(disk), OUT=str(out), PYTHON=sys.executable,
             FLAGS=' '.join(FLAGS))
  proc = subprocess.run(
      ['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c',
       _FULL_DISK_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=900, check=False)
  assert proc.returncode == 0, (
      'Could not run the runs on a small tmpfs in a private mount namespace '
      f'(unshare and mount): {proc.stderr[-2000:]}')
  stderr = (out / 'full.err').read_text()
  assert (out / 'full.rc').read_text().strip() == '1', stderr[-4000:]
  assert 'Traceback' not in stderr, stderr[-4000:]
  last = stderr.strip().splitlines()[-1]
  run = f'{disk}/run'
  prefix = f'Error: No space left on the device writing {run}/'
  assert last.startswith(prefix), stderr[-4000:]
  step = int(last.split('it resumes from checkpoint ')[1].split()[0])
  assert last.endswith(f'rerun the same command: it resumes from checkpoint '
                       f'{step} in {run}/checkpoints.')
  assert step < 12
  files = (out / 'full.files').read_text().split()
  assert not [f for f in files if 'tmp' in os.path.basename(f)], files
  rerun = (out / 'rerun.err').read_text()
  assert not (out / 'rerun.rc').exists(), rerun[-4000:]
  assert f'Resuming from step {step} ' in rerun
  _assert_identical(_final(out / 'run'), reference)
