"""Checks a ConfigDict before anything is loaded or compiled.

Every problem is reported at once, each naming the field and how to fix it,
so a typo on the command line costs seconds rather than a compile.
"""

import numbers

from perceiver_jax import errors


class ConfigError(errors.InputError):
  """A configuration value that cannot work."""


# Config fields the tools (`main.py --mode=eval|predict|attention`) may
# override with `--config.FIELD=`: they change batching, where the data lives
# or the compute precision, not which model or data the weights belong to.
TOOL_OVERRIDABLE_FIELDS = ('batch_size', 'tfds_data_dir', 'dtype',
                           'attention_impl', 'attention_form')


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def config_problems(config):
  """Returns a list of human-readable problems; empty when the config is valid."""
  problems = []

  def get(name):
    node = config
    for part in name.split('.'):
      if part not in node:
        problems.append(f'config.{name} is missing; start from '
                        'configs/cifar100.py, which defines every field.')
        return None
      node = node[part]
    return node

  def need(name, ok, requirement, fix=None):
    value = get(name)
    if value is None and name != 'tfds_data_dir':
      return None
    if not ok(value):
      fix = fix or f'pass e.g. --config.{name}=<{requirement}>'
      problems.append(f'config.{name}={value!r} must be {requirement}; {fix}.')
    return value

  for name in ('batch_size', 'num_epochs', 'image_size', 'patch_size',
               'latent_dim', 'projection_dim', 'num_heads',
               'num_transformer_blocks', 'num_iterations',
               'checkpoint_max_to_keep', 'log_every_steps'):
    need(name, lambda v: _is_int(v) and v > 0, 'a positive integer')
  need('checkpoint_every_steps', lambda v: _is_int(v) and v >= 0,
       'a non-negative integer (0: only at epoch ends)')
  need('seed', lambda v: _is_int(v) and v >= 0, 'a non-negative integer')
  for name in ('ffn_units', 'classifier_units'):
    need(name, lambda v: isinstance(v, (tuple, list)) and all(
        _is_int(u) and u > 0 for u in v), 'a tuple of positive integers',
         f'pass e.g. --config.{name}="(256,256)"')
  ffn = get('ffn_units')
  if isinstance(ffn, (tuple, list)):
    if not ffn:
      problems.append('config.ffn_units must not be empty; pass e.g. '
                      '--config.ffn_units="(256,256)".')
    elif ffn[-1] != config.get('projection_dim'):
      problems.append(
          f'config.ffn_units={tuple(ffn)!r} must end with projection_dim '
          f'({config.get("projection_dim")}) because the FFN output is added '
          'back to its input; set its last entry to config.projection_dim.')
  image_size, patch_size = get('image_size'), get('patch_size')
  if (_is_int(image_size) and _is_int(patch_size) and patch_size > 0
      and image_size % patch_size):
    problems.append(
        f'config.image_size={image_size} is not divisible by '
        f'config.patch_size={patch_size}; images are cut into non-overlapping '
        'patches, so choose e.g. image_size='
        f'{max(patch_size, image_size // patch_size * patch_size)}.')
  need('learning_rate', lambda v: _is_number(v) and v > 0, 'a positive number')
  need('weight_decay', lambda v: _is_number(v) and v >= 0,
       'a non-negative number')
  for name in ('dropout_rate', 'attention_dropout_rate'):
    need(name, lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)')
  need('attention_init', lambda v: v in ('keras2', 'keras3'),
       "'keras2' or 'keras3'", "e.g. --config.attention_init=keras2")
  need('dtype', lambda v: v in ('float32', 'bfloat16', 'float16'),
       "'float32', 'bfloat16' or 'float16'", 'e.g. --config.dtype=bfloat16')
  need('attention_impl', lambda v: v in (None, 'xla', 'cudnn'),
       "'xla' or 'cudnn'", 'e.g. --config.attention_impl=xla')
  # Kernel choices: configs written before they existed get the defaults.
  from perceiver_jax import compute  # pylint: disable=g-import-not-at-top
  for name, allowed in (('attention_form', compute.ATTENTION_FORMS),
                        ('dropout_rng', compute.dropout_lib.DROPOUT_RNGS)):
    value = config.get(name, compute.CONFIG_DEFAULTS[name])
    if value not in allowed:
      problems.append(f'config.{name}={value!r} must be one of {allowed}; '
                      f'pass e.g. --config.{name}='
                      f'{compute.CONFIG_DEFAULTS[name]}.')
  need('validation_split', lambda v: _is_number(v) and 0 < v < 1,
       'strictly between 0 and 1 (the held-out fraction of tfds "train")')
  need('dataset', lambda v: isinstance(v, str) and v.strip(),
       'a tfds dataset name', 'e.g. --config.dataset=cifar100')
  need('tfds_data_dir', lambda v: v is None or (isinstance(v, str) and v),
       'a directory path or unset')
  need('plateau.factor', lambda v: _is_number(v) and 0 < v < 1, 'in (0, 1)')
  for name in ('plateau.patience', 'plateau.cooldown',
               'early_stopping.patience'):
    need(name, lambda v: _is_int(v) and v >= 0, 'a non-negative integer')
  for name in ('plateau.min_delta', 'plateau.min_lr',
               'early_stopping.min_delta'):
    need(name, lambda v: _is_number(v) and v >= 0, 'a non-negative number')
  if get('mock_data'):
    need('mock_num_examples', lambda v: _is_int(v) and v > 0,
         'a positive integer when config.mock_data is True')

  # ---- Perceiver paper options (model.py). A missing field means the
  # seed's default, as in model.create_model.
  def paper_option(name, default, ok, requirement, example):
    value = config.get(name, default)
    if not ok(value):
      problems.append(f'config.{name}={value!r} must be {requirement}; pass '
                      f'e.g. --config.{name}={example}.')
    return value

  one_of = lambda *allowed: lambda v: isinstance(v, str) and v in allowed
  paper_option('position_encoding', 'learned', one_of('learned', 'fourier'),
               "'learned' or 'fourier'", 'fourier')
  paper_option('fourier_num_bands', 64, lambda v: _is_int(v) and v > 0,
               'a positive integer', 64)
  paper_option('fourier_max_resolution', 0, lambda v: _is_int(v) and v >= 0,
               'a non-negative integer (0: the patch grid size)', 0)
  paper_option('fourier_mode', 'concat', one_of('concat', 'add'),
               "'concat' or 'add'", 'concat')
  paper_option('weight_sharing', 'all', one_of('all', 'paper', 'none'),
               "'all', 'paper' or 'none'", 'paper')
  heads = paper_option(
      'num_cross_heads', 0, lambda v: _is_int(v) and v >= 0,
      "a non-negative integer (0: the seed's single head)", 8)
  width = config.get('projection_dim')
  if _is_int(heads) and heads > 0 and _is_int(width) and width > 0 and (
      width % heads):
    divisors = [k for k in range(1, width + 1) if width % k == 0]
    problems.append(
        f'config.num_cross_heads={heads} must divide config.projection_dim='
        f'{width} (each head is projection_dim // num_cross_heads wide); '
        f'choose 0 (the seed) or one of {divisors}.')
  paper_option('decoder', 'mean', one_of('mean', 'query'),
               "'mean' or 'query'", 'query')
  paper_option('logits_dropout', True, lambda v: isinstance(v, bool),
               'True or False', 'False')
  # ---- End of Perceiver paper options.
  problems.extend(_recipe_problems(config))
  return problems


