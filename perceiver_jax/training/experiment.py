"""An experiment, set up: everything built from (config, workdir) before step 1.

Cheap checks come first: config, workdir, resume compatibility, dataset and
device count all fail before any data is read or compiled. Then the data,
its normalisation statistics (computed once per workdir, with a record of
the data they describe), the model, the train state and the jitted steps,
the learning-rate schedule and the checkpoint manager.
"""

import logging

import jax
from jax.experimental import multihost_utils
import numpy as np

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import datasets
from perceiver_jax.data import input_pipeline
from perceiver_jax.data import splits as splits_lib
from perceiver_jax.model import perceiver
from perceiver_jax.training import callbacks
from perceiver_jax.training import checkpointing
from perceiver_jax.training import metrics as metrics_lib
from perceiver_jax.training import profiling
from perceiver_jax.training import recipe
from perceiver_jax.training import resume
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from perceiver_jax.training import transfer
from perceiver_jax.training import workdir as workdir_lib


def data_source(config, pipeline):
  """What the training statistics are computed on, as JSON-able values."""
  info = pipeline.info
  source = {'dataset': info.name, 'version': info.version,
            'mock_data': bool(config.mock_data),
            'validation_split': config.validation_split,
            'image_shape': [info.height, info.width, info.channels],
            'num_examples': {s: getattr(pipeline, f'num_{s}_examples')
                             for s in splits_lib.SPLITS}}
  # Recorded when not the default, so sources recorded before these
  # options existed still match.
  defaults = config_lib.added_field_defaults()
  for name in ('host_crop', 'eval_crop_fraction', 'normalization_examples'):
    value = config_lib.option(config, name)
    if value != defaults[name]:
      source[name] = value
  return source


_REUSE, _COMPUTE, _REFUSE = 0, 1, 2


_ORIGIN = 'statistics_of'  # A source key: the run whose statistics these are.


def normalization_stats(workdir, config, pipeline, has_checkpoints):
  """Per-channel mean and variance of the training split, computed once.

  Saved in the workdir with what they were computed on (`data_source`), so
  a resumed run normalises exactly as before. Statistics of other data (a
  run that stopped before its first checkpoint, then a new one on another
  dataset or split in the same workdir) are recomputed; with checkpoints
  present they are refused, since the weights were trained on that data.
  A fine-tuning run takes its source run's statistics instead
  (`transfer.statistics_origin`), recorded as the source's `statistics_of`;
  once it has checkpoints it keeps them, whatever `init_from` says now.
  """
  path = workdir / workdir_lib.NORMALIZATION
  source = data_source(config, pipeline)
  origin = transfer.statistics_origin(config)
  if origin:
    source[_ORIGIN] = origin
  saved = workdir_lib.read_json(workdir, workdir_lib.NORMALIZATION)
  differences = []
  if saved is None:
    action = _COMPUTE
  elif 'source' not in saved:  # Written before sources were recorded.
    action = _REUSE if has_checkpoints else _COMPUTE
  else:
    differences = config_lib.differences(saved['source'], source)
    other_data = [d for d in differences if not d.startswith(_ORIGIN)]
    action = (_REUSE if not differences else
              _COMPUTE if not has_checkpoints else
              _REFUSE if other_data else _REUSE)
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
    if origin:
      stats = transfer.source_statistics(config, pipeline.info.channels)
    else:
      stats = {k: np.asarray(v, np.float64).tolist()
               for k, v in pipeline.normalization_stats().items()}
    workdir_lib.write_json(path, dict(stats, source=source))
  return workdir_lib.stats_arrays(stats)


