"""Orbax checkpoints: atomic saves, the latest few plus the best, exact resume.

A checkpoint holds two items: `state` (step, parameters and optimiser state,
learning rate included, saved as sharded arrays) and `meta` (JSON: epoch,
plateau and early-stopping state, the metric history, partial-epoch metric
sums). The data order and every random key derive from (seed, step), so these
two items are all a resumed run needs to continue exactly.

Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-write never leaves a checkpoint that looks valid;
a save that cannot fit on a local disk is refused before it starts
(`save`), and an unfinished one is removed (`remove_unfinished`) rather
than left to fill the disk.
A finished checkpoint whose files were damaged later is set aside once an
older one restores (`restore_latest`), so it never blocks the run; one that
could not be read for another reason (storage unreachable, out of memory)
is never set aside.
"""

import errno
import json
import logging
import os
import shutil
import time

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from perceiver_jax import checks
from perceiver_jax import errors
from perceiver_jax.training import read_failures as failures
from perceiver_jax.training import workdir as workdir_lib

BEST_MARKER = 'best_step'
# The checkpoint options, as the config takes them.
RULES = {
    'checkpoint_max_to_keep': checks.positive_int(example=3),
    'checkpoint_every_steps': checks.non_negative_int(
        '0: only at epoch ends', example=1000),
}


def create_manager(directory, *, max_to_keep=1, read_only=False):
  """Keeps the latest `max_to_keep` checkpoints and the early-stopping best.

  Every save carries the metric `best_step`: its step when early stopping
  judged the epoch ending there an improvement, else -1 (mid-epoch saves
  included: orbax expects a metric at every save of a manager that tracks
  one, and warns otherwise). The checkpoint where it is highest is the
  latest improvement, i.e. the best by Keras' EarlyStopping (min_delta
  included) rather than by raw val_loss; before the first improvement all
  are -1 and the newest wins the tie, which `LatestN` keeps anyway.
  `read_only` managers (the tools', transfer's) never write or delete.
  """
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(max_to_keep),
      policies.BestN(get_metric_fn=lambda m: m[BEST_MARKER], n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation, create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=True,
      # What a killed save left behind goes when the next run opens it.
      cleanup_tmp_directories=not read_only,
      # Without best_fn orbax does not persist the metrics, and a manager
      # reopened on resume would no longer know which checkpoint is best.
      best_fn=lambda m: m[BEST_MARKER], best_mode='max')
  return ocp.CheckpointManager(directory, options=options,
                               item_names=('state', 'meta'))


def save(manager, step, state, meta, *, is_best=None):
  """Starts an (asynchronous) save.

  `is_best` is None for mid-epoch saves, else whether this epoch improved.
  """
  _check_space(manager, step, state)
  metrics = {BEST_MARKER: float(step if is_best else -1)}
  meta = json.loads(json.dumps(meta))  # A snapshot: the save is asynchronous.
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)


# Room a checkpoint needs beyond its arrays' bytes: orbax's metadata, about
# 350 bytes per array in its sharding file (measured), and a little more.
SPACE_MARGIN_BYTES = 64 * 2**10
# Orbax's OCDBT finalise merges the per-process files into new ones before
# deleting them, so a save briefly holds its arrays twice (seen on a full
# tmpfs); 10% more for the format.
SPACE_FACTOR = 2.2
SPACE_PER_ARRAY_BYTES = 2**10
_UNFINISHED = '.orbax-checkpoint-tmp'  # Orbax's name for a save under way.


def _check_space(manager, step, state):
  """Refuses a save that cannot fit on a local disk, before orbax starts.

  Orbax's writer threads fail on a full disk with a traceback each; this
  raises one OSError (ENOSPC) naming the step's directory instead. Waits
  for the previous save first (orbax would too), so its bytes are counted.
  Processes agree (a collective), so none starts a save the others skip.
  """
  directory = epath.Path(manager.directory)
  if not workdir_lib.is_local(directory):
    return
  manager.wait_until_finished()
  leaves = jax.tree.leaves(state)
  need = (int(SPACE_FACTOR * sum(getattr(x, 'nbytes', 0) for x in leaves))
          + SPACE_PER_ARRAY_BYTES * len(leaves) + SPACE_MARGIN_BYTES)
  free = shutil.disk_usage(directory).free
  short = np.int32(free < need)
  if jax.process_count() > 1:
    short = multihost_utils.process_allgather(short).max()
  if short:
    raise OSError(errno.ENOSPC, f'No space left on device for checkpoint '
                  f'{step} (about {need:,} bytes needed, {free:,} free)',
                  os.fspath(directory / str(step)))