def validate(config):
  """Raises ConfigError listing every problem with `config`."""
  problems = config_problems(config)
  if problems:
    raise ConfigError('Invalid configuration:\n  - ' + '\n  - '.join(problems))
  return config


# Fields that may change when a run resumes: they steer training, logging or
# speed but leave the model, its data and the example order as they were.
# Any other difference would not fit the checkpoints (or silently change the
# run), so resuming refuses it.
RESUMABLE_FIELDS = (
    'num_epochs', 'log_every_steps', 'checkpoint_max_to_keep',
    'checkpoint_every_steps', 'tfds_data_dir', 'dtype', 'attention_impl',
    'attention_form', 'dropout_rng', 'remat', 'learning_rate', 'weight_decay', 'plateau', 'early_stopping',
)


def _flatten(d, prefix=''):
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def added_field_defaults():
  """`{field: default}` of the fields read with a default.

  Those fields were added after configs were first saved; a config without
  one ran with its default, which keeps the seed's behaviour.
  """
  # pylint: disable=g-import-not-at-top
  from perceiver_jax import compute
  from perceiver_jax import model
  from perceiver_jax import recipe
  # pylint: enable=g-import-not-at-top
  return {**model.OPTION_DEFAULTS, **compute.CONFIG_DEFAULTS,
          **recipe.OPTION_DEFAULTS}


