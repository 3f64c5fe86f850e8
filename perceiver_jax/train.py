"""Training loop: `train_and_evaluate(config, workdir)` runs a whole experiment.

Per epoch: train on the training split, evaluate on validation, apply Keras
ReduceLROnPlateau (or follow `config.lr_schedule`, see recipe.py) and
EarlyStopping, checkpoint, write the history. At the
end the best weights are evaluated on the test split and printed the way the
Keras example prints them. Rerunning with the same workdir resumes from the
latest checkpoint at the next batch.
"""

import logging

import jax
from jax.experimental import multihost_utils
import numpy as np

from perceiver_jax import callbacks
from perceiver_jax import checkpointing
from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax import input_pipeline
from perceiver_jax import metrics as metrics_lib
from perceiver_jax import model as model_lib
from perceiver_jax import preemption
from perceiver_jax import recipe
from perceiver_jax import resume
from perceiver_jax import sharding as sharding_lib
from perceiver_jax import steps
from perceiver_jax import workdir as workdir_lib


def data_source(config, pipeline):
  """What the training statistics are computed on, as JSON-able values."""
  info = pipeline.info
  return {'dataset': info.name, 'version': info.version,
          'mock_data': bool(config.mock_data),
          'validation_split': config.validation_split,
          'image_shape': [info.height, info.width, info.channels],
          'num_examples': {s: getattr(pipeline, f'num_{s}_examples')
                           for s in input_pipeline.SPLITS}}


def _differences(recorded, current, prefix=''):
  """'key: recorded -> current' for every leaf where the two differ."""
  lines = []
  for key in sorted(set(recorded) | set(current)):
    a, b = recorded.get(key, '<unset>'), current.get(key, '<unset>')
    if isinstance(a, dict) and isinstance(b, dict):
      lines += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      lines.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return lines


_REUSE, _COMPUTE, _REFUSE = 0, 1, 2


def normalization_stats(workdir, config, pipeline, has_checkpoints):
  """Per-channel mean and variance of the training split, computed once.

  Saved in the workdir with what they were computed on (`data_source`), so
  a resumed run normalises exactly as before. Statistics of other data (a
  run that stopped before its first checkpoint, then a new one on another
  dataset or split in the same workdir) are recomputed; with checkpoints
  present they are refused, since the weights were trained on that data.
  """
  path = workdir / workdir_lib.NORMALIZATION
  source = data_source(config, pipeline)
  saved = workdir_lib.read_json(workdir, workdir_lib.NORMALIZATION)
  differences = []
  if saved is None:
    action = _COMPUTE
  elif 'source' not in saved:  # Written before sources were recorded.
    action = _REUSE if has_checkpoints else _COMPUTE
  else:
    differences = _differences(saved['source'], source)
    action = (_REUSE if not differences else
              _REFUSE if has_checkpoints else _COMPUTE)
  # Process 0 decides, so every process takes the same (collective) branch.
  action = int(multihost_utils.broadcast_one_to_all(np.int32(action)))
  if action == _REFUSE:
    raise errors.InputError(
        f'{path} holds the statistics of the data the checkpoints in '
        f'{workdir} were trained on, and this run reads other data ('
        + '; '.join(differences or ['see process 0']) + '). Pass the data '
        'the run was trained on (e.g. its config.tfds_data_dir), or use a '
        'new --workdir.')
  if action == _REUSE:
    stats = saved
  else:
    if differences:
      logging.warning('%s was computed on other data (%s); recomputing it.',
                      path, '; '.join(differences))
    stats = {k: np.asarray(v, np.float64).tolist()
             for k, v in pipeline.normalization_stats().items()}
    metrics_lib.write_json(path, dict(stats, source=source))
  return workdir_lib.stats_arrays(stats)


def evaluate(eval_step, state, pipeline, split, mesh, epoch=None):
  """Means over every example of `split`; checks that each counted once."""
  sums = metrics_lib.MetricSums()
  for i, batch in enumerate(pipeline.eval_batches(split)):
    sums.add(eval_step(state, sharding_lib.global_batch(mesh, batch)))
    if i == 0 and split == 'validation':
      preemption.kill_if('kill_in_eval', epoch)
  means = sums.means()
  expected = getattr(pipeline, f'num_{split}_examples')
  if int(sums.sums['count']) != expected:
    raise RuntimeError(f'Evaluated {sums.sums["count"]} {split} examples, '
                       f'expected {expected}.')
  return means


def initial_meta(config):
  return {
      'epoch': 0,  # Completed epochs (validation done, checkpoint saved).
      'epoch_sums': None,  # Train metric sums of a partly done epoch.
      'plateau': callbacks.to_dict(
          callbacks.plateau_init(config.learning_rate)),
      'early_stopping': callbacks.to_dict(callbacks.EarlyStoppingState()),
      'best_step': None,
      'history': [],
      # The configured rate, so a resume can tell when it changes.
      'config_learning_rate': config.learning_rate,
  }


