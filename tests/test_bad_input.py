"""Bad input: each gets one clear paragraph naming cause and fix, before compiling.

A table of inputs and the message each must produce. Building the train state
or the jitted steps is patched to fail, which proves every error comes before
anything is compiled.
"""

import json
import os
import subprocess
import sys

import pytest

from configs import fake_data
from perceiver_jax import errors
from perceiver_jax.data import records
from perceiver_jax.training import experiment
from perceiver_jax.training import steps
from tests.support import ROOT
from tests.support import subprocess_env


def _set(config, field, value):
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  with node.unlocked():
    node[leaf] = value


def _file(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('not a directory')
  return str(path)


def _foreign_workdir(tmp_path):
  """A workdir holding checkpoints of a model with other latents."""
  workdir = tmp_path / 'old_run'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  saved = fake_data.get_config().to_dict()
  saved['latent_dim'] = 32
  (workdir / 'config.json').write_text(json.dumps(saved))
  return workdir


# (config overrides or a workdir maker, expected message fragments).
CASES = [
    ({'image_size': 18}, ['config.image_size=18 is not divisible by '
                          'config.patch_size=4', 'choose e.g. image_size=16']),
    ({'patch_size': 0}, ['config.patch_size=0 must be a positive integer']),
    ({'batch_size': -16}, ['config.batch_size=-16 must be a positive integer']),
    ({'num_iterations': 0}, ['config.num_iterations=0 must be a positive']),
    ({'validation_split': 1.5}, ['config.validation_split=1.5 must be '
                                 'strictly between 0 and 1']),
    ({'learning_rate': 0.0}, ['config.learning_rate=0.0 must be a positive']),
    ({'dropout_rate': 1.0}, ['config.dropout_rate=1.0 must be in [0, 1)']),
    ({'ffn_units': (16, 8)}, ['must end with projection_dim (16)']),
    ({'plateau.factor': 1.5}, ['config.plateau.factor=1.5 must be in (0, 1)']),
    ({'seed': -1}, ['config.seed=-1 must be a non-negative integer']),
    ({'attention_init': 'keras4'}, ["config.attention_init='keras4' must be "
                                    "'keras2' or 'keras3'"]),
    ({'mock_num_examples': 0}, ['config.mock_num_examples=0 must be a '
                                'positive integer when config.mock_data']),
    ({'dataset': 'cifar1000'}, ["config.dataset='cifar1000' is not a tfds "
                                "dataset. Did you mean 'cifar100'",
                                '--config.dataset=cifar100']),
    ({'dataset': 'imdb_reviews', 'mock_data': False},
     ['must have an `image` feature']),
    ({'dataset': 'celeb_a', 'mock_data': False},
     ['must have an `image` feature', '`label` feature']),
    ({'tfds_data_dir': lambda tmp: os.path.join(_file(tmp), 'tfds')},
     ['is not a readable directory and could not be created',
      '--config.tfds_data_dir=']),
    ({'tfds_data_dir': _file}, ['is not a readable directory']),
    ({'batch_size': 12}, ['config.batch_size=12 must be a positive multiple '
                          'of the number of devices (8)',
                          '--config.batch_size=8']),
    ({'grad_accum_steps': 3}, ['config.batch_size=16 must be a multiple of '
                               'config.grad_accum_steps=3',
                               '--config.grad_accum_steps=2']),
    ({'grad_accum_steps': 4}, ['config.batch_size=16 must be a positive '
                               'multiple of config.grad_accum_steps (4) x the '
                               'number of devices (8) = 32',
                               '--config.batch_size=32',
                               '--config.grad_accum_steps=2']),
    ({'batch_size': 1024}, ['config.batch_size=1024 is too large',
                            'Use a smaller batch size']),
    ({'workdir': lambda tmp: os.path.join(_file(tmp), 'run')},
     ['is not a writable directory', 'pass a path you can write to']),
    ({'workdir': _foreign_workdir},
     ['holds checkpoints of a run with a different model or data',
      'latent_dim: 32 -> 8', 'Use a new --workdir']),
]


@pytest.fixture
def no_compile(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('reached model building / compilation')
  monkeypatch.setattr(steps, 'create_train_state', fail)
  monkeypatch.setattr(steps, 'jit_steps', fail)


@pytest.mark.parametrize(
    'overrides,fragments', CASES,
    ids=[f'{i}-' + '-'.join(c[0]) for i, c in enumerate(CASES)])
def test_bad_input_gets_a_clear_error(tmp_path, no_compile, overrides,
                                      fragments):
  config = fake_data.get_config()
  workdir = tmp_path / 'run'
  for field, value in overrides.items():
    value = value(tmp_path) if callable(value) else value
    if field == 'workdir':
      workdir = value
    else:
      _set(config, field, value)
  with pytest.raises(errors.InputError) as e:
    experiment.Experiment(config, workdir)
  message = str(e.value)
  for fragment in fragments:
    assert fragment in message, message
  assert len(message) < 1500


def test_cli_prints_one_paragraph_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/fake_data.py',
       f'--workdir={tmp_path}', '--config.dataset=cifar1000'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert "Error: config.dataset='cifar1000' is not a tfds dataset" in (
      proc.stderr)
  assert 'Traceback' not in proc.stderr


_BAD_RECORD = {'mock_data': False, 'dataset': 'bad_jpegs', 'batch_size': 8,
               'host_crop': 'inception', 'data_storage': 'stream',
               'data_workers': 1}


def test_a_record_that_does_not_decode_stops_before_compiling(
    tmp_path, no_compile, bad_jpegs):
  # The training statistics read it first, in a worker process.
  config = fake_data.get_config()
  config.update(dict(_BAD_RECORD, tfds_data_dir=bad_jpegs))
  with pytest.raises(records.BadRecordError) as e:
    experiment.Experiment(config, tmp_path / 'run')
  assert str(e.value).startswith(
      "Record 3 of tfds split 'train' of dataset 'bad_jpegs' (read for the "
      "train split, file_name 'train_003.JPEG') does not decode: ")


def test_cli_prints_a_bad_record_as_one_paragraph(tmp_path, bad_jpegs):
  flags = [f'--config.{k}={v}' for k, v in _BAD_RECORD.items()]
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/fake_data.py',
       f'--workdir={tmp_path}', f'--config.tfds_data_dir={bad_jpegs}',
       *flags], cwd=ROOT, env=subprocess_env(1), capture_output=True,
      text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1].startswith(
      "Error: Record 3 of tfds split 'train' of dataset 'bad_jpegs' ")
  assert 'Traceback' not in proc.stderr