def resume_conflicts(saved, config):
  """Fields where `config` differs from the `saved` config dict of a workdir.

  A field one side lacks counts as its default (`added_field_defaults`), so
  a workdir saved before a field existed resumes only while the field keeps
  its default, unless the field may change anyway. A missing field with no
  default is a difference.

  Returns `(conflicts, allowed)`: lists of 'field: saved -> new' strings, the
  first for fields that forbid resuming, the second for those that may change.
  """
  import json  # pylint: disable=g-import-not-at-top
  saved = _flatten(json.loads(json.dumps(saved)))
  new = _flatten(json.loads(json.dumps(config.to_dict())))
  defaults = json.loads(json.dumps(added_field_defaults()))
  unset = object()

  def value(flat, name):
    return flat[name] if name in flat else defaults.get(name, unset)

  def shown(flat, name):
    if name in flat:
      return repr(flat[name])
    if name in defaults:
      return f'<unset: default {defaults[name]!r}>'
    return '<unset>'

  conflicts, allowed = [], []
  for name in sorted(set(saved) | set(new)):
    if value(saved, name) == value(new, name) is not unset:
      continue
    line = f'{name}: {shown(saved, name)} -> {shown(new, name)}'
    resumable = name.split('.')[0] in RESUMABLE_FIELDS
    (allowed if resumable else conflicts).append(line)
  return conflicts, allowed


# ---- Recipe options (recipe.py); a missing field means the seed's default.
def _recipe_problems(config):
  """Problems with the training-recipe fields; see configs/cifar100.py."""
  from perceiver_jax import recipe  # pylint: disable=g-import-not-at-top
  problems = []

  def check(name, ok, requirement, example):
    value = recipe.option(config, name)
    if not ok(value):
      problems.append(f'config.{name}={value!r} must be {requirement}; pass '
                      f'e.g. --config.{name}={example}.')
    return value

  number = lambda low, high=float('inf'), open_high=False: lambda v: (
      _is_number(v) and low <= v and (v < high if open_high else v <= high))
  schedule = check('lr_schedule', lambda v: v in ('plateau', 'warmup_cosine'),
                   "'plateau' or 'warmup_cosine'", 'warmup_cosine')
  warmup = check('warmup_epochs', lambda v: _is_int(v) and v >= 0,
                 'a non-negative integer', 5)
  epochs = config.get('num_epochs')
  if (schedule == 'warmup_cosine' and _is_int(warmup) and _is_int(epochs)
      and warmup >= epochs):
    problems.append(f'config.warmup_epochs={warmup} must be smaller than '
                    f'config.num_epochs={epochs} with lr_schedule='
                    "'warmup_cosine'; pass e.g. --config.warmup_epochs="
                    f'{max(epochs // 10, 0)}.')
  lr = config.get('learning_rate')
  check('min_learning_rate',
        number(0.0, lr if _is_number(lr) and lr > 0 else float('inf')),
        'a number in [0, learning_rate]', 0.0)
  check('label_smoothing', number(0.0, 1.0, open_high=True), 'in [0, 1)', 0.1)
  check('weight_decay_mask', lambda v: v in ('all', 'kernels'),
        "'all' or 'kernels'", 'kernels')
  check('grad_clip_norm', number(0.0), 'a non-negative number (0: off)', 1.0)
  for name in ('mixup_alpha', 'cutmix_alpha'):
    check(name, number(0.0), 'a non-negative number (0: off)', 1.0)
  check('mix_prob', number(0.0, 1.0), 'in [0, 1]', 1.0)
  check('randaugment_num_ops', lambda v: _is_int(v) and 0 <= v <= 10,
        'an integer in [0, 10] (0: off)', 2)
  check('randaugment_magnitude', number(0.0, 10.0),
        "in [0, 10] (timm's scale)", 9)
  check('ema_decay', number(0.0, 1.0, open_high=True), 'in [0, 1) (0: off)',
        0.9998)
  return problems


# Recipe fields steer training only and keep the state's structure, so a run
# may resume with them changed; weight_decay_mask, grad_clip_norm and
# ema_decay change the optimiser state or the EMA copy, so they may not.
RESUMABLE_FIELDS += (
    'lr_schedule', 'warmup_epochs', 'min_learning_rate', 'label_smoothing',
    'mixup_alpha', 'cutmix_alpha', 'mix_prob', 'randaugment_num_ops',
    'randaugment_magnitude',
)
