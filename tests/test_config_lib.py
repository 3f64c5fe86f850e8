"""Config validation: each bad value named with its fix before any compile."""

import pathlib
import subprocess
import sys

import pytest

from configs import cifar100
from configs import fake_data
from configs import imagenet_perceiver
from perceiver_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('get_config', [
    cifar100.get_config, fake_data.get_config, imagenet_perceiver.get_config,
    lambda: imagenet_perceiver.get_config('test')])
def test_shipped_configs_are_valid(get_config):
  assert not config_lib.config_problems(get_config())


def test_seed_hyperparameters():
  c = cifar100.get_config()
  assert (c.learning_rate, c.weight_decay, c.batch_size, c.num_epochs) == (
      0.001, 0.0001, 64, 50)
  assert (c.dropout_rate, c.image_size, c.patch_size, c.latent_dim,
          c.projection_dim, c.num_heads) == (0.2, 64, 2, 256, 256, 8)
  assert tuple(c.ffn_units) == (256, 256) and tuple(c.classifier_units) == (
      256,)
  assert (c.num_transformer_blocks, c.num_iterations) == (4, 2)
  assert (c.dataset, c.validation_split) == ('cifar100', 0.1)
  assert (c.plateau.factor, c.plateau.patience) == (0.2, 3)
  assert c.early_stopping.patience == 15


BAD = [
    ('image_size', 31, 'config.image_size=31 is not divisible by '
     'config.patch_size=2'),
    ('patch_size', 0, 'config.patch_size=0 must be a positive integer'),
    ('batch_size', -8, 'config.batch_size=-8 must be a positive integer'),
    ('num_epochs', 0, 'config.num_epochs=0 must be a positive integer'),
    ('latent_dim', 0, 'config.latent_dim=0 must be a positive integer'),
    ('num_heads', -1, 'config.num_heads=-1 must be a positive integer'),
    ('num_iterations', 0, 'config.num_iterations=0'),
    ('validation_split', 0.0, 'config.validation_split=0.0 must be strictly '
     'between 0 and 1'),
    ('validation_split', 1.5, 'config.validation_split=1.5'),
    ('learning_rate', 0.0, 'config.learning_rate=0.0 must be a positive'),
    ('weight_decay', -1e-4, 'config.weight_decay=-0.0001 must be a non-neg'),
    ('dropout_rate', 1.0, 'config.dropout_rate=1.0 must be in [0, 1)'),
    ('ffn_units', (256, 128), 'must end with projection_dim (256)'),
    ('ffn_units', (256, -1), 'config.ffn_units=(256, -1) must be a tuple of '
     'positive integers'),
    ('classifier_units', (0,), 'config.classifier_units=(0,)'),
    ('dataset', '', "config.dataset='' must be a tfds dataset name"),
    ('plateau.factor', 1.0, 'config.plateau.factor=1.0 must be in (0, 1)'),
    ('plateau.patience', -1, 'config.plateau.patience=-1 must be a non-neg'),
    ('early_stopping.patience', -2, 'config.early_stopping.patience=-2'),
    ('checkpoint_max_to_keep', 0, 'config.checkpoint_max_to_keep=0'),
    ('attention_form', 'fused', "config.attention_form='fused' must be "
     "'auto', 'factored' or 'folded'"),
    ('dropout_bits', 'philox', "config.dropout_bits='philox' must be 'hash' "
     "or 'threefry'"),
]


@pytest.mark.parametrize('field,value,message', BAD)
def test_bad_values_are_named(field, value, message):
  config = cifar100.get_config()
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  with node.unlocked():
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value)


def test_all_problems_reported_at_once():
  config = cifar100.get_config()
  config.patch_size = 3
  config.num_heads = 0
  problems = config_lib.config_problems(config)
  assert len(problems) == 2


def test_missing_field_and_mock_examples():
  config = cifar100.get_config()
  del config['seed']
  config.mock_data = True
  problems = '\n'.join(config_lib.config_problems(config))
  assert 'config.seed is missing' in problems
  assert 'config.mock_num_examples=0 must be a positive integer' in problems


def test_configs_without_kernel_choices_get_the_defaults():
  """Workdirs written before attention_form / dropout_bits still load."""
  config = cifar100.get_config()
  del config['attention_form']
  del config['dropout_bits']
  assert config_lib.config_problems(config) == []


def test_differences_name_each_differing_leaf():
  old = {'a': 1, 'ffn_units': [256, 256], 'plateau': {'patience': 3},
         'same': 'x', 'gone': 2}
  new = {'a': 2, 'ffn_units': (256, 256), 'plateau': {'patience': 5},
         'same': 'x', 'fresh': 'y'}
  assert config_lib.differences(old, new) == [
      "a: 1 -> 2", "fresh: <unset> -> 'y'", 'gone: 2 -> <unset>',
      'plateau.patience: 3 -> 5']
  assert config_lib.differences(old, new, keep=lambda n: n != 'a') == [
      "fresh: <unset> -> 'y'", 'gone: 2 -> <unset>',
      'plateau.patience: 3 -> 5']


def test_differences_count_a_missing_field_as_its_default():
  assert config_lib.differences({}, {'remat': False},
                                defaults={'remat': False}) == []
  assert config_lib.differences({}, {'remat': True},
                                defaults={'remat': False}) == [
                                    'remat: <unset: default False> -> True']


def test_option_is_the_field_or_its_registered_default():
  config = cifar100.get_config()
  config.grad_accum_steps = 4
  assert config_lib.option(config, 'grad_accum_steps') == 4
  del config['grad_accum_steps']
  del config['host_crop']
  assert config_lib.option(config, 'grad_accum_steps') == 1  # steps.py's
  assert config_lib.option(config, 'host_crop') == 'none'  # host_transforms'
  assert config_lib.option({}, 'profile_steps') == ()  # profiling.py's
  assert config_lib.option({'attention_form': 'folded'},
                           'attention_form') == 'folded'
  with pytest.raises(KeyError, match='latent_dim'):
    config_lib.option(config, 'latent_dim')  # Every config has it.


def test_checking_a_config_does_not_import_transfer():
  """transfer.py asks config_lib; config_lib never needs transfer.py."""
  code = ('import sys; from configs import cifar100; '
          'from perceiver_jax import config_lib; '
          'config_lib.validate(cifar100.get_config()); '
          'sys.exit("perceiver_jax.training.transfer" in sys.modules)')
  assert subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        check=False).returncode == 0
