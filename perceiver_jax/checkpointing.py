"""Orbax checkpoints: atomic saves, the latest few plus the best, exact resume.

A checkpoint holds two items: `state` (step, parameters and optimiser state,
learning rate included, saved as sharded arrays) and `meta` (JSON: epoch,
plateau and early-stopping state, the metric history, partial-epoch metric
sums). The data order and every random key derive from (seed, step), so these
two items are all a resumed run needs to continue exactly.

Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-write never leaves a checkpoint that looks valid.
"""

import json
import logging

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_MARKER = 'best_step'


def create_manager(directory, *, max_to_keep):
  """Keeps the latest `max_to_keep` checkpoints and the early-stopping best.

  Epoch-end saves carry the metric `best_step`: their step when early
  stopping judged the epoch an improvement, else -1. The checkpoint where it
  is highest is the latest improvement, i.e. the best by Keras'
  EarlyStopping (min_delta included) rather than by raw val_loss.
  """
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(max_to_keep),
      policies.BestN(get_metric_fn=lambda m: m[BEST_MARKER], n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation, create=True,
      enable_async_checkpointing=True,
      # Without best_fn orbax does not persist the metrics, and a manager
      # reopened on resume would no longer know which checkpoint is best.
      best_fn=lambda m: m[BEST_MARKER], best_mode='max')
  return ocp.CheckpointManager(directory, options=options,
                               item_names=('state', 'meta'))


def save(manager, step, state, meta, *, is_best=None):
  """Starts an (asynchronous) save.

  `is_best` is None for mid-epoch saves, else whether this epoch improved.
  """
  metrics = None if is_best is None else {
      BEST_MARKER: float(step if is_best else -1)}
  meta = json.loads(json.dumps(meta))  # A snapshot: the save is asynchronous.
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)


def restore(manager, step, abstract_state):
  """Restores `(state, meta)` of `step` into the shardings of `abstract_state`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return restored['state'], restored['meta']


class NoUsableCheckpointError(ValueError):
  """Checkpoints exist but none restores: refuse to silently start over."""


def restore_latest(manager, abstract_state):
  """The newest checkpoint that restores, or None when there is none.

  A checkpoint that fails to restore (truncated or corrupted files) is
  reported by name and the next older one is tried, so a damaged latest
  checkpoint costs only the work since the one before it. If none restores
  the run stops rather than overwrite them with a fresh start.
  """
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      return restore(manager, step, abstract_state)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint %s/%d is unreadable (%s: %s); trying the '
                      'previous one.', manager.directory, step,
                      type(e).__name__, str(e)[:500])
  if steps:
    raise NoUsableCheckpointError(
        f'None of the checkpoints {steps} in {manager.directory} could be '
        'restored into this model (see the warnings above). Use a new '
        '--workdir, or move the checkpoints away to start over.')
  return None


def abstract(tree):
  """Shape, dtype and sharding of every leaf, as orbax restore targets."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
