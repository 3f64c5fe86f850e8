"""Transfer (`config.init_from`): a run starts from another run's weights."""

import json

import jax
import numpy as np
import pytest

from configs import fake_data
from perceiver_jax import errors
from perceiver_jax.model import perceiver
from perceiver_jax.training import checkpointing
from perceiver_jax.training import experiment
from perceiver_jax.training import sharding
from perceiver_jax.training import steps
from perceiver_jax.training import transfer

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


def _state(config, num_classes):
  mesh = sharding.create_mesh(jax.devices()[:1])
  model = perceiver.create_model(config, num_classes)
  return steps.create_train_state(config, model, (16, 16, 3), mesh)[0]


def _pretrained_workdir(path, config, num_classes=100):
  """A finished run's workdir: config.json and a best checkpoint whose
  weights differ from any fresh initialisation (+1 everywhere)."""
  state = _state(config, num_classes)
  shifted = jax.tree.map(lambda x: x + 1.0, state.params)
  ema = None if state.ema_params is None else jax.tree.map(
      lambda x: x + 2.0, state.params)
  state = state.replace(params=shifted, ema_params=ema)
  path.mkdir()
  (path / 'config.json').write_text(json.dumps(config.to_dict()))
  manager = checkpointing.create_manager(path / 'checkpoints', max_to_keep=3)
  checkpointing.save(manager, 4, state, {'epoch': 1, 'best_step': 4},
                     is_best=True)
  manager.wait_until_finished()
  manager.close()
  return jax.device_get(ema if ema is not None else shifted)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  path = tmp_path_factory.mktemp('pretrained') / 'run'
  return path, _pretrained_workdir(path, fake_data.get_config())


def _target(source_path, **overrides):
  config = fake_data.get_config()
  config.init_from = str(source_path)
  config.update(overrides)
  return config


def test_the_same_model_takes_every_weight(source):
  path, weights = source
  config = _target(path, dropout_rate=0.5)  # Regularisation may change.
  got = transfer.pretrained_params(config, _state(config, 100).params)
  assert _flat(got).keys() == _flat(weights).keys()
  for name, value in _flat(weights).items():
    np.testing.assert_array_equal(_flat(got)[name], value, err_msg=name)


def test_another_class_count_starts_the_last_layer_afresh(source):
  path, weights = source
  config = _target(path)
  fresh = jax.device_get(_state(config, 10).params)
  got, want = _flat(transfer.pretrained_params(config, fresh)), _flat(weights)
  last = [n for n in got if n.startswith("['classifier']['dense_1']")]
  assert sorted(last) == ["['classifier']['dense_1']['bias']",
                          "['classifier']['dense_1']['kernel']"]
  for name, value in got.items():
    expected = _flat(fresh)[name] if name in last else want[name]
    np.testing.assert_array_equal(value, expected, err_msg=name)
  assert got["['classifier']['dense_1']['kernel']"].shape == (16, 10)


def test_the_ema_weights_are_taken_when_the_run_kept_them(tmp_path):
  config = fake_data.get_config()
  config.ema_decay = 0.5
  ema = _pretrained_workdir(tmp_path / 'ema_run', config)
  target = _target(tmp_path / 'ema_run')
  got = transfer.pretrained_params(target, _state(target, 100).params)
  for name, value in _flat(ema).items():
    np.testing.assert_array_equal(_flat(got)[name], value, err_msg=name)


def test_another_model_or_no_run_is_refused(source, tmp_path):
  path, _ = source
  config = _target(path, latent_dim=4)
  with pytest.raises(errors.InputError,
                     match=r'holds another model.*latent_dim: 8 -> 4'):
    transfer.pretrained_params(config, _state(config, 100).params)
  config = _target(tmp_path / 'nothing')
  with pytest.raises(errors.InputError, match='is not the workdir of a '
                     'trained run'):
    transfer.pretrained_params(config, {})


def test_a_new_run_starts_from_them(source, tmp_path):
  path, weights = source
  ex = experiment.Experiment(_target(path), str(tmp_path / 'finetune'))
  try:
    state, meta = ex.restore_or_init()
  finally:
    ex.close()
  assert meta['epoch'] == 0 and int(state.step) == 0
  for name, value in _flat(weights).items():
    np.testing.assert_array_equal(_flat(jax.device_get(state.params))[name],
                                  value, err_msg=name)
