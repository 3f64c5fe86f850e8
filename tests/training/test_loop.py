"""End to end: main.py on mock data writes its outputs and resumes exactly."""

import json
import os

import pytest

from tests.support import run_main

def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def _history(workdir):
  with open(os.path.join(workdir, 'history.json')) as f:
    return json.load(f)


def test_fake_data_run_writes_outputs_then_resumes(tmp_path):
  workdir = tmp_path / 'run'
  first = _ok(run_main(workdir, '--config.num_epochs=1'))
  assert 'Test accuracy: ' in first.stdout
  assert 'Test top 5 accuracy: ' in first.stdout
  history = _history(workdir)
  assert [h['epoch'] for h in history] == [1]
  for key in ('train_loss', 'train_accuracy', 'train_top5_accuracy',
              'val_loss', 'val_accuracy', 'val_top5_accuracy',
              'learning_rate'):
    assert key in history[0]
  assert history[0]['learning_rate'] == pytest.approx(1e-3)
  with open(workdir / 'learning_curves.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert any(n.startswith('events.out.tfevents')
             for n in os.listdir(workdir / 'tensorboard'))
  with open(workdir / 'config.json') as f:
    assert json.load(f)['num_epochs'] == 1
  assert os.listdir(workdir / 'checkpoints')
  assert (workdir / 'normalization.json').exists()

  # Same workdir, more epochs: it resumes after epoch 1 instead of restarting,
  # here in 2 micro-batches per batch (a field that may change on resume).
  second = _ok(run_main(workdir, '--config.num_epochs=2',
                        '--config.grad_accum_steps=2'))
  assert 'Resuming from step' in second.stderr
  assert 'grad_accum_steps: 1 -> 2' in second.stderr
  assert ('Each batch of 16 trains as 2 micro-batches of 8 (4 per device).'
          in second.stderr)
  assert 'Epoch 1/2' not in second.stderr
  resumed = _history(workdir)
  assert [h['epoch'] for h in resumed] == [1, 2]
  assert resumed[0] == history[0]
  # That it ends exactly where an uninterrupted run ends is
  # tests/training/test_resilience.py's.


def test_bad_config_fails_before_compiling(tmp_path):
  proc = run_main(tmp_path / 'bad', '--config.patch_size=3')
  assert proc.returncode != 0
  assert 'config.image_size=16 is not divisible by config.patch_size=3' in (
      proc.stderr)
  assert 'Traceback' not in proc.stderr
