"""The README's commands work as written.

Commands are read from README.md itself, so the README cannot drift from
what runs: every documented training command passes the config checks, and
the fine-tuning command trains, changed only where a test must (a shrunk
config, a fake data dir, a tiny schedule, local workdirs).
"""

import json
import os
import re
import shlex
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from configs import imagenet_perceiver
from perceiver_jax import config_lib
from tests.support import ROOT
from tests.support import subprocess_env
from tests.training.test_transfer import pretrained_workdir
from tests.training.test_transfer import SOURCE_STATS

# pylint: disable=redefined-outer-name  (pytest fixtures as arguments)

README = os.path.join(ROOT, 'README.md')


def _commands(text):
  """Every `python main.py ...` line of the bash blocks, continuations
  joined, comments dropped, as argv lists."""
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
      line = line.split('#')[0].strip()
      if line.startswith('python main.py'):
        commands.append(shlex.split(line))
  return commands


def readme_command(after):
  """The first documented `python main.py` command after the text `after`."""
  with open(README) as f:
    text = f.read()
  return _commands(text[text.index(after):])[0]


def _flags(argv):
  """`{name: value}` of argv's `--name=value` flags."""
  return dict(a[2:].split('=', 1) for a in argv if a.startswith('--')
              and '=' in a)


def _config(argv):
  """The config argv's `--config` and `--config.FIELD` flags make."""
  config_args = ['main.py'] + [a for a in argv if a.startswith('--config')]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values,
                                  sys_argv=config_args)
  values(config_args)
  return values.config


def test_every_documented_training_command_passes_the_checks():
  with open(README) as f:
    commands = [c for c in _commands(f.read())
                if any(a.startswith('--config=') for a in c)]
  assert len(commands) >= 5, commands  # Setup, fake data, ImageNet, ...
  for argv in commands:
    try:
      config_lib.validate(_config(argv))
    except config_lib.ConfigError as e:
      raise AssertionError(f'{shlex.join(argv)}: {e}') from None


def test_the_imagenet_config_tests_and_transfers_its_final_weights():
  # The paper reports the end of its schedule, not an early-stopping best.
  for config in (imagenet_perceiver.get_config(),
                 imagenet_perceiver.get_config('test')):
    assert config.early_stopping.restore_best_weights is False
    assert config.early_stopping.patience >= config.num_epochs
    assert config.test_split == 'auto'  # Follows the dataset.


def test_the_fine_tuning_command_trains(tmp_path, fake_cifar100):
  argv = readme_command('**Fine-tuning.**')
  documented = _flags(argv)
  assert argv[:2] == ['python', 'main.py']
  assert all('=' in a for a in argv[2:]), argv
  assert documented['config'] == 'configs/imagenet_perceiver.py'
  # The pretrained run: the :test model, whose best (step 4) and last
  # (step 8) weights differ; the ImageNet config tests the last.
  source = tmp_path / 'inet'
  pretrained_workdir(
      source, imagenet_perceiver.get_config('test'), num_classes=1000)
  changes = {'config': 'configs/imagenet_perceiver.py:test',
             'workdir': str(tmp_path / 'inet_cifar'),
             'config.init_from': str(source),
             'config.num_epochs': '1'}
  assert set(changes) <= set(documented), documented
  ran = [f'--{k}={changes.get(k, v)}' for k, v in documented.items()]
  ran += ['--config.mock_data=False',
          f'--config.tfds_data_dir={fake_cifar100.data_dir}']
  proc = subprocess.run([sys.executable, 'main.py', *ran], cwd=ROOT,
                        env=subprocess_env(devices=1), capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert (f'Initialised from the latest checkpoint of {source} (step 8)'
          in proc.stderr)
  # CIFAR's held-out split is 'test' (30 fake examples), ImageNet's
  # 'validation'; the schedule's decays past the shortened end are skipped.
  assert '99 train / 1 validation / 30 test examples, 100 classes' in (
      proc.stderr)
  assert 'no decay at [2, 3]' in proc.stderr
  assert 'Test accuracy: ' in proc.stdout
  workdir = tmp_path / 'inet_cifar'
  stats = json.loads((workdir / 'normalization.json').read_text())
  assert stats['source']['statistics_of'] == str(source)
  assert stats['mean'] == SOURCE_STATS['mean']
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['dataset'], config['host_crop'], config['device_augment']) \
      == ('cifar100', 'none', 'seed')
