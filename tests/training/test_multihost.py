"""Two processes x two CPU devices train exactly like one process x four.

On tiny JPEGs streamed by grain worker processes, spawned beside processes
that joined jax.distributed. Which examples each host reads is the sampler's
alone, shared by both storages: tests/data/test_input_pipeline.py checks, for
each storage in one process, that the global batch does not depend on how
the shards are spread over processes.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np

from tests.training.test_steps import assert_params_close
from tests.support import ROOT
from tests.support import subprocess_env

WORKER = os.path.join(ROOT, 'tests', 'training', 'multihost_worker.py')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(workdir, out, num_processes, process_id, port, devices,
            overrides=None):
  env = subprocess_env(devices)  # The worker sets XLA_FLAGS itself.
  env.pop('XLA_FLAGS')
  return subprocess.Popen(
      [sys.executable, WORKER, str(workdir), str(out), str(num_processes),
       str(process_id), str(port), str(devices),
       json.dumps(overrides or {})],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _wait(procs):
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out[-2000:] + err[-6000:]
  return outputs


def test_two_processes_match_one_process(tmp_path, tiny_jpegs):
  overrides = dict(mock_data=False, dataset='tiny_jpegs', batch_size=8,
                   tfds_data_dir=tiny_jpegs, host_crop='inception',
                   device_augment='none', data_storage='stream',
                   data_workers=1)
  port = _free_port()
  multi = [_launch(tmp_path / 'multi', tmp_path / f'p{i}.npz', 2, i, port, 2,
                   overrides) for i in range(2)]
  single = _launch(tmp_path / 'single', tmp_path / 'single.npz', 1, 0, 0, 4,
                   overrides)
  outputs = _wait(multi + [single])
  p0, p1, ref = (np.load(tmp_path / f) for f in ('p0.npz', 'p1.npz',
                                                 'single.npz'))
  assert int(p0['__num_devices__']) == int(ref['__num_devices__']) == 4
  assert int(p0['__step__']) == int(ref['__step__']) > 0
  assert sorted(p0.files) == sorted(p1.files) == sorted(ref.files)
  for k in p0.files:
    # The two processes hold bit-identical replicas...
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    # ...equal to the single-process run up to float32 reduction order.
    assert_params_close(k, p0[k], ref[k], atol=1e-5)
  # Only process 0 reports and writes the logs.
  (out0, _), (out1, err1) = outputs[:2]
  assert 'Test accuracy: ' in out0 and 'Test accuracy: ' not in out1
  assert 'Epoch 1/1' not in err1
  assert (tmp_path / 'multi' / 'history.json').exists()
  assert (tmp_path / 'multi' / 'checkpoints').exists()


def test_sigterm_on_one_host_makes_every_host_save_the_same_step(tmp_path):
  port = _free_port()
  env = subprocess_env(devices=2)
  procs = [subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/fake_data.py',
       f'--workdir={tmp_path}', '--config.num_epochs=50',
       '--config.log_every_steps=1', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  # Once process 0 is training, only process 1 receives the notice.
  seen = []
  for line in procs[0].stderr:
    seen.append(line)
    if 'Epoch 2/50' in line:
      procs[1].send_signal(signal.SIGTERM)
      break
  outputs = [p.communicate(timeout=300) for p in procs]
  errs = [''.join(seen) + outputs[0][1], outputs[1][1]]
  pattern = r'saved a checkpoint at step (\d+)'
  saved = [re.findall(pattern, e) for e in errs]
  for p, e in zip(procs, errs):
    assert p.returncode == 128 + signal.SIGTERM, e[-5000:]
  assert saved[0] and saved[0] == saved[1]
  assert str(saved[0][0]) in os.listdir(tmp_path / 'checkpoints')
