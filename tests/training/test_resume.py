"""A resumed run: what it keeps from the workdir, what it takes from the config.

Every resumable field a rerun changes takes effect (perceiver_jax/resume.py);
statistics of other data are recomputed or refused (training/experiment.py).
"""

import dataclasses
import json

from etils import epath
import numpy as np
import pytest

from configs import cifar100
from configs import fake_data
from perceiver_jax import errors
from perceiver_jax.model import perceiver
from perceiver_jax.training import callbacks
from perceiver_jax.training import experiment
from perceiver_jax.training import resume
from perceiver_jax.training import sharding
from perceiver_jax.training import steps
from tests.data.test_input_pipeline import pipeline
from tests.data import tfds_fixtures

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


@pytest.fixture(scope='module')
def restored():
  """A fresh tiny train state and meta, as restore_latest would return."""
  config = fake_data.get_config()
  mesh = sharding.create_mesh()
  state, _ = steps.create_train_state(
      config, perceiver.create_model(config, 10), (16, 16, 3), mesh)
  return config, state, experiment.initial_meta(config)


def _stopped_meta(meta, wait):
  stopping = callbacks.EarlyStoppingState(best=1.0, best_epoch=3, wait=wait,
                                          stopped_epoch=3 + wait)
  return dict(meta, early_stopping=callbacks.to_dict(stopping))


def test_unchanged_config_changes_nothing(restored):
  config, state, meta = restored
  new_state, new_meta = resume.adopt_config(state, dict(meta), config,
                                            config.to_dict())
  assert new_state is state and new_meta == meta


def test_a_new_learning_rate_replaces_the_plateau_controllers(restored,
                                                              caplog):
  config, state, meta = restored
  plateau = callbacks.PlateauState(learning_rate=2e-4, best=1.5, wait=2)
  meta = dict(meta, plateau=callbacks.to_dict(plateau))
  changed = config.copy_and_resolve_references()
  changed.learning_rate = 5e-4
  with caplog.at_level('WARNING'):
    _, meta = resume.adopt_config(state, meta, changed, config.to_dict())
  assert 'learning_rate 0.001 -> 0.0005' in caplog.text
  assert callbacks.from_dict(callbacks.PlateauState, meta['plateau']) == (
      dataclasses.replace(plateau, learning_rate=5e-4))
  # Recorded: a second resume with the same config leaves the rate alone,
  # even if the controller has cut it since.
  meta['plateau'] = callbacks.to_dict(plateau)
  _, meta = resume.adopt_config(state, meta, changed, changed.to_dict())
  assert callbacks.from_dict(callbacks.PlateauState, meta['plateau']) == (
      plateau)
  # Checkpoints from before the rate was recorded: config.json tells.
  del meta['config_learning_rate']
  _, meta = resume.adopt_config(state, meta, changed, config.to_dict())
  assert callbacks.from_dict(callbacks.PlateauState,
                             meta['plateau']).learning_rate == 5e-4


def test_a_new_weight_decay_reaches_the_optimiser_state(restored):
  config, state, meta = restored
  changed = config.copy_and_resolve_references()
  changed.weight_decay = 0.05
  state, _ = resume.adopt_config(state, dict(meta), changed, config.to_dict())
  held = state.opt_state.hyperparams['weight_decay']
  assert held.dtype == np.float32 and float(held) == np.float32(0.05)
  assert held.sharding == state.opt_state.hyperparams['learning_rate'].sharding


def test_more_patience_reopens_a_run_that_stopped_early(restored, caplog):
  config, state, meta = restored
  meta = _stopped_meta(meta, wait=2)
  config = config.copy_and_resolve_references()
  config.early_stopping.patience = 2  # As saved: it stays stopped.
  _, kept = resume.adopt_config(state, dict(meta), config, config.to_dict())
  assert callbacks.from_dict(callbacks.EarlyStoppingState,
                             kept['early_stopping']).should_stop
  config.early_stopping.patience = 3
  with caplog.at_level('WARNING'):
    _, reopened = resume.adopt_config(state, dict(meta), config,
                                      config.to_dict())
  stopping = callbacks.from_dict(callbacks.EarlyStoppingState,
                                 reopened['early_stopping'])
  assert not stopping.should_stop and (stopping.wait, stopping.best_epoch) == (
      2, 3)
  assert 'lets it train on' in caplog.text


