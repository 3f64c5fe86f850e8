"""The training loop: `train_and_evaluate(config, workdir)` runs an experiment.

Per epoch: train on the training split, evaluate on validation, apply Keras
ReduceLROnPlateau (or follow `config.lr_schedule`, see recipe.py) and
EarlyStopping, checkpoint, write the history. At the end the weights early
stopping chose are evaluated on the test split and printed the way the Keras
example prints them. Rerunning with the same workdir resumes from the latest
checkpoint at the next batch.

Checkpoints are written at every epoch end, every `checkpoint_every_steps`
steps and at a preemption notice; each follows a finiteness check of every
step since the previous one, so no checkpoint ever holds a diverged state.
"""

import logging

import jax

from perceiver_jax import errors
from perceiver_jax.training import callbacks
from perceiver_jax.training import checkpointing
from perceiver_jax.training import experiment as experiment_lib
from perceiver_jax.training import faults as faults_lib
from perceiver_jax.training import metrics as metrics_lib
from perceiver_jax.training import preemption
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from perceiver_jax.training import workdir as workdir_lib


def train_and_evaluate(config, workdir):
  """Trains, validates every epoch, tests; returns `(state, test_results)`.

  The returned state holds the weights that were tested: the best epoch's
  when `early_stopping.restore_best_weights` is set, as Keras leaves them.

  Raises `preemption.Preempted` after saving a checkpoint on SIGTERM, and
  `metrics.NonFiniteError` when the loss or gradients stop being finite.
  """
  # Listen for SIGTERM from the start: a notice during set-up still ends
  # with a checkpoint after the first step.
  watcher = preemption.PreemptionWatcher()
  try:
    ex = experiment_lib.Experiment(config, workdir)
    try:
      _log_setup(ex)
      state, meta = ex.restore_or_init()
      faults = faults_lib.Faults.from_env()
      with ex.profile:  # Stops a trace the run leaves open, however it ends.
        state, meta = train(ex, state, meta, watcher, faults)
      ex.manager.wait_until_finished()
      result = test(ex, state, meta)
    except BaseException:
      _close_after_failure(ex)
      raise
    ex.close()
    return result
  except Exception as e:  # pylint: disable=broad-except
    full = workdir_lib.out_of_space_path(e)
    if full is None:
      raise
    raise errors.OutOfSpaceError(_out_of_space(full, workdir)) from e
  finally:
    watcher.close()


def _close_after_failure(ex):
  """Closes `ex` without letting a failure of its own hide the first one.

  Also removes a checkpoint whose save the failure cut short.
  """
  try:
    ex.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Closing the run after the failure below failed too: '
                    '%s: %s', type(e).__name__, str(e).splitlines()[0][:200])
  for name in checkpointing.remove_unfinished(ex.workdir /
                                              workdir_lib.CHECKPOINTS):
    logging.info('Removed the unfinished checkpoint %s.', name)


def _out_of_space(full, workdir):
  """The paragraph a full disk ends training with."""
  workdir = workdir_lib.path(workdir)
  directory = workdir / workdir_lib.CHECKPOINTS
  step = max(workdir_lib.finished_steps(workdir), default=None)
  where = f' writing {full}' if full else ''
  resume = (f'it resumes from checkpoint {step} in {directory}' if step
            is not None else 'no checkpoint was written yet, so it starts '
            'over')
  return (f'No space left on the device{where}. Training stopped; nothing '
          f'half-written was kept. Free space there (or raise the quota) and '
          f'rerun the same command: {resume}.')


def train(ex, state, meta, watcher, faults):
  """Runs the epochs `meta` has not done; returns the final state and meta."""
  step = int(state.step)
  batches = ex.pipeline.train_batches(meta['epoch'], meta['epoch_step'])
  for epoch in range(meta['epoch'], ex.config.num_epochs):
    if _stopping(meta).should_stop:
      break
    log = _epoch_log(ex, meta, epoch)
    try:
      state, step, preempted = train_epoch(ex, state, meta, epoch, step,
                                           batches, watcher, faults, log)
      meta = end_epoch(ex, state, meta, epoch, step, log, faults)
    except BaseException:
      log.close()  # A bar left open prints again at exit, after the error.
      raise
    if preempted:
      ex.manager.wait_until_finished()
      raise preemption.Preempted(step)
  return state, meta


