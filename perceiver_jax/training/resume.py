"""What a resumed run keeps from its workdir and what it takes from the config.

A rerun with the same workdir continues from the newest checkpoint. Fields
that define the model or its data must equal the saved run's
(`resume_conflicts`); the others may change, and each such change
takes effect, none is silently ignored:

* `learning_rate` under the plateau controller: the checkpoint holds the
  controller's current rate, so a new configured rate replaces it (its
  patience and best value are kept). Under a schedule the rate follows the
  new config by construction.
* `weight_decay`: the optimiser state carries it as a hyperparameter, which
  is set to the new value.
* `early_stopping.*`: applied from the next epoch on. A run that had
  stopped early trains on when the new patience exceeds its epochs without
  improvement (with that patience Keras would not have stopped).
* The slice: the example order depends on the seed, epoch, step and global
  batch size only (`data/sampler.py`), so a run resumes on any number of
  devices and hosts, mid-epoch included, reading on exactly where it
  stopped (`adopt_layout`). A new `batch_size` changes the order and the
  steps per epoch: it is taken at an epoch end and refused mid-epoch.
* `grad_accum_steps`: takes effect at the next step, mid-epoch included;
  each step still sees the same batch and the mean of its gradient.
"""

import dataclasses
import logging

import jax
import numpy as np

from perceiver_jax import config_lib
from perceiver_jax.training import callbacks
from perceiver_jax.training import workdir as workdir_lib

# Fields that may change when a run resumes: they steer training, logging or
# speed but leave the model, its data and the example order as they were.
# Any other difference would not fit the checkpoints (or silently change the
# run), so resuming refuses it.
# weight_decay_mask, grad_clip_norm and ema_decay change the optimiser state
# or the EMA copy the checkpoint holds, so they may not change.
# grad_accum_steps changes only the order in which a batch's gradient is
# summed (and which dropout masks are drawn), not the step, so it may.
RESUMABLE_FIELDS = (
    'num_epochs', 'log_every_steps', 'checkpoint_max_to_keep',
    'checkpoint_every_steps', 'tfds_data_dir', 'dtype', 'attention_impl',
    'attention_form', 'dropout_bits', 'remat', 'learning_rate', 'weight_decay',
    'plateau', 'early_stopping', 'lr_schedule', 'warmup_epochs',
    'min_learning_rate', 'label_smoothing', 'mixup_alpha', 'cutmix_alpha',
    'mix_prob', 'randaugment_num_ops', 'randaugment_magnitude',
    'data_storage', 'data_workers', 'tfds_manual_dir', 'init_from',
    'lr_decay_epochs', 'lr_decay_factor', 'profile_steps', 'batch_size',
    'momentum', 'grad_accum_steps',
)
# What a checkpoint's meta records of how its batches were laid out.
LAYOUT_KEYS = ('batch_size', 'steps_per_epoch', 'num_devices')


def resume_conflicts(saved, config):
  """Fields where `config` differs from the `saved` config dict of a workdir.

  A field one side lacks counts as its default
  (`config_lib.added_field_defaults`), so
  a workdir saved before a field existed resumes only while the field keeps
  its default, unless the field may change anyway. A missing field with no
  default is a difference.

  Returns `(conflicts, allowed)`: lists of 'field: saved -> new' strings, the
  first for fields that forbid resuming, the second for those that may change.
  """
  saved = config_lib.upgrade(saved)
  defaults = config_lib.added_field_defaults()
  resumable = lambda name: name.split('.')[0] in RESUMABLE_FIELDS
  conflicts = config_lib.differences(
      saved, config, defaults=defaults, keep=lambda n: not resumable(n))
  allowed = config_lib.differences(saved, config, defaults=defaults,
                                   keep=resumable)
  return conflicts, allowed


def check_compatible(workdir, config, saved):
  """Refuses a workdir whose checkpoints belong to a different model or data."""
  if saved is None or not workdir_lib.has_checkpoints(workdir):
    return
  conflicts, allowed = resume_conflicts(saved, config)
  if conflicts:
    raise config_lib.ConfigError(
        f'--workdir={workdir} holds checkpoints of a run with a different '
        'model or data, so it cannot resume with this config. Differing '
        'fields (saved -> requested):\n  - ' + '\n  - '.join(conflicts) +
        '\nUse a new --workdir, or pass the saved values (see '
        f'{workdir / workdir_lib.CONFIG}).')
  if allowed:
    logging.warning('Resuming with changed training settings: %s',
                    '; '.join(allowed))


def _set_weight_decay(state, value):
  hyperparams = state.opt_state.hyperparams
  old = hyperparams['weight_decay']
  new = jax.device_put(np.asarray(value, old.dtype), old.sharding)
  return state.replace(opt_state=state.opt_state._replace(
      hyperparams=dict(hyperparams, weight_decay=new)))