# --------------------------------------------------------------------------
# Which fields may change.


def test_resume_conflicts_separate_model_from_training_fields():
  saved = cifar100.get_config().to_dict()
  config = cifar100.get_config()
  config.num_epochs = 80
  config.plateau.patience = 5
  config.latent_dim = 128
  config.ffn_units = (128, 128)
  conflicts, allowed = resume.resume_conflicts(saved, config)
  assert conflicts == ['ffn_units: [256, 256] -> [128, 128]',
                       'latent_dim: 256 -> 128']
  assert allowed == ['num_epochs: 50 -> 80', 'plateau.patience: 3 -> 5']
  assert resume.resume_conflicts(saved, cifar100.get_config()) == ([], [])


def test_fields_renamed_since_a_config_was_saved_resume():
  saved = cifar100.get_config().to_dict()
  saved['dropout_rng'] = saved.pop('dropout_bits')
  assert resume.resume_conflicts(saved, cifar100.get_config()) == ([], [])


def test_a_field_the_saved_config_lacks_counts_as_its_default():
  """Workdirs saved before a field existed ran with its default."""
  saved = cifar100.get_config().to_dict()
  for name in ('position_encoding', 'remat', 'ema_decay'):
    saved.pop(name)
  assert resume.resume_conflicts(saved, cifar100.get_config()) == ([], [])
  config = cifar100.get_config()
  config.position_encoding = 'fourier'  # Another model: refused.
  config.remat = True  # A speed option: may change.
  config.ema_decay = 0.999  # Changes what the checkpoint holds: refused.
  conflicts, allowed = resume.resume_conflicts(saved, config)
  assert conflicts == ["ema_decay: <unset: default 0.0> -> 0.999",
                       "position_encoding: <unset: default 'learned'> -> "
                       "'fourier'"]
  assert allowed == ['remat: <unset: default False> -> True']
  # A field nobody knows a default for differs whatever its value.
  saved['mystery'] = 1
  assert resume.resume_conflicts(saved, cifar100.get_config())[0] == [
      'mystery: 1 -> <unset>']


def test_grad_accum_steps_may_change():
  """It changes the order a batch's gradient is summed in, not the step."""
  saved = cifar100.get_config().to_dict()
  config = cifar100.get_config()
  config.grad_accum_steps = 4
  assert resume.resume_conflicts(saved, config) == (
      [], ['grad_accum_steps: 1 -> 4'])
  saved.pop('grad_accum_steps')  # Saved before the field existed.
  assert resume.resume_conflicts(saved, cifar100.get_config()) == ([], [])
  assert resume.resume_conflicts(saved, config) == (
      [], ['grad_accum_steps: <unset: default 1> -> 4'])


# --------------------------------------------------------------------------
# The slice and the batch size.

LAYOUT = {'batch_size': 64, 'steps_per_epoch': 703, 'num_devices': 4}


def _meta(epoch, epoch_step, **recorded):
  """Meta of a checkpoint after `epoch_step` steps of epoch `epoch` + 1."""
  sums = {'loss': 1.0, 'count': 64.0 * epoch_step} if epoch_step else None
  return dict(epoch=epoch, epoch_sums=sums, epoch_step=epoch_step,
              **recorded)


def test_another_device_count_resumes_mid_epoch(caplog):
  meta = _meta(3, 100, **dict(LAYOUT, num_devices=2))
  with caplog.at_level('INFO'):
    resume.adopt_layout(meta, 3 * 703 + 100, None, LAYOUT)
  assert meta['epoch_step'] == 100 and meta['num_devices'] == 4
  assert 'Resuming on 4 devices (the checkpoint was written on 2)' in (
      caplog.text)


def test_another_batch_size_is_refused_mid_epoch_and_taken_at_its_end(
    caplog):
  old = dict(LAYOUT, batch_size=32, steps_per_epoch=1406)
  with pytest.raises(errors.InputError) as e:
    resume.adopt_layout(_meta(3, 100, **old), 3 * 1406 + 100, None, LAYOUT)
  message = str(e.value)
  assert 'middle of epoch 4, trained with batch_size=32' in message
  assert '--config.batch_size=32 --config.num_epochs=4' in message
  assert '\n' not in message
  meta = _meta(3, 0, **old)
  with caplog.at_level('WARNING'):
    resume.adopt_layout(meta, 3 * 1406, None, LAYOUT)
  assert (meta['epoch_step'], meta['batch_size'], meta['steps_per_epoch']) == (
      0, 64, 703)
  assert ('batch_size 32 -> 64 at the end of epoch 3: epochs from 4 on take '
          '703 steps (were 1406)') in caplog.text


