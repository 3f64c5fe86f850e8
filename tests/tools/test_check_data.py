"""--mode=check_data: every record decoded, the bad ones listed, no device.

`bad_jpegs` (tests/data/tfds_fixtures.py) holds a truncated JPEG at tfds
'train' record 3 (our training split) and bytes that are no image at tfds
'test' record 2, with imagenet2012's `file_name` feature.
"""

import os
import re
import subprocess
import sys

import pytest

from configs import fake_data
from perceiver_jax import errors
from perceiver_jax.tools import check_data
from tests.support import ROOT
from tests.support import subprocess_env

MAIN = os.path.join(ROOT, 'main.py')


def _config(data_dir, dataset):
  config = fake_data.get_config()
  config.update(dict(mock_data=False, dataset=dataset,
                     tfds_data_dir=data_dir))
  return config


def test_main_lists_every_bad_record_and_starts_no_jax_backend(bad_jpegs):
  flags = ['--mode=check_data', '--config=configs/fake_data.py',
           '--config.mock_data=False', '--config.dataset=bad_jpegs',
           f'--config.tfds_data_dir={bad_jpegs}']
  code = ('import runpy, sys\n'
          f'sys.argv = [{MAIN!r}] + {flags!r}\n'
          'try:\n'
          f'  runpy.run_path({MAIN!r}, run_name="__main__")\n'
          'except SystemExit as e:\n'
          '  status = e.code\n'
          'bridge = sys.modules.get("jax._src.xla_bridge")\n'
          'print("STATUS", status, "BACKENDS",\n'
          '      sorted(bridge._backends) if bridge else "jax not imported")\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300, check=False)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4, proc.stderr[-3000:]
  assert re.fullmatch(
      r"Bad record: train split \(tfds 'train'\), record 3, file_name "
      r"'train_003\.JPEG': OSError: image file is truncated \(\d+ bytes not "
      r'processed\)', lines[0]), lines[0]
  assert lines[1] == (
      "Bad record: test split (tfds 'test'), record 2, file_name "
      "'test_002.JPEG': not an image (Pillow knows no format of its bytes)")
  assert lines[2].startswith('2 of 26 records of bad_jpegs do not decode '
                             '(tfds test and train).')
  assert lines[3] == 'STATUS 1 BACKENDS []'
  assert 'Decoding bad_jpegs' in proc.stderr  # The progress bar.
  assert 'Traceback' not in proc.stderr


def test_a_good_dataset_decodes_whole(tiny_jpegs):
  bad, total = check_data.check(_config(tiny_jpegs, 'tiny_jpegs'),
                                num_workers=1, progress=False)
  assert (bad, total) == ([], 48 + 14)


def test_mock_data_has_nothing_to_check():
  with pytest.raises(errors.InputError, match='mock data has no stored'):
    check_data.check(fake_data.get_config())
