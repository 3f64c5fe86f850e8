"""A trained workdir for the tools: its config, statistics and tested weights.

`--mode=eval`, `--mode=predict` and `--mode=attention` all start from what
training left in the workdir rather than from the command line, so they see
exactly the model, data and normalisation the weights were trained with:
`config.json`, `normalization.json` and the checkpoint early stopping judged
best (the weights the end of training tested). Only fields that change how,
not what, is computed may be overridden
(`config_lib.TOOL_OVERRIDABLE_FIELDS`).
"""

import dataclasses
import functools
import json
import logging
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.data import augment
from perceiver_jax.data import datasets
from perceiver_jax.model import perceiver
from perceiver_jax.training import checkpointing
from perceiver_jax.training import recipe
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from perceiver_jax.training import workdir as workdir_lib



def _no_run_error(workdir, missing):
  return errors.InputError(
      f'--workdir={workdir} has no {missing}, so it does not hold a trained '
      'model (training writes config.json and normalization.json at its '
      'start and a checkpoint after every epoch). Pass the --workdir of a '
      'training run, e.g. one made with `python main.py --config=... '
      '--workdir=DIR`.')


def check_workdir(workdir):
  """Fails fast, before anything heavy, unless `workdir` holds a trained run."""
  path = workdir_lib.path(workdir)
  for name in (workdir_lib.CONFIG, workdir_lib.NORMALIZATION):
    if not (path / name).exists():
      raise _no_run_error(workdir, name)
  if not workdir_lib.has_checkpoints(path):
    raise _no_run_error(workdir, 'checkpoint')
  return path


def load_config(workdir, overrides=None):
  """The saved config of the run, overridden only in the tools' fields.

  Only `config_lib.TOOL_OVERRIDABLE_FIELDS` may be overridden.

  Args:
    workdir: a training run's workdir.
    overrides: `{field: value}`, e.g. the `--config.FIELD=` flags.

  Returns:
    A validated ConfigDict.
  """
  path = workdir_lib.path(workdir) / workdir_lib.CONFIG
  if not path.exists():
    raise _no_run_error(workdir, workdir_lib.CONFIG)
  saved = config_lib.upgrade(json.loads(path.read_text()))
  overrides = dict(overrides or {})
  refused = sorted(set(overrides) - set(config_lib.TOOL_OVERRIDABLE_FIELDS))
  if refused:
    raise errors.InputError(
        f'--config.{refused[0]} cannot be overridden here: the tools use the '
        f'config the weights were trained with ({path}). Only '
        f'{", ".join(config_lib.TOOL_OVERRIDABLE_FIELDS)} may change; drop '
        + ', '.join(f'--config.{f}' for f in refused) + '.')
  # The tools do not train: how training split its batches into
  # micro-batches does not concern them, and an evaluation batch size need
  # not split into them.
  saved.pop('grad_accum_steps', None)
  for name, value in overrides.items():
    if saved.get(name) != value:
      logging.info('Overriding the saved config: %s %r -> %r.', name,
                   saved.get(name), value)
    saved[name] = value
  return config_lib.validate(ml_collections.ConfigDict(saved))


def load_stats(workdir):
  """The training split's per-channel mean and variance, as training used."""
  path = workdir_lib.path(workdir) / workdir_lib.NORMALIZATION
  if not path.exists():
    raise _no_run_error(workdir, workdir_lib.NORMALIZATION)
  return workdir_lib.stats_arrays(json.loads(path.read_text()))


def class_names(workdir, info):
  """Class names, from the workdir's `class_names.json` if it has one.

  Otherwise the dataset's (as tfds knows them here) are written there, so a
  workdir copied to a machine without the prepared dataset keeps its names
  (before preparation tfds may only know '0', '1', ...).
  """
  path = workdir_lib.path(workdir) / workdir_lib.CLASS_NAMES
  if path.exists():
    names = tuple(json.loads(path.read_text()))
    if len(names) == info.num_classes:
      return names
    logging.warning('%s lists %d names for %d classes; using the dataset\'s.',
                    path, len(names), info.num_classes)
  try:
    workdir_lib.write_json(path, list(info.class_names))
  except OSError as e:  # A read-only workdir still works.
    logging.warning('Could not write %s (%s).', path, e)
  return info.class_names


