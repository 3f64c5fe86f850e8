"""workdir.py: workdir paths and the one writer, locally and on gs://.

The gs:// cases run in this process against the local GCS emulator (`gcs`).
"""

import errno
import os

from etils import epath
import pytest

from perceiver_jax import errors
from perceiver_jax.training import workdir as workdir_lib


@pytest.fixture(params=['local', 'gs'])
def folder(request, tmp_path, monkeypatch):
  """An empty folder: under tmp_path, or in the emulator's bucket."""
  if request.param == 'local':
    return epath.Path(tmp_path / 'run')
  gcs = request.getfixturevalue('gcs')
  gcs.use(monkeypatch)
  return epath.Path(f'{gcs.bucket}/{tmp_path.name}/run')


def test_path_keeps_gs_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert os.fspath(workdir_lib.path('gs://bucket/run')) == 'gs://bucket/run'
  monkeypatch.chdir(tmp_path)
  assert workdir_lib.path('runs/x') == epath.Path(tmp_path / 'runs' / 'x')
  assert workdir_lib.is_local(tmp_path)
  assert not workdir_lib.is_local('gs://bucket/run')


def test_write_replaces_whole_files_and_leaves_no_tmp(folder):
  folder.mkdir(parents=True, exist_ok=True)
  target = folder / 'history.json'
  workdir_lib.write(target, '[1]')
  workdir_lib.write(target, b'[1, 2]')
  assert target.read_text() == '[1, 2]'
  assert [p.name for p in folder.iterdir()] == ['history.json']


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  target = tmp_path / 'results.json'
  workdir_lib.write(target, 'old')

  def fail_half_way(path, data):
    with open(path, 'w') as f:
      f.write(data[:2])
    raise OSError('disk full')

  monkeypatch.setattr(epath.Path, 'write_text', fail_half_way)
  with pytest.raises(OSError, match='disk full'):
    workdir_lib.write(target, 'new contents')
  assert target.read_text() == 'old'


def test_a_full_disk_leaves_no_tmp_and_names_the_file(tmp_path,
                                                      monkeypatch):
  target = tmp_path / 'learning_curves.png'

  def fill_the_disk(path, data):
    with open(path, 'wb') as f:
      f.write(data[:2])
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(epath.Path, 'write_bytes', fill_the_disk)
  with pytest.raises(OSError) as e:
    workdir_lib.write(target, b'\x89PNG...')
  assert e.value.errno == errno.ENOSPC
  assert workdir_lib.out_of_space_path(e.value) == str(target)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('error,path', [
    (OSError(errno.ENOSPC, 'No space left on device', '/w/history.json'),
     '/w/history.json'),
    (OSError(errno.EDQUOT, 'Disk quota exceeded'), ''),
    # tensorstore's error for a full disk, as orbax's writer threads raise it.
    (ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/ckpt/8.'
                'orbax-checkpoint-tmp/state/_sharding": Failed writing: '
                '"/w/ckpt/8.orbax-checkpoint-tmp/state/_sharding.__lock": '
                'Failed to write 35441 bytes to file 9: No space left on '
                "device [os_error_code='28']"),
     '/w/ckpt/8.orbax-checkpoint-tmp/state/_sharding'),
    (OSError(errno.EIO, 'Input/output error'), None),
    (ValueError('RESOURCE_EXHAUSTED: out of memory'), None),
])
def test_out_of_space_path(error, path):
  assert workdir_lib.out_of_space_path(error) == path
  try:
    raise RuntimeError('wrapped') from error
  except RuntimeError as wrapped:
    assert workdir_lib.out_of_space_path(wrapped) == path


def test_write_json_is_process_0s(tmp_path, monkeypatch):
  workdir_lib.write_json(tmp_path / 'a.json', {'b': 1})
  assert (tmp_path / 'a.json').read_text() == '{\n  "b": 1\n}\n'
  monkeypatch.setattr(workdir_lib.jax, 'process_index', lambda: 1)
  workdir_lib.write_json(tmp_path / 'c.json', {})
  assert not (tmp_path / 'c.json').exists()


def test_mirror_copies_new_and_changed_files_in(folder, monkeypatch):
  mirror = workdir_lib.Mirror(folder / 'tensorboard')
  local = mirror.local
  assert (local == folder / 'tensorboard') == workdir_lib.is_local(folder)
  (local / 'sub').mkdir(parents=True, exist_ok=True)
  (local / 'events').write_text('one')
  (local / 'sub' / 'trace').write_text('x')
  mirror.sync()
  assert (folder / 'tensorboard' / 'sub' / 'trace').read_text() == 'x'
  uploads, upload = [], workdir_lib.upload
  monkeypatch.setattr(workdir_lib, 'upload', lambda src, dst: (
      uploads.append(os.path.basename(src)), upload(src, dst)))
  (local / 'events').write_text('one two')  # Grew, as an events file does.
  mirror.sync()
  assert (folder / 'tensorboard' / 'events').read_text() == 'one two'
  assert uploads == ([] if workdir_lib.is_local(folder) else ['events'])
  mirror.close()
  assert os.path.isdir(local) == workdir_lib.is_local(folder)
  assert sorted(p.name for p in (folder / 'tensorboard').iterdir()) == [
      'events', 'sub']


def test_a_killed_runs_mirror_is_taken_over_by_its_rerun(
    gcs, tmp_path, monkeypatch):
  """A run killed before close() leaves its local copy; the rerun's Mirror
  of the same destination uses that folder and uploads what it held."""
  gcs.use(monkeypatch)
  run = epath.Path(f'{gcs.bucket}/{tmp_path.name}/run')
  dest = run / 'tensorboard'
  killed = workdir_lib.Mirror(dest)
  (killed.local / 'events.1').write_text('written, never synced')
  rerun = workdir_lib.Mirror(dest)
  assert rerun.local == killed.local
  other = workdir_lib.Mirror(run / 'profile')
  assert other.local != killed.local
  other.close()
  rerun.close()
  assert (dest / 'events.1').read_text() == 'written, never synced'
  assert not os.path.exists(killed.local)


def test_has_checkpoints_counts_finished_steps_only(folder):
  assert not workdir_lib.has_checkpoints(folder)
  assert workdir_lib.finished_steps(folder) == []
  step = folder / 'checkpoints' / '4'
  step.mkdir(parents=True)
  (step / 'state').write_text('arrays')
  (folder / 'checkpoints' / '8.orbax-checkpoint-tmp').mkdir()
  # Locally orbax renames a finished step into place; on GCS it marks it.
  assert workdir_lib.has_checkpoints(folder) == workdir_lib.is_local(folder)
  (step / workdir_lib.COMMIT_SUCCESS).write_text('')
  assert workdir_lib.has_checkpoints(folder)
  assert workdir_lib.finished_steps(folder) == [4]


def test_a_gs_workdir_without_google_cloud_storage_is_refused(
    gcs, monkeypatch):
  gcs.use(monkeypatch)  # Where a mkdir would go, were nothing checked.
  find_spec = workdir_lib.importlib.util.find_spec
  monkeypatch.setattr(
      workdir_lib.importlib.util, 'find_spec',
      lambda name: None if name == 'google.cloud.storage' else find_spec(name))
  with pytest.raises(errors.InputError, match='pip install -r requirements'):
    workdir_lib.prepare(f'{gcs.bucket}/unchecked')
