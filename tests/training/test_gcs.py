"""gs:// workdirs and data dirs, against the local GCS emulator (`gcs`).

Real `main.py` processes on mock data (one CPU device, 3 epochs of 4 steps,
a checkpoint every 2 steps), as in test_resilience.py: train, SIGKILL in the
third epoch, resume, and end bit-identical to an uninterrupted local run;
then the tools and a fine-tuning run read the bucket. Every process runs in
a scratch directory, so a gs:// path mistaken for a local one shows up there.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys

from etils import epath
import orbax.checkpoint as ocp
from PIL import Image
import pytest

import perceiver_jax
from perceiver_jax.training import profiling
from tests.support import ROOT
from tests.support import subprocess_env
from tests.training.test_resilience import _assert_identical

FLAGS = ('--config.num_epochs=3', '--config.checkpoint_every_steps=2')


def _main(cwd, env, *flags, config=True):
  """main.py in a fresh process whose current directory is `cwd`."""
  config_flag = ([f'--config={os.path.join(ROOT, "configs", "fake_data.py")}']
                 if config else [])
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'main.py'), *config_flag, *flags],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
      check=False)


def _final(workdir):
  """history.json bytes and the newest checkpoint's arrays (local or gs://)."""
  workdir = epath.Path(workdir)
  step = max(int(p.name) for p in (workdir / 'checkpoints').iterdir()
             if p.name.isdigit())
  state = ocp.PyTreeCheckpointer().restore(
      workdir / 'checkpoints' / str(step) / 'state')
  return step, (workdir / 'history.json').read_bytes(), state


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def test_gs_workdir_trains_resumes_and_serves_the_tools(
    tmp_path, gcs, monkeypatch):
  scratch = tmp_path / 'cwd'
  scratch.mkdir()
  env = dict(subprocess_env(devices=1), **gcs.env)
  run = f'{gcs.bucket}/{tmp_path.name}/run'

  # An uninterrupted local run: the reference.
  _ok(_main(scratch, env, f'--workdir={tmp_path / "local"}', *FLAGS))

  # Two epochs, killed in the third once the step-10 checkpoint landed; the
  # profile window (steps 2..3) is traced before the kill.
  killed = _main(scratch, dict(env, PERCEIVER_JAX_FAULT='kill_after_step@10'),
                 f'--workdir={run}', *FLAGS, '--config.profile_steps=(2, 2)')
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
  resumed = _ok(_main(scratch, env, f'--workdir={run}', *FLAGS,
                      '--config.profile_steps=(2, 2)'))
  assert 'Resuming from step 10 ' in resumed.stderr
  assert os.listdir(scratch) == []  # Nothing landed in a local `gs:/`.

  gcs.use(monkeypatch)  # This process reads the bucket too.
  _assert_identical(_final(run), _final(tmp_path / 'local'))
  bucket_run = epath.Path(run)
  for name in ('config.json', 'normalization.json', 'history.json',
               'learning_curves.png', 'results.json'):
    assert (bucket_run / name).exists(), name
  assert not list(bucket_run.glob('*.tmp'))
  # Both runs' TensorBoard events: the killed one's up to its last flush.
  assert len(list((bucket_run / 'tensorboard').iterdir())) == 2
  trace = profiling.process_dir(run, 0) / 'plugins' / 'profile'
  (session,) = trace.iterdir()
  assert {'perfetto_trace.json.gz'} <= {p.name for p in session.iterdir()}
  assert any(p.name.endswith('.xplane.pb') for p in session.iterdir())

  # The tools, on the bucket.
  results = json.loads((bucket_run / 'results.json').read_text())
  evaluated = _ok(_main(scratch, env, '--mode=eval', f'--workdir={run}',
                        config=False))
  assert (f'Test accuracy: {round(results["test_accuracy"] * 100, 2)}%'
          in evaluated.stdout.splitlines())
  assert (f'Test top 5 accuracy: '
          f'{round(results["test_top5_accuracy"] * 100, 2)}%'
          in evaluated.stdout.splitlines())
  image = tmp_path / 'grey.png'
  Image.new('RGB', (32, 32), (90, 90, 90)).save(image)
  predicted = _ok(_main(scratch, env, '--mode=predict', f'--workdir={run}',
                        str(image), config=False))
  assert len(re.findall(r'^\s+[1-5]\. ', predicted.stdout, re.M)) == 5
  assert (bucket_run / 'class_names.json').exists()
  model = perceiver_jax.load(run)  # The Python API, on the bucket.
  (prediction,) = model.predict(model.load_images([str(image)]))
  assert f'  1. {prediction.classes[0]} ' in predicted.stdout
  _ok(_main(scratch, env, '--mode=attention', f'--workdir={run}',
            '--num_images=2', config=False))
  with Image.open(io.BytesIO(
      (bucket_run / 'attention_maps.png').read_bytes())) as png:
    assert png.size == (6 * 96, 16 + 2 * 96)

  # A new local run fine-tuned from the bucket's weights.
  tuned = _ok(_main(scratch, env, f'--workdir={tmp_path / "tuned"}',
                    f'--config.init_from={run}', '--config.num_epochs=1'))
  assert re.search(
      rf'Initialised from the \w+ checkpoint of {run} \(step \d+', tuned.stderr)
  assert os.listdir(scratch) == []


def test_gs_data_dir_feeds_both_storages_alike(
    tmp_path, gcs, monkeypatch, fake_cifar100):
  """A tfds data dir in the bucket (ArrayRecord), read in memory or streamed
  by a grain worker process: the same batches, so the same history."""
  gcs.use(monkeypatch)
  data_dir = epath.Path(f'{gcs.bucket}/{tmp_path.name}/tfds')
  for local in epath.Path(fake_cifar100.data_dir).glob('cifar100/*/*'):
    local.copy(data_dir / 'cifar100' / local.parent.name / local.name)
  scratch = tmp_path / 'cwd'
  scratch.mkdir()
  env = dict(subprocess_env(devices=1), **gcs.env)
  histories = []
  for storage in ('memory', 'stream'):
    workdir = tmp_path / storage
    _ok(_main(scratch, env, f'--workdir={workdir}', '--config.num_epochs=1',
              '--config.mock_data=False', '--config.dataset=cifar100',
              f'--config.tfds_data_dir={data_dir}', '--config.batch_size=8',
              f'--config.data_storage={storage}', '--config.data_workers=1'))
    histories.append((workdir / 'history.json').read_bytes())
  assert histories[0] == histories[1]
  assert json.loads(histories[0])[0]['val_accuracy'] >= 0
  assert os.listdir(scratch) == []