def _epoch_record(epoch, lr, train, val):
  record = {'epoch': epoch, 'learning_rate': lr}
  record.update({f'train_{k}': v for k, v in train.items()})
  record.update({f'val_{k}': v for k, v in val.items()})
  return record


class Experiment:
  """Everything built from (config, workdir) before the first step runs.

  The order is cheap checks first: config, workdir, resume compatibility,
  dataset and device count all fail before any data is read or compiled.
  """

  def __init__(self, config, workdir):
    config_lib.validate(config)
    self.config = config
    self.workdir = workdir_lib.prepare(workdir)
    self.saved_config = workdir_lib.read_json(self.workdir, workdir_lib.CONFIG)
    resume.check_compatible(self.workdir, config, self.saved_config)
    input_pipeline.get_dataset_info(config)  # Validates name and features.
    self.mesh = sharding_lib.create_mesh()
    sharding_lib.check_batch_size(config.batch_size, self.mesh)
    metrics_lib.write_json(self.workdir / workdir_lib.CONFIG,
                           config.to_dict())
    input_pipeline.prepare(config)
    self.pipeline = input_pipeline.Pipeline(
        config, num_shards=self.mesh.devices.size,
        shard_indices=sharding_lib.local_shard_indices(self.mesh))
    self.info = self.pipeline.info  # Class names are known once prepared.
    self.stats = normalization_stats(self.workdir, config, self.pipeline,
                                     workdir_lib.has_checkpoints(self.workdir))
    self.model = model_lib.create_model(config, self.info.num_classes)
    image_shape = (config.image_size, config.image_size, self.info.channels)
    self.state, self.state_shardings = steps.create_train_state(
        config, self.model, image_shape, self.mesh)
    self.train_step, self.eval_step = steps.jit_steps(
        config, self.stats, self.mesh, self.state_shardings)
    self.learning_rates = recipe.LearningRates(config,
                                               self.pipeline.steps_per_epoch)
    self.manager = checkpointing.create_manager(
        (self.workdir / workdir_lib.CHECKPOINTS).resolve(),
        max_to_keep=config.checkpoint_max_to_keep)
    self.writer = metrics_lib.SummaryWriter(
        str(self.workdir / workdir_lib.TENSORBOARD))

  def restore_or_init(self):
    """The latest good checkpoint's (state, meta), else the fresh ones."""
    restored = checkpointing.restore_latest(
        self.manager, checkpointing.abstract(self.state))
    if restored is None:
      return self.state, initial_meta(self.config)
    state, meta = restored
    logging.info('Resuming from step %d (epoch %d done).', int(state.step),
                 meta['epoch'])
    return resume.adopt_config(state, meta, self.config, self.saved_config)

  def close(self):
    self.manager.wait_until_finished()
    self.writer.close()
    self.manager.close()


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
    return _train_and_evaluate(config, workdir, watcher)
  finally:
    watcher.close()


def _train_and_evaluate(config, workdir, watcher):
  ex = Experiment(config, workdir)
  config, pipeline, mesh = ex.config, ex.pipeline, ex.mesh
  logging.info('Dataset %s: %d train / %d validation / %d test examples, '
               '%d classes; %d devices in %d processes, %d steps per epoch; '
               '%d parameters.', ex.info.name, pipeline.num_train_examples,
               pipeline.num_validation_examples, pipeline.num_test_examples,
               ex.info.num_classes, mesh.devices.size, jax.process_count(),
               pipeline.steps_per_epoch, steps.count_params(ex.state.params))
  state, meta = ex.restore_or_init()
  try:
    state, meta = _train(ex, state, meta, watcher)
    ex.manager.wait_until_finished()
    state, results = _test(ex, state, meta)
  finally:
    ex.close()
  return state, results


def _test(ex, state, meta):
  """Evaluates the best (or final) weights on the test split and reports."""
  best_step = meta['best_step']
  es = callbacks.from_dict(callbacks.EarlyStoppingState,
                           meta['early_stopping'])
  if (ex.config.early_stopping.restore_best_weights and best_step is not None
      and best_step != int(state.step)):
    state, _ = checkpointing.restore(ex.manager, best_step,
                                     checkpointing.abstract(state))
    logging.info('Restored the best weights (epoch %d, val_loss %.4f).',
                 es.best_epoch, es.best)
  test = evaluate(ex.eval_step, state, ex.pipeline, 'test', ex.mesh)
  results = {'test_loss': test['loss'], 'test_accuracy': test['accuracy'],
             'test_top5_accuracy': test['top5_accuracy'],
             'best_epoch': es.best_epoch, 'epochs_trained': meta['epoch']}
  metrics_lib.write_json(ex.workdir / workdir_lib.RESULTS, results)
  ex.writer.scalars(int(state.step), {f'test/{k}': v for k, v in test.items()})
  if metrics_lib.is_chief():
    print(f'Test accuracy: {round(test["accuracy"] * 100, 2)}%')
    print(f'Test top 5 accuracy: {round(test["top5_accuracy"] * 100, 2)}%')
  return state, results


