"""The workdir's layout: one name for each file a run writes, and its readers.

Training writes these files and the tools read them, so both take the names
from here. Paths may be local or any filesystem `etils.epath` knows (gs://).
"""

import json

from etils import epath
import jax
import numpy as np

from perceiver_jax import errors

CONFIG = 'config.json'  # The run's config.
NORMALIZATION = 'normalization.json'  # Training-split statistics + source.
CHECKPOINTS = 'checkpoints'  # Orbax steps (`checkpointing.py`).
HISTORY = 'history.json'  # Per-epoch metrics.
RESULTS = 'results.json'  # Test metrics of the tested weights.
CLASS_NAMES = 'class_names.json'  # Written by the tools on first use.
LEARNING_CURVES = 'learning_curves.png'
TENSORBOARD = 'tensorboard'


def prepare(workdir):
  """Creates the workdir and proves it writable before any heavy work."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise errors.InputError(
        f'--workdir={workdir} is not a writable directory ({e.strerror or e}); '
        'pass a path you can write to, e.g. --workdir=/tmp/perceiver_run.'
    ) from e
  return path


def read_json(workdir, name):
  """The JSON file `name` of the workdir, or None when it has none."""
  path = epath.Path(workdir) / name
  return json.loads(path.read_text()) if path.exists() else None


def has_checkpoints(workdir):
  """True when the workdir holds a finished checkpoint step."""
  directory = epath.Path(workdir) / CHECKPOINTS
  return directory.exists() and any(p.name.isdigit()
                                    for p in directory.iterdir())


def stats_arrays(stats):
  """float32 `{'mean', 'variance'}` of a normalization.json's contents."""
  return {k: np.asarray(stats[k], np.float32) for k in ('mean', 'variance')}