def test_checkpoints_from_before_layouts_were_recorded(caplog):
  """They recorded neither the batch size (config.json has it) nor the step
  within the epoch (the global step minus the finished epochs' steps)."""
  saved = {'batch_size': 64}
  meta = _meta(3, 0)
  del meta['epoch_step']
  resume.adopt_layout(meta, 3 * 703, saved, LAYOUT)
  assert meta['epoch_step'] == 0 and meta['batch_size'] == 64
  meta = _meta(3, 100)
  del meta['epoch_step']
  with caplog.at_level('WARNING'):
    resume.adopt_layout(meta, 3 * 703 + 100, saved, LAYOUT)
  assert meta['epoch_step'] == 100
  assert 'written by an earlier version' in caplog.text
  with pytest.raises(errors.InputError, match='batch_size=32'):
    resume.adopt_layout(_meta(3, 100), 0, {'batch_size': 32}, LAYOUT)


# --------------------------------------------------------------------------
# Normalisation statistics and the data they were computed on.


def _stats(workdir, fake, has_checkpoints, **overrides):
  p = pipeline(fake, **overrides)
  config = tfds_fixtures.make_config(fake.data_dir, batch_size=8, **overrides)
  return experiment.normalization_stats(epath.Path(workdir), config, p,
                                   has_checkpoints)


def test_statistics_record_their_data_and_are_reused(tmp_path, fake_cifar100):
  first = _stats(tmp_path, fake_cifar100, False)
  saved = json.loads((tmp_path / 'normalization.json').read_text())
  assert saved['source'] == {
      'dataset': 'cifar100', 'version': '3.0.2', 'mock_data': False,
      'validation_split': 0.1, 'image_shape': [32, 32, 3],
      'num_examples': {'train': 90, 'validation': 10, 'test': 30}}
  # Planted values prove the file, not a recomputation, is read.
  saved['mean'] = [1.0, 2.0, 3.0]
  (tmp_path / 'normalization.json').write_text(json.dumps(saved))
  reused = _stats(tmp_path, fake_cifar100, True)
  np.testing.assert_array_equal(reused['mean'], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(reused['variance'], first['variance'])


def test_statistics_of_other_data_are_recomputed_before_any_checkpoint(
    tmp_path, fake_cifar100, caplog):
  _stats(tmp_path, fake_cifar100, False, validation_split=0.5)
  with caplog.at_level('WARNING'):
    stats = _stats(tmp_path, fake_cifar100, False)
  assert 'validation_split: 0.5 -> 0.1' in caplog.text
  assert 'num_examples.train: 50 -> 90' in caplog.text
  (tmp_path / 'fresh').mkdir()
  np.testing.assert_array_equal(
      stats['mean'], _stats(tmp_path / 'fresh', fake_cifar100, False)['mean'])
  saved = json.loads((tmp_path / 'normalization.json').read_text())
  assert saved['source']['validation_split'] == 0.1


def test_statistics_of_other_data_are_refused_with_checkpoints(
    tmp_path, fake_cifar100):
  _stats(tmp_path, fake_cifar100, False)
  with pytest.raises(errors.InputError, match=(
      r'trained on, and this run reads other data \(num_examples.train: 90 '
      r'-> 50; num_examples.validation: 10 -> 50; validation_split: 0.1 -> '
      r'0.5\)')):
    _stats(tmp_path, fake_cifar100, True, validation_split=0.5)


def test_statistics_from_before_sources_were_recorded(tmp_path,
                                                      fake_cifar100):
  (tmp_path / 'normalization.json').write_text(json.dumps(
      {'mean': [1.0, 2.0, 3.0], 'variance': [4.0, 5.0, 6.0]}))
  # With checkpoints they are the run's own: kept.
  kept = _stats(tmp_path, fake_cifar100, True)
  np.testing.assert_array_equal(kept['mean'], [1.0, 2.0, 3.0])
  # Without, nothing vouches for them: recomputed.
  fresh = _stats(tmp_path, fake_cifar100, False)
  assert not np.allclose(fresh['mean'], [1.0, 2.0, 3.0])
