"""Transfer: a run starts from another run's weights (`config.init_from`).

As big_vision's transfer configs do: a new run (its workdir has no
checkpoint yet) takes the weights another workdir's training tested (its
early-stopping best, or its last; the EMA weights when it kept them) and
fine-tunes them, e.g. an ImageNet-trained Perceiver on CIFAR-100. The model
must be the same: every field that shapes or defines the network must match
(dropout rates, rematerialisation and initialisers may differ), except
`image_size`: at another resolution the learned position embedding is
resampled to the new patch grid (`resolution.py`). When the class count
differs, the classifier's last layer keeps its fresh initialisation; any
other weight that does not fit (e.g. the patch encoder of an RGB run on
grayscale data) is refused. The optimiser state starts afresh.

The pretrained weights saw their inputs normalised by the source run's
statistics, so by default (`init_normalization='source'`) the new run keeps
them, as transfer codebases do; 'recompute' computes the new data's own.
Either way the new workdir's normalization.json records which, so a resume
normalises as before. The two fields are declared in `transfer_fields.py`.
"""

import logging

import jax
import numpy as np

from perceiver_jax import config_lib
from perceiver_jax import errors
from perceiver_jax.model import perceiver
from perceiver_jax.training import checkpointing
from perceiver_jax.training import resolution
from perceiver_jax.training import sharding as sharding_lib
from perceiver_jax.training import workdir as workdir_lib

# Model fields a fine-tuning run may change: regularisation, memory and
# initialisation, none of which the pretrained weights depend on.
FREE_FIELDS = ('dropout_rate', 'attention_dropout_rate', 'logits_dropout',
               'remat', 'attention_init', 'latent_init')


def _model_differences(saved, config):
  """'name: there -> here' for each model field fine-tuning may not change."""
  fields = set(perceiver.RULES) - set(FREE_FIELDS)
  return config_lib.differences(
      saved, config, defaults=perceiver.OPTION_DEFAULTS,
      keep=lambda name: name in fields and not resolution.model_fields_match(
          name, saved, config))


def statistics_origin(config):
  """The workdir whose statistics this run keeps, or None (its own data)."""
  if (config_lib.option(config, 'init_from') and
      config_lib.option(config, 'init_normalization') == 'source'):
    return config.init_from
  return None


def source_statistics(config, channels):
  """`{'mean', 'variance'}` lists of `config.init_from`'s normalization.json.

  Raises:
    errors.InputError: the file is missing, or of another channel count.
  """
  source = config.init_from
  stats = workdir_lib.read_json(source, workdir_lib.NORMALIZATION)
  if stats is None:
    raise errors.InputError(
        f'config.init_from={source!r} has no {workdir_lib.NORMALIZATION}, so '
        'its inputs\' normalisation is unknown; pass the workdir of a '
        'training run, or --config.init_normalization=recompute to compute '
        "this data's own statistics.")
  if len(stats['mean']) != channels:
    raise errors.InputError(
        f'config.init_from={source!r} was trained on images of '
        f'{len(stats["mean"])} channels and this data has {channels}; its '
        'weights cannot take them. Fine-tune on data of its channel count.')
  return {k: list(stats[k]) for k in ('mean', 'variance')}


def _output_layer(names):
  """'classifier/dense_<k>/', the classifier's last layer (the logits)."""
  layers = {n.split('/')[1] for n in names if n.startswith('classifier/')}
  return f'classifier/{max(layers, key=lambda l: int(l.split("_")[-1]))}/'


def _merge(pretrained, fresh, source):
  """`fresh` with every leaf taken from `pretrained`; see the module doc."""
  flat = {sharding_lib.path_name(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  output = _output_layer(flat)
  fresh_paths = set()
  misfits = []

  def take(key_path, leaf):
    name = sharding_lib.path_name(key_path)
    fresh_paths.add(name)
    old = flat.get(name)
    if old is None:
      misfits.append(f'{name} is not in {source}')
      return leaf
    if old.shape == leaf.shape:
      return np.asarray(old, leaf.dtype)
    if resolution.follows_grid(name) and old.shape[1:] == leaf.shape[1:]:
      return np.asarray(resolution.resample(name, old, leaf.shape, source),
                        leaf.dtype)
    if name.startswith(output) and old.shape[:-1] == leaf.shape[:-1]:
      return leaf  # Another class count: the last layer starts afresh.
    misfits.append(f'{name} has shape {old.shape} there, {leaf.shape} here')
    return leaf

  merged = jax.tree_util.tree_map_with_path(take, fresh)
  misfits += [f'{name} is not in this model'
              for name in sorted(set(flat) - fresh_paths)]
  if misfits:
    raise errors.InputError(
        f'The weights in config.init_from={source!r} do not fit this model: '
        + '; '.join(misfits[:5]) + ('; ...' if len(misfits) > 5 else '') +
        f'. Only {output[:-1]} (the logits) may differ, for another class '
        'count, and the position embedding, for another image_size; use the '
        'pretrained run\'s model fields and images of its channel count.')
  return merged


def check_source(config):
  """The saved config of `config.init_from`, once it proves a trained run
  of this model (cheap: before any data is read or anything compiled).

  Raises:
    errors.InputError: the workdir holds no trained run, or another model.
  """
  source = config.init_from
  path = workdir_lib.path(source)
  saved = workdir_lib.read_json(path, workdir_lib.CONFIG)
  if saved is None or not workdir_lib.has_checkpoints(path):
    raise errors.InputError(
        f'config.init_from={source!r} is not the workdir of a trained run '
        '(it needs config.json and a checkpoint); pass the --workdir of a '
        'finished training run.')
  differences = _model_differences(config_lib.upgrade(saved), config)
  if differences:
    raise errors.InputError(
        f'config.init_from={source!r} holds another model, so its weights '
        'cannot start this one. Differing fields (there -> here): '
        + '; '.join(differences) + '. Set them as the pretrained run has '
        f'them (see {path / workdir_lib.CONFIG}).')
  return saved


def pretrained_params(config, fresh_params, saved=None):
  """`fresh_params` overwritten by the weights of `config.init_from`.

  Args:
    config: this run's config.
    fresh_params: this model's freshly initialised parameters (host or
      device arrays); their structure and dtypes are kept.
    saved: what `check_source(config)` returned, if the caller has it
      (else it is read and checked here).

  Returns:
    numpy parameters.

  Raises:
    errors.InputError: the workdir holds no trained run, or another model,
      or its weights do not fit this model.
  """
  if saved is None:
    saved = check_source(config)
  source = config.init_from
  path = workdir_lib.path(source)
  manager = checkpointing.create_manager(
      path / workdir_lib.CHECKPOINTS, read_only=True)
  try:
    step, which, state = checkpointing.restore_tested(
        manager, saved, checkpointing.read_weights)
  finally:
    manager.close()
  weights = state.get('ema_params') or state['params']
  logging.info('Initialised from the %s checkpoint of %s (step %d%s).',
               which, source, step,
               ', EMA weights' if state.get('ema_params') else '')
  resized = resolution.describe(config_lib.upgrade(saved), config)
  if resized:
    logging.info('Fine-tuning at another resolution: %s.', resized)
  return _merge(weights, jax.device_get(fresh_params), source)