def remove_unfinished(directory):
  """Deletes saves that never finished (process 0); returns their names."""
  directory = epath.Path(directory)
  if jax.process_index() != 0 or not directory.exists():
    return []
  names = []
  for child in directory.iterdir():
    if child.name.endswith(_UNFINISHED):
      child.rmtree()
      names.append(child.name)
  return names


def restore(manager, step, abstract_state):
  """`(state, meta)` of `step`, in the shardings of `abstract_state`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return restored['state'], restored['meta']


class NoUsableCheckpointError(errors.InputError):
  """Checkpoints exist but none restores: refuse to silently start over."""


class CheckpointUnavailableError(RuntimeError):
  """A checkpoint could not be read for a reason other than damage to its
  files (storage unreachable, host out of memory, other code): nothing is
  set aside."""


UNREADABLE_SUFFIX = '.unreadable'  # Not a step name: orbax ignores it.
# Restore attempts on a transient failure, and the first wait (it doubles).
RESTORE_ATTEMPTS = 4
RESTORE_BACKOFF_S = 2.0

# Outcomes of a restore, least to most severe, as the processes share them.
_OUTCOMES = (None, failures.DAMAGED, failures.OTHER, failures.TRANSIENT)


def _alone():
  """Orbax options for a read by this process alone: without orbax's
  closing barrier, so a process whose read fails never leaves the others
  waiting in it (they agree afterwards, `_restore_agreed`)."""
  here = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=here,
                                            active_processes={here})


def _read_items(directory, step, **items):
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                        multiprocessing_options=_alone()) as checkpointer:
    return checkpointer.restore(epath.Path(directory) / str(step),
                                args=ocp.args.Composite(**items))


def read(directory, step, abstract_state):
  """`restore` by this process alone (see `_alone`)."""
  restored = _read_items(directory, step,
                         state=ocp.args.StandardRestore(abstract_state),
                         meta=ocp.args.JsonRestore())
  return restored['state'], restored['meta']


def read_meta(directory, step):
  """The meta item of checkpoint `step`, by this process alone."""
  return _read_items(directory, step, meta=ocp.args.JsonRestore())['meta']


# The parts of the train state that are weights: a run that starts from
# another's (transfer) reads these, not the optimiser state.
WEIGHTS = ('params', 'ema_params')


def read_weights(directory, step):
  """`{'params', 'ema_params' where kept}` of checkpoint `step` as numpy
  arrays, unsharded, by this process alone (see `_alone`). Only these are
  read: another run's optimiser state and devices need not match this
  run's."""
  path = epath.Path(directory) / str(step) / 'state'
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(),
                        multiprocessing_options=_alone()) as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    wanted = {k: tree[k] for k in WEIGHTS if tree.get(k) is not None}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                        wanted)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=args, partial_restore=True))


def _worst(outcome):
  """The most severe of every process's `outcome`; a collective."""
  code = np.int32(_OUTCOMES.index(outcome))
  if jax.process_count() > 1:
    code = multihost_utils.process_allgather(code).max()
  return _OUTCOMES[int(code)]


def _describe(error):
  if error is None:
    return "failed on another process; see its log"
  return f'{type(error).__name__}: {str(error)[:500]}'