def adopt_layout(meta, step, saved, layout):
  """Checks that a checkpoint's epoch can go on under this run's batches.

  Args:
    meta: the restored meta dict (updated in place: `layout`, and the
      position in the epoch for checkpoints that did not record it).
    step: the restored global step.
    saved: the config dict the workdir held before this run, or None.
    layout: this run's `{batch_size, steps_per_epoch, num_devices}`.

  Raises:
    config_lib.ConfigError: the global batch size changed mid-epoch.
  """
  recorded = {k: meta.get(k) for k in LAYOUT_KEYS}
  if recorded['batch_size'] is None:  # Written before layouts were recorded.
    recorded['batch_size'] = (saved or {}).get('batch_size',
                                               layout['batch_size'])
  mid_epoch = meta['epoch_sums'] is not None
  if recorded['batch_size'] != layout['batch_size']:
    if mid_epoch:
      raise config_lib.ConfigError(
          f'The checkpoint this run resumes from (step {step}) is in the '
          f'middle of epoch {meta["epoch"] + 1}, trained with batch_size='
          f'{recorded["batch_size"]}, and this run asks for batch_size='
          f'{layout["batch_size"]}. The global batch size decides the order '
          'of an epoch\'s examples and its number of steps, so the rest of '
          'this epoch cannot be read with another one. Resume with '
          f'--config.batch_size={recorded["batch_size"]}; the batch size may '
          'change at an epoch end: to switch, finish this epoch with the old '
          f'one (--config.batch_size={recorded["batch_size"]} '
          f'--config.num_epochs={meta["epoch"] + 1}), then rerun with the '
          'new batch size and the full num_epochs.')
    logging.warning(
        'batch_size %d -> %d at the end of epoch %d: epochs from %d on take '
        '%d steps (were %s) in the order of the new batch size.',
        recorded['batch_size'], layout['batch_size'], meta['epoch'],
        meta['epoch'] + 1, layout['steps_per_epoch'],
        recorded['steps_per_epoch'] or 'unrecorded')
  elif mid_epoch and meta.get('steps_per_epoch') is None:
    logging.warning(
        'The checkpoint at step %d was written by an earlier version, whose '
        'example order within an epoch differs: the rest of epoch %d is read '
        'in the current order, so some of its examples may be seen twice '
        'and others not at all.', step, meta['epoch'] + 1)
  if recorded['num_devices'] not in (None, layout['num_devices']):
    logging.info('Resuming on %d devices (the checkpoint was written on %d): '
                 'the example order does not depend on it.',
                 layout['num_devices'], recorded['num_devices'])
  if 'epoch_step' not in meta:  # Written before it was recorded.
    meta['epoch_step'] = (
        step - meta['epoch'] * layout['steps_per_epoch'] if mid_epoch else 0)
  meta.update(layout)


def adopt_config(state, meta, config, saved):
  """`(state, meta)` of a checkpoint, with the config's resumable changes.

  Args:
    state: the restored train state.
    meta: the restored meta dict (updated in place and returned).
    config: the config of this run.
    saved: the config dict the workdir held before this run, or None.

  Returns:
    `(state, meta)`, with the changes the module docstring lists applied.
  """
  # The configured rate the checkpoint was trained under; older checkpoints
  # did not record it, their workdir's config.json did.
  trained_lr = meta.get('config_learning_rate',
                        (saved or {}).get('learning_rate',
                                          config.learning_rate))
  if (config_lib.option(config, 'lr_schedule') == 'plateau'
      and trained_lr != config.learning_rate):
    plateau = callbacks.from_dict(callbacks.PlateauState, meta['plateau'])
    logging.warning(
        'learning_rate %g -> %g: the plateau controller continues from %g '
        '(it was at %g; its patience count is kept).', trained_lr,
        config.learning_rate, config.learning_rate, plateau.learning_rate)
    meta['plateau'] = callbacks.to_dict(dataclasses.replace(
        plateau, learning_rate=float(config.learning_rate)))
  meta['config_learning_rate'] = config.learning_rate

  decay = np.float32(config.weight_decay)
  held = np.asarray(state.opt_state.hyperparams['weight_decay'])
  if held != decay:
    logging.warning('weight_decay %g -> %g takes effect from this step.',
                    held, decay)
    state = _set_weight_decay(state, decay)

  stopping = callbacks.from_dict(callbacks.EarlyStoppingState,
                                 meta['early_stopping'])
  patience = config.early_stopping.patience
  if stopping.should_stop and stopping.wait < patience:
    logging.warning(
        'The run had stopped early after epoch %d (%d epochs without '
        'improvement); early_stopping.patience=%d lets it train on.',
        stopping.stopped_epoch, stopping.wait, patience)
    meta['early_stopping'] = callbacks.to_dict(dataclasses.replace(
        stopping, stopped_epoch=0))
  elif stopping.should_stop:
    logging.info(
        'The run stopped early after epoch %d (%d epochs without '
        'improvement); pass --config.early_stopping.patience=%d or more to '
        'train on.', stopping.stopped_epoch, stopping.wait, stopping.wait + 1)
  return state, meta