def initial_meta(config):
  """The meta of a run before its first step (see checkpointing.py)."""
  return {
      'epoch': 0,  # Completed epochs (validation done, checkpoint saved).
      'epoch_sums': None,  # Train metric sums of a partly done epoch.
      'epoch_step': 0,  # Steps done of the partly done epoch.
      'plateau': callbacks.to_dict(
          callbacks.plateau_init(config.learning_rate)),
      'early_stopping': callbacks.to_dict(callbacks.EarlyStoppingState()),
      'best_step': None,
      'history': [],
      # The configured rate, so a resume can tell when it changes.
      'config_learning_rate': config.learning_rate,
  }


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
    # The source run's config, checked before any data or compile.
    self.source_config = (
        transfer.check_source(config) if config_lib.option(config, 'init_from')
        and not workdir_lib.has_checkpoints(self.workdir) else None)
    data_builder = datasets.builder(config)  # Validates the name...
    datasets.dataset_info(data_builder, config)  # ... and the features.
    self.mesh = sharding_lib.create_mesh()
    sharding_lib.check_batch_size(config.batch_size, self.mesh,
                                  micro_batches=steps.grad_accum_steps(config))
    workdir_lib.write_json(self.workdir / workdir_lib.CONFIG,
                           config.to_dict())
    data_builder = datasets.prepare(config, data_builder)
    # The dataset's metadata gives the steps per epoch: the profile window
    # is refused before any data is read.
    profiling.check_window(
        config, input_pipeline.steps_per_epoch(config, data_builder))
    self.pipeline = input_pipeline.Pipeline(
        config, num_shards=self.mesh.devices.size,
        shard_indices=sharding_lib.local_shard_indices(self.mesh),
        data_builder=data_builder)
    self.info = self.pipeline.info  # Class names are known once prepared.
    try:  # From here on a failure must stop the pipeline's workers.
      self._build(config)
    except BaseException:
      self.pipeline.close()
      raise

  def _build(self, config):
    """Statistics, model, state, steps, schedule, checkpoints, logs."""
    self.profile = profiling.Profile(config, self.workdir,
                                     self.pipeline.steps_per_epoch)
    self.stats = normalization_stats(self.workdir, config, self.pipeline,
                                     workdir_lib.has_checkpoints(self.workdir))
    self.model = perceiver.create_model(config, self.info.num_classes)
    image_shape = (config.image_size, config.image_size, self.info.channels)
    self.state, self.state_shardings = steps.create_train_state(
        config, self.model, image_shape, self.mesh)
    self.train_step, self.eval_step = steps.jit_steps(
        config, self.stats, self.mesh, self.state_shardings)
    self.learning_rates = recipe.LearningRates(config,
                                               self.pipeline.steps_per_epoch)
    self.manager = checkpointing.create_manager(
        self.workdir / workdir_lib.CHECKPOINTS,
        max_to_keep=config.checkpoint_max_to_keep)
    self.writer = metrics_lib.SummaryWriter(
        self.workdir / workdir_lib.TENSORBOARD)

  def restore_or_init(self):
    """The latest good checkpoint's (state, meta), else the fresh ones."""
    restored = checkpointing.restore_latest(
        self.manager, checkpointing.abstract(self.state))
    layout = {'batch_size': self.config.batch_size,
              'steps_per_epoch': self.pipeline.steps_per_epoch,
              'num_devices': int(self.mesh.devices.size)}
    if restored is None:
      return self._fresh_state(), dict(initial_meta(self.config), **layout)
    state, meta = restored
    logging.info('Resuming from step %d (epoch %d done).', int(state.step),
                 meta['epoch'])
    resume.adopt_layout(meta, int(state.step), self.saved_config, layout)
    return resume.adopt_config(state, meta, self.config, self.saved_config)

  def _fresh_state(self):
    """The initial state, with `config.init_from`'s weights if it is set."""
    if not config_lib.option(self.config, 'init_from'):
      return self.state
    params = jax.device_put(
        transfer.pretrained_params(self.config, self.state.params,
                                   saved=self.source_config),
        self.state_shardings.params)
    ema = None if self.state.ema_params is None else params
    return self.state.replace(params=params, ema_params=ema)

  def close(self):
    self.pipeline.close()
    self.manager.wait_until_finished()
    self.writer.close()
    self.manager.close()
