"""main.py: flags, the default workdir, and which errors get one paragraph.

Each case runs main.py in a fresh process, as a user's command would, with
the training entry point replaced where the test is about what comes before.
"""

import os
import subprocess
import sys

from tests.support import ROOT

MAIN = os.path.join(ROOT, 'main.py')


def _python(code, *args, cwd=ROOT):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-c', code, *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def _main_with(train_and_evaluate, *flags, cwd=ROOT):
  """main.py with `loop.train_and_evaluate` replaced by the given source."""
  code = ('import runpy, sys\n'
          f'sys.path.insert(0, {ROOT!r})\n'
          'from perceiver_jax.training import loop\n'
          f'{train_and_evaluate}\n'
          'loop.train_and_evaluate = replacement\n'
          f'sys.argv = [{MAIN!r}] + sys.argv[1:]\n'
          f'runpy.run_path({MAIN!r}, run_name="__main__")\n')
  return _python(code, *flags, cwd=cwd)


def test_help_imports_neither_jax_nor_tensorflow():
  proc = _python(
      'import runpy, sys\n'
      f'sys.argv = [{MAIN!r}, "--help"]\n'
      'try:\n'
      f'  runpy.run_path({MAIN!r}, run_name="__main__")\n'
      'except SystemExit:\n'
      '  pass\n'
      'heavy = {"jax", "jaxlib", "flax", "tensorflow", "tensorflow_datasets",\n'
      '         "orbax"}\n'
      'print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules}\n'
      '                         & heavy))\n')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '--workdir' in proc.stdout
  assert proc.stdout.strip().splitlines()[-1] == 'IMPORTED []'


def test_older_python_is_refused_with_one_line():
  proc = _python(f'import runpy; runpy.run_path({MAIN!r})["check_python"]('
                 '(3, 10, 12))')
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      'Error: perceiver_jax needs Python 3.11 or later (the versions in '
      'requirements.txt do); this is Python 3.10. Create the virtual '
      'environment with python3.11 or newer.')


def test_mistyped_config_path_is_one_line_listing_the_configs(tmp_path):
  proc = subprocess.run(
      [sys.executable, MAIN, '--config=configs/no_such_config.py',
       f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      'Error: --config=configs/no_such_config.py: no such file. The configs '
      'are: configs/cifar100.py, configs/cifar100_fast.py, '
      'configs/cifar100_finetune.py, configs/cifar100_paper.py, '
      'configs/fake_data.py, '
      'configs/imagenet_perceiver.py, configs/imagenet_perceiver_io.py.')


def test_design_command_starts_with_a_default_workdir(tmp_path):
  """`python main.py --config=configs/cifar100.py`, up to the download."""
  stop_at_prepare = (
      'from perceiver_jax.data import datasets\n'
      'def prepare(config, data_builder=None):\n'
      '  print("PREPARE", config.dataset)\n'
      '  sys.exit(0)\n'
      'datasets.prepare = prepare\n'
      'replacement = loop.train_and_evaluate\n')
  proc = _main_with(stop_at_prepare,
                    f'--config={os.path.join(ROOT, "configs/cifar100.py")}',
                    cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'PREPARE cifar100' in proc.stdout
  workdir = tmp_path / 'runs' / 'cifar100'
  assert f'No --workdir given: writing to {workdir}.' in proc.stderr
  assert (workdir / 'config.json').exists()


def test_tools_need_a_workdir():
  proc = subprocess.run([sys.executable, MAIN, '--mode=eval'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().endswith(
      'Error: --mode=eval needs --workdir=DIR, the workdir of a training run '
      '(or the --config it was trained with).')


def test_only_input_errors_lose_their_traceback(tmp_path):
  flags = ('--config=configs/fake_data.py', f'--workdir={tmp_path}')
  bug = _main_with('def replacement(config, workdir):\n'
                   '  raise ValueError("shapes (3,) and (4,) disagree")',
                   *flags)
  assert bug.returncode == 1
  assert 'Traceback (most recent call last)' in bug.stderr
  assert 'ValueError: shapes (3,) and (4,) disagree' in bug.stderr
  bad_input = _main_with(
      'from perceiver_jax import errors\n'
      'def replacement(config, workdir):\n'
      '  raise errors.InputError("config.x=1 must be 2; pass --config.x=2.")',
      *flags)
  assert bad_input.returncode == 1
  assert 'Traceback' not in bad_input.stderr
  assert bad_input.stderr.strip().endswith(
      'Error: config.x=1 must be 2; pass --config.x=2.')


def test_orbax_reports_of_a_full_disk_are_left_to_the_final_paragraph():
  code = '''
import errno, logging, sys
import main
quiet = main._QuietLibraries()
def record(level, error=None, message='save failed', path='/x/orbax/y.py'):
  info = (type(error), error, None) if error else None
  return logging.LogRecord('absl', level, path, 1, message, (), info)
full = OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt/2')
print(quiet.filter(record(logging.ERROR, full)),
      quiet.filter(record(logging.ERROR, None, "Failed writing: 'x': No "
                          "space left on device [os_error_code='28']")),
      quiet.filter(record(logging.ERROR, OSError(errno.EIO, 'I/O error'))),
      quiet.filter(record(logging.INFO)),
      quiet.filter(record(logging.ERROR, full, path='/x/perceiver_jax/a.py')))
'''
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['False', 'False', 'True', 'False', 'True']
