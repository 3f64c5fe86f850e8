"""Orbax checkpoints: the latest few and the best, fallback on damage."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_jax.training import checkpointing


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


def test_mid_epoch_saves_do_not_displace_the_best(tmp_path):
  manager = checkpointing.create_manager(tmp_path / 'ckpt', max_to_keep=1)
  _save_epochs(manager, [1])
  for step in (11, 12, 13):  # Saves without metrics (mid-epoch).
    checkpointing.save(manager, step, _state(step), {'epoch': 1})
  manager.wait_until_finished()
  manager.reload()
  assert sorted(manager.all_steps()) == [10, 13]


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
  assert checkpointing.select_checkpoint(manager) == (10, 'best')

  # No epoch finished: no best is recorded, so the latest, with a warning.
  other = checkpointing.create_manager(tmp_path / 'none', max_to_keep=5)
  checkpointing.save(other, 3, _state(3), {'best_step': None})
  other.wait_until_finished()
  with caplog.at_level('WARNING'):
    assert checkpointing.select_checkpoint(other) == (3, 'latest')
  assert 'latest checkpoint' in caplog.text
  # restore_best_weights=False: training tested its final weights.
  assert checkpointing.select_checkpoint(manager, restore_best=False) == (
      25, 'latest')
  manager.close()
  other.close()
