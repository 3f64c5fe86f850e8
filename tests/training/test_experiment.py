"""What the experiment builds before step 1: each start-up step done once,
and every check made before the data is read."""

import pytest

from configs import fake_data
from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import input_pipeline
from perceiver_jax.training import experiment
from perceiver_jax.training import transfer
from tests.training.test_transfer import pretrained_workdir

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


def _config(fake_cifar100, **fields):
  """fake_data's tiny model on the fake CIFAR-100 (prepared) dataset."""
  config = fake_data.get_config()
  config.update(mock_data=False, dataset='cifar100',
                tfds_data_dir=fake_cifar100.data_dir, **fields)
  return config


def test_the_tfds_builder_is_made_once(tmp_path, fake_cifar100, monkeypatch):
  made = []
  real = datasets.tfds.builder

  def counting(*args, **kwargs):
    made.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(datasets.tfds, 'builder', counting)
  ex = experiment.Experiment(_config(fake_cifar100), str(tmp_path / 'run'))
  try:
    assert ex.pipeline.steps_per_epoch > 0
  finally:
    ex.close()
  assert made == [('cifar100',)]


def test_a_profile_window_past_the_end_is_refused_before_the_data_is_read(
    tmp_path, fake_cifar100, monkeypatch):

  def loader(*args, **kwargs):
    raise AssertionError('the data was opened')

  monkeypatch.setattr(input_pipeline, 'Pipeline', loader)
  # 90 training examples (10% validate): 5 steps of 16 per epoch, 10 in all.
  config = _config(fake_cifar100, profile_steps=(9, 3))
  with pytest.raises(errors.InputError, match=(
      r'traces steps 9..11, but training ends at step 10 \(config.num_epochs'
      r'=2 x 5 steps per epoch\)')):
    experiment.Experiment(config, str(tmp_path / 'run'))
  config.profile_steps = (9, 2)  # Inside the run: the data is opened.
  with pytest.raises(AssertionError, match='the data was opened'):
    experiment.Experiment(config, str(tmp_path / 'run'))


def test_a_fine_tuning_run_checks_its_source_once(tmp_path, fake_cifar100,
                                                  monkeypatch):
  source = tmp_path / 'source'
  pretrained_workdir(source, _config(fake_cifar100))
  checked = []
  real = transfer.check_source

  def counting(config):
    checked.append(config.init_from)
    return real(config)

  monkeypatch.setattr(transfer, 'check_source', counting)
  ex = experiment.Experiment(_config(fake_cifar100, init_from=str(source)),
                             str(tmp_path / 'run'))
  try:
    ex.restore_or_init()
  finally:
    ex.close()
  assert checked == [str(source)]
