"""Transfer (`config.init_from`): a run starts from another run's weights."""

import json
import shutil

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
from tests.training.test_resolution import tf_resized

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)


def _state(config, num_classes, channels=3):
  mesh = sharding.create_mesh(jax.devices()[:1])
  model = perceiver.create_model(config, num_classes)
  size = config.image_size
  return steps.create_train_state(config, model, (size, size, channels),
                                  mesh)[0]


SOURCE_STATS = {'mean': [10.0, 20.0, 30.0], 'variance': [4.0, 9.0, 16.0]}


def pretrained_workdir(path, config, num_classes=100):
  """A finished run's workdir: config.json, normalization.json and two
  checkpoints whose weights differ from any fresh initialisation: the
  early-stopping best (step 4, +1 everywhere) and the last (step 8, +3).

  Returns the weights training tested: `{'best': ..., 'last': ...}` (the
  EMA weights, +1 more, when the config keeps them).
  """
  state = _state(config, num_classes)
  path.mkdir()
  (path / 'config.json').write_text(json.dumps(config.to_dict()))
  (path / 'normalization.json').write_text(json.dumps(
      dict(SOURCE_STATS, source={'dataset': 'source_data'})))
  manager = checkpointing.create_manager(path / 'checkpoints', max_to_keep=3)
  tested = {}
  for step, shift, which in ((4, 1.0, 'best'), (8, 3.0, 'last')):
    params = jax.tree.map(lambda x, d=shift: x + d, state.params)
    ema = None if state.ema_params is None else jax.tree.map(
        lambda x, d=shift: x + d + 1.0, state.params)
    checkpointing.save(manager, step, state.replace(params=params,
                                                    ema_params=ema),
                       {'epoch': step // 4, 'best_step': 4},
                       is_best=which == 'best')
    tested[which] = jax.device_get(ema if ema is not None else params)
  manager.wait_until_finished()
  manager.close()
  return tested


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A source run's path and its best and last weights."""
  path = tmp_path_factory.mktemp('pretrained') / 'run'
  return path, pretrained_workdir(path, fake_data.get_config())


@pytest.fixture(scope='module')
def source(runs):
  """A run that restored its best weights: transfer takes those."""
  path, tested = runs
  return path, tested['best']


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
  ema = pretrained_workdir(tmp_path / 'ema_run', config)['best']
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


def test_another_model_is_refused_before_any_data_is_read(
    source, tmp_path, monkeypatch):
  path, _ = source
  monkeypatch.setattr(experiment.datasets, 'prepare',
                      lambda config: pytest.fail('the data came first'))
  with pytest.raises(errors.InputError, match='holds another model'):
    experiment.Experiment(_target(path, latent_dim=4), str(tmp_path / 'w'))


def test_a_run_that_tested_its_last_weights_gives_those(runs, tmp_path):
  path, tested = runs
  final = tmp_path / 'final'
  shutil.copytree(path, final)
  config = json.loads((final / 'config.json').read_text())
  config['early_stopping']['restore_best_weights'] = False
  (final / 'config.json').write_text(json.dumps(config))
  target = _target(final)
  got = _flat(transfer.pretrained_params(target, _state(target, 100).params))
  for name, value in _flat(tested['last']).items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_a_misfit_outside_the_last_layer_is_refused_by_name(source):
  # RGB weights on grayscale data: the patch encoder's input width differs,
  # and only the classifier's last layer may start afresh.
  path, _ = source
  config = _target(path)
  gray = _state(config, 10, channels=1).params
  with pytest.raises(errors.InputError) as e:
    transfer.pretrained_params(config, gray)
  message = str(e.value)
  assert 'do not fit this model: patch_encoder/' in message
  assert 'has shape (48, 16) there, (16, 16) here' in message
  assert 'Only classifier/dense_1 (the logits) may differ' in message
  assert 'classifier/' not in message.split('. Only')[0]


@pytest.mark.parametrize('init_normalization', ['source', 'recompute'])
def test_a_new_run_starts_from_them(source, tmp_path, init_normalization):
  path, weights = source
  workdir = tmp_path / 'finetune'
  config = _target(path, init_normalization=init_normalization)
  ex = experiment.Experiment(config, str(workdir))
  try:
    state, meta = ex.restore_or_init()
    own = ex.pipeline.normalization_stats()
  finally:
    ex.close()
  assert meta['epoch'] == 0 and int(state.step) == 0
  for name, value in _flat(weights).items():
    np.testing.assert_array_equal(_flat(jax.device_get(state.params))[name],
                                  value, err_msg=name)
  saved = json.loads((workdir / 'normalization.json').read_text())
  if init_normalization == 'source':
    # The inputs are scaled as the pretrained weights saw them.
    want = SOURCE_STATS
    assert saved['source']['statistics_of'] == str(path)
  else:
    want = {k: v.tolist() for k, v in own.items()}
    assert 'statistics_of' not in saved['source']
  for key in ('mean', 'variance'):
    np.testing.assert_allclose(ex.stats[key], want[key], rtol=1e-6)
    np.testing.assert_allclose(saved[key], want[key], rtol=1e-6)
  assert saved['source']['dataset'] == 'cifar100'  # This run's data.


def test_source_statistics_of_another_channel_count_are_refused(source):
  path, _ = source
  with pytest.raises(errors.InputError, match=(
      r'trained on images of 3 channels and this data has 1')):
    transfer.source_statistics(_target(path), channels=1)


EMBEDDING = "['patch_encoder']['position_embedding']"


def test_another_image_size_takes_every_weight_resampling_the_positions(
    source, caplog):
  path, weights = source  # Trained at image_size 16: 4x4 patches of 4.
  config = _target(path, image_size=32)
  with caplog.at_level('INFO'):
    got = _flat(transfer.pretrained_params(config,
                                           _state(config, 100).params))
  want = _flat(weights)
  assert got.keys() == want.keys()
  assert want[EMBEDDING].shape == (16, 16) and got[EMBEDDING].shape == (64, 16)
  np.testing.assert_allclose(got[EMBEDDING], tf_resized(want[EMBEDDING], 8),
                             rtol=1e-6, atol=1e-6)
  for name, value in want.items():
    if name != EMBEDDING:
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert ('Fine-tuning at another resolution: image_size 16 -> 32: the 4x4 '
          'patch grid becomes 8x8.') in caplog.text
  assert ('Resampled patch_encoder/position_embedding from the 4x4 patch '
          'grid to 8x8 (bilinear).') in caplog.text
  # The patches themselves must keep their size: the projection takes them.
  with pytest.raises(errors.InputError, match=r'patch_size: 4 -> 8'):
    transfer.check_source(_target(path, image_size=32, patch_size=8))


def test_fine_tuning_at_another_image_size_trains_a_step(source, tmp_path):
  path, weights = source
  config = _target(path, image_size=24)  # 6x6 patches.
  ex = experiment.Experiment(config, str(tmp_path / 'finetune'))
  try:
    state, _ = ex.restore_or_init()
    start = _flat(jax.device_get(state.params))
    batch = next(iter(ex.pipeline.train_batches(0, 0)))
    state, metrics = ex.train_step(
        state, sharding.global_batch(ex.mesh, batch), np.float32(1e-3))
    after = _flat(jax.device_get(state.params))
  finally:
    ex.close()
  np.testing.assert_allclose(
      start[EMBEDDING], tf_resized(_flat(weights)[EMBEDDING], 6), rtol=1e-6,
      atol=1e-6)
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
  assert after[EMBEDDING].shape == (36, 16)
  assert not np.allclose(after[EMBEDDING], start[EMBEDDING])


def test_a_position_embedding_of_no_square_grid_is_refused(tmp_path):
  # E.g. weights brought from a model over non-square inputs.
  config = fake_data.get_config()
  state = _state(config, 100)
  params = jax.device_get(state.params)
  params['patch_encoder']['position_embedding'] = np.zeros((12, 16),
                                                          np.float32)
  path = tmp_path / 'odd'
  path.mkdir()
  (path / 'config.json').write_text(json.dumps(config.to_dict()))
  manager = checkpointing.create_manager(path / 'checkpoints')
  checkpointing.save(manager, 1, state.replace(params=params),
                     {'epoch': 1, 'best_step': 1}, is_best=True)
  manager.wait_until_finished()
  manager.close()
  target = _target(path, image_size=32)
  with pytest.raises(errors.InputError, match=(
      r"patch_encoder/position_embedding in config.init_from='.*odd' has 12 "
      r'rows, which form no square patch grid')):
    transfer.pretrained_params(target, _state(target, 100).params)