def _save(ex, step, state, meta, is_best=None):
  checkpointing.save(ex.manager, step, state, meta, is_best=is_best)
  preemption.kill_if('kill_in_checkpoint_write', step)


def _train(ex, state, meta, watcher):
  """Runs epochs from where `meta` says; returns the final state and meta.

  Checkpoints at every epoch end, every `checkpoint_every_steps` steps and
  at a preemption notice; each save follows a finiteness check of every
  step since the previous one, so no checkpoint ever holds a diverged state.
  """
  config, pipeline, mesh = ex.config, ex.pipeline, ex.mesh
  spe = pipeline.steps_per_epoch
  every = config.checkpoint_every_steps
  plateau = callbacks.from_dict(callbacks.PlateauState, meta['plateau'])
  es = callbacks.from_dict(callbacks.EarlyStoppingState,
                           meta['early_stopping'])
  step = int(state.step)
  for epoch in range(meta['epoch'], config.num_epochs):
    if es.should_stop:
      break
    lr = ex.learning_rates.of_epoch(epoch, plateau.learning_rate)
    sums = metrics_lib.MetricSums(meta['epoch_sums'])
    first = step - epoch * spe
    bar = metrics_lib.ProgressBar(epoch + 1, config.num_epochs, spe, first,
                                  config.batch_size)
    preempted = False
    for s in range(first, spe):
      batch = sharding_lib.global_batch(mesh, pipeline.train_batch(epoch, s))
      step_lr = ex.learning_rates.at(step, plateau.learning_rate)
      if preemption.fault('nan_learning_rate_at_step', step + 1):
        step_lr = float('nan')
      state, step_metrics = ex.train_step(state, batch, step_lr)
      step += 1
      sums.add(step_metrics, step)
      preempted = watcher.reached(step)
      last = s + 1 == spe
      save_now = not last and (preempted or (every and step % every == 0))
      if save_now or last or (s + 1) % config.log_every_steps == 0:
        running = sums.means()  # Also raises if a step went non-finite.
        bar.update(s + 1, running)
        ex.writer.scalars(step, {'train/running_loss': running['loss'],
                                 'train/learning_rate': step_lr})
      if save_now:
        _save(ex, step, state, dict(meta, epoch_sums=sums.flush()))
      if preempted and not last:
        ex.manager.wait_until_finished()
        bar.close()
        raise preemption.Preempted(step)
      if preemption.fault('kill_after_step', step):
        ex.manager.wait_until_finished()  # Crash after the last save landed.
        preemption.kill_if('kill_after_step', step)
    train_means = sums.means()
    val = evaluate(ex.eval_step, state, pipeline, 'validation', mesh,
                   epoch=epoch + 1)
    if ex.learning_rates.uses_plateau:  # A schedule ignores the plateau.
      plateau = callbacks.plateau_update(plateau, val['loss'],
                                         **config.plateau.to_dict())
    es = callbacks.early_stopping_update(es, val['loss'], epoch + 1,
                                         **_es_kwargs(config))
    meta['history'].append(_epoch_record(epoch + 1, lr, train_means, val))
    if es.best_epoch == epoch + 1:
      meta['best_step'] = step
    meta.update(epoch=epoch + 1, epoch_sums=None,
                plateau=callbacks.to_dict(plateau),
                early_stopping=callbacks.to_dict(es))
    _save(ex, step, state, meta, is_best=es.best_epoch == epoch + 1)
    _write_epoch_outputs(ex, step, meta['history'])
    bar.close(f"loss={train_means['loss']:.4f} acc={train_means['accuracy']:.4f}"
              f" val_loss={val['loss']:.4f} val_acc={val['accuracy']:.4f}"
              f" val_top5={val['top5_accuracy']:.4f} lr={lr:.3g}")
    if ex.learning_rates.uses_plateau and plateau.learning_rate < lr:
      logging.info('Epoch %d: ReduceLROnPlateau reducing learning rate to %g.',
                   epoch + 1, plateau.learning_rate)
    if es.should_stop:
      logging.info('Epoch %d: early stopping (best epoch %d).', epoch + 1,
                   es.best_epoch)
    if preempted:
      ex.manager.wait_until_finished()
      raise preemption.Preempted(step)
  return state, meta


def _es_kwargs(config):
  return {k: v for k, v in config.early_stopping.to_dict().items()
          if k != 'restore_best_weights'}


def _write_epoch_outputs(ex, step, history):
  metrics_lib.write_json(ex.workdir / workdir_lib.HISTORY, history)
  metrics_lib.plot_learning_curves(history,
                                   ex.workdir / workdir_lib.LEARNING_CURVES)
  scalars = {k.replace('_', '/', 1): v for k, v in history[-1].items()
             if k.startswith(('train_', 'val_'))}
  scalars['learning_rate'] = history[-1]['learning_rate']
  ex.writer.scalars(step, scalars)