@dataclasses.dataclass
class TrainedModel:
  """A workdir's model with its restored weights and everything to run it."""
  workdir: Any
  config: ml_collections.ConfigDict
  info: datasets.DatasetInfo
  class_names: Sequence[str]
  stats: dict
  model: Any
  state: Any  # steps.TrainState, restored into `state_shardings`.
  state_shardings: Any
  step: int
  checkpoint: str  # 'best', 'latest' or 'last readable'.
  epoch: Optional[int]

  @property
  def params(self):
    """The weights to evaluate: the EMA's when the run kept them, as
    training's validation and test use (`recipe.eval_params`)."""
    return recipe.eval_params(self.state)

  @property
  def uses_ema(self):
    return self.params is not self.state.params

  @property
  def input_shape(self):
    """`(height, width, channels)` of the images evaluation feeds the
    model: those the host serves (`datasets.DatasetInfo`), which the device
    resizes to `image_size`."""
    return (self.info.height, self.info.width, self.info.channels)

  @property
  def model_input_shape(self):
    """`(image_size, image_size, channels)`: the model's own input size."""
    return (self.config.image_size,) * 2 + (self.info.channels,)

  def check_images(self, images):
    """`images` as a numpy array, once they prove uint8 `[n, *input_shape]`
    or `[n, *model_input_shape]` (taken as they are: resizing to
    `image_size` leaves them unchanged).

    Raises:
      errors.InputError: another shape or dtype, saying which it takes.
    """
    images = np.asarray(images)
    shapes = (self.input_shape, self.model_input_shape)
    if (images.ndim == 4 and images.shape[1:] in shapes
        and images.dtype == np.uint8):
      return images
    height, width, channels = self.input_shape
    crop = config_lib.option(self.config, 'host_crop')
    if crop == 'inception':
      view = ('their evaluation view (the shorter side resized to '
              'image_size / eval_crop_fraction, the centre square)')
    elif self.info.variable_size:
      view = f'{self.info.name} images resized whole to image_size'
    else:
      view = f'{self.info.name} images as stored'
      if (height, width) != (self.config.image_size,) * 2:
        size = self.config.image_size
        view += (', which evaluation resizes to image_size='
                 f'{size}, or images already [N, {size}, {size}, '
                 f'{channels}]')
    raise errors.InputError(
        f'The model of {self.workdir} takes uint8 images [N, {height}, '
        f'{width}, {channels}] (values 0..255): {view}; got {images.dtype} '
        f'{list(images.shape)}. Pass a batch of such images (images[None] '
        'for one), or bring image files of any size to them with '
        'load_images(paths), as --mode=predict does.')

  def preprocess(self, images):
    """Raw uint8 `[n, height, width, channels]` as evaluation sees them."""
    return augment.preprocess_eval(images, self.stats['mean'],
                                   self.stats['variance'],
                                   self.config.image_size)

  @functools.cached_property
  def _logits(self):
    return jax.jit(lambda params, images: self.model.apply(
        {'params': params}, self.preprocess(images), train=False))

  def logits(self, images, batch_size=64):
    """float32 logits of uint8 `[n, *input_shape]` images, as `--mode=eval`
    computes them, `batch_size` images per forward pass."""
    images = self.check_images(images)
    return np.concatenate(
        [np.asarray(self._logits(self.params, images[i:i + batch_size]))
         for i in range(0, len(images), batch_size)] or
        [np.zeros((0, self.info.num_classes), np.float32)])


def _abstract_state(config, model, image_shape, mesh):
  """Restore targets of the train state without initialising it."""
  abstract = jax.eval_shape(
      lambda: steps.create_train_state(config, model, image_shape, mesh)[0])
  shardings = sharding_lib.tree_shardings(abstract, mesh)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings), shardings


def load(workdir, *, overrides=None, mesh=None, config=None, info=None):
  """Restores the weights a workdir's training tested.

  See `checkpointing.select_checkpoint`; a damaged choice is skipped.

  Args:
    workdir: a training run's workdir.
    overrides: config overrides, see `load_config`.
    mesh: where to place the weights; default every device.
    config: `load_config(workdir, overrides)`, where the caller has it
      already (then `overrides` is not used).
    info: `datasets.get_dataset_info(config)`, where the caller has it.

  Returns:
    A TrainedModel.
  """
  path = check_workdir(workdir)
  if config is None:
    config = load_config(workdir, overrides)
  stats = load_stats(workdir)
  if info is None:
    info = datasets.get_dataset_info(config)
  mesh = sharding_lib.create_mesh() if mesh is None else mesh
  model = perceiver.create_model(config, info.num_classes)
  image_shape = (config.image_size, config.image_size, info.channels)
  abstract, shardings = _abstract_state(config, model, image_shape, mesh)
  manager = checkpointing.create_manager(
      path / workdir_lib.CHECKPOINTS, read_only=True)
  try:
    step, which, (state, meta) = checkpointing.restore_tested(
        manager, config,
        lambda directory, step: checkpointing.read(directory, step, abstract))
  finally:
    manager.close()
  return TrainedModel(
      workdir=path, config=config, info=info,
      class_names=class_names(path, info), stats=stats, model=model,
      state=state, state_shardings=shardings, step=int(step),
      checkpoint=which, epoch=meta.get('epoch'))


def single_device_mesh():
  """A mesh of this process's first device, for the single-host tools."""
  return sharding_lib.create_mesh(jax.local_devices()[:1])
