"""Orbax checkpoints: the latest few and the best, fallback on damage.

A checkpoint is set aside only when it is damaged: the damage tests below
damage real checkpoints and check what orbax and tensorstore raise for it;
transient failures (storage, memory) are injected.
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.training import checkpointing
from perceiver_jax.training import read_failures
from tests.support import ROOT
from tests.support import subprocess_env

WORKER = os.path.join(ROOT, 'tests', 'training', 'restore_worker.py')


def _state(value):
  return {'params': {'w': jnp.full((4,), float(value))},
          'step': jnp.asarray(value, jnp.int32)}


def _save_epochs(manager, best_epochs):
  for epoch, best in enumerate(best_epochs, start=1):
    checkpointing.save(manager, epoch * 10, _state(epoch),
                       {'epoch': epoch, 'history': list(range(epoch))},
                       is_best=best == epoch)
  manager.wait_until_finished()


def test_keeps_latest_few_and_the_best(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=2)
  # The early-stopping best is epoch 2 from epoch 2 on.
  _save_epochs(manager, [1, 2, 2, 2, 2, 2])
  manager.reload()
  assert sorted(manager.all_steps()) == [20, 50, 60]
  state, meta = checkpointing.restore(manager, 20,
                                      checkpointing.abstract(_state(0)))
  np.testing.assert_array_equal(state['params']['w'], np.full((4,), 2.0))
  assert meta == {'epoch': 2, 'history': [0, 1]}


def test_mid_epoch_saves_do_not_displace_the_best(tmp_path, caplog):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=1)
  _save_epochs(manager, [1])
  for step in (11, 12, 13):  # Mid-epoch saves.
    checkpointing.save(manager, step, _state(step), {'epoch': 1})
  manager.wait_until_finished()
  manager.reload()
  assert sorted(manager.all_steps()) == [10, 13]
  # Orbax warns at every save of a manager that tracks a metric when the
  # save gives none.
  assert 'tracked_metric' not in caplog.text


def test_before_the_first_improvement_only_the_latest_are_kept(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=1)
  for step in (1, 2, 3):  # Mid-epoch saves of the first epoch.
    checkpointing.save(manager, step, _state(step), {'epoch': 0})
  manager.wait_until_finished()
  manager.reload()
  assert manager.all_steps() == [3]


def test_a_save_that_cannot_fit_is_refused_before_it_starts(tmp_path,
                                                           monkeypatch):
  directory = tmp_path / 'ckpt'
  manager = checkpointing.create_manager(directory, max_to_keep=2)
  _save_epochs(manager, [1])
  free = checkpointing.SPACE_MARGIN_BYTES  # Less than 16 bytes + margin.
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage',
                      lambda path: shutil._ntuple_diskusage(10**9, 0, free))
  with pytest.raises(OSError) as e:
    checkpointing.save(manager, 20, _state(2), {'epoch': 2}, is_best=True)
  assert e.value.errno == errno.ENOSPC
  assert e.value.filename == str(directory / '20')
  assert sorted(os.listdir(directory)) == ['10']


def test_unfinished_saves_are_removed(tmp_path):
  directory = tmp_path / 'ckpt'
  manager = checkpointing.create_manager(directory)
  _save_epochs(manager, [1])
  (directory / '20.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  assert checkpointing.remove_unfinished(directory) == [
      '20.orbax-checkpoint-tmp']
  assert os.listdir(directory) == ['10']


def test_restore_latest_skips_a_damaged_checkpoint(tmp_path, caplog):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=3)
  _save_epochs(manager, [1, 2, 3])
  # Truncate every file of the newest checkpoint's array data.
  damaged = tmp_path / 'ckpt' / '30' / 'state'
  for root, _, files in os.walk(damaged):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(0)
  with caplog.at_level('WARNING'):
    state, meta = checkpointing.restore_latest(
        manager, checkpointing.abstract(_state(0)))
  assert meta['epoch'] == 2
  assert int(state['step']) == 2
  assert '30 is unreadable' in caplog.text
  # Set aside under a name orbax ignores, and named in the warning, so the
  # run can save step 30 again.
  assert f'to {tmp_path / "ckpt" / "30.unreadable"}' in caplog.text
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['10', '20', '30.unreadable']
  assert sorted(manager.all_steps()) == [10, 20]
  checkpointing.save(manager, 30, _state(3), {'epoch': 3}, is_best=False)
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [10, 20, 30]


def test_restore_latest_on_empty_dir_is_none(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=3)
  assert checkpointing.restore_latest(
      manager, checkpointing.abstract(_state(0))) is None


def test_abstract_keeps_shape_dtype_and_sharding():
  tree = _state(3)
  abstract = checkpointing.abstract(tree)
  leaf = abstract['params']['w']
  assert isinstance(leaf, jax.ShapeDtypeStruct)
  assert leaf.shape == (4,) and leaf.dtype == jnp.float32
  assert leaf.sharding == tree['params']['w'].sharding




def test_a_later_improvement_replaces_the_best(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=1)
  _save_epochs(manager, [1, 2, 2, 4, 4, 4])
  manager.reload()
  assert sorted(manager.all_steps()) == [40, 60]


def test_best_survives_reopening_the_manager(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=1)
  _save_epochs(manager, [1])
  manager.close()
  # A resumed run opens a new manager; the best must still be known.
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=1)
  checkpointing.save(manager, 20, _state(2), {'epoch': 2}, is_best=False)
  checkpointing.save(manager, 30, _state(3), {'epoch': 3}, is_best=False)
  manager.wait_until_finished()
  manager.reload()
  assert sorted(manager.all_steps()) == [10, 30]
  assert manager.best_step() == 10


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=3)
  _save_epochs(manager, [1, 2])
  other_model = {'params': {'w': jnp.zeros((7,))},
                 'step': jnp.asarray(0, jnp.int32)}
  with pytest.raises(checkpointing.NoUsableCheckpointError,
                     match=r'None of the checkpoints \[20, 10\]'):
    checkpointing.restore_latest(manager, checkpointing.abstract(other_model))
  # The code, not the files, may be at fault: nothing is set aside.
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['10', '20']


def test_select_checkpoint_prefers_the_recorded_best(tmp_path, caplog):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=5)
  checkpointing.save(manager, 10, _state(1), {'best_step': 10}, is_best=True)
  checkpointing.save(manager, 20, _state(2), {'best_step': 10}, is_best=False)
  checkpointing.save(manager, 25, _state(3), {'best_step': 10})  # Mid-epoch.
  manager.wait_until_finished()
  best = {'early_stopping': {'restore_best_weights': True}}
  assert checkpointing.select_checkpoint(manager, best) == (10, 'best')

  # No epoch finished: no best is recorded, so the latest, with a warning.
  other = checkpointing.create_manager(tmp_path / 'none', max_to_keep=5)
  checkpointing.save(other, 3, _state(3), {'best_step': None})
  other.wait_until_finished()
  with caplog.at_level('WARNING'):
    assert checkpointing.select_checkpoint(other, best) == (3, 'latest')
  assert 'latest checkpoint' in caplog.text
  # restore_best_weights=False: training tested its final weights.
  final = {'early_stopping': {'restore_best_weights': False}}
  assert checkpointing.select_checkpoint(manager, final) == (25, 'latest')
  manager.close()
  other.close()


def test_tested_step_is_the_best_only_where_training_tested_it(caplog):
  best = {'early_stopping': {'restore_best_weights': True}}
  final = {'early_stopping': {'restore_best_weights': False}}
  assert checkpointing.tested_step(best, 10, 30, [30, 20, 10], 'd') == (
      10, 'best')
  assert checkpointing.tested_step({}, 10, 30, [30, 10], 'd') == (10, 'best')
  assert checkpointing.tested_step(final, 10, 30, [30, 10], 'd') == (
      30, 'latest')
  with caplog.at_level('WARNING'):
    assert checkpointing.tested_step(best, 10, 30, [30, 20], 'd') == (
        30, 'latest')
  assert 'The best checkpoint (step 10) was deleted in d' in caplog.text


def test_read_weights_reads_the_weights_alone(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt')
  state = dict(_state(1), opt_state={'mu': jnp.zeros((1000,))},
               ema_params={'w': jnp.full((4,), 0.5)})
  checkpointing.save(manager, 10, state, {})
  manager.wait_until_finished()
  weights = checkpointing.read_weights(tmp_path / 'ckpt', 10)
  assert sorted(weights) == ['ema_params', 'params']
  assert isinstance(weights['params']['w'], np.ndarray)
  np.testing.assert_array_equal(weights['ema_params']['w'], [0.5] * 4)
  checkpointing.save(manager, 20, _state(2), {})  # No EMA.
  manager.wait_until_finished()
  assert sorted(checkpointing.read_weights(tmp_path / 'ckpt', 20)) == [
      'params']
  manager.close()


# --------------------------------------------------------------------------
# Damaged, or only unreadable for now: what is set aside.


def _saved(tmp_path, steps=(10, 20, 30), size=4):
  """A manager holding `steps`, each of a `size`-element state."""
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=5)
  for step in steps:
    state = {'params': {'w': jnp.asarray(np.random.default_rng(step).normal(
        size=size), jnp.float32)}, 'step': jnp.asarray(step, jnp.int32)}
    checkpointing.save(manager, step, state, {'epoch': step // 10})
  manager.wait_until_finished()
  return manager, checkpointing.abstract(state)


def _files(path, where):
  return [os.path.join(root, name) for root, _, names in os.walk(path)
          for name in names if where(os.path.join(root, name))]


def _cut(fraction):
  def damage(path):
    with open(path, 'r+b') as f:
      f.truncate(int(os.path.getsize(path) * fraction))
  return damage


def _scramble(path):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    data[::7] = bytes(b ^ 0xFF for b in data[::7])
    f.seek(0)
    f.write(data)


_ARRAY_DATA = lambda p: f'{os.sep}d{os.sep}' in p
_META = lambda p: f'{os.sep}meta{os.sep}' in p and p.endswith('metadata')


# What each damage raises (orbax 0.12.8, tensorstore 0.1.86), as recorded:
@pytest.mark.parametrize('where, damage, raised', [
    # ValueError('OUT_OF_RANGE: ... Requested byte range [0, n) is not
    # valid for value of size m') from tensorstore, or orbax's
    # Exception('Encountered error while reading array index') caused by it.
    (_ARRAY_DATA, _cut(0.0), 'OUT_OF_RANGE'),
    (_ARRAY_DATA, _cut(0.5), 'OUT_OF_RANGE'),
    # ValueError('DATA_LOSS: ... Error decoding b-tree node').
    (_ARRAY_DATA, _scramble, 'DATA_LOSS'),
    # ValueError('NOT_FOUND: ... Error reading byte range of local file').
    (_ARRAY_DATA, os.remove, 'NOT_FOUND'),
    # ValueError('DATA_LOSS: ... Error decoding manifest').
    (lambda p: p.endswith('manifest.ocdbt'), _cut(0.0), 'DATA_LOSS'),
    # The meta item's JSON: json.JSONDecodeError, UnicodeDecodeError,
    # FileNotFoundError.
    (_META, _cut(0.0), 'JSONDecodeError'),
    (_META, _scramble, 'UnicodeDecodeError'),
    (_META, os.remove, 'FileNotFoundError'),
])
def test_damaged_files_are_recognised_as_damage(tmp_path, where, damage,
                                                raised):
  manager, abstract = _saved(tmp_path, steps=(10,), size=100_000)
  files = _files(tmp_path / 'ckpt' / '10', where)
  assert files
  for path in files:
    damage(path)
  with pytest.raises(Exception) as e:
    checkpointing.read(manager.directory, 10, abstract)
  chain = list(read_failures.chain(e.value))
  assert any(raised in f'{type(x).__name__} {x}' for x in chain), chain
  assert read_failures.failure_kind(e.value) == read_failures.DAMAGED


@pytest.mark.parametrize('remove, raised', [
    ('state', KeyError),  # 'Item "state" was not found in the checkpoint'
    ('meta', KeyError),
    ('.', FileNotFoundError),  # 'Checkpoint at .../10 not found.'
])
def test_missing_directories_are_recognised_as_damage(tmp_path, remove,
                                                      raised):
  manager, abstract = _saved(tmp_path, steps=(10,))
  shutil.rmtree(os.path.normpath(tmp_path / 'ckpt' / '10' / remove))
  with pytest.raises(raised) as e:
    checkpointing.read(manager.directory, 10, abstract)
  assert read_failures.failure_kind(e.value) == read_failures.DAMAGED


def _wrapped(error):
  """`error` as orbax re-raises a failed array read: as the cause of an
  `Exception('Encountered error while reading array index ...')`."""
  wrapper = Exception(  # pylint: disable=broad-exception-raised
      'Encountered error while reading array index: ().')
  wrapper.__cause__ = error
  return wrapper


@pytest.mark.parametrize('error, kind', [
    (ConnectionError('Connection reset by peer'), 'transient'),
    (TimeoutError('timed out'), 'transient'),
    (OSError(5, 'Input/output error'), 'transient'),
    (MemoryError(), 'transient'),
    # tensorstore, GCS unreachable (its own retries spent), as it says it:
    (ValueError('ABORTED: Error opening "zarr" driver: Error reading '
                'gs://bucket/.zarray: All 2 retry attempts failed: CURL '
                'error Could not connect to server'), 'transient'),
    (ValueError('UNAVAILABLE: Error reading "step/.zarray"'), 'transient'),
    (_wrapped(ValueError('DEADLINE_EXCEEDED: Error reading "params.w/0"')),
     'transient'),
    (_wrapped(ValueError('OUT_OF_RANGE: Requested byte range')), 'damaged'),
    # A checkpoint of another model: the code, not the files.
    (ValueError('Requested shape: (7,) is not compatible with the stored '
                'shape: (4,).'), 'other'),
    (RuntimeError('something else'), 'other'),
])
def test_failure_kinds(error, kind):
  assert read_failures.failure_kind(error) == kind


def _inject(monkeypatch, plan):
  """Makes `checkpointing.read` raise `plan[step]`'s errors in turn, then
  read; returns the list of steps read."""
  real, reads = checkpointing.read, []

  def read(directory, step, abstract_state):
    reads.append(step)
    failures = plan.get(step, [])
    if reads.count(step) <= len(failures):
      raise failures[reads.count(step) - 1]
    return real(directory, step, abstract_state)

  monkeypatch.setattr(checkpointing, 'read', read)
  return reads


def test_transient_failures_are_retried_and_nothing_is_set_aside(
    tmp_path, monkeypatch, caplog):
  manager, abstract = _saved(tmp_path)
  reads = _inject(monkeypatch, {30: [TimeoutError('timed out'),
                                     MemoryError()]})
  with caplog.at_level('WARNING'):
    _, meta = checkpointing.restore_latest(manager, abstract, attempts=3,
                                           backoff_s=0.01)
  assert meta['epoch'] == 3 and reads == [30, 30, 30]
  assert caplog.text.count('trying again in') == 2
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['10', '20', '30']


def test_lasting_transient_failures_stop_without_setting_aside(
    tmp_path, monkeypatch):
  manager, abstract = _saved(tmp_path)
  unavailable = [ValueError('UNAVAILABLE: Error reading "step/.zarray"')
                 for _ in range(3)]
  reads = _inject(monkeypatch, {30: unavailable})
  with pytest.raises(checkpointing.CheckpointUnavailableError,
                     match=r'ckpt/30 could not be read in 3 attempts '
                     r'\(ValueError: UNAVAILABLE.*nothing was set aside'):
    checkpointing.restore_latest(manager, abstract, attempts=3,
                                 backoff_s=0.01)
  assert reads == [30, 30, 30]  # The older ones are not tried.
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['10', '20', '30']


def test_a_newer_checkpoint_failing_otherwise_is_not_set_aside(
    tmp_path, monkeypatch):
  manager, abstract = _saved(tmp_path)
  reads = _inject(monkeypatch, {30: [ValueError('Requested shape: (7,) is '
                                                'not compatible')]})
  with pytest.raises(checkpointing.CheckpointUnavailableError,
                     match=r'ckpt/20 restores, but newer ones do not, and '
                     r'not because their files are damaged \(step 30: '):
    checkpointing.restore_latest(manager, abstract, backoff_s=0.01)
  assert reads == [30, 20]
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['10', '20', '30']


def test_damage_twice_at_one_step_keeps_both_copies(tmp_path):
  manager, abstract = _saved(tmp_path, steps=(10, 20))
  first = checkpointing.set_aside(manager, 20)
  state = {'params': {'w': jnp.zeros(4)}, 'step': jnp.asarray(20, jnp.int32)}
  checkpointing.save(manager, 20, state, {'epoch': 'again'})
  manager.wait_until_finished()
  second = checkpointing.set_aside(manager, 20)
  assert (first.name, second.name) == ('20.unreadable', '20.unreadable-1')
  assert sorted(os.listdir(tmp_path / 'ckpt')) == [
      '10', '20.unreadable', '20.unreadable-1']
  # Each holds its own checkpoint.
  for path, epoch in ((first, 2), (second, 'again')):
    assert json.loads((path / 'meta' / 'metadata').read_text()) == {
        'epoch': epoch}
  assert manager.all_steps() == [10]
  del abstract


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_processes_decide_together_and_never_wait_on_each_other(tmp_path):
  """Only process 1's reads fail; both take the same decisions, in time."""
  port, directory = _free_port(), tmp_path / 'ckpt'
  env = subprocess_env(devices=1)
  env.pop('XLA_FLAGS')  # The worker sets it.
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(directory), str(tmp_path / f'p{i}.json'),
       str(i), str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail('The processes still ran after 120 s: one waits on the '
                'other.')
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-6000:]
  p0, p1 = (json.loads((tmp_path / f'p{i}.json').read_text())
            for i in range(2))
  steps = ['10', '20', '30']
  # Process 1 failed once, transiently: both read 30 (process 1 twice).
  assert p0['transient_once']['epoch'] == p1['transient_once']['epoch'] == 3
  half = 2**15  # Each process's shard of step 30's arange(2**16) + 30.
  assert (p0['transient_once']['w'], p1['transient_once']['w']) == (
      [30, 30 + half - 1], [30 + half, 30 + 2 * half - 1])
  assert (p0['transient_once']['reads'], p1['transient_once']['reads']) == (
      [30], [30, 30])
  # ...every time: both stop; only process 1 read again.
  for p in (p0, p1):
    assert 'could not be read in 3 attempts' in p['transient_always'][
        'error']
    assert 'not because their files are damaged' in p['other']['error']
    for name in ('transient_once', 'transient_always', 'other'):
      assert p[name]['entries'] == steps, name
  assert (p0['transient_always']['reads'], p1['transient_always']['reads']) \
      == ([30], [30, 30, 30])
  assert p0['other']['reads'] == p1['other']['reads'] == [30, 20]
  # Damage seen by process 1 only: both restore 20 and 30 is set aside.
  assert p0['damaged']['epoch'] == p1['damaged']['epoch'] == 2
  assert p0['damaged']['entries'] == p1['damaged']['entries'] == [
      '10', '20', '30.unreadable']
  # Real damage to process 1's shard: only its read raises, inside orbax;
  # both agree, restore 10 and set 20 aside.
  assert (p0['damaged_here']['raised'], p1['damaged_here']['raised']) == (
      [], [20])
  assert p0['damaged_here']['epoch'] == p1['damaged_here']['epoch'] == 1
  assert p0['damaged_here']['entries'] == ['10', '20.unreadable',
                                           '30.unreadable']