def _restore_agreed(directory, step, read_step, attempts, backoff_s):
  """`(restored, outcome, error)` of `read_step(directory, step)` (a read by
  this process alone), as every process agrees.

  Every attempt ends in one collective (`_worst`) that all processes enter,
  whatever their read did. While any process failed transiently, all wait
  and those that failed read again, `attempts` times at most. `outcome` is
  None when every process restored, else the most severe
  `read_failures.failure_kind`.
  """
  restored, error = None, None
  for attempt in range(attempts):
    if restored is None:
      try:
        restored, error = read_step(directory, step), None
      except Exception as e:  # pylint: disable=broad-except
        error = e
    outcome = _worst(None if error is None else failures.failure_kind(error))
    if outcome != failures.TRANSIENT or attempt == attempts - 1:
      return restored, outcome, error
    wait = backoff_s * 2**attempt
    logging.warning('Reading checkpoint %s/%d failed (%s); trying again in '
                    '%.0f s.', directory, step, _describe(error), wait)
    time.sleep(wait)
  raise ValueError(f'attempts={attempts} must be positive')


def set_aside(manager, step):
  """Renames checkpoint `step` to `<step>.unreadable[-k]`; returns the path.

  The files stay for inspection, but orbax no longer counts the step, so a
  resumed run can save that step again instead of stopping at "checkpoint
  already exists". Process 0 renames; every process then reloads.
  """
  directory = epath.Path(manager.directory)
  target = directory / f'{step}{UNREADABLE_SUFFIX}'
  k = 0
  while target.exists():  # Never over an earlier set-aside of this step.
    k += 1
    target = directory / f'{step}{UNREADABLE_SUFFIX}-{k}'
  if jax.process_count() > 1:  # Every process has looked before the move.
    multihost_utils.sync_global_devices(f'perceiver_jax.set_aside.{step}')
  if jax.process_index() == 0:
    (directory / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'perceiver_jax.set_aside.{step}.done')
  manager.reload()
  return target


def _newest_readable(directory, steps, read_step, what, attempts,
                     backoff_s):
  """`(step, restored, failed)`: the first of `steps` whose `read_step`
  (a read by this process alone) succeeds on every process
  (`_restore_agreed`), and `failed`, `(step, outcome, description)` of each
  tried before it, each reported (`what(step)` names it). `step` and
  `restored` are None when none reads.

  Raises:
    CheckpointUnavailableError: a transient failure outlasted the attempts.
  """
  failed = []
  for step in steps:
    restored, outcome, error = _restore_agreed(
        directory, step, read_step, attempts, backoff_s)
    if outcome == failures.TRANSIENT:
      raise CheckpointUnavailableError(
          f'Checkpoint {directory}/{step} could not be read in {attempts} '
          f'attempts ({_describe(error)}). That says nothing about its '
          'files, so nothing was set aside; rerun once the storage (or the '
          "host's memory) is available again.") from error
    if outcome is None:
      return step, restored, failed
    failed.append((step, outcome, _describe(error)))
    logging.warning('%s is unreadable (%s: %s); trying the newest other '
                    'one.', what(step), outcome, failed[-1][2])
  return None, None, failed


def restore_latest(manager, abstract_state, *, attempts=RESTORE_ATTEMPTS,
                   backoff_s=RESTORE_BACKOFF_S):
  """The newest checkpoint that restores, or None when there is none.

  A checkpoint whose files are damaged (`read_failures.failure_kind`) is
  reported by name and the next older one is tried. Once an older one
  restores, the newer damaged ones are set aside (`set_aside`), so damage
  costs only the work since the checkpoint before it and the run trains
  past its step. Nothing is set aside for a failure that says nothing about
  the files: a transient one (storage unreachable, out of memory) is retried
  `attempts` times, waiting `backoff_s` seconds, then twice that, ..., and
  then stops the run; any other one stops it once an older checkpoint
  restores (the code may be at fault). If none restores nothing is moved
  and the run stops rather than start over. Processes decide together: a
  step counts as restored only when it restored on all of them, and as
  damaged only when every process that failed found damage.

  Raises:
    CheckpointUnavailableError: a transient failure outlasted the attempts,
      or a newer checkpoint failed for a reason other than damage.
    NoUsableCheckpointError: checkpoints exist and none restores.
  """
  manager.reload()
  directory = manager.directory
  steps = sorted(manager.all_steps(), reverse=True)
  step, restored, failed = _newest_readable(
      directory, steps, lambda d, s: read(d, s, abstract_state),
      lambda s: f'Checkpoint {directory}/{s}', attempts, backoff_s)
  if step is None:
    if steps:
      raise NoUsableCheckpointError(
          f'None of the checkpoints {steps} in {directory} could be '
          'restored into this model (see the warnings above). Use a new '
          '--workdir, or move the checkpoints away to start over.')
    return None
  others = [f'step {s}: {d}' for s, o, d in failed
            if o != failures.DAMAGED]
  if others:
    raise CheckpointUnavailableError(
        f'Checkpoint {directory}/{step} restores, but newer ones do not, '
        f'and not because their files are damaged ({"; ".join(others)}), '
        'so nothing was set aside. Were they written by other code?')
  for bad, _, _ in failed:
    logging.warning('Moved the damaged checkpoint %s/%d to %s; resuming '
                    'from step %d.', directory, bad,
                    set_aside(manager, bad), step)
  return restored


