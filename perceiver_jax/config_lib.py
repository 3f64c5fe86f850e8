"""Checks a ConfigDict before anything is loaded or compiled.

Every problem is reported at once, each naming the field and how to fix it,
so a typo on the command line costs seconds rather than a compile.
"""

import functools
import json

from perceiver_jax import checks
from perceiver_jax import errors


class ConfigError(errors.InputError):
  """A configuration value that cannot work."""


# Config fields the tools (`main.py --mode=eval|predict|attention`) may
# override with `--config.FIELD=`: they change batching, where the data lives
# or the compute precision, not which model or data the weights belong to.
TOOL_OVERRIDABLE_FIELDS = ('batch_size', 'tfds_data_dir', 'dtype',
                           'attention_impl', 'attention_form', 'data_storage',
                           'data_workers')


# Fields saved under another name by earlier versions: old name -> new.
RENAMED_FIELDS = {'dropout_rng': 'dropout_bits'}


def upgrade(saved):
  """A saved config dict with fields of earlier versions renamed."""
  return {RENAMED_FIELDS.get(k, k): v for k, v in saved.items()}


def _flatten(tree, prefix=''):
  """`{'a.b': leaf}` of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _as_json(tree):
  """`tree` as config.json holds it: plain dicts, lists for tuples."""
  if hasattr(tree, 'to_dict'):
    tree = tree.to_dict()
  return json.loads(json.dumps(tree))


def differences(old, new, *, keep=None, defaults=None):
  """'name: old -> new' for each field where two config dicts differ.

  Nested dicts are compared leaf by leaf (`name` is dotted, e.g.
  `plateau.patience`) and tuples equal lists, as config.json saves them.
  A field one side lacks counts as its entry in `defaults` (for a config
  saved before the field existed), shown `<unset: default d>`; without one
  it is `<unset>` and differs from any value.

  Args:
    old: the recorded config dict (or ConfigDict).
    new: the current one.
    keep: optional predicate on a (dotted) name: only those fields compare.
    defaults: optional `{name: default}` of fields a config may lack.

  Returns:
    The sorted list of 'name: old -> new' lines.
  """
  old, new = _flatten(_as_json(old)), _flatten(_as_json(new))
  defaults = _as_json(defaults or {})
  unset = object()

  def value(flat, name):
    return flat[name] if name in flat else defaults.get(name, unset)

  def shown(flat, name):
    if name in flat:
      return repr(flat[name])
    if name in defaults:
      return f'<unset: default {defaults[name]!r}>'
    return '<unset>'

  return [f'{name}: {shown(old, name)} -> {shown(new, name)}'
          for name in sorted(set(old) | set(new))
          if (keep is None or keep(name))
          and not value(old, name) == value(new, name) is not unset]


def _sources():
  """`(rules, defaults, problems)` of each module that owns config fields.

  `defaults` are the fields a config may lack (added after configs were
  first saved; their default keeps the seed's behaviour); `problems` checks
  across fields. Imported here, so `main.py --help` needs no jax.
  """
  # pylint: disable=g-import-not-at-top
  from perceiver_jax.data import augment
  from perceiver_jax.data import host_transforms
  from perceiver_jax.data import splits
  from perceiver_jax.data import storage
  from perceiver_jax.model import compute
  from perceiver_jax.model import perceiver
  from perceiver_jax.training import callbacks
  from perceiver_jax.training import checkpointing
  from perceiver_jax.training import metrics
  from perceiver_jax.training import profiling
  from perceiver_jax.training import recipe
  from perceiver_jax.training import sharding
  from perceiver_jax.training import steps
  from perceiver_jax.training import transfer_fields
  # pylint: enable=g-import-not-at-top
  none = lambda values, field: []
  return [
      (dict(perceiver.RULES, dtype=perceiver.DTYPE_RULE),
       perceiver.OPTION_DEFAULTS, perceiver.problems),
      (compute.RULES, compute.OPTION_DEFAULTS, none),
      (recipe.RULES, recipe.OPTION_DEFAULTS, recipe.problems),
      (splits.RULES, splits.OPTION_DEFAULTS, splits.problems),
      (storage.RULES, storage.OPTION_DEFAULTS, storage.problems),
      (host_transforms.RULES, host_transforms.OPTION_DEFAULTS, none),
      (augment.RULES, augment.OPTION_DEFAULTS, none),
      (callbacks.RULES, {}, none),
      (checkpointing.RULES, {}, none),
      (metrics.RULES, {}, none),
      (sharding.RULES, {}, none),
      (steps.RULES, steps.OPTION_DEFAULTS, steps.problems),
      (transfer_fields.RULES, transfer_fields.OPTION_DEFAULTS, none),
      (profiling.RULES, profiling.OPTION_DEFAULTS, none),
  ]


@functools.cache
def _defaults():
  defaults = {}
  for _, more, _ in _sources():
    defaults.update(more)
  return defaults


def added_field_defaults():
  """`{field: default}` of the fields a config may lack (see `_sources`)."""
  return dict(_defaults())


def option(config, name):
  """`config[name]`, or its default when the config predates the field.

  `config` is a ConfigDict or a (saved) config dict. Every module's defaults
  count (`_sources`); asking for a field none declares is a bug.

  Raises:
    KeyError: no module declares a default for `name`.
  """
  defaults = _defaults()
  if name not in defaults:
    raise KeyError(name)
  return config.get(name, defaults[name])


def _lookup(config, name):
  node = config
  for part in name.split('.'):
    if part not in node:
      raise KeyError(name)
    node = node[part]
  return node


def _example(value):
  return f'"{tuple(value)}"' if isinstance(value, (tuple, list)) else value


def config_problems(config):
  """Every problem with `config`, each naming the field and its fix."""
  sources = _sources()
  defaults = added_field_defaults()
  problems, values = [], {}
  for rules, _, _ in sources:
    for name in rules:
      try:
        values[name] = _lookup(config, name)
      except KeyError:
        if name in defaults:
          values[name] = defaults[name]
        else:
          problems.append(f'config.{name} is missing; start from '
                          'configs/cifar100.py, which defines every field.')
  values.update((k, v) for k, v in config.items() if k not in values)
  for rules, _, _ in sources:
    for name, value, rule in checks.broken(values, rules):
      problems.append(f'config.{name}={value!r} must be {rule.requirement}; '
                      f'pass e.g. --config.{name}={_example(rule.example)}.')
  for _, _, cross_problems in sources:
    problems += [p + '.' for p in cross_problems(
        values, lambda name: f'config.{name}')]
  return problems


def validate(config):
  """Raises ConfigError listing every problem with `config`."""
  problems = config_problems(config)
  if problems:
    raise ConfigError('Invalid configuration:\n  - ' + '\n  - '.join(problems))
  return config
