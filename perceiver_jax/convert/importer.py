"""`--mode=import`: another implementation's checkpoint -> a workdir.

The workdir holds what training would have left: `config.json` (a config
of this project that builds the model), `normalization.json` (the
normalisation the weights were trained with), one orbax checkpoint whose
weights count as the weights training tested, and `class_names.json`. So
`--mode=eval`, `predict`, `attention` and `--config.init_from` use it as
they use a trained run.

One reader per source format (`FORMATS`), chosen from the path: a folder
with HuggingFace's `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`) or `pytorch_model.bin`, or a DeepMind
haiku `.pystate` file. A reader returns a `Source`; everything after it is
shared.

A `.pystate` is read safely (`pystate.py`), its names mapped to
HuggingFace's (`haiku.py`) and its weights through the same
`huggingface.hf_to_params`, but the model computes as DeepMind's haiku code
does, where HuggingFace's port differs (`deepmind_fields`).
"""

import dataclasses
import json
import logging
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.convert import haiku
from perceiver_jax.convert import huggingface
from perceiver_jax.convert import imagenet_classes
from perceiver_jax.convert import pystate
from perceiver_jax.data import datasets
from perceiver_jax.model import perceiver
from perceiver_jax.training import checkpointing
from perceiver_jax.training import experiment
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import steps
from perceiver_jax.training import workdir as workdir_lib

# HuggingFace's PerceiverImageProcessor: ImageNet's mean and standard
# deviation on pixels scaled to [0, 1] (IMAGENET_DEFAULT_MEAN / _STD), used
# unless the folder's preprocessor_config.json says otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
PYTORCH_BIN = 'pytorch_model.bin'
HF_CONFIG = 'config.json'
HF_PREPROCESSOR = 'preprocessor_config.json'
PYSTATE = '.pystate'
IMPORT_STEP = 0


@dataclasses.dataclass
class Source:
  """What a reader found: the model's fields, weights and conventions.

  Attributes:
    variant: 'learned', 'fourier' or 'conv'.
    fields: model fields of this project's config (`perceiver.RULES`).
    params: the parameters, `model.init(...)['params']`'s structure.
    class_names: one readable name per logit.
    mean, std: per-channel normalisation on 0-255 pixels.
    description: what was imported, for normalization.json and the log.
  """
  variant: str
  fields: dict
  params: Any
  class_names: list
  mean: tuple
  std: tuple
  description: dict


def _read_json(file_path):
  try:
    return json.loads(file_path.read_text())
  except (OSError, ValueError) as e:
    raise errors.InputError(f'Cannot read {file_path} as JSON ({e}); pass '
                            'the folder save_pretrained wrote.') from None


def _load_safetensors(folder):
  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy
  # pylint: enable=g-import-not-at-top
  if (folder / SAFETENSORS).exists():
    files = [folder / SAFETENSORS]
  else:
    index = _read_json(folder / SAFETENSORS_INDEX)
    files = [folder / f for f in sorted(set(index['weight_map'].values()))]
  state = {}
  for file_path in files:
    try:
      state.update(safetensors_numpy.load(file_path.read_bytes()))
    except Exception as e:  # pylint: disable=broad-except
      raise errors.InputError(
          f'{file_path} is not a readable safetensors file ({e}); download '
          'it again.') from None
  return state