def restores_best_weights(config):
  """Whether a run (its ConfigDict or saved config dict) tests, and so
  serves, its early-stopping best rather than its final weights."""
  return config.get('early_stopping', {}).get('restore_best_weights', True)


def tested_step(config, best_step, latest, available, directory):
  """`(step, which)`: the checkpoint holding the weights training tested.

  With `restores_best_weights(config)` that is the early-stopping best,
  `best_step` as the newest meta records it; with no best recorded, or its
  checkpoint no longer among the `available` steps, the `latest`, with a
  warning. Without, training tested its final weights: the `latest`.
  `which` is 'best' or 'latest'.
  """
  if not restores_best_weights(config):
    return latest, 'latest'
  if best_step is not None and best_step in available:
    return best_step, 'best'
  reason = ('no epoch has finished, so no best is recorded' if best_step is None
            else f'the best checkpoint (step {best_step}) was deleted')
  logging.warning('%s in %s; using the latest checkpoint, step %d.',
                  reason[0].upper() + reason[1:], directory, latest)
  return latest, 'latest'


def select_checkpoint(manager, config, *, attempts=RESTORE_ATTEMPTS,
                      backoff_s=RESTORE_BACKOFF_S):
  """`(step, which)` of the weights training tested (`tested_step`), after
  the newest checkpoint whose meta reads on every process."""
  manager.reload()
  directory = manager.directory
  all_steps = sorted(manager.all_steps(), reverse=True)
  step, meta, _ = _newest_readable(
      directory, all_steps, read_meta,
      lambda s: f'Checkpoint {directory}/{s}', attempts, backoff_s)
  if step is None:
    raise errors.InputError(
        f'No checkpoint in {directory} can be read; the run must be '
        'trained again (or its checkpoints restored from a backup).')
  return tested_step(config, meta.get(BEST_MARKER), step, all_steps,
                     directory)


def restore_tested(manager, config, read_step, *,
                   attempts=RESTORE_ATTEMPTS, backoff_s=RESTORE_BACKOFF_S):
  """`(step, which, read_step(directory, step))` for `select_checkpoint`'s
  choice of the run with `config`, as every process agrees.

  `read_step` reads by this process alone (`read`, `read_weights`). A
  damaged choice is reported and skipped: the next readable checkpoint,
  newest first, is used instead (with a warning, since those are not the
  weights training tested). `which` is 'best', 'latest' or 'last readable'.
  """
  directory = manager.directory
  first, which = select_checkpoint(manager, config, attempts=attempts,
                                   backoff_s=backoff_s)
  others = [s for s in sorted(manager.all_steps(), reverse=True)
            if s != first]
  step, restored, failed = _newest_readable(
      directory, [first] + others, read_step,
      lambda s: (f'The {which} checkpoint {directory}/{s}' if s == first
                 else f'Checkpoint {directory}/{s}'), attempts, backoff_s)
  if step is None:
    raise errors.InputError(
        f'No checkpoint in {directory} could be restored ('
        + '; '.join(f'step {s}: {d}' for s, _, d in failed) + '). Was the '
        'run written by a different version of the model or train-state '
        'code?')
  if failed:
    logging.warning('Using checkpoint %s/%d instead of the %s one: these '
                    'are not the weights training tested.', directory, step,
                    which)
    which = 'last readable'
  return step, which, restored


def abstract(tree):
  """Shape, dtype and sharding of every leaf, as orbax restore targets."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
