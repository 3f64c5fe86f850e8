"""The workdir: the name of each file a run writes, and the one way to write.

Training writes these files and the tools read them, so both take the names
and the writers from here. A workdir is an `etils.epath.Path` end to end,
local, NFS or gs:// (epath reaches GCS through `tf.io.gfile`); `path()`
makes one, and nothing calls `.resolve()` (it turns `gs://b/run` into a
local `./gs:/b/run`), `open()` or `os.path` on it.

Every write is atomic: readers, and a run resumed after a crash, see the old
file or the new one, never half of one. Locally that is `NAME.tmp`, then a
rename; on GCS a single upload is atomic already (an object appears whole
when its upload ends), and a rename would be a second copy. Libraries that
write only local files (TensorBoard's event writer, jax's profiler) write
into a `Mirror`, which copies them in.
"""

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile

from etils import epath
import jax
import numpy as np

from perceiver_jax import errors
from perceiver_jax.training import read_failures

CONFIG = 'config.json'  # The run's config.
NORMALIZATION = 'normalization.json'  # Training-split statistics + source.
CHECKPOINTS = 'checkpoints'  # Orbax steps (`checkpointing.py`).
HISTORY = 'history.json'  # Per-epoch metrics.
RESULTS = 'results.json'  # Test metrics of the tested weights.
CLASS_NAMES = 'class_names.json'  # Written by the tools on first use.
LEARNING_CURVES = 'learning_curves.png'
TENSORBOARD = 'tensorboard'
ATTENTION_MAPS = 'attention_maps.png'  # --mode=attention's default output.
TMP_SUFFIX = '.tmp'
# A full disk, or a full quota.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore (orbax's array writer) reports one, and the file it names.
_NO_SPACE_TEXT = re.compile(r"No space left on device|os_error_code='(28|122)'")
_FILE_IN_TEXT = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')


def path(workdir):
  """`workdir` as an absolute epath.Path; a gs:// one stays as it is.

  (epath's `.absolute()` and `.resolve()` both prefix a gs:// path with the
  current directory.)
  """
  workdir = epath.Path(workdir)
  return workdir.absolute() if is_local(workdir) else workdir


def is_local(file_path):
  """True for paths of this machine's filesystems (NFS included)."""
  return '://' not in os.fspath(file_path)


def write(file_path, data):
  """Writes `data` (str or bytes) to `file_path` atomically (module doc).

  A failed write leaves no `NAME.tmp` behind, and a full disk's OSError
  names `file_path`.
  """
  file_path = epath.Path(file_path)
  target = (file_path if not is_local(file_path) else
            file_path.with_name(file_path.name + TMP_SUFFIX))
  with _cleaned_up(target, file_path):
    if isinstance(data, bytes):
      target.write_bytes(data)
    else:
      target.write_text(data)
    if target != file_path:
      target.replace(file_path)


class _cleaned_up:  # pylint: disable=invalid-name
  """Removes the temporary `target` of `file_path` when the write fails."""

  def __init__(self, target, file_path):
    self.target, self.file_path = target, file_path

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    if error is None or self.target == self.file_path:
      return False
    try:
      self.target.unlink(missing_ok=True)
    except OSError:
      pass  # The write's own error says more.
    if (isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS
        and not error.filename):
      raise OSError(error.errno, error.strerror,
                    os.fspath(self.file_path)) from error
    return False


def out_of_space_path(error):
  """The path a write could not fill for lack of space, or None.

  None unless `error` (or what it was raised from) is a full disk or quota:
  an OSError with ENOSPC / EDQUOT, or tensorstore's message for one. The
  path is '' where the error names none.
  """
  for e in read_failures.chain(error):
    if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
      return os.fspath(e.filename or '')
    if _NO_SPACE_TEXT.search(str(e)):
      named = _FILE_IN_TEXT.search(str(e))
      return named.group(1) if named else ''
  return None