def _load_pytorch_bin(file_path):
  """`pytorch_model.bin`'s tensors as numpy; torch only here, and lazily."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.InputError(
        f'{file_path} is a PyTorch pickle, and reading it needs torch, which '
        'is not installed. Install it (`pip install torch`, the CPU build '
        'is enough), or download the checkpoint\'s model.safetensors into '
        'the same folder, which needs no torch.') from None
  try:
    with file_path.open('rb') as f:
      loaded = torch.load(f, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.InputError(
        f'{file_path} cannot be read as a PyTorch state dict of tensors '
        f'({type(e).__name__}: {str(e)[:200]}); download it again, or use '
        'the checkpoint\'s model.safetensors.') from None
  return {name: (tensor.to(torch.float32) if tensor.is_floating_point()
                 else tensor).numpy() for name, tensor in loaded.items()}


def is_huggingface(path):
  return (path / HF_CONFIG).exists() and any(
      (path / name).exists()
      for name in (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN))


def read_huggingface(path, image_size=None):
  """A `Source` from a HuggingFace checkpoint folder (module doc)."""
  hf_config = _read_json(path / HF_CONFIG)
  variant, fields = huggingface.config_fields(hf_config, image_size)
  if (path / SAFETENSORS).exists() or (path / SAFETENSORS_INDEX).exists():
    state_dict, weights = _load_safetensors(path), SAFETENSORS
  else:
    state_dict, weights = _load_pytorch_bin(path / PYTORCH_BIN), PYTORCH_BIN
  config = ml_collections.ConfigDict(fields)
  params = huggingface.hf_to_params(
      state_dict, config, huggingface.num_labels(hf_config),
      source=str(path / weights))
  processor = {}
  if (path / HF_PREPROCESSOR).exists():
    processor = _read_json(path / HF_PREPROCESSOR)
  mean = tuple(255.0 * m for m in processor.get('image_mean', IMAGENET_MEAN))
  std = tuple(255.0 * s for s in processor.get('image_std', IMAGENET_STD))
  return Source(
      variant=variant, fields=fields, params=params,
      class_names=huggingface.class_names(hf_config), mean=mean, std=std,
      description={'imported_from': os.fspath(path), 'format': 'huggingface',
                   'architecture': huggingface.architecture(hf_config),
                   'weights': weights})


def deepmind_fields(variant):
  """The model fields where DeepMind's haiku code computes differently
  from HuggingFace's port of it (`huggingface.config_fields` follows the
  port): GELU's tanh approximation (jax.nn.gelu's default); TensorFlow's
  SAME padding of the conv stem's convolution and max-pool (56 x 56 inputs
  at 224); and no query residual in the learned-position classifier's
  decoder (its colab's `use_query_residual=False`)."""
  fields = dict(gelu_approximate=True,
                decoder_query_residual=variant != 'learned')
  if variant == 'conv':
    fields['conv_stem_padding'] = 'same'
  return fields


def is_pystate(path):
  return path.suffix == PYSTATE and path.is_file()


def read_pystate(path, image_size=None, release=None):
  """A `Source` from DeepMind's haiku checkpoint of a Perceiver IO
  classifier (module doc); `release`: the architecture fields its weights
  do not show (`haiku.RELEASE`, DeepMind's, by default)."""
  variant, state_dict = haiku.to_hf(pystate.read(path), source=str(path))
  hf_config = haiku.hf_config(variant, state_dict, release)
  _, fields = huggingface.config_fields(hf_config, image_size)
  fields.update(deepmind_fields(variant))
  num_classes = hf_config['num_labels']
  params = huggingface.hf_to_params(
      state_dict, ml_collections.ConfigDict(fields), num_classes,
      source=str(path))
  names = imagenet_classes.names()
  return Source(
      variant=variant, fields=fields, params=params,
      class_names=(list(names) if num_classes == len(names) else
                   [str(i) for i in range(num_classes)]),
      # The colab's normalisation: ImageNet's mean and deviation.
      mean=tuple(255.0 * m for m in IMAGENET_MEAN),
      std=tuple(255.0 * s for s in IMAGENET_STD),
      description={'imported_from': os.fspath(path), 'format': 'haiku',
                   'architecture': haiku.HF_CLASSES[variant]})


# (test of the path, reader): the first whose test passes reads it.
FORMATS = [(is_huggingface, read_huggingface), (is_pystate, read_pystate)]


def read(source, image_size=None):
  """The `Source` at path `source`, read by the reader of its format."""
  path = epath.Path(source)
  if not path.exists():
    raise errors.InputError(f'--source={source} does not exist; pass the '
                            'folder of a downloaded checkpoint.')
  for test, reader in FORMATS:
    if test(path):
      return reader(path, image_size=image_size)
  raise errors.InputError(
      f'--source={source} is not a checkpoint this version imports: pass a '
      f'HuggingFace model folder holding {HF_CONFIG} and {SAFETENSORS} (or '
      f'{PYTORCH_BIN}), e.g. deepmind/vision-perceiver-conv downloaded from '
      f'the HuggingFace hub, or a DeepMind haiku {PYSTATE} file '
      f'({pystate.WHERE}).')


def workdir_config(base, source):
  """`base` (a training config) with the model fields `source` needs."""
  config = ml_collections.ConfigDict(base.to_dict())
  for name, value in source.fields.items():
    config[name] = value
  config.init_from = None  # The imported weights are this run's own.
  return config_lib.validate(config)


def _checkpoint(config, params, num_classes, directory):
  """Saves a train state holding `params` (and a fresh optimiser state)."""
  model = perceiver.create_model(config, num_classes)
  mesh = sharding_lib.create_mesh()
  image_shape = (config.image_size, config.image_size, 3)
  state, shardings = steps.create_train_state(config, model, image_shape,
                                              mesh)
  placed = jax.device_put(params, shardings.params)
  state = state.replace(params=placed)
  if state.ema_params is not None:
    state = state.replace(ema_params=placed)
  meta = experiment.initial_meta(config)
  meta[checkpointing.BEST_MARKER] = IMPORT_STEP
  manager = checkpointing.create_manager(directory)
  try:
    checkpointing.save(manager, IMPORT_STEP, state, meta, is_best=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def import_checkpoint(source, workdir, base_config, image_size=None):
  """Writes the workdir of the checkpoint at `source` (module doc).

  Args:
    source: a checkpoint path (see `FORMATS`).
    workdir: where to write; it must hold no checkpoint yet.
    base_config: the training config whose non-model fields (data,
      recipe) the workdir keeps, e.g. configs/imagenet_perceiver_io.py's.
    image_size: input size, see `huggingface.config_fields`.

  Returns:
    The workdir's config.
  """
  path = workdir_lib.path(workdir)
  if workdir_lib.has_checkpoints(path):
    raise errors.InputError(
        f'--workdir={workdir} already holds checkpoints; import into a new '
        'workdir.')
  found = read(source, image_size)
  config = workdir_config(base_config, found)
  info = datasets.get_dataset_info(config)
  if info.num_classes != len(found.class_names):
    raise errors.InputError(
        f'{source} classifies {len(found.class_names)} classes and '
        f'config.dataset={config.dataset!r} has {info.num_classes}; pass a '
        'config whose dataset the weights were trained on.')
  workdir_lib.prepare(workdir)
  description = dict(found.description, dataset=config.dataset)
  workdir_lib.write_json(path / workdir_lib.CONFIG, config.to_dict())
  workdir_lib.write_json(path / workdir_lib.NORMALIZATION, {
      'mean': list(found.mean),
      'variance': [s * s for s in found.std],
      'source': description})
  workdir_lib.write_json(path / workdir_lib.CLASS_NAMES, found.class_names)
  _checkpoint(config, found.params, info.num_classes,
              path / workdir_lib.CHECKPOINTS)
  logging.info('Imported %s (%s) into %s.', source, found.variant, path)
  return config