def _epoch_log(ex, meta, epoch):
  """The bookkeeping of `epoch`, from the sums `meta` holds of it."""
  config = ex.config
  return metrics_lib.EpochLog(ex.writer, epoch, config.num_epochs,
                              ex.pipeline.steps_per_epoch, meta['epoch_step'],
                              config.batch_size, config.log_every_steps,
                              meta['epoch_sums'])


def train_epoch(ex, state, meta, epoch, step, batches, watcher, faults, log):
  """The remaining steps of `epoch` from global `step`, fed by `batches`.

  The epoch's steps are numbered from 0 (`meta['epoch_step']` of them are
  done); the learning-rate schedule is read at the epoch's position, which
  is the global step unless the batch size changed at an earlier epoch end
  (`resume.adopt_layout`). Returns `(state, step, preempted)`; a
  preemption notice before the epoch's last step saves and raises
  `preemption.Preempted` here.
  """
  config, spe = ex.config, ex.pipeline.steps_per_epoch
  plateau_lr = _plateau(meta).learning_rate
  preempted = False
  train_step = ex.profile.wrap(ex.train_step, step)  # config.profile_steps
  for s in range(meta['epoch_step'], spe):
    local_batch = next(batches)
    faults.consumed(step + 1, local_batch)
    batch = sharding_lib.global_batch(ex.mesh, local_batch)
    lr = faults.learning_rate(
        step, ex.learning_rates.at(epoch * spe + s, plateau_lr))
    state, step_metrics = train_step(state, batch, lr)
    step += 1
    preempted = watcher.reached(step)
    save = s + 1 < spe and (preempted or _save_due(config, step))
    log.add(step, s + 1, step_metrics, lr, force=save)
    if save:
      _save(ex, step, state, dict(meta, epoch_sums=log.sums.flush(),
                                  epoch_step=s + 1), faults)
    if preempted and s + 1 < spe:
      ex.manager.wait_until_finished()
      raise preemption.Preempted(step)  # train() closes the bar.
    faults.after_step(step, ex.manager)
  return state, step, preempted


def end_epoch(ex, state, meta, epoch, step, log, faults):
  """Validation, the Keras controllers, history and the epoch's checkpoint."""
  config = ex.config
  plateau, stopping = _plateau(meta), _stopping(meta)
  lr = ex.learning_rates.of_epoch(epoch, plateau.learning_rate)
  train_means = log.sums.means()
  val = evaluate(ex.eval_step, state, ex.pipeline, 'validation', ex.mesh,
                 after_first_batch=lambda: faults.in_eval(epoch + 1))
  if ex.learning_rates.uses_plateau:  # A schedule ignores the plateau.
    plateau = callbacks.plateau_update(plateau, val['loss'],
                                       **config.plateau.to_dict())
  stopping = callbacks.early_stopping_update(
      stopping, val['loss'], epoch + 1,
      patience=config.early_stopping.patience,
      min_delta=config.early_stopping.min_delta)
  improved = stopping.best_epoch == epoch + 1
  meta['history'].append(_epoch_record(epoch + 1, lr, train_means, val))
  if improved:
    meta['best_step'] = step
  meta.update(epoch=epoch + 1, epoch_sums=None, epoch_step=0,
              plateau=callbacks.to_dict(plateau),
              early_stopping=callbacks.to_dict(stopping))
  _save(ex, step, state, meta, faults, is_best=improved)
  _write_epoch_outputs(ex, step, meta['history'])
  log.close(f"loss={train_means['loss']:.4f} acc={train_means['accuracy']:.4f}"
            f" val_loss={val['loss']:.4f} val_acc={val['accuracy']:.4f}"
            f" val_top5={val['top5_accuracy']:.4f} lr={lr:.3g}")
  if ex.learning_rates.uses_plateau and plateau.learning_rate < lr:
    logging.info('Epoch %d: ReduceLROnPlateau reducing learning rate to %g.',
                 epoch + 1, plateau.learning_rate)
  if stopping.should_stop:
    logging.info('Epoch %d: early stopping (best epoch %d).', epoch + 1,
                 stopping.best_epoch)
  return meta