def write_json(file_path, obj):
  """Writes `obj` as JSON from process 0 (the others share its workdir)."""
  if jax.process_index() == 0:
    write(file_path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def upload(local_file, file_path):
  """Copies the local file `local_file` to `file_path`, atomically."""
  file_path = epath.Path(file_path)
  target = (file_path if not is_local(file_path) else
            file_path.with_name(file_path.name + TMP_SUFFIX))
  target.parent.mkdir(parents=True, exist_ok=True)
  with _cleaned_up(target, file_path):
    epath.Path(local_file).copy(target, overwrite=True)
    if target != file_path:
      target.replace(file_path)


class Mirror:
  """A local folder for libraries that write only local files.

  `local` is where they write; `sync()` copies what is new or changed since
  the last sync into `dest`, each file atomically (`upload`); `close()`
  syncs and removes the local copy. For a local `dest`, `local` is `dest`
  itself and nothing is copied. The local copy of a remote `dest` is named
  after it (and the process), so a run killed before `close()` leaves one
  folder, which its rerun takes over and syncs: the files it held reach
  the bucket then, and such folders never pile up.
  """

  def __init__(self, dest):
    self.dest = epath.Path(dest)
    self._temp = None
    if is_local(self.dest):
      self.dest.mkdir(parents=True, exist_ok=True)
      self.local = self.dest
    else:
      key = hashlib.sha256(os.fspath(self.dest).encode()).hexdigest()[:16]
      self._temp = os.path.join(
          tempfile.gettempdir(), f'perceiver_jax_mirror_{key}_'
          f'{jax.process_index()}')
      os.makedirs(self._temp, exist_ok=True)
      self.local = epath.Path(self._temp)
    self._synced = {}  # Relative name -> (size, mtime_ns) when copied.

  def sync(self):
    if self._temp is None:
      return
    for root, _, files in os.walk(self._temp):
      for name in files:
        local_file = os.path.join(root, name)
        stat = os.stat(local_file)
        relative = os.path.relpath(local_file, self._temp)
        if self._synced.get(relative) != (stat.st_size, stat.st_mtime_ns):
          upload(local_file, self.dest / relative)
          self._synced[relative] = (stat.st_size, stat.st_mtime_ns)

  def close(self):
    if self._temp is not None:
      self.sync()
      shutil.rmtree(self._temp, ignore_errors=True)
      self._temp = None


def _check_gcs_client(workdir):
  """Orbax reaches a gs:// checkpoint folder through google-cloud-storage."""
  try:
    found = importlib.util.find_spec('google.cloud.storage') is not None
  except ModuleNotFoundError:  # No `google.cloud` at all.
    found = False
  if not found:
    raise errors.InputError(
        f'--workdir={workdir} is on GCS, and orbax writes checkpoints there '
        'through the google-cloud-storage package, which is not installed; '
        'run `pip install -r requirements.txt` (it pins the version).')


def prepare(workdir):
  """Creates the workdir and proves it writable before any heavy work."""
  workdir_path = path(workdir)
  if not is_local(workdir_path):
    _check_gcs_client(workdir)
  try:
    workdir_path.mkdir(parents=True, exist_ok=True)
    probe = workdir_path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise errors.InputError(
        f'--workdir={workdir} is not a writable directory ({e.strerror or e}); '
        'pass a path you can write to, e.g. --workdir=/tmp/perceiver_run.'
    ) from e
  return workdir_path


def read_json(workdir, name):
  """The JSON file `name` of the workdir, or None when it has none."""
  file_path = epath.Path(workdir) / name
  return json.loads(file_path.read_text()) if file_path.exists() else None


# Orbax's mark of a finished step where it cannot rename a temporary folder
# into place (GCS): a step folder without it was cut off mid-write.
COMMIT_SUCCESS = 'commit_success.txt'


def finished_steps(workdir):
  """The workdir's finished checkpoint steps, ascending.

  Locally orbax renames a finished step into place; on GCS it marks it.
  """
  directory = epath.Path(workdir) / CHECKPOINTS
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit()
                and (is_local(p) or (p / COMMIT_SUCCESS).exists()))


def has_checkpoints(workdir):
  """True when the workdir holds a finished checkpoint step."""
  return bool(finished_steps(workdir))


def stats_arrays(stats):
  """float32 `{'mean', 'variance'}` of a normalization.json's contents."""
  return {k: np.asarray(stats[k], np.float32) for k in ('mean', 'variance')}