def evaluate(eval_step, state, pipeline, split, mesh, after_first_batch=None):
  """Means over every example of `split`; checks that each counted once."""
  sums = metrics_lib.MetricSums()
  for i, batch in enumerate(pipeline.eval_batches(split)):
    sums.add(eval_step(state, sharding_lib.global_batch(mesh, batch)))
    if i == 0 and after_first_batch:
      after_first_batch()
  means = sums.means()
  expected = getattr(pipeline, f'num_{split}_examples')
  if int(sums.sums['count']) != expected:
    raise RuntimeError(f'Evaluated {sums.sums["count"]} {split} examples, '
                       f'expected {expected}.')
  return means


def test(ex, state, meta):
  """Evaluates the best (or final) weights on the test split and reports."""
  stopping = _stopping(meta)
  step, _ = checkpointing.tested_step(
      ex.config, meta['best_step'], int(state.step), ex.manager.all_steps(),
      ex.manager.directory)
  if step != int(state.step):
    state, _ = checkpointing.restore(ex.manager, step,
                                     checkpointing.abstract(state))
    logging.info('Restored the best weights (epoch %d, val_loss %.4f).',
                 stopping.best_epoch, stopping.best)
  results = evaluate(ex.eval_step, state, ex.pipeline, 'test', ex.mesh)
  summary = {'test_loss': results['loss'],
             'test_accuracy': results['accuracy'],
             'test_top5_accuracy': results['top5_accuracy'],
             'best_epoch': stopping.best_epoch, 'epochs_trained': meta['epoch']}
  workdir_lib.write_json(ex.workdir / workdir_lib.RESULTS, summary)
  ex.writer.scalars(int(state.step),
                    {f'test/{k}': v for k, v in results.items()})
  if metrics_lib.is_chief():
    print(f'Test accuracy: {round(results["accuracy"] * 100, 2)}%')
    print(f'Test top 5 accuracy: {round(results["top5_accuracy"] * 100, 2)}%')
  return state, summary


def _log_setup(ex):
  p = ex.pipeline
  logging.info('Dataset %s: %d train / %d validation / %d test examples, '
               '%d classes; %d devices in %d processes, %d steps per epoch; '
               '%d parameters.', ex.info.name, p.num_train_examples,
               p.num_validation_examples, p.num_test_examples,
               ex.info.num_classes, ex.mesh.devices.size,
               jax.process_count(), p.steps_per_epoch,
               steps.count_params(ex.state.params))
  accum = steps.grad_accum_steps(ex.config)
  if accum > 1:
    batch = ex.config.batch_size
    logging.info('Each batch of %d trains as %d micro-batches of %d (%d per '
                 'device).', batch, accum, batch // accum,
                 batch // accum // ex.mesh.devices.size)


def _plateau(meta):
  return callbacks.from_dict(callbacks.PlateauState, meta['plateau'])


def _stopping(meta):
  return callbacks.from_dict(callbacks.EarlyStoppingState,
                             meta['early_stopping'])


def _save_due(config, step):
  every = config.checkpoint_every_steps
  return bool(every) and step % every == 0


def _save(ex, step, state, meta, faults, is_best=None):
  checkpointing.save(ex.manager, step, state, meta, is_best=is_best)
  faults.in_checkpoint_write(step)


def _epoch_record(epoch, lr, train, val):
  record = {'epoch': epoch, 'learning_rate': lr}
  record.update({f'train_{k}': v for k, v in train.items()})
  record.update({f'val_{k}': v for k, v in val.items()})
  return record


def _write_epoch_outputs(ex, step, history):
  workdir_lib.write_json(ex.workdir / workdir_lib.HISTORY, history)
  metrics_lib.plot_learning_curves(history,
                                   ex.workdir / workdir_lib.LEARNING_CURVES)
  scalars = {k.replace('_', '/', 1): v for k, v in history[-1].items()
             if k.startswith(('train_', 'val_'))}
  scalars['learning_rate'] = history[-1]['learning_rate']
  ex.writer.scalars(step, scalars)
